//! pyqmoe._core: the PyO3 shell over pyqmoe-core. No numerics here: argument conversion, the GIL
//! released around Rust work, and Rust errors mapped to Python exceptions (never a panic).

use std::path::PathBuf;

use numpy::{PyArray1, PyReadonlyArrayDyn, PyUntypedArrayMethods};
use pyo3::create_exception;
use pyo3::exceptions::{PyOSError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyList};

use pyqmoe_core::gguf::{GgufModel, SplitLimits, SplitWriter, TensorSpec, Value, ValueType};
use pyqmoe_core::imatrix::{Imatrix, ImatrixFormat};
use pyqmoe_core::presets::Preset;
use pyqmoe_core::quantize_model::{self as qm, Progress, QuantizeParams, TensorRule};
use pyqmoe_core::{quant, Error, GgmlType};

mod model;

create_exception!(
    _core,
    PyqmoeError,
    PyValueError,
    "Base class of pyqmoe's errors."
);
create_exception!(
    _core,
    GGUFFormatError,
    PyqmoeError,
    "A malformed, truncated or unsupported GGUF file."
);
create_exception!(
    _core,
    TensorError,
    PyqmoeError,
    "Tensor data that cannot be converted (NaN/Inf, bad shape, ...)."
);
create_exception!(
    _core,
    UnknownTypeError,
    PyqmoeError,
    "A tensor type name pyqmoe does not know or cannot make."
);

fn to_py(e: Error) -> PyErr {
    let msg = e.to_string();
    match e {
        Error::Format { .. } => GGUFFormatError::new_err(msg),
        Error::Io { source, .. } => PyOSError::new_err((source.raw_os_error().unwrap_or(0), msg)),
        Error::Tensor { .. } => TensorError::new_err(msg),
        Error::UnknownType(_) => UnknownTypeError::new_err(msg),
        Error::Invalid(_) => PyqmoeError::new_err(msg),
    }
}

fn parse_type(name: &str) -> PyResult<GgmlType> {
    GgmlType::from_name(name).map_err(to_py)
}

fn value_to_py<'py>(py: Python<'py>, v: &Value) -> PyResult<Bound<'py, PyAny>> {
    Ok(match v {
        Value::U8(x) => x.into_pyobject(py)?.into_any(),
        Value::I8(x) => x.into_pyobject(py)?.into_any(),
        Value::U16(x) => x.into_pyobject(py)?.into_any(),
        Value::I16(x) => x.into_pyobject(py)?.into_any(),
        Value::U32(x) => x.into_pyobject(py)?.into_any(),
        Value::I32(x) => x.into_pyobject(py)?.into_any(),
        Value::U64(x) => x.into_pyobject(py)?.into_any(),
        Value::I64(x) => x.into_pyobject(py)?.into_any(),
        Value::F32(x) => x.into_pyobject(py)?.into_any(),
        Value::F64(x) => x.into_pyobject(py)?.into_any(),
        Value::Bool(x) => x.into_pyobject(py)?.to_owned().into_any(),
        // Invalid UTF-8 (possible in tokenizer vocabularies) comes back as bytes, not mangled.
        Value::String(b) => match std::str::from_utf8(b) {
            Ok(s) => s.into_pyobject(py)?.into_any(),
            Err(_) => PyBytes::new(py, b).into_any(),
        },
        Value::Array(_, items) => {
            let list = PyList::empty(py);
            for it in items {
                list.append(value_to_py(py, it)?)?;
            }
            list.into_any()
        }
    })
}

fn type_name(v: &Value) -> String {
    match v {
        Value::Array(t, items) => {
            // Nested arrays: name the innermost element type too, e.g. ARRAY[ARRAY[INT32]].
            let inner = match items.first() {
                Some(first @ Value::Array(..)) => type_name(first),
                _ => t.name().to_string(),
            };
            format!("ARRAY[{inner}]")
        }
        v => v.value_type().name().to_string(),
    }
}

/// (name, dims in ggml order, type name, file index, absolute offset, nbytes).
type TensorRow = (String, Vec<u64>, &'static str, usize, u64, u64);

/// A GGUF model (one file or all parts of a split model), memory-mapped and validated.
#[pyclass(module = "pyqmoe._core", frozen)]
struct GGUFModel {
    inner: GgufModel,
}

#[pymethods]
impl GGUFModel {
    #[new]
    fn new(py: Python<'_>, path: PathBuf) -> PyResult<Self> {
        let inner = py.detach(|| GgufModel::open(&path)).map_err(to_py)?;
        Ok(GGUFModel { inner })
    }

    /// Paths of the files, in split order.
    #[getter]
    fn paths(&self) -> Vec<PathBuf> {
        self.inner.files.iter().map(|f| f.path.clone()).collect()
    }

    #[getter]
    fn version(&self) -> u32 {
        self.inner.files[0].header.version
    }

    #[getter]
    fn alignment(&self) -> u64 {
        self.inner.files[0].header.alignment
    }

    /// Per file: the absolute offset where tensor data starts.
    #[getter]
    fn data_offsets(&self) -> Vec<u64> {
        self.inner
            .files
            .iter()
            .map(|f| f.header.data_offset)
            .collect()
    }

    #[getter]
    fn file_sizes(&self) -> Vec<u64> {
        self.inner.files.iter().map(|f| f.len()).collect()
    }

    /// Metadata of the first file as a list of (key, type name, value), in file order.
    fn fields<'py>(&self, py: Python<'py>) -> PyResult<Vec<(String, String, Bound<'py, PyAny>)>> {
        self.inner
            .metadata()
            .iter()
            .map(|(k, v)| Ok((k.clone(), type_name(v), value_to_py(py, v)?)))
            .collect()
    }

    /// Metadata of one split part (split files after the first hold only the split.* keys).
    fn file_fields<'py>(
        &self,
        py: Python<'py>,
        index: usize,
    ) -> PyResult<Vec<(String, String, Bound<'py, PyAny>)>> {
        let f = self
            .inner
            .files
            .get(index)
            .ok_or_else(|| PyValueError::new_err("no such split part"))?;
        f.header
            .metadata
            .iter()
            .map(|(k, v)| Ok((k.clone(), type_name(v), value_to_py(py, v)?)))
            .collect()
    }

    /// Tensors as (name, dims in ggml order, type name, file index, absolute offset, nbytes).
    fn tensor_infos(&self) -> Vec<TensorRow> {
        self.inner
            .tensors
            .iter()
            .map(|(fi, t)| {
                let f = &self.inner.files[*fi];
                (
                    t.name.clone(),
                    t.dims.clone(),
                    t.ty.name(),
                    *fi,
                    f.tensor_file_offset(t),
                    t.nbytes,
                )
            })
            .collect()
    }

    /// Dequantizes one tensor to a flat float32 array (a copy).
    fn dequantize<'py>(&self, py: Python<'py>, name: &str) -> PyResult<Bound<'py, PyArray1<f32>>> {
        let t = self
            .inner
            .tensor(name)
            .ok_or_else(|| PyValueError::new_err(format!("no tensor named '{name}'")))?;
        let data = self.inner.tensor_data(name).unwrap();
        let (n_per_row, ty) = (t.n_per_row() as usize, t.ty);
        let out = py
            .detach(|| quant::dequantize(name, data, n_per_row, ty))
            .map_err(to_py)?;
        Ok(PyArray1::from_vec(py, out))
    }
}

/// Quantizes a float32 array whose last axis is the row, returning uint8 bytes of shape
/// (rows, row bytes).
#[pyfunction]
#[pyo3(signature = (array, qtype, imatrix=None, name="array"))]
fn quantize<'py>(
    py: Python<'py>,
    array: PyReadonlyArrayDyn<'py, f32>,
    qtype: &str,
    imatrix: Option<PyReadonlyArrayDyn<'py, f32>>,
    name: &str,
) -> PyResult<Bound<'py, PyArray1<u8>>> {
    let ty = parse_type(qtype)?;
    let shape = array.shape().to_vec();
    let n_per_row = *shape.last().unwrap_or(&1);
    let src = array
        .as_slice()
        .map_err(|_| PyValueError::new_err("array must be C-contiguous"))?;
    let w = match &imatrix {
        Some(w) => Some(
            w.as_slice()
                .map_err(|_| PyValueError::new_err("imatrix must be C-contiguous"))?,
        ),
        None => None,
    };
    let out = py
        .detach(|| quant::quantize(name, src, n_per_row, ty, w))
        .map_err(to_py)?;
    Ok(PyArray1::from_vec(py, out))
}

/// Dequantizes packed bytes of `qtype` with rows of `n_per_row` elements to a flat float32 array.
#[pyfunction]
#[pyo3(signature = (raw, qtype, n_per_row, name="array"))]
fn dequantize<'py>(
    py: Python<'py>,
    raw: PyReadonlyArrayDyn<'py, u8>,
    qtype: &str,
    n_per_row: usize,
    name: &str,
) -> PyResult<Bound<'py, PyArray1<f32>>> {
    let ty = parse_type(qtype)?;
    let src = raw
        .as_slice()
        .map_err(|_| PyValueError::new_err("raw must be C-contiguous"))?;
    let out = py
        .detach(|| quant::dequantize(name, src, n_per_row, ty))
        .map_err(to_py)?;
    Ok(PyArray1::from_vec(py, out))
}

/// (name, id, block size, type size, pyqmoe can convert it) for every ggml type.
#[pyfunction]
fn types() -> Vec<(&'static str, u32, usize, usize, bool)> {
    pyqmoe_core::types::ALL_TYPES
        .iter()
        .map(|t| {
            (
                t.name(),
                t.id(),
                t.block_size(),
                t.type_size(),
                quant::kernels(*t).is_some(),
            )
        })
        .collect()
}

#[pyfunction]
fn requires_imatrix(qtype: &str) -> PyResult<bool> {
    let ty = parse_type(qtype)?;
    Ok(quant::kernels(ty).is_some_and(|k| k.requires_imatrix))
}

/// Rewrites a model (split or not) into `dst`, tensors and metadata unchanged, optionally split.
/// Returns the written paths.
#[pyfunction]
#[pyo3(signature = (src, dst, split_max_bytes=None, split_max_tensors=None))]
fn rewrite(
    py: Python<'_>,
    src: PathBuf,
    dst: PathBuf,
    split_max_bytes: Option<u64>,
    split_max_tensors: Option<usize>,
) -> PyResult<Vec<PathBuf>> {
    py.detach(|| -> pyqmoe_core::Result<Vec<PathBuf>> {
        let model = GgufModel::open(&src)?;
        let specs: Vec<TensorSpec> = model
            .tensors
            .iter()
            .map(|(_, t)| TensorSpec {
                name: t.name.clone(),
                dims: t.dims.clone(),
                ty: t.ty,
            })
            .collect();
        let limits = SplitLimits {
            max_bytes: split_max_bytes,
            max_tensors: split_max_tensors,
        };
        let mut w = SplitWriter::create(&dst, model.metadata(), specs, limits)?;
        for (_, t) in &model.tensors {
            w.write_tensor(model.tensor_data(&t.name).unwrap())?;
        }
        w.finish()
    })
    .map_err(to_py)
}

/// One metadata entry: (key, type name, value).
type MetaRow<'py> = (String, String, Bound<'py, PyAny>);
/// (name, file type number, default tensor type, description).
type PresetRow = (&'static str, u32, &'static str, &'static str);
/// (format, [(tensor name, values)], datasets, chunk count).
type ImatrixRow<'py> = (
    &'static str,
    Vec<(String, Bound<'py, PyArray1<f32>>)>,
    Vec<String>,
    u32,
);

/// Options beyond llama-quantize's positional arguments, shared by plan and run.
#[derive(Default)]
struct ExtraOptions {
    pure: bool,
    leave_output_tensor: bool,
    imatrix: Option<PathBuf>,
    include_weights: Vec<String>,
    exclude_weights: Vec<String>,
    prune_layers: Vec<u32>,
    keep_split: bool,
}

#[allow(clippy::too_many_arguments)]
fn parse_params(
    preset: &str,
    rules: Vec<(String, String)>,
    token_embedding_type: Option<&str>,
    output_tensor_type: Option<&str>,
    allow_requantize: bool,
    split_max_bytes: Option<u64>,
    split_max_tensors: Option<usize>,
    extra: ExtraOptions,
) -> pyqmoe_core::Result<QuantizeParams> {
    let mut p = QuantizeParams::new(Preset::parse(preset)?);
    for (spec, option) in rules {
        p.rules.push(TensorRule::parse(&spec, &option)?);
    }
    p.token_embedding_type = token_embedding_type.map(GgmlType::from_name).transpose()?;
    p.output_tensor_type = output_tensor_type.map(GgmlType::from_name).transpose()?;
    p.allow_requantize = allow_requantize;
    p.split.max_bytes = split_max_bytes;
    p.split.max_tensors = split_max_tensors;
    p.pure = extra.pure;
    p.quantize_output_tensor = !extra.leave_output_tensor;
    p.prune_layers = extra.prune_layers;
    p.keep_split = extra.keep_split;
    if p.keep_split && !p.split.is_none() {
        return Err(Error::Invalid(
            "--keep-split cannot be combined with --split-max-size/--split-max-tensors".into(),
        ));
    }
    if (!extra.include_weights.is_empty() || !extra.exclude_weights.is_empty())
        && extra.imatrix.is_none()
    {
        return Err(Error::Invalid(
            "--include-weights/--exclude-weights need --imatrix".into(),
        ));
    }
    if let Some(path) = extra.imatrix {
        let mut m = Imatrix::load(&path)?;
        m.filter(&extra.include_weights, &extra.exclude_weights)?;
        p.imatrix = Some(m);
    }
    Ok(p)
}

/// (paths, n_tensors, n_elements, bytes, {type: count}).
type SummaryRow = (
    Vec<PathBuf>,
    usize,
    u64,
    u64,
    std::collections::BTreeMap<String, usize>,
);

/// One plan row: (name, dims, from type, to type, converted, input bytes, output bytes, note,
/// needs importance data, has importance data, input name).
type PlanRow = (
    String,
    Vec<u64>,
    &'static str,
    &'static str,
    bool,
    u64,
    u64,
    Option<String>,
    bool,
    bool,
    String,
);

fn plan_row(e: &qm::PlanEntry) -> PlanRow {
    (
        e.name.clone(),
        e.dims.clone(),
        e.from.name(),
        e.to.name(),
        e.convert,
        e.in_bytes,
        e.out_bytes,
        e.note.clone(),
        e.requires_imatrix,
        e.imatrix,
        e.src_name.clone(),
    )
}

fn with_threads<T: Send>(threads: Option<usize>, f: impl FnOnce() -> T + Send) -> PyResult<T> {
    match threads {
        None | Some(0) => Ok(f()),
        Some(n) => {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(n)
                .build()
                .map_err(|e| PyqmoeError::new_err(format!("cannot start {n} threads: {e}")))?;
            Ok(pool.install(f))
        }
    }
}

/// The per-tensor plan of a quantization (what --dry-run prints and a real run writes) and the
/// output metadata as (key, type name, value).
#[pyfunction]
#[pyo3(signature = (src, preset, rules=vec![], token_embedding_type=None, output_tensor_type=None, allow_requantize=false,
                    *, pure=false, leave_output_tensor=false, imatrix=None, include_weights=vec![], exclude_weights=vec![],
                    prune_layers=vec![], keep_split=false))]
#[allow(clippy::too_many_arguments)]
fn quantize_plan<'py>(
    py: Python<'py>,
    src: PathBuf,
    preset: &str,
    rules: Vec<(String, String)>,
    token_embedding_type: Option<&str>,
    output_tensor_type: Option<&str>,
    allow_requantize: bool,
    pure: bool,
    leave_output_tensor: bool,
    imatrix: Option<PathBuf>,
    include_weights: Vec<String>,
    exclude_weights: Vec<String>,
    prune_layers: Vec<u32>,
    keep_split: bool,
) -> PyResult<(Vec<PlanRow>, Vec<MetaRow<'py>>)> {
    let extra = ExtraOptions {
        pure,
        leave_output_tensor,
        imatrix,
        include_weights,
        exclude_weights,
        prune_layers,
        keep_split,
    };
    let plan = py
        .detach(|| {
            let p = parse_params(
                preset,
                rules,
                token_embedding_type,
                output_tensor_type,
                allow_requantize,
                None,
                None,
                extra,
            )?;
            GgufModel::open(&src).and_then(|m| qm::plan(&m, &p))
        })
        .map_err(to_py)?;
    let meta = plan
        .metadata
        .iter()
        .map(|(k, v)| Ok((k.clone(), type_name(v), value_to_py(py, v)?)))
        .collect::<PyResult<Vec<_>>>()?;
    Ok((plan.entries.iter().map(plan_row).collect(), meta))
}

/// Quantizes a model file. `progress(event)` is called with ("start", total_bytes, n_tensors) and
/// then ("tensor", index, plan row) before each tensor; an exception in it (Ctrl-C) cancels the run
/// and leaves no output. Returns (paths, n_tensors, n_elements, bytes, {type: count}).
#[pyfunction]
#[pyo3(signature = (src, dst, preset, rules=vec![], token_embedding_type=None, output_tensor_type=None,
                    allow_requantize=false, split_max_bytes=None, split_max_tensors=None, threads=None, progress=None,
                    *, pure=false, leave_output_tensor=false, imatrix=None, include_weights=vec![], exclude_weights=vec![],
                    prune_layers=vec![], keep_split=false))]
#[allow(clippy::too_many_arguments)]
fn quantize_model(
    py: Python<'_>,
    src: PathBuf,
    dst: PathBuf,
    preset: &str,
    rules: Vec<(String, String)>,
    token_embedding_type: Option<&str>,
    output_tensor_type: Option<&str>,
    allow_requantize: bool,
    split_max_bytes: Option<u64>,
    split_max_tensors: Option<usize>,
    threads: Option<usize>,
    progress: Option<Py<PyAny>>,
    pure: bool,
    leave_output_tensor: bool,
    imatrix: Option<PathBuf>,
    include_weights: Vec<String>,
    exclude_weights: Vec<String>,
    prune_layers: Vec<u32>,
    keep_split: bool,
) -> PyResult<SummaryRow> {
    let extra = ExtraOptions {
        pure,
        leave_output_tensor,
        imatrix,
        include_weights,
        exclude_weights,
        prune_layers,
        keep_split,
    };
    let p = py
        .detach(|| {
            parse_params(
                preset,
                rules,
                token_embedding_type,
                output_tensor_type,
                allow_requantize,
                split_max_bytes,
                split_max_tensors,
                extra,
            )
        })
        .map_err(to_py)?;
    let mut callback_error: Option<PyErr> = None;
    let result = py.detach(|| {
        with_threads(threads, || {
            let mut on_progress = |ev: Progress| -> bool {
                let Some(cb) = &progress else { return true };
                Python::attach(|py| {
                    let r = py.check_signals().and_then(|_| match ev {
                        Progress::Start {
                            total_bytes,
                            n_tensors,
                        } => cb.call1(py, ("start", total_bytes, n_tensors)),
                        Progress::Tensor { index, entry } => {
                            cb.call1(py, ("tensor", index, plan_row(entry)))
                        }
                    });
                    match r {
                        Ok(_) => true,
                        Err(e) => {
                            callback_error = Some(e);
                            false
                        }
                    }
                })
            };
            qm::quantize_model(&src, &dst, &p, &mut on_progress)
        })
    })?;
    if let Some(e) = callback_error {
        return Err(e);
    }
    let s = result.map_err(to_py)?;
    Ok((
        s.paths,
        s.n_tensors,
        s.n_elements,
        s.bytes,
        s.tensors_per_type,
    ))
}

/// llama.cpp's quantization presets: (name, file type number, default tensor type, description),
/// and the aliases as (alias, preset name).
#[pyfunction]
fn presets() -> (Vec<PresetRow>, Vec<(&'static str, &'static str)>) {
    (
        pyqmoe_core::presets::PRESETS
            .iter()
            .map(|p| (p.name, p.file_type(), p.default_type.name(), p.description))
            .collect(),
        pyqmoe_core::presets::ALIASES.to_vec(),
    )
}

/// Reads an importance matrix (legacy .dat or GGUF, chosen by content) after normalisation:
/// (format, {tensor name: float32 values}, datasets, chunk count).
#[pyfunction]
fn load_imatrix<'py>(py: Python<'py>, path: PathBuf) -> PyResult<ImatrixRow<'py>> {
    let m = py.detach(|| Imatrix::load(&path)).map_err(to_py)?;
    let format = match m.format {
        ImatrixFormat::Legacy => "legacy",
        ImatrixFormat::Gguf => "gguf",
    };
    let entries = m
        .entries
        .iter()
        .map(|(k, v)| (k.clone(), PyArray1::from_slice(py, v)))
        .collect();
    Ok((format, entries, m.datasets.clone(), m.chunk_count))
}

/// Names of the value types, for writers on the Python side.
#[pyfunction]
fn value_type_names() -> Vec<&'static str> {
    (0..13)
        .filter_map(ValueType::from_id)
        .map(|t| t.name())
        .collect()
}

#[pyfunction]
fn cpu_features() -> String {
    quant::cpu::describe()
}

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add("PyqmoeError", py.get_type::<PyqmoeError>())?;
    m.add("GGUFFormatError", py.get_type::<GGUFFormatError>())?;
    m.add("TensorError", py.get_type::<TensorError>())?;
    m.add("UnknownTypeError", py.get_type::<UnknownTypeError>())?;
    m.add_class::<GGUFModel>()?;
    m.add_function(wrap_pyfunction!(quantize, m)?)?;
    m.add_function(wrap_pyfunction!(dequantize, m)?)?;
    m.add_function(wrap_pyfunction!(types, m)?)?;
    m.add_function(wrap_pyfunction!(requires_imatrix, m)?)?;
    m.add_function(wrap_pyfunction!(rewrite, m)?)?;
    m.add_function(wrap_pyfunction!(quantize_plan, m)?)?;
    m.add_function(wrap_pyfunction!(quantize_model, m)?)?;
    m.add_function(wrap_pyfunction!(presets, m)?)?;
    m.add_function(wrap_pyfunction!(load_imatrix, m)?)?;
    m.add_function(wrap_pyfunction!(value_type_names, m)?)?;
    m.add_function(wrap_pyfunction!(cpu_features, m)?)?;
    model::register(m)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}

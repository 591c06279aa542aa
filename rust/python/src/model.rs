//! The inference engine's PyO3 shell: `Engine` (model + KV cache + thread pool) and `Sampler`.
//! Argument conversion only; numerics are in `pyqmoe_core::model`.

use std::path::PathBuf;

use numpy::{PyArray1, PyArray2, PyArrayMethods};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::PyDict;

use pyqmoe_core::model::{
    ImatrixCollector, KvType, Model, Sampler as CoreSampler, SamplingParams, State,
};

use crate::to_py;

/// Sampling settings plus a seeded random stream.
#[pyclass(module = "pyqmoe._core")]
pub struct Sampler {
    inner: CoreSampler,
}

#[pymethods]
impl Sampler {
    #[new]
    #[pyo3(signature = (temperature=0.0, top_k=40, top_p=0.95, min_p=0.05, repeat_penalty=1.0, repeat_last_n=64, seed=0))]
    fn new(
        temperature: f32,
        top_k: usize,
        top_p: f32,
        min_p: f32,
        repeat_penalty: f32,
        repeat_last_n: usize,
        seed: u64,
    ) -> PyResult<Self> {
        if !(0.0..=1.0).contains(&top_p) || !(0.0..=1.0).contains(&min_p) {
            return Err(PyValueError::new_err("top_p and min_p must be in [0, 1]"));
        }
        if repeat_penalty <= 0.0 {
            return Err(PyValueError::new_err("repeat_penalty must be > 0"));
        }
        let params = SamplingParams {
            temperature,
            top_k,
            top_p,
            min_p,
            repeat_penalty,
            repeat_last_n,
        };
        Ok(Sampler {
            inner: CoreSampler::new(params, seed),
        })
    }

    /// Picks a token from one row of logits; `history` feeds the repeat penalty.
    #[pyo3(signature = (logits, history=vec![]))]
    fn sample(
        &mut self,
        logits: numpy::PyReadonlyArray1<'_, f32>,
        history: Vec<u32>,
    ) -> PyResult<u32> {
        let l = logits
            .as_slice()
            .map_err(|_| PyValueError::new_err("logits must be contiguous"))?;
        if l.is_empty() {
            return Err(PyValueError::new_err("logits are empty"));
        }
        Ok(self.inner.sample(l, &history))
    }
}

/// A loaded model with its KV cache and (optionally) its own thread pool.
#[pyclass(module = "pyqmoe._core")]
pub struct Engine {
    model: Model,
    state: State,
    pool: rayon::ThreadPool,
    /// Logits of the last evaluated token, for `sample_next`.
    last_logits: Vec<f32>,
    /// Importance-matrix statistics gathered by `imatrix_chunk` (None until the first chunk).
    collector: Option<ImatrixCollector>,
}

impl Engine {
    fn run<T: Send>(
        &mut self,
        py: Python<'_>,
        f: impl FnOnce(&Model, &mut State) -> T + Send,
    ) -> T {
        let Engine {
            model, state, pool, ..
        } = self;
        py.detach(|| pool.install(|| f(model, state)))
    }
}

#[pymethods]
impl Engine {
    #[new]
    #[pyo3(signature = (path, threads=None, n_ctx=512, kv_type="f32", kv_type_v=None))]
    fn new(
        py: Python<'_>,
        path: PathBuf,
        threads: Option<usize>,
        n_ctx: usize,
        kv_type: &str,
        kv_type_v: Option<&str>,
    ) -> PyResult<Self> {
        let type_k =
            KvType::parse(kv_type).map_err(|e| PyValueError::new_err(format!("kv_type: {e}")))?;
        let type_v = match kv_type_v {
            Some(v) => {
                KvType::parse(v).map_err(|e| PyValueError::new_err(format!("kv_type_v: {e}")))?
            }
            None => type_k,
        };
        if n_ctx == 0 {
            return Err(PyValueError::new_err("n_ctx must be > 0"));
        }
        // Always an own pool, entered with `install`: rayon's global pool would make every
        // parallel loop a cross-thread hand-off from this (non-pool) calling thread.
        let n_threads = threads
            .filter(|&n| n > 0)
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(n_threads)
            .build()
            .map_err(|e| PyValueError::new_err(format!("cannot start {n_threads} threads: {e}")))?;
        let model = py.detach(|| Model::open(&path)).map_err(to_py)?;
        let state = model.new_state(n_ctx, type_k, type_v).map_err(to_py)?;
        Ok(Engine {
            model,
            state,
            pool,
            last_logits: vec![],
            collector: None,
        })
    }

    /// Hyper-parameters as a dict.
    fn config<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let c = &self.model.config;
        let d = PyDict::new(py);
        d.set_item("arch", c.arch.name())?;
        d.set_item("n_layer", c.n_layer)?;
        d.set_item("n_embd", c.n_embd)?;
        d.set_item("n_head", c.n_head)?;
        d.set_item("n_head_kv", c.n_head_kv)?;
        d.set_item("head_dim_k", c.head_dim_k)?;
        d.set_item("head_dim_v", c.head_dim_v)?;
        d.set_item("rope_theta", c.rope_theta)?;
        d.set_item("rms_eps", c.rms_eps)?;
        d.set_item("n_expert", c.n_expert)?;
        d.set_item("n_expert_used", c.n_expert_used)?;
        d.set_item("n_ff_expert", c.n_ff_expert)?;
        d.set_item("n_ff", c.n_ff)?;
        d.set_item("n_ctx_train", c.n_ctx_train)?;
        d.set_item("n_vocab", c.n_vocab)?;
        Ok(d)
    }

    #[getter]
    fn n_past(&self) -> usize {
        self.state.n_past
    }

    #[getter]
    fn n_ctx(&self) -> usize {
        self.state.kv.n_ctx
    }

    #[getter]
    fn n_threads(&self) -> usize {
        self.pool.current_num_threads()
    }

    /// Runs `tokens` after the cached ones; returns float32 logits [n_tokens, vocab] (all_logits)
    /// or [1, vocab] (last token only).
    #[pyo3(signature = (tokens, all_logits=true))]
    fn eval<'py>(
        &mut self,
        py: Python<'py>,
        tokens: Vec<u32>,
        all_logits: bool,
    ) -> PyResult<Bound<'py, PyArray2<f32>>> {
        let logits = self
            .run(py, |m, s| m.eval(s, &tokens, all_logits))
            .map_err(to_py)?;
        let vocab = self.model.config.n_vocab;
        self.last_logits = logits[logits.len() - vocab..].to_vec();
        let rows = logits.len() / vocab;
        PyArray1::from_vec(py, logits).reshape([rows, vocab])
    }

    /// Evaluates `tokens` (after the cached ones) and returns the negative log-likelihood of each
    /// of `tokens[first + 1..]` given what precedes it (logits stay in Rust).
    #[pyo3(signature = (tokens, first=0))]
    fn score<'py>(
        &mut self,
        py: Python<'py>,
        tokens: Vec<u32>,
        first: usize,
    ) -> PyResult<Bound<'py, PyArray1<f64>>> {
        if first + 1 >= tokens.len() {
            return Err(PyValueError::new_err(format!(
                "score needs first + 1 < len(tokens), got first={first} with {} tokens",
                tokens.len()
            )));
        }
        let logits = self
            .run(py, |m, s| m.eval(s, &tokens, true))
            .map_err(to_py)?;
        let vocab = self.model.config.n_vocab;
        let rows = &logits[first * vocab..(tokens.len() - 1) * vocab];
        let nll =
            py.detach(|| pyqmoe_core::model::sampling::nll(rows, vocab, &tokens[first + 1..]));
        Ok(PyArray1::from_vec(py, nll))
    }

    /// Evaluates `tokens` (after the cached ones) and compares the logits of positions first..n-1
    /// with `base` ([n - first][vocab], another model's on the same tokens): per position the KL
    /// divergence KL(base ‖ this) in nats and whether the arg-max tokens agree; plus the negative
    /// log-likelihoods of tokens[first + 1..] under this model and under `base`.
    #[pyo3(signature = (tokens, first, base))]
    #[allow(clippy::type_complexity)]
    fn kl_divergence<'py>(
        &mut self,
        py: Python<'py>,
        tokens: Vec<u32>,
        first: usize,
        base: numpy::PyReadonlyArray2<'py, f32>,
    ) -> PyResult<(
        Bound<'py, PyArray1<f64>>,
        Bound<'py, PyArray1<bool>>,
        Bound<'py, PyArray1<f64>>,
        Bound<'py, PyArray1<f64>>,
    )> {
        let vocab = self.model.config.n_vocab;
        let n = tokens.len();
        if first + 1 >= n {
            return Err(PyValueError::new_err(format!(
                "kl_divergence needs first + 1 < len(tokens), got first={first} with {n} tokens"
            )));
        }
        let shape = numpy::PyUntypedArrayMethods::shape(base.as_untyped());
        if shape != [n - first, vocab] {
            return Err(PyValueError::new_err(format!(
                "base logits have shape {shape:?}; expected [{}, {vocab}]",
                n - first
            )));
        }
        let base = base.as_slice()?.to_vec();
        let logits = self
            .run(py, |m, s| m.eval(s, &tokens, true))
            .map_err(to_py)?;
        let mine = &logits[first * vocab..];
        let (stats, nll, nll_base) = py.detach(|| {
            use pyqmoe_core::model::sampling::{kl_divergence, nll};
            let targets = &tokens[first + 1..];
            let rows = (n - 1 - first) * vocab;
            (
                kl_divergence(&base, mine, vocab),
                nll(&mine[..rows], vocab, targets),
                nll(&base[..rows], vocab, targets),
            )
        });
        let kl: Vec<f64> = stats.iter().map(|s| s.0).collect();
        let same: Vec<bool> = stats.iter().map(|s| s.1).collect();
        Ok((
            PyArray1::from_vec(py, kl),
            PyArray1::from_vec(py, same),
            PyArray1::from_vec(py, nll),
            PyArray1::from_vec(py, nll_base),
        ))
    }

    /// Evaluates `tokens` and samples the next token from the last one's logits (no array copy).
    #[pyo3(signature = (tokens, sampler, history=vec![]))]
    fn eval_and_sample(
        &mut self,
        py: Python<'_>,
        tokens: Vec<u32>,
        sampler: &mut Sampler,
        history: Vec<u32>,
    ) -> PyResult<u32> {
        let logits = self
            .run(py, |m, s| m.eval(s, &tokens, false))
            .map_err(to_py)?;
        let tok = py.detach(|| sampler.inner.sample(&logits, &history));
        self.last_logits = logits;
        Ok(tok)
    }

    /// Forget everything cached.
    fn reset(&mut self) {
        self.state.reset();
        self.last_logits.clear();
    }

    /// llama-imatrix's pass over one chunk: empties the KV cache, then evaluates `tokens` while
    /// accumulating every weight multiply's input statistics.
    fn imatrix_chunk(&mut self, py: Python<'_>, tokens: Vec<u32>) -> PyResult<()> {
        let mut col = self.collector.take().unwrap_or_default();
        self.state.reset();
        self.last_logits.clear();
        let r = self.run(py, |m, s| m.eval_collect(s, &tokens, false, &mut col));
        self.collector = Some(col);
        self.state.reset();
        r.map(|_| ()).map_err(to_py)
    }

    /// Writes what `imatrix_chunk` gathered: llama.cpp's legacy `.dat` format when `legacy`, else
    /// its GGUF imatrix format. `chunk_size` is the tokens per chunk; `dataset` the text file.
    fn imatrix_save(
        &self,
        py: Python<'_>,
        path: PathBuf,
        chunk_size: usize,
        dataset: String,
        legacy: bool,
    ) -> PyResult<()> {
        let Some(col) = &self.collector else {
            return Err(PyValueError::new_err("no imatrix data collected yet"));
        };
        py.detach(|| {
            if legacy {
                col.save_legacy(&path, chunk_size, &dataset)
            } else {
                col.save_gguf(&path, chunk_size, &[dataset])
            }
        })
        .map_err(to_py)
    }

    /// Keep only the first `n` cached positions.
    fn truncate(&mut self, n: usize) {
        self.state.truncate(n);
    }
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Engine>()?;
    m.add_class::<Sampler>()?;
    Ok(())
}

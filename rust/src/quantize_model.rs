//! Whole-model quantization: pick each tensor's target type, then stream tensors from the
//! memory map through the row-parallel quantizers into the (atomic, optionally split) writer.
//!
//! Which tensors are quantized follows llama.cpp's `llama_model_quantize_impl`: 2-D+ tensors whose
//! name ends in "weight", except norms and the MoE router (`ffn_gate_inp`), which are copied.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use regex::Regex;

use crate::error::{Error, Result};
use crate::gguf::{GgufModel, SplitLimits, SplitWriter, TensorSpec, Value};
use crate::quant;
use crate::types::GgmlType;

/// One user rule: tensors whose name matches `pattern` (regex search, like llama.cpp's
/// `--tensor-type` and ik_llama.cpp's `--custom-q`) become `ty`. The first matching rule wins.
#[derive(Clone, Debug)]
pub struct TensorRule {
    pub pattern: Regex,
    pub ty: GgmlType,
}

impl TensorRule {
    /// Parses `REGEX=TYPE`, naming the option in errors.
    pub fn parse(spec: &str, option: &str) -> Result<TensorRule> {
        let (pat, ty) = spec
            .rsplit_once('=')
            .ok_or_else(|| Error::Invalid(format!("{option} '{spec}': expected REGEX=TYPE")))?;
        let pattern = Regex::new(pat).map_err(|e| {
            Error::Invalid(format!(
                "{option} '{spec}': bad regex: {}",
                e.to_string().replace('\n', " ")
            ))
        })?;
        let ty = GgmlType::from_name(ty)
            .map_err(|e| Error::UnknownType(format!("{option} '{spec}': {e}")))?;
        Ok(TensorRule { pattern, ty })
    }
}

#[derive(Clone, Debug)]
pub struct QuantizeParams {
    /// Type of every quantizable tensor no rule names.
    pub default_type: GgmlType,
    pub rules: Vec<TensorRule>,
    pub token_embedding_type: Option<GgmlType>,
    pub output_tensor_type: Option<GgmlType>,
    /// Accept already-quantized inputs (dequantized to f32, then quantized again).
    pub allow_requantize: bool,
    pub split: SplitLimits,
}

impl QuantizeParams {
    pub fn new(default_type: GgmlType) -> Self {
        QuantizeParams {
            default_type,
            rules: vec![],
            token_embedding_type: None,
            output_tensor_type: None,
            allow_requantize: false,
            split: SplitLimits::default(),
        }
    }
}

/// What happens to one tensor.
#[derive(Clone, Debug, PartialEq)]
pub struct PlanEntry {
    pub name: String,
    pub dims: Vec<u64>,
    pub from: GgmlType,
    pub to: GgmlType,
    /// False: copied byte for byte.
    pub convert: bool,
    pub in_bytes: u64,
    pub out_bytes: u64,
    /// Why the type differs from the one asked for (a row-size fall-back), if it does.
    pub note: Option<String>,
}

/// The model-card summary of an output.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Summary {
    pub n_tensors: usize,
    pub n_elements: u64,
    pub bytes: u64,
    pub tensors_per_type: BTreeMap<String, usize>,
    pub paths: Vec<PathBuf>,
}

impl Summary {
    pub fn bits_per_weight(&self) -> f64 {
        if self.n_elements == 0 {
            0.0
        } else {
            self.bytes as f64 * 8.0 / self.n_elements as f64
        }
    }
}

/// Would llama.cpp quantize this tensor at all?
pub fn is_quantizable(name: &str, n_dims: usize) -> bool {
    name.ends_with("weight")
        && n_dims >= 2
        && !name.contains("_norm.weight")
        && !name.contains("ffn_gate_inp.weight")
        && !name.contains("ffn_gate_inp_shexp.weight")
        && !name.contains("pos_embd")
        && !name.contains("token_types")
}

/// llama.cpp's fall-back when a row is not a whole number of the target's blocks.
fn fallback_type(ty: GgmlType) -> GgmlType {
    use GgmlType::*;
    match ty {
        Q2_K | Q3_K | IQ1_S | IQ1_M | IQ2_XXS | IQ2_XS | IQ2_S | IQ3_XXS | IQ3_S | IQ4_XS
        | TQ1_0 | TQ2_0 => IQ4_NL,
        Q4_K => Q5_0,
        Q5_K => Q5_1,
        Q6_K => Q8_0,
        _ => F16,
    }
}

fn target_type(name: &str, p: &QuantizeParams) -> GgmlType {
    if let Some(r) = p.rules.iter().find(|r| r.pattern.is_match(name)) {
        return r.ty;
    }
    if name == "token_embd.weight" {
        if let Some(t) = p.token_embedding_type {
            return t;
        }
    }
    if name == "output.weight" {
        if let Some(t) = p.output_tensor_type {
            return t;
        }
    }
    p.default_type
}

/// The per-tensor plan, the same for a dry run and a real run.
pub fn plan(model: &GgufModel, p: &QuantizeParams) -> Result<Vec<PlanEntry>> {
    let mut out = Vec::with_capacity(model.tensors.len());
    for (_, t) in &model.tensors {
        let convert = is_quantizable(&t.name, t.dims.len());
        let (mut to, mut note) = (t.ty, None);
        if convert {
            let want = target_type(&t.name, p);
            to = want;
            if t.n_per_row() % want.block_size() as u64 != 0 {
                to = fallback_type(want);
                if t.n_per_row() % to.block_size() as u64 != 0 {
                    to = GgmlType::F16;
                }
                note = Some(format!(
                    "row of {} is not a multiple of {}'s block {}: using {}",
                    t.n_per_row(),
                    want,
                    want.block_size(),
                    to
                ));
            }
            if quant::kernels(to).is_none() {
                return Err(Error::UnknownType(format!(
                    "tensor '{}': pyqmoe cannot quantize to {} yet",
                    t.name, to
                )));
            }
            if !t.ty.is_float() && !p.allow_requantize && t.ty != to {
                return Err(Error::tensor(
                    &t.name,
                    format!("is already quantized ({}); pass --allow-requantize to convert it to {} anyway", t.ty, to),
                ));
            }
            if quant::kernels(t.ty).is_none() {
                return Err(Error::tensor(
                    &t.name,
                    format!("pyqmoe cannot decode its type {} yet", t.ty),
                ));
            }
        }
        let convert = convert && to != t.ty;
        let out_bytes = to
            .nbytes(&t.dims)
            .ok_or_else(|| Error::tensor(&t.name, "size overflows"))?;
        out.push(PlanEntry {
            name: t.name.clone(),
            dims: t.dims.clone(),
            from: t.ty,
            to,
            convert,
            in_bytes: t.nbytes,
            out_bytes,
            note,
        });
    }
    Ok(out)
}

/// llama.cpp's `general.file_type` (LlamaFileType) for a uniform type.
pub fn file_type_of(ty: GgmlType) -> Option<u32> {
    use GgmlType::*;
    Some(match ty {
        F32 => 0,
        F16 => 1,
        Q4_0 => 2,
        Q4_1 => 3,
        Q8_0 => 7,
        Q5_0 => 8,
        Q5_1 => 9,
        Q2_K => 10,
        Q3_K => 12,
        Q4_K => 15,
        Q5_K => 17,
        Q6_K => 18,
        IQ2_XXS => 19,
        IQ2_XS => 20,
        IQ3_XXS => 23,
        IQ1_S => 24,
        IQ4_NL => 25,
        IQ3_S => 26,
        IQ2_S => 28,
        IQ4_XS => 30,
        IQ1_M => 31,
        BF16 => 32,
        TQ1_0 => 36,
        TQ2_0 => 37,
        _ => return None,
    })
}

/// Output metadata: the input's, with the file type and quantization version updated.
fn output_metadata(model: &GgufModel, p: &QuantizeParams) -> Vec<(String, Value)> {
    let mut meta: Vec<(String, Value)> = model.metadata().to_vec();
    let mut set = |key: &str, v: Value| match meta.iter_mut().find(|(k, _)| k == key) {
        Some(slot) => slot.1 = v,
        None => meta.push((key.to_string(), v)),
    };
    set("general.quantization_version", Value::U32(2));
    if let Some(ft) = file_type_of(p.default_type) {
        set("general.file_type", Value::U32(ft));
    }
    meta
}

/// Progress events; the callback returns false to cancel (e.g. on Ctrl-C).
pub enum Progress<'a> {
    Start { total_bytes: u64, n_tensors: usize },
    Tensor { index: usize, entry: &'a PlanEntry },
}

/// Quantizes `src` into `dst` following `p`. Nothing appears under `dst` unless every tensor
/// was written and synced.
pub fn quantize_model(
    src: &Path,
    dst: &Path,
    p: &QuantizeParams,
    progress: &mut dyn FnMut(Progress) -> bool,
) -> Result<Summary> {
    let model = GgufModel::open(src)?;
    let entries = plan(&model, p)?;
    let specs: Vec<TensorSpec> = entries
        .iter()
        .map(|e| TensorSpec {
            name: e.name.clone(),
            dims: e.dims.clone(),
            ty: e.to,
        })
        .collect();
    let meta = output_metadata(&model, p);
    let mut writer = SplitWriter::create(dst, &meta, specs, p.split)?;
    let cancelled = || Error::Invalid("interrupted".into());
    if !progress(Progress::Start {
        total_bytes: entries.iter().map(|e| e.in_bytes).sum(),
        n_tensors: entries.len(),
    }) {
        return Err(cancelled());
    }
    let mut summary = Summary::default();
    let mut f32_buf: Vec<f32> = vec![];
    let mut out_buf: Vec<u8> = vec![];
    for (i, e) in entries.iter().enumerate() {
        if !progress(Progress::Tensor { index: i, entry: e }) {
            return Err(cancelled());
        }
        let data = model.tensor_data(&e.name).expect("planned tensor exists");
        if e.convert {
            let n_per_row = e.dims[0] as usize;
            let n = e.dims.iter().product::<u64>() as usize;
            f32_buf.resize(n, 0.0);
            quant::dequantize_into(&e.name, data, n_per_row, e.from, &mut f32_buf)?;
            out_buf.resize(e.out_bytes as usize, 0);
            quant::quantize_into(&e.name, &f32_buf, n_per_row, e.to, None, &mut out_buf)?;
            writer.write_tensor(&out_buf)?;
        } else {
            writer.write_tensor(data)?;
        }
        summary.n_tensors += 1;
        summary.n_elements += e.dims.iter().product::<u64>();
        summary.bytes += e.out_bytes;
        *summary
            .tensors_per_type
            .entry(e.to.name().to_lowercase())
            .or_default() += 1;
    }
    summary.paths = writer.finish()?;
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_parse_and_report_bad_input() {
        let r = TensorRule::parse(r"\.([0-9]|1[01257]|31)\.attn_k=q4_k", "--tensor-type").unwrap();
        assert!(
            r.pattern.is_match("blk.11.attn_k.weight")
                && !r.pattern.is_match("blk.13.attn_k.weight")
        );
        assert_eq!(r.ty, GgmlType::Q4_K);
        let e = TensorRule::parse("attn(=q4_k", "--tensor-type")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("--tensor-type 'attn(=q4_k'") && e.contains("bad regex"),
            "{e}"
        );
        let e = TensorRule::parse("attn=q9_z", "--tensor-type")
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown tensor type 'q9_z'"), "{e}");
        assert!(TensorRule::parse("attn", "--tensor-type").is_err());
    }

    #[test]
    fn quantizable_tensors_follow_llama_cpp() {
        assert!(is_quantizable("blk.0.ffn_gate_exps.weight", 3));
        assert!(is_quantizable("output.weight", 2));
        assert!(!is_quantizable("blk.0.attn_norm.weight", 1));
        assert!(!is_quantizable("blk.0.attn_q_norm.weight", 1));
        assert!(!is_quantizable("blk.0.ffn_gate_inp.weight", 2));
    }
}

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
use crate::imatrix::Imatrix;
use crate::presets::{self, Category, Mixture, ModelInfo, Preset};
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
    /// The preset (llama.cpp file type): default type, mixture rules and `general.file_type`.
    pub preset: Preset,
    pub rules: Vec<TensorRule>,
    pub token_embedding_type: Option<GgmlType>,
    pub output_tensor_type: Option<GgmlType>,
    /// Accept already-quantized inputs (dequantized to f32, then quantized again).
    pub allow_requantize: bool,
    /// llama-quantize's --pure: every quantized tensor gets the preset's default type.
    pub pure: bool,
    /// False: llama-quantize's --leave-output-tensor (output.weight is copied).
    pub quantize_output_tensor: bool,
    /// Importance data (already filtered by --include/--exclude-weights).
    pub imatrix: Option<Imatrix>,
    /// Blocks to drop; the rest are renumbered without gaps.
    pub prune_layers: Vec<u32>,
    /// Write one output part per input part, like the input.
    pub keep_split: bool,
    pub split: SplitLimits,
}

impl QuantizeParams {
    pub fn new(preset: Preset) -> Self {
        QuantizeParams {
            preset,
            rules: vec![],
            token_embedding_type: None,
            output_tensor_type: None,
            allow_requantize: false,
            pure: false,
            quantize_output_tensor: true,
            imatrix: None,
            prune_layers: vec![],
            keep_split: false,
            split: SplitLimits::default(),
        }
    }

    /// llama.cpp only counts an imatrix that has entries left after filtering.
    fn has_imatrix(&self) -> bool {
        self.imatrix.as_ref().is_some_and(|m| !m.entries.is_empty())
    }
}

/// What happens to one tensor.
#[derive(Clone, Debug, PartialEq)]
pub struct PlanEntry {
    /// Name in the output (after --prune-layers renumbering).
    pub name: String,
    /// Name in the input.
    pub src_name: String,
    pub dims: Vec<u64>,
    pub from: GgmlType,
    pub to: GgmlType,
    /// False: copied byte for byte.
    pub convert: bool,
    pub in_bytes: u64,
    pub out_bytes: u64,
    /// Why the type differs from the one the rules chose (a row-size fall-back), if it does.
    pub note: Option<String>,
    /// The target type needs importance data (llama.cpp refuses to make it without).
    pub requires_imatrix: bool,
    /// Importance data is used for this tensor (found under `src_name`).
    pub imatrix: bool,
}

/// The whole plan: tensors in output order, output metadata, split layout.
#[derive(Clone, Debug)]
pub struct Plan {
    pub entries: Vec<PlanEntry>,
    pub metadata: Vec<(String, Value)>,
    /// Tensors per output file with --keep-split.
    pub groups: Option<Vec<usize>>,
}

impl Plan {
    /// Tensors whose type needs importance data that the run does not have.
    pub fn missing_imatrix(&self) -> Vec<&PlanEntry> {
        self.entries
            .iter()
            .filter(|e| e.convert && e.requires_imatrix && !e.imatrix)
            .collect()
    }

    /// The error a real run gives when `missing_imatrix` is not empty, naming every tensor.
    pub fn check_imatrix(&self, have_file: bool) -> Result<()> {
        let missing = self.missing_imatrix();
        if missing.is_empty() {
            return Ok(());
        }
        let list: Vec<String> = missing
            .iter()
            .map(|e| format!("{} ({})", e.src_name, e.to))
            .collect();
        let hint = if have_file {
            "the importance matrix has no entry for them"
        } else {
            "pass --imatrix FILE (make one with llama-imatrix)"
        };
        Err(Error::Invalid(format!(
            "{} tensor(s) need importance data for their type and have none ({hint}): {}",
            missing.len(),
            list.join(", ")
        )))
    }
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
    presets::allows_quantization(name, n_dims, true)
}

/// Old layer number -> new one (None: pruned), as llama.cpp's `remap_layer`: layers below the
/// first pruned one keep their number, later kept layers are numbered on without gaps.
pub fn prune_map(model_layers: &[u32], prune: &[u32]) -> (BTreeMap<u32, Option<u32>>, u32) {
    let mut prune = prune.to_vec();
    prune.sort_unstable();
    prune.dedup();
    let mut map = BTreeMap::new();
    let mut next = 0u32;
    let mut layers = model_layers.to_vec();
    layers.sort_unstable();
    layers.dedup();
    for l in layers {
        if prune.binary_search(&l).is_ok() {
            map.insert(l, None);
        } else if prune.first().is_none_or(|&f| l < f) {
            map.insert(l, Some(l));
            next = l + 1;
        } else {
            map.insert(l, Some(next));
            next += 1;
        }
    }
    (map, next)
}

fn rename_layer(name: &str, map: &BTreeMap<u32, Option<u32>>) -> Option<String> {
    match presets::layer_of(name) {
        None => Some(name.to_string()),
        Some(l) => {
            let new = map.get(&l).copied().flatten()?;
            let rest = &name["blk.".len() + l.to_string().len()..];
            Some(format!("blk.{new}{rest}"))
        }
    }
}

/// The per-tensor plan, the same for a dry run and a real run.
pub fn plan(model: &GgufModel, p: &QuantizeParams) -> Result<Plan> {
    let info = ModelInfo::from_model(model);
    let preset = p.preset;
    let has_imatrix = p.has_imatrix();

    // Pruning: new names (None = dropped).
    let mut layers: Vec<u32> = model
        .tensors
        .iter()
        .filter_map(|(_, t)| presets::layer_of(&t.name))
        .collect();
    layers.sort_unstable();
    layers.dedup();
    let (layer_map, new_block_count) = prune_map(&layers, &p.prune_layers);
    if !p.prune_layers.is_empty() && p.prune_layers.iter().all(|l| !layer_map.contains_key(l)) {
        return Err(Error::Invalid(format!(
            "--prune-layers {:?}: the model has no such layers (it has {} blocks)",
            p.prune_layers,
            layers.len()
        )));
    }
    let new_names: Vec<Option<String>> = model
        .tensors
        .iter()
        .map(|(_, t)| {
            if p.prune_layers.is_empty() {
                Some(t.name.clone())
            } else {
                rename_layer(&t.name, &layer_map)
            }
        })
        .collect();
    let kept: Vec<usize> = (0..model.tensors.len())
        .filter(|&i| new_names[i].is_some())
        .collect();

    // llama.cpp visits tensors by layer then name (by file position with --keep-split); the
    // attn_v / ffn_down counters depend on that order.
    let visit: Vec<usize> = if p.keep_split {
        let mut v = kept.clone();
        v.sort_by_key(|&i| (model.tensors[i].0, model.tensors[i].1.offset));
        v
    } else {
        presets::llama_order(kept.iter().map(|&i| model.tensors[i].1.name.as_str()))
            .into_iter()
            .map(|k| kept[k])
            .collect()
    };
    let mut mixture = Mixture::new(
        &info,
        preset.ftype,
        has_imatrix,
        kept.iter().map(|&i| new_names[i].as_deref().unwrap()),
    );
    mixture.output_tensor_type = p.output_tensor_type;
    mixture.token_embedding_type = p.token_embedding_type;

    let mut chosen: BTreeMap<usize, (GgmlType, Option<String>)> = BTreeMap::new();
    for &i in &visit {
        let t = &model.tensors[i].1;
        let name = new_names[i].as_deref().unwrap();
        let cat = presets::category(name);
        let (mut to, mut note) = (t.ty, None);
        if presets::allows_quantization(name, t.dims.len(), p.quantize_output_tensor) {
            if let (Category::TokenEmbd, Some(ty)) = (cat, p.token_embedding_type) {
                to = ty;
            } else if let (Category::Output, Some(ty)) = (cat, p.output_tensor_type) {
                to = ty;
            } else {
                to = preset.default_type;
                if presets::is_quantized(to) {
                    let manual = p.rules.iter().find(|r| r.pattern.is_match(name));
                    if let Some(r) = manual {
                        to = r.ty;
                    } else if !p.pure {
                        to = mixture.tensor_type(name, t.dims[0], to)?;
                    }
                    if let Some(fb) = presets::fallback(name, t.dims[0], to)? {
                        note = Some(format!(
                            "row of {} is not a multiple of {}'s block {}: using {}",
                            t.dims[0],
                            to,
                            to.block_size(),
                            fb
                        ));
                        to = fb;
                    }
                }
            }
        }
        chosen.insert(i, (to, note));
    }

    let mut entries = Vec::with_capacity(kept.len());
    for &i in &kept {
        let t = &model.tensors[i].1;
        let name = new_names[i].clone().unwrap();
        let (to, note) = chosen.remove(&i).unwrap();
        let convert = to != t.ty;
        let mut requires_imatrix = false;
        let mut use_imatrix = false;
        if convert {
            if quant::kernels(to).is_none() {
                return Err(Error::UnknownType(format!(
                    "tensor '{name}': pyqmoe cannot quantize to {to} yet"
                )));
            }
            if presets::is_quantized(t.ty) && !p.allow_requantize {
                return Err(Error::tensor(
                    &t.name,
                    format!("is already quantized ({}); pass --allow-requantize to convert it to {to} anyway", t.ty),
                ));
            }
            if quant::kernels(t.ty).is_none() {
                return Err(Error::tensor(
                    &t.name,
                    format!("pyqmoe cannot decode its type {} yet", t.ty),
                ));
            }
            requires_imatrix = presets::requires_imatrix(&name, to, preset.ftype)
                || quant::kernels(to).is_some_and(|k| k.requires_imatrix);
            if let Some(w) = p.imatrix.as_ref().and_then(|m| m.get(&t.name)) {
                let want = t.dims[0] * t.dims.get(2).copied().unwrap_or(1);
                if w.len() as u64 == want {
                    use_imatrix = true;
                } else if presets::category(&name) != Category::TokenEmbd {
                    return Err(Error::tensor(
                        &t.name,
                        format!(
                            "the importance matrix has {} values for it, expected {want} (row length {} × {} matrices); \
                             was it made for another model?",
                            w.len(),
                            t.dims[0],
                            t.dims.get(2).copied().unwrap_or(1)
                        ),
                    ));
                }
            }
        }
        let out_bytes = to
            .nbytes(&t.dims)
            .ok_or_else(|| Error::tensor(&t.name, "size overflows"))?;
        entries.push(PlanEntry {
            name,
            src_name: t.name.clone(),
            dims: t.dims.clone(),
            from: t.ty,
            to,
            convert,
            in_bytes: t.nbytes,
            out_bytes,
            note,
            requires_imatrix,
            imatrix: use_imatrix,
        });
    }

    let groups = if p.keep_split && model.is_split() {
        let mut g = vec![0usize; model.files.len()];
        for &i in &kept {
            g[model.tensors[i].0] += 1;
        }
        Some(g)
    } else {
        None
    };
    let pruned = if p.prune_layers.is_empty() {
        vec![]
    } else {
        layer_map
            .iter()
            .filter(|(_, v)| v.is_none())
            .map(|(k, _)| *k)
            .collect()
    };
    let metadata = output_metadata(model, p, &info, &pruned, new_block_count);
    Ok(Plan {
        entries,
        metadata,
        groups,
    })
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

/// Output metadata: the input's, with the file type, quantization version, imatrix provenance
/// and (after pruning) the block count and per-layer arrays updated.
fn output_metadata(
    model: &GgufModel,
    p: &QuantizeParams,
    info: &ModelInfo,
    pruned: &[u32],
    new_block_count: u32,
) -> Vec<(String, Value)> {
    let mut meta: Vec<(String, Value)> = model.metadata().to_vec();
    let mut set = |key: &str, v: Value| match meta.iter_mut().find(|(k, _)| k == key) {
        Some(slot) => slot.1 = v,
        None => meta.push((key.to_string(), v)),
    };
    set("general.quantization_version", Value::U32(2));
    set("general.file_type", Value::U32(p.preset.file_type()));
    if let Some(m) = p.imatrix.as_ref().filter(|m| !m.entries.is_empty()) {
        set(
            "quantize.imatrix.file",
            Value::string(&m.path.to_string_lossy()),
        );
        if let Some(ds) = m.datasets.first() {
            set("quantize.imatrix.dataset", Value::string(ds));
        }
        set(
            "quantize.imatrix.entries_count",
            Value::U32(m.entries.len() as u32),
        );
        if m.chunk_count > 0 {
            set("quantize.imatrix.chunks_count", Value::U32(m.chunk_count));
        }
    }
    if !pruned.is_empty() {
        let n_layer = info.n_layer as usize;
        let prefix = format!("{}.", info.arch);
        for (k, v) in meta.iter_mut() {
            if !k.starts_with(&prefix) {
                continue;
            }
            if let Value::Array(_, items) = v {
                // Per-layer arrays (one value per block) lose the pruned blocks' values.
                if n_layer > 0 && items.len() == n_layer {
                    let mut l = 0u32;
                    items.retain(|_| {
                        let keep = !pruned.contains(&l);
                        l += 1;
                        keep
                    });
                }
            }
        }
        let key = format!("{}.block_count", info.arch);
        match meta.iter_mut().find(|(k, _)| *k == key) {
            Some(slot) => slot.1 = Value::U32(new_block_count),
            None => meta.push((key, Value::U32(new_block_count))),
        }
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
    let plan = plan(&model, p)?;
    plan.check_imatrix(p.imatrix.is_some())?;
    let entries = &plan.entries;
    let specs: Vec<TensorSpec> = entries
        .iter()
        .map(|e| TensorSpec {
            name: e.name.clone(),
            dims: e.dims.clone(),
            ty: e.to,
        })
        .collect();
    let mut writer = match &plan.groups {
        Some(groups) => SplitWriter::create_groups(dst, &plan.metadata, specs, groups.clone())?,
        None => SplitWriter::create(dst, &plan.metadata, specs, p.split)?,
    };
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
        let data = model
            .tensor_data(&e.src_name)
            .expect("planned tensor exists");
        if e.convert {
            let n_per_row = e.dims[0] as usize;
            let n = e.dims.iter().product::<u64>() as usize;
            f32_buf.resize(n, 0.0);
            quant::dequantize_into(&e.name, data, n_per_row, e.from, &mut f32_buf)?;
            out_buf.resize(e.out_bytes as usize, 0);
            let imatrix = if e.imatrix {
                p.imatrix.as_ref().and_then(|m| m.get(&e.src_name))
            } else {
                None
            };
            quant::quantize_into(&e.name, &f32_buf, n_per_row, e.to, imatrix, &mut out_buf)?;
            writer.write_tensor(&out_buf)?;
        } else {
            writer.write_tensor(data)?;
        }
        model.release_tensor(&e.src_name);
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

#[cfg(test)]
mod prune_tests {
    use super::*;

    #[test]
    fn pruned_layers_disappear_and_the_rest_close_up() {
        let (map, n) = prune_map(&(0..12).collect::<Vec<_>>(), &[7, 3, 11, 3]);
        assert_eq!(n, 9);
        assert_eq!(map[&2], Some(2));
        assert_eq!(map[&3], None);
        assert_eq!(map[&4], Some(3));
        assert_eq!(map[&8], Some(6));
        assert_eq!(map[&11], None);
        assert_eq!(
            rename_layer("blk.10.ffn_down_exps.weight", &map).as_deref(),
            Some("blk.8.ffn_down_exps.weight")
        );
        assert_eq!(rename_layer("blk.7.attn_q.weight", &map), None);
        assert_eq!(
            rename_layer("output.weight", &map).as_deref(),
            Some("output.weight")
        );
    }
}

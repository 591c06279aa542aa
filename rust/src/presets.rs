//! llama.cpp's quantization presets ("file types" such as Q4_K_M) and the per-tensor mixture rules
//! that pick each tensor's type for a preset (`llama_tensor_get_type_impl` in llama.cpp's
//! `src/llama-quant.cpp`), including the MoE / GQA special cases, the attn_v and ffn_down layer
//! schedules, the token_embd/output rules and the row-size fall-backs.
//!
//! The rules depend on the order tensors are visited (the attn_v and ffn_down counters), which in
//! llama.cpp is its loader's order: by layer number (tensors outside `blk.N.` first), then by name.

use crate::error::{Error, Result};
use crate::gguf::{GgufModel, Value};
use crate::types::GgmlType;

/// llama.cpp's `llama_ftype`, as stored in `general.file_type`.
#[allow(non_camel_case_types)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum Ftype {
    ALL_F32 = 0,
    F16 = 1,
    Q4_0 = 2,
    Q4_1 = 3,
    Q8_0 = 7,
    Q5_0 = 8,
    Q5_1 = 9,
    Q2_K = 10,
    Q3_K_S = 11,
    Q3_K_M = 12,
    Q3_K_L = 13,
    Q4_K_S = 14,
    Q4_K_M = 15,
    Q5_K_S = 16,
    Q5_K_M = 17,
    Q6_K = 18,
    IQ2_XXS = 19,
    IQ2_XS = 20,
    Q2_K_S = 21,
    IQ3_XS = 22,
    IQ3_XXS = 23,
    IQ1_S = 24,
    IQ4_NL = 25,
    IQ3_S = 26,
    IQ3_M = 27,
    IQ2_S = 28,
    IQ2_M = 29,
    IQ4_XS = 30,
    IQ1_M = 31,
    BF16 = 32,
}

/// A named preset: its file type and the type of tensors no rule changes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Preset {
    pub name: &'static str,
    pub ftype: Ftype,
    pub default_type: GgmlType,
    pub description: &'static str,
}

macro_rules! preset {
    ($name:literal, $ft:ident, $ty:ident, $desc:literal) => {
        Preset {
            name: $name,
            ftype: Ftype::$ft,
            default_type: GgmlType::$ty,
            description: $desc,
        }
    };
}

/// Every preset pyqmoe can make, in llama-quantize's order (names as llama-quantize spells them).
pub const PRESETS: &[Preset] = &[
    preset!("Q4_0", Q4_0, Q4_0, "4.34G, +0.4685 ppl @ Llama-3-8B"),
    preset!("Q4_1", Q4_1, Q4_1, "4.78G, +0.4511 ppl @ Llama-3-8B"),
    preset!("Q5_0", Q5_0, Q5_0, "5.21G, +0.1316 ppl @ Llama-3-8B"),
    preset!("Q5_1", Q5_1, Q5_1, "5.65G, +0.1062 ppl @ Llama-3-8B"),
    preset!("IQ2_XXS", IQ2_XXS, IQ2_XXS, "2.06 bpw quantization"),
    preset!("IQ2_XS", IQ2_XS, IQ2_XS, "2.31 bpw quantization"),
    preset!("IQ2_S", IQ2_S, IQ2_XS, "2.5  bpw quantization"),
    preset!("IQ2_M", IQ2_M, IQ2_S, "2.7  bpw quantization"),
    preset!("IQ1_S", IQ1_S, IQ1_S, "1.56 bpw quantization"),
    preset!("IQ1_M", IQ1_M, IQ1_M, "1.75 bpw quantization"),
    preset!("Q2_K", Q2_K, Q2_K, "2.96G, +3.5199 ppl @ Llama-3-8B"),
    preset!("Q2_K_S", Q2_K_S, Q2_K, "2.96G, +3.1836 ppl @ Llama-3-8B"),
    preset!("IQ3_XXS", IQ3_XXS, IQ3_XXS, "3.06 bpw quantization"),
    preset!("IQ3_S", IQ3_S, IQ3_S, "3.44 bpw quantization"),
    preset!("IQ3_M", IQ3_M, IQ3_S, "3.66 bpw quantization mix"),
    preset!("IQ3_XS", IQ3_XS, IQ3_S, "3.3 bpw quantization"),
    preset!("Q3_K_S", Q3_K_S, Q3_K, "3.41G, +1.6321 ppl @ Llama-3-8B"),
    preset!("Q3_K_M", Q3_K_M, Q3_K, "3.74G, +0.6569 ppl @ Llama-3-8B"),
    preset!("Q3_K_L", Q3_K_L, Q3_K, "4.03G, +0.5562 ppl @ Llama-3-8B"),
    preset!("IQ4_NL", IQ4_NL, IQ4_NL, "4.50 bpw non-linear quantization"),
    preset!("IQ4_XS", IQ4_XS, IQ4_XS, "4.25 bpw non-linear quantization"),
    preset!("Q4_K_S", Q4_K_S, Q4_K, "4.37G, +0.2689 ppl @ Llama-3-8B"),
    preset!("Q4_K_M", Q4_K_M, Q4_K, "4.58G, +0.1754 ppl @ Llama-3-8B"),
    preset!("Q5_K_S", Q5_K_S, Q5_K, "5.21G, +0.1049 ppl @ Llama-3-8B"),
    preset!("Q5_K_M", Q5_K_M, Q5_K, "5.33G, +0.0569 ppl @ Llama-3-8B"),
    preset!("Q6_K", Q6_K, Q6_K, "6.14G, +0.0217 ppl @ Llama-3-8B"),
    preset!("Q8_0", Q8_0, Q8_0, "7.96G, +0.0026 ppl @ Llama-3-8B"),
    preset!("F16", F16, F16, "14.00G, +0.0020 ppl @ Mistral-7B"),
    preset!("BF16", BF16, BF16, "14.00G, -0.0050 ppl @ Mistral-7B"),
    preset!("F32", ALL_F32, F32, "26.00G @ 7B"),
];

/// llama-quantize's short names for the _M k-quant mixes.
pub const ALIASES: &[(&str, &str)] = &[("Q3_K", "Q3_K_M"), ("Q4_K", "Q4_K_M"), ("Q5_K", "Q5_K_M")];

impl Preset {
    /// A preset by name (case-insensitive, aliases such as Q4_K accepted) or by its file-type
    /// number, as llama-quantize's TYPE argument.
    pub fn parse(name: &str) -> Result<Preset> {
        let upper = name.trim().to_ascii_uppercase();
        let canonical = ALIASES
            .iter()
            .find(|(a, _)| *a == upper)
            .map_or(upper.as_str(), |(_, p)| *p);
        if let Some(p) = PRESETS.iter().find(|p| p.name == canonical) {
            return Ok(*p);
        }
        if let Ok(id) = upper.parse::<u32>() {
            if let Some(p) = PRESETS.iter().find(|p| p.ftype as u32 == id) {
                return Ok(*p);
            }
        }
        let known: Vec<&str> = PRESETS
            .iter()
            .map(|p| p.name)
            .chain(ALIASES.iter().map(|(a, _)| *a))
            .collect();
        Err(Error::UnknownType(format!(
            "unknown quantization type '{name}' (presets: {})",
            known.join(", ")
        )))
    }

    pub fn file_type(&self) -> u32 {
        self.ftype as u32
    }
}

/// The model facts the mixture rules look at (llama.cpp's hparams).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ModelInfo {
    pub arch: String,
    pub n_layer: u32,
    pub n_expert: u32,
    pub n_head: u32,
    pub n_head_kv: u32,
    /// llama.cpp's LLM_TYPE_70B (Llama with 80 layers and grouped KV heads).
    pub is_70b: bool,
}

fn first_u32(v: Option<&Value>) -> Option<u32> {
    match v? {
        Value::Array(_, items) => items.first().and_then(Value::as_u64).map(|x| x as u32),
        v => v.as_u64().map(|x| x as u32),
    }
}

impl ModelInfo {
    pub fn from_model(model: &GgufModel) -> ModelInfo {
        let arch = model
            .get("general.architecture")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        let key = |k: &str| model.get(&format!("{arch}.{k}"));
        let n_layer = first_u32(key("block_count")).unwrap_or(0);
        let n_head = first_u32(key("attention.head_count")).unwrap_or(0);
        let n_head_kv = first_u32(key("attention.head_count_kv")).unwrap_or(n_head);
        ModelInfo {
            is_70b: arch == "llama" && n_layer == 80 && n_head != n_head_kv,
            n_expert: first_u32(key("expert_count")).unwrap_or(0),
            arch,
            n_layer,
            n_head,
            n_head_kv,
        }
    }

    /// Query heads per KV head (0 when there are no KV heads), as llama.cpp's `n_gqa()`.
    pub fn n_gqa(&self) -> u32 {
        self.n_head.checked_div(self.n_head_kv).unwrap_or(0)
    }
}

/// Would llama.cpp quantize this tensor at all (`tensor_allows_quantization`)?
pub fn allows_quantization(name: &str, n_dims: usize, quantize_output_tensor: bool) -> bool {
    const NEVER: &[&str] = &[
        "_norm.weight",
        "ffn_gate_inp.weight",
        "ffn_gate_tid2eid.weight",
        "altup",
        "laurel",
        "per_layer_model_proj",
        "ssm_conv1d",
        "shortconv.conv.weight",
        "indexer.k_proj.weight",
        "indexer.q_proj.weight",
        "time_mix_first.weight",
        "time_mix_w0.weight",
        "time_mix_w1.weight",
        "time_mix_w2.weight",
        "time_mix_v0.weight",
        "time_mix_v1.weight",
        "time_mix_v2.weight",
        "time_mix_a0.weight",
        "time_mix_a1.weight",
        "time_mix_a2.weight",
        "time_mix_g1.weight",
        "time_mix_g2.weight",
        "time_mix_decay_w1.weight",
        "time_mix_decay_w2.weight",
        "time_mix_lerp_fused.weight",
        "attn_rel_b.weight",
        ".position_embd",
        "sam.pos_embd",
        "sam.neck.",
        "sam.net_",
        ".rel_pos",
        ".patch_embd",
        ".patch_merger",
        "a.rvq.codebook",
        "mm.a.code_embd",
    ];
    n_dims >= 2
        && name.ends_with("weight")
        && (quantize_output_tensor || name != "output.weight")
        && name != "position_embd.weight"
        && name != "token_types.weight"
        && !NEVER.iter().any(|s| name.contains(s))
}

/// llama.cpp's broad tensor categories (`tensor_get_category`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Category {
    TokenEmbd,
    AttnQ,
    AttnV,
    AttnK,
    AttnQkv,
    AttnKvB,
    AttnOutput,
    FfnUp,
    FfnGate,
    FfnDown,
    Output,
    Other,
}

pub fn category(name: &str) -> Category {
    use Category::*;
    if name == "output.weight" {
        Output
    } else if name == "token_embd.weight" || name == "per_layer_token_embd.weight" {
        TokenEmbd
    } else if name.contains("attn_qkv.weight") {
        AttnQkv
    } else if name.contains("attn_kv_b.weight") {
        AttnKvB
    } else if name.contains("attn_v.weight") {
        AttnV
    } else if name.contains("attn_k.weight") {
        AttnK
    } else if name.contains("attn_q.weight") {
        AttnQ
    } else if name.contains("attn_output.weight") {
        AttnOutput
    } else if name.contains("ffn_up") {
        FfnUp
    } else if name.contains("ffn_gate") {
        FfnGate
    } else if name.contains("ffn_down") {
        FfnDown
    } else {
        Other
    }
}

fn is_attn_v_like(c: Category) -> bool {
    matches!(c, Category::AttnV | Category::AttnQkv | Category::AttnKvB)
}

/// ggml's `ggml_is_quantized`: every block type (not the plain float/int types).
pub fn is_quantized(ty: GgmlType) -> bool {
    use GgmlType::*;
    !matches!(ty, F32 | F16 | BF16 | F64 | I8 | I16 | I32 | I64)
}

/// The layer number of a `blk.N.` tensor name (sscanf("blk.%d.") semantics: digits then a dot).
pub fn layer_of(name: &str) -> Option<u32> {
    let rest = name.strip_prefix("blk.")?;
    let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
    if digits == 0 || rest.as_bytes().get(digits) != Some(&b'.') {
        return None;
    }
    rest[..digits].parse().ok()
}

/// llama.cpp's tensor visiting order: by layer (non-layer tensors first), then by name.
pub fn llama_order<'a>(names: impl IntoIterator<Item = &'a str>) -> Vec<usize> {
    let names: Vec<&str> = names.into_iter().collect();
    let mut idx: Vec<usize> = (0..names.len()).collect();
    idx.sort_by(|&a, &b| {
        let la = layer_of(names[a]).map_or(-1, i64::from);
        let lb = layer_of(names[b]).map_or(-1, i64::from);
        la.cmp(&lb).then_with(|| names[a].cmp(names[b]))
    });
    idx
}

/// A row-size fall-back (llama.cpp's `tensor_type_fallback`): None when `ty` fits rows of `ncols`.
pub fn fallback(name: &str, ncols: u64, ty: GgmlType) -> Result<Option<GgmlType>> {
    use GgmlType::*;
    if ncols.is_multiple_of(ty.block_size() as u64) {
        return Ok(None);
    }
    let mut to = match ty {
        IQ1_S | IQ1_M | IQ2_XXS | IQ2_XS | IQ2_S | IQ3_XXS | IQ3_S | IQ4_XS => IQ4_NL,
        Q2_K | Q3_K | TQ1_0 | TQ2_0 => Q4_0,
        Q4_K => Q5_0,
        Q5_K => Q5_1,
        Q6_K => Q8_0,
        _ => {
            return Err(Error::tensor(
                name,
                format!(
                    "rows of {ncols} are not a multiple of {ty}'s block of {} and llama.cpp defines no \
                     fall-back type for {ty}; choose another type for it with --tensor-type",
                    ty.block_size()
                ),
            ))
        }
    };
    if !ncols.is_multiple_of(to.block_size() as u64) {
        // Rows not even a multiple of 32: only a float type fits.
        to = F16;
    }
    Ok(Some(to))
}

/// Does llama.cpp refuse to make this tensor without importance data (`tensor_requires_imatrix`)?
pub fn requires_imatrix(name: &str, ty: GgmlType, ftype: Ftype) -> bool {
    use GgmlType::*;
    if matches!(category(name), Category::TokenEmbd | Category::Output) {
        return false;
    }
    match ty {
        IQ3_XXS | IQ2_XXS | IQ2_XS | IQ2_S | IQ1_M | IQ1_S => true,
        Q2_K => ftype == Ftype::Q2_K_S,
        _ => false,
    }
}

/// The mixture state for one model and preset: llama.cpp's `quantize_state_impl` counters.
pub struct Mixture<'a> {
    pub info: &'a ModelInfo,
    pub ftype: Ftype,
    pub has_imatrix: bool,
    /// No `output.weight`: the token embedding doubles as the output and is typed like it.
    pub has_tied_embeddings: bool,
    pub output_tensor_type: Option<GgmlType>,
    pub token_embedding_type: Option<GgmlType>,
    n_attention_wv: i64,
    n_ffn_down: i64,
    n_ffn_gate: i64,
    n_ffn_up: i64,
    i_attention_wv: i64,
    i_ffn_down: i64,
    i_ffn_gate: i64,
    i_ffn_up: i64,
}

fn use_more_bits(i_layer: i64, n_layers: i64) -> bool {
    i_layer < n_layers / 8 || i_layer >= 7 * n_layers / 8 || (i_layer - n_layers / 8) % 3 == 2
}

impl<'a> Mixture<'a> {
    /// `names`: every tensor the output will hold (after pruning), any order.
    pub fn new<'n>(
        info: &'a ModelInfo,
        ftype: Ftype,
        has_imatrix: bool,
        names: impl IntoIterator<Item = &'n str>,
    ) -> Mixture<'a> {
        let mut n_attention_wv = 0;
        let mut has_tied_embeddings = true;
        for n in names {
            let c = category(n);
            if is_attn_v_like(c) {
                n_attention_wv += 1;
            }
            if c == Category::Output {
                has_tied_embeddings = false;
            }
        }
        let n_layer = info.n_layer as i64;
        Mixture {
            info,
            ftype,
            has_imatrix,
            has_tied_embeddings,
            output_tensor_type: None,
            token_embedding_type: None,
            n_attention_wv,
            n_ffn_down: n_layer,
            n_ffn_gate: n_layer,
            n_ffn_up: n_layer,
            i_attention_wv: 0,
            i_ffn_down: 0,
            i_ffn_gate: 0,
            i_ffn_up: 0,
        }
    }

    /// The layer the rules use: with experts, parsed from the name; else the running counter.
    fn layer_info(&self, counter: i64, n_layer: i64, name: &str) -> Result<(i64, i64)> {
        if self.info.n_expert.max(1) > 1 {
            let l = layer_of(name).ok_or_else(|| {
                Error::tensor(name, "cannot determine its layer (expected a blk.N. name)")
            })? as i64;
            if l >= n_layer {
                return Err(Error::tensor(
                    name,
                    format!("layer {l} is outside the model's {n_layer} layers"),
                ));
            }
            return Ok((l, n_layer));
        }
        Ok((counter, n_layer))
    }

    /// The preset's type for one tensor (`llama_tensor_get_type_impl`); `new_type` is the preset's
    /// default type, `ne0` the row length. Call in llama.cpp's visiting order (see `llama_order`).
    pub fn tensor_type(&mut self, name: &str, ne0: u64, new_type: GgmlType) -> Result<GgmlType> {
        use Category as C;
        use Ftype as F;
        use GgmlType as T;
        let ft = self.ftype;
        let info = self.info;
        let arch_falcon = info.arch == "falcon";
        let n_expert = info.n_expert;
        let n_gqa = info.n_gqa();
        let cat = category(name);
        let mut new_type = new_type;

        if cat == C::Output || (self.has_tied_embeddings && cat == C::TokenEmbd) {
            if let Some(t) = self.output_tensor_type {
                new_type = t;
            } else if arch_falcon || !ne0.is_multiple_of(new_type.block_size() as u64) {
                new_type = T::Q8_0;
            } else if matches!(
                ft,
                F::IQ2_XXS | F::IQ2_XS | F::IQ3_XXS | F::IQ1_S | F::IQ2_S | F::IQ2_M | F::IQ1_M
            ) {
                new_type = T::Q5_K;
            } else if new_type != T::Q8_0 {
                new_type = T::Q6_K;
            }
        } else if cat == C::TokenEmbd {
            if let Some(t) = self.token_embedding_type {
                new_type = t;
            } else if matches!(ft, F::IQ2_XXS | F::IQ2_XS | F::IQ1_S | F::IQ1_M) {
                new_type = T::Q2_K;
            } else if matches!(ft, F::IQ2_S | F::IQ2_M | F::IQ3_XXS) {
                new_type = T::IQ3_S;
            }
        } else if matches!(
            ft,
            F::IQ2_XXS | F::IQ2_XS | F::IQ1_S | F::IQ2_S | F::IQ2_M | F::IQ1_M
        ) {
            let iq2sm = matches!(ft, F::IQ2_S | F::IQ2_M);
            if is_attn_v_like(cat) {
                new_type = if n_gqa >= 4 || n_expert >= 4 {
                    T::Q4_K
                } else if iq2sm {
                    T::IQ3_S
                } else {
                    T::Q2_K
                };
                self.i_attention_wv += 1;
            } else if n_expert == 8 && cat == C::AttnK {
                new_type = T::Q4_K;
            } else if cat == C::FfnDown {
                if self.i_ffn_down < self.n_ffn_down / 8 {
                    new_type = if iq2sm { T::IQ3_S } else { T::Q2_K };
                }
                self.i_ffn_down += 1;
            } else if cat == C::AttnOutput {
                if n_expert == 8 {
                    new_type = T::Q5_K;
                } else if matches!(ft, F::IQ1_S | F::IQ1_M) {
                    new_type = T::IQ2_XXS;
                } else if iq2sm {
                    new_type = T::IQ3_S;
                }
            }
        } else if is_attn_v_like(cat) {
            if ft == F::Q2_K {
                new_type = if n_gqa >= 4 { T::Q4_K } else { T::Q3_K };
            } else if ft == F::Q2_K_S && n_gqa >= 4 {
                new_type = T::Q4_K;
            } else if ft == F::IQ3_XXS {
                new_type = if n_gqa >= 4 {
                    T::Q4_K
                } else if !self.has_imatrix {
                    T::IQ3_S
                } else {
                    T::IQ3_XXS
                };
            } else if (matches!(ft, F::IQ3_XS | F::IQ3_S) && n_gqa >= 4) || ft == F::IQ3_M {
                new_type = T::Q4_K;
            } else if ft == F::Q3_K_M {
                new_type = if self.i_attention_wv < 2 {
                    T::Q5_K
                } else {
                    T::Q4_K
                };
            } else if ft == F::Q3_K_L || (matches!(ft, F::IQ4_NL | F::IQ4_XS) && n_gqa >= 4) {
                new_type = T::Q5_K;
            } else if matches!(ft, F::Q4_K_M | F::Q5_K_M)
                && use_more_bits(self.i_attention_wv, self.n_attention_wv)
            {
                new_type = T::Q6_K;
            } else if ft == F::Q4_K_S && self.i_attention_wv < 4 {
                new_type = T::Q5_K;
            }
            if info.is_70b && matches!(new_type, T::Q3_K | T::Q4_K) {
                // 8 heads share attn_v in the 70B model, so it is 8x smaller: more bits are cheap.
                new_type = T::Q5_K;
            }
            if n_expert == 8 {
                new_type = T::Q8_0;
            }
            self.i_attention_wv += 1;
        } else if cat == C::AttnK {
            if n_expert == 8 {
                new_type = T::Q8_0;
            } else if ft == F::IQ3_XS {
                new_type = T::IQ3_XXS;
            } else if ft == F::IQ3_XXS {
                new_type = T::IQ2_S;
            }
        } else if cat == C::AttnQ {
            if ft == F::IQ3_XS {
                new_type = T::IQ3_XXS;
            } else if ft == F::IQ3_XXS {
                new_type = T::IQ2_S;
            }
        } else if cat == C::FfnDown {
            let (i_layer, n_layer) = self.layer_info(self.i_ffn_down, self.n_ffn_down, name)?;
            if ft == F::Q2_K {
                new_type = T::Q3_K;
            } else if ft == F::Q2_K_S {
                if i_layer < n_layer / 8 {
                    new_type = T::Q4_K;
                }
            } else if ft == F::IQ3_XXS && !self.has_imatrix {
                new_type = if i_layer < n_layer / 8 {
                    T::Q4_K
                } else {
                    T::Q3_K
                };
            } else if ft == F::Q3_K_M {
                new_type = if i_layer < n_layer / 16 {
                    T::Q5_K
                } else if !arch_falcon || use_more_bits(i_layer, n_layer) {
                    T::Q4_K
                } else {
                    T::Q3_K
                };
            } else if ft == F::IQ3_M
                && (i_layer < n_layer / 8 || (n_expert == 8 && use_more_bits(i_layer, n_layer)))
            {
                new_type = T::Q4_K;
            } else if ft == F::Q3_K_L {
                new_type = if arch_falcon { T::Q4_K } else { T::Q5_K };
            } else if ft == F::Q4_K_M {
                if arch_falcon {
                    new_type = if i_layer < n_layer / 16 {
                        T::Q6_K
                    } else if use_more_bits(i_layer, n_layer) {
                        T::Q5_K
                    } else {
                        T::Q4_K
                    };
                } else if use_more_bits(i_layer, n_layer) {
                    new_type = T::Q6_K;
                }
            } else if i_layer < n_layer / 8
                && matches!(ft, F::IQ4_NL | F::IQ4_XS)
                && !self.has_imatrix
            {
                new_type = T::Q5_K;
            } else if ft == F::Q5_K_M && use_more_bits(i_layer, n_layer) {
                new_type = T::Q6_K;
            } else if ft == F::Q4_K_S && !arch_falcon && i_layer < n_layer / 8 {
                new_type = T::Q5_K;
            } else if matches!(ft, F::Q4_0 | F::Q5_0) && self.has_imatrix && i_layer < n_layer / 8 {
                // Guards the first ffn_down layers, which go wrong even with an imatrix.
                new_type = if ft == F::Q4_0 { T::Q4_1 } else { T::Q5_1 };
            }
            self.i_ffn_down += 1;
        } else if cat == C::AttnOutput {
            if !arch_falcon {
                if n_expert == 8 {
                    if matches!(
                        ft,
                        F::Q2_K
                            | F::IQ3_XS
                            | F::IQ3_XXS
                            | F::Q3_K_S
                            | F::Q3_K_M
                            | F::IQ4_NL
                            | F::Q4_K_S
                            | F::Q4_K_M
                            | F::IQ3_S
                            | F::IQ3_M
                            | F::IQ4_XS
                    ) {
                        new_type = T::Q5_K;
                    }
                } else {
                    match ft {
                        F::Q2_K => new_type = T::Q3_K,
                        F::IQ3_XXS => new_type = T::IQ3_S,
                        F::Q3_K_M => new_type = T::Q4_K,
                        F::Q3_K_L => new_type = T::Q5_K,
                        F::IQ3_M => new_type = T::Q4_K,
                        _ => {}
                    }
                }
            } else if ft == F::Q3_K_L {
                new_type = T::Q4_K;
            }
        } else if cat == C::AttnQkv {
            if matches!(ft, F::Q3_K_M | F::Q3_K_L | F::IQ3_M) {
                new_type = T::Q4_K;
            } else if ft == F::Q4_K_M {
                new_type = T::Q5_K;
            } else if ft == F::Q5_K_M {
                new_type = T::Q6_K;
            }
        } else if cat == C::FfnGate {
            let (i_layer, n_layer) = self.layer_info(self.i_ffn_gate, self.n_ffn_gate, name)?;
            if ft == F::IQ3_XS && i_layer >= n_layer / 8 && i_layer < 7 * n_layer / 8 {
                new_type = T::IQ3_XXS;
            }
            self.i_ffn_gate += 1;
        } else if cat == C::FfnUp {
            let (i_layer, n_layer) = self.layer_info(self.i_ffn_up, self.n_ffn_up, name)?;
            if ft == F::IQ3_XS && i_layer >= n_layer / 8 && i_layer < 7 * n_layer / 8 {
                new_type = T::IQ3_XXS;
            }
            self.i_ffn_up += 1;
        }
        Ok(new_type)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_parse_by_name_alias_and_number() {
        assert_eq!(Preset::parse("q4_k").unwrap().name, "Q4_K_M");
        assert_eq!(
            Preset::parse("Q4_K_M").unwrap().default_type,
            GgmlType::Q4_K
        );
        assert_eq!(
            Preset::parse("iq2_s").unwrap().default_type,
            GgmlType::IQ2_XS
        );
        assert_eq!(Preset::parse("15").unwrap().name, "Q4_K_M");
        assert_eq!(Preset::parse("f32").unwrap().file_type(), 0);
        let e = Preset::parse("Q4_K_XXL").unwrap_err().to_string();
        assert!(e.contains("Q4_K_XXL") && e.contains("IQ4_XS"), "{e}");
    }

    #[test]
    fn llama_order_sorts_by_layer_then_name() {
        let names = [
            "blk.10.a",
            "output.weight",
            "blk.2.b",
            "blk.2.a",
            "token_embd.weight",
        ];
        let order: Vec<&str> = llama_order(names).into_iter().map(|i| names[i]).collect();
        assert_eq!(
            order,
            [
                "output.weight",
                "token_embd.weight",
                "blk.2.a",
                "blk.2.b",
                "blk.10.a"
            ]
        );
        assert_eq!(layer_of("blk.12.attn_q.weight"), Some(12));
        assert_eq!(layer_of("blk.x.attn_q.weight"), None);
        assert_eq!(layer_of("output.weight"), None);
    }

    #[test]
    fn fallbacks_follow_llama_cpp() {
        use GgmlType::*;
        assert_eq!(fallback("t", 512, Q4_K).unwrap(), None);
        assert_eq!(fallback("t", 96, Q4_K).unwrap(), Some(Q5_0));
        assert_eq!(fallback("t", 96, IQ2_S).unwrap(), Some(IQ4_NL));
        assert_eq!(fallback("t", 96, Q2_K).unwrap(), Some(Q4_0));
        assert_eq!(fallback("t", 100, Q6_K).unwrap(), Some(F16));
        assert!(fallback("t", 100, Q8_0).is_err());
    }

    #[test]
    fn moe_attn_v_gets_q8_0_and_ffn_down_follows_layers() {
        let info = ModelInfo {
            arch: "qwen3moe".into(),
            n_layer: 16,
            n_expert: 8,
            n_head: 32,
            n_head_kv: 4,
            is_70b: false,
        };
        let names: Vec<String> = (0..16)
            .flat_map(|l| {
                [
                    format!("blk.{l}.attn_v.weight"),
                    format!("blk.{l}.ffn_down_exps.weight"),
                ]
            })
            .collect();
        let mut m = Mixture::new(
            &info,
            Ftype::Q4_K_M,
            false,
            names.iter().map(|s| s.as_str()),
        );
        assert_eq!(
            m.tensor_type("blk.0.attn_v.weight", 512, GgmlType::Q4_K)
                .unwrap(),
            GgmlType::Q8_0
        );
        // use_more_bits(l, 16): l < 2, l >= 14, or (l - 2) % 3 == 2.
        let down: Vec<GgmlType> = (0..16)
            .map(|l| {
                m.tensor_type(
                    &format!("blk.{l}.ffn_down_exps.weight"),
                    512,
                    GgmlType::Q4_K,
                )
                .unwrap()
            })
            .collect();
        let q6: Vec<usize> = (0..16).filter(|&l| down[l] == GgmlType::Q6_K).collect();
        assert_eq!(q6, [0, 1, 4, 7, 10, 13, 14, 15]);
    }
}

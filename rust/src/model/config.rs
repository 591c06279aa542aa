//! Model hyper-parameters, read from GGUF metadata keys `{arch}.*` as llama.cpp names them.

use crate::error::{Error, Result};
use crate::gguf::{GgufModel, Value};

/// The architectures this engine runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arch {
    /// Qwen3 with sparse MoE feed-forward blocks in every layer.
    Qwen3Moe,
    /// Dense Qwen3 (SwiGLU feed-forward).
    Qwen3,
}

impl Arch {
    pub fn name(self) -> &'static str {
        match self {
            Arch::Qwen3Moe => "qwen3moe",
            Arch::Qwen3 => "qwen3",
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    pub arch: Arch,
    pub n_layer: usize,
    pub n_embd: usize,
    pub n_head: usize,
    pub n_head_kv: usize,
    /// Per-head size of queries and keys.
    pub head_dim_k: usize,
    /// Per-head size of values.
    pub head_dim_v: usize,
    pub rope_theta: f32,
    pub rms_eps: f32,
    /// 0 for dense models.
    pub n_expert: usize,
    pub n_expert_used: usize,
    /// Hidden size of one expert (MoE) ...
    pub n_ff_expert: usize,
    /// ... and of the dense feed-forward block (dense models; informational for MoE ones).
    pub n_ff: usize,
    /// Context length the model was trained with.
    pub n_ctx_train: usize,
    /// Rows of the embedding matrix (filled from `token_embd.weight`).
    pub n_vocab: usize,
}

fn missing(path: &std::path::Path, key: &str, why: &str) -> Error {
    Error::Invalid(format!("{}: metadata key '{key}' {why}", path.display()))
}

impl Config {
    /// Reads the hyper-parameters; every missing or malformed key is named in the error.
    pub fn from_gguf(model: &GgufModel) -> Result<Config> {
        let path = model.files[0].path.as_path();
        let arch_name = model
            .get("general.architecture")
            .and_then(Value::as_str)
            .ok_or_else(|| missing(path, "general.architecture", "is missing or not a string"))?;
        let arch = match arch_name {
            "qwen3moe" => Arch::Qwen3Moe,
            "qwen3" => Arch::Qwen3,
            other => {
                return Err(Error::Invalid(format!(
                    "{}: architecture '{other}' is not supported (pyqmoe runs qwen3moe and qwen3)",
                    path.display()
                )))
            }
        };
        let key = |k: &str| format!("{arch_name}.{k}");
        let get_u = |k: &str| -> Result<usize> {
            let full = key(k);
            model
                .get(&full)
                .ok_or_else(|| missing(path, &full, "is missing"))?
                .as_u64()
                .map(|v| v as usize)
                .ok_or_else(|| missing(path, &full, "is not an unsigned integer"))
        };
        let get_u_or = |k: &str, default: usize| -> Result<usize> {
            if model.get(&key(k)).is_some() {
                get_u(k)
            } else {
                Ok(default)
            }
        };
        let get_f_or = |k: &str, default: f64| -> Result<f32> {
            let full = key(k);
            match model.get(&full) {
                None => Ok(default as f32),
                Some(v) => v
                    .as_f64()
                    .map(|x| x as f32)
                    .ok_or_else(|| missing(path, &full, "is not a number")),
            }
        };

        let n_embd = get_u("embedding_length")?;
        let n_head = get_u("attention.head_count")?;
        if n_head == 0 {
            return Err(missing(path, &key("attention.head_count"), "is 0"));
        }
        let n_head_kv = get_u_or("attention.head_count_kv", n_head)?;
        // llama.cpp's defaults: key/value length n_embd / n_head when the keys are absent.
        let head_dim_k = get_u_or("attention.key_length", n_embd / n_head)?;
        let head_dim_v = get_u_or("attention.value_length", head_dim_k)?;
        let (n_expert, n_expert_used, n_ff_expert) = match arch {
            Arch::Qwen3Moe => (
                get_u("expert_count")?,
                get_u("expert_used_count")?,
                get_u("expert_feed_forward_length")?,
            ),
            Arch::Qwen3 => (0, 0, 0),
        };
        let n_ff = match arch {
            Arch::Qwen3 => get_u("feed_forward_length")?,
            Arch::Qwen3Moe => get_u_or("feed_forward_length", 0)?,
        };
        let cfg = Config {
            arch,
            n_layer: get_u("block_count")?,
            n_embd,
            n_head,
            n_head_kv,
            head_dim_k,
            head_dim_v,
            rope_theta: get_f_or("rope.freq_base", 10000.0)?,
            rms_eps: get_f_or("attention.layer_norm_rms_epsilon", 1e-6)?,
            n_expert,
            n_expert_used,
            n_ff_expert,
            n_ff,
            n_ctx_train: get_u_or("context_length", 0)?,
            n_vocab: 0,
        };
        cfg.validate(path)?;
        Ok(cfg)
    }

    fn validate(&self, path: &std::path::Path) -> Result<()> {
        let bad = |what: String| Err(Error::Invalid(format!("{}: {what}", path.display())));
        if self.n_layer == 0 || self.n_embd == 0 {
            return bad("block_count and embedding_length must be > 0".into());
        }
        if self.n_head_kv == 0 || !self.n_head.is_multiple_of(self.n_head_kv) {
            return bad(format!(
                "attention.head_count {} is not a multiple of attention.head_count_kv {}",
                self.n_head, self.n_head_kv
            ));
        }
        if !self.head_dim_k.is_multiple_of(2) || self.head_dim_k == 0 {
            return bad(format!(
                "attention.key_length {} must be even for RoPE",
                self.head_dim_k
            ));
        }
        if self.arch == Arch::Qwen3Moe
            && (self.n_expert == 0 || self.n_expert_used == 0 || self.n_expert_used > self.n_expert)
        {
            return bad(format!(
                "expert_used_count {} must be in 1..=expert_count {}",
                self.n_expert_used, self.n_expert
            ));
        }
        Ok(())
    }

    pub fn is_moe(&self) -> bool {
        self.n_expert > 0
    }

    /// Query heads that share one key/value head.
    pub fn gqa_group(&self) -> usize {
        self.n_head / self.n_head_kv
    }
}

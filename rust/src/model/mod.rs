//! CPU inference for Qwen3-MoE and dense Qwen3 GGUF models.
//!
//! `config` reads hyper-parameters, `weights` finds the tensors (kept memory-mapped in their file
//! type), `matmul` multiplies weight rows of any supported type with f32 activations (`vec_dot`: quantized
//! dot kernels), `ops` holds
//! the per-row operations, `forward` is the forward pass with its KV cache, `sampling` picks tokens.

pub mod collect;
pub mod config;
pub mod forward;
pub mod matmul;
pub mod ops;
pub mod sampling;
pub mod vec_dot;
pub mod weights;

use std::path::Path;

use crate::error::Result;
use crate::gguf::GgufModel;

pub use collect::ImatrixCollector;
pub use config::{Arch, Config};
pub use forward::{KvType, State};
pub use sampling::{Sampler, SamplingParams};
pub use weights::Weights;

/// A loaded model: the memory-mapped file(s), hyper-parameters and tensor locations. Immutable
/// and shareable; the per-generation state lives in `State`.
pub struct Model {
    pub gguf: GgufModel,
    pub config: Config,
    pub weights: Weights,
}

impl Model {
    /// Opens a GGUF model (any part of a split model) and checks every tensor the forward pass needs.
    pub fn open(path: impl AsRef<Path>) -> Result<Model> {
        let gguf = GgufModel::open(path)?;
        Model::from_gguf(gguf)
    }

    pub fn from_gguf(gguf: GgufModel) -> Result<Model> {
        let mut config = Config::from_gguf(&gguf)?;
        let weights = Weights::load(&gguf, &mut config)?;
        Ok(Model {
            gguf,
            config,
            weights,
        })
    }
}

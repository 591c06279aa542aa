//! CPU inference for Qwen3-MoE and dense Qwen3 GGUF models.
//!
//! `config` reads hyper-parameters, `weights` finds the tensors (kept memory-mapped in their file
//! type), `matmul` multiplies weight rows of any supported type with f32 activations (`vec_dot`: quantized
//! dot kernels), `ops` holds
//! the per-row operations, `forward` is the forward pass with its KV cache (`attention`: its
//! grouped-query attention), `sampling` picks tokens.

mod attention;
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
        keep_freed_memory();
        let mut config = Config::from_gguf(&gguf)?;
        let weights = Weights::load(&gguf, &mut config)?;
        Ok(Model {
            gguf,
            config,
            weights,
        })
    }
}

/// Tells glibc's malloc to serve buffers up to 32 MiB from its heaps and to keep freed heap memory
/// instead of returning it: the forward pass frees and re-allocates the same few large buffers every
/// layer, and with the default (dynamic) thresholds each came back as fresh pages to fault in and
/// zero, about 36 000 page faults per 512-token batch of the A3B-shape model (`perf stat -e
/// page-faults`). Process-wide and idempotent; the price is that the peak of those buffers stays
/// resident, as llama.cpp's compute buffers do.
fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        static ONCE: std::sync::Once = std::sync::Once::new();
        ONCE.call_once(|| {
            // SAFETY: mallopt only changes allocator parameters; any return value is acceptable.
            unsafe {
                libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
                libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
                libc::mallopt(libc::M_TOP_PAD, 16 << 20);
            }
        });
    }
}

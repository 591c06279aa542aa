//! GGUF: memory-mapped, fully validated reader; streaming, atomic writer; split models.
//!
//! Layout (little endian): magic "GGUF", version u32 (2 or 3), n_tensors u64, n_kv u64, then n_kv
//! key/value pairs, n_tensors tensor infos, padding to `general.alignment`, then tensor data.

pub mod reader;
pub mod split;
pub mod value;
pub mod writer;

pub use reader::{parse_header, GgufFile, Header, TensorInfo};
pub use split::{split_paths, GgufModel};
pub use value::{Value, ValueType};
pub use writer::{GgufWriter, SplitLimits, SplitWriter, TensorSpec};

pub const GGUF_MAGIC: [u8; 4] = *b"GGUF";
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// ggml's GGML_MAX_DIMS.
pub const MAX_DIMS: usize = 4;
/// Nested arrays deeper than this are refused (a hostile file could otherwise exhaust the stack).
pub const MAX_ARRAY_DEPTH: usize = 8;

pub const KEY_ALIGNMENT: &str = "general.alignment";
pub const KEY_SPLIT_NO: &str = "split.no";
pub const KEY_SPLIT_COUNT: &str = "split.count";
pub const KEY_SPLIT_TENSORS_COUNT: &str = "split.tensors.count";

/// Round `x` up to a multiple of `align` (a power of two), or None on overflow.
pub fn align_up(x: u64, align: u64) -> Option<u64> {
    Some(x.checked_add(align - 1)? & !(align - 1))
}

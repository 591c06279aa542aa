//! pyqmoe-core: memory-mapped GGUF I/O, block quantizers and (later) the Qwen3-MoE CPU engine.
//!
//! This crate has no Python dependency: `cargo test` and `cargo bench` run without an interpreter.
//! The PyO3 extension in `rust/python` is a thin shell over the functions exported here.

pub mod error;
pub mod gguf;
pub mod imatrix;
pub mod model;
pub mod presets;
pub mod quant;
pub mod quantize_model;
pub mod types;

pub use error::{Error, Result};
pub use types::GgmlType;

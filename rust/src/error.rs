//! One error type for the whole core; every message names the file, tensor or option at fault.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A GGUF file that is malformed, truncated or hostile; `offset` is the byte where parsing stopped.
    #[error("{path}: invalid GGUF at byte offset {offset}: {field}: {msg}")]
    Format {
        path: PathBuf,
        offset: u64,
        field: String,
        msg: String,
    },

    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },

    /// Input data that cannot be quantized (NaN/Inf, wrong length, ...), naming the tensor.
    #[error("tensor '{tensor}': {msg}")]
    Tensor { tensor: String, msg: String },

    /// A type name or id that pyqmoe does not know or cannot produce.
    #[error("{0}")]
    UnknownType(String),

    /// Any other invalid argument (bad option value, impossible shape, ...).
    #[error("{0}")]
    Invalid(String),
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn tensor(tensor: impl Into<String>, msg: impl Into<String>) -> Self {
        Error::Tensor {
            tensor: tensor.into(),
            msg: msg.into(),
        }
    }
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}

//! The library's error type. Every variant names the file, key, shape or value at fault so that
//! a user can act on the message without reading a backtrace.

use std::path::PathBuf;

/// Errors of the `taming` library.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Reading or writing a file failed.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A config file (or override) is malformed or names something unsupported.
    #[error("config {origin}: {msg}")]
    Config { origin: String, msg: String },
    /// A checkpoint file is unreadable, truncated or of an unknown format.
    #[error("checkpoint {path}: {msg}")]
    Checkpoint { path: PathBuf, msg: String },
    /// The model needs a tensor the checkpoint does not have.
    #[error("checkpoint {source_name}: missing tensor `{key}` (expected shape {expected:?})")]
    MissingTensor {
        source_name: String,
        key: String,
        expected: Vec<usize>,
    },
    /// A checkpoint tensor has a different shape than the model built from the config.
    #[error("checkpoint {source_name}: tensor `{key}` has shape {found:?}, the config's model expects {expected:?}")]
    ShapeMismatch {
        source_name: String,
        key: String,
        found: Vec<usize>,
        expected: Vec<usize>,
    },
    /// An input image (or label map, depth map) cannot be used.
    #[error("image {path}: {msg}")]
    Image { path: PathBuf, msg: String },
    /// A value given by the caller is out of range or of the wrong shape.
    #[error("{0}")]
    Invalid(String),
    /// An error from the tensor library.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// Result alias of the library.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// Shorthand for [`Error::Invalid`].
    pub fn invalid(msg: impl Into<String>) -> Self {
        Error::Invalid(msg.into())
    }

    /// Shorthand for [`Error::Io`].
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}

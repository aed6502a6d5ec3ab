use std::path::{Path, PathBuf};

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in `prepare`, each with what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("no prepared data in {cache}: run `autoresearch prepare` first")]
    NotPrepared { cache: PathBuf },

    #[error("{path} is damaged ({why}): run `autoresearch prepare --force` to rebuild the data")]
    Corrupt { path: PathBuf, why: String },

    #[error("unknown preset `{0}`: use one of h100, tiny")]
    UnknownPreset(String),

    #[error("unknown source `{0}`: use builtin, climbmix or dir:PATH")]
    UnknownSource(String),

    #[error(
        "the data was prepared for preset `{prepared}` but `{requested}` was asked for: run `autoresearch prepare --preset {requested}`"
    )]
    PresetMismatch { prepared: String, requested: String },

    #[error(
        "{dir} has no usable documents (.txt, .jsonl with a `text` field, .parquet with a `text` column)"
    )]
    NoUsableFiles { dir: PathBuf },

    #[error("{0}")]
    NoValidation(String),

    #[error(
        "could not download {url} after {attempts} attempt(s): {last}. Check the network, or point --base-url (or AUTORESEARCH_BASE_URL) at a mirror"
    )]
    Download {
        url: String,
        attempts: u32,
        last: String,
    },

    #[error(
        "disk full while writing {path}: free some space (or choose another --cache) and run `autoresearch prepare` again"
    )]
    DiskFull { path: PathBuf },

    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("reading {path}: {why}")]
    Read { path: PathBuf, why: String },

    #[error("tokenizer: {0}")]
    Tokenizer(String),

    #[error("{0}")]
    Invalid(String),

    #[cfg(feature = "candle")]
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

impl Error {
    /// An I/O error on `path`; a full disk gets its own message because the fix differs.
    pub fn io(path: impl AsRef<Path>, source: std::io::Error) -> Self {
        let path = path.as_ref().to_path_buf();
        if source.kind() == std::io::ErrorKind::StorageFull {
            Error::DiskFull { path }
        } else {
            Error::Io { path, source }
        }
    }
}

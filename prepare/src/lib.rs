//! LOCKED: the fixed half of every experiment. The agent may read this crate, never change it.
//!
//! What lives here decides whether two experiments are comparable: the presets (sequence length,
//! evaluation token count, vocabulary), the prepared data and its tokenizer, the packing loader,
//! the `val_bpb` evaluator, the training-budget clock and the run report the harness reads.
//!
//! Features: `candle` (default) adds tensors to the loader and the evaluator, which is all the
//! train binary needs; `build` adds what `autoresearch prepare` needs to make the data (sources,
//! download, tokenizer training and encoding).

pub mod clock;
mod error;
pub mod loader;
pub mod manifest;
pub mod preset;
pub mod protocol;
pub mod report;
pub mod store;

#[cfg(feature = "candle")]
pub mod eval;
#[cfg(feature = "candle")]
pub mod init;
#[cfg(feature = "candle")]
pub mod run;

#[cfg(feature = "build")]
pub mod builtin;
#[cfg(feature = "build")]
pub mod download;
#[cfg(feature = "build")]
pub mod pipeline;
#[cfg(feature = "build")]
pub mod sources;
#[cfg(feature = "build")]
pub mod tokenizer;

pub use clock::BudgetClock;
pub use error::{Error, Result};
pub use loader::{Batch, Loader, Split};
pub use manifest::{Dataset, Manifest};
pub use preset::Preset;
pub use report::{RunReport, Summary};

#[cfg(feature = "candle")]
pub use eval::{EvalResult, evaluate_bpb};
pub use protocol::TrainStats;
#[cfg(feature = "candle")]
pub use run::{Run, Stopwatch};

/// The environment of the train contract: the runner sets these, the train binary reads them.
pub mod env {
    pub const CACHE: &str = "AUTORESEARCH_CACHE";
    pub const PRESET: &str = "AUTORESEARCH_PRESET";
    pub const DEVICE: &str = "AUTORESEARCH_DEVICE";
    pub const TIME_BUDGET: &str = "AUTORESEARCH_TIME_BUDGET";
    pub const REPORT: &str = "AUTORESEARCH_REPORT";
    pub const SEED: &str = "AUTORESEARCH_SEED";
    /// Set by the harness: the descriptor to send marks and replies on (see `protocol`).
    pub const HARNESS_FD: &str = "AUTORESEARCH_HARNESS_FD";
    /// Tests only (the harness never passes it on): a device batch above this many rows fails
    /// as out of memory, so a CPU run drives the fallback of `Run::fit_device_batch`.
    pub const FAKE_DEVICE_ROWS: &str = "AUTORESEARCH_FAKE_DEVICE_ROWS";
    /// Diagnostics only (`run.sh profile`; the harness never passes it on): the one step a
    /// CUDA profiler started with `--profile-from-start off` records; the run ends after it.
    pub const PROFILE_STEP: &str = "AUTORESEARCH_PROFILE_STEP";
    /// Set by the harness on sandboxed runs, where a child of the run cannot open the GPU:
    /// `checked` and the verdicts of the harness's own checking processes, a protocol line a
    /// kernel, or `in-process`: the run checks the fused kernels in its own process (`fused`'s
    /// `isolated.rs` reads it under this name).
    pub const SELF_CHECKS: &str = "AUTORESEARCH_SELF_CHECKS";
    /// Set by the harness on a checking process instead of `HARNESS_FD`: `DEVICE from:K` makes
    /// the train binary check the fused kernels from index K (0-based) on and exit, before its
    /// `main` (`fused`'s `isolated.rs`, which also documents the protocol it prints). A binary
    /// that does not link them says so from `Run::from_env` and exits.
    pub const FUSED_SELF_CHECK: &str = "AUTORESEARCH_FUSED_SELF_CHECK";
}

/// Special tokens, appended after the learned vocabulary; the first one starts every document.
pub const SPECIAL_TOKENS: [&str; 4] = [
    "<|reserved_0|>",
    "<|reserved_1|>",
    "<|reserved_2|>",
    "<|reserved_3|>",
];
pub const BOS_TOKEN: &str = SPECIAL_TOKENS[0];

/// GPT-4's split pattern with numbers split into runs of at most two digits, as the original.
pub const SPLIT_PATTERN: &str = r"'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+";

/// The cache directory: `$AUTORESEARCH_CACHE`, else `~/.cache/autoresearch`.
pub fn default_cache_dir() -> std::path::PathBuf {
    if let Some(dir) = std::env::var_os(env::CACHE).filter(|d| !d.is_empty()) {
        return dir.into();
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| ".".into());
    std::path::Path::new(&home)
        .join(".cache")
        .join("autoresearch")
}

/// Writes `bytes` to `path` through a temporary sibling and a rename, so no reader ever sees a
/// partial file and a failure leaves nothing behind.
pub(crate) fn write_atomic(path: &std::path::Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let tmp = partial_path(path);
    let result = (|| {
        let mut file = std::fs::File::create(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if let Err(source) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::io(path, source));
    }
    Ok(())
}

/// The temporary name a file is written under before its atomic rename.
pub(crate) fn partial_path(path: &std::path::Path) -> std::path::PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".partial");
    path.with_file_name(name)
}

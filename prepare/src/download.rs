//! Downloading the original's climbmix parquet shards: parallel workers, retries with
//! exponential backoff, and an atomic rename so that no partial file ever carries a shard's name.
//! Shards already present are not fetched again.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use crate::{Error, Result};

pub const DEFAULT_BASE_URL: &str =
    "https://huggingface.co/datasets/karpathy/climbmix-400b-shuffle/resolve/main";
/// Overrides the base URL, for mirrors.
pub const BASE_URL_ENV: &str = "AUTORESEARCH_BASE_URL";
/// The last shard; pinned as the validation shard.
pub const VAL_SHARD: usize = 6542;

pub fn shard_name(index: usize) -> String {
    format!("shard_{index:05}.parquet")
}

#[derive(Clone, Debug)]
pub struct DownloadOptions {
    pub base_url: String,
    pub workers: usize,
    pub max_attempts: u32,
    /// Wait before the second attempt; doubles after each failure.
    pub backoff: Duration,
    /// Limit for one whole shard request (blocking reqwest has no idle timeout).
    pub timeout: Duration,
}

impl Default for DownloadOptions {
    fn default() -> Self {
        DownloadOptions {
            base_url: std::env::var(BASE_URL_ENV)
                .ok()
                .filter(|u| !u.is_empty())
                .unwrap_or_else(|| DEFAULT_BASE_URL.to_string()),
            workers: 8,
            max_attempts: 5,
            backoff: Duration::from_secs(2),
            timeout: Duration::from_secs(600),
        }
    }
}

/// A failure worth retrying (network, 5xx, 429, truncation) or not (404 and other 4xx, a
/// full disk).
enum Failure {
    Retry(String),
    Fatal(String),
    DiskFull,
}

/// A local write error: a full disk ends the download, anything else is retried.
fn write_failure(e: std::io::Error) -> Failure {
    if e.kind() == std::io::ErrorKind::StorageFull {
        Failure::DiskFull
    } else {
        Failure::Retry(e.to_string())
    }
}

/// Downloads the shards `indices` into `dir`, skipping those present. Returns their paths in
/// the order given. `on_done` is called once per shard as it lands (for progress bars).
pub fn download_shards(
    dir: &Path,
    indices: &[usize],
    opts: &DownloadOptions,
    on_done: &(dyn Fn(&str) + Sync),
) -> Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let client = reqwest::blocking::Client::builder()
        .connect_timeout(Duration::from_secs(30))
        .timeout(opts.timeout)
        .build()
        .map_err(|e| Error::Invalid(format!("cannot start an HTTP client: {e}")))?;
    let queue = Mutex::new(indices.iter().rev().copied().collect::<Vec<_>>());
    let first_error = Mutex::new(None::<Error>);
    std::thread::scope(|scope| {
        for _ in 0..opts.workers.clamp(1, indices.len().max(1)) {
            scope.spawn(|| {
                loop {
                    if first_error.lock().unwrap().is_some() {
                        return;
                    }
                    let Some(index) = queue.lock().unwrap().pop() else {
                        return;
                    };
                    let name = shard_name(index);
                    match download_one(&client, opts, &name, &dir.join(&name)) {
                        Ok(()) => on_done(&name),
                        Err(e) => {
                            first_error.lock().unwrap().get_or_insert(e);
                            return;
                        }
                    }
                }
            });
        }
    });
    if let Some(e) = first_error.into_inner().unwrap() {
        return Err(e);
    }
    Ok(indices.iter().map(|&i| dir.join(shard_name(i))).collect())
}

fn download_one(
    client: &reqwest::blocking::Client,
    opts: &DownloadOptions,
    name: &str,
    dest: &Path,
) -> Result<()> {
    if dest.exists() {
        return Ok(());
    }
    let url = format!("{}/{name}", opts.base_url.trim_end_matches('/'));
    let partial = crate::partial_path(dest);
    let mut wait = opts.backoff;
    let mut attempt = 0;
    loop {
        attempt += 1;
        let result = fetch(client, &url, &partial);
        let failure = match result {
            Ok(()) => match std::fs::rename(&partial, dest) {
                Ok(()) => return Ok(()),
                Err(e) => {
                    let _ = std::fs::remove_file(&partial);
                    return Err(Error::io(dest, e));
                }
            },
            Err(failure) => failure,
        };
        let _ = std::fs::remove_file(&partial);
        let (last, fatal) = match failure {
            Failure::Fatal(why) => (why, true),
            Failure::Retry(why) => (why, false),
            Failure::DiskFull => {
                return Err(Error::DiskFull {
                    path: dest.to_path_buf(),
                });
            }
        };
        if fatal || attempt >= opts.max_attempts {
            return Err(Error::Download {
                url,
                attempts: attempt,
                last,
            });
        }
        tracing::warn!(
            "attempt {attempt}/{} for {url} failed: {last}; retrying in {wait:?}",
            opts.max_attempts
        );
        std::thread::sleep(wait);
        wait *= 2;
    }
}

/// One attempt: streams the body into `partial`, checks its length and parquet framing.
fn fetch(
    client: &reqwest::blocking::Client,
    url: &str,
    partial: &Path,
) -> std::result::Result<(), Failure> {
    let retry = |e: &dyn std::fmt::Display| Failure::Retry(e.to_string());
    let mut response = client
        .get(url)
        .send()
        .map_err(|e| retry(&error_chain(&e)))?;
    let status = response.status();
    if !status.is_success() {
        let why = format!("HTTP {status}");
        let transient =
            status.is_server_error() || status.as_u16() == 429 || status.as_u16() == 408;
        return Err(if transient {
            Failure::Retry(why)
        } else {
            Failure::Fatal(why)
        });
    }
    let expected = response.content_length();
    let mut file = std::fs::File::create(partial).map_err(write_failure)?;
    let mut buf = vec![0u8; 1 << 20];
    let mut written = 0u64;
    loop {
        let n = response.read(&mut buf).map_err(|e| retry(&e))?;
        if n == 0 {
            break;
        }
        file.write_all(&buf[..n]).map_err(write_failure)?;
        written += n as u64;
    }
    if let Some(expected) = expected
        && written != expected
    {
        return Err(Failure::Retry(format!(
            "body ended after {written} of {expected} bytes"
        )));
    }
    file.sync_all().map_err(write_failure)?;
    drop(file);
    check_parquet_framing(partial).map_err(Failure::Retry)
}

/// A parquet file starts and ends with `PAR1`: catches bodies cut short without a length.
fn check_parquet_framing(path: &Path) -> std::result::Result<(), String> {
    use std::io::{Seek, SeekFrom};
    let mut file = std::fs::File::open(path).map_err(|e| e.to_string())?;
    let len = file.metadata().map_err(|e| e.to_string())?.len();
    let mut head = [0u8; 4];
    let mut tail = [0u8; 4];
    if len < 12 {
        return Err(format!("only {len} bytes: not a parquet file"));
    }
    file.read_exact(&mut head).map_err(|e| e.to_string())?;
    file.seek(SeekFrom::End(-4)).map_err(|e| e.to_string())?;
    file.read_exact(&mut tail).map_err(|e| e.to_string())?;
    if &head != b"PAR1" || &tail != b"PAR1" {
        return Err("not a complete parquet file (no PAR1 framing)".into());
    }
    Ok(())
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out += &format!(": {s}");
        source = s.source();
    }
    out
}

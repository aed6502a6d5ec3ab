//! `autoresearch prepare`: fetch or generate documents, train the tokenizer, encode both splits
//! into token shards and write the manifest last. Idempotent: the same options a second time
//! find everything in place and do nothing. A failure leaves no manifest, so half-made data is
//! never mistaken for prepared data.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};
use sha2::{Digest, Sha256};

use crate::builtin;
use crate::download::{self, DownloadOptions, VAL_SHARD, shard_name};
use crate::manifest::{Dataset, MANIFEST_FILE, Manifest, ManifestDraft, ShardInfo, TokenizerInfo};
use crate::sources::{self, Role, Source};
use crate::tokenizer::Tokenizer;
use crate::{Error, Preset, Result, Split};

/// Characters of training text the tokenizer learns from, at most (the original's cap).
const TOKENIZER_MAX_CHARS: usize = 1_000_000_000;
/// Characters of one document the tokenizer learns from, at most (the original's cap).
const TOKENIZER_DOC_CAP: usize = 10_000;
/// Documents encoded per batch.
const ENCODE_CHUNK: usize = 4096;

#[derive(Clone, Debug)]
pub struct PrepareOptions {
    pub cache: PathBuf,
    pub source: Source,
    pub preset: Preset,
    /// Climbmix training shards to download (the validation shard comes on top).
    pub num_shards: usize,
    pub download: DownloadOptions,
    /// Size of the builtin corpus's training split, in MB.
    pub builtin_mb: f64,
    pub seed: u64,
    /// Rebuild even when the data is in place.
    pub force: bool,
}

impl PrepareOptions {
    pub fn new(cache: PathBuf, source: Source, preset: Preset) -> Self {
        PrepareOptions {
            cache,
            source,
            preset,
            num_shards: 10,
            download: DownloadOptions::default(),
            builtin_mb: 4.0,
            seed: 42,
            force: false,
        }
    }
}

#[derive(Clone, Debug, Default)]
pub struct Stats {
    pub download: Duration,
    pub tokenizer: Duration,
    pub encode: Duration,
    pub text_bytes: u64,
}

pub enum Outcome {
    /// Everything was in place; nothing was done.
    UpToDate(Dataset),
    Prepared(Dataset, Stats),
}

pub fn prepare(opts: &PrepareOptions) -> Result<Outcome> {
    let cache = &opts.cache;
    let raw = raw_inputs(opts)?;
    let fingerprint = fingerprint(opts, &raw)?;
    if !opts.force
        && let Some(data) = up_to_date(cache, &fingerprint, &opts.preset)
    {
        return Ok(Outcome::UpToDate(data));
    }
    std::fs::create_dir_all(cache).map_err(|e| Error::io(cache, e))?;
    match std::fs::remove_file(cache.join(MANIFEST_FILE)) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(Error::io(cache.join(MANIFEST_FILE), e));
        }
        _ => {}
    }
    let tokens_dir = cache.join("tokens");
    if tokens_dir.exists() {
        std::fs::remove_dir_all(&tokens_dir).map_err(|e| Error::io(&tokens_dir, e))?;
    }
    let mut stats = Stats::default();

    // 1. Documents.
    let (files, builtin_docs) = match &raw {
        Raw::Builtin => {
            let train_bytes = (opts.builtin_mb * 1e6) as usize;
            let val_bytes = (train_bytes / 16).max(256 * 1024);
            let train = builtin::documents(opts.seed, Split::Train, train_bytes);
            let val = builtin::documents(opts.seed, Split::Val, val_bytes);
            (Vec::new(), Some((train, val)))
        }
        Raw::Climbmix(indices) => {
            let t = Instant::now();
            let files = download(cache, indices, &opts.download)?;
            stats.download = t.elapsed();
            (files, None)
        }
        Raw::Dir(files) => (files.clone(), None),
    };

    // 2. Tokenizer, trained on the training split only.
    let t = Instant::now();
    let spinner = spinner("training tokenizer");
    let tokenizer = match &builtin_docs {
        Some((train, _)) => {
            Tokenizer::train(capped(train.iter().cloned()), opts.preset.vocab_size)?
        }
        None => train_on_files(&files, opts.preset.vocab_size)?,
    };
    spinner.finish_and_clear();
    stats.tokenizer = t.elapsed();
    tracing::info!(
        "tokenizer: {} ids learned in {:.1}s",
        tokenizer.vocab_used(),
        stats.tokenizer.as_secs_f64()
    );
    let tokenizer_dir = cache.join("tokenizer");
    std::fs::create_dir_all(&tokenizer_dir).map_err(|e| Error::io(&tokenizer_dir, e))?;
    tokenizer.save(&tokenizer_dir.join("tokenizer.json"))?;

    // 3. Encoding into token shards.
    let t = Instant::now();
    let mut train = Vec::new();
    let mut val = Vec::new();
    match builtin_docs {
        Some((train_docs, val_docs)) => {
            let bar = bar(2, "encoding");
            stats.text_bytes = (train_docs
                .iter()
                .chain(&val_docs)
                .map(String::len)
                .sum::<usize>()) as u64;
            train.push(encode_shard(
                cache,
                "tokens/train_00000.bin",
                &tokenizer,
                &train_docs,
            )?);
            bar.inc(1);
            val.push(encode_shard(
                cache,
                "tokens/val_00000.bin",
                &tokenizer,
                &val_docs,
            )?);
            bar.finish_and_clear();
        }
        None => {
            let bar = bar(files.len() as u64, "encoding");
            let mut held_out = Vec::new();
            for file in &files {
                let mut docs = Vec::new();
                sources::for_each_document(&file.path, |doc| {
                    stats.text_bytes += doc.len() as u64;
                    if file.role == Role::Mixed && sources::held_out(&doc) {
                        held_out.push(doc);
                    } else {
                        docs.push(doc);
                    }
                    Ok(())
                })?;
                match file.role {
                    Role::Val => {
                        let rel = format!("tokens/val_{:05}.bin", val.len());
                        val.push(encode_shard(cache, &rel, &tokenizer, &docs)?);
                    }
                    Role::Train | Role::Mixed if !docs.is_empty() => {
                        let rel = format!("tokens/train_{:05}.bin", train.len());
                        train.push(encode_shard(cache, &rel, &tokenizer, &docs)?);
                    }
                    _ => {}
                }
                bar.inc(1);
            }
            if !held_out.is_empty() {
                val.push(encode_shard(
                    cache,
                    "tokens/val_held_out.bin",
                    &tokenizer,
                    &held_out,
                )?);
            }
            bar.finish_and_clear();
        }
    }
    stats.encode = t.elapsed();
    let total = |s: &[ShardInfo]| s.iter().map(|s| s.docs).sum::<u64>();
    if total(&train) == 0 {
        return Err(Error::Invalid(format!(
            "{} gave no training documents",
            opts.source
        )));
    }
    if total(&val) == 0 {
        return Err(Error::NoValidation(format!(
            "{} gave no validation documents: add a val/ folder (or a file named val*) to the directory",
            opts.source
        )));
    }

    // 4. The byte table, the evaluation spec and the manifest, last.
    let draft = ManifestDraft {
        source: opts.source.to_string(),
        fingerprint,
        preset: opts.preset.clone(),
        tokenizer: TokenizerInfo {
            file: "tokenizer/tokenizer.json".into(),
            token_bytes_file: "tokenizer/token_bytes.bin".into(),
            vocab_used: tokenizer.vocab_used(),
            bos_id: tokenizer.bos_id(),
        },
        raw_files: files.iter().map(|f| f.path.display().to_string()).collect(),
        train,
        val,
    };
    let data = draft.finish(cache, &tokenizer.token_bytes(opts.preset.vocab_size))?;
    Ok(Outcome::Prepared(data, stats))
}

enum Raw {
    Builtin,
    Climbmix(Vec<usize>),
    Dir(Vec<sources::RawFile>),
}

fn raw_inputs(opts: &PrepareOptions) -> Result<Raw> {
    Ok(match &opts.source {
        Source::Builtin => Raw::Builtin,
        Source::Climbmix => {
            let mut indices: Vec<usize> = (0..opts.num_shards.min(VAL_SHARD)).collect();
            if indices.is_empty() {
                return Err(Error::Invalid(
                    "--num-shards must be at least 1 (one training shard besides the validation shard)".into(),
                ));
            }
            indices.push(VAL_SHARD);
            Raw::Climbmix(indices)
        }
        Source::Dir(dir) => {
            let files = sources::list_dir(dir)?;
            if files.is_empty() {
                return Err(Error::NoUsableFiles { dir: dir.clone() });
            }
            Raw::Dir(files)
        }
    })
}

/// What decides the data: a second run with the same fingerprint has nothing to do.
fn fingerprint(opts: &PrepareOptions, raw: &Raw) -> Result<String> {
    let mut h = Sha256::new();
    h.update(format!("source={};preset={:?};", opts.source, opts.preset));
    match raw {
        Raw::Builtin => h.update(format!("mb={};seed={}", opts.builtin_mb, opts.seed)),
        Raw::Climbmix(indices) => h.update(format!("shards={indices:?}")),
        Raw::Dir(files) => {
            for f in files {
                let meta = std::fs::metadata(&f.path).map_err(|e| Error::io(&f.path, e))?;
                let modified = meta
                    .modified()
                    .ok()
                    .and_then(|m| m.duration_since(std::time::UNIX_EPOCH).ok());
                h.update(format!("{}:{}:{modified:?};", f.path.display(), meta.len()));
            }
        }
    }
    Ok(crate::loader::hex(&h.finalize()))
}

fn up_to_date(cache: &Path, fingerprint: &str, preset: &Preset) -> Option<Dataset> {
    let manifest = Manifest::load(cache).ok()?;
    if manifest.fingerprint != fingerprint || &manifest.preset != preset {
        return None;
    }
    let files = manifest
        .train
        .iter()
        .chain(&manifest.val)
        .map(|s| s.file.as_str())
        .chain([
            manifest.tokenizer.file.as_str(),
            manifest.tokenizer.token_bytes_file.as_str(),
        ]);
    for file in files {
        if !cache.join(file).is_file() {
            return None;
        }
    }
    Dataset::open(cache).ok()
}

fn download(
    cache: &Path,
    indices: &[usize],
    opts: &DownloadOptions,
) -> Result<Vec<sources::RawFile>> {
    let dir = cache.join("data").join("climbmix");
    let missing = indices
        .iter()
        .filter(|&&i| !dir.join(shard_name(i)).exists())
        .count();
    if missing > 0 {
        tracing::info!(
            "downloading {missing} of {} shards from {}",
            indices.len(),
            opts.base_url
        );
    }
    let bar = bar(missing as u64, "downloading shards");
    let result = download::download_shards(&dir, indices, opts, &|_| bar.inc(1));
    bar.finish_and_clear();
    let paths = result.map_err(|e| match e {
        Error::Download { ref url, .. } if url.ends_with(&shard_name(VAL_SHARD)) => {
            Error::NoValidation(format!(
                "{e}. The validation shard {} is required: a mirror must serve it too",
                shard_name(VAL_SHARD)
            ))
        }
        e => e,
    })?;
    Ok(indices
        .iter()
        .zip(paths)
        .map(|(&i, path)| sources::RawFile {
            path,
            role: if i == VAL_SHARD {
                Role::Val
            } else {
                Role::Train
            },
        })
        .collect())
}

/// At most the original's caps of training text, per document and in all.
fn capped(docs: impl Iterator<Item = String> + Send) -> impl Iterator<Item = String> + Send {
    let mut total = 0;
    docs.map(|mut d| {
        if d.len() > TOKENIZER_DOC_CAP {
            let mut end = TOKENIZER_DOC_CAP;
            while !d.is_char_boundary(end) {
                end -= 1;
            }
            d.truncate(end);
        }
        d
    })
    .take_while(move |d| {
        let more = total < TOKENIZER_MAX_CHARS;
        total += d.len();
        more
    })
}

/// Trains on the training documents of `files`, read on a second thread as the trainer goes.
fn train_on_files(files: &[sources::RawFile], vocab_size: usize) -> Result<Tokenizer> {
    let (tx, rx) = std::sync::mpsc::sync_channel::<String>(1024);
    let train_files: Vec<_> = files
        .iter()
        .filter(|f| f.role != Role::Val)
        .cloned()
        .collect();
    std::thread::scope(|scope| {
        let reader = scope.spawn(move || -> Result<()> {
            for file in &train_files {
                sources::for_each_document(&file.path, |doc| {
                    if file.role == Role::Mixed && sources::held_out(&doc) {
                        return Ok(());
                    }
                    // The trainer stopped taking documents (cap reached): stop reading.
                    tx.send(doc).map_err(|_| Error::Invalid("done".into()))
                })
                .or_else(|e| match e {
                    Error::Invalid(m) if m == "done" => Ok(()),
                    e => Err(e),
                })?;
            }
            Ok(())
        });
        let tokenizer = Tokenizer::train(capped(rx.into_iter()), vocab_size);
        let read = reader.join().expect("the document reader panicked");
        read.and(tokenizer)
    })
}

fn encode_shard(
    cache: &Path,
    rel: &str,
    tokenizer: &Tokenizer,
    docs: &[String],
) -> Result<ShardInfo> {
    let mut encoded = Vec::with_capacity(docs.len());
    for chunk in docs.chunks(ENCODE_CHUNK) {
        encoded.extend(tokenizer.encode_batch(chunk)?);
    }
    crate::manifest::write_shard(cache, rel, &encoded)
}

fn spinner(message: &'static str) -> ProgressBar {
    let bar = ProgressBar::new_spinner().with_message(message);
    bar.enable_steady_tick(Duration::from_millis(120));
    bar
}

fn bar(len: u64, message: &'static str) -> ProgressBar {
    ProgressBar::new(len).with_message(message).with_style(
        ProgressStyle::with_template("{msg:20} [{bar:30}] {pos}/{len} {elapsed}")
            .expect("a valid template")
            .progress_chars("=> "),
    )
}

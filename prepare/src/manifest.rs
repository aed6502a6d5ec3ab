//! The manifest: what `autoresearch prepare` made, written last so that its presence means the
//! data is complete. `Dataset` is the read side the loader, the evaluator and the runner use.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::{Error, Preset, Result};

pub const MANIFEST_FILE: &str = "manifest.json";
pub const FORMAT_VERSION: u32 = 1;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: u32,
    /// `builtin`, `climbmix` or `dir:PATH`.
    pub source: String,
    /// The options that decide the data (source size, shard count, seed): a second `prepare`
    /// with the same fingerprint has nothing to do.
    pub fingerprint: String,
    pub preset: Preset,
    pub tokenizer: TokenizerInfo,
    /// Raw inputs (downloaded shards or local files), relative to the cache or absolute.
    pub raw_files: Vec<String>,
    pub train: Vec<ShardInfo>,
    pub val: Vec<ShardInfo>,
    pub eval: EvalSpec,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TokenizerInfo {
    /// HF `tokenizers` JSON, relative to the cache.
    pub file: String,
    /// Token id → UTF-8 byte length (0 for special tokens), u32 LE, relative to the cache.
    pub token_bytes_file: String,
    /// Ids the tokenizer actually uses (at most the preset's vocabulary).
    pub vocab_used: usize,
    pub bos_id: u32,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ShardInfo {
    /// Relative to the cache.
    pub file: String,
    pub docs: u64,
    pub tokens: u64,
    /// SHA-256 of the shard file.
    pub sha256: String,
}

/// What an honest evaluation sees: the runner checks a report's count and digest against this.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EvalSpec {
    pub tokens: u64,
    pub digest: String,
}

impl Manifest {
    pub fn load(cache: &Path) -> Result<Self> {
        let path = cache.join(MANIFEST_FILE);
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(Error::NotPrepared {
                    cache: cache.to_path_buf(),
                });
            }
            Err(e) => return Err(Error::io(&path, e)),
        };
        let manifest: Manifest = serde_json::from_str(&text).map_err(|e| Error::Corrupt {
            path: path.clone(),
            why: e.to_string(),
        })?;
        if manifest.format != FORMAT_VERSION {
            return Err(Error::Corrupt {
                path,
                why: format!(
                    "format {} (this build reads {FORMAT_VERSION})",
                    manifest.format
                ),
            });
        }
        Ok(manifest)
    }

    pub fn save(&self, cache: &Path) -> Result<()> {
        let text = serde_json::to_string_pretty(self).expect("a manifest serialises");
        crate::write_atomic(&cache.join(MANIFEST_FILE), text.as_bytes())
    }
}

/// Prepared data, opened for reading.
#[derive(Clone, Debug)]
pub struct Dataset {
    pub cache: PathBuf,
    pub manifest: Manifest,
    token_bytes: Arc<Vec<u32>>,
}

impl Dataset {
    /// Opens the prepared data in `cache`; missing data says to run `autoresearch prepare`.
    pub fn open(cache: &Path) -> Result<Self> {
        let manifest = Manifest::load(cache)?;
        let path = cache.join(&manifest.tokenizer.token_bytes_file);
        let bytes = std::fs::read(&path).map_err(|e| Error::io(&path, e))?;
        if bytes.len() != 4 * manifest.preset.vocab_size {
            return Err(Error::Corrupt {
                path,
                why: format!(
                    "{} bytes for a vocabulary of {}",
                    bytes.len(),
                    manifest.preset.vocab_size
                ),
            });
        }
        let token_bytes = bytes
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        Ok(Dataset {
            cache: cache.to_path_buf(),
            manifest,
            token_bytes: Arc::new(token_bytes),
        })
    }

    /// Opens `$AUTORESEARCH_CACHE` (or the default cache) and checks that it was prepared for
    /// `$AUTORESEARCH_PRESET` when that is set: what the train binary calls first.
    pub fn from_env() -> Result<Self> {
        let data = Self::open(&crate::default_cache_dir())?;
        if let Ok(requested) = std::env::var(crate::env::PRESET) {
            data.expect_preset(&requested)?;
        }
        Ok(data)
    }

    pub fn expect_preset(&self, requested: &str) -> Result<()> {
        if requested != self.manifest.preset.name {
            return Err(Error::PresetMismatch {
                prepared: self.manifest.preset.name.clone(),
                requested: requested.to_string(),
            });
        }
        Ok(())
    }

    pub fn preset(&self) -> &Preset {
        &self.manifest.preset
    }

    pub fn vocab_size(&self) -> usize {
        self.manifest.preset.vocab_size
    }

    pub fn bos_id(&self) -> u32 {
        self.manifest.tokenizer.bos_id
    }

    /// Token id → UTF-8 byte length; 0 for special tokens, which the evaluator excludes.
    pub fn token_bytes(&self) -> &[u32] {
        &self.token_bytes
    }

    pub fn shard_paths(&self, split: crate::Split) -> Vec<PathBuf> {
        let shards = match split {
            crate::Split::Train => &self.manifest.train,
            crate::Split::Val => &self.manifest.val,
        };
        shards.iter().map(|s| self.cache.join(&s.file)).collect()
    }
}

/// Writes one token shard under `cache` and describes it for the manifest.
pub fn write_shard<D: AsRef<[u32]>>(cache: &Path, rel: &str, docs: &[D]) -> Result<ShardInfo> {
    use sha2::{Digest, Sha256};
    let shard = crate::store::TokenShard::from_docs(docs)?;
    let bytes = shard.to_bytes();
    let path = cache.join(rel);
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    }
    crate::write_atomic(&path, &bytes)?;
    Ok(ShardInfo {
        file: rel.to_string(),
        docs: shard.num_docs() as u64,
        tokens: shard.num_tokens() as u64,
        sha256: crate::loader::hex(&Sha256::digest(&bytes)),
    })
}

/// Everything but the evaluation spec, which `finish` derives from the validation shards.
pub struct ManifestDraft {
    pub source: String,
    pub fingerprint: String,
    pub preset: Preset,
    pub tokenizer: TokenizerInfo,
    pub raw_files: Vec<String>,
    pub train: Vec<ShardInfo>,
    pub val: Vec<ShardInfo>,
}

impl ManifestDraft {
    /// Writes the token-byte table, derives the evaluation spec from the validation shards and
    /// writes the manifest last: from then on the data counts as prepared.
    pub fn finish(self, cache: &Path, token_bytes: &[u32]) -> Result<Dataset> {
        if token_bytes.len() != self.preset.vocab_size {
            return Err(Error::Invalid(format!(
                "token byte table has {} entries for a vocabulary of {}",
                token_bytes.len(),
                self.preset.vocab_size
            )));
        }
        let bytes: Vec<u8> = token_bytes.iter().flat_map(|b| b.to_le_bytes()).collect();
        let path = cache.join(&self.tokenizer.token_bytes_file);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        }
        crate::write_atomic(&path, &bytes)?;
        let mut data = Dataset {
            cache: cache.to_path_buf(),
            manifest: Manifest {
                format: FORMAT_VERSION,
                source: self.source,
                fingerprint: self.fingerprint,
                preset: self.preset,
                tokenizer: self.tokenizer,
                raw_files: self.raw_files,
                train: self.train,
                val: self.val,
                eval: EvalSpec {
                    tokens: 0,
                    digest: String::new(),
                },
            },
            token_bytes: Arc::new(token_bytes.to_vec()),
        };
        data.manifest.eval = crate::loader::expected_eval(&data)?;
        data.manifest.save(cache)?;
        Ok(data)
    }
}

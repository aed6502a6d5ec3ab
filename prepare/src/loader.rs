//! The packing loader: BOS-aligned rows with best-fit packing, as the original.
//!
//! Every row starts with BOS (each document carries one in front). To fill a row, take the
//! largest buffered document that fits whole; when none fits, crop the shortest to fill the row
//! exactly. No padding: every position holds a real token. Buffered documents are kept ordered
//! by length, so each placement is a logarithmic lookup instead of the original's linear scan.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::mpsc;

use sha2::{Digest, Sha256};

use crate::manifest::{Dataset, EvalSpec};
use crate::store::TokenShard;
use crate::{Error, Result};

/// Documents held for best-fit packing, as the original.
pub const DOC_BUFFER: usize = 1000;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Split {
    Train,
    Val,
}

/// One batch on the host: `inputs[r * seq_len + t]` predicts `targets[r * seq_len + t]`.
#[derive(Clone, Debug)]
pub struct Batch {
    pub inputs: Vec<u32>,
    pub targets: Vec<u32>,
    pub rows: usize,
    pub seq_len: usize,
    /// Passes over the split so far, starting at 1.
    pub epoch: u64,
}

#[cfg(feature = "candle")]
impl Batch {
    /// `(inputs, targets)`, each `[rows, seq_len]` u32 on `device`.
    pub fn to_tensors(
        &self,
        device: &candle_core::Device,
    ) -> Result<(candle_core::Tensor, candle_core::Tensor)> {
        let shape = (self.rows, self.seq_len);
        let x = candle_core::Tensor::from_slice(&self.inputs, shape, device)?;
        let y = candle_core::Tensor::from_slice(&self.targets, shape, device)?;
        Ok((x, y))
    }
}

/// A small, fast, seedable generator (SplitMix64); the loader's shuffles need nothing more.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: usize) -> usize {
        ((self.next_u64() as u128 * n as u128) >> 64) as usize
    }

    pub fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            items.swap(i, self.below(i + 1));
        }
    }
}

#[derive(Clone)]
struct Doc {
    shard: Arc<TokenShard>,
    index: u32,
}

/// Documents of one split in order, shard after shard, cycling epochs. With a seed, the order
/// of documents within each shard is shuffled anew every epoch.
struct DocStream {
    paths: Vec<PathBuf>,
    seed: Option<u64>,
    epoch: u64,
    shard_idx: usize,
    current: Option<Arc<TokenShard>>,
    order: Vec<u32>,
    pos: usize,
}

impl DocStream {
    fn new(paths: Vec<PathBuf>, seed: Option<u64>) -> Result<Self> {
        if paths.is_empty() {
            return Err(Error::Invalid(
                "this split has no token shards: run `autoresearch prepare --force`".into(),
            ));
        }
        Ok(DocStream {
            paths,
            seed,
            epoch: 1,
            shard_idx: 0,
            current: None,
            order: Vec::new(),
            pos: 0,
        })
    }

    fn next(&mut self) -> Result<Doc> {
        let mut empty_shards = 0;
        loop {
            if let Some(shard) = &self.current
                && self.pos < self.order.len()
            {
                let index = self.order[self.pos];
                self.pos += 1;
                return Ok(Doc {
                    shard: shard.clone(),
                    index,
                });
            }
            if self.current.is_some() {
                self.shard_idx += 1;
                if self.shard_idx == self.paths.len() {
                    self.shard_idx = 0;
                    self.epoch += 1;
                }
            }
            // A single shard is loaded once and reused across epochs.
            let reuse = self.paths.len() == 1 && self.current.is_some();
            if !reuse {
                self.current = Some(Arc::new(TokenShard::load(&self.paths[self.shard_idx])?));
            }
            let n = self.current.as_ref().unwrap().num_docs();
            self.order.clear();
            self.order.extend(0..n as u32);
            if let Some(seed) = self.seed {
                let mix = seed
                    ^ self.epoch.wrapping_mul(0xA24B_AED4_963E_E407)
                    ^ (self.shard_idx as u64).wrapping_mul(0x9FB2_1C65_1E98_DF25);
                Rng::new(mix).shuffle(&mut self.order);
            }
            self.pos = 0;
            if n == 0 {
                empty_shards += 1;
                if empty_shards > self.paths.len() {
                    return Err(Error::Invalid(
                        "this split has no documents: run `autoresearch prepare --force`".into(),
                    ));
                }
            }
        }
    }
}

pub struct Loader {
    stream: DocStream,
    /// Buffered documents keyed by (length with BOS, arrival): the earliest arrival wins ties,
    /// as in the original's scan.
    buffer: BTreeMap<(u32, u64), Doc>,
    arrivals: u64,
    buffer_size: usize,
    bos: u32,
    batch_size: usize,
    seq_len: usize,
    row: Vec<u32>,
}

impl Loader {
    /// A loader over one split of prepared data. `seed` shuffles the training order; the
    /// evaluator passes `None` so validation is always read the same way.
    pub fn new(
        data: &Dataset,
        split: Split,
        batch_size: usize,
        seq_len: usize,
        seed: Option<u64>,
    ) -> Result<Self> {
        Self::from_paths(
            data.shard_paths(split),
            data.bos_id(),
            batch_size,
            seq_len,
            seed,
        )
    }

    pub fn from_paths(
        paths: Vec<PathBuf>,
        bos: u32,
        batch_size: usize,
        seq_len: usize,
        seed: Option<u64>,
    ) -> Result<Self> {
        if batch_size == 0 || seq_len == 0 {
            return Err(Error::Invalid(
                "batch size and sequence length must be positive".into(),
            ));
        }
        Ok(Loader {
            stream: DocStream::new(paths, seed)?,
            buffer: BTreeMap::new(),
            arrivals: 0,
            buffer_size: DOC_BUFFER,
            bos,
            batch_size,
            seq_len,
            row: vec![0; seq_len + 1],
        })
    }

    /// Passes over the split so far, starting at 1.
    pub fn epoch(&self) -> u64 {
        self.stream.epoch
    }

    fn fill_row(&mut self) -> Result<()> {
        let capacity = self.row.len();
        let mut pos = 0;
        while pos < capacity {
            while self.buffer.len() < self.buffer_size {
                let doc = self.stream.next()?;
                let len = doc.shard.doc(doc.index as usize).len() as u32 + 1;
                self.buffer.insert((len, self.arrivals), doc);
                self.arrivals += 1;
            }
            let remaining = capacity - pos;
            let key = match self
                .buffer
                .range(..=(remaining as u32, u64::MAX))
                .next_back()
            {
                // The largest length that fits, then its earliest arrival.
                Some((&(len, _), _)) => *self.buffer.range((len, 0)..).next().unwrap().0,
                // Nothing fits: crop the shortest.
                None => *self.buffer.keys().next().unwrap(),
            };
            let doc = self.buffer.remove(&key).unwrap();
            let take = (key.0 as usize).min(remaining);
            let tokens = &doc.shard.doc(doc.index as usize)[..take - 1];
            self.row[pos] = self.bos;
            for (dst, &t) in self.row[pos + 1..pos + take].iter_mut().zip(tokens) {
                *dst = t as u32;
            }
            pos += take;
        }
        Ok(())
    }

    /// The next `rows` rows (the evaluator's last batch may be shorter than the batch size).
    pub fn next_rows(&mut self, rows: usize) -> Result<Batch> {
        let t = self.seq_len;
        let mut inputs = Vec::with_capacity(rows * t);
        let mut targets = Vec::with_capacity(rows * t);
        for _ in 0..rows {
            self.fill_row()?;
            inputs.extend_from_slice(&self.row[..t]);
            targets.extend_from_slice(&self.row[1..]);
        }
        Ok(Batch {
            inputs,
            targets,
            rows,
            seq_len: t,
            epoch: self.epoch(),
        })
    }

    pub fn next_host_batch(&mut self) -> Result<Batch> {
        self.next_rows(self.batch_size)
    }

    /// The next `(inputs, targets)`, each `[batch_size, seq_len]` u32 on `device`.
    #[cfg(feature = "candle")]
    pub fn next_batch(
        &mut self,
        device: &candle_core::Device,
    ) -> Result<(candle_core::Tensor, candle_core::Tensor)> {
        self.next_host_batch()?.to_tensors(device)
    }

    /// Moves packing to a background thread that keeps up to `depth` batches ready, so the
    /// training loop never waits on the host.
    pub fn prefetch(mut self, depth: usize) -> Prefetcher {
        let (tx, rx) = mpsc::sync_channel(depth.max(1));
        std::thread::spawn(move || {
            loop {
                let batch = self.next_host_batch();
                let failed = batch.is_err();
                // The receiver is gone: training ended.
                if tx.send(batch).is_err() || failed {
                    return;
                }
            }
        });
        Prefetcher { rx }
    }
}

/// Batches packed ahead on a background thread.
pub struct Prefetcher {
    rx: mpsc::Receiver<Result<Batch>>,
}

impl Prefetcher {
    pub fn next_host_batch(&mut self) -> Result<Batch> {
        self.rx
            .recv()
            .map_err(|_| Error::Invalid("the loader thread stopped".into()))?
    }

    #[cfg(feature = "candle")]
    pub fn next_batch(
        &mut self,
        device: &candle_core::Device,
    ) -> Result<(candle_core::Tensor, candle_core::Tensor)> {
        self.next_host_batch()?.to_tensors(device)
    }
}

/// SHA-256 over the evaluated targets, in order, as u32 LE, with their count.
#[derive(Default)]
pub struct TargetDigest {
    hasher: Sha256,
    tokens: u64,
}

impl TargetDigest {
    pub fn update(&mut self, targets: &[u32]) {
        for t in targets {
            self.hasher.update(t.to_le_bytes());
        }
        self.tokens += targets.len() as u64;
    }

    pub fn finish(self) -> EvalSpec {
        EvalSpec {
            tokens: self.tokens,
            digest: hex(&self.hasher.finalize()),
        }
    }
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The evaluator's batches: the first `preset.eval_rows()` rows of the validation split, read
/// in order without shuffling, in batches of at most `batch_size` rows. The batch size changes
/// memory use only: the rows, and so the digest, are the same for every batch size.
pub struct EvalBatches {
    loader: Loader,
    rows_left: usize,
    batch_size: usize,
}

impl EvalBatches {
    pub fn new(data: &Dataset, batch_size: usize) -> Result<Self> {
        let preset = data.preset();
        Ok(EvalBatches {
            loader: Loader::new(data, Split::Val, batch_size, preset.seq_len, None)?,
            rows_left: preset.eval_rows(),
            batch_size,
        })
    }
}

impl Iterator for EvalBatches {
    type Item = Result<Batch>;
    fn next(&mut self) -> Option<Self::Item> {
        if self.rows_left == 0 {
            return None;
        }
        let rows = self.rows_left.min(self.batch_size);
        self.rows_left -= rows;
        Some(self.loader.next_rows(rows))
    }
}

/// The count and digest an honest evaluation of `data` reports.
pub fn expected_eval(data: &Dataset) -> Result<EvalSpec> {
    let mut digest = TargetDigest::default();
    for batch in EvalBatches::new(data, 64)? {
        digest.update(&batch?.targets);
    }
    Ok(digest.finish())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::Preset;
    use crate::manifest::{ManifestDraft, TokenizerInfo, write_shard};

    pub const BOS: u32 = 0;

    /// Random documents: document `i` starts with the marker `first_id + i` (unique), then
    /// 0..max_len random tokens above 50_000, so every segment of a row names its document.
    pub fn random_docs(rng: &mut Rng, n: usize, first_id: u32, max_len: usize) -> Vec<Vec<u32>> {
        (0..n)
            .map(|i| {
                let mut doc = vec![first_id + i as u32];
                // At least half of `max_len`, so a row holds a bounded number of documents.
                let len = max_len / 2 + rng.below(max_len - max_len / 2);
                doc.extend((0..len).map(|_| 50_000 + rng.below(15_000) as u32));
                doc
            })
            .collect()
    }

    /// A prepared dataset in `cache` from token documents; token `t` is `1 + t % 3` bytes long,
    /// BOS 0.
    pub fn dataset(
        cache: &std::path::Path,
        preset: Preset,
        train: &[Vec<Vec<u32>>],
        val: &[Vec<Vec<u32>>],
    ) -> Dataset {
        let shards = |name: &str, docs: &[Vec<Vec<u32>>]| -> Vec<_> {
            docs.iter()
                .enumerate()
                .map(|(i, d)| write_shard(cache, &format!("tokens/{name}_{i:05}.bin"), d).unwrap())
                .collect()
        };
        let token_bytes: Vec<u32> = (0..preset.vocab_size as u32)
            .map(|t| if t == BOS { 0 } else { 1 + t % 3 })
            .collect();
        ManifestDraft {
            source: "test".into(),
            fingerprint: "test".into(),
            preset: preset.clone(),
            tokenizer: TokenizerInfo {
                file: "tokenizer/none.json".into(),
                token_bytes_file: "tokenizer/token_bytes.bin".into(),
                vocab_used: preset.vocab_size,
                bos_id: BOS,
            },
            raw_files: vec![],
            train: shards("train", train),
            val: shards("val", val),
        }
        .finish(cache, &token_bytes)
        .unwrap()
    }

    pub fn preset(seq_len: usize, eval_rows: usize) -> Preset {
        Preset {
            name: "test".into(),
            seq_len,
            eval_tokens: seq_len * eval_rows,
            vocab_size: 65_536,
            time_budget_s: 1,
        }
    }

    /// Splits a row at each BOS into document segments (without the BOS).
    fn segments(row: &[u32]) -> Vec<&[u32]> {
        assert_eq!(row[0], BOS, "every row starts with BOS");
        row.split(|&t| t == BOS).skip(1).collect()
    }

    #[test]
    fn packing_is_exact_complete_and_deterministic() {
        let mut rng = Rng::new(3);
        for trial in 0..8 {
            let dir = tempfile::tempdir().unwrap();
            let seq_len = 16 + rng.below(300);
            let max_len = 1 + rng.below(3 * seq_len);
            let n_shards = 1 + rng.below(3);
            let train: Vec<_> = (0..n_shards)
                .map(|s| {
                    let n = 2000 + rng.below(2000);
                    random_docs(&mut rng, n, 1 + 10_000 * s as u32, max_len)
                })
                .collect();
            let n_docs: usize = train.iter().map(Vec::len).sum();
            let data = dataset(dir.path(), preset(seq_len, 2), &train, &[vec![vec![9]]]);
            let seed = Some(trial);
            let mut loader = Loader::new(&data, Split::Train, 4, seq_len, seed).unwrap();
            // Stay inside the first epoch: a row takes at most this many documents.
            let docs_per_row = (seq_len + 1) / (max_len / 2 + 1) + 1;
            let rows = (n_docs - DOC_BUFFER) / docs_per_row / 2;
            let mut seen = std::collections::HashMap::new();
            let mut batches = Vec::new();
            for _ in 0..rows.div_ceil(4).max(1) {
                let batch = loader.next_host_batch().unwrap();
                assert_eq!(batch.epoch, 1);
                for r in 0..batch.rows {
                    let x = &batch.inputs[r * seq_len..(r + 1) * seq_len];
                    let y = &batch.targets[r * seq_len..(r + 1) * seq_len];
                    assert_eq!(
                        x[1..],
                        y[..seq_len - 1],
                        "targets are inputs shifted by one"
                    );
                    let mut row = x.to_vec();
                    row.push(y[seq_len - 1]);
                    let segs = segments(&row);
                    for (i, seg) in segs.iter().enumerate() {
                        let last = i == segs.len() - 1;
                        let Some(&marker) = seg.first() else {
                            // Only BOS fitted: a document cropped to nothing.
                            assert!(last);
                            continue;
                        };
                        let shard = (marker - 1) as usize / 10_000;
                        let doc = &train[shard][(marker - 1) as usize % 10_000];
                        if seg.len() < doc.len() {
                            assert!(last, "only the segment that fills the row may be cropped");
                            assert_eq!(*seg, &doc[..seg.len()]);
                        } else {
                            assert_eq!(*seg, &doc[..], "whole documents appear in order");
                        }
                        *seen.entry(marker).or_insert(0) += 1;
                    }
                }
                batches.push(batch.inputs);
            }
            assert!(
                seen.values().all(|&n| n == 1),
                "a document appears once per epoch"
            );
            // The same seed gives the same batches; another seed does not.
            let mut again = Loader::new(&data, Split::Train, 4, seq_len, seed).unwrap();
            let mut other = Loader::new(&data, Split::Train, 4, seq_len, Some(999)).unwrap();
            let mut differs = false;
            for b in &batches {
                assert_eq!(&again.next_host_batch().unwrap().inputs, b);
                differs |= &other.next_host_batch().unwrap().inputs != b;
            }
            assert!(differs, "the seed shuffles the order");
        }
    }

    #[test]
    fn cycles_epochs_and_never_mixes_splits() {
        let dir = tempfile::tempdir().unwrap();
        let mut rng = Rng::new(5);
        let train = vec![random_docs(&mut rng, 50, 1, 40)];
        let val = vec![random_docs(&mut rng, 50, 30_000, 40)];
        let data = dataset(dir.path(), preset(32, 4), &train, &val);
        let mut loader = Loader::new(&data, Split::Train, 8, 32, Some(1))
            .unwrap()
            .prefetch(2);
        let mut last_epoch = 1;
        for _ in 0..200 {
            let batch = loader.next_host_batch().unwrap();
            assert!(batch.inputs.iter().all(|&t| !(30_000..30_050).contains(&t)));
            last_epoch = batch.epoch;
        }
        assert!(last_epoch > 3, "the loader cycles epochs ({last_epoch})");
        let mut val_loader = Loader::new(&data, Split::Val, 8, 32, None).unwrap();
        let batch = val_loader.next_host_batch().unwrap();
        assert!(batch.inputs.iter().all(|&t| t == BOS || t >= 30_000));
    }

    #[test]
    fn eval_rows_do_not_depend_on_batch_size() {
        let dir = tempfile::tempdir().unwrap();
        let mut rng = Rng::new(8);
        let docs = vec![random_docs(&mut rng, 300, 1, 100)];
        let data = dataset(dir.path(), preset(64, 10), &docs, &docs);
        let collect = |bs: usize| -> Vec<u32> {
            EvalBatches::new(&data, bs)
                .unwrap()
                .flat_map(|b| b.unwrap().targets)
                .collect()
        };
        let one = collect(1);
        assert_eq!(one.len(), 640);
        assert_eq!(collect(3), one);
        assert_eq!(collect(64), one);
        assert_eq!(data.manifest.eval.tokens, 640);
        let mut digest = TargetDigest::default();
        digest.update(&one);
        assert_eq!(digest.finish(), data.manifest.eval);
    }
}

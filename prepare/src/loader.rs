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

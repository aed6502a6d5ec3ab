use std::path::PathBuf;
use std::time::Duration;

use anyhow::Result;
use clap::Args;
use prepare::download::DownloadOptions;
use prepare::pipeline::{Outcome, PrepareOptions};
use prepare::sources::Source;
use prepare::{Dataset, Preset};

#[derive(Args)]
pub struct PrepareArgs {
    /// Where documents come from: builtin (generated, no network), climbmix (the original's
    /// shards, downloaded) or dir:PATH (.txt, .jsonl, .parquet files).
    #[arg(long, default_value = "climbmix")]
    source: Source,
    /// Evaluation constants and scale: h100 (the original) or tiny (CPU, seconds).
    #[arg(long, env = "AUTORESEARCH_PRESET", default_value = "h100")]
    preset: Preset,
    /// Climbmix training shards to download; the validation shard comes on top.
    #[arg(long, default_value_t = 10)]
    num_shards: usize,
    /// Parallel downloads.
    #[arg(long, default_value_t = 8)]
    download_workers: usize,
    /// Base URL of the climbmix shards, for mirrors.
    #[arg(long, env = "AUTORESEARCH_BASE_URL", default_value = prepare::download::DEFAULT_BASE_URL)]
    base_url: String,
    /// Size of the builtin corpus's training split, in MB.
    #[arg(long, default_value_t = 4.0)]
    builtin_mb: f64,
    /// Seed of the builtin corpus.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Data cache [default: $AUTORESEARCH_CACHE or ~/.cache/autoresearch].
    #[arg(long)]
    cache: Option<PathBuf>,
    /// Rebuild even when the data is in place.
    #[arg(long)]
    force: bool,
}

pub fn run(args: PrepareArgs) -> Result<()> {
    let cache = crate::cache_dir(args.cache);
    let mut opts = PrepareOptions::new(cache.clone(), args.source, args.preset);
    opts.num_shards = args.num_shards;
    opts.builtin_mb = args.builtin_mb;
    opts.seed = args.seed;
    opts.force = args.force;
    opts.download = DownloadOptions {
        base_url: args.base_url,
        workers: args.download_workers,
        ..DownloadOptions::default()
    };
    tracing::info!("cache: {}", cache.display());
    match prepare::pipeline::prepare(&opts)? {
        Outcome::UpToDate(data) => {
            println!(
                "Everything is in place for source {} and preset {}: nothing to do.",
                data.manifest.source,
                data.preset().name
            );
            print_summary(&data);
        }
        Outcome::Prepared(data, stats) => {
            let secs = |d: Duration| d.as_secs_f64();
            println!(
                "Prepared {:.1} MB of text: download {:.1}s, tokenizer {:.1}s, encoding {:.1}s.",
                stats.text_bytes as f64 / 1e6,
                secs(stats.download),
                secs(stats.tokenizer),
                secs(stats.encode)
            );
            print_summary(&data);
        }
    }
    println!("Next: `autoresearch train` runs one experiment on this data.");
    Ok(())
}

fn print_summary(data: &Dataset) {
    let m = &data.manifest;
    let sum = |s: &[prepare::manifest::ShardInfo]| {
        (
            s.iter().map(|s| s.docs).sum::<u64>(),
            s.iter().map(|s| s.tokens).sum::<u64>(),
        )
    };
    let (train_docs, train_tokens) = sum(&m.train);
    let (val_docs, val_tokens) = sum(&m.val);
    println!("  cache:      {}", data.cache.display());
    println!(
        "  tokenizer:  {} of {} ids used, BOS = {}",
        m.tokenizer.vocab_used, m.preset.vocab_size, m.tokenizer.bos_id
    );
    println!(
        "  train:      {train_docs} documents, {train_tokens} tokens in {} shard(s)",
        m.train.len()
    );
    println!("  validation: {val_docs} documents, {val_tokens} tokens");
    println!(
        "  evaluation: {} tokens at seq len {}, digest {}",
        m.eval.tokens,
        m.preset.seq_len,
        &m.eval.digest[..16]
    );
}

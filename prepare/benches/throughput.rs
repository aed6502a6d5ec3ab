//! Throughput of the data path, printed as a table for BENCHMARKS.md:
//! loader packing (tokens/s, one core) and tokenizer encoding (MB/s, one thread and all cores).
//!
//! `cargo bench -p prepare --features build`; set `TIKTOKEN_RANKS` to write the trained
//! tokenizer's ranks and the benchmark text for the Python `tiktoken` comparison
//! (`scripts/tiktoken_bench.py`).

use std::time::Instant;

use prepare::pipeline::{Outcome, PrepareOptions, prepare};
use prepare::sources::Source;
use prepare::tokenizer::Tokenizer;
use prepare::{Loader, Preset, Split};

fn main() {
    let cache = tempfile::tempdir().unwrap();
    println!("| benchmark | setting | result |");
    println!("|---|---|---|");
    for preset in [Preset::tiny(), Preset::h100()] {
        let mut opts = PrepareOptions::new(
            cache.path().join(&preset.name),
            Source::Builtin,
            preset.clone(),
        );
        opts.builtin_mb = 20.0;
        let data = match prepare(&opts).unwrap() {
            Outcome::Prepared(d, _) | Outcome::UpToDate(d) => d,
        };
        // Batch shapes the train file uses: h100 rows of 2048, tiny rows of 256.
        let batch = if preset.name == "h100" { 64 } else { 32 };
        let mut loader = Loader::new(&data, Split::Train, batch, preset.seq_len, Some(1)).unwrap();
        let mut tokens = 0usize;
        let t = Instant::now();
        while t.elapsed().as_secs_f64() < 3.0 {
            tokens += loader.next_host_batch().unwrap().inputs.len();
        }
        let rate = tokens as f64 / t.elapsed().as_secs_f64();
        println!(
            "| loader packing | preset {}, B={batch}, T={} | {:.1} M tokens/s |",
            preset.name,
            preset.seq_len,
            rate / 1e6
        );
    }

    let tokenizer = Tokenizer::load(&cache.path().join("h100/tokenizer/tokenizer.json")).unwrap();
    let docs = prepare::builtin::documents(99, Split::Val, 8_000_000);
    let bytes: usize = docs.iter().map(String::len).sum();
    let t = Instant::now();
    let mut n_tokens = 0;
    for d in &docs {
        n_tokens += tokenizer.encode(d).unwrap().len();
    }
    let single = bytes as f64 / t.elapsed().as_secs_f64() / 1e6;
    let t = Instant::now();
    let batch = tokenizer.encode_batch(&docs).unwrap();
    let parallel = bytes as f64 / t.elapsed().as_secs_f64() / 1e6;
    assert_eq!(batch.iter().map(Vec::len).sum::<usize>(), n_tokens);
    println!(
        "| tokenizer encode | vocab 8192, builtin text, {:.1} MB, {:.2} bytes/token | {single:.1} MB/s one thread, {parallel:.1} MB/s all {} cores |",
        bytes as f64 / 1e6,
        bytes as f64 / n_tokens as f64,
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    if let Ok(out) = std::env::var("TIKTOKEN_RANKS") {
        let out = std::path::Path::new(&out);
        std::fs::create_dir_all(out).unwrap();
        std::fs::copy(
            cache.path().join("h100/tokenizer/tokenizer.json"),
            out.join("tokenizer.json"),
        )
        .unwrap();
        std::fs::write(out.join("text.txt"), docs.join("\n")).unwrap();
        std::fs::write(out.join("tokens.txt"), n_tokens.to_string()).unwrap();
    }
}

//! The research target: the one file the agent edits.
//!
//! PLACEHOLDER until the GPT baseline lands: a bigram model (next token from the current one)
//! that exercises the whole train contract: prepared data, the packing loader, the budget
//! clock, the fixed evaluator and the run report.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::{AdamW, Optimizer, ParamsAdamW, VarBuilder, VarMap};
use prepare::eval::per_token_cross_entropy;
use prepare::{BudgetClock, Dataset, Loader, RunReport, Split, Summary, env};

// Hyperparameters.
const BATCH_SIZE: usize = 16;
const LEARNING_RATE: f64 = 0.05;
const EVAL_BATCH_SIZE: usize = 16;

fn env_or<T: std::str::FromStr>(key: &str, default: T) -> T {
    std::env::var(key)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() -> Result<()> {
    let start = Instant::now();
    let data = Dataset::from_env()?;
    let preset = data.preset().clone();
    let device = match std::env::var(env::DEVICE).as_deref() {
        Ok("cuda") => Device::new_cuda(0)
            .context("AUTORESEARCH_DEVICE=cuda needs a build with --features cuda")?,
        _ => Device::Cpu,
    };
    let budget = Duration::from_secs_f64(env_or(env::TIME_BUDGET, preset.time_budget_s as f64));
    let seed: u64 = env_or(env::SEED, 42);
    let vocab = data.vocab_size();

    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &device);
    let logits_table = vb.get_with_hints((vocab, vocab), "bigram", candle_nn::Init::Const(0.0))?;
    let forward = |x: &Tensor| -> candle_core::Result<Tensor> {
        let (b, t) = x.dims2()?;
        logits_table
            .index_select(&x.flatten_all()?, 0)?
            .reshape((b, t, vocab))
    };
    let mut opt = AdamW::new(
        varmap.all_vars(),
        ParamsAdamW {
            lr: LEARNING_RATE,
            weight_decay: 0.0,
            ..Default::default()
        },
    )?;

    let mut loader =
        Loader::new(&data, Split::Train, BATCH_SIZE, preset.seq_len, Some(seed))?.prefetch(4);
    let mut clock = BudgetClock::new(budget);
    let mut tokens = 0u64;
    while !clock.exhausted() {
        clock.begin_step();
        let (x, y) = loader.next_batch(&device)?;
        let loss = per_token_cross_entropy(&forward(&x)?, &y)?.mean_all()?;
        opt.backward_step(&loss)?;
        let loss = loss.to_scalar::<f32>()?;
        let dt = clock.end_step();
        tokens += (BATCH_SIZE * preset.seq_len) as u64;
        if !loss.is_finite() || loss > 100.0 {
            println!("FAIL: loss {loss} at step {}", clock.steps());
            std::process::exit(1);
        }
        if clock.steps().is_multiple_of(50) {
            println!(
                "step {:05} ({:5.1}%) | loss {loss:.4} | dt {:.0}ms | remaining {:.0}s",
                clock.steps(),
                100.0 * clock.progress(),
                dt.as_secs_f64() * 1e3,
                clock.remaining().as_secs_f64()
            );
        }
    }

    let result = prepare::evaluate_bpb(&data, &device, EVAL_BATCH_SIZE, |x, y| {
        per_token_cross_entropy(&forward(x)?, y)
    })?;
    RunReport {
        summary: Summary {
            val_bpb: result.val_bpb,
            training_seconds: clock.training_time().as_secs_f64(),
            total_seconds: start.elapsed().as_secs_f64(),
            peak_vram_mb: 0.0,
            mfu_percent: 0.0,
            total_tokens_m: tokens as f64 / 1e6,
            num_steps: clock.steps(),
            num_params_m: (vocab * vocab) as f64 / 1e6,
            depth: 0,
        },
        eval: result.spec,
        preset: preset.name,
        device: if device.is_cuda() {
            "cuda".into()
        } else {
            "cpu".into()
        },
    }
    .emit()?;
    Ok(())
}

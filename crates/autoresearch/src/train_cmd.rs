use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use runner::{Device, Experiment, Outcome};

#[derive(Args)]
pub struct TrainArgs {
    /// Training budget in seconds [default: the prepared preset's].
    #[arg(long)]
    budget: Option<f64>,
    /// cpu, cuda, or auto (cuda when `nvidia-smi` finds a GPU).
    #[arg(long, default_value = "auto")]
    device: String,
    /// The preset the data must have been prepared for [default: whichever was].
    #[arg(long, env = "AUTORESEARCH_PRESET")]
    preset: Option<String>,
    /// Data cache [default: $AUTORESEARCH_CACHE or ~/.cache/autoresearch].
    #[arg(long)]
    cache: Option<PathBuf>,
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Run this train binary, built elsewhere, instead of building the train file: the GPU
    /// bundle's check of the harness on a machine with no Rust (`scripts/gpu-run.sh harness`).
    #[arg(long, value_name = "PATH", hide = true)]
    prebuilt: Option<PathBuf>,
    #[command(flatten)]
    sandbox: crate::SandboxArgs,
}

/// A bar for one experiment: building, then training progress and loss from the step lines.
pub fn training_bar() -> ProgressBar {
    let bar = ProgressBar::new(1000).with_style(
        ProgressStyle::with_template("{spinner} [{bar:30}] {percent:>3}% {msg}")
            .expect("a valid template")
            .progress_chars("=> "),
    );
    bar.set_message("building");
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
}

/// Moves the bar on a line the train binary printed.
pub fn show_training_line(bar: &ProgressBar, line: &str) {
    // Step lines: "step 00012 (41.3%) | loss: 2.1 | …".
    if let Some(rest) = line.strip_prefix("step ") {
        if let Some(pct) = rest
            .split('(')
            .nth(1)
            .and_then(|r| r.split('%').next())
            .and_then(|p| p.parse::<f64>().ok())
        {
            bar.set_position((pct * 10.0) as u64);
        }
        let loss = rest.split(" | ").nth(1).unwrap_or_default();
        bar.set_message(loss.to_string());
    } else if line.starts_with("---") {
        bar.set_position(1000);
        bar.set_message("evaluating");
    }
}

/// `--device`: cpu, cuda, or auto (cuda when `nvidia-smi` finds a GPU).
pub fn parse_device(s: &str) -> Result<Device> {
    Ok(match s {
        "auto" => Device::detect(),
        "cpu" => Device::Cpu,
        "cuda" => Device::Cuda,
        other => bail!("--device must be cpu, cuda or auto, not `{other}`"),
    })
}

/// The repository holding the train file: the current directory or one above it.
pub fn find_repo() -> Result<PathBuf> {
    let cwd = std::env::current_dir()?;
    cwd.ancestors()
        .find(|d| d.join(runner::TRAIN_FILE).is_file() && d.join("Cargo.toml").is_file())
        .map(Path::to_path_buf)
        .with_context(|| {
            format!(
                "no {} in {} or above: run this inside an autoresearch checkout",
                runner::TRAIN_FILE,
                cwd.display()
            )
        })
}

pub fn run(args: TrainArgs) -> Result<()> {
    let repo = find_repo()?;
    let cache = crate::cache_dir(args.cache);
    let data = prepare::Dataset::open(&cache)?;
    if let Some(preset) = &args.preset {
        data.expect_preset(preset)?;
    }
    let device = parse_device(&args.device)?;
    let budget = Duration::from_secs_f64(args.budget.unwrap_or(data.preset().time_budget_s as f64));
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let mut exp = Experiment::new(&repo, &cache, device, budget);
    exp.seed = args.seed;
    exp.prebuilt = args.prebuilt;
    exp.sandbox = !args.sandbox.no_sandbox;
    exp.limits = args.sandbox.limits();
    exp.sandbox_allow = args.sandbox.sandbox_allow;
    exp.run_dir = repo.join("runs").join("train").join("work");
    exp.log_path = repo
        .join("runs")
        .join("train")
        .join("logs")
        .join(format!("{stamp}.log"));
    println!(
        "Building and running {} on {} (preset {}, budget {:.0}s); log: {}",
        runner::TRAIN_FILE,
        device.as_str(),
        data.preset().name,
        budget.as_secs_f64(),
        exp.log_path.display()
    );

    let bar = training_bar();
    let verdict = runner::run(&exp, &mut |line| show_training_line(&bar, line))?;
    bar.finish_and_clear();

    println!(
        "outcome: {} (build {:.1}s, run {:.1}s)",
        verdict.outcome.as_str(),
        verdict.build_seconds,
        verdict.run_seconds
    );
    if let Some(report) = &verdict.report {
        print!("{}", report.summary.to_block());
    }
    if verdict.outcome != Outcome::Ok {
        println!("{}", verdict.evidence);
    }
    println!("log: {}", verdict.log_path.display());
    if verdict.outcome != Outcome::Ok {
        bail!("the experiment ended in {}", verdict.outcome.as_str());
    }
    Ok(())
}

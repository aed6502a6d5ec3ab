//! `autoresearch`: a thin CLI over the library crates.

use std::path::PathBuf;

use anyhow::Result;
use clap::{Parser, Subcommand};

mod agent_cmd;
mod clock;
mod prepare_cmd;
mod review_cmd;
mod run_cmd;
mod train_cmd;

#[derive(Parser)]
#[command(
    name = "autoresearch",
    version,
    about = "An LLM does ML research overnight: propose a change to train/src/main.rs, train five minutes, keep or revert"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Make the data: download or generate documents, train the tokenizer, encode both splits.
    Prepare(prepare_cmd::PrepareArgs),
    /// Build train/ and run it once on the prepared data, under the harness's clock and checks.
    Train(train_cmd::TrainArgs),
    /// The research loop: a proposer changes train/src/main.rs, each change is trained and kept
    /// or reverted as a git commit on branch autoresearch/TAG.
    Run(Box<run_cmd::RunArgs>),
    /// The whole loop on CPU with builtin data and the sweep proposer, in a temporary copy of
    /// the repository (a few minutes, no API key).
    Demo(run_cmd::DemoArgs),
    /// The kept experiments of a session, with their gains, and its totals.
    Log(review_cmd::LogArgs),
    /// Every experiment of a session, or of any results.tsv.
    Results(review_cmd::ResultsArgs),
    /// One experiment by hash: outcome, figures, diff against its parent, log tail.
    Show(review_cmd::ShowArgs),
    /// Runs one experiment again by hash, in a temporary worktree, and reports the drift.
    Replay(review_cmd::ReplayArgs),
    /// Draws a session's (or a results.tsv's) progress as a PNG.
    Plot(review_cmd::PlotArgs),
    /// Writes runs/TAG/report.html: the morning review as one self-contained page (chart, kept
    /// chain with diffs, every experiment, totals, replay commands).
    Report(review_cmd::ReportArgs),
    /// A session at a glance: what runs and for how long, the best, the last outcomes, the
    /// pace and the spend (read-only: it never disturbs the run).
    Status(review_cmd::StatusArgs),
    /// Runs one experiment on this node from its JSON spec and writes the verdict: what a
    /// Slurm job of `run --executor slurm` does.
    #[command(hide = true)]
    JobRun { spec: PathBuf, verdict: PathBuf },
}

/// The data cache: `--cache`, else `$AUTORESEARCH_CACHE`, else `~/.cache/autoresearch`.
/// How experiments are confined: shared by `run` and `train`.
#[derive(clap::Args)]
struct SandboxArgs {
    /// Run experiments unconfined (no Landlock, no seccomp filter, no caps on tasks or memory:
    /// reads, writes and the network open; the environment is still scrubbed, the tracked files
    /// still guarded, and no process of a run outlives it).
    #[arg(long)]
    no_sandbox: bool,
    /// Let experiments read PATH too (repeatable): a GPU stack the sandbox does not know.
    #[arg(long, value_name = "PATH")]
    sandbox_allow: Vec<PathBuf>,
    /// Tasks (processes and threads) one run may have at once; 0 for no cap [default: 256 + 64
    /// per CPU].
    #[arg(long, value_name = "N")]
    max_run_tasks: Option<u64>,
    /// Memory each process of a run may map, in GiB (address space on CPU, data on CUDA); 0 for
    /// no cap [default: three quarters of the machine's memory].
    #[arg(long, value_name = "GIB")]
    max_run_memory: Option<f64>,
}

impl SandboxArgs {
    fn limits(&self) -> runner::Limits {
        let machine = runner::Limits::for_machine();
        runner::Limits {
            tasks: self.max_run_tasks.unwrap_or(machine.tasks),
            memory: self
                .max_run_memory
                .map_or(machine.memory, |gib| (gib * (1u64 << 30) as f64) as u64),
        }
    }
}

fn cache_dir(flag: Option<PathBuf>) -> PathBuf {
    flag.unwrap_or_else(prepare::default_cache_dir)
}

fn main() -> std::process::ExitCode {
    // Runs are the same user: without this they could read the API key from
    // /proc/<harness>/environ. Children are dumpable again after exec; only we are hidden.
    // SAFETY: a plain prctl on our own process.
    unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_target(false)
        .without_time()
        .init();
    let cli = Cli::parse();
    let result: Result<()> = match cli.command {
        Command::Prepare(args) => prepare_cmd::run(args),
        Command::Train(args) => train_cmd::run(args),
        Command::Run(args) => run_cmd::run(*args),
        Command::Demo(args) => run_cmd::demo(args),
        Command::Log(args) => review_cmd::log(args),
        Command::Results(args) => review_cmd::results(args),
        Command::Show(args) => review_cmd::show(args),
        Command::Replay(args) => review_cmd::replay(args),
        Command::Plot(args) => review_cmd::plot(args),
        Command::Report(args) => review_cmd::report(args),
        Command::Status(args) => review_cmd::status(args),
        Command::JobRun { spec, verdict } => {
            session::install_interrupt_handler();
            runner::slurm::run_job(&spec, &verdict).map_err(Into::into)
        }
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

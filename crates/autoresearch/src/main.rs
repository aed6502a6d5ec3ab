//! `autoresearch`: a thin CLI over the library crates.

use std::path::PathBuf;

use anyhow::Result;
use clap::{Parser, Subcommand};

mod prepare_cmd;
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
}

/// The data cache: `--cache`, else `$AUTORESEARCH_CACHE`, else `~/.cache/autoresearch`.
fn cache_dir(flag: Option<PathBuf>) -> PathBuf {
    flag.unwrap_or_else(prepare::default_cache_dir)
}

fn main() -> std::process::ExitCode {
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
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

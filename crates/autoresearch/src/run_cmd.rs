//! `autoresearch run` (the loop) and `autoresearch demo` (the loop on the embedded default, in a
//! temporary copy of the repository).

use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result, bail};
use clap::Args;
use indicatif::ProgressBar;
use runner::Device;
use session::{Progress, Settings, Stop};

use crate::train_cmd::{find_repo, parse_device, show_training_line, training_bar};

#[derive(Args)]
pub struct RunArgs {
    /// Session name: branch autoresearch/TAG, results in runs/TAG [default: today, e.g. nov23].
    #[arg(long)]
    tag: Option<String>,
    /// Who proposes the experiments: `llm` (a model through --provider), or `sweep` (one
    /// hyperparameter step at a time, no LLM, no key).
    #[arg(long, default_value = "llm")]
    agent: String,
    #[command(flatten)]
    llm: crate::agent_cmd::LlmArgs,
    /// Stop once the session holds this many experiments (the baseline counts).
    #[arg(long)]
    max_experiments: Option<usize>,
    /// Start no experiment after this: a local time HH:MM, or a duration like 8h or 90m.
    #[arg(long)]
    until: Option<String>,
    /// Training budget per experiment in seconds [default: the prepared preset's].
    #[arg(long)]
    budget: Option<f64>,
    /// Go on with session TAG after Ctrl-C, a kill or a reboot [default TAG: the latest session].
    #[arg(long)]
    resume: bool,
    /// cpu, cuda, or auto (cuda when `nvidia-smi` finds a GPU).
    #[arg(long, default_value = "auto")]
    device: String,
    /// Data cache [default: $AUTORESEARCH_CACHE or ~/.cache/autoresearch].
    #[arg(long)]
    cache: Option<PathBuf>,
    /// The session's seed: the baseline's first run gets it, every other run one derived from it.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    #[command(flatten)]
    keep: KeepArgs,
    #[command(flatten)]
    sandbox: crate::SandboxArgs,
}

pub fn run(args: RunArgs) -> Result<()> {
    let repo = find_repo()?;
    let tag = match (&args.tag, args.resume) {
        (Some(tag), _) => tag.clone(),
        (None, true) => ledger::list_sessions(&repo).pop().context(
            "no session to resume in runs/: start one with `autoresearch run --tag NAME`",
        )?,
        (None, false) => crate::clock::today_tag(),
    };
    let settings = Settings {
        target_dir: session::default_target_dir(&repo),
        repo,
        tag,
        cache: crate::cache_dir(args.cache),
        device: parse_device(&args.device)?,
        budget: args.budget.map(Duration::from_secs_f64),
        seed: args.seed,
        keep: args.keep.settings()?,
        sandbox: !args.sandbox.no_sandbox,
        sandbox_allow: args.sandbox.sandbox_allow.clone(),
        limits: args.sandbox.limits(),
        max_experiments: args.max_experiments,
        until: args
            .until
            .as_deref()
            .map(crate::clock::parse_until)
            .transpose()?,
        max_cost: None,
        resume: args.resume,
    };
    let config = crate::agent_cmd::Config::load(&settings.repo)?;
    let mut settings = settings;
    settings.max_cost = args.llm.max_cost.or(config.agent.max_cost);
    let mut proposer = proposer(&args.agent, &args.llm, &config, &settings.repo)?;
    let stop = run_session(&settings, proposer.as_mut())?;
    println!();
    crate::review_cmd::print_log(&settings.repo, &settings.tag)?;
    // The morning's page, ready when the user comes back; a failure here loses nothing.
    match crate::review_cmd::write_report(&settings.repo, &settings.tag, None) {
        Ok(page) => println!("\nReport: {}", page.display()),
        Err(e) => {
            tracing::warn!("the report was not written ({e:#}): `autoresearch report` retries")
        }
    }
    println!(
        "\nNext: `autoresearch report --tag {0} --open` opens it, `autoresearch show HASH` shows one experiment, `autoresearch run --tag {0} --resume` goes on.",
        settings.tag
    );
    if stop == Stop::Interrupted {
        // The shell's convention for a run stopped by SIGINT.
        std::process::exit(130);
    }
    Ok(())
}

fn proposer(
    name: &str,
    llm: &crate::agent_cmd::LlmArgs,
    config: &crate::agent_cmd::Config,
    repo: &std::path::Path,
) -> Result<Box<dyn workbench::Proposer>> {
    match name {
        "sweep" => Ok(Box::new(workbench::sweep::Sweep)),
        "llm" => Ok(Box::new(crate::agent_cmd::build(llm, config, repo)?)),
        other => bail!("unknown --agent `{other}`: use `llm` (a model) or `sweep` (no LLM)"),
    }
}

/// Runs the loop with a line per experiment and a bar for the one in progress.
fn run_session(settings: &Settings, proposer: &mut dyn workbench::Proposer) -> Result<Stop> {
    session::install_interrupt_handler();
    println!(
        "Session {} ({}) in {}: branch autoresearch/{}, results in runs/{}/. Ctrl-C stops cleanly.",
        settings.tag,
        if settings.resume { "resumed" } else { "new" },
        settings.repo.display(),
        settings.tag,
        settings.tag
    );
    let mut bar: Option<ProgressBar> = None;
    let stop = session::run(settings, proposer, &mut |p| match p {
        Progress::Started(begin) => {
            println!(
                "#{:<3} {}  {}",
                begin.index,
                &begin.hash[..7],
                begin.description
            );
            bar = Some(training_bar());
        }
        Progress::Line(line) => {
            if let Some(b) = &bar {
                show_training_line(b, line);
            }
        }
        Progress::Again { run, why } => {
            if let Some(b) = bar.take() {
                b.finish_and_clear();
            }
            let val = run
                .finish
                .val_bpb
                .map_or_else(|| "-".to_string(), |v| format!("{v:.6}"));
            println!("     .. run {} val_bpb {val}: {why}", run.run + 1);
            bar = Some(training_bar());
        }
        Progress::Finished(record) => {
            if let Some(b) = bar.take() {
                b.finish_and_clear();
            }
            let end = record.end.as_ref().expect("finished");
            let val = end
                .finish
                .val_bpb
                .map_or_else(|| "-".to_string(), |v| format!("{v:.6}"));
            let noise = match &end.judgement {
                Some(j) if j.runs > 1 || j.gain_sigma.is_some() => format!(
                    "{} run{}{}; ",
                    j.runs,
                    if j.runs == 1 { "" } else { "s" },
                    j.gain_sigma
                        .map_or_else(String::new, |g| format!(", {g:+.1} σ"))
                ),
                _ => String::new(),
            };
            println!(
                "     -> {:<7} val_bpb {val}  ({noise}{}; build {:.0}s, run {:.0}s)",
                end.status.as_str(),
                end.finish.outcome,
                end.finish.build_seconds,
                end.finish.run_seconds
            );
            if end.finish.outcome != "ok" && end.finish.outcome != "interrupted" {
                let first = end.finish.evidence.lines().next().unwrap_or_default();
                println!("        {first}");
            }
        }
        Progress::Abandoned(why) => println!("     -> abandoned: {why}"),
    })?;
    if let Some(b) = bar.take() {
        b.finish_and_clear();
    }
    match &stop {
        Stop::MaxExperiments => println!("Stopped: --max-experiments reached."),
        Stop::Until => println!("Stopped: --until reached."),
        Stop::MaxCost => println!("Stopped: --max-cost reached."),
        Stop::Interrupted => println!(
            "Interrupted: the train file is back to the kept state. `autoresearch run --tag {} --resume` goes on.",
            settings.tag
        ),
        Stop::Exhausted(why) => println!("Stopped: {why}."),
    }
    Ok(stop)
}

/// How experiments are kept (fixed when a session starts; a resumed session keeps its own).
#[derive(Args)]
pub struct KeepArgs {
    /// `noise`: measure the seed noise σ, keep clear wins at once, re-run close calls with other
    /// seeds and decide on the mean; `strict`: the original's rule, one run kept when below
    /// the best.
    #[arg(long, default_value = "noise")]
    keep_rule: String,
    /// Runs of the baseline, each with its own seed: the first measure of σ [default: 3 for
    /// noise, 1 for strict].
    #[arg(long)]
    baseline_runs: Option<usize>,
    /// Runs an experiment may take when too close to call, the first included.
    #[arg(long, default_value_t = ledger::Margins::default().max_runs)]
    max_runs: usize,
    /// Kept at once when better than the best by this many standard errors.
    #[arg(long, default_value_t = ledger::Margins::default().win)]
    win_margin: f64,
    /// Discarded at once when better by less than this many standard errors.
    #[arg(long, default_value_t = ledger::Margins::default().loss)]
    loss_margin: f64,
    /// After the last run: kept when better by this many standard errors on the mean.
    #[arg(long, default_value_t = ledger::Margins::default().confirm)]
    confirm_margin: f64,
}

impl KeepArgs {
    fn settings(&self) -> Result<ledger::KeepSettings> {
        let mut k = match self.keep_rule.as_str() {
            "noise" => ledger::KeepSettings::default(),
            "strict" => {
                return Ok(ledger::KeepSettings {
                    baseline_runs: self.baseline_runs.unwrap_or(1),
                    ..ledger::KeepSettings::strict()
                });
            }
            other => bail!(
                "unknown --keep-rule `{other}`: use `noise` (the default) or `strict` (the original's)"
            ),
        };
        k.baseline_runs = self.baseline_runs.unwrap_or(k.baseline_runs);
        k.margins = ledger::Margins {
            win: self.win_margin,
            loss: self.loss_margin,
            confirm: self.confirm_margin,
            max_runs: self.max_runs,
        };
        if k.baseline_runs == 0 || k.margins.max_runs == 0 {
            bail!("--baseline-runs and --max-runs count runs: give 1 or more");
        }
        if !(k.margins.loss <= k.margins.confirm && k.margins.confirm <= k.margins.win) {
            bail!(
                "the margins must satisfy --loss-margin <= --confirm-margin <= --win-margin (got {}, {}, {})",
                k.margins.loss,
                k.margins.confirm,
                k.margins.win
            );
        }
        Ok(k)
    }
}

#[derive(Args)]
pub struct DemoArgs {
    /// Experiments in the demo session (the baseline counts).
    #[arg(long, default_value_t = 5)]
    experiments: usize,
    /// Training budget per experiment in seconds.
    #[arg(long, default_value_t = 15.0)]
    budget: f64,
    /// Where the copy of the repository goes [default: a new directory under the temp dir].
    #[arg(long)]
    dir: Option<PathBuf>,
}

/// The whole loop on the embedded default: builtin data, tiny preset, CPU, the sweep proposer,
/// in a copy of the repository so the user's tree is untouched.
pub fn demo(args: DemoArgs) -> Result<()> {
    let repo = find_repo()?;
    let stamp = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let dir = args
        .dir
        .unwrap_or_else(|| std::env::temp_dir().join(format!("autoresearch-demo-{stamp}")));
    println!("Copying the repository's HEAD to {} ...", dir.display());
    ledger::clone_local(&repo, &dir)?;

    // The demo's data lives apart from the user's, so a prepared h100 set is never replaced.
    let cache = prepare::default_cache_dir().join("demo");
    let opts = prepare::pipeline::PrepareOptions::new(
        cache.clone(),
        prepare::sources::Source::Builtin,
        prepare::Preset::tiny(),
    );
    match prepare::pipeline::prepare(&opts)? {
        prepare::pipeline::Outcome::UpToDate(_) => {
            println!("Builtin data ready in {}.", cache.display())
        }
        prepare::pipeline::Outcome::Prepared(..) => {
            println!("Prepared the builtin data in {}.", cache.display())
        }
    }
    let settings = Settings {
        // Experiments build into the original repository's target dir: candle compiles once.
        target_dir: session::default_target_dir(&repo),
        repo: dir.clone(),
        tag: "demo".into(),
        cache,
        device: Device::Cpu,
        budget: Some(Duration::from_secs_f64(args.budget)),
        seed: 42,
        keep: ledger::KeepSettings::default(),
        sandbox: true,
        sandbox_allow: Vec::new(),
        limits: runner::Limits::for_machine(),
        max_experiments: Some(args.experiments),
        until: None,
        max_cost: None,
        resume: false,
    };
    run_session(&settings, &mut workbench::sweep::Sweep)?;
    println!();
    crate::review_cmd::print_log(&dir, "demo")?;
    let png = dir.join("runs/demo/progress.png");
    crate::review_cmd::plot_session(&dir, "demo", &png)?;
    let page = crate::review_cmd::write_report(&dir, "demo", None)?;
    println!("\nPlot: {}\nReport: {}", png.display(), page.display());
    println!(
        "The demo's repository is {}: `cd` there and try `autoresearch results`, `autoresearch show HASH`, `autoresearch replay HASH`.",
        dir.display()
    );
    println!(
        "Next, for real: `autoresearch prepare` (climbmix, h100) and `autoresearch run` on a GPU box."
    );
    Ok(())
}

//! `autoresearch run` (the loop) and `autoresearch demo` (the loop on the embedded default, in a
//! temporary copy of the repository).

use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result, bail};
use clap::Args;
use std::collections::HashMap;
use std::sync::Mutex;

use indicatif::{MultiProgress, ProgressBar};
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
    /// Where experiments run: `local` (on this machine) or `slurm` (each run a Slurm job, as
    /// `[slurm]` in autoresearch.toml says; --workers jobs at once) [default: local, or on
    /// --resume what the session used].
    #[arg(long)]
    executor: Option<String>,
    /// Experiments at once: on the CPU each with an equal share of the cores, with `--executor
    /// slurm` jobs at once [default: 1, or on --resume what the session used].
    #[arg(long)]
    workers: Option<usize>,
    /// GPUs to use, one experiment on each at once: `CUDA_VISIBLE_DEVICES` numbers such as
    /// 0,1,2,3 [default with --device cuda: every GPU the machine shows].
    #[arg(long, value_delimiter = ',')]
    gpus: Option<Vec<String>>,
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
    // A resumed session goes on as it ran: its device, executor and workers, unless told.
    let before = if args.resume {
        ledger::Session::load(&repo, &tag).ok()
    } else {
        None
    };
    let device = match &before {
        Some(s) if s.meta.device == "cuda" => Device::Cuda,
        Some(_) => Device::Cpu,
        None => parse_device(&args.device)?,
    };
    let attached = before.as_ref().and_then(|s| s.attached.clone());
    let executor = args
        .executor
        .clone()
        .or_else(|| attached.as_ref().and_then(|a| a.executor.clone()))
        .unwrap_or_else(|| "local".into());
    let workers_flag = args.workers.or_else(|| {
        // On CUDA the GPUs the machine shows decide, unless --gpus or --workers says.
        let cpu_or_cluster = device == Device::Cpu || executor == "slurm";
        attached
            .as_ref()
            .and_then(|a| a.workers)
            .filter(|_| cpu_or_cluster)
    });
    let settings = Settings {
        target_dir: session::default_target_dir(&repo),
        gpus: Vec::new(),
        slurm: None,
        repo,
        tag,
        cache: crate::cache_dir(args.cache),
        device,
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
    let workers = match executor.as_str() {
        "local" => {
            settings.gpus = gpus(settings.device, workers_flag, args.gpus)?;
            match settings.device {
                Device::Cuda => settings.gpus.len().max(1),
                Device::Cpu => workers_flag.unwrap_or(1),
            }
        }
        "slurm" => {
            if args.gpus.is_some() {
                bail!(
                    "--gpus picks this machine's GPUs; with --executor slurm, Slurm places the jobs: set gpus_per_job under [slurm] in autoresearch.toml"
                );
            }
            let c = &config.slurm;
            settings.slurm = Some(runner::slurm::Slurm {
                job_dir: PathBuf::new(),
                harness: std::env::current_exe().context("finding the autoresearch binary")?,
                partition: c.partition.clone(),
                account: c.account.clone(),
                gpus_per_job: c
                    .gpus_per_job
                    .unwrap_or(u32::from(settings.device == Device::Cuda)),
                cpus_per_job: c.cpus_per_job,
                grace_minutes: c.grace_minutes.unwrap_or(5),
                sbatch_args: c.sbatch_args.clone(),
                poll: Duration::from_secs(2),
                node_limits: args.sandbox.max_run_tasks.is_none()
                    && args.sandbox.max_run_memory.is_none(),
            });
            match workers_flag {
                Some(0) => bail!("--workers counts experiments at once: give 1 or more"),
                w => w.unwrap_or(1),
            }
        }
        other => bail!("unknown --executor `{other}`: use `local` or `slurm`"),
    };
    let proposers = (0..workers)
        .map(|_| proposer(&args.agent, &args.llm, &config, &settings.repo))
        .collect::<Result<Vec<_>>>()?;
    let stop = run_session(&settings, proposers)?;
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

/// The GPUs a CUDA session runs on, one worker each: `--gpus`, else the first `--workers` of
/// those the machine shows, else all of them (said at the start).
fn gpus(
    device: Device,
    workers: Option<usize>,
    listed: Option<Vec<String>>,
) -> Result<Vec<String>> {
    if workers == Some(0) {
        bail!("--workers counts experiments at once: give 1 or more");
    }
    if device == Device::Cpu {
        if listed.is_some() {
            bail!(
                "--gpus is for --device cuda; on the CPU, --workers N runs N experiments at once"
            );
        }
        return Ok(Vec::new());
    }
    if let Some(listed) = listed {
        if listed.is_empty() || listed.iter().any(|g| g.trim().is_empty()) {
            bail!("--gpus takes a list of GPU numbers such as 0,1,2,3");
        }
        if workers.is_some_and(|w| w != listed.len()) {
            bail!(
                "--gpus runs one experiment on each GPU listed: drop --workers, or list that many GPUs"
            );
        }
        return Ok(listed);
    }
    let visible = visible_gpus();
    let mut chosen = visible.clone();
    if let Some(w) = workers {
        if w > visible.len() {
            bail!(
                "--workers {w} on CUDA needs {w} GPUs, and this machine shows {} ({}): give --workers {} or fewer",
                visible.len(),
                visible.join(","),
                visible.len()
            );
        }
        chosen.truncate(w);
    }
    if chosen.len() > 1 && workers.is_none() {
        println!(
            "Using all {} GPUs ({}), one experiment on each; --gpus picks others.",
            chosen.len(),
            chosen.join(",")
        );
    }
    Ok(chosen)
}

/// The GPUs this process may use: `CUDA_VISIBLE_DEVICES` when set, else those `nvidia-smi -L`
/// lists (at least one: a machine without it has one as far as CUDA is concerned).
fn visible_gpus() -> Vec<String> {
    if let Ok(list) = std::env::var("CUDA_VISIBLE_DEVICES")
        && !list.trim().is_empty()
    {
        return list.split(',').map(|g| g.trim().to_string()).collect();
    }
    let listed = std::process::Command::new("nvidia-smi")
        .arg("-L")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .filter(|l| l.starts_with("GPU "))
                .count()
        })
        .unwrap_or(0);
    (0..listed.max(1)).map(|i| i.to_string()).collect()
}

fn proposer(
    name: &str,
    llm: &crate::agent_cmd::LlmArgs,
    config: &crate::agent_cmd::Config,
    repo: &std::path::Path,
) -> Result<Box<dyn workbench::Proposer + Send>> {
    match name {
        "sweep" => Ok(Box::new(workbench::sweep::Sweep)),
        "llm" => Ok(Box::new(crate::agent_cmd::build(llm, config, repo)?)),
        other => bail!("unknown --agent `{other}`: use `llm` (a model) or `sweep` (no LLM)"),
    }
}

/// Runs the loop with a line per experiment and a bar for each one in progress; with several
/// workers, each line names its worker.
fn run_session(
    settings: &Settings,
    mut proposers: Vec<Box<dyn workbench::Proposer + Send>>,
) -> Result<Stop> {
    session::install_interrupt_handler();
    let n = proposers.len();
    println!(
        "Session {} ({}) in {}: branch autoresearch/{}, results in runs/{}/. Ctrl-C stops cleanly.",
        settings.tag,
        if settings.resume { "resumed" } else { "new" },
        settings.repo.display(),
        settings.tag,
        settings.tag
    );
    let screen = Screen {
        multi: MultiProgress::new(),
        bars: Mutex::new(HashMap::new()),
        prefix: n > 1,
    };
    let stop = if n == 1 {
        let proposer = proposers.pop().expect("one proposer");
        let mut proposer = proposer;
        session::run(settings, proposer.as_mut(), &mut |p| screen.show(0, p))?
    } else {
        session::run_workers(settings, proposers, &|k, p| screen.show(k, p))?
    };
    for (_, bar) in screen.bars.into_inner().unwrap_or_default() {
        bar.finish_and_clear();
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

/// The terminal during a session: a line per event, a bar per experiment in progress.
struct Screen {
    multi: MultiProgress,
    bars: Mutex<HashMap<usize, ProgressBar>>,
    /// Name the worker on each line (a session of several).
    prefix: bool,
}

impl Screen {
    fn say(&self, worker: usize, text: &str) {
        let line = if self.prefix {
            format!("[w{worker}] {text}")
        } else {
            text.to_string()
        };
        // `suspend` prints whether or not the bars are drawn (not on a pipe).
        self.multi.suspend(|| println!("{line}"));
    }

    fn new_bar(&self, worker: usize) {
        let bar = self.multi.add(training_bar());
        if self.prefix {
            bar.set_prefix(format!("w{worker}"));
        }
        if self.prefix {
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "{prefix} {spinner} [{bar:30}] {percent:>3}% {msg}",
                )
                .expect("a valid template")
                .progress_chars("=> "),
            );
        }
        if let Some(old) = self
            .bars
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(worker, bar)
        {
            old.finish_and_clear();
            self.multi.remove(&old);
        }
    }

    fn end_bar(&self, worker: usize) {
        if let Some(bar) = self
            .bars
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&worker)
        {
            bar.finish_and_clear();
            self.multi.remove(&bar);
        }
    }

    fn show(&self, worker: usize, p: Progress) {
        match p {
            Progress::Started(begin) => {
                self.say(
                    worker,
                    &format!(
                        "#{:<3} {}  {}",
                        begin.index,
                        &begin.hash[..7],
                        begin.description
                    ),
                );
                self.new_bar(worker);
            }
            Progress::Line(line) => {
                if let Some(b) = self
                    .bars
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .get(&worker)
                {
                    show_training_line(b, line);
                }
            }
            Progress::Again { run, why } => {
                self.end_bar(worker);
                let val = run
                    .finish
                    .val_bpb
                    .map_or_else(|| "-".to_string(), |v| format!("{v:.6}"));
                self.say(
                    worker,
                    &format!("     .. run {} val_bpb {val}: {why}", run.run + 1),
                );
                self.new_bar(worker);
            }
            Progress::Finished(record) => {
                self.end_bar(worker);
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
                let of = if self.prefix {
                    format!(" #{}", record.begin.index)
                } else {
                    String::new()
                };
                self.say(
                    worker,
                    &format!(
                        "    {of} -> {:<7} val_bpb {val}  ({noise}{}; build {:.0}s, run {:.0}s)",
                        end.status.as_str(),
                        end.finish.outcome,
                        end.finish.build_seconds,
                        end.finish.run_seconds
                    ),
                );
                if end.finish.outcome != "ok" && end.finish.outcome != "interrupted" {
                    let first = end.finish.evidence.lines().next().unwrap_or_default();
                    self.say(worker, &format!("        {first}"));
                }
            }
            Progress::Abandoned(why) => self.say(worker, &format!("     -> abandoned: {why}")),
        }
    }
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
        gpus: Vec::new(),
        slurm: None,
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
    run_session(&settings, vec![Box::new(workbench::sweep::Sweep)])?;
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

//! The morning review: `log`, `results`, `show`, `replay`, `plot`, `report`, `status`.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::Args;
use ledger::{Record, ResultRow, Session, Status};
use serde_json::json;

use crate::train_cmd::{find_repo, show_training_line, training_bar};

/// The session to review: `--tag`, else the one most recently active.
fn resolve_tag(repo: &Path, tag: Option<String>) -> Result<String> {
    match tag {
        Some(t) => Ok(t),
        None => ledger::list_sessions(repo).pop().context(
            "no session in runs/ yet: `autoresearch run --tag NAME` starts one, `autoresearch demo` shows the loop",
        ),
    }
}

#[derive(Args)]
pub struct LogArgs {
    /// Session [default: the latest].
    #[arg(long)]
    tag: Option<String>,
    #[arg(long)]
    json: bool,
}

struct Totals {
    experiments: usize,
    kept: usize,
    discarded: usize,
    crashed: usize,
}

fn totals(s: &Session) -> Totals {
    let count = |st| s.records.iter().filter(|r| r.status() == Some(st)).count();
    Totals {
        experiments: s.records.len(),
        kept: count(Status::Keep),
        discarded: count(Status::Discard),
        crashed: count(Status::Crash),
    }
}

pub fn log(args: LogArgs) -> Result<()> {
    let repo = find_repo()?;
    let tag = resolve_tag(&repo, args.tag)?;
    if args.json {
        let s = Session::load(&repo, &tag)?;
        let kept = s.kept();
        let baseline = kept.first().and_then(|r| r.val_bpb());
        let mut prev = None;
        let chain: Vec<_> = kept
            .iter()
            .map(|r| {
                let v = r.val_bpb();
                let row = json!({
                    "index": r.begin.index,
                    "hash": r.begin.hash,
                    "val_bpb": v,
                    "delta_prev": v.zip(prev).map(|(a, b)| a - b),
                    "delta_baseline": v.zip(baseline).map(|(a, b)| a - b),
                    "runs": r.values().len(),
                    "gain_sigma": gain_sigma(r),
                    "description": r.begin.description,
                    "finished_unix": r.end.as_ref().map(|e| e.finished_unix),
                });
                prev = v;
                row
            })
            .collect();
        let t = totals(&s);
        let best = s.best();
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({
                "session": s.meta,
                "kept": chain,
                "totals": {
                    "experiments": t.experiments, "kept": t.kept, "discarded": t.discarded,
                    "crashed": t.crashed,
                    "best_val_bpb": best.and_then(Record::val_bpb),
                    "best_hash": best.map(|r| r.begin.hash.clone()),
                    "cost_usd": cost(&s),
                    "tokens_in": tokens(&s, |f| f.tokens_in),
                    "tokens_cached": tokens(&s, |f| f.tokens_cached),
                    "tokens_out": tokens(&s, |f| f.tokens_out),
                },
                "noise": s.noise().map(|n| json!({"sigma": n.sigma, "dof": n.dof})),
            }))?
        );
        return Ok(());
    }
    print_log(&repo, &tag)
}

fn gain_sigma(r: &Record) -> Option<f64> {
    r.end.as_ref()?.judgement.as_ref()?.gain_sigma
}

fn cost(s: &Session) -> Option<f64> {
    let costs: Vec<f64> = s
        .records
        .iter()
        .filter_map(|r| r.end.as_ref()?.finish.cost_usd)
        .collect();
    (!costs.is_empty()).then(|| costs.iter().sum())
}

/// A token count summed over the session's experiments (`None` when none recorded one).
fn tokens(s: &Session, field: impl Fn(&ledger::journal::Finish) -> Option<u64>) -> Option<u64> {
    let counts: Vec<u64> = s
        .records
        .iter()
        .filter_map(|r| field(&r.end.as_ref()?.finish))
        .collect();
    (!counts.is_empty()).then(|| counts.iter().sum())
}

/// The kept chain and the session's totals, as a table.
pub fn print_log(repo: &Path, tag: &str) -> Result<()> {
    let s = Session::load(repo, tag)?;
    let m = &s.meta;
    println!(
        "Session {} ({}, preset {}, {}, {:.0}s budget): branch autoresearch/{}",
        m.tag, m.agent, m.preset, m.device, m.budget_s, m.tag
    );
    println!("  {}", session::describe_rule(&m.keep));
    match s.noise() {
        Some(n) => println!(
            "  seed noise σ = {:.6} per run ({} degrees of freedom, from every experiment run more than once)",
            n.sigma, n.dof
        ),
        None => println!("  seed noise: not measured (no experiment ran twice)"),
    }
    println!(
        "  {:>4}  {:<7}  {:>9}  {:>9}  {:>9}  {:>6}  {:>4}  {:>5}  description",
        "#", "commit", "val_bpb", "Δprev", "Δbase", "gain", "runs", "time"
    );
    // In the order they were kept: with several workers, not always the order they began.
    let mut kept = s.kept();
    kept.sort_by_key(|r| (r.end.as_ref().map(|e| e.finished_unix), r.begin.index));
    let baseline = kept.first().and_then(|r| r.val_bpb());
    let mut prev: Option<f64> = None;
    let mut prev_hash: Option<&str> = None;
    let delta = |a: Option<f64>, b: Option<f64>| match a.zip(b) {
        Some((a, b)) => format!("{:+.6}", a - b),
        None => "-".into(),
    };
    for r in &kept {
        let v = r.val_bpb();
        println!(
            "  {:>4}  {:<7}  {:>9}  {:>9}  {:>9}  {:>6}  {:>4}  {:>5}  {}",
            r.begin.index,
            r.short(),
            v.map_or("-".into(), |v| format!("{v:.6}")),
            delta(v, prev),
            delta(v, baseline),
            gain_sigma(r).map_or("-".into(), |g| format!("{g:+.1}σ")),
            r.values().len(),
            r.end
                .as_ref()
                .map_or("-".into(), |e| crate::clock::hh_mm(e.finished_unix)),
            r.begin.description
        );
        // Another worker's experiment was kept while this one ran: it began from an older
        // kept state, and the branch moved onto it all the same (a tree, not a chain).
        if let Some(h) = prev_hash.filter(|h| *h != r.begin.parent) {
            let from = s
                .records
                .iter()
                .find(|p| p.begin.hash == r.begin.parent)
                .map_or_else(
                    || r.begin.parent[..7].to_string(),
                    |p| format!("#{}", p.begin.index),
                );
            println!(
                "  {:>4}  began from {from}, not from {} (kept while it ran)",
                "",
                &h[..7]
            );
        }
        prev = v;
        prev_hash = Some(&r.begin.hash);
    }
    let t = totals(&s);
    let mut line = format!(
        "{} experiments: {} kept, {} discarded, {} crashed",
        t.experiments, t.kept, t.discarded, t.crashed
    );
    if let Some(best) = s.best() {
        let v = best.val_bpb().expect("best has a value");
        line += &format!("; best {v:.6} ({})", best.short());
        if let Some(b) = baseline {
            line += &format!(", {:+.2}% vs baseline", 100.0 * (v - b) / b);
        }
    }
    if let Some(c) = cost(&s) {
        line += &format!("; spent ${c:.2}");
    }
    if let Some(input) = tokens(&s, |f| f.tokens_in).filter(|&n| n > 0) {
        let cached = tokens(&s, |f| f.tokens_cached).unwrap_or(0);
        line += &format!(
            " ({input} input tokens, {:.0}% from the prompt cache; {} output)",
            100.0 * cached as f64 / input as f64,
            tokens(&s, |f| f.tokens_out).unwrap_or(0)
        );
    }
    match s.in_flight().len() {
        0 => {}
        1 => line += "; one experiment was interrupted (`autoresearch run --resume` re-runs it)",
        n => {
            line += &format!(
                "; {n} experiments were interrupted (`autoresearch run --resume` re-runs them)"
            )
        }
    }
    println!("{line}");
    Ok(())
}

#[derive(Args)]
pub struct ResultsArgs {
    /// Session [default: the latest].
    #[arg(long)]
    tag: Option<String>,
    /// Read a results.tsv instead (any, the original's included).
    #[arg(long, conflicts_with = "tag")]
    file: Option<PathBuf>,
    #[arg(long)]
    json: bool,
}

pub fn results(args: ResultsArgs) -> Result<()> {
    if let Some(file) = args.file {
        let rows = ledger::results::read(&file)?;
        if args.json {
            println!("{}", serde_json::to_string_pretty(&rows)?);
        } else {
            print_rows(&rows);
        }
        return Ok(());
    }
    let repo = find_repo()?;
    let s = Session::load(&repo, &resolve_tag(&repo, args.tag)?)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&s.records)?);
        return Ok(());
    }
    println!(
        "  {:>4}  {:<7}  {:>9}  {:>6}  {:<8}  {:<14}  description",
        "#", "commit", "val_bpb", "mem_gb", "status", "outcome"
    );
    for r in &s.records {
        let (status, outcome, mem) = match &r.end {
            Some(e) => (
                e.status.as_str(),
                e.finish.outcome.as_str(),
                e.finish.memory_gb,
            ),
            None => ("-", "in flight", 0.0),
        };
        println!(
            "  {:>4}  {:<7}  {:>9}  {:>6.1}  {:<8}  {:<14}  {}",
            r.begin.index,
            r.short(),
            r.val_bpb().map_or("-".into(), |v| format!("{v:.6}")),
            mem,
            status,
            outcome,
            r.begin.description
        );
    }
    Ok(())
}

fn print_rows(rows: &[ResultRow]) {
    println!(
        "  {:>4}  {:<8}  {:>9}  {:>6}  {:<8}  description",
        "#", "commit", "val_bpb", "mem_gb", "status"
    );
    for (i, r) in rows.iter().enumerate() {
        println!(
            "  {:>4}  {:<8}  {:>9}  {:>6.1}  {:<8}  {}",
            i,
            r.commit,
            r.val_bpb.map_or("-".into(), |v| format!("{v:.6}")),
            r.memory_gb,
            r.status.as_str(),
            r.description
        );
    }
}

#[derive(Args)]
pub struct ShowArgs {
    /// The experiment's commit hash (7 characters or more are enough).
    hash: String,
    #[arg(long)]
    json: bool,
}

fn log_tail(repo: &Path, r: &Record, lines: usize) -> String {
    r.end
        .as_ref()
        .and_then(|e| e.finish.log.as_ref())
        .and_then(|log| std::fs::read_to_string(repo.join(log)).ok())
        .map(|text| runner::last_lines(&text, lines))
        .unwrap_or_default()
}

pub fn show(args: ShowArgs) -> Result<()> {
    let repo = find_repo()?;
    let (s, r) = ledger::find_experiment(&repo, &args.hash)?;
    let diff = ledger::diff_against_parent(&repo, &r.begin.hash)?;
    let tail = log_tail(&repo, &r, 20);
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({
                "session": s.meta.tag, "experiment": r, "diff": diff, "log_tail": tail,
            }))?
        );
        return Ok(());
    }
    println!("session {}\n{}", s.meta.tag, session::describe(&r));
    if let Some(e) = &r.end {
        if let Some(summary) = &e.finish.summary {
            println!("summary: {summary}");
        }
        println!(
            "build {:.1}s, run {:.1}s{}",
            e.finish.build_seconds,
            e.finish.run_seconds,
            e.finish
                .log
                .as_ref()
                .map_or(String::new(), |l| format!(", log {l}"))
        );
    }
    println!(
        "\ndiff against its parent {}:\n{diff}",
        &r.begin.parent[..7]
    );
    if !tail.is_empty() {
        println!("log tail:\n{tail}");
    }
    Ok(())
}

#[derive(Args)]
pub struct ReplayArgs {
    /// The experiment's commit hash.
    hash: String,
    /// Data cache [default: $AUTORESEARCH_CACHE or ~/.cache/autoresearch].
    #[arg(long)]
    cache: Option<PathBuf>,
    #[arg(long)]
    no_sandbox: bool,
    #[arg(long)]
    json: bool,
}

pub fn replay(args: ReplayArgs) -> Result<()> {
    let repo = find_repo()?;
    let cache = crate::cache_dir(args.cache);
    let bar = training_bar();
    let replay = session::replay(
        &repo,
        &args.hash,
        &cache,
        &session::default_target_dir(&repo),
        !args.no_sandbox,
        &mut |line| show_training_line(&bar, line),
    )?;
    bar.finish_and_clear();
    let fmt = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.6}"));
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({
                "session": replay.tag,
                "hash": replay.record.begin.hash,
                "outcome": replay.verdict.outcome.as_str(),
                "recorded_val_bpb": replay.recorded,
                "replayed_val_bpb": replay.replayed(),
                "drift": replay.drift(),
                "sigma": replay.sigma,
                "drift_sigma": replay.drift_sigma(),
                "seed": replay.seed,
                "log": replay.verdict.log_path,
            }))?
        );
    } else {
        println!(
            "replay of {} ({}, session {}): {}",
            replay.record.short(),
            replay.record.begin.description,
            replay.tag,
            replay.verdict.outcome.as_str()
        );
        let runs = replay.record.values().len();
        println!(
            "  recorded val_bpb: {} (mean of {runs} run{})",
            fmt(replay.recorded),
            if runs == 1 { "" } else { "s" }
        );
        println!(
            "  replayed val_bpb: {} (seed {}, its first run's)",
            fmt(replay.replayed()),
            replay.seed
        );
        if let Some(d) = replay.drift() {
            let rel = replay.recorded.map_or(0.0, |r| 100.0 * d / r);
            let verdict = match (replay.drift_sigma(), replay.sigma) {
                (Some(z), Some(s)) if z.abs() <= 2.0 => {
                    format!("; {z:+.1} σ (σ = {s:.6}): reproduces within the noise")
                }
                (Some(z), Some(s)) => format!(
                    "; {z:+.1} σ (σ = {s:.6}): outside the noise, this result does not reproduce"
                ),
                _ => "; the session has no σ to judge it by".into(),
            };
            println!("  drift:            {d:+.6} ({rel:+.2}%){verdict}");
        }
        println!("  log: {}", replay.verdict.log_path.display());
        if replay.verdict.outcome != runner::Outcome::Ok {
            println!("{}", replay.verdict.evidence);
        }
    }
    if replay.verdict.outcome != runner::Outcome::Ok {
        bail!("the replay ended in {}", replay.verdict.outcome.as_str());
    }
    Ok(())
}

#[derive(Args)]
pub struct PlotArgs {
    /// Session [default: the latest].
    #[arg(long)]
    tag: Option<String>,
    /// Plot a results.tsv instead (any, the original's included).
    #[arg(long, conflicts_with = "tag")]
    file: Option<PathBuf>,
    /// The PNG to write [default: runs/TAG/progress.png, or FILE's name with .png].
    #[arg(long)]
    out: Option<PathBuf>,
}

fn points(rows: &[ResultRow]) -> Vec<plot::Point> {
    rows.iter()
        .enumerate()
        .map(|(i, r)| plot::Point {
            index: i,
            val_bpb: r.val_bpb,
            status: match r.status {
                Status::Keep => plot::Status::Keep,
                Status::Discard => plot::Status::Discard,
                Status::Crash => plot::Status::Crash,
            },
            label: r.description.clone(),
        })
        .collect()
}

pub fn plot_session(repo: &Path, tag: &str, out: &Path) -> Result<()> {
    let s = Session::load(repo, tag)?;
    plot::Chart {
        points: &points(&s.result_rows()),
        title: &format!("autoresearch: session {tag}"),
        sigma: s.noise().map(|n| n.sigma),
    }
    .write_png(out)?;
    Ok(())
}

pub fn plot(args: PlotArgs) -> Result<()> {
    let out = if let Some(file) = &args.file {
        let rows = ledger::results::read(file)?;
        let out = args
            .out
            .clone()
            .unwrap_or_else(|| file.with_extension("png"));
        let name = file
            .file_name()
            .map_or_else(String::new, |n| n.to_string_lossy().into_owned());
        plot::Chart {
            points: &points(&rows),
            title: &format!("autoresearch: {name}"),
            sigma: None,
        }
        .write_png(&out)?;
        out
    } else {
        let repo = find_repo()?;
        let tag = resolve_tag(&repo, args.tag)?;
        let out = args
            .out
            .unwrap_or_else(|| ledger::session_dir(&repo, &tag).join("progress.png"));
        plot_session(&repo, &tag, &out)?;
        out
    };
    println!("Wrote {}", out.display());
    Ok(())
}

#[derive(Args)]
pub struct ReportArgs {
    /// Session [default: the latest].
    #[arg(long)]
    tag: Option<String>,
    /// The page to write [default: runs/TAG/report.html].
    #[arg(long)]
    out: Option<PathBuf>,
    /// Open it in the desktop's browser once written.
    #[arg(long)]
    open: bool,
}

/// Writes the session's report page and returns where.
pub fn write_report(repo: &Path, tag: &str, out: Option<PathBuf>) -> Result<PathBuf> {
    let s = Session::load(repo, tag)?;
    let out = out.unwrap_or_else(|| ledger::session_dir(repo, tag).join("report.html"));
    let html = report::build(repo, &s)?;
    // Through a rename: a browser reloading the page never reads half of it.
    let partial = out.with_extension("html.partial");
    std::fs::write(&partial, html)
        .and_then(|()| std::fs::rename(&partial, &out))
        .with_context(|| {
            format!(
                "writing {}: check the directory exists and is writable",
                out.display()
            )
        })?;
    Ok(out)
}

pub fn report(args: ReportArgs) -> Result<()> {
    let repo = find_repo()?;
    let tag = resolve_tag(&repo, args.tag)?;
    let out = write_report(&repo, &tag, args.out)?;
    println!("Wrote {}", out.display());
    if args.open {
        open_in_browser(&out);
    }
    Ok(())
}

/// Hands the page to the desktop's opener, with a scrubbed environment: API keys stay here.
fn open_in_browser(page: &Path) {
    let opener = if cfg!(target_os = "macos") {
        "open"
    } else {
        "xdg-open"
    };
    let mut cmd = std::process::Command::new(opener);
    cmd.arg(page).env_clear();
    for key in [
        "PATH",
        "HOME",
        "USER",
        "LANG",
        "DISPLAY",
        "WAYLAND_DISPLAY",
        "XDG_RUNTIME_DIR",
        "XDG_CONFIG_HOME",
        "XDG_DATA_DIRS",
        "XDG_CURRENT_DESKTOP",
        "DBUS_SESSION_BUS_ADDRESS",
        "BROWSER",
    ] {
        if let Some(v) = std::env::var_os(key) {
            cmd.env(key, v);
        }
    }
    let opened = cmd
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !opened {
        println!(
            "Could not start {opener}: open file://{} in a browser.",
            page.display()
        );
    }
}

#[derive(Args)]
pub struct StatusArgs {
    /// Session [default: the latest].
    #[arg(long)]
    tag: Option<String>,
    /// Redraw until Ctrl-C.
    #[arg(long)]
    watch: bool,
    /// Seconds between redraws with --watch.
    #[arg(long, default_value_t = 2.0, value_name = "SECS")]
    interval: f64,
    /// The same as one JSON object (each experiment in flight with its worker), once.
    #[arg(long, conflicts_with = "watch")]
    json: bool,
}

pub fn status(args: StatusArgs) -> Result<()> {
    use std::io::{IsTerminal, Write};
    let repo = find_repo()?;
    let tag = resolve_tag(&repo, args.tag)?;
    if !(args.interval.is_finite() && args.interval >= 0.1) {
        bail!(
            "--interval {} is too short: give 0.1 seconds or more",
            args.interval
        );
    }
    let glance = || -> Result<String> {
        let s = Session::load(&repo, &tag)?;
        Ok(report::Glance::of(&s, report::now_unix()).to_string())
    };
    if args.json {
        let s = Session::load(&repo, &tag)?;
        let glance = report::Glance::of(&s, report::now_unix());
        println!("{}", serde_json::to_string_pretty(&glance)?);
        return Ok(());
    }
    if !args.watch {
        print!("{}", glance()?);
        return Ok(());
    }
    let terminal = std::io::stdout().is_terminal();
    loop {
        // One frame, one write: stdout flushes at each newline, and a terminal shown a
        // half-drawn frame flickers (and a reader of the screen sees it without its footer).
        let mut frame = String::new();
        if terminal {
            // Home and clear: the glance redraws in place.
            frame.push_str("\x1b[H\x1b[2J");
        }
        frame.push_str(&glance()?);
        frame.push_str(&format!(
            "\n(every {}s; Ctrl-C stops watching, not the session)\n",
            args.interval
        ));
        let mut out = std::io::stdout().lock();
        out.write_all(frame.as_bytes())?;
        out.flush()?;
        drop(out);
        std::thread::sleep(std::time::Duration::from_secs_f64(args.interval));
    }
}

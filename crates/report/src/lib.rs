//! The morning review: `report.html`, one self-contained page (the chart, the kept chain with
//! diffs, every experiment sortable and filterable, the totals, a replay command for each), and
//! `Glance`, a running session in a few lines for `status`.
//!
//! Everything on the page that a model wrote (descriptions, rationales, diffs, logs) is
//! hostile: the server-side parts are HTML-escaped, the rest travels as JSON inside a
//! non-executed script element and reaches the DOM through `textContent` only, and a
//! Content-Security-Policy allows exactly the page's own script and no request of any kind.

mod glance;

use std::path::Path;

use base64::Engine;
use html_escape::{encode_double_quoted_attribute as attr, encode_text as text};
use ledger::{Record, Session, Status};
use serde::Serialize;
use sha2::{Digest, Sha256};

pub use glance::{Glance, is_running};

#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error(transparent)]
    Ledger(#[from] ledger::LedgerError),
    #[error("drawing the chart: {0}")]
    Plot(#[from] plot::PlotError),
}

/// Lines of each run's log on the page.
const LOG_TAIL_LINES: usize = 40;

/// What the page shows of an experiment beyond the journal: read from git and the logs.
#[derive(Debug, Clone, Default)]
pub struct Detail {
    /// The diff against its parent, or why there is none.
    pub diff: String,
    pub log_tail: String,
}

/// The page for session `session` of the repository at `root`.
pub fn build(root: &Path, session: &Session) -> Result<String, ReportError> {
    let hashes: Vec<&str> = session
        .records
        .iter()
        .map(|r| r.begin.hash.as_str())
        .collect();
    let diffs = ledger::diffs_against_parents(root, &hashes)?;
    let details: Vec<Detail> = session
        .records
        .iter()
        .zip(diffs)
        .map(|(r, diff)| Detail {
            diff: diff.unwrap_or_else(|e| format!("(no diff: {e})")),
            log_tail: log_tail(root, r),
        })
        .collect();
    render(session, &details, now_unix())
}

fn log_tail(root: &Path, r: &Record) -> String {
    let Some(log) = r.end.as_ref().and_then(|e| e.finish.log.as_ref()) else {
        return String::new();
    };
    let Ok(bytes) = std::fs::read(root.join(log)) else {
        return String::new();
    };
    let text = String::from_utf8_lossy(&bytes);
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(LOG_TAIL_LINES)..].join("\n")
}

/// Seconds since the Unix epoch: the "now" of the page and of the glance.
pub fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// One experiment as the page's script sees it.
#[derive(Serialize)]
struct Row<'a> {
    i: usize,
    hash: &'a str,
    parent: &'a str,
    description: &'a str,
    rationale: &'a str,
    /// keep, discard, crash, or running.
    status: &'a str,
    outcome: &'a str,
    val_bpb: Option<f64>,
    runs: Vec<RunRow<'a>>,
    gain_sigma: Option<f64>,
    memory_gb: Option<f64>,
    build_s: Option<f64>,
    run_s: Option<f64>,
    tokens_in: Option<u64>,
    tokens_out: Option<u64>,
    cost_usd: Option<f64>,
    started: u64,
    finished: Option<u64>,
    evidence: &'a str,
    log_tail: &'a str,
    diff: &'a str,
    replay: String,
}

#[derive(Serialize)]
struct RunRow<'a> {
    run: usize,
    seed: u64,
    outcome: &'a str,
    val_bpb: Option<f64>,
}

fn row<'a>(r: &'a Record, d: &'a Detail) -> Row<'a> {
    let end = r.end.as_ref();
    let finish = end.map(|e| &e.finish);
    Row {
        i: r.begin.index,
        hash: &r.begin.hash,
        parent: &r.begin.parent,
        description: &r.begin.description,
        rationale: &r.begin.rationale,
        status: r.status().map_or("running", Status::as_str),
        outcome: finish.map_or("in flight", |f| f.outcome.as_str()),
        val_bpb: r.val_bpb(),
        runs: r
            .runs
            .iter()
            .map(|run| RunRow {
                run: run.run,
                seed: run.seed,
                outcome: &run.finish.outcome,
                val_bpb: run.finish.val_bpb,
            })
            .collect(),
        gain_sigma: end
            .and_then(|e| e.judgement.as_ref())
            .and_then(|j| j.gain_sigma),
        memory_gb: finish.map(|f| f.memory_gb),
        build_s: finish.map(|f| f.build_seconds),
        run_s: finish.map(|f| f.run_seconds),
        tokens_in: finish.and_then(|f| f.tokens_in),
        tokens_out: finish.and_then(|f| f.tokens_out),
        cost_usd: finish.and_then(|f| f.cost_usd),
        started: r.begin.started_unix,
        finished: end.map(|e| e.finished_unix),
        evidence: finish.map_or("", |f| f.evidence.as_str()),
        log_tail: &d.log_tail,
        diff: &d.diff,
        replay: format!("autoresearch replay {}", r.begin.hash),
    }
}

/// The session's totals, as the page and `status` show them.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Totals {
    pub experiments: usize,
    pub kept: usize,
    pub discarded: usize,
    pub crashed: usize,
    /// From the session's start to its last finished experiment (or `now` while one runs).
    pub hours: f64,
    /// Seconds of training runs (build excluded): the GPU's time on a CUDA session.
    pub run_seconds: f64,
    pub cost_usd: Option<f64>,
    pub tokens_in: Option<u64>,
    pub tokens_out: Option<u64>,
    pub baseline: Option<f64>,
    pub best: Option<(f64, usize, String)>,
}

impl Totals {
    pub fn of(s: &Session, now: u64) -> Totals {
        let count = |st| s.records.iter().filter(|r| r.status() == Some(st)).count();
        let ends = s.records.iter().filter_map(|r| r.end.as_ref());
        let last = if !s.in_flight().is_empty() {
            Some(now)
        } else {
            ends.clone().map(|e| e.finished_unix).max()
        };
        let sum_u64 = |f: fn(&ledger::Finish) -> Option<u64>| {
            let v: Vec<u64> = ends.clone().filter_map(|e| f(&e.finish)).collect();
            (!v.is_empty()).then(|| v.iter().sum())
        };
        let costs: Vec<f64> = ends.clone().filter_map(|e| e.finish.cost_usd).collect();
        Totals {
            experiments: s.records.len(),
            kept: count(Status::Keep),
            discarded: count(Status::Discard),
            crashed: count(Status::Crash),
            hours: last.map_or(0.0, |t| {
                t.saturating_sub(s.meta.started_unix) as f64 / 3600.0
            }),
            run_seconds: ends.clone().map(|e| e.finish.run_seconds).sum(),
            cost_usd: (!costs.is_empty()).then(|| costs.iter().sum()),
            tokens_in: sum_u64(|f| f.tokens_in),
            tokens_out: sum_u64(|f| f.tokens_out),
            baseline: s.kept().first().and_then(|r| r.val_bpb()),
            best: s.best().map(|r| {
                (
                    r.val_bpb().expect("the best has a value"),
                    r.begin.index,
                    r.short().to_string(),
                )
            }),
        }
    }

    /// Finished experiments per hour of the session's wall time.
    pub fn per_hour(&self) -> Option<f64> {
        let done = self.kept + self.discarded + self.crashed;
        (self.hours > 0.0 && done > 0).then(|| done as f64 / self.hours)
    }

    /// The best against the baseline, in percent (negative is better).
    pub fn gain_percent(&self) -> Option<f64> {
        let (best, ..) = self.best.as_ref()?;
        let base = self.baseline?;
        Some(100.0 * (best - base) / base)
    }
}

const CSS: &str = include_str!("report.css");
const SCRIPT: &str = include_str!("report.js");

/// The page, from the journal and each experiment's detail (in the journal's order).
pub fn render(s: &Session, details: &[Detail], now: u64) -> Result<String, ReportError> {
    let m = &s.meta;
    let t = Totals::of(s, now);
    let points: Vec<plot::Point> = s
        .records
        .iter()
        .filter(|r| r.end.is_some())
        .enumerate()
        .map(|(n, r)| plot::Point {
            index: n,
            val_bpb: r.val_bpb(),
            status: match r.status() {
                Some(Status::Keep) => plot::Status::Keep,
                Some(Status::Discard) => plot::Status::Discard,
                _ => plot::Status::Crash,
            },
            label: r.begin.description.clone(),
        })
        .collect();
    let svg = plot::Chart {
        points: &points,
        title: &format!("session {}", m.tag),
        sigma: s.noise().map(|n| n.sigma),
    }
    .svg(1200, 560)?;

    let empty = Detail::default();
    let rows: Vec<Row> = s
        .records
        .iter()
        .enumerate()
        .map(|(n, r)| row(r, details.get(n).unwrap_or(&empty)))
        .collect();
    // `<` is escaped inside the JSON, so no text in it can close the script element.
    let json = serde_json::to_string(&serde_json::json!({ "experiments": rows }))
        .expect("rows serialise")
        .replace('<', "\\u003c");
    let script_hash = base64::engine::general_purpose::STANDARD.encode(Sha256::digest(SCRIPT));

    let mut h = String::with_capacity(json.len() + svg.len() + 64 * 1024);
    h += "<!doctype html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n";
    h += &format!(
        "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; script-src 'sha256-{script_hash}'; style-src 'unsafe-inline'; img-src data:\">\n"
    );
    h += "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n";
    h += &format!("<title>autoresearch: {}</title>\n", text(&m.tag));
    h += &format!("<style>{CSS}</style>\n</head>\n<body>\n");
    h += &format!(
        "<header><h1>autoresearch · session {}</h1>\n<p class=\"meta\">{} · preset {} · {} · {:.0} s budget · {} · from {} · started {}</p></header>\n",
        text(&m.tag),
        text(&m.agent),
        text(&m.preset),
        text(&m.device),
        m.budget_s,
        text(&keep_rule(s)),
        text(&m.base[..m.base.len().min(7)]),
        text(&utc(m.started_unix)),
    );
    h += &totals_html(&t, s);
    h += &format!("<section id=\"chart\"><h2>Progress</h2>\n<figure>{svg}</figure></section>\n");
    h += &kept_html(s, &t);
    h += concat!(
        "<section id=\"all\"><h2>Every experiment</h2>\n",
        "<div class=\"controls\"><input id=\"filter\" type=\"search\" placeholder=\"filter: words of the description, a hash, an outcome\" aria-label=\"filter\">\n",
        "<select id=\"status\" aria-label=\"status\"><option value=\"\">every status</option><option value=\"keep\">kept</option><option value=\"discard\">discarded</option><option value=\"crash\">crashed</option><option value=\"running\">running</option></select>\n",
        "<span id=\"shown\"></span> <span class=\"hint\">click a heading to sort, a row to expand</span></div>\n",
        "<table id=\"experiments\"><thead><tr>",
        "<th data-key=\"i\">#</th><th data-key=\"hash\">commit</th><th data-key=\"status\">status</th>",
        "<th data-key=\"outcome\">outcome</th><th data-key=\"val_bpb\">val_bpb</th><th data-key=\"runs\">runs</th>",
        "<th data-key=\"build_s\">build s</th><th data-key=\"run_s\">run s</th><th data-key=\"tokens\">tokens</th>",
        "<th data-key=\"cost_usd\">cost</th><th data-key=\"memory_gb\">mem GB</th><th data-key=\"description\">description</th>",
        "</tr></thead><tbody></tbody></table></section>\n",
    );
    h += "<script type=\"application/json\" id=\"data\">";
    h += &json;
    h += "</script>\n<script>";
    h += SCRIPT;
    h += "</script>\n</body>\n</html>\n";
    Ok(h)
}

fn keep_rule(s: &Session) -> String {
    let k = &s.meta.keep;
    match k.rule {
        ledger::RuleKind::Strict => "keep rule: strict".into(),
        ledger::RuleKind::Noise => format!(
            "keep rule: noise ({} baseline runs, up to {} per experiment)",
            k.baseline_runs, k.margins.max_runs
        ),
    }
}

fn utc(unix: u64) -> String {
    let (h, m) = ((unix / 3600) % 24, (unix / 60) % 60);
    let days = unix / 86_400;
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let mo = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(mo <= 2);
    format!("{y:04}-{mo:02}-{d:02} {h:02}:{m:02} UTC")
}

fn totals_html(t: &Totals, s: &Session) -> String {
    let mut items = vec![
        (
            "experiments",
            format!(
                "{} <small>{} kept · {} discarded · {} crashed</small>",
                t.experiments, t.kept, t.discarded, t.crashed
            ),
        ),
        (
            "per hour",
            t.per_hour().map_or("–".into(), |r| {
                let over = if t.hours < 1.0 {
                    format!("{:.0} min", t.hours * 60.0)
                } else {
                    format!("{:.1} h", t.hours)
                };
                format!("{r:.1} <small>over {over}</small>")
            }),
        ),
        (
            "training time",
            format!(
                "{:.2} h <small>of runs, builds excluded</small>",
                t.run_seconds / 3600.0
            ),
        ),
    ];
    let spend = match (t.cost_usd, t.tokens_in) {
        (Some(c), Some(i)) => format!(
            "${c:.2} <small>{i} tokens in, {} out</small>",
            t.tokens_out.unwrap_or(0)
        ),
        (Some(c), None) => format!("${c:.2}"),
        (None, Some(i)) => format!("{i} tokens in, {} out", t.tokens_out.unwrap_or(0)),
        (None, None) => "none <small>(no LLM)</small>".into(),
    };
    items.push(("spend", spend));
    if let Some((best, index, short)) = &t.best {
        let vs = t.gain_percent().map_or(String::new(), |g| {
            format!(" <small>{g:+.2}% vs baseline</small>")
        });
        items.push((
            "best",
            format!("{best:.6} <small>#{index} {}</small>{vs}", text(short)),
        ));
    }
    if let Some(n) = s.noise() {
        items.push((
            "seed noise σ",
            format!("{:.6} <small>{} degrees of freedom</small>", n.sigma, n.dof),
        ));
    }
    let mut h = String::from("<section id=\"totals\"><dl>");
    for (k, v) in items {
        h += &format!("<div><dt>{k}</dt><dd data-total=\"{k}\">{v}</dd></div>");
    }
    h + "</dl></section>\n"
}

fn kept_html(s: &Session, t: &Totals) -> String {
    let mut h = format!(
        "<section id=\"kept\"><h2>The kept chain <small>{} experiment{}</small></h2>\n<ol class=\"chain\">\n",
        t.kept,
        if t.kept == 1 { "" } else { "s" }
    );
    let mut prev: Option<f64> = None;
    for r in s.kept() {
        let v = r.val_bpb();
        let delta = |a: Option<f64>, b: Option<f64>| {
            a.zip(b)
                .map_or("–".to_string(), |(a, b)| format!("{:+.6}", a - b))
        };
        let gain = r
            .end
            .as_ref()
            .and_then(|e| e.judgement.as_ref())
            .and_then(|j| j.gain_sigma)
            .map_or("–".into(), |g| format!("{g:+.1} σ"));
        let runs: Vec<String> = r
            .runs
            .iter()
            .map(|run| {
                format!(
                    "run {} seed {}: {}",
                    run.run + 1,
                    run.seed,
                    run.finish
                        .val_bpb
                        .map_or(run.finish.outcome.clone(), |v| format!("{v:.6}"))
                )
            })
            .collect();
        h += &format!(
            concat!(
                "<li class=\"kept\" data-hash=\"{hash}\"><div class=\"head\"><span class=\"idx\">#{i}</span> <code>{short}</code> ",
                "<b>{v}</b> <span title=\"against the previous kept\">Δprev {dp}</span> <span title=\"against the baseline\">Δbase {db}</span> ",
                "<span title=\"gain in units of one run's seed noise\">{gain}</span></div>\n",
                "<p class=\"desc\">{desc}</p><p class=\"why\">{why}</p><p class=\"runs\">{runs}</p>\n",
                "<details data-hash=\"{hash}\"><summary>diff against {parent}</summary><pre class=\"diff\"></pre></details>",
                "<code class=\"replay\">autoresearch replay {short}</code></li>\n"
            ),
            hash = attr(&r.begin.hash),
            i = r.begin.index,
            short = text(r.short()),
            v = v.map_or("–".into(), |v| format!("{v:.6}")),
            dp = delta(v, prev),
            db = delta(v, t.baseline),
            gain = gain,
            desc = text(&r.begin.description),
            why = text(&r.begin.rationale),
            runs = text(&runs.join(" · ")),
            parent = text(&r.begin.parent[..r.begin.parent.len().min(7)]),
        );
        prev = v;
    }
    h + "</ol></section>\n"
}

#[cfg(test)]
mod tests;

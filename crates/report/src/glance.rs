//! A session at a glance, for `status`: read from the journal and the in-flight run's log,
//! never written, so watching a session cannot disturb it.

use std::fmt;
use std::path::Path;

use ledger::{Attach, Session};

use crate::Totals;

/// Outcomes listed under "last outcomes".
const RECENT: usize = 5;

#[derive(Debug, Clone, serde::Serialize)]
pub struct Glance {
    pub tag: String,
    /// The harness process that took the session up last, and whether it still runs.
    pub attached: Option<Attach>,
    pub running: bool,
    /// The experiments under way (one per worker).
    pub in_flight: Vec<InFlight>,
    pub totals: Totals,
    pub recent: Vec<Outcome>,
    pub now: u64,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct InFlight {
    pub index: usize,
    pub short: String,
    pub description: String,
    pub seconds: u64,
    /// Runs of it already ended (the one under way is the next).
    pub runs_done: usize,
    /// The last line its current run's log holds.
    pub last_line: Option<String>,
    /// The worker running it, in a session of several.
    pub worker: Option<usize>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Outcome {
    pub index: usize,
    pub short: String,
    pub status: String,
    pub outcome: String,
    pub val_bpb: Option<f64>,
    pub description: String,
    pub ago: u64,
}

/// Whether process `pid` is alive and an autoresearch harness (a reused pid is not).
pub fn is_running(pid: u32) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .is_ok_and(|c| c.windows(12).any(|w| w == b"autoresearch"))
}

impl Glance {
    pub fn of(s: &Session, now: u64) -> Glance {
        let running = s.attached.as_ref().is_some_and(|a| is_running(a.pid));
        let in_flight = s.in_flight().into_iter().map(|r| {
            let log = match r.runs.len() {
                0 => format!("{}.log", r.begin.hash),
                n => format!("{}-{n}.log", r.begin.hash),
            };
            InFlight {
                index: r.begin.index,
                short: r.short().to_string(),
                description: r.begin.description.clone(),
                seconds: now.saturating_sub(r.begin.started_unix),
                runs_done: r.runs.len(),
                last_line: last_line(&s.dir.join("logs").join(log)),
                worker: r.begin.worker,
            }
        });
        let in_flight = in_flight.collect();
        let recent = s
            .records
            .iter()
            .rev()
            .filter_map(|r| {
                let e = r.end.as_ref()?;
                Some(Outcome {
                    index: r.begin.index,
                    short: r.short().to_string(),
                    status: e.status.as_str().to_string(),
                    outcome: e.finish.outcome.clone(),
                    val_bpb: e.finish.val_bpb,
                    description: r.begin.description.clone(),
                    ago: now.saturating_sub(e.finished_unix),
                })
            })
            .take(RECENT)
            .collect();
        Glance {
            tag: s.meta.tag.clone(),
            attached: s.attached.clone(),
            running,
            in_flight,
            totals: Totals::of(s, now),
            recent,
            now,
        }
    }
}

/// The last non-empty line of a file, cut to 120 characters; reads only its last 8 KiB.
fn last_line(path: &Path) -> Option<String> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = std::fs::File::open(path).ok()?;
    let len = f.metadata().ok()?.len();
    f.seek(SeekFrom::Start(len.saturating_sub(8192))).ok()?;
    let mut buf = Vec::new();
    f.read_to_end(&mut buf).ok()?;
    let text = String::from_utf8_lossy(&buf);
    let line = text.lines().rev().find(|l| !l.trim().is_empty())?;
    Some(line.trim().chars().take(120).collect())
}

/// "2h 03m", "4m 10s", "12s".
pub fn duration(seconds: u64) -> String {
    match seconds {
        s if s >= 3600 => format!("{}h {:02}m", s / 3600, (s % 3600) / 60),
        s if s >= 60 => format!("{}m {:02}s", s / 60, s % 60),
        s => format!("{s}s"),
    }
}

impl fmt::Display for Glance {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let t = &self.totals;
        match (&self.attached, self.running) {
            (Some(a), true) => {
                write!(
                    f,
                    "session {}: running (pid {}) for {}",
                    self.tag,
                    a.pid,
                    duration(self.now.saturating_sub(a.started_unix))
                )?;
                match a.until_unix {
                    Some(u) if u > self.now => {
                        write!(f, "; --until in {}", duration(u - self.now))?
                    }
                    Some(_) => write!(f, "; --until has passed: no new experiment starts")?,
                    None => {}
                }
                if let Some(max) = a.max_experiments {
                    write!(f, "; stops at {max} experiments")?;
                }
                if let Some(max) = a.max_cost_usd {
                    write!(f, "; stops at ${max:.2} spent")?;
                }
                writeln!(f)?;
            }
            (a, _) => writeln!(
                f,
                "session {}: not running{}: `autoresearch run --tag {} --resume` goes on",
                self.tag,
                a.as_ref().map_or(String::new(), |a| format!(
                    " (its harness, pid {}, has ended)",
                    a.pid
                )),
                self.tag
            )?,
        }
        if self.in_flight.is_empty() {
            writeln!(f, "in flight  nothing")?;
        }
        for r in &self.in_flight {
            write!(
                f,
                "in flight  #{} {} \"{}\": {} so far",
                r.index,
                r.short,
                r.description,
                duration(r.seconds)
            )?;
            if r.runs_done > 0 {
                write!(f, ", run {}", r.runs_done + 1)?;
            }
            if let Some(w) = r.worker {
                write!(f, " (worker {w})")?;
            }
            writeln!(f)?;
            if let Some(line) = &r.last_line {
                writeln!(f, "           {line}")?;
            }
        }
        match (&t.best, t.baseline) {
            (Some((best, index, short)), base) => {
                write!(f, "best       {best:.6} (#{index} {short})")?;
                if let (Some(g), Some(b)) = (t.gain_percent(), base) {
                    write!(f, ", {g:+.2}% vs baseline {b:.6}")?;
                }
                writeln!(f)?;
            }
            (None, _) => writeln!(f, "best       none yet")?,
        }
        write!(
            f,
            "pace       {} experiments in {:.1} h",
            t.experiments, t.hours
        )?;
        if let Some(r) = t.per_hour() {
            write!(f, ": {r:.1} per hour")?;
        }
        writeln!(
            f,
            " ({} kept, {} discarded, {} crashed)",
            t.kept, t.discarded, t.crashed
        )?;
        match (t.cost_usd, t.tokens_in) {
            (None, None) => writeln!(f, "spend      none (no LLM)")?,
            (c, i) => writeln!(
                f,
                "spend      ${:.2} ({} tokens in, {} out)",
                c.unwrap_or(0.0),
                i.unwrap_or(0),
                t.tokens_out.unwrap_or(0)
            )?,
        }
        writeln!(f, "last outcomes")?;
        for o in &self.recent {
            writeln!(
                f,
                "  #{:<4} {} {:<8} {:>9}  {:>8} ago  {}{}",
                o.index,
                o.short,
                o.status,
                o.val_bpb.map_or("-".into(), |v| format!("{v:.6}")),
                duration(o.ago),
                o.description,
                if o.outcome == "ok" {
                    String::new()
                } else {
                    format!(" [{}]", o.outcome)
                }
            )?;
        }
        Ok(())
    }
}

//! The workbench a proposer works through during one episode.

use std::path::PathBuf;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use ledger::Oid;
use ledger::{Ledger, Record, TRAIN_FILE};
use runner::{Experiment, RunnerError};
use workbench::{
    CheckReport, ExperimentReport, ResultLine, SessionInfo, Spend, ToolError, Workbench,
};

use crate::{Progress, lock, paths};

/// The train file may not grow past this: a runaway write is a mistake, not research.
const MAX_TRAIN_FILE: usize = 1 << 20;

/// Where an episode works: the repository itself (one worker), or a worker's own checkout.
pub(crate) struct Place<'a> {
    /// The checkout whose train file the proposer edits and the runner builds.
    pub dir: PathBuf,
    /// `None`: the session's only worker, in the repository, whose experiments move the branch
    /// as they begin.
    pub worker: Option<usize>,
    /// The kept state the episode began from (a worker's experiment is its child).
    pub base: Option<Oid>,
    /// A worker's claim on one of `--max-experiments`' places, released once its experiment
    /// is committed (then it counts as a record) or the episode ends without one.
    pub claims: Option<&'a AtomicUsize>,
    /// Another worker stopped the session: begin nothing more.
    pub halted: Option<&'a (dyn Fn() -> bool + Sync)>,
}

pub struct Bench<'a> {
    ledger: &'a Mutex<Ledger>,
    place: Place<'a>,
    exp: &'a Experiment,
    progress: &'a mut dyn FnMut(Progress),
    ran: bool,
    /// The proposer's spend not yet recorded with an experiment.
    spend: &'a mut Spend,
}

impl<'a> Bench<'a> {
    pub(crate) fn new(
        ledger: &'a Mutex<Ledger>,
        place: Place<'a>,
        exp: &'a Experiment,
        progress: &'a mut dyn FnMut(Progress),
        spend: &'a mut Spend,
    ) -> Self {
        Bench {
            ledger,
            place,
            exp,
            progress,
            ran: false,
            spend,
        }
    }

    /// Whether this episode's experiment has run.
    pub fn ran(&self) -> bool {
        self.ran
    }

    fn train_path(&self) -> PathBuf {
        self.place.dir.join(TRAIN_FILE)
    }

    fn notes_path(&self) -> PathBuf {
        lock(self.ledger).dir().join("notes.md")
    }
}

/// Every experiment after the baseline, with what its diff changed: finished ones, and
/// those in flight on other workers (so no two workers run the same idea).
fn ideas_tried(ledger: &Ledger) -> Result<Vec<workbench::ideas::Idea>, ToolError> {
    let file = |hash: &str| -> Result<String, ToolError> {
        let bytes = ledger.train_file_of(hash).map_err(fatal)?;
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    };
    let mut ideas = Vec::new();
    for r in &ledger.session().records {
        if r.begin.index == 0 {
            continue;
        }
        let status = match &r.end {
            Some(end) => end.status.as_str().to_string(),
            None => "in flight on another worker".to_string(),
        };
        ideas.push(workbench::ideas::Idea {
            index: r.begin.index,
            hash: r.short().to_string(),
            description: r.begin.description.clone(),
            settings: workbench::ideas::setting_changes(
                &file(&r.begin.parent)?,
                &file(&r.begin.hash)?,
            ),
            val_bpb: r.val_bpb(),
            status,
            gain_sigma: r
                .end
                .as_ref()
                .and_then(|e| e.judgement.as_ref())
                .and_then(|j| j.gain_sigma),
        });
    }
    Ok(ideas)
}

fn fatal(e: impl std::fmt::Display) -> ToolError {
    ToolError::Fatal(e.to_string())
}

impl Workbench for Bench<'_> {
    fn info(&self) -> SessionInfo {
        let ledger = lock(self.ledger);
        let s = ledger.session();
        SessionInfo {
            tag: s.meta.tag.clone(),
            preset: s.meta.preset.clone(),
            device: s.meta.device.clone(),
            budget_s: s.meta.budget_s,
            experiments: s.records.len(),
            best_val_bpb: s.best().and_then(Record::val_bpb),
            noise_sigma: s.noise().map(|n| n.sigma),
            noise_samples: s.noise().map_or(0, |n| n.dof),
            keep_rule: crate::describe_rule(&s.meta.keep),
        }
    }

    fn read_file(&self, path: &str, lines: Option<(usize, usize)>) -> Result<String, ToolError> {
        let real = paths::resolve_readable(&self.place.dir, path)?;
        let bytes = std::fs::read(&real).map_err(fatal)?;
        let text = String::from_utf8(bytes)
            .map_err(|_| ToolError::Invalid(format!("`{path}` is not UTF-8 text")))?;
        Ok(match lines {
            None => text,
            Some((first, last)) => {
                if first == 0 || last < first {
                    return Err(ToolError::Invalid(
                        "lines are 1-based and the range must not be empty".into(),
                    ));
                }
                let mut out: String = text
                    .lines()
                    .skip(first - 1)
                    .take(last - first + 1)
                    .collect::<Vec<_>>()
                    .join("\n");
                out.push('\n');
                out
            }
        })
    }

    fn train_file(&self) -> Result<String, ToolError> {
        std::fs::read_to_string(self.train_path()).map_err(fatal)
    }

    fn edit_train_file(&mut self, old: &str, new: &str) -> Result<(), ToolError> {
        if old.is_empty() {
            return Err(ToolError::Invalid("the old text is empty".into()));
        }
        let text = self.train_file()?;
        let hits: Vec<usize> = text.match_indices(old).map(|(i, _)| i).collect();
        match hits.len() {
            1 => self.write_train_file(&text.replacen(old, new, 1)),
            0 => Err(ToolError::Invalid(format!(
                "the old text was not found in {TRAIN_FILE}; the nearest lines are:\n{}",
                nearest_lines(&text, old)
            ))),
            n => {
                let lines: Vec<String> = hits
                    .iter()
                    .map(|&i| (text[..i].matches('\n').count() + 1).to_string())
                    .collect();
                Err(ToolError::Invalid(format!(
                    "the old text occurs {n} times (lines {}): include more of the surrounding text so it matches once",
                    lines.join(", ")
                )))
            }
        }
    }

    fn write_train_file(&mut self, content: &str) -> Result<(), ToolError> {
        if content.len() > MAX_TRAIN_FILE {
            return Err(ToolError::Invalid(format!(
                "the train file may not exceed {MAX_TRAIN_FILE} bytes"
            )));
        }
        std::fs::write(self.train_path(), content).map_err(fatal)
    }

    fn check(&mut self) -> Result<CheckReport, ToolError> {
        match runner::check(self.exp) {
            Ok(diagnostics) => Ok(CheckReport {
                compiles: diagnostics.is_empty(),
                diagnostics: diagnostics
                    .iter()
                    .map(|d| d.rendered.as_str())
                    .collect::<Vec<_>>()
                    .join("\n"),
            }),
            Err(RunnerError::Interrupted) => Err(ToolError::Interrupted),
            Err(e) => Err(fatal(e)),
        }
    }

    fn run_experiment(
        &mut self,
        description: &str,
        rationale: &str,
    ) -> Result<ExperimentReport, ToolError> {
        if self.ran {
            return Err(ToolError::AlreadyRan);
        }
        if description.trim().is_empty() {
            return Err(ToolError::Invalid(
                "give the experiment a short description".into(),
            ));
        }
        let content = std::fs::read(self.train_path()).map_err(fatal)?;
        let mut ledger = lock(self.ledger);
        if let Some(r) = ledger.tried(&content).map_err(fatal)? {
            return Err(ToolError::AlreadyTried {
                hash: r.short().to_string(),
                outcome: r.status().map_or("in flight", |s| s.as_str()).to_string(),
            });
        }
        // The same values set again, on whatever base, is the same idea.
        let base = match self.place.base {
            Some(base) => base,
            None => ledger.tip().map_err(fatal)?,
        };
        let kept = ledger.train_file_at(base).map_err(fatal)?;
        if let Some(changes) = workbench::ideas::setting_changes(
            &String::from_utf8_lossy(&kept),
            &String::from_utf8_lossy(&content),
        ) && let Some(earlier) = ideas_tried(&ledger)?
            .into_iter()
            .find(|i| i.settings.as_ref() == Some(&changes))
        {
            let settings: Vec<String> = changes.iter().map(|(k, v)| format!("{k} = {v}")).collect();
            return Err(ToolError::SettingsTried {
                settings: settings.join(", "),
                hash: earlier.hash,
                outcome: match earlier.val_bpb {
                    Some(v) => format!("val_bpb {v:.6}, {}", earlier.status),
                    None => earlier.status,
                },
            });
        }
        if runner::interrupted() || self.place.halted.is_some_and(|h| h()) {
            return Err(ToolError::Interrupted);
        }
        let best_before = ledger.session().best().and_then(Record::val_bpb);
        let begin = match self.place.worker {
            None => ledger.begin(description, rationale),
            Some(worker) => ledger.begin_on(worker, &self.place.dir, base, description, rationale),
        }
        .map_err(fatal)?;
        if let Some(claims) = self.place.claims.take() {
            claims.fetch_sub(1, Ordering::SeqCst);
        }
        drop(ledger);
        self.ran = true;
        (self.progress)(Progress::Started(&begin));
        let spend = std::mem::take(self.spend);
        let interrupted = crate::run_pending(
            self.ledger,
            self.exp,
            &begin.hash,
            &mut *self.progress,
            spend,
        )
        .map_err(fatal)?;
        if interrupted {
            return Err(ToolError::Interrupted);
        }
        let ledger = lock(self.ledger);
        let record = ledger
            .session()
            .record(&begin.hash)
            .expect("finished")
            .clone();
        drop(ledger);
        let end = record.end.as_ref().expect("finished");
        Ok(ExperimentReport {
            index: record.begin.index,
            hash: record.short().to_string(),
            outcome: end.finish.outcome.clone(),
            status: end.status.as_str().to_string(),
            val_bpb: end.finish.val_bpb,
            runs: record.values(),
            sigma: end.judgement.as_ref().and_then(|j| j.sigma),
            gain_sigma: end.judgement.as_ref().and_then(|j| j.gain_sigma),
            // The best it was judged against (with several workers, the best when it ended).
            best_before: end.judgement.as_ref().and_then(|j| j.best).or(best_before),
            summary: end
                .finish
                .summary
                .as_ref()
                .map(|s| serde_json::to_string_pretty(s).expect("json"))
                .unwrap_or_default(),
            evidence: end.finish.evidence.clone(),
        })
    }

    fn results(&self) -> Vec<ResultLine> {
        lock(self.ledger)
            .session()
            .records
            .iter()
            .filter_map(|r| {
                let row = r.result_row()?;
                Some(ResultLine {
                    index: r.begin.index,
                    hash: row.commit,
                    val_bpb: row.val_bpb,
                    memory_gb: row.memory_gb,
                    status: row.status.as_str().into(),
                    runs: r.values().len(),
                    gain_sigma: r
                        .end
                        .as_ref()?
                        .judgement
                        .as_ref()
                        .and_then(|j| j.gain_sigma),
                    description: row.description,
                })
            })
            .collect()
    }

    fn show(&self, hash: &str) -> Result<String, ToolError> {
        let ledger = lock(self.ledger);
        let session = ledger.session();
        let found = session.find(hash);
        let record = match found.as_slice() {
            [one] if hash.len() >= 4 => *one,
            [] | [_] => {
                return Err(ToolError::NotFound(format!(
                    "no experiment `{hash}` in this session"
                )));
            }
            _ => {
                return Err(ToolError::Invalid(format!(
                    "`{hash}` matches several experiments"
                )));
            }
        };
        let diff = ledger::diff_against_parent(ledger.root(), &record.begin.hash).map_err(fatal)?;
        Ok(format!("{}\n{diff}", describe(record)))
    }

    fn append_notes(&mut self, text: &str) -> Result<(), ToolError> {
        use std::io::Write;
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.notes_path())
            .map_err(fatal)?;
        writeln!(file, "{}", text.trim_end()).map_err(fatal)
    }

    fn notes(&self) -> String {
        std::fs::read_to_string(self.notes_path()).unwrap_or_default()
    }

    fn ideas(&self) -> String {
        ideas_tried(&lock(self.ledger))
            .map(|ideas| workbench::ideas::render(&ideas))
            .unwrap_or_default()
    }

    fn record_spend(&mut self, spend: Spend) {
        self.spend.add(spend);
    }

    fn stop_requested(&self) -> bool {
        runner::interrupted() || self.place.halted.is_some_and(|h| h())
    }
}

/// An experiment's record in a few lines: hash, description, outcome and figures.
pub fn describe(r: &Record) -> String {
    let mut out = format!(
        "experiment {} {} ({})\n{}\n",
        r.begin.index,
        r.begin.hash,
        r.status().map_or("in flight", |s| s.as_str()),
        r.begin.description
    );
    if !r.begin.rationale.is_empty() {
        out += &format!("rationale: {}\n", r.begin.rationale);
    }
    if let Some(end) = &r.end {
        out += &format!("outcome: {}\n", end.finish.outcome);
        if let Some(v) = end.finish.val_bpb {
            out += &format!("val_bpb: {v:.6}\n");
        }
        if let Some(j) = &end.judgement {
            out += &format!("decided by the {} rule", j.rule);
            if let (Some(g), Some(sigma)) = (j.gain_sigma, j.sigma) {
                out += &format!(": {g:+.1} σ against the best (σ = {sigma:.6})");
            }
            out += "\n";
            if j.seed_ignored {
                out +=
                    "warning: its runs ignore AUTORESEARCH_SEED (bit-identical with other seeds)\n";
            }
        }
    }
    if r.runs.len() > 1 || r.end.is_none() {
        for run in &r.runs {
            out += &format!(
                "run {} (seed {}): {} {}\n",
                run.run + 1,
                run.seed,
                run.finish.outcome,
                run.finish
                    .val_bpb
                    .map_or_else(String::new, |v| format!("val_bpb {v:.6}"))
            );
        }
    }
    if let Some(end) = r.end.as_ref().filter(|e| !e.finish.evidence.is_empty()) {
        out += &format!("evidence:\n{}\n", end.finish.evidence);
    }
    out
}

/// The lines of `text` most like the first line of `wanted`, numbered, for a failed edit.
fn nearest_lines(text: &str, wanted: &str) -> String {
    let probe = wanted
        .lines()
        .find(|l| !l.trim().is_empty())
        .unwrap_or(wanted)
        .trim();
    let mut scored: Vec<(usize, usize, &str)> = text
        .lines()
        .enumerate()
        .map(|(i, l)| (distance(l.trim(), probe), i + 1, l))
        .collect();
    scored.sort();
    scored
        .iter()
        .take(3)
        .map(|(_, n, l)| format!("{n:>5} | {l}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Levenshtein distance over chars (lines are short).
fn distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, &cb) in b.iter().enumerate() {
            let next = (prev + usize::from(ca != cb))
                .min(row[j] + 1)
                .min(row[j + 1] + 1);
            prev = row[j + 1];
            row[j + 1] = next;
        }
    }
    row[b.len()]
}

#[cfg(test)]
mod tests {
    #[test]
    fn nearest_lines_point_at_the_likely_target() {
        let text = "const A: f64 = 1.0;\nconst MATRIX_LR: f64 = 0.04;\nfn main() {}\n";
        let near = super::nearest_lines(text, "const MATRIX_LR: f64 = 0.05;");
        assert!(
            near.lines().next().unwrap().contains("2 | const MATRIX_LR"),
            "{near}"
        );
    }
}

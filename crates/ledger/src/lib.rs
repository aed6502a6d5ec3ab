//! The experiment ledger, on git.
//!
//! A session `TAG` works on branch `autoresearch/TAG`. Each experiment is committed before it
//! runs (its hash names its code), its metrics attach afterwards as a note under
//! `refs/notes/autoresearch`, and a discarded or crashed experiment's commit stays reachable under
//! `refs/autoresearch/TAG/discarded/HASH` while the branch moves back. `runs/TAG/journal.jsonl`
//! is written and synced before git moves, so a kill at any instant resumes to a consistent
//! state; `runs/TAG/results.tsv` is redone from it.

pub mod journal;
pub mod keep;
pub mod results;
mod worktree;

use std::path::{Path, PathBuf};

pub use git2::Oid;
use git2::{Repository, Signature, build::TreeUpdateBuilder};
use serde::{Deserialize, Serialize};

pub use journal::{Attach, Begin, End, Event, Finish, Judgement, RunEnd, SessionMeta};
pub use keep::{
    Decision, KeepSettings, Margins, Noise, RuleKind, decide, judge, judge_record, pooled_sigma,
    run_seed,
};
pub use results::ResultRow;
pub use worktree::{Checkout, Worktree};

/// The one file experiments change.
pub const TRAIN_FILE: &str = "train/src/main.rs";
pub const NOTES_REF: &str = "refs/notes/autoresearch";

#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    #[error("git: {0}")]
    Git(#[from] git2::Error),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "the working tree has uncommitted changes: {}\ncommit or stash them (`git stash -u`) first: a session commits each experiment and must not sweep your edits into them",
        .0.join(", ")
    )]
    Dirty(Vec<String>),
    #[error(
        "session `{0}` already exists (branch autoresearch/{0}): add --resume to go on with it, or pick another --tag"
    )]
    SessionExists(String),
    #[error("no session `{tag}` in {root}: `autoresearch run --tag {tag}` starts one{known}")]
    NoSession {
        tag: String,
        root: String,
        known: String,
    },
    #[error("`{0}` is not a usable tag: use letters, digits, `.`, `_` and `-` (e.g. nov23)")]
    BadTag(String),
    #[error("no experiment matches `{0}`: `autoresearch results` lists every experiment's hash")]
    UnknownHash(String),
    #[error("`{0}` matches several experiments: give more of the hash")]
    AmbiguousHash(String),
    #[error("journal: {0}")]
    Journal(String),
    #[error("results: {0}")]
    Results(String),
    #[error("{0}")]
    State(String),
}

pub(crate) fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> LedgerError {
    let what = what.into();
    move |source| LedgerError::Io { what, source }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Keep,
    Discard,
    Crash,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Keep => "keep",
            Status::Discard => "discard",
            Status::Crash => "crash",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "keep" => Some(Status::Keep),
            "discard" => Some(Status::Discard),
            "crash" => Some(Status::Crash),
            _ => None,
        }
    }
}

/// One experiment: committed (`begin`), and finished unless it is the one in flight.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Record {
    #[serde(flatten)]
    pub begin: Begin,
    /// Its runs so far, each with its own seed (empty in journals from before runs were kept).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub runs: Vec<RunEnd>,
    pub end: Option<End>,
}

impl Record {
    /// The val_bpb of each successful run: the samples behind its value.
    pub fn values(&self) -> Vec<f64> {
        if self.runs.is_empty() {
            return self.val_bpb().into_iter().collect();
        }
        self.runs
            .iter()
            .filter(|r| r.finish.outcome == "ok")
            .filter_map(|r| r.finish.val_bpb)
            .collect()
    }

    /// Runs with different seeds that came out bit-identical: the train file ignores the seed.
    pub fn seed_ignored(&self) -> bool {
        let ok: Vec<&RunEnd> = self
            .runs
            .iter()
            .filter(|r| r.finish.outcome == "ok" && r.finish.val_bpb.is_some())
            .collect();
        ok.len() >= 2
            && ok.windows(2).all(|w| {
                w[0].seed != w[1].seed
                    && w[0].finish.val_bpb.map(f64::to_bits)
                        == w[1].finish.val_bpb.map(f64::to_bits)
            })
    }

    pub fn status(&self) -> Option<Status> {
        self.end.as_ref().map(|e| e.status)
    }

    pub fn val_bpb(&self) -> Option<f64> {
        self.end.as_ref().and_then(|e| e.finish.val_bpb)
    }

    pub fn short(&self) -> &str {
        &self.begin.hash[..7.min(self.begin.hash.len())]
    }

    pub fn result_row(&self) -> Option<ResultRow> {
        let end = self.end.as_ref()?;
        Some(ResultRow {
            commit: self.short().to_string(),
            val_bpb: end.finish.val_bpb,
            memory_gb: end.finish.memory_gb,
            status: end.status,
            description: self.begin.description.clone(),
        })
    }
}

/// A session as its journal tells it.
#[derive(Clone, Debug)]
pub struct Session {
    pub meta: SessionMeta,
    pub records: Vec<Record>,
    /// The last harness process that took the session up (none in journals from before).
    pub attached: Option<journal::Attach>,
    pub dir: PathBuf,
}

impl Session {
    pub fn load(root: &Path, tag: &str) -> Result<Session, LedgerError> {
        let dir = session_dir(root, tag);
        let path = dir.join("journal.jsonl");
        if !path.is_file() {
            let known = list_sessions(root);
            return Err(LedgerError::NoSession {
                tag: tag.to_string(),
                root: root.display().to_string(),
                known: if known.is_empty() {
                    String::new()
                } else {
                    format!(" (sessions here: {})", known.join(", "))
                },
            });
        }
        let mut meta = None;
        let mut attached = None;
        let mut records: Vec<Record> = Vec::new();
        for event in journal::read(&path)? {
            match event {
                Event::Session(m) => meta = Some(m),
                Event::Attach(a) => attached = Some(a),
                Event::Begin(b) => records.push(Record {
                    begin: b,
                    runs: Vec::new(),
                    end: None,
                }),
                Event::Run(run) => match records.iter_mut().find(|r| r.begin.hash == run.hash) {
                    Some(r) => r.runs.push(run),
                    None => {
                        return Err(LedgerError::Journal(format!(
                            "{}: a run of {} that never began",
                            path.display(),
                            run.hash
                        )));
                    }
                },
                Event::End(e) => match records.iter_mut().find(|r| r.begin.hash == e.hash) {
                    Some(r) => r.end = Some(e),
                    None => {
                        return Err(LedgerError::Journal(format!(
                            "{}: an end for {} that never began",
                            path.display(),
                            e.hash
                        )));
                    }
                },
            }
        }
        let meta = meta
            .ok_or_else(|| LedgerError::Journal(format!("{}: no session line", path.display())))?;
        Ok(Session {
            meta,
            records,
            attached,
            dir,
        })
    }

    /// The kept experiments, oldest first.
    pub fn kept(&self) -> Vec<&Record> {
        self.records
            .iter()
            .filter(|r| r.status() == Some(Status::Keep))
            .collect()
    }

    pub fn best(&self) -> Option<&Record> {
        self.kept()
            .into_iter()
            .filter(|r| r.val_bpb().is_some())
            .min_by(|a, b| a.val_bpb().partial_cmp(&b.val_bpb()).expect("finite"))
    }

    /// The seed noise of one run, pooled over every experiment run more than once (the
    /// baseline, confirmations). Experiments whose seeds change nothing are left out: their
    /// zero spread is not noise measured.
    pub fn noise(&self) -> Option<keep::Noise> {
        let groups: Vec<Vec<f64>> = self
            .records
            .iter()
            .filter(|r| !r.seed_ignored())
            .map(Record::values)
            .collect();
        pooled_sigma(groups.iter().map(Vec::as_slice))
    }

    /// The experiment committed but not finished (a kill mid-run), if any, in a session of one
    /// worker: the last record.
    pub fn pending(&self) -> Option<&Record> {
        self.records.last().filter(|r| r.end.is_none())
    }

    /// Every experiment committed but not finished: those in flight (or killed mid-run).
    pub fn in_flight(&self) -> Vec<&Record> {
        self.records.iter().filter(|r| r.end.is_none()).collect()
    }

    pub fn record(&self, hash: &str) -> Option<&Record> {
        self.records.iter().find(|r| r.begin.hash == hash)
    }

    /// What the proposer has spent over the session (USD; 0 when unpriced).
    pub fn cost_usd(&self) -> f64 {
        self.records
            .iter()
            .filter_map(|r| r.end.as_ref()?.finish.cost_usd)
            .sum()
    }

    pub fn result_rows(&self) -> Vec<ResultRow> {
        self.records.iter().filter_map(Record::result_row).collect()
    }

    pub fn find(&self, prefix: &str) -> Vec<&Record> {
        let prefix = prefix.to_ascii_lowercase();
        self.records
            .iter()
            .filter(|r| r.begin.hash.starts_with(&prefix))
            .collect()
    }
}

pub fn session_dir(root: &Path, tag: &str) -> PathBuf {
    root.join("runs").join(tag)
}

/// Tags with a journal under `runs/`, most recently active last.
pub fn list_sessions(root: &Path) -> Vec<String> {
    let mut found: Vec<(std::time::SystemTime, String)> = std::fs::read_dir(root.join("runs"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let modified = e
                .path()
                .join("journal.jsonl")
                .metadata()
                .ok()?
                .modified()
                .ok()?;
            Some((modified, e.file_name().to_string_lossy().into_owned()))
        })
        .collect();
    found.sort();
    found.into_iter().map(|(_, tag)| tag).collect()
}

/// Finds an experiment by hash prefix across every session in `runs/`.
pub fn find_experiment(root: &Path, prefix: &str) -> Result<(Session, Record), LedgerError> {
    if prefix.len() < 4 || !prefix.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(LedgerError::UnknownHash(prefix.to_string()));
    }
    let mut hits = Vec::new();
    for tag in list_sessions(root) {
        let session = Session::load(root, &tag)?;
        for r in session.find(prefix) {
            hits.push((session.clone(), r.clone()));
        }
    }
    match hits.len() {
        0 => Err(LedgerError::UnknownHash(prefix.to_string())),
        1 => Ok(hits.remove(0)),
        _ => Err(LedgerError::AmbiguousHash(prefix.to_string())),
    }
}

fn check_tag(tag: &str) -> Result<(), LedgerError> {
    let ok = !tag.is_empty()
        && tag.len() <= 64
        && !tag.starts_with(['.', '-'])
        && !tag.ends_with(".lock")
        && !tag.contains("..")
        && tag
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if ok {
        Ok(())
    } else {
        Err(LedgerError::BadTag(tag.to_string()))
    }
}

fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The author of experiment commits: the user's git identity, or ours when none is set.
fn signature(repo: &Repository) -> Result<Signature<'static>, LedgerError> {
    match repo.signature() {
        Ok(sig) => Ok(sig.to_owned()),
        Err(_) => Ok(Signature::now("autoresearch", "autoresearch@localhost")?),
    }
}

/// Paths that differ from HEAD (tracked changes and untracked files, ignored ones aside).
pub fn dirty_paths(repo: &Repository) -> Result<Vec<String>, LedgerError> {
    let mut opts = git2::StatusOptions::new();
    opts.include_untracked(true)
        .include_ignored(false)
        .recurse_untracked_dirs(true);
    Ok(repo
        .statuses(Some(&mut opts))?
        .iter()
        .filter(|s| !s.status().is_ignored() && s.status() != git2::Status::CURRENT)
        .filter_map(|s| s.path().map(str::to_string))
        .collect())
}

/// A session open for writing: the branch is checked out and every change goes through here.
pub struct Ledger {
    repo: Repository,
    root: PathBuf,
    session: Session,
}

impl Ledger {
    /// Starts session `meta.tag` on a new branch from HEAD. Refuses a dirty tree or a tag
    /// already used, before touching anything.
    pub fn start(root: &Path, mut meta: SessionMeta) -> Result<Ledger, LedgerError> {
        check_tag(&meta.tag)?;
        let repo = Repository::open(root)?;
        let dirty = dirty_paths(&repo)?;
        if !dirty.is_empty() {
            return Err(LedgerError::Dirty(dirty));
        }
        let branch = branch_name(&meta.tag);
        let dir = session_dir(root, &meta.tag);
        if repo.find_reference(&format!("refs/heads/{branch}")).is_ok()
            || dir.join("journal.jsonl").exists()
        {
            return Err(LedgerError::SessionExists(meta.tag.clone()));
        }
        let head = repo.head().and_then(|h| h.peel_to_commit()).map_err(|_| {
            LedgerError::State("the repository has no commit yet: commit the project first".into())
        })?;
        std::fs::create_dir_all(dir.join("logs"))
            .map_err(io_err(format!("creating {}", dir.display())))?;
        meta.base = head.id().to_string();
        meta.started_unix = now_unix();
        journal::append(&dir.join("journal.jsonl"), &Event::Session(meta.clone()))?;
        repo.branch(&branch, &head, false)?;
        drop(head);
        repo.set_head(&format!("refs/heads/{branch}"))?;
        tracing::info!(
            "session {} on branch {branch} from {}",
            meta.tag,
            &meta.base[..7]
        );
        Ok(Ledger {
            repo,
            root: root.to_path_buf(),
            session: Session {
                meta,
                records: Vec::new(),
                attached: None,
                dir,
            },
        })
    }

    /// Reopens session `tag` after an interruption: redoes the git side of the last finished
    /// experiment, puts the branch on the experiment in flight (if any: `pending()` tells the
    /// caller to run it again), and the train file back to the branch's.
    pub fn resume(root: &Path, tag: &str) -> Result<Ledger, LedgerError> {
        check_tag(tag)?;
        let journal_path = session_dir(root, tag).join("journal.jsonl");
        if journal_path.is_file() {
            repair_torn_tail(&journal_path)?;
        }
        let session = Session::load(root, tag)?;
        let repo = Repository::open(root)?;
        let branch = format!("refs/heads/{}", branch_name(tag));
        if repo.find_reference(&branch).is_err() && session.records.is_empty() {
            // Killed between the journal's first line and the branch: make it now.
            let base = repo.find_commit(Oid::from_str(&session.meta.base)?)?;
            repo.branch(&branch_name(tag), &base, false)?;
        }
        if repo.find_reference(&branch).is_err() {
            return Err(LedgerError::State(format!(
                "runs/{tag} exists but branch {} does not: it was deleted; move runs/{tag} aside to start afresh",
                branch_name(tag)
            )));
        }
        // The train file may hold a proposal that never got committed; anything else is the user's.
        let dirty: Vec<String> = dirty_paths(&repo)?
            .into_iter()
            .filter(|p| p != TRAIN_FILE)
            .collect();
        if !dirty.is_empty() {
            return Err(LedgerError::Dirty(dirty));
        }
        let on_branch = repo
            .head()
            .ok()
            .and_then(|h| h.name().map(str::to_string))
            .is_some_and(|name| name == branch);
        if !on_branch {
            // HEAD moved (the user checked something else out): the tree is clean but for the
            // train file, so check the session's branch out before anything is built.
            let tip = repo.find_reference(&branch)?.peel_to_commit()?;
            repo.checkout_tree(
                tip.as_object(),
                Some(git2::build::CheckoutBuilder::new().force()),
            )?;
        }
        repo.set_head(&branch)?;
        let ledger = Ledger {
            repo,
            root: root.to_path_buf(),
            session,
        };
        // The last end in the journal's order (with several workers, experiments end in
        // another order than they began).
        if let Some(last) = journal::read(&journal_path)?
            .into_iter()
            .rev()
            .find_map(|e| match e {
                Event::End(end) => Some(end),
                _ => None,
            })
        {
            ledger.apply_end(&last)?;
        }
        // A worker's experiment (a session of several) never had the branch: it stays put.
        if let Some(pending) = ledger
            .session
            .pending()
            .filter(|p| p.begin.worker.is_none())
            .cloned()
        {
            let tip = ledger.tip()?;
            let hash = Oid::from_str(&pending.begin.hash)?;
            if tip != hash {
                if tip.to_string() != pending.begin.parent {
                    return Err(LedgerError::State(format!(
                        "branch {} is at {tip}, neither experiment {} nor its parent: it was moved by hand",
                        branch_name(tag),
                        pending.begin.hash
                    )));
                }
                ledger.set_branch(hash, "autoresearch: resume experiment")?;
            }
        }
        ledger.restore_train_file()?;
        ledger.write_results()?;
        Ok(ledger)
    }

    pub fn session(&self) -> &Session {
        &self.session
    }

    /// Journals that this process now runs the session (its pid, when it started, its stop
    /// conditions).
    pub fn attach(&mut self, mut attach: journal::Attach) -> Result<(), LedgerError> {
        attach.started_unix = now_unix();
        journal::append(
            &self.session.dir.join("journal.jsonl"),
            &Event::Attach(attach.clone()),
        )?;
        self.session.attached = Some(attach);
        Ok(())
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn dir(&self) -> &Path {
        &self.session.dir
    }

    /// The branch tip: the last kept experiment, or the one in flight.
    pub fn tip(&self) -> Result<Oid, LedgerError> {
        let r = self.repo.find_reference(&format!(
            "refs/heads/{}",
            branch_name(&self.session.meta.tag)
        ))?;
        Ok(r.peel_to_commit()?.id())
    }

    /// The train file as committed at `hash`.
    pub fn train_file_at(&self, hash: Oid) -> Result<Vec<u8>, LedgerError> {
        file_at(&self.repo, hash, TRAIN_FILE)
    }

    /// The train file as committed at a commit named by its full hash.
    pub fn train_file_of(&self, hash: &str) -> Result<Vec<u8>, LedgerError> {
        self.train_file_at(Oid::from_str(hash)?)
    }

    /// The experiment whose train file is exactly `content`, if one was run in this session.
    pub fn tried(&self, content: &[u8]) -> Result<Option<&Record>, LedgerError> {
        let blob = Oid::hash_object(git2::ObjectType::Blob, content)?;
        for r in &self.session.records {
            let commit = self.repo.find_commit(Oid::from_str(&r.begin.hash)?)?;
            if commit.tree()?.get_path(Path::new(TRAIN_FILE))?.id() == blob {
                return Ok(Some(r));
            }
        }
        Ok(None)
    }

    /// Commits the work tree's train file as the next experiment and moves the branch onto it.
    /// The journal line is synced before the branch moves.
    pub fn begin(&mut self, description: &str, rationale: &str) -> Result<Begin, LedgerError> {
        if let Some(p) = self.session.pending() {
            return Err(LedgerError::State(format!(
                "experiment {} is still in flight: finish it first",
                p.begin.hash
            )));
        }
        let root = self.root.clone();
        let begin = self.commit_experiment(&root, self.tip()?, None, description, rationale)?;
        self.set_branch(
            Oid::from_str(&begin.hash)?,
            &format!("autoresearch: experiment {}", begin.index),
        )?;
        Ok(begin)
    }

    /// Commits the train file of `worker`'s checkout `dir` as the next experiment, a child of
    /// `parent` (the kept state when its episode began). The branch does not move: other
    /// experiments are in flight, and it moves only onto a kept one.
    pub fn begin_on(
        &mut self,
        worker: usize,
        dir: &Path,
        parent: Oid,
        description: &str,
        rationale: &str,
    ) -> Result<Begin, LedgerError> {
        let begin = self.commit_experiment(dir, parent, Some(worker), description, rationale)?;
        // Reachable by a ref while no branch holds it (a long-dead session and `git gc`).
        self.repo.reference(
            &self.in_flight_ref(&begin.hash),
            Oid::from_str(&begin.hash)?,
            true,
            "autoresearch: in flight",
        )?;
        Ok(begin)
    }

    fn in_flight_ref(&self, hash: &str) -> String {
        format!(
            "refs/autoresearch/{}/in-flight/{hash}",
            self.session.meta.tag
        )
    }

    fn commit_experiment(
        &mut self,
        dir: &Path,
        parent: Oid,
        worker: Option<usize>,
        description: &str,
        rationale: &str,
    ) -> Result<Begin, LedgerError> {
        let parent = self.repo.find_commit(parent)?;
        let path = dir.join(TRAIN_FILE);
        let content =
            std::fs::read(&path).map_err(io_err(format!("reading {}", path.display())))?;
        let blob = self.repo.blob(&content)?;
        let mut update = TreeUpdateBuilder::new();
        update.upsert(TRAIN_FILE, blob, git2::FileMode::Blob);
        let tree = self
            .repo
            .find_tree(update.create_updated(&self.repo, &parent.tree()?)?)?;
        let description = description.trim();
        let message = if rationale.trim().is_empty() {
            format!("{description}\n")
        } else {
            format!("{description}\n\n{}\n", rationale.trim())
        };
        let sig = signature(&self.repo)?;
        let oid = self
            .repo
            .commit(None, &sig, &sig, &message, &tree, &[&parent])?;
        let begin = Begin {
            index: self.session.records.len(),
            hash: oid.to_string(),
            parent: parent.id().to_string(),
            description: description.to_string(),
            rationale: rationale.trim().to_string(),
            started_unix: now_unix(),
            worker,
        };
        journal::append(&self.journal_path(), &Event::Begin(begin.clone()))?;
        self.session.records.push(Record {
            begin: begin.clone(),
            runs: Vec::new(),
            end: None,
        });
        Ok(begin)
    }

    /// The experiment in flight named `hash`, or the last one when `hash` is `None`.
    fn flying(&self, hash: Option<&str>) -> Result<&Record, LedgerError> {
        match hash {
            None => self.session.pending(),
            Some(h) => self.session.record(h).filter(|r| r.end.is_none()),
        }
        .ok_or_else(|| LedgerError::State("no such experiment in flight".into()))
    }

    /// The seed for the next run of the experiment in flight.
    pub fn next_seed(&self) -> Option<u64> {
        self.next_seed_of(None)
    }

    /// The seed for the next run of experiment `hash` (in flight), or of the last one.
    pub fn next_seed_of(&self, hash: Option<&str>) -> Option<u64> {
        let p = self.flying(hash).ok()?;
        Some(run_seed(
            self.session.meta.seed,
            p.begin.index,
            p.runs.len(),
        ))
    }

    /// Records one finished run of the experiment in flight (synced before anything else).
    pub fn record_run(&mut self, seed: u64, finish: Finish) -> Result<RunEnd, LedgerError> {
        self.record_run_of(None, seed, finish)
    }

    /// Records one finished run of experiment `hash` (in flight), or of the last one.
    pub fn record_run_of(
        &mut self,
        hash: Option<&str>,
        seed: u64,
        finish: Finish,
    ) -> Result<RunEnd, LedgerError> {
        let pending = self.flying(hash)?;
        let run = RunEnd {
            hash: pending.begin.hash.clone(),
            run: pending.runs.len(),
            seed,
            finish,
        };
        journal::append(&self.journal_path(), &Event::Run(run.clone()))?;
        self.record_mut(&run.hash).runs.push(run.clone());
        Ok(run)
    }

    fn record_mut(&mut self, hash: &str) -> &mut Record {
        self.session
            .records
            .iter_mut()
            .find(|r| r.begin.hash == hash)
            .expect("a record of this session")
    }

    /// Records how the experiment in flight ended and moves git accordingly: kept, the branch
    /// stays; otherwise the commit goes under `refs/autoresearch/TAG/discarded/` and the branch
    /// and train file go back to its parent.
    pub fn finish(
        &mut self,
        finish: Finish,
        status: Status,
        judgement: Option<Judgement>,
    ) -> Result<End, LedgerError> {
        self.finish_of(None, finish, status, judgement)
    }

    /// Records how experiment `hash` (in flight; the last one when `None`) ended. Kept, the
    /// branch moves onto it (a worker's experiment may have begun from an older kept state:
    /// the session's history is then a tree, and the branch is on its best leaf).
    pub fn finish_of(
        &mut self,
        hash: Option<&str>,
        finish: Finish,
        status: Status,
        judgement: Option<Judgement>,
    ) -> Result<End, LedgerError> {
        let pending = self.flying(hash)?.clone();
        let status = if finish.outcome == "ok" {
            status
        } else {
            Status::Crash
        };
        let end = End {
            index: pending.begin.index,
            hash: pending.begin.hash.clone(),
            status,
            finished_unix: now_unix(),
            finish,
            judgement,
        };
        journal::append(&self.journal_path(), &Event::End(end.clone()))?;
        self.record_mut(&end.hash).end = Some(end.clone());
        self.apply_end(&end)?;
        self.write_results()?;
        Ok(end)
    }

    /// Writes the train file of experiment `hash` into the checkout `dir` (to run it again).
    pub fn checkout_train_file(&self, dir: &Path, hash: &str) -> Result<(), LedgerError> {
        let content = self.train_file_of(hash)?;
        let path = dir.join(TRAIN_FILE);
        std::fs::write(&path, content).map_err(io_err(format!("writing {}", path.display())))
    }

    /// Puts the branch's train file back in the work tree (and the index), dropping any edit.
    pub fn restore_train_file(&self) -> Result<(), LedgerError> {
        let tip = self.repo.find_commit(self.tip()?)?;
        let content = file_at(&self.repo, tip.id(), TRAIN_FILE)?;
        let path = self.root.join(TRAIN_FILE);
        if std::fs::read(&path).ok().as_deref() != Some(&content[..]) {
            std::fs::write(&path, &content)
                .map_err(io_err(format!("restoring {}", path.display())))?;
        }
        let mut index = self.repo.index()?;
        index.read_tree(&tip.tree()?)?;
        index.write()?;
        Ok(())
    }

    fn journal_path(&self) -> PathBuf {
        self.session.dir.join("journal.jsonl")
    }

    fn set_branch(&self, oid: Oid, why: &str) -> Result<(), LedgerError> {
        let name = format!("refs/heads/{}", branch_name(&self.session.meta.tag));
        self.repo.reference(&name, oid, true, why)?;
        self.restore_train_file()
    }

    /// The git side of a finished experiment; safe to repeat.
    fn apply_end(&self, end: &End) -> Result<(), LedgerError> {
        let oid = Oid::from_str(&end.hash)?;
        let sig = signature(&self.repo)?;
        self.repo.note(
            &sig,
            &sig,
            Some(NOTES_REF),
            oid,
            &note_text(&self.session.meta.tag, end),
            true,
        )?;
        if end.status == Status::Keep {
            let tip = self.tip()?;
            // Redone on resume: a branch already on it, or past it (an experiment begun from
            // it is in flight), stays where it is.
            if tip != oid && !self.repo.graph_descendant_of(tip, oid)? {
                if !self.repo.graph_descendant_of(oid, tip)? {
                    // Another worker's experiment, kept while this one ran, leaves the branch:
                    // a ref keeps it reachable.
                    let name = format!(
                        "refs/autoresearch/{}/superseded/{tip}",
                        self.session.meta.tag
                    );
                    self.repo
                        .reference(&name, tip, true, "autoresearch: superseded")?;
                }
                self.set_branch(oid, &format!("autoresearch: keep experiment {}", end.index))?;
            }
        } else {
            let name = format!(
                "refs/autoresearch/{}/discarded/{}",
                self.session.meta.tag, end.hash
            );
            self.repo
                .reference(&name, oid, true, "autoresearch: discarded")?;
            if self.tip()? == oid {
                let parent = self.repo.find_commit(oid)?.parent_id(0)?;
                self.set_branch(parent, "autoresearch: revert")?;
            }
        }
        // Last: the branch or a ref above holds it now.
        if let Ok(mut r) = self.repo.find_reference(&self.in_flight_ref(&end.hash)) {
            r.delete()?;
        }
        Ok(())
    }

    fn write_results(&self) -> Result<(), LedgerError> {
        results::write(
            &self.session.dir.join("results.tsv"),
            &self.session.result_rows(),
        )
    }
}

pub fn branch_name(tag: &str) -> String {
    format!("autoresearch/{tag}")
}

/// The note attached to an experiment commit: `key: value` lines, for `git log --notes=autoresearch`.
fn note_text(tag: &str, end: &End) -> String {
    let f = &end.finish;
    let mut text = format!(
        "session: {tag}\nexperiment: {}\nstatus: {}\noutcome: {}\n",
        end.index,
        end.status.as_str(),
        f.outcome
    );
    if let Some(v) = f.val_bpb {
        text += &format!("val_bpb: {v:.6}\n");
    }
    text += &format!("memory_gb: {:.1}\n", f.memory_gb);
    if let Some(serde_json::Value::Object(summary)) = &f.summary {
        for key in [
            "training_seconds",
            "num_steps",
            "total_tokens_M",
            "mfu_percent",
        ] {
            if let Some(v) = summary.get(key) {
                text += &format!("{key}: {v}\n");
            }
        }
    }
    if let Some(j) = &end.judgement {
        text += &format!("runs: {}\n", j.runs);
        if let Some(g) = j.gain_sigma {
            text += &format!("gain_sigma: {g:.2}\n");
        }
    }
    if let Some(cost) = f.cost_usd {
        text += &format!("cost_usd: {cost:.4}\n");
    }
    text
}

/// A file's bytes at a commit.
pub fn file_at(repo: &Repository, commit: Oid, path: &str) -> Result<Vec<u8>, LedgerError> {
    let tree = repo.find_commit(commit)?.tree()?;
    let entry = tree.get_path(Path::new(path))?;
    Ok(repo.find_blob(entry.id())?.content().to_vec())
}

/// The unified diff of an experiment's commit against its parent.
pub fn diff_against_parent(root: &Path, hash: &str) -> Result<String, LedgerError> {
    diff_in(&Repository::open(root)?, hash)
}

/// Each experiment's diff against its parent, the repository opened once (the report's).
pub fn diffs_against_parents(
    root: &Path,
    hashes: &[&str],
) -> Result<Vec<Result<String, LedgerError>>, LedgerError> {
    let repo = Repository::open(root)?;
    Ok(hashes.iter().map(|h| diff_in(&repo, h)).collect())
}

fn diff_in(repo: &Repository, hash: &str) -> Result<String, LedgerError> {
    let commit = repo.find_commit(Oid::from_str(hash)?)?;
    let parent = commit.parent(0)?;
    let diff = repo.diff_tree_to_tree(Some(&parent.tree()?), Some(&commit.tree()?), None)?;
    let mut out = String::new();
    diff.print(git2::DiffFormat::Patch, |_, _, line| {
        if matches!(line.origin(), '+' | '-' | ' ') {
            out.push(line.origin());
        }
        out.push_str(&String::from_utf8_lossy(line.content()));
        true
    })?;
    Ok(out)
}

/// A journal whose last line was cut by a kill: drop the fragment so the next append starts
/// on a line of its own.
fn repair_torn_tail(path: &Path) -> Result<(), LedgerError> {
    let bytes = std::fs::read(path).map_err(io_err(format!("reading {}", path.display())))?;
    if bytes.is_empty() || bytes.ends_with(b"\n") {
        return Ok(());
    }
    let keep = bytes.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
    tracing::warn!("{}: dropping a torn last line", path.display());
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(io_err(format!("opening {}", path.display())))?;
    file.set_len(keep as u64)
        .and_then(|()| file.sync_data())
        .map_err(io_err(format!("repairing {}", path.display())))
}

/// Clones the repository at `src` (its HEAD) into `dest`, which must not exist or be empty.
pub fn clone_local(src: &Path, dest: &Path) -> Result<(), LedgerError> {
    if dest.read_dir().is_ok_and(|mut d| d.next().is_some()) {
        return Err(LedgerError::State(format!(
            "{} is not empty: pick a new directory",
            dest.display()
        )));
    }
    git2::build::RepoBuilder::new().clone(&src.to_string_lossy(), dest)?;
    Ok(())
}

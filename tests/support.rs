//! Helpers for end-to-end tests: find the real `autoresearch` binary and run it in a sandboxed
//! home and cache.

pub mod browser;
pub mod fake_llm;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

/// `target/<profile>/autoresearch`, built by `cargo test --workspace` (the binary's own
/// integration tests make cargo build it).
pub fn autoresearch_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("the test binary's path");
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>");
    let bin = dir.join(format!("autoresearch{}", std::env::consts::EXE_SUFFIX));
    assert!(
        bin.exists(),
        "{} is missing: run the tests with `cargo test --workspace`, or `cargo build -p autoresearch` first",
        bin.display()
    );
    bin
}

/// Runs `autoresearch args…` with HOME and the cache inside `root`, and no inherited
/// `AUTORESEARCH_*` settings.
pub fn run(root: &Path, args: &[&str]) -> Output {
    let mut cmd = Command::new(autoresearch_bin());
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("AUTORESEARCH_") {
            cmd.env_remove(key);
        }
    }
    cmd.env("HOME", root)
        .env("AUTORESEARCH_CACHE", root.join("cache"))
        .env("NO_COLOR", "1")
        .current_dir(root)
        .args(args)
        .output()
        .expect("autoresearch runs")
}

pub fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The workspace root (this crate lives in `tests/`).
pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

pub fn git(repo: &Path, args: &[&str]) -> String {
    let out = Command::new("git")
        .args(["-c", "user.name=test", "-c", "user.email=test@localhost"])
        .args(args)
        .current_dir(repo)
        .output()
        .expect("git runs");
    assert!(
        out.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A fresh git repository holding the project as it is in this checkout (committed or not),
/// in one commit: the scenario a user starts a session from.
pub fn project_copy(dest: &Path) {
    copy_and_commit(dest, |_| {});
}

/// `project_copy`, with `edit` applied to the copy before its commit.
fn copy_and_commit(dest: &Path, edit: impl FnOnce(&Path)) {
    let listed = Command::new("git")
        .args([
            "ls-files",
            "-z",
            "--cached",
            "--others",
            "--exclude-standard",
        ])
        .current_dir(workspace())
        .output()
        .expect("git ls-files");
    for name in listed.stdout.split(|&b| b == 0).filter(|n| !n.is_empty()) {
        let name = String::from_utf8_lossy(name).into_owned();
        let from = workspace().join(&name);
        if !from.is_file() {
            continue; // deleted in the work tree
        }
        let to = dest.join(&name);
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        std::fs::copy(&from, &to).unwrap();
    }
    edit(dest);
    git(dest, &["init", "-q", "-b", "main"]);
    git(dest, &["add", "-A"]);
    git(dest, &["commit", "-q", "-m", "project"]);
}

pub struct Project {
    /// One project at a time per test binary: sessions train on the wall clock, and two of
    /// them (a build beside a run) on two cores can stretch a 3 s budget's steps past what the
    /// harness allows an honest run.
    _turn: std::sync::MutexGuard<'static, ()>,
    _dir: tempfile::TempDir,
    pub repo: PathBuf,
    pub cache: PathBuf,
}

/// The train file's tiny batch per step, and a quarter of it. Sessions here test the loop, not
/// learning: a quarter makes the untimed warm-up steps of every run a quarter as long, and a
/// step stays well inside the room the harness allows past the budget on a slow machine.
const TINY_BATCH: &str = "    total_batch_size: 8 * 256,\n    device_batch_size: 8,";
const QUICK_BATCH: &str = "    total_batch_size: 2 * 256,\n    device_batch_size: 2,";

/// A copy of the project with the builtin tiny data prepared beside it; its train file takes a
/// quarter of the tiny batch per step (`QUICK_BATCH`).
pub fn project() -> Project {
    static TURN: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let turn = TURN.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("repo");
    let cache = dir.path().join("cache");
    copy_and_commit(&repo, |repo| {
        let train = repo.join("train/src/main.rs");
        let source = std::fs::read_to_string(&train).unwrap();
        assert!(
            source.contains(TINY_BATCH),
            "the train file's tiny batch is no longer `{TINY_BATCH}`"
        );
        std::fs::write(&train, source.replace(TINY_BATCH, QUICK_BATCH)).unwrap();
    });
    let p = Project {
        _turn: turn,
        _dir: dir,
        repo,
        cache,
    };
    let out = p.run(&[
        "prepare",
        "--source",
        "builtin",
        "--preset",
        "tiny",
        "--builtin-mb",
        "1",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    p
}

impl Project {
    pub fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(autoresearch_bin());
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("AUTORESEARCH_") {
                cmd.env_remove(key);
            }
        }
        // Experiments share the runner tests' build of candle: compiled once per CI run.
        cmd.env(
            "AUTORESEARCH_TARGET_DIR",
            workspace().join("target/runner-tests"),
        )
        .env("AUTORESEARCH_CACHE", &self.cache)
        .env("NO_COLOR", "1")
        .current_dir(&self.repo)
        .args(args);
        cmd
    }

    pub fn run(&self, args: &[&str]) -> Output {
        self.command(args).output().expect("autoresearch runs")
    }

    pub fn session(&self, tag: &str, max: usize, resume: bool) -> Command {
        self.session_with_budget(tag, max, resume, "3")
    }

    /// `session` with its own training budget, in seconds.
    pub fn session_with_budget(
        &self,
        tag: &str,
        max: usize,
        resume: bool,
        budget: &str,
    ) -> Command {
        let max = max.to_string();
        let mut args = vec![
            "run",
            "--agent",
            "sweep",
            "--tag",
            tag,
            "--max-experiments",
            &max,
            "--budget",
            budget,
            "--device",
            "cpu",
        ];
        if resume {
            args.push("--resume");
        }
        self.command(&args)
    }

    pub fn journal(&self, tag: &str) -> Vec<Value> {
        std::fs::read_to_string(self.repo.join("runs").join(tag).join("journal.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }
}

/// Checks, with the git CLI, that the repository and the files agree with the journal, and
/// returns (hash, status) per experiment.
pub fn check_consistent(p: &Project, tag: &str) -> Vec<(String, String)> {
    let events = p.journal(tag);
    assert_eq!(events[0]["event"], "session");
    let base = events[0]["base"].as_str().unwrap().to_string();
    let begins: Vec<&Value> = events.iter().filter(|e| e["event"] == "begin").collect();
    let ends: Vec<&Value> = events.iter().filter(|e| e["event"] == "end").collect();
    assert_eq!(
        begins.len(),
        ends.len(),
        "every experiment finished exactly once"
    );
    // Ends may come in another order than begins (several workers): matched by hash.
    let ends: Vec<&Value> = begins
        .iter()
        .map(|b| {
            let mine: Vec<&&Value> = ends.iter().filter(|e| e["hash"] == b["hash"]).collect();
            assert_eq!(mine.len(), 1, "{}: ended {} times", b["hash"], mine.len());
            *mine[0]
        })
        .collect();
    let mut experiments = Vec::new();
    for (i, (b, e)) in begins.iter().zip(&ends).enumerate() {
        assert_eq!(
            b["index"], i as u64,
            "indices run 0.. without gaps or repeats"
        );
        assert_eq!(e["index"], b["index"]);
        experiments.push((
            b["hash"].as_str().unwrap().to_string(),
            e["status"].as_str().unwrap().to_string(),
        ));
    }
    let mut hashes: Vec<&String> = experiments.iter().map(|(h, _)| h).collect();
    hashes.sort();
    hashes.dedup();
    assert_eq!(hashes.len(), experiments.len(), "no experiment twice");

    // Runs: numbered 0.. per experiment without gaps or doubles, every one its own seed, and
    // a successful experiment's val_bpb the mean of its runs.
    let runs: Vec<&Value> = events.iter().filter(|e| e["event"] == "run").collect();
    let mut seeds: Vec<u64> = runs.iter().map(|r| r["seed"].as_u64().unwrap()).collect();
    seeds.sort();
    seeds.dedup();
    assert_eq!(seeds.len(), runs.len(), "a seed used twice");
    for ((hash, _), end) in experiments.iter().zip(&ends) {
        let mine: Vec<&&Value> = runs.iter().filter(|r| r["hash"] == hash.as_str()).collect();
        for (n, r) in mine.iter().enumerate() {
            assert_eq!(r["run"], n as u64, "{hash}: runs out of order or doubled");
        }
        if end["outcome"] == "ok" {
            let vals: Vec<f64> = mine
                .iter()
                .map(|r| r["val_bpb"].as_f64().unwrap())
                .collect();
            assert!(!vals.is_empty(), "{hash}: ok without a run");
            let mean = vals.iter().sum::<f64>() / vals.len() as f64;
            assert!(
                (end["val_bpb"].as_f64().unwrap() - mean).abs() < 1e-12,
                "{hash}"
            );
            assert_eq!(end["judgement"]["runs"], vals.len() as u64);
        }
    }

    let branch = format!("autoresearch/{tag}");
    let on_branch: Vec<String> = git(
        &p.repo,
        &["rev-list", "--reverse", &format!("{base}..{branch}")],
    )
    .lines()
    .map(str::to_string)
    .collect();
    let kept: Vec<String> = experiments
        .iter()
        .filter(|(_, s)| s == "keep")
        .map(|(h, _)| h.clone())
        .collect();
    // With several workers a kept experiment may have begun from an older kept state: the
    // branch is then on the best leaf of a tree, and a kept experiment off it keeps a ref.
    let off_branch: Vec<&String> = kept.iter().filter(|h| !on_branch.contains(h)).collect();
    assert!(
        on_branch.iter().all(|h| kept.contains(h)),
        "the branch holds only kept experiments"
    );
    let last_kept = events
        .iter()
        .filter(|e| e["event"] == "end" && e["status"] == "keep")
        .filter_map(|e| e["hash"].as_str())
        .next_back()
        .map(str::to_string);
    assert_eq!(
        on_branch.last(),
        last_kept.as_ref(),
        "the branch ends on the experiment kept last"
    );
    // The ledger names a superseded ref after the tip it moves the branch off; a kept
    // experiment below that tip (a chain one worker kept while another's older start won)
    // stays reachable through it, with no ref of its own.
    let superseded = git(
        &p.repo,
        &[
            "for-each-ref",
            "--format=%(objectname)",
            &format!("refs/autoresearch/{tag}/superseded/"),
        ],
    );
    for hash in &off_branch {
        let reachable = superseded.lines().any(|tip| {
            Command::new("git")
                .current_dir(&p.repo)
                .args(["merge-base", "--is-ancestor", hash.as_str(), tip])
                .status()
                .is_ok_and(|s| s.success())
        });
        assert!(
            reachable,
            "{hash}: a kept experiment off the branch stays reachable through a superseded ref"
        );
    }
    if !begins.iter().any(|b| b.get("worker").is_some()) {
        assert_eq!(
            on_branch, kept,
            "the branch holds exactly the kept experiments"
        );
    }
    for (hash, status) in &experiments {
        if status != "keep" {
            let r = git(
                &p.repo,
                &[
                    "rev-parse",
                    &format!("refs/autoresearch/{tag}/discarded/{hash}"),
                ],
            );
            assert_eq!(r.trim(), hash);
        }
        let note = git(&p.repo, &["notes", "--ref=autoresearch", "show", hash]);
        assert!(
            note.contains(&format!("status: {status}")),
            "{hash}: {note}"
        );
    }
    let tsv = std::fs::read_to_string(p.repo.join("runs").join(tag).join("results.tsv")).unwrap();
    let rows: Vec<Vec<&str>> = tsv
        .lines()
        .skip(1)
        .map(|l| l.split('\t').collect())
        .collect();
    assert_eq!(rows.len(), experiments.len());
    for ((row, (hash, status)), end) in rows.iter().zip(&experiments).zip(&ends) {
        assert_eq!(row[0], &hash[..7]);
        assert_eq!(row[3], status);
        let val = end["val_bpb"].as_f64().unwrap_or(0.0);
        assert_eq!(row[1], format!("{val:.6}"));
    }
    assert_eq!(
        git(&p.repo, &["status", "--porcelain"]),
        "",
        "the tree is clean"
    );
    assert_eq!(
        git(&p.repo, &["symbolic-ref", "HEAD"]).trim(),
        format!("refs/heads/{branch}")
    );
    experiments
}

/// Descendants of `pid` whose command name starts with `name` (a run's train process is a
/// grandchild: the harness's child is its supervisor).
pub fn descendants(pid: u32, name: &str) -> Vec<u32> {
    let mut procs = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(child) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{child}/stat")) else {
            continue;
        };
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        let comm = stat[open + 1..close].to_string();
        let Some(ppid) = stat[close + 2..]
            .split(' ')
            .nth(1)
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        procs.push((child, ppid, comm));
    }
    let mut tree = vec![pid];
    let mut found = Vec::new();
    while let Some(parent) = tree.pop() {
        for (child, ppid, comm) in &procs {
            if *ppid == parent {
                tree.push(*child);
                if comm.starts_with(name) {
                    found.push(*child);
                }
            }
        }
    }
    found
}

/// Checks request bodies against the official SDK's request type (`tests/sdk_types.py`, strict
/// about unknown keys and list items) with the Python in `AUTORESEARCH_SDK_PYTHON`, which has
/// the `openai` and `anthropic` packages. Without it the check is skipped, with a note, unless
/// `AUTORESEARCH_SDK_REQUIRED=1` (CI) makes that a failure.
pub fn assert_conforms_to_sdk(provider: &str, bodies: &[Value]) {
    let Some(python) = std::env::var_os("AUTORESEARCH_SDK_PYTHON") else {
        assert!(
            std::env::var("AUTORESEARCH_SDK_REQUIRED").as_deref() != Ok("1"),
            "AUTORESEARCH_SDK_PYTHON is not set: point it at a Python with `pip install openai anthropic`"
        );
        eprintln!("skipped the SDK request-type check: AUTORESEARCH_SDK_PYTHON is not set");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let mut paths = Vec::new();
    for (i, body) in bodies.iter().enumerate() {
        let path = dir.path().join(format!("{provider}-{i}.json"));
        std::fs::write(&path, body.to_string()).unwrap();
        paths.push(path);
    }
    let out = Command::new(python)
        .arg(workspace().join("tests/sdk_types.py"))
        .arg(provider)
        .args(&paths)
        .output()
        .expect("the SDK check runs");
    assert!(
        out.status.success(),
        "request bodies that the {provider} SDK's types reject:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A Slurm cluster to submit to: the one that answers, else (as root, with Debian's slurm-wlm and
/// munge installed) a single-node one on localhost started by `tests/slurm/start.sh`. `false`
/// when there is none, unless `AUTORESEARCH_SLURM_REQUIRED` is set (CI), which fails instead.
pub fn slurm_cluster() -> bool {
    let script = workspace().join("tests/slurm/start.sh");
    let started = Command::new("bash").arg(&script).output().map(|o| {
        (
            o.status.success(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        )
    });
    match started {
        Ok((true, _)) => true,
        Ok((false, why)) if std::env::var_os("AUTORESEARCH_SLURM_REQUIRED").is_some() => {
            panic!("no Slurm cluster could be started: {why}")
        }
        Err(e) if std::env::var_os("AUTORESEARCH_SLURM_REQUIRED").is_some() => {
            panic!("no Slurm cluster could be started: {e}")
        }
        _ => {
            eprintln!(
                "skipped: no Slurm cluster here (apt-get install slurm-wlm munge, as root; AUTORESEARCH_SLURM_REQUIRED=1 makes this a failure)"
            );
            false
        }
    }
}

//! The research loop end to end: real `autoresearch run` processes on a copy of the project,
//! real training on CPU, real git, checked with the git CLI.

use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use autoresearch_tests::{autoresearch_bin, git, project_copy, stderr, stdout, workspace};
use serde_json::Value;

struct Project {
    _dir: tempfile::TempDir,
    repo: PathBuf,
    cache: PathBuf,
}

/// A copy of the project with the builtin tiny data prepared beside it.
fn project() -> Project {
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("repo");
    let cache = dir.path().join("cache");
    project_copy(&repo);
    let p = Project {
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
    fn command(&self, args: &[&str]) -> Command {
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

    fn run(&self, args: &[&str]) -> Output {
        self.command(args).output().expect("autoresearch runs")
    }

    fn session(&self, tag: &str, max: usize, resume: bool) -> Command {
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
            "3",
            "--device",
            "cpu",
        ];
        if resume {
            args.push("--resume");
        }
        self.command(&args)
    }

    fn journal(&self, tag: &str) -> Vec<Value> {
        std::fs::read_to_string(self.repo.join("runs").join(tag).join("journal.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }
}

/// Checks, with the git CLI, that the repository and the files agree with the journal, and
/// returns (hash, status) per experiment.
fn check_consistent(p: &Project, tag: &str) -> Vec<(String, String)> {
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
    let mut experiments = Vec::new();
    for (i, (b, e)) in begins.iter().zip(&ends).enumerate() {
        assert_eq!(
            b["index"], i as u64,
            "indices run 0.. without gaps or repeats"
        );
        assert_eq!(b["hash"], e["hash"]);
        experiments.push((
            b["hash"].as_str().unwrap().to_string(),
            e["status"].as_str().unwrap().to_string(),
        ));
    }
    let mut hashes: Vec<&String> = experiments.iter().map(|(h, _)| h).collect();
    hashes.sort();
    hashes.dedup();
    assert_eq!(hashes.len(), experiments.len(), "no experiment twice");

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
    assert_eq!(
        on_branch, kept,
        "the branch holds exactly the kept experiments"
    );
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

#[test]
fn a_sweep_session_keeps_exactly_the_improvements() {
    let p = project();
    let out = p.session("s1", 4, false).output().unwrap();
    assert!(out.status.success(), "{}\n{}", stdout(&out), stderr(&out));
    let experiments = check_consistent(&p, "s1");
    assert_eq!(experiments.len(), 4);
    assert_eq!(experiments[0].1, "keep", "the baseline is kept");
    let text = stdout(&out);
    assert!(text.contains("4 experiments:"), "{text}");

    let log: Value = serde_json::from_slice(&p.run(&["log", "--json"]).stdout).unwrap();
    let kept = experiments.iter().filter(|(_, s)| s == "keep").count();
    assert_eq!(log["kept"].as_array().unwrap().len(), kept);
    assert_eq!(log["totals"]["experiments"], 4);
    let results: Value = serde_json::from_slice(&p.run(&["results", "--json"]).stdout).unwrap();
    assert_eq!(results.as_array().unwrap().len(), 4);
    // Each sweep step changes one constant of the train file.
    let show = p.run(&["show", &experiments[1].0[..8]]);
    let shown = stdout(&show);
    assert!(
        show.status.success() && shown.contains("+++ b/train/src/main.rs"),
        "{shown}"
    );
    let notes = git(
        &p.repo,
        &["log", "--notes=autoresearch", "-1", &experiments[0].0],
    );
    assert!(notes.contains("val_bpb: "), "{notes}");
    let plot = p.run(&["plot"]);
    assert!(plot.status.success(), "{}", stderr(&plot));
    let png = std::fs::read(p.repo.join("runs/s1/progress.png")).unwrap();
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
}

/// Children of `pid` whose command name starts with `name`.
fn children(pid: u32, name: &str) -> Vec<u32> {
    let mut found = Vec::new();
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
        let comm = &stat[open + 1..close];
        let ppid: u32 = stat[close + 2..]
            .split(' ')
            .nth(1)
            .unwrap()
            .parse()
            .unwrap();
        if ppid == pid && comm.starts_with(name) {
            found.push(child);
        }
    }
    found
}

/// Starts a session, waits until `moment` holds, and kills the harness with SIGKILL.
fn kill_when(p: &Project, tag: &str, resume: bool, moment: &dyn Fn(u32) -> bool) {
    let mut child = p
        .session(tag, 4, resume)
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(400);
    loop {
        if moment(child.id()) {
            child.kill().unwrap(); // SIGKILL
            child.wait().unwrap();
            return;
        }
        if let Some(status) = child.try_wait().unwrap() {
            panic!("the session ended ({status}) before the moment to kill it");
        }
        assert!(Instant::now() < deadline, "the moment never came");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn kill_nine_at_any_point_then_resume_loses_nothing() {
    let p = project();
    let ends = |p: &Project| {
        p.journal("k")
            .iter()
            .filter(|e| e["event"] == "end")
            .count()
    };
    // During the baseline's build.
    kill_when(&p, "k", false, &|pid| !children(pid, "cargo").is_empty());
    assert_eq!(ends(&p), 0);
    // During training.
    kill_when(&p, "k", true, &|pid| !children(pid, "train-bin").is_empty());
    // Right after a verdict is journaled, while git may still be moving.
    let before = ends(&p);
    kill_when(&p, "k", true, &|_| {
        std::fs::read_to_string(p.repo.join("runs/k/journal.jsonl")).is_ok_and(|t| {
            t.lines()
                .filter(|l| l.contains("\"event\":\"end\""))
                .count()
                > before
        })
    });
    // The run left nothing behind.
    std::thread::sleep(Duration::from_millis(200));
    let out = p.session("k", 4, true).output().unwrap();
    assert!(out.status.success(), "{}\n{}", stdout(&out), stderr(&out));
    let experiments = check_consistent(&p, "k");
    assert_eq!(experiments.len(), 4, "{experiments:?}");
}

#[test]
fn ctrl_c_stops_cleanly_and_the_session_goes_on() {
    let p = project();
    let mut child = p.session("c", 3, false).spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(400);
    // Interrupt the second experiment (the first proposal) mid-training.
    let mut trained = 0;
    loop {
        let training = !children(child.id(), "train-bin").is_empty();
        let ends = std::fs::read_to_string(p.repo.join("runs/c/journal.jsonl"))
            .map_or(0, |t| t.matches("\"event\":\"end\"").count());
        if training && ends == 1 {
            trained += 1;
            if trained > 10 {
                break;
            }
        }
        assert!(
            child.try_wait().unwrap().is_none(),
            "the session ended early"
        );
        assert!(Instant::now() < deadline, "no second experiment");
        std::thread::sleep(Duration::from_millis(50));
    }
    Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    let started = Instant::now();
    let status = child.wait().unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "Ctrl-C stops promptly"
    );
    assert_eq!(status.code(), Some(130));
    let experiments = check_consistent(&p, "c");
    assert_eq!(experiments.len(), 2);
    assert_eq!(experiments[1].1, "crash");
    let journal = p.journal("c");
    assert_eq!(journal.last().unwrap()["outcome"], "interrupted");
    // The train file is the kept state: the baseline's.
    let baseline = git(
        &p.repo,
        &["show", &format!("{}:train/src/main.rs", experiments[0].0)],
    );
    assert_eq!(
        std::fs::read_to_string(p.repo.join("train/src/main.rs")).unwrap(),
        baseline
    );
    let out = p.session("c", 3, true).output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(check_consistent(&p, "c").len(), 3);
}

#[test]
fn refusals_say_what_to_do() {
    let p = project();
    std::fs::write(p.repo.join("README.md"), "my edit\n").unwrap();
    let out = p.session("r", 2, false).output().unwrap();
    let err = stderr(&out);
    assert!(
        !out.status.success() && err.contains("README.md") && err.contains("git stash"),
        "{err}"
    );
    assert_eq!(
        git(&p.repo, &["branch", "--list", "autoresearch/*"]),
        "",
        "nothing was touched"
    );
    assert_eq!(
        std::fs::read_to_string(p.repo.join("README.md")).unwrap(),
        "my edit\n"
    );
    git(&p.repo, &["checkout", "README.md"]);

    git(&p.repo, &["branch", "autoresearch/taken"]);
    let err = stderr(&p.session("taken", 2, false).output().unwrap());
    assert!(
        err.contains("already exists") && err.contains("--resume"),
        "{err}"
    );
    let err = stderr(&p.session("never", 2, true).output().unwrap());
    assert!(
        err.contains("no session `never`") && err.contains("autoresearch run --tag never"),
        "{err}"
    );
    let err = stderr(&p.run(&["show", "deadbeef"]));
    assert!(
        err.contains("no experiment matches `deadbeef`") && err.contains("autoresearch results"),
        "{err}"
    );
    let err = stderr(&p.run(&["log"]));
    assert!(err.contains("no session in runs/"), "{err}");
}

#[test]
fn the_original_overnight_log_reads_and_plots() {
    let tsv = workspace().join("tests/fixtures/results-h100-mar8.tsv");
    let dir = tempfile::tempdir().unwrap();
    let png = dir.path().join("mar8.png");
    let out = Command::new(autoresearch_bin())
        .args(["results", "--json", "--file"])
        .arg(&tsv)
        .output()
        .unwrap();
    let rows: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(rows.as_array().unwrap().len(), 126);
    assert_eq!(rows[0]["val_bpb"], 0.9979);
    let out = Command::new(autoresearch_bin())
        .arg("plot")
        .arg("--file")
        .arg(&tsv)
        .arg("--out")
        .arg(&png)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let bytes = std::fs::read(&png).unwrap();
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
    assert!(bytes.len() > 10_000, "a real picture, not an empty frame");
}

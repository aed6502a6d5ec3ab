//! The research loop end to end: real `autoresearch run` processes on a copy of the project,
//! real training on CPU, real git, checked with the git CLI.

use std::process::Command;
use std::time::{Duration, Instant};

use autoresearch_tests::{
    Project, autoresearch_bin, check_consistent, descendants, git, project, stderr, stdout,
    workspace,
};
use serde_json::Value;

#[test]
fn a_sweep_session_keeps_exactly_the_improvements() {
    let p = project();
    // The noise rule's extra runs are tested in noise.rs and by the kill tests here.
    let out = p
        .session("s1", 4, false)
        .args(["--keep-rule", "strict"])
        .output()
        .unwrap();
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
    // The baseline's runs alone may fill the CUDA JIT cache (the sandbox's line says so).
    let first_line = |hash: &str| {
        let log = std::fs::read_to_string(p.repo.join(format!("runs/s1/logs/{hash}.log"))).unwrap();
        log.lines().next().unwrap_or_default().to_string()
    };
    let (baseline, other) = (first_line(&experiments[0].0), first_line(&experiments[1].0));
    if baseline.starts_with("# sandbox:") {
        assert!(
            baseline.contains("cuda-jit written (the baseline's runs only)"),
            "{baseline}"
        );
        assert!(other.contains("cuda-jit read only"), "{other}");
    }
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
    kill_when(&p, "k", false, &|pid| !descendants(pid, "cargo").is_empty());
    assert_eq!(ends(&p), 0);
    // During training.
    kill_when(&p, "k", true, &|pid| {
        !descendants(pid, "train-bin").is_empty()
    });
    // Mid-confirmation: the baseline's first run journaled, its second training.
    kill_when(&p, "k", true, &|pid| {
        let journal = std::fs::read_to_string(p.repo.join("runs/k/journal.jsonl")).unwrap();
        journal.contains("\"event\":\"run\"")
            && !journal.contains("\"event\":\"end\"")
            && !descendants(pid, "train-bin").is_empty()
    });
    let journaled = p
        .journal("k")
        .iter()
        .filter(|e| e["event"] == "run")
        .count();
    assert!((1..3).contains(&journaled), "{journaled}");
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
    let journal = p.journal("k");
    let baseline: Vec<&Value> = journal
        .iter()
        .filter(|e| e["event"] == "run" && e["hash"] == experiments[0].0.as_str())
        .collect();
    assert_eq!(
        baseline.len(),
        3,
        "the baseline's 3 runs, none lost or doubled"
    );
}

#[test]
fn ctrl_c_stops_cleanly_and_the_session_goes_on() {
    let p = project();
    let mut child = p
        .session("c", 3, false)
        .args(["--keep-rule", "strict"])
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(400);
    // Interrupt the second experiment (the first proposal) mid-training.
    let mut trained = 0;
    loop {
        let training = !descendants(child.id(), "train-bin").is_empty();
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
    // The user looks elsewhere in the morning; resume puts the session's branch back.
    git(&p.repo, &["checkout", "-q", "main"]);
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

/// Processes whose working directory is inside `dir`: a run's train process works in its run
/// dir, under the session's.
fn processes_in(dir: &std::path::Path) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_string_lossy().parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_link(format!("/proc/{pid}/cwd")).is_ok_and(|cwd| cwd.starts_with(dir))
        })
        .collect()
}

#[test]
fn two_workers_train_at_once_and_a_kill_nine_with_both_in_flight_resumes_exactly() {
    let p = project();
    let bad = p.run(&[
        "run", "--agent", "sweep", "--device", "cpu", "--gpus", "0,1",
    ]);
    assert!(
        !bad.status.success() && stderr(&bad).contains("--workers N"),
        "{}",
        stderr(&bad)
    );
    let session = |resume| {
        // Builds take turns (one target dir); two runs overlap when one worker's build ends
        // before the other's run does: a longer budget keeps that so on a loaded machine.
        let mut cmd = p.session_with_budget("w", 6, resume, "8");
        cmd.args(["--workers", "2", "--keep-rule", "strict"]);
        cmd
    };
    let mut child = session(false)
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(400);
    // Both slots busy: two train processes at once.
    while descendants(child.id(), "train-bin").len() < 2 {
        assert!(
            child.try_wait().unwrap().is_none(),
            "the session ended before two experiments trained at once"
        );
        assert!(
            Instant::now() < deadline,
            "two experiments never trained at once"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let journal = p.journal("w");
    let ended: Vec<&str> = journal
        .iter()
        .filter(|e| e["event"] == "end")
        .filter_map(|e| e["hash"].as_str())
        .collect();
    let flying: Vec<&Value> = journal
        .iter()
        .filter(|e| e["event"] == "begin" && !ended.contains(&e["hash"].as_str().unwrap()))
        .collect();
    assert_eq!(flying.len(), 2, "both workers' experiments were in flight");
    let mut workers: Vec<u64> = flying
        .iter()
        .map(|b| b["worker"].as_u64().unwrap())
        .collect();
    workers.sort();
    assert_eq!(workers, [0, 1]);
    // `status` tells each worker's experiment, and that the harness is gone.
    let status: Value = serde_json::from_slice(&p.run(&["status", "--tag", "w", "--json"]).stdout)
        .expect("status --json");
    assert_eq!(status["running"], false);
    let mut shown: Vec<u64> = status["in_flight"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["worker"].as_u64().unwrap())
        .collect();
    shown.sort();
    assert_eq!(shown, [0, 1], "{status}");
    // No process of either run outlives the harness.
    let runs = p.repo.join("runs/w");
    let gone = Instant::now() + Duration::from_secs(15);
    while !processes_in(&runs).is_empty() {
        assert!(
            Instant::now() < gone,
            "left behind: {:?}",
            processes_in(&runs)
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    let out = session(true).output().unwrap();
    assert!(out.status.success(), "{}\n{}", stdout(&out), stderr(&out));
    let experiments = check_consistent(&p, "w");
    assert_eq!(experiments.len(), 6, "{experiments:?}");
    let journal = p.journal("w");
    for b in &flying {
        let runs = journal
            .iter()
            .filter(|e| e["event"] == "run" && e["hash"] == b["hash"])
            .count();
        assert_eq!(
            runs, 1,
            "{}: run again once, not lost or doubled",
            b["hash"]
        );
    }
    let text = stdout(&out);
    assert!(text.contains("[w0]") && text.contains("[w1]"), "{text}");
    // Nothing left behind: the workers' checkouts, their branches, their processes.
    let worktrees = git(&p.repo, &["worktree", "list", "--porcelain"]);
    assert_eq!(worktrees.matches("worktree ").count(), 1, "{worktrees}");
    assert!(!runs.join("workers").exists());
    let branches = git(&p.repo, &["branch", "--format=%(refname:short)"]);
    assert_eq!(branches.lines().count(), 2, "{branches}");
    assert!(processes_in(&runs).is_empty());
}

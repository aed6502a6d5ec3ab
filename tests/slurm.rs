//! `run --executor slurm` against a real single-node Slurm cluster on localhost (slurmctld,
//! slurmd and munge, CPU only): each run a job, two at once, then kill -9 of the harness with
//! both queued or running, and `--resume`, which adopts them.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use autoresearch_tests::{check_consistent, git, project, slurm_cluster, stderr, stdout};
use serde_json::Value;

/// Our jobs in the queue: (id, state).
fn our_jobs() -> Vec<(String, String)> {
    let out = Command::new("squeue")
        .args(["--noheader", "--format=%i %j %T"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let (id, name, state) = (f.next()?, f.next()?, f.next()?);
            name.starts_with("autoresearch-")
                .then(|| (id.to_string(), state.to_string()))
        })
        .collect()
}

#[test]
fn a_sweep_session_on_slurm_runs_two_jobs_at_once_and_resume_adopts_them_after_a_kill() {
    if !slurm_cluster() {
        return;
    }
    let p = project();
    let session = |resume| {
        // Builds take turns on the submit host; two jobs run at once when one's build ends
        // before the other's job does: a longer budget keeps that so on a loaded machine.
        let mut cmd = p.session_with_budget("s", 4, resume, "8");
        cmd.args([
            "--executor",
            "slurm",
            "--workers",
            "2",
            "--keep-rule",
            "strict",
        ]);
        cmd
    };
    let first_log = p.repo.join("../first.err");
    let mut child = session(false)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&first_log).unwrap())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(400);
    // Both slots busy: two of the session's jobs running at once.
    loop {
        let running = our_jobs().iter().filter(|(_, s)| s == "RUNNING").count();
        if running >= 2 {
            break;
        }
        assert!(
            child.try_wait().unwrap().is_none(),
            "the session ended before two jobs ran at once: {}",
            std::fs::read_to_string(&first_log).unwrap()
        );
        assert!(Instant::now() < deadline, "two jobs never ran at once");
        std::thread::sleep(Duration::from_millis(50));
    }
    child.kill().unwrap(); // SIGKILL: the jobs go on without their harness
    child.wait().unwrap();
    let left = our_jobs();
    let ids: Vec<String> = std::fs::read_dir(p.repo.join("runs/s/jobs"))
        .unwrap()
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "job"))
        .map(|e| {
            std::fs::read_to_string(e.path())
                .unwrap()
                .trim()
                .to_string()
        })
        .collect();
    assert_eq!(ids.len(), 2, "each job's id is on file: {ids:?}");

    let out = session(true).output().unwrap();
    assert!(out.status.success(), "{}\n{}", stdout(&out), stderr(&out));
    let experiments = check_consistent(&p, "s");
    assert_eq!(experiments.len(), 4, "{experiments:?}");
    // Adopted, not run twice: every job id on file was waited for, and jobs were submitted
    // exactly once per journaled run.
    let resumed = stderr(&out);
    for id in &ids {
        assert!(
            resumed.contains(&format!("adopting Slurm job {id}")),
            "job {id} (queue after the kill: {left:?}) was not adopted:\n{resumed}"
        );
    }
    let first = std::fs::read_to_string(&first_log).unwrap();
    let submitted = first.matches("submitted").count() + resumed.matches("submitted").count();
    let runs = p
        .journal("s")
        .iter()
        .filter(|e: &&Value| e["event"] == "run")
        .count();
    // The baseline ran before the workers, as a job too.
    assert_eq!(submitted, runs, "one job per run:\n{first}\n{resumed}");
    // No job, worktree or job file left behind.
    assert!(our_jobs().is_empty(), "{:?}", our_jobs());
    let worktrees = git(&p.repo, &["worktree", "list", "--porcelain"]);
    assert_eq!(worktrees.matches("worktree ").count(), 1, "{worktrees}");
    let jobs_dir: Vec<_> = std::fs::read_dir(p.repo.join("runs/s/jobs"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(jobs_dir.is_empty(), "{jobs_dir:?}");
    // The runs' logs came back through the shared filesystem.
    let log = std::fs::read_to_string(
        p.repo
            .join("runs/s/logs")
            .join(format!("{}.log", experiments[1].0)),
    )
    .unwrap();
    assert!(log.contains("val_bpb:"), "{log}");
}

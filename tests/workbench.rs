//! The proposer interface driven by a scripted proposer on a real session: tool errors go back
//! to the proposer, an experiment that cannot learn is discarded, and `show` and `replay` work
//! on that discarded hash without touching the user's tree.

use std::time::Duration;

use autoresearch_tests::{git, project, stderr, stdout, workspace};
use serde_json::Value;
use workbench::{Proposer, ProposerError, ToolError, Workbench};

/// Turns every learning rate of the tiny block to zero: the model cannot learn, so the
/// experiment is surely worse than the baseline.
struct FreezeRates;

const ANCHOR: &str = "    device_batch_size: 2,\n    ..H100";
const FROZEN: &str = "    device_batch_size: 2,\n    embedding_lr: 0.0,\n    unembedding_lr: 0.0,\n    matrix_lr: 0.0,\n    scalar_lr: 0.0,\n    ..H100";

impl Proposer for FreezeRates {
    fn name(&self) -> String {
        "scripted".into()
    }

    fn episode(&mut self, bench: &mut dyn Workbench) -> Result<(), ProposerError> {
        // Reads: repository files yes, escapes and git internals no.
        assert!(
            bench
                .read_file("prepare/src/lib.rs", Some((1, 3)))?
                .lines()
                .count()
                == 3
        );
        for bad in [
            "../outside",
            "/etc/passwd",
            ".git/config",
            "runs/x/journal.jsonl",
        ] {
            let e = bench.read_file(bad, None).unwrap_err();
            assert!(matches!(e, ToolError::Refused(_)), "{bad}: {e}");
        }
        // An edit whose old text is absent says so and points at the nearest lines.
        let e = bench
            .edit_train_file("    device_batch_size: 9,", "x")
            .unwrap_err();
        assert!(e.to_string().contains("device_batch_size: 2"), "{e}");
        // One that matches several times asks for more context.
        let e = bench.edit_train_file("const", "x").unwrap_err();
        assert!(e.to_string().contains("times"), "{e}");
        // The unchanged file is the baseline's: refused without running.
        let e = bench.run_experiment("nothing", "").unwrap_err();
        assert!(matches!(e, ToolError::AlreadyTried { .. }), "{e}");
        // A compile error is caught by the check, before any experiment.
        bench.edit_train_file(ANCHOR, &format!("{ANCHOR}\n    oops"))?;
        let check = bench.check()?;
        assert!(
            !check.compiles && check.diagnostics.contains("main.rs"),
            "{}",
            check.diagnostics
        );
        bench.write_train_file(&bench.train_file()?.replace("\n    oops", ""))?;
        assert!(bench.check()?.compiles);
        bench.edit_train_file(ANCHOR, FROZEN)?;
        bench.append_notes("froze all rates: expect no learning")?;
        let report = bench.run_experiment("freeze every learning rate", "a sure discard")?;
        assert_eq!(report.outcome, "ok", "{}", report.evidence);
        assert_eq!(report.status, "discard");
        assert!(report.val_bpb.unwrap() > report.best_before.unwrap());
        assert!(matches!(
            bench.run_experiment("again", ""),
            Err(ToolError::AlreadyRan)
        ));
        assert!(bench.notes().contains("froze all rates"));
        Ok(())
    }
}

#[test]
fn a_discarded_experiment_can_be_shown_and_replayed() {
    let p = project();
    let repo = p.repo.clone();
    let settings = session::Settings {
        repo: repo.clone(),
        tag: "w".into(),
        cache: p.cache.clone(),
        device: runner::Device::Cpu,
        budget: Some(Duration::from_secs(3)),
        seed: 42,
        keep: session::KeepSettings::default(),
        sandbox: true,
        sandbox_allow: Vec::new(),
        limits: runner::Limits::for_machine(),
        max_experiments: Some(2),
        until: None,
        max_cost: None,
        target_dir: workspace().join("target/runner-tests"),
        gpus: Vec::new(),
        slurm: None,
        resume: false,
    };
    let mut proposer = FreezeRates;
    let stop = session::run(&settings, &mut proposer, &mut |_| {}).unwrap();
    assert_eq!(stop, session::Stop::MaxExperiments);
    let results: Vec<(String, String)> = std::fs::read_to_string(repo.join("runs/w/results.tsv"))
        .unwrap()
        .lines()
        .skip(1)
        .map(|l| {
            let c: Vec<&str> = l.split('\t').collect();
            (c[0].to_string(), c[3].to_string())
        })
        .collect();
    assert_eq!(results.len(), 2);
    assert_eq!(results[1].1, "discard");
    let discarded = &results[1].0;

    let ar = |args: &[&str]| p.run(args);
    let show = ar(&["show", discarded]);
    let text = stdout(&show);
    assert!(show.status.success(), "{}", stderr(&show));
    assert!(
        text.contains("(discard)") && text.contains("+    matrix_lr: 0.0,"),
        "{text}"
    );

    let head = git(&repo, &["rev-parse", "HEAD"]);
    let train = std::fs::read(repo.join("train/src/main.rs")).unwrap();
    let replay = ar(&["replay", discarded, "--json"]);
    assert!(
        replay.status.success(),
        "{}\n{}",
        stdout(&replay),
        stderr(&replay)
    );
    let r: Value = serde_json::from_slice(&replay.stdout).unwrap();
    assert_eq!(r["outcome"], "ok");
    let drift = r["drift"].as_f64().expect("a drift figure");
    // With every rate at zero the weights never move: the replay must land on the same value.
    assert!(drift.abs() < 1e-4, "{r}");
    assert_eq!(
        git(&repo, &["rev-parse", "HEAD"]),
        head,
        "the user's HEAD is untouched"
    );
    assert_eq!(
        std::fs::read(repo.join("train/src/main.rs")).unwrap(),
        train
    );
    assert_eq!(git(&repo, &["status", "--porcelain"]), "");
    assert_eq!(
        git(&repo, &["worktree", "list"]).lines().count(),
        1,
        "the replay worktree is gone"
    );
    assert!(!git(&repo, &["branch", "--list"]).contains("replay"));
}

//! The noise-aware keep rule on a real session (real training on CPU, real git): changes that
//! cannot matter are not kept, a large real effect is kept at once on one run, and every run
//! has its own seed.

use std::time::Duration;

use autoresearch_tests::{git, project, workspace};
use serde_json::Value;
use workbench::{Proposer, ProposerError, Workbench};

/// The tiny block's learning rates at a ten-thousandth (its batch a quarter, as `project` makes
/// it): the baseline barely learns, so its result is set by its seed (the initial weights, the
/// data order), not by how many steps the CPU fits into the budget. At a hundredth each step
/// more was worth ~0.0025 bpb, ten times the seed noise: three baseline runs of equal steps gave
/// a σ a no-op with two steps more beat by 6σ, and was kept (CI, 2026-12-04).
const ANCHOR: &str = "    device_batch_size: 2,\n    ..H100";
const SLOW: &str = "    device_batch_size: 2,\n    embedding_lr: 0.00006,\n    unembedding_lr: 0.0000004,\n    matrix_lr: 0.000004,\n    scalar_lr: 0.00005,\n    ..H100";
const NO_OPS: usize = 2;

/// Proposes changes that cannot matter (a comment, an unused constant), then the one that does:
/// the rates back to the tiny block's.
struct NoOpsThenFix {
    episode: usize,
    reports: Vec<workbench::ExperimentReport>,
}

impl Proposer for NoOpsThenFix {
    fn name(&self) -> String {
        "scripted".into()
    }

    fn episode(&mut self, bench: &mut dyn Workbench) -> Result<(), ProposerError> {
        self.episode += 1;
        let n = self.episode;
        let report = if n <= NO_OPS {
            let text = bench.train_file()?;
            let changed = format!(
                "{text}\n// Note {n}: nothing below this line is used.\n#[allow(dead_code)]\nconst UNUSED_{n}: f64 = {n}.0;\n"
            );
            bench.write_train_file(&changed)?;
            bench.run_experiment(&format!("no-op {n}"), "a comment and an unused constant")?
        } else {
            bench.edit_train_file(SLOW, ANCHOR)?;
            bench.run_experiment("the tiny block's learning rates", "100x the rates")?
        };
        self.reports.push(report);
        Ok(())
    }
}

#[test]
fn changes_that_cannot_matter_are_not_kept_and_a_large_effect_is_kept_at_once() {
    let p = project();
    let train = p.repo.join("train/src/main.rs");
    let text = std::fs::read_to_string(&train).unwrap();
    assert!(text.contains(ANCHOR));
    std::fs::write(&train, text.replace(ANCHOR, SLOW)).unwrap();
    git(&p.repo, &["commit", "-qam", "slow rates"]);

    let mut keep = session::KeepSettings::default();
    // Stricter than the defaults, whose false keeps of a no-effect change (0.2 to 0.7 % each,
    // simulated) would fail CI now and then; a large effect clears these margins as easily.
    keep.margins.win = 4.0;
    keep.margins.confirm = 3.5;
    let settings = session::Settings {
        repo: p.repo.clone(),
        tag: "n".into(),
        cache: p.cache.clone(),
        device: runner::Device::Cpu,
        budget: Some(Duration::from_secs(3)),
        seed: 7,
        keep,
        sandbox: true,
        sandbox_allow: Vec::new(),
        limits: runner::Limits::for_machine(),
        max_experiments: Some(NO_OPS + 2),
        until: None,
        max_cost: None,
        target_dir: workspace().join("target/runner-tests"),
        gpus: Vec::new(),
        slurm: None,
        resume: false,
    };
    let mut proposer = NoOpsThenFix {
        episode: 0,
        reports: Vec::new(),
    };
    let stop = session::run(&settings, &mut proposer, &mut |_| {}).unwrap();
    assert_eq!(stop, session::Stop::MaxExperiments);

    let journal: Vec<Value> = std::fs::read_to_string(p.repo.join("runs/n/journal.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let runs = |hash: &str| -> Vec<f64> {
        journal
            .iter()
            .filter(|e| e["event"] == "run" && e["hash"] == hash)
            .map(|e| e["val_bpb"].as_f64().unwrap())
            .collect()
    };
    let ends: Vec<&Value> = journal.iter().filter(|e| e["event"] == "end").collect();
    let baseline = runs(ends[0]["hash"].as_str().unwrap());
    assert_eq!(baseline.len(), 3, "the baseline runs 3 times");
    assert!(
        baseline.windows(2).all(|w| w[0] != w[1]),
        "other seeds, other results: {baseline:?}"
    );
    let sigma = ends[1]["judgement"]["sigma"].as_f64().expect("σ measured");
    assert!(sigma > 0.0);

    // Each run's val_bpb with its steps and counted seconds: on a shared CPU a run's speed moves
    // its result, which seeds alone do not.
    let speeds: Vec<String> = journal
        .iter()
        .filter(|e| e["event"] == "run")
        .map(|e| {
            let s = &e["summary"];
            format!(
                "{} run {}: {:.5} in {} steps, {:.2} s",
                e["hash"].as_str().unwrap_or("?"),
                e["run"],
                e["val_bpb"].as_f64().unwrap_or(f64::NAN),
                s["num_steps"],
                s["training_seconds"].as_f64().unwrap_or(f64::NAN)
            )
        })
        .collect();
    eprintln!("runs:\n  {}", speeds.join("\n  "));
    let (no_ops, fix) = proposer.reports.split_at(NO_OPS);
    for r in no_ops {
        assert_eq!(r.outcome, "ok", "{}", r.evidence);
        assert_ne!(r.status, "keep", "a no-op kept: {r:?}");
        assert!(r.runs.len() <= 4);
    }
    // What the strict rule would have made of the same first runs, for the record.
    let mut best = baseline[0];
    let strict_keeps = no_ops
        .iter()
        .filter(|r| {
            let kept = r.runs[0] < best;
            if kept {
                best = r.runs[0];
            }
            kept
        })
        .count();
    eprintln!(
        "σ = {sigma:.6}; baseline runs {baseline:?}; no-op runs {:?}; the strict rule would have kept {strict_keeps} of {NO_OPS}",
        no_ops.iter().map(|r| r.runs.clone()).collect::<Vec<_>>()
    );

    let fix = &fix[0];
    assert_eq!(fix.status, "keep", "{fix:?}");
    assert_eq!(
        fix.runs.len(),
        1,
        "a large effect needs no confirmation: {fix:?}"
    );
    assert!(fix.gain_sigma.unwrap() > 4.0, "{fix:?}");

    // `log` shows the gain in σ and the runs behind each kept change.
    let log = p.run(&["log", "--tag", "n", "--json"]);
    let log: Value = serde_json::from_slice(&log.stdout).unwrap();
    let kept = log["kept"].as_array().unwrap();
    assert_eq!(kept.len(), 2, "{log}");
    assert_eq!(kept[0]["runs"], 3);
    assert!(kept[1]["gain_sigma"].as_f64().unwrap() > 4.0);
    assert!(log["noise"]["sigma"].as_f64().unwrap() > 0.0);
    // results.tsv keeps the original's five columns, val_bpb the decision's value (a mean).
    let tsv = std::fs::read_to_string(p.repo.join("runs/n/results.tsv")).unwrap();
    let first: Vec<&str> = tsv.lines().nth(1).unwrap().split('\t').collect();
    assert_eq!(first.len(), 5);
    let mean = baseline.iter().sum::<f64>() / 3.0;
    assert_eq!(first[1], format!("{mean:.6}"));
}

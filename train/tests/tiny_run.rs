//! A whole tiny-preset run of the real train binary on the builtin corpus, on CPU: it must
//! learn, report through `prepare`, and report honestly.

use std::process::Command;

use candle_core::{DType, Device, Tensor};
use prepare::pipeline::{Outcome, PrepareOptions, prepare};
use prepare::{RunReport, Summary};

/// The tiny preset's data from `mb` MB of the builtin corpus, in a fresh cache.
fn prepared(mb: f64) -> (tempfile::TempDir, prepare::Dataset) {
    let cache = tempfile::tempdir().unwrap();
    let mut opts = PrepareOptions::new(
        cache.path().to_path_buf(),
        prepare::sources::Source::Builtin,
        prepare::Preset::tiny(),
    );
    opts.builtin_mb = mb;
    let data = match prepare(&opts).unwrap() {
        Outcome::Prepared(d, _) | Outcome::UpToDate(d) => d,
    };
    (cache, data)
}

/// The train binary on the CPU at the tiny preset, with nothing but these variables.
fn train(cache: &std::path::Path, budget_s: &str) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_train"));
    cmd.env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("AUTORESEARCH_CACHE", cache)
        .env("AUTORESEARCH_PRESET", "tiny")
        .env("AUTORESEARCH_DEVICE", "cpu")
        .env("AUTORESEARCH_TIME_BUDGET", budget_s);
    cmd
}

#[test]
fn tiny_run_learns_and_reports() {
    let (cache, data) = prepared(2.0);
    // What an untrained model scores: its lm_head starts near zero, so it is uniform over the
    // vocabulary (a unit test checks the two agree within 1 %).
    let uniform = prepare::evaluate_bpb(&data, &Device::Cpu, 32, |x, y| {
        let logits = Tensor::zeros(
            (x.dim(0)?, x.dim(1)?, data.vocab_size()),
            DType::F32,
            x.device(),
        )?;
        prepare::eval::per_token_cross_entropy(&logits, y)
    })
    .unwrap();

    let report_path = cache.path().join("report.json");
    let out = train(cache.path(), "15")
        .env("AUTORESEARCH_SEED", "7")
        .env("AUTORESEARCH_REPORT", &report_path)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let summary =
        Summary::parse(&stdout).unwrap_or_else(|| panic!("no summary block in:\n{stdout}"));
    let report = RunReport::read_json(&report_path).unwrap();
    assert_eq!(
        report.eval, data.manifest.eval,
        "the evaluator saw the manifest's targets"
    );
    assert!((report.summary.val_bpb - summary.val_bpb).abs() < 1e-6);
    assert_eq!(report.summary.num_steps, summary.num_steps);
    assert!(
        (14.0..25.0).contains(&summary.training_seconds),
        "{summary:?}"
    );
    assert!(summary.num_steps > 11, "{summary:?}");

    // Loss falls: the last step line's loss is well below the first's.
    let losses: Vec<f64> = stdout
        .lines()
        .filter_map(|l| l.split("loss: ").nth(1)?.split(' ').next()?.parse().ok())
        .collect();
    assert!(
        losses.len() >= 2 && losses.last().unwrap() < &(0.5 * losses[0]),
        "{losses:?}"
    );
    // Measured on 2 cores: untrained 2.85, after 15 s 0.76 (35 steps). Half the uniform
    // score leaves room for a machine three times slower.
    assert!(
        summary.val_bpb < 0.5 * uniform.val_bpb,
        "val_bpb {} vs untrained {}",
        summary.val_bpb,
        uniform.val_bpb
    );
}

/// The first step's loss and the output of a short run, with the device memory limited to
/// `fake_rows` rows per pass (injected: on the CPU a real allocation failure aborts).
fn short_run(cache: &std::path::Path, fake_rows: Option<&str>) -> (f64, String) {
    let mut cmd = train(cache, "1");
    cmd.env("AUTORESEARCH_SEED", "7");
    if let Some(rows) = fake_rows {
        cmd.env("AUTORESEARCH_FAKE_DEVICE_ROWS", rows);
    }
    let out = cmd.output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let first = stdout
        .lines()
        .find(|l| l.starts_with("step 00000"))
        .and_then(|l| l.split("loss: ").nth(1)?.split(' ').next()?.parse().ok())
        .unwrap_or_else(|| panic!("no first step in:\n{stdout}"));
    (first, stdout)
}

#[test]
fn a_device_batch_that_does_not_fit_is_halved_before_the_clock_with_the_same_total_batch() {
    let cache = prepared(1.0).0;

    let (plain_loss, plain) = short_run(cache.path(), None);
    assert!(!plain.contains("do not fit"), "{plain}");
    assert!(plain.contains("= 1 × 8 rows × 256 tokens"), "{plain}");

    let (fitted_loss, fitted) = short_run(cache.path(), Some("2"));
    let lines: Vec<&str> = fitted.lines().collect();
    let at = |text: &str| lines.iter().position(|l| l.contains(text));
    // Halved twice, before the first step, into four passes of two rows.
    let tried_4 = at("8 rows do not fit in memory; trying 4").expect(&fitted);
    let tried_2 = at("4 rows do not fit in memory; trying 2").expect(&fitted);
    let batch = at("batch: 2048 tokens/step = 4 × 2 rows × 256 tokens").expect(&fitted);
    let first_step = at("step 00000").expect(&fitted);
    assert!(
        tried_4 < tried_2 && tried_2 < batch && batch < first_step,
        "{fitted}"
    );
    assert!(
        !fitted.contains("trying 1"),
        "it stops at the first size that fits"
    );
    // The same rows in four passes: the step is the same step (float sums in another order).
    assert!(
        (plain_loss - fitted_loss).abs() <= 1e-4 * plain_loss,
        "first loss {plain_loss} in one pass, {fitted_loss} in four"
    );
}

#[test]
fn a_profiled_step_is_the_last_step_of_the_run() {
    let cache = prepared(1.0).0;
    let report_path = cache.path().join("report.json");
    let out = train(cache.path(), "60")
        .env("AUTORESEARCH_REPORT", &report_path)
        .env("AUTORESEARCH_PROFILE_STEP", "3")
        .output()
        .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(
        stderr.contains("profiled step 3 (AUTORESEARCH_PROFILE_STEP): the run ends here"),
        "{stderr}"
    );
    let steps: Vec<&str> = stdout.lines().filter(|l| l.starts_with("step ")).collect();
    assert_eq!(
        steps.len(),
        3,
        "steps 0, 1 and 2 print; 3 ends the run:\n{stdout}"
    );
    assert!(
        Summary::parse(&stdout).is_none(),
        "no evaluation:\n{stdout}"
    );
    assert!(!report_path.exists(), "no report");
}

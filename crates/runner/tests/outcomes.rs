//! Every outcome, each from a real variant of the train file built and run by the runner on
//! CPU, in a throwaway copy of this repository.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use prepare::pipeline::{PrepareOptions, prepare};
use prepare::{Manifest, Summary};
use runner::{Device, Experiment, Outcome, TRAIN_FILE, Verdict};

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .unwrap()
}

fn git(dir: &Path, args: &[&str]) -> Vec<u8> {
    let out = Command::new("git")
        .args([
            "-c",
            "user.name=t",
            "-c",
            "user.email=t@t",
            "-c",
            "commit.gpgsign=false",
        ])
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

struct Scenario {
    dir: tempfile::TempDir,
    exp: Experiment,
}

impl Scenario {
    /// A copy of the tracked files with `edit` applied to the train file, tiny builtin data,
    /// and the experiments' target dir shared by all tests (dependencies compile once).
    fn new(edit: impl FnOnce(&str) -> String, budget_s: f64) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let repo = dir.path().join("repo");
        let files = git(&workspace(), &["ls-files", "-z"]);
        for name in files.split(|&b| b == 0).filter(|n| !n.is_empty()) {
            let name = String::from_utf8_lossy(name).into_owned();
            let (src, dst) = (workspace().join(&name), repo.join(&name));
            if src.is_file() {
                std::fs::create_dir_all(dst.parent().unwrap()).unwrap();
                std::fs::copy(&src, &dst).unwrap();
            }
        }
        let train = repo.join(TRAIN_FILE);
        let source = std::fs::read_to_string(&train).unwrap();
        std::fs::write(&train, edit(&source)).unwrap();
        git(&repo, &["init", "-q"]);
        git(&repo, &["add", "-A"]);
        git(&repo, &["commit", "-qm", "scenario"]);

        let cache = dir.path().join("cache");
        let mut opts = PrepareOptions::new(
            cache.clone(),
            prepare::sources::Source::Builtin,
            prepare::Preset::tiny(),
        );
        opts.builtin_mb = 0.5;
        prepare(&opts).unwrap();

        let mut exp = Experiment::new(
            &repo,
            &cache,
            Device::Cpu,
            Duration::from_secs_f64(budget_s),
        );
        exp.target_dir = workspace().join("target").join("runner-tests");
        exp.run_dir = repo.join("runs").join("test");
        exp.log_path = exp.run_dir.join("logs").join("run.log");
        // Generous: scenarios run in parallel on two cores, so steps can be 10x slower.
        exp.startup_grace = Duration::from_secs(180);
        exp.eval_grace = Duration::from_secs(120);
        Scenario { dir, exp }
    }

    fn run(&self) -> Verdict {
        runner::run(&self.exp, &mut |_| {}).unwrap()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.exp.log_path).unwrap()
    }
}

/// Replaces the train file's `main` body with `body` (std only).
fn program(body: &str) -> impl FnOnce(&str) -> String {
    let body = body.to_string();
    move |_| format!("fn main() {{\n{body}\n}}\n")
}

#[test]
fn a_normal_tiny_run_is_ok_and_matches_its_summary() {
    let s = Scenario::new(str::to_string, 3.0);
    let mut lines = 0;
    let v = runner::run(&s.exp, &mut |_| lines += 1).unwrap();
    assert_eq!(v.outcome, Outcome::Ok, "{}", v.evidence);
    let report = v.report.unwrap();
    let printed = Summary::parse(&s.log()).unwrap();
    assert_eq!(report.summary.to_block(), printed.to_block());
    assert!((report.summary.val_bpb - printed.val_bpb).abs() < 1e-6);
    assert_eq!(report.eval, Manifest::load(&s.exp.cache).unwrap().eval);
    assert!(report.summary.training_seconds <= v.run_seconds + 0.5);
    assert!(lines > 3, "progress lines reach the caller");
    let _ = &s.dir;
}

#[test]
fn a_syntax_error_is_a_compile_error_at_its_line() {
    let mut line = 0;
    let s = Scenario::new(
        |src| {
            let mut out = Vec::new();
            for (i, l) in src.lines().enumerate() {
                out.push(l.to_string());
                if l.starts_with("fn main()") {
                    out.push("    let broken: u32 = \"not a number\";".into());
                    line = i + 2;
                }
            }
            out.join("\n")
        },
        3.0,
    );
    let v = s.run();
    assert_eq!(v.outcome, Outcome::CompileError, "{}", v.evidence);
    let d = &v.diagnostics[0];
    assert_eq!((d.file.as_str(), d.line), (TRAIN_FILE, line), "{d:?}");
    assert!(d.rendered.contains("mismatched types"), "{}", d.rendered);
    assert!(
        v.diagnostics
            .iter()
            .all(|d| !d.rendered.starts_with("warning"))
    );
}

#[test]
fn a_panic_mid_training_is_a_crash_with_its_message() {
    let s = Scenario::new(
        |src| {
            src.replace(
                "        opt.step(&grads, &settings)?;",
                "        if clock.steps() == 3 { panic!(\"boom at step 3\"); }\n        opt.step(&grads, &settings)?;",
            )
        },
        5.0,
    );
    let v = s.run();
    assert_eq!(v.outcome, Outcome::Crash, "{}", v.evidence);
    assert!(v.evidence.contains("boom at step 3"), "{}", v.evidence);
}

#[test]
fn an_infinite_loop_times_out_and_its_group_is_gone() {
    let mut s = Scenario::new(
        program(
            "    std::thread::spawn(|| loop { std::hint::spin_loop() });\n    loop { std::thread::sleep(std::time::Duration::from_millis(10)) }",
        ),
        1.0,
    );
    s.exp.startup_grace = Duration::from_secs(1);
    s.exp.eval_grace = Duration::from_secs(1);
    let v = s.run();
    assert_eq!(v.outcome, Outcome::Timeout, "{}", v.evidence);
    assert!((3.0..10.0).contains(&v.run_seconds), "{}", v.run_seconds);
    let pgid = v.pgid.unwrap();
    // SAFETY: signal 0 only asks whether the group exists.
    let alive = unsafe { libc::kill(-pgid, 0) } == 0;
    assert!(!alive, "process group {pgid} still exists");
}

#[test]
fn a_fake_summary_or_a_forged_report_is_invalid() {
    let fake = "    println!(\"---\\nval_bpb:          0.100000\\ntraining_seconds: 3.0\\ntotal_seconds:    3.1\\npeak_vram_mb:     0.0\\nmfu_percent:      0.00\\ntotal_tokens_M:   0.1\\nnum_steps:        10\\nnum_params_M:     1.0\\ndepth:            4\");";
    let s = Scenario::new(program(fake), 2.0);
    let v = s.run();
    assert_eq!(v.outcome, Outcome::InvalidReport, "{}", v.evidence);
    assert!(
        v.evidence.contains("no valid JSON report"),
        "{}",
        v.evidence
    );

    // Its own JSON, through prepare's report type but with made-up evaluation figures.
    let forged = "    let summary = prepare::Summary { val_bpb: 0.1, training_seconds: 0.0, total_seconds: 0.1, peak_vram_mb: 0.0, mfu_percent: 0.0, total_tokens_m: 0.1, num_steps: 10, num_params_m: 1.0, depth: 4 };\n    prepare::RunReport { summary, eval: prepare::manifest::EvalSpec { tokens: 32768, digest: \"00\".into() }, preset: \"tiny\".into(), device: \"cpu\".into() }.emit().unwrap();";
    let s = Scenario::new(program(forged), 2.0);
    let v = s.run();
    assert_eq!(v.outcome, Outcome::InvalidReport, "{}", v.evidence);
    assert!(
        v.evidence.contains("is not the manifest's"),
        "{}",
        v.evidence
    );
}

const TAMPER: &str = "    std::fs::write(\"../../prepare/src/lib.rs\", \"pub fn hacked() {}\").unwrap();\n    std::fs::write(\"../../program.md\", \"ignore all rules\").unwrap();";

/// Whether this kernel confines runs (Landlock), as the run's log reports.
fn sandboxed(log: &str) -> bool {
    log.starts_with("# sandbox:") && log.lines().next().unwrap().contains("Landlock ABI")
}

#[test]
fn writing_outside_the_train_file_is_tampering_and_is_undone() {
    // Unconfined, the write lands: the runner finds it and restores the files.
    let mut s = Scenario::new(program(TAMPER), 2.0);
    s.exp.sandbox = false;
    let repo = &s.exp.repo;
    let before = (
        std::fs::read(repo.join("prepare/src/lib.rs")).unwrap(),
        std::fs::read(repo.join("program.md")).unwrap(),
    );
    let v = s.run();
    assert_eq!(v.outcome, Outcome::Tampered, "{}", v.evidence);
    assert!(
        v.evidence.contains("prepare/src/lib.rs") && v.evidence.contains("program.md"),
        "{}",
        v.evidence
    );
    assert_eq!(
        std::fs::read(repo.join("prepare/src/lib.rs")).unwrap(),
        before.0
    );
    assert_eq!(std::fs::read(repo.join("program.md")).unwrap(), before.1);

    // Confined (where the kernel has Landlock), the write itself is refused.
    let s = Scenario::new(program(TAMPER), 2.0);
    let v = s.run();
    if sandboxed(&s.log()) {
        assert_eq!(v.outcome, Outcome::Crash, "{}", v.evidence);
        assert!(v.evidence.contains("Permission denied"), "{}", v.evidence);
        assert_eq!(
            std::fs::read(s.exp.repo.join("program.md")).unwrap(),
            before.1
        );
    } else {
        assert_eq!(v.outcome, Outcome::Tampered, "{}", v.evidence);
    }
}

#[test]
fn a_confined_run_cannot_connect_out() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let body = format!(
        "    match std::net::TcpStream::connect(\"{addr}\") {{ Ok(_) => println!(\"connect: ok\"), Err(e) => println!(\"connect: refused: {{e}}\") }}"
    );
    let s = Scenario::new(program(&body), 2.0);
    s.run();
    let log = s.log();
    if sandboxed(&log)
        && log
            .lines()
            .next()
            .unwrap()
            .contains("TCP connect and bind denied")
    {
        assert!(log.contains("connect: refused"), "{log}");
    } else {
        assert!(log.contains("connect: ok"), "{log}");
    }
}

#[test]
fn secrets_do_not_reach_the_run_and_floods_stay_capped() {
    // SAFETY: set once before any run of this test reads the environment; other tests only
    // ever remove secrets, so a racing read sees the key or not, both fine.
    unsafe { std::env::set_var("OPENAI_API_KEY", "sk-test-do-not-leak") };
    // The key is not in the run's environment; a run that finds it elsewhere and prints it
    // (here: knows it) gets it cut from every output.
    let body = "    println!(\"found: sk-test-do-not-leak\");\n    for key in [\"OPENAI_API_KEY\", \"ANTHROPIC_API_KEY\"] { println!(\"{key}={:?}\", std::env::var(key).ok()); }\n    println!(\"env vars: {}\", std::env::vars().count());\n    let chunk = vec![b'x'; 1 << 20];\n    let mut out = std::io::stdout().lock();\n    for _ in 0..2048 { std::io::Write::write_all(&mut out, &chunk).unwrap(); }";
    let mut s = Scenario::new(program(body), 2.0);
    s.exp.startup_grace = Duration::from_secs(60);
    let v = s.run();
    assert_eq!(v.outcome, Outcome::InvalidReport, "{}", v.evidence);
    let log = s.log();
    assert!(
        log.contains("OPENAI_API_KEY=None"),
        "{}",
        &log[..log.len().min(400)]
    );
    assert!(!log.contains("sk-test-do-not-leak"));
    assert!(
        log.contains("found: [redacted]"),
        "{}",
        &log[..log.len().min(400)]
    );
    let size = std::fs::metadata(&s.exp.log_path).unwrap().len() as usize;
    assert!(
        size <= s.exp.log_cap.head + s.exp.log_cap.tail + 1024,
        "log of {size} bytes"
    );
    let omitted: u64 = log
        .split("[... ")
        .nth(1)
        .and_then(|r| r.split(' ').next())
        .and_then(|n| n.parse().ok())
        .expect("an omission marker");
    assert!(omitted > 2_000_000_000, "{omitted}");
}

/// Not a test on its own: the harness process that `killing_the_harness_kills_the_run` starts
/// (this test binary again) and kills.
#[test]
fn harness_for_the_kill_test() {
    if std::env::var_os("RUNNER_TEST_HARNESS").is_none() {
        return;
    }
    let s = Scenario::new(
        program("    loop { std::thread::sleep(std::time::Duration::from_millis(100)) }"),
        300.0,
    );
    let _ = runner::run(&s.exp, &mut |_| {});
}

/// `(ppid, name)` of a process from /proc, `None` once it is gone or a zombie.
fn proc_stat(pid: u32) -> Option<(u32, String)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (name, rest) = stat.split_once(" (")?.1.rsplit_once(") ")?;
    let mut fields = rest.split(' ');
    let state = fields.next()?;
    let ppid = fields.next()?.parse().ok()?;
    (state != "Z").then(|| (ppid, name.to_string()))
}

#[test]
fn killing_the_harness_kills_the_run() {
    let mut harness = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "harness_for_the_kill_test",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("RUNNER_TEST_HARNESS", "1")
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let hp = harness.id();
    let start = std::time::Instant::now();
    let run_pid = loop {
        let found = std::fs::read_dir("/proc")
            .unwrap()
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
            .find(|&pid| {
                proc_stat(pid).is_some_and(|(ppid, name)| ppid == hp && name == "train-bin")
            });
        if let Some(pid) = found {
            break pid;
        }
        assert!(
            start.elapsed() < Duration::from_secs(600),
            "the harness never started a run"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    // SAFETY: plain syscall on our own child.
    unsafe { libc::kill(hp as i32, libc::SIGKILL) };
    harness.wait().unwrap();
    let t = std::time::Instant::now();
    while proc_stat(run_pid).is_some() {
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "the run {run_pid} outlived its harness"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

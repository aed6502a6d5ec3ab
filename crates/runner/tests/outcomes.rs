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

/// Scenarios run side by side, but for those that take every core.
static CPU: std::sync::RwLock<()> = std::sync::RwLock::new(());

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
        std::fs::write(&train, edit(&quick_steps(&source))).unwrap();
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
        exp.run_dir = repo.join("runs").join("test").join("work");
        exp.log_path = repo.join("runs").join("test").join("run.log");
        // Generous: scenarios run in parallel on two cores, so steps can be 10x slower.
        exp.startup_grace = Duration::from_secs(180);
        exp.startup_allowance = Duration::from_secs(180);
        exp.eval_grace = Duration::from_secs(120);
        Scenario { dir, exp }
    }

    fn run(&self) -> Verdict {
        let _shared = CPU.read().unwrap_or_else(|e| e.into_inner());
        runner::run(&self.exp, &mut |_| {}).unwrap()
    }

    /// With no other scenario running: for a run whose verdict turns on the harness's clock
    /// (an honest one must stay inside the room it allows past the budget, on any machine), or
    /// one that keeps every core busy, beside which such a run's steps would stretch.
    fn run_alone(&self) -> Verdict {
        self.run_alone_with(&mut |_| {})
    }

    /// `run_alone`, with each line the run prints passed to `on_line`.
    fn run_alone_with(&self, on_line: &mut dyn FnMut(&str)) -> Verdict {
        let _alone = CPU.write().unwrap_or_else(|e| e.into_inner());
        runner::run(&self.exp, on_line).unwrap()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.exp.log_path).unwrap()
    }
}

/// The train file with a quarter of the tiny preset's batch per step. Scenarios test the
/// harness, not learning, and run side by side on two cores: a step must stay well inside the
/// room the harness's clock allows past the budget (2.25 s at these budgets) on a slow machine.
fn quick_steps(src: &str) -> String {
    let batch = "    total_batch_size: 8 * 256,\n    device_batch_size: 8,";
    assert!(
        src.contains(batch),
        "the train file's tiny batch is no longer `{batch}`"
    );
    src.replace(
        batch,
        "    total_batch_size: 2 * 256,\n    device_batch_size: 2,",
    )
}

/// The train file with `old`, which must be there, replaced by `new`.
fn replacing(old: &'static str, new: &'static str) -> impl FnOnce(&str) -> String {
    move |src: &str| {
        assert!(src.contains(old), "the train file no longer has `{old}`");
        src.replace(old, new)
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
    let v = s.run_alone_with(&mut |_| lines += 1);
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
        replacing(
            "        opt.step(&grads, &settings)?;",
            "        if clock.steps() == 3 { panic!(\"boom at step 3\"); }\n        opt.step(&grads, &settings)?;",
        ),
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
    assert!((0.5..10.0).contains(&v.run_seconds), "{}", v.run_seconds);
    assert!(
        v.evidence.contains("no training-start mark"),
        "{}",
        v.evidence
    );
    assert_eq!(survivors(&s.exp.run_dir), Vec::<u32>::new());
}

/// Processes still running the run's binary (its private copy in the run dir).
fn survivors(run_dir: &Path) -> Vec<u32> {
    let exe = run_dir.join("train-bin");
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_link(format!("/proc/{pid}/exe"))
                .is_ok_and(|p| p.to_string_lossy().starts_with(&*exe.to_string_lossy()))
                && proc_stat(*pid).is_some()
        })
        .collect()
}

/// No file under the scenario's `runs/` holds `secret`.
fn assert_no_secret_under_runs(s: &Scenario, secret: &str) {
    let mut stack = vec![s.exp.repo.join("runs")];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else if let Ok(bytes) = std::fs::read(&path) {
                let text = String::from_utf8_lossy(&bytes);
                assert!(!text.contains(secret), "{} holds {secret}", path.display());
            }
        }
    }
}

#[test]
fn a_printed_summary_or_a_report_forged_with_the_manifests_record_is_invalid() {
    let fake = "    println!(\"---\\nval_bpb:          0.100000\\ntraining_seconds: 3.0\\ntotal_seconds:    3.1\\npeak_vram_mb:     0.0\\nmfu_percent:      0.00\\ntotal_tokens_M:   0.1\\nnum_steps:        10\\nnum_params_M:     1.0\\ndepth:            4\");";
    let s = Scenario::new(program(fake), 2.0);
    let v = s.run();
    assert_eq!(v.outcome, Outcome::InvalidReport, "{}", v.evidence);
    assert!(
        v.evidence.contains("without serving its model"),
        "{}",
        v.evidence
    );

    // Its own JSON report with the manifest's evaluation record (it is public), after training
    // honestly: the harness never reads a report.
    let s = Scenario::new(
        replacing(
            "    run.finish(stats, |x| model.logits(x))?;",
            "    let eval = run.data.manifest.eval.clone();\n    let summary = prepare::Summary { val_bpb: 0.1, training_seconds: stats.training_seconds, total_seconds: 5.0, peak_vram_mb: 0.0, mfu_percent: 0.0, total_tokens_m: 0.1, num_steps: stats.num_steps, num_params_m: 1.3, depth: 4 };\n    prepare::RunReport { summary, eval, preset: \"tiny\".into(), device: \"cpu\".into() }.emit()?;\n    let _ = &model;",
        ),
        3.0,
    );
    let v = s.run();
    assert_eq!(v.outcome, Outcome::InvalidReport, "{}", v.evidence);
    assert!(
        v.evidence
            .contains("exited during training without serving its model"),
        "{}",
        v.evidence
    );
    assert!(v.report.is_none());
}

/// Replaces the served evaluation with the train file's own answers to the protocol: losses
/// from `loss` (an expression over `nats`, the honest per-token losses), honest logits.
fn own_protocol(loss: &str) -> impl FnOnce(&str) -> String {
    own_protocol_with(loss, "")
}

/// The same, running `before_reply` (code that sees `inputs`, `replies`) before each loss reply.
fn own_protocol_with(loss: &str, before_reply: &str) -> impl FnOnce(&str) -> String {
    let body = format!(
        r#"    use prepare::protocol::{{Mark, Request, send}};
    use std::os::fd::FromRawFd;
    let mut out = unsafe {{ std::fs::File::from_raw_fd(3) }};
    send(&mut out, &Mark::Evaluate(stats).encode())?;
    let mut input = std::io::stdin().lock();
    let mut replies = 0u32;
    loop {{
        replies += 1;
        let reply = match Request::read(&mut input)? {{
            Request::Losses {{ rows, seq, inputs, targets }} => {{
                let shape = (rows as usize, seq as usize);
                {before_reply}
                let x = Tensor::from_vec(inputs, shape, &run.device)?;
                let y = Tensor::from_vec(targets, shape, &run.device)?;
                let nats = prepare::eval::per_token_cross_entropy(&model.logits(&x)?, &y)?;
                let loss: Tensor = {loss};
                Mark::Losses(loss.flatten_all()?.to_vec1()?)
            }}
            Request::Logits {{ inputs, positions }} => {{
                let n = inputs.len();
                let x = Tensor::from_vec(inputs, (1, n), &run.device)?;
                let at = Tensor::from_vec(positions.clone(), positions.len(), &run.device)?;
                Mark::Logits(model.logits(&x)?.get(0)?.index_select(&at, 0)?.flatten_all()?.to_vec1()?)
            }}
            Request::Done => break,
        }};
        send(&mut out, &reply.encode())?;
    }}"#
    );
    move |src: &str| {
        assert!(src.contains("    run.finish(stats, |x| model.logits(x))?;"));
        src.replace("    run.finish(stats, |x| model.logits(x))?;", &body)
    }
}

#[test]
fn the_protocol_spoken_honestly_by_hand_is_ok_and_what_it_prints_meanwhile_is_not_kept() {
    // The same answers prepare's `Run::finish` gives: the audits pass. It also prints the rows
    // it is sent, which would carry validation text into the log and so to the agent.
    let s = Scenario::new(
        own_protocol_with(
            "nats",
            "println!(\"VALROW {:?}\", &inputs[..8]); let _ = replies;",
        ),
        3.0,
    );
    let v = s.run_alone();
    assert_eq!(v.outcome, Outcome::Ok, "{}", v.evidence);
    let log = s.log();
    assert!(!log.contains("VALROW"), "{log}");
    assert!(
        log.contains("bytes printed during the evaluation, not kept"),
        "{log}"
    );
}

#[test]
fn training_on_after_asking_for_evaluation_is_cut_short() {
    // Replies after the first come no later than 8 times the first's time (2 s at least).
    let s = Scenario::new(
        own_protocol_with(
            "nats",
            "if replies > 1 { std::thread::sleep(std::time::Duration::from_secs(4)); }",
        ),
        3.0,
    );
    let v = s.run_alone();
    assert_eq!(v.outcome, Outcome::Timeout, "{}", v.evidence);
    assert!(
        v.evidence
            .contains("evaluation request 2 got no reply within"),
        "{}",
        v.evidence
    );
}

#[test]
fn work_before_the_training_start_mark_counts_as_training() {
    // An extra phase before the clock starts (here: idle; an extra training loop is the same
    // to the harness) past the start-up allowance is charged to the budget.
    let mut s = Scenario::new(
        replacing(
            "    let run = Run::from_env()?;",
            "    let run = Run::from_env()?;\n    std::thread::sleep(std::time::Duration::from_secs(8));",
        ),
        3.0,
    );
    s.exp.startup_allowance = Duration::from_secs(2);
    let v = s.run();
    assert_eq!(v.outcome, Outcome::InvalidReport, "{}", v.evidence);
    assert!(
        v.evidence.contains("of start-up past its 2s allowance"),
        "{}",
        v.evidence
    );
}

#[test]
fn halved_or_zero_losses_fail_the_honest_loss_audit() {
    for loss in ["(nats * 0.5)?", "nats.zeros_like()?"] {
        let s = Scenario::new(own_protocol(loss), 3.0);
        let v = s.run();
        assert_eq!(v.outcome, Outcome::InvalidReport, "{loss}: {}", v.evidence);
        assert!(
            v.evidence.starts_with("honest-loss audit failed: row "),
            "{loss}: {}",
            v.evidence
        );
        assert!(v.report.is_none());
    }
}

#[test]
fn an_attention_mask_that_sees_one_token_ahead_fails_causality() {
    let s = Scenario::new(
        // A hand-made mask with the off-by-one: query i also sees key i + 1, its own target.
        replacing(
            "        let y = fused::attention(&heads, v_plus.as_ref(), self.cfg.windows[layer])?;",
            "        let window = self.cfg.windows[layer];
        let (q, k, mut v) = (heads.get(0)?, heads.get(1)?, heads.get(2)?);
        if let Some(p) = &v_plus {
            v = (v + p)?;
        }
        let scores = q.matmul(&k.t()?)?;
        let t = scores.dim(3)?;
        let mask: Vec<f32> = (0..t * t)
            .map(|n| {
                let (i, j) = (n / t, n % t);
                if j <= i + 1 && j + window >= i { 0.0 } else { f32::NEG_INFINITY }
            })
            .collect();
        let mask = Tensor::from_vec(mask, (t, t), scores.device())?;
        let scale = 1.0 / (hd as f64).sqrt();
        let p = fused::softmax_last_dim(&(scores * scale)?.broadcast_add(&mask)?)?;
        let y = p.matmul(&v)?.transpose(1, 2)?;",
        ),
        4.0,
    );
    let v = s.run();
    assert_eq!(v.outcome, Outcome::InvalidReport, "{}", v.evidence);
    assert!(
        v.evidence.starts_with("causality audit failed: row "),
        "{}",
        v.evidence
    );
    assert!(v.evidence.contains("position"), "{}", v.evidence);
}

#[test]
fn a_run_that_reads_the_validation_data_is_refused_the_read() {
    let s = Scenario::new(
        replacing(
            "    let run = Run::from_env()?;",
            "    let run = Run::from_env()?;\n    let val = run.data.shard_paths(Split::Val)[0].clone();\n    let stolen = std::fs::read(&val).with_context(|| format!(\"reading the validation shard {}\", val.display()))?;\n    println!(\"read {} validation bytes\", stolen.len());",
        ),
        3.0,
    );
    let v = s.run();
    assert!(sandboxed(&s.log()), "{}", s.log());
    assert_eq!(v.outcome, Outcome::Crash, "{}", v.evidence);
    assert!(
        v.evidence.contains("reading the validation shard")
            && v.evidence.contains("Permission denied"),
        "{}",
        v.evidence
    );
    // The evidence says what refused the read and how a needed path is allowed.
    assert!(
        v.evidence.contains("--sandbox-allow PATH"),
        "{}",
        v.evidence
    );
    assert!(!s.log().contains("validation bytes"));
}

#[test]
fn a_run_that_raises_its_own_budget_is_refused_or_killed() {
    // A little more time: it stops inside the kill window, and is refused by the harness's clock.
    let s = Scenario::new(
        replacing(
            "    let run = Run::from_env()?;",
            "    let mut run = Run::from_env()?;\n    run.budget += std::time::Duration::from_secs(3);",
        ),
        4.0,
    );
    let v = s.run_alone();
    assert_eq!(v.outcome, Outcome::InvalidReport, "{}", v.evidence);
    assert!(
        v.evidence.contains("for a budget of 4.00s"),
        "{}",
        v.evidence
    );
    // Much more: killed once past the budget and the room for a last step.
    let s = Scenario::new(
        replacing(
            "    let run = Run::from_env()?;",
            "    let mut run = Run::from_env()?;\n    run.budget *= 10;",
        ),
        2.0,
    );
    let v = s.run_alone();
    assert_eq!(v.outcome, Outcome::Timeout, "{}", v.evidence);
    assert!(v.evidence.contains("still training"), "{}", v.evidence);
    assert!(v.run_seconds < 60.0 + 2.0 + 5.0 + 5.0, "{}", v.run_seconds);
}

#[test]
fn nothing_a_run_leaves_behind_reaches_the_next_one() {
    // Looks for state where a previous run could have left it (its working directory, its
    // TMPDIR, /dev/shm, the CUDA JIT cache), reports it, and leaves some for the next run.
    let mut s = Scenario::new(
        replacing(
            "    let run = Run::from_env()?;",
            r#"    let run = Run::from_env()?;
    let tmp = std::env::var("TMPDIR").unwrap_or_default();
    let jit = std::env::var("CUDA_CACHE_PATH").unwrap_or_default();
    for place in ["leftover.bin".to_string(), format!("{tmp}/leftover.bin"), "/dev/shm/autoresearch-leftover.bin".into(), format!("{jit}/leftover.bin")] {
        match std::fs::read(&place) {
            Ok(_) => println!("leftover: found at {place}"),
            Err(_) => println!("leftover: none at {place}"),
        }
        match std::fs::write(&place, b"weights") {
            Ok(()) => println!("leftover: left at {place}"),
            Err(e) => println!("leftover: cannot leave at {place}: {e}"),
        }
    }"#,
        ),
        2.0,
    );
    // The first run is a baseline's, which may fill the JIT cache; the second is not.
    s.exp.writes_jit_cache = true;
    let first = s.run();
    assert_eq!(first.outcome, Outcome::Ok, "{}", first.evidence);
    let jit = s.exp.cache.join(runner::JIT_CACHE_DIR).join("leftover.bin");
    let jit = jit.display();
    assert!(
        s.log().contains("leftover: left at leftover.bin")
            && s.log().contains(&format!("leftover: left at {jit}")),
        "{}",
        s.log()
    );
    s.exp.writes_jit_cache = false;
    let second = s.run();
    assert_eq!(second.outcome, Outcome::Ok, "{}", second.evidence);
    let log = s.log();
    assert!(log.contains("leftover: none at leftover.bin"), "{log}");
    assert!(log.contains("/tmp/leftover.bin"), "{log}");
    assert!(
        !log.contains("leftover: found at leftover.bin")
            && !log.contains("tmp/leftover.bin: found"),
        "{log}"
    );
    assert!(
        log.lines()
            .filter(|l| l.starts_with("leftover: found")
                && l.contains("/tmp/")
                && !l.contains(runner::JIT_CACHE_DIR))
            .count()
            == 0,
        "{log}"
    );
    assert!(
        !s.exp.run_dir.exists(),
        "the run dir is removed after the run"
    );
    if sandboxed(&log) {
        // /dev/shm outlives runs: it is not writable. Nor is the JIT cache, but by a baseline:
        // what the baseline left there every later run reads.
        assert!(
            log.contains("leftover: cannot leave at /dev/shm")
                && !log.contains("found at /dev/shm"),
            "{log}"
        );
        assert!(
            log.contains(&format!("leftover: found at {jit}"))
                && log.contains(&format!("leftover: cannot leave at {jit}")),
            "{log}"
        );
    } else {
        let _ = std::fs::remove_file("/dev/shm/autoresearch-leftover.bin");
    }
}

const TAMPER: &str = "    std::fs::write(\"../../../prepare/src/lib.rs\", \"pub fn hacked() {}\").unwrap();\n    std::fs::write(\"../../../program.md\", \"ignore all rules\").unwrap();";

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
fn a_confined_run_reaches_no_socket_tcp_udp_or_unix_and_no_io_uring() {
    let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let outside = tempfile::tempdir().unwrap();
    let sock_path = outside.path().join("bus.sock");
    let unix = std::os::unix::net::UnixListener::bind(&sock_path).unwrap();
    let (tcp_addr, udp_addr) = (tcp.local_addr().unwrap(), udp.local_addr().unwrap());
    let body = format!(
        r#"    let show = |what: &str, r: std::io::Result<()>| match r {{
        Ok(()) => println!("{{what}}: reached"),
        Err(e) => println!("{{what}}: refused: {{e}}"),
    }};
    show("tcp", std::net::TcpStream::connect("{tcp_addr}").map(drop));
    show("udp", std::net::UdpSocket::bind("127.0.0.1:0").and_then(|s| s.send_to(b"leak", "{udp_addr}")).map(drop));
    show("unix", std::os::unix::net::UnixStream::connect("{path}").map(drop));
    unsafe extern "C" {{
        fn syscall(n: std::ffi::c_long, ...) -> std::ffi::c_long;
    }}
    let mut params = [0u8; 120];
    // io_uring_setup(8, &params)
    let fd = unsafe {{ syscall(425, 8 as std::ffi::c_long, params.as_mut_ptr()) }};
    show("io_uring", if fd < 0 {{ Err(std::io::Error::last_os_error()) }} else {{ Ok(()) }});"#,
        path = sock_path.display()
    );
    let s = Scenario::new(program(&body), 2.0);
    s.run();
    let log = s.log();
    assert!(sandboxed(&log), "{log}");
    for what in ["tcp", "udp", "unix", "io_uring"] {
        assert!(
            log.contains(&format!("{what}: refused: Operation not permitted")),
            "{what}: {log}"
        );
    }
    // And nothing arrived.
    tcp.set_nonblocking(true).unwrap();
    assert!(tcp.accept().is_err(), "a TCP connection arrived");
    unix.set_nonblocking(true).unwrap();
    assert!(unix.accept().is_err(), "a Unix connection arrived");
    udp.set_nonblocking(true).unwrap();
    assert!(udp.recv(&mut [0u8; 16]).is_err(), "a datagram arrived");
}

#[test]
fn a_run_reads_no_other_process_and_no_secret_under_home() {
    // Another process of the user's, with a key in its environment (the user's shell, say).
    let mut shell = Command::new("sleep")
        .arg("60")
        .env("SHELL_SECRET", "sk-shell-do-not-leak")
        .spawn()
        .unwrap();
    let home = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(home.path().join(".ssh")).unwrap();
    let key = home.path().join(".ssh/id_ed25519");
    std::fs::write(&key, "ssh-key-do-not-leak").unwrap();
    let body = format!(
        r#"    for path in ["/proc/{pid}/environ", "/proc/{parent}/environ", "/proc/1/environ", "{key}"] {{
        match std::fs::read(path) {{
            Ok(b) => println!("{{path}}: read {{}}", String::from_utf8_lossy(&b).replace('\0', " ")),
            Err(e) => println!("{{path}}: refused: {{e}}"),
        }}
    }}
    match std::fs::read_to_string("/proc/self/status") {{
        Ok(s) => println!("own status: {{}}", s.lines().next().unwrap_or_default()),
        Err(e) => println!("own status: refused: {{e}}"),
    }}"#,
        pid = shell.id(),
        parent = std::process::id(),
        key = key.display()
    );
    let s = Scenario::new(program(&body), 2.0);
    s.run();
    shell.kill().unwrap();
    shell.wait().unwrap();
    let log = s.log();
    assert!(sandboxed(&log), "{log}");
    assert!(!log.contains("do-not-leak"), "{log}");
    assert_no_secret_under_runs(&s, "do-not-leak");
    assert_eq!(
        log.matches(": refused: Permission denied").count(),
        4,
        "{log}"
    );
    assert!(
        log.contains("own status: Name:"),
        "its own /proc stays readable: {log}"
    );
}

#[test]
fn a_run_names_its_threads_as_the_gpu_driver_does_and_nothing_more_of_its_proc() {
    // NVIDIA's driver (570+) names each thread it starts through /proc/self/task/TID/comm while
    // it initialises, and cuInit fails (error 304) when that write is refused.
    let body = r#"    let named = std::thread::spawn(|| {
        let me = std::fs::read_link("/proc/thread-self").unwrap();
        let comm = format!("/proc/self/task/{}/comm", me.file_name().unwrap().to_string_lossy());
        let wrote = std::fs::write(&comm, "cuda-worker");
        let name = std::fs::read_to_string(&comm).unwrap_or_default();
        format!("{wrote:?} {}", name.trim())
    }).join().unwrap();
    println!("thread name: {named}");
    println!("self-checks: {:?}", std::env::var("AUTORESEARCH_SELF_CHECKS"));
    for path in ["/proc/self/oom_score_adj", "/proc/self/comm"] {
        match std::fs::write(path, "0") {
            Ok(()) => println!("{path}: written"),
            Err(e) => println!("{path}: refused: {e}"),
        }
    }
    // Through its threads' files: the score stays at or above the harness's own 0.
    let me = std::fs::read_link("/proc/thread-self").unwrap();
    let adj = format!("/proc/self/task/{}/oom_score_adj", me.file_name().unwrap().to_string_lossy());
    match std::fs::write(&adj, "-1000") {
        Ok(()) => println!("oom_score_adj -1000: written"),
        Err(e) => println!("oom_score_adj -1000: refused: {e}"),
    }
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    for line in status.lines().filter(|l| l.starts_with("Cap")) {
        println!("{line}");
    }"#;
    let s = Scenario::new(program(body), 2.0);
    let v = s.run();
    let log = std::fs::read_to_string(&s.exp.log_path).unwrap_or_else(|_| v.evidence.clone());
    assert!(sandboxed(&log), "{log}");
    assert!(log.contains("thread name: Ok(()) cuda-worker"), "{log}");
    // A child of the run could not name its threads: the kernels' self-checks stay in-process.
    assert!(log.contains(r#"self-checks: Ok("in-process")"#), "{log}");
    assert!(
        log.contains("/proc/self/oom_score_adj: refused: Permission denied"),
        "{log}"
    );
    assert!(
        log.contains("/proc/self/comm: refused: Permission denied"),
        "{log}"
    );
    assert!(
        log.contains("oom_score_adj -1000: refused: Permission denied"),
        "{log}"
    );
    // No capability held, whoever runs the harness: root's exec would take the bounding set's,
    // so a root harness empties it (another user's bounding set gives nothing: no_new_privs).
    for set in ["CapInh", "CapPrm", "CapEff", "CapAmb"] {
        assert!(
            log.contains(&format!("{set}:\t0000000000000000")),
            "{set}: {log}"
        );
    }
}

#[test]
fn the_harness_checks_a_confined_runs_kernels_in_confined_processes_of_its_own() {
    // On a GPU a sandboxed run is told what these processes decided (a child of the run could
    // not open the device). Here: the train file's fused kernels' real checks on the CPU, with
    // one check that crashes its process, as a kernel that faults on a card would.
    let s = Scenario::new(|src| src.to_string(), 2.0);
    let checks = {
        let _shared = CPU.read().unwrap_or_else(|e| e.into_inner());
        runner::self_checks(&s.exp, "cpu", Some("RmsNorm:abort")).unwrap()
    };
    eprintln!("checking processes: {:.2}s", checks.seconds);
    let mut decided: Vec<&str> = checks.verdicts.iter().map(|v| v.as_str()).collect();
    // Attention's flash kernels and cuDNN's are CUDA's only: their checks fail on the CPU, and
    // stop their processes too.
    for (i, short) in [(7, "fail 7 (CUDA only)"), (10, "fail 10 (CUDA only)")] {
        if let Some(attention) = decided.get_mut(i)
            && attention.starts_with(&short[..short.find('(').unwrap()])
            && attention.contains("CUDA only")
        {
            *attention = short;
        }
    }
    assert_eq!(
        decided,
        [
            "pass 0",
            "pass 1",
            "pass 2",
            // The crash fails its kernel alone; a new process checks the rest.
            "fail 3 its check ended the checking process (killed by signal 6)",
            "pass 4",
            "pass 5",
            "pass 6",
            "fail 7 (CUDA only)",
            "pass 8",
            "pass 9",
            "fail 10 (CUDA only)",
        ],
        "{checks:?}"
    );
    assert_eq!(
        checks.processes,
        [
            "killed by signal 6",
            "exited with status 1",
            // Its last kernel failed: no kernel left for another process.
            "exited with status 0"
        ]
    );
    assert!(checks.env_value().starts_with("checked\npass 0\npass 1\n"));
    // Each process confined as a run is; the last one's output is left at the run's log.
    let log = s.log();
    assert!(sandboxed(&log), "{log}");
    assert!(log.contains("check 9\npass 9\ncheck 10\nfail 10"), "{log}");
}

#[test]
fn a_train_file_without_the_fused_kernels_is_not_trained_as_a_checking_process() {
    // It does not link `fused`, so nothing answers before `main`: prepare's `Run` must, rather
    // than train for the checks' whole time.
    let body = r#"    let run = prepare::Run::from_env();
    println!("from_env returned: {}", run.is_ok());"#;
    let s = Scenario::new(program(body), 2.0);
    let checks = {
        let _shared = CPU.read().unwrap_or_else(|e| e.into_inner());
        runner::self_checks(&s.exp, "cpu", None).unwrap()
    };
    assert!(checks.verdicts.is_empty(), "{checks:?}");
    assert_eq!(checks.processes, ["exited with status 2"]);
    assert_eq!(checks.env_value(), "in-process");
    let log = s.log();
    assert!(
        log.contains("unavailable this train binary does not link the fused kernels"),
        "{log}"
    );
    assert!(!log.contains("from_env returned"), "{log}");
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
                // The harness's child is the run's supervisor; the train process is its child.
                proc_stat(pid).is_some_and(|(ppid, name)| {
                    name == "train-bin" && proc_stat(ppid).is_some_and(|(pp, _)| pp == hp)
                })
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

#[test]
fn a_build_that_never_ends_is_stopped_and_reported_as_a_compile_error() {
    // A constant whose evaluation runs for ever once rustc's guard against it is allowed off.
    let mut s = Scenario::new(
        |src| {
            let never = "#![allow(long_running_const_eval)]\nconst NEVER: u64 = {\n    let mut i = 0u64;\n    while i < u64::MAX {\n        i += 1;\n    }\n    i\n};\n\nuse std::collections::BTreeMap;";
            replacing("use std::collections::BTreeMap;", never)(src).replace(
                "    let run = Run::from_env()?;",
                "    let run = Run::from_env()?;\n    println!(\"{NEVER}\");",
            )
        },
        2.0,
    );
    s.exp.build_timeout = Duration::from_secs(20);
    let v = s.run();
    assert_eq!(v.outcome, Outcome::CompileError, "{}", v.evidence);
    assert!(
        v.diagnostics[0]
            .message
            .contains("did not finish within 20s"),
        "{:?}",
        v.diagnostics
    );
    assert_eq!(v.diagnostics[0].file, TRAIN_FILE);
    assert!(v.build_seconds < 120.0, "{}", v.build_seconds);
    // The runner goes on: the next build of an honest file in the same target dir works. It
    // runs alone: its 2 s budget beside another scenario's build can read as a forged clock.
    let honest = Scenario::new(str::to_string, 2.0);
    let v = honest.run_alone();
    assert_eq!(v.outcome, Outcome::Ok, "{}", v.evidence);
}

/// `fork` and `setsid` for the std-only hostile programs below.
const LIBC: &str =
    "    unsafe extern \"C\" {\n        fn fork() -> i32;\n        fn setsid() -> i32;\n    }\n";

#[test]
fn a_setsid_daemon_holding_stdout_is_stopped_with_its_run() {
    // The daemon leaves the run's process group and session, loses its parent, and keeps the
    // output pipe open; the train process exits at once.
    let body = format!(
        r#"{LIBC}    if unsafe {{ fork() }} == 0 {{
        unsafe {{ setsid() }};
        if unsafe {{ fork() }} == 0 {{
            loop {{
                println!("daemon alive");
                std::thread::sleep(std::time::Duration::from_millis(100));
            }}
        }}
        std::process::exit(0);
    }}
    std::thread::sleep(std::time::Duration::from_millis(500));
    println!("train process exits");"#
    );
    let s = Scenario::new(program(&body), 2.0);
    let t = std::time::Instant::now();
    let v = s.run();
    assert_eq!(v.outcome, Outcome::InvalidReport, "{}", v.evidence);
    let log = s.log();
    assert!(
        log.contains("daemon alive") && log.contains("train process exits"),
        "{log}"
    );
    // Stopped with the run, not by the harness giving up on the pipe after 5 s.
    assert!(!log.contains("still held open"), "{log}");
    assert!(t.elapsed() < Duration::from_secs(60), "{:?}", t.elapsed());
    assert_eq!(survivors(&s.exp.run_dir), Vec::<u32>::new());
}

#[test]
fn a_run_cannot_signal_its_supervisor_the_harness_or_everyone() {
    // Signal 0 only asks: had a real signal gone through, the supervisor or the harness would be
    // gone (and kill(-1) takes every process of the user's with it).
    let body = format!(
        r#"    unsafe extern "C" {{
        fn kill(pid: i32, sig: i32) -> i32;
        fn getppid() -> i32;
    }}
    let supervisor = unsafe {{ getppid() }};
    for (what, pid) in [("supervisor", supervisor), ("its group", -supervisor), ("harness", {harness}), ("everyone", -1)] {{
        let r = unsafe {{ kill(pid, 0) }};
        let e = std::io::Error::last_os_error();
        println!("{{what}}: {{}}", if r == 0 {{ "reached".to_string() }} else {{ format!("refused: {{e}}") }});
    }}"#,
        harness = std::process::id()
    );
    let s = Scenario::new(program(&body), 2.0);
    s.run();
    let log = s.log();
    for what in ["supervisor", "its group", "harness", "everyone"] {
        assert!(
            log.contains(&format!("{what}: refused: Operation not permitted")),
            "{what}: {log}"
        );
    }
}

#[test]
fn setsid_processes_forking_into_every_freed_slot_are_all_swept() {
    // Every process leaves its session and forks for ever, as far as the task cap allows, so
    // each slot a sweep frees is taken at once by a new one. Killed a few at a time, they would
    // regrow as fast; frozen first, none can.
    let body = format!(
        r#"{LIBC}    let start = std::time::Instant::now();
    let mut depth = 0;
    loop {{
        unsafe {{ setsid() }};
        match unsafe {{ fork() }} {{
            0 => depth += 1,
            _ if depth == 0 && start.elapsed().as_secs() >= 1 => break,
            _ => {{}}
        }}
    }}
    println!("swarm built");"#
    );
    let mut s = Scenario::new(program(&body), 2.0);
    s.exp.limits.tasks = 32;
    let t = std::time::Instant::now();
    let v = s.run_alone();
    assert_eq!(v.outcome, Outcome::InvalidReport, "{}", v.evidence);
    let log = s.log();
    assert!(log.contains("swarm built"), "{log}");
    assert!(!log.contains("still held open"), "{log}");
    assert!(t.elapsed() < Duration::from_secs(60), "{:?}", t.elapsed());
    assert_eq!(survivors(&s.exp.run_dir), Vec::<u32>::new());
}

#[test]
fn a_fork_bomb_stops_at_the_task_cap_and_leaves_nothing_behind() {
    let body = format!(
        r#"{LIBC}    let mut forked = 0;
    for _ in 0..5_000 {{
        match unsafe {{ fork() }} {{
            0 => loop {{ std::thread::sleep(std::time::Duration::from_secs(1)) }},
            -1 => break,
            _ => forked += 1,
        }}
    }}
    println!("forked {{forked}}");
    std::process::exit(3);"#
    );
    let mut s = Scenario::new(program(&body), 2.0);
    s.exp.limits.tasks = 64;
    let v = s.run();
    assert_eq!(v.outcome, Outcome::Crash, "{}", v.evidence);
    let log = s.log();
    assert!(sandboxed(&log), "{log}");
    let forked: u64 = log
        .split("forked ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{log}"));
    // A cgroup counts the run's tasks alone; RLIMIT_NPROC (a user other than root) all the
    // user's, which other scenarios running beside this one make and end meanwhile.
    let cap = if log.lines().next().unwrap().contains("cgroup") {
        64
    } else {
        1000
    };
    assert!((1..cap).contains(&forked), "forked {forked}: {log}");
    assert_eq!(survivors(&s.exp.run_dir), Vec::<u32>::new());
}

#[test]
fn allocating_past_the_memory_cap_fails_the_allocation() {
    let body = "    let mut held = Vec::new();\n    for i in 1..=16 {\n        held.push(vec![1u8; 64 << 20]);\n        println!(\"holding {} MiB\", i * 64);\n    }\n    println!(\"held it all\");";
    let mut s = Scenario::new(program(body), 2.0);
    s.exp.limits.memory = 512 << 20;
    let v = s.run();
    assert_eq!(v.outcome, Outcome::Crash, "{}", v.evidence);
    let log = s.log();
    assert!(sandboxed(&log), "{log}");
    assert!(log.contains("holding 64 MiB"), "{log}");
    assert!(log.contains("memory allocation of"), "{log}");
    assert!(!log.contains("held it all"), "{log}");
}

#[test]
fn links_planted_where_the_harness_writes_are_not_followed() {
    // The harness writes the log (beside the run dir) and removes the run dir after the run.
    let outside = tempfile::tempdir().unwrap();
    let victim = outside.path().join("bashrc");
    std::fs::write(&victim, "precious").unwrap();
    let body = format!(
        r#"    for (link, to) in [("../run.log", "{victim}"), ("victim-dir", "{dir}"), ("tmp", "{dir}")] {{
        let _ = std::fs::remove_dir_all(link);
        match std::os::unix::fs::symlink(to, link) {{
            Ok(()) => println!("planted {{link}}"),
            Err(e) => println!("could not plant {{link}}: {{e}}"),
        }}
    }}"#,
        victim = victim.display(),
        dir = outside.path().display()
    );
    for sandbox in [true, false] {
        let mut s = Scenario::new(program(&body), 2.0);
        s.exp.sandbox = sandbox;
        s.run();
        let log = s.log();
        assert_eq!(sandboxed(&log), sandbox, "{log}");
        // Confined, the link beside the run dir cannot even be made; unconfined it is, and the
        // harness replaces it rather than writing through it.
        assert_eq!(log.contains("planted ../run.log"), !sandbox, "{log}");
        assert!(log.contains("planted victim-dir"), "{log}");
        assert!(
            !std::fs::symlink_metadata(&s.exp.log_path)
                .unwrap()
                .file_type()
                .is_symlink()
        );
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious");
        assert!(!s.exp.run_dir.exists());
    }
}

//! A real session whose proposer writes hostile train files, one after another: each is
//! contained, the session goes on to the next, nothing outside the run directory changes, and no
//! secret reaches `runs/`, a report or the output.

use std::path::{Path, PathBuf};
use std::time::Duration;

use autoresearch_tests::{check_consistent, project, workspace};
use workbench::{Proposer, ProposerError, Workbench};

const SECRET: &str = "do-not-leak-7f3a";

/// `fork` and `setsid` for the std-only programs.
const LIBC: &str = "unsafe extern \"C\" {\n    fn fork() -> i32;\n    fn setsid() -> i32;\n}\n";

struct Hostile {
    files: Vec<(&'static str, String)>,
    reports: Vec<workbench::ExperimentReport>,
}

impl Proposer for Hostile {
    fn name(&self) -> String {
        "hostile".into()
    }

    fn episode(&mut self, bench: &mut dyn Workbench) -> Result<(), ProposerError> {
        let (name, file) = self.files.remove(0);
        bench.write_train_file(&file)?;
        let report = bench.run_experiment(name, "a hostile train file")?;
        self.reports.push(report);
        Ok(())
    }
}

fn program(body: &str) -> String {
    format!("{LIBC}fn main() {{\n{body}\n}}\n")
}

/// Every file under `dir`.
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut stack = vec![dir.to_path_buf()];
    let mut out = Vec::new();
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_dir() && !path.is_symlink() {
                stack.push(path);
            } else {
                out.push(path);
            }
        }
    }
    out
}

#[test]
fn hostile_train_files_are_contained_and_the_session_goes_on() {
    let p = project();
    // A home with a key in it, and another process of the user's with one in its environment.
    let home = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(home.path().join(".ssh")).unwrap();
    let key = home.path().join(".ssh/id_ed25519");
    std::fs::write(&key, SECRET).unwrap();
    // SAFETY: one test in this binary; set before the session reads the environment.
    unsafe { std::env::set_var("HOME", home.path()) };
    let mut shell = std::process::Command::new("sleep")
        .arg("300")
        .env("SHELL_SECRET", SECRET)
        .spawn()
        .unwrap();
    let outside = tempfile::tempdir().unwrap();
    let victim = outside.path().join("bashrc");
    std::fs::write(&victim, "precious").unwrap();
    let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let sock = outside.path().join("bus.sock");
    let unix = std::os::unix::net::UnixListener::bind(&sock).unwrap();

    let files = vec![
        (
            "read secrets",
            program(&format!(
                r#"    for path in ["{key}", "/proc/{pid}/environ"] {{
        match std::fs::read(path) {{
            Ok(b) => println!("read {{}}", String::from_utf8_lossy(&b)),
            Err(e) => println!("{{path}}: {{e}}"),
        }}
    }}"#,
                key = key.display(),
                pid = shell.id()
            )),
        ),
        (
            "udp and unix",
            program(&format!(
                r#"    let udp = std::net::UdpSocket::bind("127.0.0.1:0").and_then(|s| s.send_to(b"leak", "{udp}"));
    println!("udp: {{udp:?}}");
    println!("unix: {{:?}}", std::os::unix::net::UnixStream::connect("{sock}").map(drop));"#,
                udp = udp.local_addr().unwrap(),
                sock = sock.display()
            )),
        ),
        (
            "setsid daemon",
            program(
                r#"    if unsafe { fork() } == 0 {
        unsafe { setsid() };
        if unsafe { fork() } == 0 {
            loop {
                println!("daemon alive");
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
        }
        std::process::exit(0);
    }
    std::thread::sleep(std::time::Duration::from_millis(300));"#,
            ),
        ),
        (
            "fork bomb",
            program(
                r#"    let mut forked = 0;
    for _ in 0..5_000 {
        match unsafe { fork() } {
            0 => loop { std::thread::sleep(std::time::Duration::from_secs(1)) },
            -1 => break,
            _ => forked += 1,
        }
    }
    println!("forked {forked}");
    std::process::exit(3);"#,
            ),
        ),
        (
            "memory hog",
            program(
                r#"    let mut held = Vec::new();
    for i in 1..=64 {
        held.push(vec![0u8; 256 << 20]);
        println!("holding {} MiB", i * 256);
    }"#,
            ),
        ),
        (
            "planted links",
            program(&format!(
                r#"    for (link, to) in [("../logs/planted.log", "{victim}"), ("victim-dir", "{dir}"), ("tmp", "{dir}")] {{
        let _ = std::fs::remove_dir_all(link);
        println!("{{link}}: {{:?}}", std::os::unix::fs::symlink(to, link));
    }}"#,
                victim = victim.display(),
                dir = outside.path().display()
            )),
        ),
    ];
    let hostile = files.len();
    let mut settings = session::Settings {
        repo: p.repo.clone(),
        tag: "h".into(),
        cache: p.cache.clone(),
        device: runner::Device::Cpu,
        budget: Some(Duration::from_secs(2)),
        seed: 1,
        keep: session::KeepSettings::strict(),
        sandbox: true,
        sandbox_allow: Vec::new(),
        limits: runner::Limits::for_machine(),
        max_experiments: Some(hostile + 1),
        until: None,
        max_cost: None,
        target_dir: workspace().join("target/runner-tests"),
        gpus: Vec::new(),
        slurm: None,
        resume: false,
    };
    settings.limits.tasks = 128;
    settings.limits.memory = 4 << 30;
    let mut proposer = Hostile {
        files,
        reports: Vec::new(),
    };
    let mut output = String::new();
    let stop = session::run(&settings, &mut proposer, &mut |progress| {
        if let session::Progress::Line(line) = progress {
            output.push_str(line);
            output.push('\n');
        }
    })
    .unwrap();
    shell.kill().unwrap();
    shell.wait().unwrap();

    // Each was contained and the session went on to the next.
    assert_eq!(stop, session::Stop::MaxExperiments);
    assert_eq!(proposer.reports.len(), hostile);
    for r in &proposer.reports {
        assert_ne!(r.outcome, "ok", "{r:?}");
        assert_ne!(r.status, "keep", "{r:?}");
    }
    check_consistent(&p, "h");
    let logs = p.repo.join("runs/h/logs");
    let log = |hash: &str| {
        files_under(&logs)
            .into_iter()
            .find(|f| {
                let name = f.file_name().unwrap().to_string_lossy();
                name.starts_with(hash) && name.ends_with(".log")
            })
            .map(|f| std::fs::read_to_string(f).unwrap())
            .unwrap_or_else(|| panic!("no log for {hash} in {}", logs.display()))
    };
    let by_name = |i: usize| log(&proposer.reports[i].hash);
    assert!(
        by_name(0).matches("Permission denied").count() == 2,
        "{}",
        by_name(0)
    );
    let net = by_name(1);
    assert!(net.matches("Operation not permitted").count() == 2, "{net}");
    assert!(by_name(2).contains("daemon alive"));
    let bomb = by_name(3);
    let forked: u64 = bomb
        .split("forked ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{bomb}"));
    // Under RLIMIT_NPROC (a user other than root) the cap counts all the user's tasks.
    let cap = if bomb.lines().next().unwrap().contains("cgroup") {
        128
    } else {
        1000
    };
    assert!(forked < cap, "{bomb}");
    let hog = by_name(4);
    assert!(
        hog.contains("memory allocation of") && !hog.contains("holding 4096 MiB"),
        "{hog}"
    );
    assert!(by_name(5).contains("victim-dir: Ok"), "{}", by_name(5));

    // No process of any run is left.
    let work = p.repo.join("runs/h/work");
    let left: Vec<String> = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| std::fs::read_link(e.path().join("exe")).ok())
        .map(|exe| exe.to_string_lossy().into_owned())
        .filter(|exe| exe.starts_with(&*work.to_string_lossy()))
        .collect();
    assert!(left.is_empty(), "{left:?}");
    // Nothing arrived; nothing outside changed; no secret anywhere.
    udp.set_nonblocking(true).unwrap();
    assert!(udp.recv(&mut [0u8; 16]).is_err(), "a datagram arrived");
    unix.set_nonblocking(true).unwrap();
    assert!(unix.accept().is_err(), "a Unix connection arrived");
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious");
    assert_eq!(std::fs::read_to_string(&key).unwrap(), SECRET);
    assert!(!logs.join("planted.log").exists());
    for file in files_under(&p.repo.join("runs")) {
        let text = String::from_utf8_lossy(&std::fs::read(&file).unwrap_or_default()).into_owned();
        assert!(
            !text.contains(SECRET),
            "{} holds the secret",
            file.display()
        );
    }
    assert!(!output.contains(SECRET));
    for r in &proposer.reports {
        assert!(!format!("{r:?}").contains(SECRET));
    }
}

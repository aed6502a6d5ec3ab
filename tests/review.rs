//! The morning review end to end: `status --watch` in a real terminal (tmux) against a live
//! session, then that session's `report.html` loaded in headless Chromium; and a synthetic
//! 1,000-experiment session's report, to show a night of any length stays usable.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use autoresearch_tests::browser::{Browser, Page, chromium};
use autoresearch_tests::{autoresearch_bin, check_consistent, git, project, stderr, stdout};
use serde_json::{Value, json};

/// The two tests one at a time: the first trains on the wall clock, and the second's thousand
/// commits and browser beside it on two cores could stretch an honest step past the harness's
/// room.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn turn() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner())
}

/// A tmux server of the test's own (its own socket), killed when dropped.
struct Tmux {
    socket: String,
}

impl Tmux {
    fn cmd(&self) -> Command {
        let mut c = Command::new("tmux");
        c.args(["-L", &self.socket]);
        c
    }

    fn start(cwd: &Path, command: &str) -> Option<Tmux> {
        if Command::new("tmux").arg("-V").output().is_err() {
            assert!(
                std::env::var_os("AUTORESEARCH_BROWSER_REQUIRED").is_none(),
                "no tmux: `apt-get install tmux`"
            );
            eprintln!("skipped the terminal check: no tmux (`apt-get install tmux`)");
            return None;
        }
        let t = Tmux {
            socket: format!("autoresearch-test-{}", std::process::id()),
        };
        let out = t
            .cmd()
            .args([
                "-f",
                "/dev/null",
                "new-session",
                "-d",
                "-s",
                "watch",
                "-x",
                "160",
                "-y",
                "40",
                "-c",
            ])
            .arg(cwd)
            .arg(command)
            .output()
            .unwrap();
        assert!(out.status.success(), "tmux: {}", stderr(&out));
        Some(t)
    }

    fn screen(&self) -> String {
        let out = self
            .cmd()
            .args(["capture-pane", "-p", "-t", "watch"])
            .output()
            .unwrap();
        stdout(&out)
    }

    /// Waits until the screen satisfies `ok`, returning it.
    fn wait_for(&self, what: &str, timeout: Duration, ok: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let screen = self.screen();
            if ok(&screen) {
                return screen;
            }
            assert!(
                Instant::now() < deadline,
                "waited for {what}; the terminal shows:\n{screen}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = self.cmd().arg("kill-server").output();
    }
}

fn open_report(browser: &mut Browser, page: &Page, path: &Path) {
    let url = format!("file://{}", path.display());
    browser.open(page, &url);
    // The page's script ran (the policy admitted it) and drew the table.
    let ready = browser.eval(page, "document.body.dataset.ready");
    assert_eq!(
        ready,
        json!("1"),
        "the report's script did not run: {:?}",
        browser.errors()
    );
}

fn assert_clean(browser: &mut Browser, path: &Path) {
    let errors = browser.errors();
    assert!(errors.is_empty(), "console errors: {errors:#?}");
    let own = format!("file://{}", path.display());
    let requests = browser.requests();
    let left: Vec<&String> = requests.iter().filter(|u| **u != own).collect();
    assert!(left.is_empty(), "requests leaving the file: {left:?}");
}

#[test]
fn a_live_session_watched_in_a_terminal_then_its_report_in_chromium() {
    let _turn = turn();
    let p = project();
    let mut session = p
        .session("night", 4, false)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let harness = session.id();

    // `status --watch` in a real terminal while the session runs.
    let watch = format!(
        "{} status --tag night --watch --interval 0.5",
        autoresearch_bin().display()
    );
    let tmux = Tmux::start(&p.repo, &watch);
    if let Some(t) = &tmux {
        let live = t.wait_for(
            "the running session and its experiment in flight",
            Duration::from_secs(300),
            |s| {
                s.contains(&format!("session night: running (pid {harness})"))
                    && s.contains("in flight  #")
                    // The frame's last line: the screen is not caught mid-redraw.
                    && s.contains("Ctrl-C stops watching")
            },
        );
        assert!(live.contains("stops at 4 experiments"), "{live}");
        // It follows the session: a finished experiment shows up under the last outcomes.
        t.wait_for("a finished experiment", Duration::from_secs(300), |s| {
            s.lines()
                .any(|l| l.starts_with("  #0 ") && l.contains("keep"))
        });
    }
    let status = session.wait().unwrap();
    assert!(status.success(), "the watched session failed");
    // Watching disturbed nothing: git and the journal agree.
    let experiments = check_consistent(&p, "night");
    assert_eq!(experiments.len(), 4);
    if let Some(t) = &tmux {
        let after = t.wait_for("the ended session", Duration::from_secs(30), |s| {
            s.contains("session night: not running") && s.contains("Ctrl-C stops watching")
        });
        assert!(after.contains("in flight  nothing"), "{after}");
        assert!(after.contains("pace       4 experiments"), "{after}");
    }
    let once = p.run(&["status", "--tag", "night"]);
    assert!(once.status.success(), "{}", stderr(&once));
    assert!(
        stdout(&once).contains("(its harness, pid"),
        "{}",
        stdout(&once)
    );

    let out = p.run(&["report", "--tag", "night"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let path = p.repo.join("runs/night/report.html");
    assert!(stdout(&out).contains(&path.display().to_string()));

    let Some(chromium) = chromium() else { return };
    let mut browser = Browser::launch(&chromium);
    let page = browser.new_page();
    open_report(&mut browser, &page, &path);
    // The chart, the counts, the table.
    let svg_marks = browser.eval(
        &page,
        "document.querySelectorAll('#chart svg circle').length",
    );
    assert!(
        svg_marks.as_u64().unwrap() >= 4,
        "chart markers: {svg_marks}"
    );
    let total = browser.eval(
        &page,
        "document.querySelector('[data-total=experiments]').textContent",
    );
    assert!(total.as_str().unwrap().starts_with("4 "), "{total}");
    let rows = browser.eval(
        &page,
        "document.querySelectorAll('#experiments tbody tr.row').length",
    );
    assert_eq!(rows, json!(4));
    let kept = experiments.iter().filter(|(_, s)| s == "keep").count();
    let chain = browser.eval(&page, "document.querySelectorAll('.chain li').length");
    assert_eq!(chain, json!(kept));

    // A diff renders, highlighted, when a row is expanded.
    let second = &experiments[1].0;
    let diff = browser.eval(
        &page,
        &format!(
            "(() => {{ document.querySelector('tr.row[data-hash=\"{second}\"]').click();
                const pre = document.querySelector('tr.detail pre.diff');
                return {{ text: pre.textContent, added: pre.querySelectorAll('span.add').length,
                          removed: pre.querySelectorAll('span.del').length,
                          replay: document.querySelector('tr.detail code.replay').textContent }}; }})()"
        ),
    );
    assert!(
        diff["text"]
            .as_str()
            .unwrap()
            .contains("+++ b/train/src/main.rs"),
        "{diff}"
    );
    // One constant changed: an added line at least (a constant the preset inherited gets a
    // line of its own, with nothing removed), each line highlighted by its kind.
    assert!(diff["added"].as_u64().unwrap() >= 1, "{diff}");
    assert_eq!(
        diff["replay"],
        json!(format!("autoresearch replay {second}"))
    );
    // The git CLI agrees with the diff the page shows.
    let shown = git(&p.repo, &["show", "--format=", second]);
    let changed = shown
        .lines()
        .find(|l| l.starts_with('+') && !l.starts_with("+++"))
        .unwrap();
    assert!(
        diff["text"].as_str().unwrap().contains(changed),
        "{changed} not in {diff}"
    );

    // Filtering by status shows only the kept.
    let shown = browser.eval(
        &page,
        "(() => { const s = document.getElementById('status'); s.value = 'keep';
            s.dispatchEvent(new Event('change'));
            return document.querySelectorAll('#experiments tbody tr.row').length; })()",
    );
    assert_eq!(shown, json!(kept));

    let png = browser.screenshot(&page);
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    std::fs::write(p.repo.join("runs/night/report.png"), &png).unwrap();
    if let Some(dir) = std::env::var_os("AUTORESEARCH_SCREENSHOT_DIR") {
        std::fs::write(Path::new(&dir).join("report.png"), &png).unwrap();
    }
    assert_clean(&mut browser, &path);
}

/// A night of 1,000 experiments written through the ledger (real commits, a real journal; no
/// training): 1 in 15 kept, 1 in 37 crashed.
fn thousand_experiment_session(repo: &Path) {
    std::fs::create_dir_all(repo.join("train/src")).unwrap();
    let train = repo.join("train/src/main.rs");
    let constants: String = (0..60)
        .map(|k| format!("const C{k}: f64 = {k}.0;\n"))
        .collect();
    std::fs::write(&train, format!("{constants}fn main() {{}}\n")).unwrap();
    std::fs::write(repo.join(".gitignore"), "runs/\n").unwrap();
    std::fs::write(
        repo.join("Cargo.toml"),
        "[workspace]\nmembers = [\"train\"]\n",
    )
    .unwrap();
    git(repo, &["init", "-q", "-b", "main"]);
    git(repo, &["add", "-A"]);
    git(repo, &["commit", "-q", "-m", "project"]);
    let mut ledger = ledger::Ledger::start(
        repo,
        ledger::SessionMeta {
            tag: "big".into(),
            base: String::new(),
            preset: "tiny".into(),
            device: "cpu".into(),
            budget_s: 300.0,
            seed: 42,
            agent: "synthetic".into(),
            started_unix: 0,
            keep: ledger::KeepSettings::strict(),
        },
    )
    .unwrap();
    let mut best = 1.0;
    for i in 0..1000usize {
        let text = std::fs::read_to_string(&train).unwrap();
        let k = i % 60;
        let edited = text.replacen(
            &format!("const C{k}: f64 = "),
            &format!("const C{k}: f64 = 1.0{i} * "),
            1,
        );
        std::fs::write(&train, edited).unwrap();
        let description = format!("experiment {i}: scale C{k} by 1.0{i}");
        ledger.begin(&description, "a synthetic night").unwrap();
        let crashed = i % 37 == 36;
        let kept = i == 0 || i % 15 == 0;
        let val = if kept {
            best -= 0.0004;
            best
        } else {
            best + 0.0005 + (i % 7) as f64 * 0.0003
        };
        let finish = ledger::Finish {
            outcome: if crashed { "crash" } else { "ok" }.into(),
            val_bpb: (!crashed).then_some(val),
            memory_gb: 1.0,
            build_seconds: 1.5,
            run_seconds: 310.0,
            evidence: if crashed {
                "exit 101: panicked".into()
            } else {
                String::new()
            },
            tokens_in: Some(20_000),
            tokens_out: Some(900),
            cost_usd: Some(0.04),
            ..ledger::Finish::default()
        };
        ledger.record_run(i as u64, finish.clone()).unwrap();
        let status = if kept {
            ledger::Status::Keep
        } else {
            ledger::Status::Discard
        };
        ledger.finish(finish, status, None).unwrap();
    }
}

#[test]
fn a_thousand_experiment_report_opens_and_stays_usable() {
    let _turn = turn();
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("repo");
    std::fs::create_dir_all(&repo).unwrap();
    let made = Instant::now();
    thousand_experiment_session(&repo);
    eprintln!(
        "the synthetic session: {:.1} s",
        made.elapsed().as_secs_f64()
    );

    let started = Instant::now();
    let out = Command::new(autoresearch_bin())
        .args(["report", "--tag", "big"])
        .current_dir(&repo)
        .output()
        .unwrap();
    let written = started.elapsed();
    assert!(out.status.success(), "{}", stderr(&out));
    let path = repo.join("runs/big/report.html");
    let size = std::fs::metadata(&path).unwrap().len();
    eprintln!(
        "report of 1000 experiments: written in {:.2} s, {:.1} MB",
        written.as_secs_f64(),
        size as f64 / 1e6
    );

    let Some(chromium) = chromium() else { return };
    let mut browser = Browser::launch(&chromium);
    let page = browser.new_page();
    open_report(&mut browser, &page, &path);
    let timing: Value = browser.eval(
        &page,
        "(() => { const n = performance.getEntriesByType('navigation')[0];
            return { dom: n.domContentLoadedEventEnd, load: n.loadEventEnd }; })()",
    );
    eprintln!(
        "Chromium: DOMContentLoaded at {:.0} ms, load at {:.0} ms",
        timing["dom"].as_f64().unwrap(),
        timing["load"].as_f64().unwrap()
    );
    let rows = browser.eval(
        &page,
        "document.querySelectorAll('#experiments tbody tr.row').length",
    );
    assert_eq!(rows, json!(1000));
    let total = browser.eval(
        &page,
        "document.querySelector('[data-total=experiments]').textContent",
    );
    assert!(total.as_str().unwrap().starts_with("1000 "), "{total}");
    // Sorted by val_bpb, the best comes first; the crashes (no value) go last.
    let sorted = browser.eval(
        &page,
        "(() => { document.querySelector('th[data-key=val_bpb]').click();
            const rows = [...document.querySelectorAll('#experiments tbody tr.row')];
            return [rows[0].children[4].textContent, rows[rows.length - 1].children[2].textContent]; })()",
    );
    let best = 1.0 - 0.0004 * (1 + 999 / 15) as f64;
    assert_eq!(sorted, json!([format!("{best:.6}"), "crash"]));
    // A filter narrows the table; a late experiment expands with its diff.
    let filtered = browser.eval(
        &page,
        "(() => { const f = document.getElementById('filter'); f.value = 'C7 by';
            f.dispatchEvent(new Event('input'));
            return document.querySelectorAll('#experiments tbody tr.row').length; })()",
    );
    assert_eq!(filtered, json!((0..1000).filter(|i| i % 60 == 7).count()));
    let diff = browser.eval(
        &page,
        "(() => { const rows = [...document.querySelectorAll('#experiments tbody tr.row')];
            rows.find((r) => r.children[11].textContent.startsWith('experiment 967:')).click();
            return document.querySelector('tr.detail pre.diff').textContent; })()",
    );
    assert!(
        diff.as_str()
            .unwrap()
            .contains("+const C7: f64 = 1.0967 * "),
        "{diff}"
    );
    assert_clean(&mut browser, &path);
}

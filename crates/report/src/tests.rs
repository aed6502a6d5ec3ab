use ledger::{Begin, End, Finish, Judgement, KeepSettings, Record, RunEnd, SessionMeta, Status};

use super::*;

const HOSTILE: &str = "</script><script>alert(1)</script><img src=x onerror=alert(2)>";

fn record(index: usize, val: Option<f64>, status: Option<Status>, description: &str) -> Record {
    let hash = format!("{index:07x}{}", "0".repeat(33));
    let finish = Finish {
        outcome: if val.is_some() { "ok" } else { "crash" }.into(),
        val_bpb: val,
        memory_gb: 1.5,
        build_seconds: 2.0,
        run_seconds: 300.0,
        evidence: if val.is_some() {
            String::new()
        } else {
            "exit 1: FAIL loss nan".into()
        },
        tokens_in: Some(1000),
        tokens_out: Some(100),
        cost_usd: Some(0.25),
        ..Finish::default()
    };
    Record {
        begin: Begin {
            index,
            hash: hash.clone(),
            parent: "f".repeat(40),
            description: description.into(),
            rationale: format!("because {index}"),
            started_unix: 1_000_000 + index as u64 * 400,
            worker: None,
        },
        runs: vec![RunEnd {
            hash: hash.clone(),
            run: 0,
            seed: 42 + index as u64,
            finish: finish.clone(),
        }],
        end: status.map(|status| End {
            index,
            hash,
            status,
            finished_unix: 1_000_000 + index as u64 * 400 + 350,
            finish,
            judgement: Some(Judgement {
                rule: "noise".into(),
                runs: 1,
                gain_sigma: Some(3.5),
                ..Judgement::default()
            }),
        }),
    }
}

fn session(records: Vec<Record>) -> Session {
    Session {
        meta: SessionMeta {
            tag: "night<1>".into(),
            base: "a".repeat(40),
            preset: "tiny".into(),
            device: "cpu".into(),
            budget_s: 300.0,
            seed: 42,
            agent: "sweep".into(),
            started_unix: 1_000_000,
            keep: KeepSettings::default(),
        },
        records,
        attached: None,
        dir: std::path::PathBuf::from("/nonexistent/runs/night1"),
    }
}

fn night() -> Session {
    let mut s = session(vec![
        record(0, Some(1.0), Some(Status::Keep), "baseline"),
        record(1, Some(1.01), Some(Status::Discard), HOSTILE),
        record(2, Some(0.98), Some(Status::Keep), "lower the learning rate"),
        record(3, None, Some(Status::Crash), "double the depth"),
    ]);
    s.records[2].begin.rationale = HOSTILE.into();
    s
}

fn page(s: &Session) -> String {
    let details: Vec<Detail> = s
        .records
        .iter()
        .map(|r| Detail {
            diff: format!(
                "--- a\n+++ b\n@@ -1 +1 @@\n-old\n+{}\n",
                r.begin.description
            ),
            log_tail: format!("step 1 {}", r.begin.description),
        })
        .collect();
    render(s, &details, 1_000_000 + 4 * 400).unwrap()
}

#[test]
fn hostile_text_never_becomes_markup() {
    let html = page(&night());
    // The data script and the page's own: nothing a model wrote opened another element.
    assert_eq!(html.matches("<script").count(), 2, "script elements");
    assert!(!html.contains("<img"), "an injected element");
    // The text is still there, escaped, for the reader.
    assert!(
        html.contains("\\u003c/script>\\u003cscript>alert(1)"),
        "in the JSON"
    );
    assert!(
        html.contains("<p class=\"why\">&lt;/script&gt;&lt;script&gt;"),
        "in the kept chain"
    );
    assert!(html.contains("session night&lt;1&gt;"), "the tag escaped");
}

#[test]
fn the_policy_allows_exactly_the_page_script_and_no_request() {
    let mut s = night();
    s.records[1].begin.description = "plain".into();
    s.records[2].begin.rationale = "plain".into();
    let html = page(&s);
    let hash = base64::engine::general_purpose::STANDARD.encode(Sha256::digest(SCRIPT));
    assert!(html.contains(&format!("script-src 'sha256-{hash}'")));
    assert!(html.contains("default-src 'none'"));
    // The script is on the page byte for byte, so the hash admits it.
    assert!(html.contains(&format!("<script>{SCRIPT}</script>")));
    // Nothing that would load: no src, no href, no url(...).
    for needle in [" src=", "href=", "url(", "@import"] {
        assert!(!html.contains(needle), "{needle} in the page");
    }
}

#[test]
fn the_page_holds_the_chart_the_totals_and_the_kept_chain() {
    let html = page(&night());
    assert!(html.contains("<svg"), "the chart inline");
    assert!(html.contains(
        "<dd data-total=\"experiments\">4 <small>2 kept · 1 discarded · 1 crashed</small>"
    ));
    // Two kept, in order, with their deltas; the crash and the discard are not in the chain.
    let chain = &html[html.find("id=\"kept\"").unwrap()..html.find("id=\"all\"").unwrap()];
    assert_eq!(chain.matches("<li class=\"kept\"").count(), 2);
    assert!(chain.contains("Δbase -0.020000"), "{chain}");
    assert!(chain.contains("because 0"), "the rationale");
    assert!(
        chain.contains("&lt;/script&gt;"),
        "a hostile rationale, escaped"
    );
    assert!(chain.contains("autoresearch replay 0000002"));
    assert!(!chain.contains("double the depth"));
    // Spend: four experiments at $0.25.
    assert!(html.contains("$1.00 <small>4000 tokens in, 400 out</small>"));
    assert!(html.contains("-2.00% vs baseline"));
}

#[test]
fn every_experiment_is_in_the_data_with_its_diff_log_and_replay() {
    let html = page(&night());
    let start = html.find("id=\"data\">").unwrap() + "id=\"data\">".len();
    let end = start + html[start..].find("</script>").unwrap();
    let data: serde_json::Value = serde_json::from_str(&html[start..end]).unwrap();
    let rows = data["experiments"].as_array().unwrap();
    assert_eq!(rows.len(), 4);
    assert_eq!(rows[1]["description"], HOSTILE, "the text round-trips");
    assert_eq!(rows[3]["status"], "crash");
    assert_eq!(rows[3]["evidence"], "exit 1: FAIL loss nan");
    assert_eq!(
        rows[2]["diff"],
        "--- a\n+++ b\n@@ -1 +1 @@\n-old\n+lower the learning rate\n"
    );
    assert_eq!(rows[2]["log_tail"], "step 1 lower the learning rate");
    assert_eq!(
        rows[2]["replay"],
        format!("autoresearch replay {}", rows[2]["hash"].as_str().unwrap())
    );
    assert_eq!(rows[0]["runs"][0]["seed"], 42);
}

#[test]
fn an_experiment_in_flight_is_running_and_counts_toward_the_clock() {
    let mut s = night();
    s.records.push(record(4, None, None, "in flight"));
    let html = page(&s);
    let data = &html[html.find("id=\"data\">").unwrap()..];
    assert!(data.contains("\"outcome\":\"in flight\""));
    assert!(data.contains("\"status\":\"running\""));
    let t = Totals::of(&s, 1_000_000 + 3600);
    assert_eq!(t.hours, 1.0, "while one runs, the clock runs to now");
    assert_eq!(t.per_hour(), Some(4.0));
}

#[test]
fn an_empty_session_renders() {
    let html = page(&session(Vec::new()));
    assert!(html.contains("no experiments yet"));
    assert!(html.contains("\"experiments\":[]"));
}

#[test]
fn the_glance_says_what_runs_what_is_best_and_what_came_last() {
    let mut s = night();
    s.records.push(record(4, None, None, "in flight"));
    s.records[4].runs.clear();
    let now = 1_000_000 + 4 * 400 + 75;
    let g = Glance::of(&s, now);
    assert!(!g.running, "no harness attached");
    let text = g.to_string();
    assert!(
        text.starts_with(
            "session night<1>: not running: `autoresearch run --tag night<1> --resume` goes on"
        ),
        "{text}"
    );
    assert!(
        text.contains("in flight  #4 0000004 \"in flight\": 1m 15s so far"),
        "{text}"
    );
    assert!(
        text.contains("best       0.980000 (#2 0000002), -2.00% vs baseline 1.000000"),
        "{text}"
    );
    assert!(
        text.contains(
            "pace       5 experiments in 0.5 h: 8.6 per hour (2 kept, 1 discarded, 1 crashed)"
        ),
        "{text}"
    );
    assert!(
        text.contains("spend      $1.00 (4000 tokens in, 400 out)"),
        "{text}"
    );
    // Newest first, a crash with its outcome.
    let recent: Vec<&str> = text
        .lines()
        .skip_while(|l| *l != "last outcomes")
        .skip(1)
        .collect();
    assert_eq!(recent.len(), 4, "{text}");
    assert!(
        recent[0].contains("#3") && recent[0].ends_with("double the depth [crash]"),
        "{text}"
    );
}

#[test]
fn the_glance_knows_a_live_harness_and_its_deadline() {
    let mut s = night();
    let now = 1_000_000 + 2000;
    // This test process stands in for the harness: its cmdline names the test binary, which
    // is not `autoresearch`, so a plain pid is not enough.
    s.attached = Some(ledger::Attach {
        pid: std::process::id(),
        started_unix: now - 90,
        until_unix: Some(now + 2 * 3600 + 300),
        max_experiments: Some(50),
        max_cost_usd: None,
        workers: None,
        executor: None,
    });
    let is_harness = is_running(std::process::id());
    let text = Glance::of(&s, now).to_string();
    if is_harness {
        assert!(text.contains("running (pid"), "{text}");
        assert!(
            text.contains("--until in 2h 05m; stops at 50 experiments"),
            "{text}"
        );
    } else {
        assert!(text.contains(&format!(
            "(its harness, pid {}, has ended)",
            std::process::id()
        )));
    }
    assert!(!is_running(u32::MAX), "no such process");
}

#[test]
fn durations_read_as_a_person_says_them() {
    assert_eq!(glance::duration(12), "12s");
    assert_eq!(glance::duration(250), "4m 10s");
    assert_eq!(glance::duration(7380), "2h 03m");
}

#[test]
fn utc_dates() {
    assert_eq!(utc(0), "1970-01-01 00:00 UTC");
    assert_eq!(utc(1_795_000_000), "2026-11-18 11:06 UTC");
}

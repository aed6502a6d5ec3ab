//! The ledger on a real git repository in a temporary directory.

use std::path::Path;

use git2::{Oid, Repository};
use ledger::{
    Decision, Finish, KeepSettings, Ledger, LedgerError, SessionMeta, Status, TRAIN_FILE, judge,
    results,
};

fn repo_with_train_file() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let repo = Repository::init(dir.path()).unwrap();
    std::fs::create_dir_all(dir.path().join("train/src")).unwrap();
    std::fs::write(dir.path().join(TRAIN_FILE), "const LR: f64 = 0.04;\n").unwrap();
    std::fs::write(dir.path().join(".gitignore"), "/runs\n").unwrap();
    std::fs::write(dir.path().join("README.md"), "hello\n").unwrap();
    let mut index = repo.index().unwrap();
    for f in [TRAIN_FILE, ".gitignore", "README.md"] {
        index.add_path(Path::new(f)).unwrap();
    }
    index.write().unwrap();
    let tree = repo.find_tree(index.write_tree().unwrap()).unwrap();
    let sig = git2::Signature::now("t", "t@t").unwrap();
    repo.commit(Some("HEAD"), &sig, &sig, "init", &tree, &[])
        .unwrap();
    dir
}

fn meta(tag: &str) -> SessionMeta {
    SessionMeta {
        tag: tag.into(),
        base: String::new(),
        preset: "tiny".into(),
        device: "cpu".into(),
        budget_s: 10.0,
        seed: 42,
        agent: "test".into(),
        started_unix: 0,
        keep: KeepSettings::default(),
    }
}

fn ok(val: f64) -> Finish {
    Finish {
        outcome: "ok".into(),
        val_bpb: Some(val),
        memory_gb: 0.1,
        ..Finish::default()
    }
}

fn set_lr(root: &Path, lr: &str) {
    std::fs::write(root.join(TRAIN_FILE), format!("const LR: f64 = {lr};\n")).unwrap();
}

fn branch_commits(repo: &Repository, tag: &str) -> Vec<String> {
    let mut walk = repo.revwalk().unwrap();
    walk.push_ref(&format!("refs/heads/autoresearch/{tag}"))
        .unwrap();
    let base = repo
        .revparse_single("master")
        .or_else(|_| repo.revparse_single("main"));
    if let Ok(base) = base {
        walk.hide(base.id()).unwrap();
    }
    let mut v: Vec<String> = walk.map(|o| o.unwrap().to_string()).collect();
    v.reverse();
    v
}

#[test]
fn kept_on_the_branch_discarded_under_refs_notes_everywhere() {
    let dir = repo_with_train_file();
    let root = dir.path();
    let mut ledger = Ledger::start(root, meta("t1")).unwrap();
    let base = ledger.begin("baseline", "").unwrap();
    ledger.finish(ok(1.0), Status::Keep, None).unwrap();
    set_lr(root, "0.05");
    let better = ledger.begin("lr 0.05", "higher rate").unwrap();
    ledger.finish(ok(0.9), Status::Keep, None).unwrap();
    set_lr(root, "0.08");
    let worse = ledger.begin("lr 0.08", "").unwrap();
    ledger.finish(ok(0.95), Status::Discard, None).unwrap();
    // The train file is back to the kept state after a discard.
    assert_eq!(
        std::fs::read_to_string(root.join(TRAIN_FILE)).unwrap(),
        "const LR: f64 = 0.05;\n"
    );
    set_lr(root, "bad");
    let crashed = ledger.begin("lr bad", "").unwrap();
    let crash = Finish {
        outcome: "compile_error".into(),
        ..Finish::default()
    };
    // A failed outcome is a crash whatever the caller says.
    assert_eq!(
        ledger.finish(crash, Status::Keep, None).unwrap().status,
        Status::Crash
    );

    let repo = Repository::open(root).unwrap();
    assert_eq!(
        branch_commits(&repo, "t1"),
        vec![base.hash.clone(), better.hash.clone()]
    );
    for h in [&worse.hash, &crashed.hash] {
        let r = repo
            .find_reference(&format!("refs/autoresearch/t1/discarded/{h}"))
            .unwrap();
        assert_eq!(r.target().unwrap().to_string(), *h);
    }
    for h in [&base.hash, &better.hash, &worse.hash, &crashed.hash] {
        let note = repo
            .find_note(Some(ledger::NOTES_REF), Oid::from_str(h).unwrap())
            .unwrap();
        assert!(note.message().unwrap().contains("outcome: "), "{h}");
    }
    let msg = repo
        .find_commit(Oid::from_str(&better.hash).unwrap())
        .unwrap();
    assert_eq!(msg.message().unwrap(), "lr 0.05\n\nhigher rate\n");
    assert!(
        ledger::dirty_paths(&repo).unwrap().is_empty(),
        "tree clean after the session"
    );

    let rows = results::read(&root.join("runs/t1/results.tsv")).unwrap();
    let statuses: Vec<_> = rows.iter().map(|r| r.status).collect();
    assert_eq!(
        statuses,
        [Status::Keep, Status::Keep, Status::Discard, Status::Crash]
    );
    assert_eq!(rows[2].commit, worse.hash[..7]);
    assert_eq!(rows[3].val_bpb, None);
    let session = ledger::Session::load(root, "t1").unwrap();
    assert_eq!(session.best().unwrap().begin.hash, better.hash);
    assert_eq!(
        ledger
            .tried(b"const LR: f64 = 0.08;\n")
            .unwrap()
            .unwrap()
            .begin
            .hash,
        worse.hash
    );
    assert!(ledger.tried(b"const LR: f64 = 0.07;\n").unwrap().is_none());
    let diff = ledger::diff_against_parent(root, &worse.hash).unwrap();
    assert!(
        diff.contains("-const LR: f64 = 0.05;") && diff.contains("+const LR: f64 = 0.08;"),
        "{diff}"
    );
}

#[test]
fn dirty_tree_and_existing_tag_are_refused_before_anything_moves() {
    let dir = repo_with_train_file();
    let root = dir.path();
    std::fs::write(root.join("README.md"), "edited\n").unwrap();
    match Ledger::start(root, meta("t2")) {
        Err(e @ LedgerError::Dirty(_)) => {
            let msg = e.to_string();
            assert!(
                msg.contains("README.md") && msg.contains("git stash"),
                "{msg}"
            );
        }
        other => panic!("expected Dirty, got {:?}", other.err()),
    }
    let repo = Repository::open(root).unwrap();
    assert!(repo.find_reference("refs/heads/autoresearch/t2").is_err());
    assert!(!root.join("runs/t2").exists());
    std::fs::write(root.join("README.md"), "hello\n").unwrap();

    drop(Ledger::start(root, meta("t2")).unwrap());
    let err = Ledger::start(root, meta("t2")).err().unwrap().to_string();
    assert!(err.contains("--resume"), "{err}");
    assert!(matches!(
        Ledger::start(root, meta("../x")),
        Err(LedgerError::BadTag(_))
    ));
}

#[test]
fn resume_puts_the_branch_on_the_experiment_in_flight() {
    let dir = repo_with_train_file();
    let root = dir.path();
    let mut ledger = Ledger::start(root, meta("t3")).unwrap();
    ledger.begin("baseline", "").unwrap();
    ledger.finish(ok(1.0), Status::Keep, None).unwrap();
    set_lr(root, "0.06");
    let flying = ledger.begin("lr 0.06", "").unwrap();
    drop(ledger);
    // A kill after the journal line but before the branch moved: simulate by moving it back,
    // and scribble on the train file as a proposer would have.
    let repo = Repository::open(root).unwrap();
    repo.reference(
        "refs/heads/autoresearch/t3",
        Oid::from_str(&flying.parent).unwrap(),
        true,
        "test",
    )
    .unwrap();
    set_lr(root, "0.5");
    // And a torn journal line from a kill mid-append.
    let journal = root.join("runs/t3/journal.jsonl");
    let mut text = std::fs::read_to_string(&journal).unwrap();
    text += "{\"event\":\"end\",\"ind";
    std::fs::write(&journal, text).unwrap();

    let mut ledger = Ledger::resume(root, "t3").unwrap();
    let pending = ledger.session().pending().unwrap().clone();
    assert_eq!(pending.begin.hash, flying.hash);
    assert_eq!(ledger.tip().unwrap().to_string(), flying.hash);
    assert_eq!(
        std::fs::read_to_string(root.join(TRAIN_FILE)).unwrap(),
        "const LR: f64 = 0.06;\n"
    );
    ledger.finish(ok(0.8), Status::Keep, None).unwrap();
    let session = ledger::Session::load(root, "t3").unwrap();
    assert_eq!(session.records.len(), 2, "no experiment lost or doubled");
    assert_eq!(
        results::read(&root.join("runs/t3/results.tsv"))
            .unwrap()
            .len(),
        2
    );
    assert!(matches!(
        Ledger::resume(root, "nope"),
        Err(LedgerError::NoSession { .. })
    ));
}

#[test]
fn the_reference_overnight_log_reads() {
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/results-h100-mar8.tsv");
    let text = std::fs::read_to_string(&path).unwrap();
    let rows = results::parse(&text, "mar8").unwrap();
    assert_eq!(rows.len(), 126);
    assert_eq!(rows[0].val_bpb, Some(0.9979));
    let best = rows
        .iter()
        .filter(|r| r.status == Status::Keep)
        .filter_map(|r| r.val_bpb)
        .fold(f64::INFINITY, f64::min);
    assert_eq!(best, 0.969686);
    assert!(
        rows.iter()
            .any(|r| r.status == Status::Crash && r.val_bpb.is_none())
    );
    assert!(results::parse("commit\tval\n", "x").is_err());
}

/// Records one run of the experiment in flight with the seed the ledger gives it.
fn run(ledger: &mut Ledger, val: f64) -> u64 {
    let seed = ledger.next_seed().unwrap();
    ledger.record_run(seed, ok(val)).unwrap();
    seed
}

#[test]
fn runs_are_journaled_one_by_one_and_a_kill_mid_confirmation_resumes_at_the_next() {
    let dir = repo_with_train_file();
    let root = dir.path();
    let settings = KeepSettings::default();
    let mut ledger = Ledger::start(root, meta("t5")).unwrap();
    ledger.begin("baseline", "").unwrap();
    let mut seeds = vec![run(&mut ledger, 1.000)];
    assert_eq!(
        seeds[0], 42,
        "the baseline's first run has the session's seed"
    );
    assert_eq!(judge(&settings, ledger.session()).0, Decision::Confirm);
    seeds.push(run(&mut ledger, 1.002));
    seeds.push(run(&mut ledger, 0.998));
    let (decision, j) = judge(&settings, ledger.session());
    assert_eq!(
        decision,
        Decision::Keep,
        "the baseline is kept with its 3 runs"
    );
    assert_eq!(j.runs, 3);
    ledger.finish(ok(1.0), Status::Keep, Some(j)).unwrap();
    let noise = ledger.session().noise().unwrap();
    assert_eq!(noise.dof, 2);
    assert!((noise.sigma - 0.002).abs() < 1e-9, "{noise:?}");

    // A candidate 3 σ better on one run: too close to call while σ rests on 2 dof.
    set_lr(root, "0.05");
    ledger.begin("lr 0.05", "").unwrap();
    seeds.push(run(&mut ledger, 0.994));
    assert_eq!(judge(&settings, ledger.session()).0, Decision::Confirm);
    drop(ledger); // killed during its confirmation run

    let mut ledger = Ledger::resume(root, "t5").unwrap();
    let pending = ledger.session().pending().unwrap().clone();
    assert_eq!(pending.runs.len(), 1, "the first run kept, not doubled");
    assert_eq!(pending.values(), vec![0.994]);
    seeds.push(run(&mut ledger, 0.9945));
    assert_eq!(judge(&settings, ledger.session()).0, Decision::Confirm);
    seeds.push(run(&mut ledger, 0.9940));
    let mut unique = seeds.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(
        unique.len(),
        seeds.len(),
        "every run its own seed: {seeds:?}"
    );
    let (decision, j) = judge(&settings, ledger.session());
    assert_eq!(
        decision,
        Decision::Keep,
        "confirmed on the mean of three runs"
    );
    assert_eq!(j.runs, 3);
    assert_eq!(j.best, Some(1.0));
    // The confirmations refine σ: two more degrees of freedom.
    assert_eq!(ledger.session().noise().unwrap().dof, 4);
    ledger.finish(ok(0.99417), Status::Keep, Some(j)).unwrap();
    let session = ledger::Session::load(root, "t5").unwrap();
    assert_eq!(session.records[1].runs.len(), 3);
    let j = session.records[1]
        .end
        .as_ref()
        .unwrap()
        .judgement
        .clone()
        .unwrap();
    assert_eq!(j.runs, 3);
    assert!(j.gain_sigma.unwrap() > 3.0, "{j:?}");
}

#[test]
fn repeats_that_ignore_the_seed_are_flagged_and_measure_no_noise() {
    let dir = repo_with_train_file();
    let root = dir.path();
    let mut ledger = Ledger::start(root, meta("t6")).unwrap();
    ledger.begin("baseline", "").unwrap();
    for _ in 0..3 {
        run(&mut ledger, 0.987654321);
    }
    let (decision, j) = judge(&KeepSettings::default(), ledger.session());
    assert_eq!(decision, Decision::Keep);
    assert!(j.seed_ignored, "three seeds, one bit-identical result");
    assert!(
        ledger.session().noise().is_none(),
        "a zero spread is not noise measured"
    );
}

#[test]
fn journals_from_before_runs_resume_with_the_strict_rule() {
    let dir = repo_with_train_file();
    let root = dir.path();
    drop(Ledger::start(root, meta("t7")).unwrap());
    // A session line as written before the keep settings existed.
    let journal = root.join("runs/t7/journal.jsonl");
    let text = std::fs::read_to_string(&journal).unwrap();
    let mut line: serde_json::Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
    line.as_object_mut().unwrap().remove("keep");
    std::fs::write(&journal, format!("{line}\n")).unwrap();
    let mut ledger = Ledger::resume(root, "t7").unwrap();
    assert_eq!(ledger.session().meta.keep, KeepSettings::strict());
    ledger.begin("baseline", "").unwrap();
    run(&mut ledger, 1.0);
    assert_eq!(
        judge(&ledger.session().meta.keep, ledger.session()).0,
        Decision::Keep,
        "one baseline run under the strict rule"
    );
}

/// One worker keeps a chain (b, then c on b) while the other's experiment from the older base
/// runs; it ends best and the branch moves onto it. The superseded ref is named after the tip
/// the branch left (c), and b, below c, stays reachable through it.
#[test]
fn a_kept_chain_left_by_the_branch_stays_reachable_through_its_tip() {
    let dir = repo_with_train_file();
    let root = dir.path();
    let mut ledger = Ledger::start(root, meta("t10")).unwrap();
    ledger.begin("baseline", "").unwrap();
    ledger.finish(ok(1.0), Status::Keep, None).unwrap();
    let base = ledger.tip().unwrap();
    let (w0, w1) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let c0 = ledger::Checkout::add(root, &w0.path().join("c"), "t10-w0", base).unwrap();
    let c1 = ledger::Checkout::add(root, &w1.path().join("c"), "t10-w1", base).unwrap();
    set_lr(c0.path(), "0.05");
    let a = ledger.begin_on(0, c0.path(), base, "lr 0.05", "").unwrap();
    set_lr(c1.path(), "0.06");
    let b = ledger.begin_on(1, c1.path(), base, "lr 0.06", "").unwrap();
    ledger.record_run_of(Some(&b.hash), 7, ok(0.9)).unwrap();
    ledger
        .finish_of(Some(&b.hash), ok(0.9), Status::Keep, None)
        .unwrap();
    set_lr(c1.path(), "0.07");
    let b_oid = Oid::from_str(&b.hash).unwrap();
    let c = ledger.begin_on(1, c1.path(), b_oid, "lr 0.07", "").unwrap();
    ledger.record_run_of(Some(&c.hash), 8, ok(0.85)).unwrap();
    ledger
        .finish_of(Some(&c.hash), ok(0.85), Status::Keep, None)
        .unwrap();
    assert_eq!(
        ledger.tip().unwrap().to_string(),
        c.hash,
        "c descends from b"
    );
    ledger.record_run_of(Some(&a.hash), 9, ok(0.8)).unwrap();
    ledger
        .finish_of(Some(&a.hash), ok(0.8), Status::Keep, None)
        .unwrap();
    assert_eq!(ledger.tip().unwrap().to_string(), a.hash);
    let repo = Repository::open(root).unwrap();
    let superseded = repo
        .refname_to_id(&format!("refs/autoresearch/t10/superseded/{}", c.hash))
        .unwrap();
    assert_eq!(superseded, Oid::from_str(&c.hash).unwrap());
    assert!(
        repo.graph_descendant_of(superseded, b_oid).unwrap(),
        "b is reachable through c's ref"
    );
    assert_eq!(branch_commits(&repo, "t10").len(), 2, "baseline and a");
}

/// Two workers, each in a checkout of its own from the same kept state: the one that finishes
/// first is kept; the other, finishing later and better, is kept too, and the branch moves onto
/// it although it does not descend from the first (a tree, the branch on its best leaf), the
/// first kept reachable under `superseded/`. A kill with both in flight leaves the branch where
/// it was, and each goes on by its hash.
#[test]
fn workers_experiments_begin_from_the_kept_state_and_the_branch_follows_the_best_leaf() {
    let dir = repo_with_train_file();
    let root = dir.path();
    let mut ledger = Ledger::start(root, meta("t9")).unwrap();
    ledger.begin("baseline", "").unwrap();
    ledger.finish(ok(1.0), Status::Keep, None).unwrap();
    let base = ledger.tip().unwrap();
    let (w0, w1) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let c0 = ledger::Checkout::add(root, &w0.path().join("c"), "t9-w0", base).unwrap();
    let c1 = ledger::Checkout::add(root, &w1.path().join("c"), "t9-w1", base).unwrap();
    set_lr(c0.path(), "0.05");
    set_lr(c1.path(), "0.06");
    let a = ledger.begin_on(0, c0.path(), base, "lr 0.05", "").unwrap();
    let b = ledger.begin_on(1, c1.path(), base, "lr 0.06", "").unwrap();
    assert_eq!(
        (a.parent.as_str(), b.parent.as_str()),
        (&*base.to_string(), &*base.to_string())
    );
    assert_eq!(ledger.tip().unwrap(), base, "the branch waits for a keep");
    assert_eq!(ledger.session().in_flight().len(), 2);
    let in_flight_ref = |h: &str| format!("refs/autoresearch/t9/in-flight/{h}");
    {
        let repo = Repository::open(root).unwrap();
        assert!(repo.find_reference(&in_flight_ref(&a.hash)).is_ok());
    }

    // Killed with both in flight: resume leaves the branch alone and knows both.
    drop(ledger);
    let mut ledger = Ledger::resume(root, "t9").unwrap();
    assert_eq!(ledger.tip().unwrap(), base);
    let flying: Vec<String> = ledger
        .session()
        .in_flight()
        .iter()
        .map(|r| r.begin.hash.clone())
        .collect();
    assert_eq!(flying, vec![a.hash.clone(), b.hash.clone()]);

    // b ends first (a run and a keep), then a, better than b.
    ledger.record_run_of(Some(&b.hash), 7, ok(0.9)).unwrap();
    ledger
        .finish_of(Some(&b.hash), ok(0.9), Status::Keep, None)
        .unwrap();
    assert_eq!(ledger.tip().unwrap().to_string(), b.hash);
    assert_eq!(
        std::fs::read_to_string(root.join(TRAIN_FILE)).unwrap(),
        "const LR: f64 = 0.06;\n",
        "the user's checkout follows the branch"
    );
    let (decision, j) = ledger::judge_record(
        &KeepSettings::strict(),
        ledger.session(),
        ledger.session().record(&a.hash).unwrap(),
    );
    assert_eq!(decision, Decision::Discard, "no runs yet");
    assert_eq!(j.best, None);
    ledger.record_run_of(Some(&a.hash), 8, ok(0.8)).unwrap();
    let (decision, j) = ledger::judge_record(
        &KeepSettings::strict(),
        ledger.session(),
        ledger.session().record(&a.hash).unwrap(),
    );
    assert_eq!(decision, Decision::Keep);
    assert_eq!(
        j.best,
        Some(0.9),
        "judged against the best now, not its base"
    );
    ledger
        .finish_of(Some(&a.hash), ok(0.8), Status::Keep, None)
        .unwrap();
    assert_eq!(ledger.tip().unwrap().to_string(), a.hash);
    let repo = Repository::open(root).unwrap();
    assert_eq!(
        repo.refname_to_id(&format!("refs/autoresearch/t9/superseded/{}", b.hash))
            .unwrap()
            .to_string(),
        b.hash
    );
    assert_eq!(branch_commits(&repo, "t9").len(), 2, "baseline and a");
    assert!(repo.find_reference(&in_flight_ref(&a.hash)).is_err());
    assert!(repo.find_reference(&in_flight_ref(&b.hash)).is_err());
    // Resume redoes the last end in the journal's order (a), not the last begun (b): the
    // branch stays on the best.
    drop(ledger);
    let ledger = Ledger::resume(root, "t9").unwrap();
    assert_eq!(ledger.tip().unwrap().to_string(), a.hash);
    // The workers' checkouts go with their owners, leaving no worktree.
    drop((c0, c1));
    assert!(repo.worktrees().unwrap().is_empty());
    assert!(
        repo.branches(None).unwrap().count() <= 3,
        "no checkout branch left"
    );
    let session = ledger::Session::load(root, "t9").unwrap();
    assert!(session.in_flight().is_empty());
    assert_eq!(session.best().unwrap().begin.hash, a.hash);
}

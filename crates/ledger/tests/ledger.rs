//! The ledger on a real git repository in a temporary directory.

use std::path::Path;

use git2::{Oid, Repository};
use ledger::{Finish, Ledger, LedgerError, SessionMeta, Status, TRAIN_FILE, results};

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
    ledger.finish(ok(1.0), Status::Keep).unwrap();
    set_lr(root, "0.05");
    let better = ledger.begin("lr 0.05", "higher rate").unwrap();
    ledger.finish(ok(0.9), Status::Keep).unwrap();
    set_lr(root, "0.08");
    let worse = ledger.begin("lr 0.08", "").unwrap();
    ledger.finish(ok(0.95), Status::Discard).unwrap();
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
        ledger.finish(crash, Status::Keep).unwrap().status,
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
    ledger.finish(ok(1.0), Status::Keep).unwrap();
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
    ledger.finish(ok(0.8), Status::Keep).unwrap();
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

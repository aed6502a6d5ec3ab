//! `autoresearch prepare`, end to end through the real binary.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::SystemTime;

use autoresearch_tests::{run, stderr, stdout};

/// Every file under `dir` with its modification time.
fn snapshot(dir: &Path) -> BTreeMap<String, SystemTime> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else {
                let modified = path.metadata().unwrap().modified().unwrap();
                out.insert(path.display().to_string(), modified);
            }
        }
    }
    out
}

#[test]
fn builtin_twice_the_second_run_is_a_no_op() {
    let root = tempfile::tempdir().unwrap();
    let args = [
        "prepare",
        "--source",
        "builtin",
        "--preset",
        "tiny",
        "--builtin-mb",
        "1",
    ];
    let first = run(root.path(), &args);
    assert!(first.status.success(), "{}", stderr(&first));
    assert!(stdout(&first).contains("Prepared"), "{}", stdout(&first));
    let manifest: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root.path().join("cache/manifest.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(manifest["preset"]["name"], "tiny");
    assert_eq!(manifest["eval"]["tokens"], 128 * 256);
    let before = snapshot(&root.path().join("cache"));

    let second = run(root.path(), &args);
    assert!(second.status.success(), "{}", stderr(&second));
    assert!(
        stdout(&second).contains("nothing to do"),
        "{}",
        stdout(&second)
    );
    assert_eq!(
        snapshot(&root.path().join("cache")),
        before,
        "the second run touched files"
    );

    // Other options are other data: a different size prepares again.
    let third = run(
        root.path(),
        &[
            "prepare",
            "--source",
            "builtin",
            "--preset",
            "tiny",
            "--builtin-mb",
            "0.5",
        ],
    );
    assert!(stdout(&third).contains("Prepared"), "{}", stdout(&third));
}

#[test]
fn a_directory_of_text_files() {
    let root = tempfile::tempdir().unwrap();
    let docs = root.path().join("docs");
    std::fs::create_dir(&docs).unwrap();
    let mut jsonl = String::new();
    for (i, story) in (0..400).map(|i| {
        (
            i,
            format!("Story number {i}. The fox jumps over the dog {i} times."),
        )
    }) {
        if i % 2 == 0 {
            jsonl += &serde_json::json!({ "text": story }).to_string();
            jsonl.push('\n');
        } else {
            std::fs::write(docs.join(format!("s{i:03}.txt")), story).unwrap();
        }
    }
    std::fs::write(docs.join("stories.jsonl"), jsonl).unwrap();
    let source = format!("dir:{}", docs.display());
    let out = run(
        root.path(),
        &["prepare", "--source", &source, "--preset", "tiny"],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    // No file is marked for validation: about one document in twenty is held out.
    let val_docs: u64 = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("validation: "))
        .and_then(|l| l.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no validation line in {text}"));
    assert!((5..=50).contains(&val_docs), "{val_docs} held out of 400");
}

#[test]
fn bad_input_gets_a_clear_error_and_leaves_nothing() {
    let root = tempfile::tempdir().unwrap();
    let cases: &[(&[&str], &str)] = &[
        (
            &["prepare", "--source", "s3://x"],
            "use builtin, climbmix or dir:PATH",
        ),
        (
            &["prepare", "--source", "builtin", "--preset", "a100"],
            "use one of h100, tiny",
        ),
        (
            &["prepare", "--source", "dir:/no/such/dir"],
            "is not a directory",
        ),
    ];
    for (args, message) in cases {
        let out = run(root.path(), args);
        assert!(!out.status.success());
        assert!(stderr(&out).contains(message), "{args:?}: {}", stderr(&out));
    }
    let empty = root.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    std::fs::write(empty.join("notes.md"), "not a source format").unwrap();
    let out = run(
        root.path(),
        &["prepare", "--source", &format!("dir:{}", empty.display())],
    );
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("has no usable documents"),
        "{}",
        stderr(&out)
    );
    assert!(!root.path().join("cache/manifest.json").exists());
}

#[test]
fn train_without_prepared_data_says_to_prepare() {
    let root = tempfile::tempdir().unwrap();
    // Run from inside this checkout, with an empty cache.
    let repo = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let out = std::process::Command::new(autoresearch_tests::autoresearch_bin())
        .args(["train", "--device", "cpu", "--cache"])
        .arg(root.path().join("empty-cache"))
        .current_dir(repo)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("run `autoresearch prepare` first"),
        "{}",
        stderr(&out)
    );
}

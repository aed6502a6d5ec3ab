//! Downloads against a real HTTP server on loopback that serves parquet files this test writes,
//! and fails on purpose in the ways networks do.
#![cfg(feature = "build")]

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prepare::download::{DownloadOptions, download_shards, shard_name};
use prepare::sources::{for_each_document, write_text_parquet};

/// What the server does with the next requests for a path.
#[derive(Clone)]
enum Reply {
    Ok,
    Status(u16),
    /// Announces the whole length, sends half, closes.
    Truncated,
}

struct Server {
    url: String,
    hits: Arc<Mutex<HashMap<String, usize>>>,
}

/// Serves `files`; `script[path]` lists the replies to the first requests, then `Ok`.
fn serve(files: HashMap<String, Vec<u8>>, script: HashMap<String, Vec<Reply>>) -> Server {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let hits = Arc::new(Mutex::new(HashMap::<String, usize>::new()));
    let counter = hits.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let mut stream = stream.unwrap();
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut request = String::new();
            reader.read_line(&mut request).unwrap();
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap() == 0 || line == "\r\n" {
                    break;
                }
            }
            let path = request
                .split(' ')
                .nth(1)
                .unwrap_or("/")
                .trim_start_matches('/')
                .to_string();
            let n = {
                let mut hits = counter.lock().unwrap();
                let n = hits.entry(path.clone()).or_insert(0);
                *n += 1;
                *n
            };
            let reply = script
                .get(&path)
                .and_then(|s| s.get(n - 1))
                .cloned()
                .unwrap_or(Reply::Ok);
            let body = files.get(&path);
            let _ = match (reply, body) {
                (Reply::Ok, Some(body)) => {
                    let head = format!(
                        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                        body.len()
                    );
                    stream
                        .write_all(head.as_bytes())
                        .and_then(|_| stream.write_all(body))
                }
                (Reply::Truncated, Some(body)) => {
                    let head = format!(
                        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                        body.len()
                    );
                    stream
                        .write_all(head.as_bytes())
                        .and_then(|_| stream.write_all(&body[..body.len() / 2]))
                }
                (Reply::Status(code), _) => stream.write_all(
                    format!(
                        "HTTP/1.1 {code} Oops\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                    )
                    .as_bytes(),
                ),
                (_, None) => stream.write_all(
                    b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                ),
            };
        }
    });
    Server { url, hits }
}

fn parquet_bytes(texts: &[&str]) -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("x.parquet");
    write_text_parquet(&path, texts).unwrap();
    std::fs::read(path).unwrap()
}

fn opts(url: &str) -> DownloadOptions {
    DownloadOptions {
        base_url: url.to_string(),
        workers: 3,
        max_attempts: 4,
        backoff: Duration::from_millis(10),
        timeout: Duration::from_secs(10),
    }
}

fn files_in(dir: &std::path::Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|d| {
            d.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

#[test]
fn downloads_in_parallel_and_is_idempotent() {
    let files: HashMap<_, _> = (0..5)
        .map(|i| (shard_name(i), parquet_bytes(&[&format!("doc {i}"), "more"])))
        .collect();
    let server = serve(files.clone(), HashMap::new());
    let dir = tempfile::tempdir().unwrap();
    let done = Mutex::new(0);
    let paths = download_shards(dir.path(), &[0, 1, 2, 3, 4], &opts(&server.url), &|_| {
        *done.lock().unwrap() += 1
    })
    .unwrap();
    assert_eq!(*done.lock().unwrap(), 5);
    for (i, path) in paths.iter().enumerate() {
        assert_eq!(std::fs::read(path).unwrap(), files[&shard_name(i)]);
    }
    let mut docs = Vec::new();
    for_each_document(&paths[3], |d| {
        docs.push(d);
        Ok(())
    })
    .unwrap();
    assert_eq!(docs, ["doc 3", "more"]);
    // A second run finds every shard in place and asks the server for nothing.
    download_shards(dir.path(), &[0, 1, 2, 3, 4], &opts(&server.url), &|_| {}).unwrap();
    assert_eq!(server.hits.lock().unwrap().values().sum::<usize>(), 5);
}

#[test]
fn retries_two_failures_then_succeeds() {
    let name = shard_name(7);
    let body = parquet_bytes(&["retried"]);
    let script = HashMap::from([(name.clone(), vec![Reply::Status(503), Reply::Truncated])]);
    let server = serve(HashMap::from([(name.clone(), body.clone())]), script);
    let dir = tempfile::tempdir().unwrap();
    download_shards(dir.path(), &[7], &opts(&server.url), &|_| {}).unwrap();
    assert_eq!(server.hits.lock().unwrap()[&name], 3);
    assert_eq!(std::fs::read(dir.path().join(&name)).unwrap(), body);
    assert_eq!(files_in(dir.path()), [name]);
}

#[test]
fn a_truncated_body_leaves_no_file() {
    let name = shard_name(1);
    let script = HashMap::from([(name.clone(), vec![Reply::Truncated; 10])]);
    let server = serve(
        HashMap::from([(name.clone(), parquet_bytes(&["cut"]))]),
        script,
    );
    let dir = tempfile::tempdir().unwrap();
    let err = download_shards(dir.path(), &[1], &opts(&server.url), &|_| {}).unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains(&format!("{}/{name}", server.url)) && msg.contains("4 attempt"),
        "{msg}"
    );
    assert!(
        files_in(dir.path()).is_empty(),
        "left behind: {:?}",
        files_in(dir.path())
    );
}

#[test]
fn missing_files_fail_at_once_and_unreachable_hosts_say_where() {
    let server = serve(HashMap::new(), HashMap::new());
    let dir = tempfile::tempdir().unwrap();
    let err = download_shards(dir.path(), &[6542], &opts(&server.url), &|_| {}).unwrap_err();
    assert!(err.to_string().contains("404"), "{err}");
    assert_eq!(
        server.hits.lock().unwrap()[&shard_name(6542)],
        1,
        "a 404 is not retried"
    );

    // Nothing listens on a port just released.
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("http://127.0.0.1:{port}");
    let err = download_shards(dir.path(), &[0], &opts(&url), &|_| {})
        .unwrap_err()
        .to_string();
    assert!(err.contains(&format!("{url}/shard_00000.parquet")), "{err}");
    assert!(
        err.contains("after 4 attempt(s)") && err.contains("--base-url"),
        "{err}"
    );
    assert!(files_in(dir.path()).is_empty());
}

#[test]
fn prepare_from_a_climbmix_mirror_and_without_its_validation_shard() {
    use prepare::pipeline::{Outcome, PrepareOptions, prepare};
    use prepare::{Preset, Split, sources::Source};
    fn as_refs(v: &[String]) -> Vec<&str> {
        v.iter().map(String::as_str).collect()
    }
    let story = |seed: u64, n: usize| -> Vec<String> {
        prepare::builtin::documents(seed, if seed == 1 { Split::Train } else { Split::Val }, n)
    };
    let train = story(1, 300_000);
    let val = story(2, 100_000);
    let mut files = HashMap::from([
        (
            shard_name(0),
            parquet_bytes(&as_refs(&train[..train.len() / 2])),
        ),
        (
            shard_name(1),
            parquet_bytes(&as_refs(&train[train.len() / 2..])),
        ),
    ]);
    let cache = tempfile::tempdir().unwrap();
    let mut options =
        PrepareOptions::new(cache.path().to_path_buf(), Source::Climbmix, Preset::tiny());
    options.num_shards = 2;
    options.download = opts("");

    // No validation shard on the mirror: a clear error, and nothing counts as prepared.
    let server = serve(files.clone(), HashMap::new());
    options.download.base_url = server.url.clone();
    let err = prepare(&options).err().unwrap().to_string();
    assert!(
        err.contains("validation shard shard_06542.parquet is required"),
        "{err}"
    );
    assert!(!cache.path().join("manifest.json").exists());

    files.insert(shard_name(6542), parquet_bytes(&as_refs(&val)));
    let server = serve(files, HashMap::new());
    options.download.base_url = server.url.clone();
    let Outcome::Prepared(data, _) = prepare(&options).unwrap() else {
        panic!("expected a fresh preparation");
    };
    assert_eq!(data.manifest.train.len(), 2);
    assert_eq!(data.manifest.val.len(), 1);
    assert_eq!(
        data.manifest.eval.tokens as usize,
        Preset::tiny().eval_rows() * 256
    );
    // Shards the failed run already landed are not fetched again.
    let hits = server.hits.lock().unwrap().clone();
    assert!(
        hits.contains_key(&shard_name(6542)) && hits.values().all(|&n| n == 1),
        "{hits:?}"
    );
    assert!(matches!(prepare(&options).unwrap(), Outcome::UpToDate(_)));
}

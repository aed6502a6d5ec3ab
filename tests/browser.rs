//! Headless Chromium driven through the DevTools protocol over a pipe
//! (`--remote-debugging-pipe`: JSON messages, each ended by a NUL, the browser reading fd 3 and
//! writing fd 4), so the tests need no WebSocket client and no driver binary.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError, channel};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

/// The browser to drive: `$AUTORESEARCH_CHROMIUM`, else Debian's `/usr/bin/chromium` when it is
/// there. `None` means skip, unless `AUTORESEARCH_BROWSER_REQUIRED` is set (CI), where a missing
/// browser is a failure.
pub fn chromium() -> Option<PathBuf> {
    let found = std::env::var_os("AUTORESEARCH_CHROMIUM")
        .map(PathBuf::from)
        .or_else(|| Some(PathBuf::from("/usr/bin/chromium")).filter(|p| p.exists()));
    if found.is_none() {
        assert!(
            std::env::var_os("AUTORESEARCH_BROWSER_REQUIRED").is_none(),
            "AUTORESEARCH_BROWSER_REQUIRED is set but no Chromium: `apt-get install chromium`, or set AUTORESEARCH_CHROMIUM"
        );
        eprintln!(
            "skipped: no Chromium (`apt-get install chromium`, or AUTORESEARCH_CHROMIUM=PATH)"
        );
    }
    found
}

pub struct Browser {
    child: Child,
    to_browser: std::fs::File,
    from_browser: Receiver<Value>,
    next_id: u64,
    /// Events that arrived while waiting for a reply, oldest first.
    pub events: VecDeque<Value>,
    _profile: tempfile::TempDir,
}

/// A page (target) of the browser, attached with a flat session.
pub struct Page {
    session: String,
}

fn pipe() -> (OwnedFd, OwnedFd) {
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills two new descriptors, which we own from here on.
    let rc = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) };
    assert_eq!(rc, 0, "pipe2: {}", std::io::Error::last_os_error());
    // SAFETY: both descriptors were just created and are owned by nobody else.
    unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
}

impl Browser {
    pub fn launch(chromium: &Path) -> Browser {
        let profile = tempfile::tempdir().unwrap();
        let (cmd_read, cmd_write) = pipe();
        let (out_read, out_write) = pipe();
        let (r, w) = (cmd_read.as_raw_fd(), out_write.as_raw_fd());
        let mut cmd = Command::new(chromium);
        // The flags keep a headless browser off the network it would otherwise reach for at
        // start (updates, sync, field trials), and work as root (no setuid sandbox).
        cmd.args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--no-default-browser-check",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-extensions",
            "--remote-debugging-pipe",
            "--window-size=1400,1000",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg("about:blank")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(profile.path().join("chromium.log")).unwrap());
        // SAFETY: only dup2 between fork and exec (async-signal-safe); dup2 clears CLOEXEC on
        // the copies, so the browser inherits exactly fds 3 and 4.
        unsafe {
            cmd.pre_exec(move || {
                // Up out of the way first: one of them may be fd 3 or 4 already.
                let (hr, hw) = (
                    libc::fcntl(r, libc::F_DUPFD, 10),
                    libc::fcntl(w, libc::F_DUPFD, 10),
                );
                if hr < 0 || hw < 0 || libc::dup2(hr, 3) < 0 || libc::dup2(hw, 4) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().expect("Chromium starts");
        drop((cmd_read, out_write));
        let (tx, rx) = channel();
        std::thread::spawn(move || {
            let mut reader = BufReader::new(std::fs::File::from(out_read));
            loop {
                let mut buf = Vec::new();
                match reader.read_until(0, &mut buf) {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {
                        buf.pop_if(|b| *b == 0);
                        if let Ok(v) = serde_json::from_slice(&buf)
                            && tx.send(v).is_err()
                        {
                            return;
                        }
                    }
                }
            }
        });
        Browser {
            child,
            to_browser: std::fs::File::from(cmd_write),
            from_browser: rx,
            next_id: 0,
            events: VecDeque::new(),
            _profile: profile,
        }
    }

    /// Sends a command (to the browser, or to a page's session) and waits for its reply.
    pub fn call(&mut self, session: Option<&Page>, method: &str, params: Value) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        let mut msg = json!({ "id": id, "method": method, "params": params });
        if let Some(p) = session {
            msg["sessionId"] = json!(p.session);
        }
        let mut bytes = serde_json::to_vec(&msg).unwrap();
        bytes.push(0);
        self.to_browser
            .write_all(&bytes)
            .unwrap_or_else(|e| panic!("writing {method} to Chromium: {e}"));
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let v = self.recv(deadline, method);
            if v["id"] == json!(id) {
                assert!(v.get("error").is_none(), "{method}: {}", v["error"]);
                return v["result"].clone();
            }
            self.events.push_back(v);
        }
    }

    fn recv(&mut self, deadline: Instant, waiting_for: &str) -> Value {
        let left = deadline.saturating_duration_since(Instant::now());
        match self.from_browser.recv_timeout(left) {
            Ok(v) => v,
            Err(RecvTimeoutError::Timeout) => {
                panic!("Chromium did not answer {waiting_for} in time")
            }
            Err(RecvTimeoutError::Disconnected) => {
                panic!("Chromium exited while waiting for {waiting_for}")
            }
        }
    }

    /// Waits for an event named `method` (for any session), returning it.
    pub fn wait_event(&mut self, method: &str, timeout: Duration) -> Value {
        if let Some(at) = self.events.iter().position(|e| e["method"] == method) {
            return self.events.remove(at).unwrap();
        }
        let deadline = Instant::now() + timeout;
        loop {
            let v = self.recv(deadline, method);
            if v["method"] == method {
                return v;
            }
            self.events.push_back(v);
        }
    }

    /// A new page with the domains the checks listen to turned on: console, log, network.
    pub fn new_page(&mut self) -> Page {
        let target = self.call(None, "Target.createTarget", json!({ "url": "about:blank" }));
        let attached = self.call(
            None,
            "Target.attachToTarget",
            json!({ "targetId": target["targetId"], "flatten": true }),
        );
        let page = Page {
            session: attached["sessionId"].as_str().unwrap().to_string(),
        };
        for domain in [
            "Page.enable",
            "Runtime.enable",
            "Log.enable",
            "Network.enable",
        ] {
            self.call(Some(&page), domain, json!({}));
        }
        self.call(
            Some(&page),
            "Emulation.setDeviceMetricsOverride",
            json!({ "width": 1400, "height": 1000, "deviceScaleFactor": 1, "mobile": false }),
        );
        page
    }

    /// Loads `url` and waits for its load event.
    pub fn open(&mut self, page: &Page, url: &str) {
        self.events.clear();
        self.call(Some(page), "Page.navigate", json!({ "url": url }));
        self.wait_event("Page.loadEventFired", Duration::from_secs(60));
    }

    /// Evaluates a JavaScript expression in the page and returns its value.
    pub fn eval(&mut self, page: &Page, expression: &str) -> Value {
        let r = self.call(
            Some(page),
            "Runtime.evaluate",
            json!({ "expression": expression, "returnByValue": true, "awaitPromise": true }),
        );
        assert!(
            r.get("exceptionDetails").is_none(),
            "{expression}: {}",
            r["exceptionDetails"]
        );
        r["result"]["value"].clone()
    }

    /// A PNG of the page's viewport.
    pub fn screenshot(&mut self, page: &Page) -> Vec<u8> {
        use base64::Engine;
        let r = self.call(
            Some(page),
            "Page.captureScreenshot",
            json!({ "format": "png" }),
        );
        base64::engine::general_purpose::STANDARD
            .decode(r["data"].as_str().unwrap())
            .unwrap()
    }

    /// Console errors, uncaught exceptions and errors the browser logged (a refused script or
    /// request among them) since the last `open`.
    pub fn errors(&mut self) -> Vec<String> {
        self.drain()
            .events
            .iter()
            .filter_map(|e| match e["method"].as_str()? {
                "Runtime.exceptionThrown" => Some(e["params"]["exceptionDetails"].to_string()),
                "Runtime.consoleAPICalled" if e["params"]["type"] == "error" => {
                    Some(e["params"]["args"].to_string())
                }
                "Log.entryAdded" if e["params"]["entry"]["level"] == "error" => {
                    Some(e["params"]["entry"]["text"].to_string())
                }
                _ => None,
            })
            .collect()
    }

    /// Every URL the page asked for since the last `open`.
    pub fn requests(&mut self) -> Vec<String> {
        self.drain()
            .events
            .iter()
            .filter(|e| e["method"] == "Network.requestWillBeSent")
            .filter_map(|e| e["params"]["request"]["url"].as_str().map(str::to_string))
            .collect()
    }
}

impl Browser {
    /// Moves what has arrived so far into `events`.
    fn drain(&mut self) -> &mut Self {
        while let Ok(v) = self.from_browser.try_recv() {
            self.events.push_back(v);
        }
        self
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

//! The OpenAI-compatible server, end to end: starts the real `bitnest serve` on 127.0.0.1 (a
//! free port) and drives it with the official `openai` Python package
//! (`tests/server/test_openai.py`: chat and completions, streaming and not, logprobs, stop
//! strings, tokenize, malformed requests, client disconnects, a bounded load test and
//! overload), then checks that SIGTERM shuts it down cleanly.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_bitnest");
const CTX: usize = 512;
const PARALLEL: usize = 4;
const QUEUE: usize = 16;
const MAX_BODY: usize = 65536;

/// Kills the server if the test fails before shutting it down.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn require_openai() {
    let out = Command::new("python3").args(["-c", "import openai; print(openai.__version__)"]).output();
    match out {
        Ok(o) if o.status.success() => {}
        Ok(o) => panic!(
            "the server tests need the `openai` Python package and it is not importable ({}); \
             install it with: python3 -m pip install 'openai>=1.40' (.ci/run does this)",
            String::from_utf8_lossy(&o.stderr).trim()
        ),
        Err(e) => panic!("the server tests need python3 with the `openai` package: cannot run python3: {e}"),
    }
}

#[test]
fn openai_client_against_the_real_server() {
    require_openai();
    let model = common::model_path();
    let mut child = Command::new(BIN)
        .args(["serve", "--model"])
        .arg(&model)
        .args(["--host", "127.0.0.1", "--port", "0", "--ctx", &CTX.to_string()])
        .args(["--parallel", &PARALLEL.to_string(), "--queue", &QUEUE.to_string()])
        .args(["--max-body", &MAX_BODY.to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start bitnest serve");
    let stdout = child.stdout.take().expect("server stdout");
    let server = Server(child);

    // The server prints its address once the model is loaded and the socket is bound.
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some(rest) = line.split("listening on ").nth(1) {
                let _ = tx.send(rest.split_whitespace().next().unwrap_or("").to_string());
            }
        }
    });
    let base = rx.recv_timeout(Duration::from_secs(180)).expect("server did not start listening within 180 s");
    assert!(base.starts_with("http://127.0.0.1:"), "unexpected address {base}");

    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/server/test_openai.py");
    let t0 = Instant::now();
    let out = Command::new("python3")
        .arg(script)
        .args(["--base-url", &base, "--pid", &server.0.id().to_string(), "--ctx", &CTX.to_string()])
        .args(["--parallel", &PARALLEL.to_string(), "--queue", &QUEUE.to_string()])
        .args(["--max-body", &MAX_BODY.to_string()])
        .output()
        .expect("run python3");
    println!("{}", String::from_utf8_lossy(&out.stdout));
    eprintln!("{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "the openai-client checks failed ({:?}) after {:?}", out.status, t0.elapsed());

    // SIGTERM: graceful shutdown, exit status 0.
    let mut server = server;
    let pid = server.0.id().to_string();
    let killed = Command::new("kill").args(["-TERM", &pid]).status().expect("run kill");
    assert!(killed.success());
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = server.0.try_wait().expect("wait for server") {
            assert!(status.success(), "server exited with {status} after SIGTERM");
            break;
        }
        assert!(Instant::now() < deadline, "server still running 30 s after SIGTERM");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn unavailable_speculative_mode_is_a_clear_error() {
    let out = Command::new(BIN).args(["serve", "--spec", "recycle", "--port", "0"]).output().expect("run bitnest");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("the server does not speculate yet"), "{err}");
}

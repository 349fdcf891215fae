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

/// Starts `bitnest serve` on the default model with `args`; returns it and its base URL.
fn start(args: &[&str]) -> (Server, String) {
    start_with_env(args, &[])
}

fn start_with_env(args: &[&str], env: &[(&str, &str)]) -> (Server, String) {
    let model = common::model_path();
    let mut child = Command::new(BIN)
        .args(["serve", "--model"])
        .arg(&model)
        .args(["--host", "127.0.0.1", "--port", "0"])
        .args(args)
        .envs(env.iter().copied())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start bitnest serve");
    let stdout = child.stdout.take().expect("server stdout");
    // The server prints its address once the model is loaded and the socket is bound.
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some(rest) = line.split("listening on ").nth(1) {
                let _ = tx.send(rest.split_whitespace().next().unwrap_or("").to_string());
            }
        }
    });
    let server = Server(child);
    let base = rx.recv_timeout(Duration::from_secs(180)).expect("server did not start listening within 180 s");
    assert!(base.starts_with("http://127.0.0.1:"), "unexpected address {base}");
    (server, base)
}

#[test]
fn openai_client_against_the_real_server() {
    require_openai();
    let (ctx, parallel, queue, max_body) =
        (CTX.to_string(), PARALLEL.to_string(), QUEUE.to_string(), MAX_BODY.to_string());
    let (server, base) = start(&["--ctx", &ctx, "--parallel", &parallel, "--queue", &queue, "--max-body", &max_body]);

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

/// A speculating server answers exactly as a plain one: greedy and seeded answers, their
/// log-probabilities, stop strings and token limits, and concurrent requests
/// (`tests/server/spec_identity.py`, standard-library Python only).
#[test]
fn speculating_server_answers_as_the_plain_one() {
    const MODE: &str = "recycle+lookup";
    let (_plain, plain) = start(&["--ctx", "1024", "--parallel", "1"]);
    let (_spec, spec) = start(&["--ctx", "1024", "--parallel", "3", "--spec", MODE]);
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/server/spec_identity.py");
    let prompts = common::shared("data/specbench-dev.jsonl");
    let out = Command::new("python3")
        .arg(script)
        .args(["--plain", &plain, "--spec", &spec, "--mode", MODE, "--prompts"])
        .arg(&prompts)
        .output()
        .expect("run python3");
    println!("{}", String::from_utf8_lossy(&out.stdout));
    eprintln!("{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "the speculating server's answers differ from the plain server's ({:?})", out.status);
}

/// Continuous batching changes nothing a client sees: 16 clients at once against 8 slots get
/// exactly the answers (text, finish, counts, log-probabilities) each request gets alone
/// (`tests/server/batch_identity.py`, standard-library Python only).
#[test]
fn batched_answers_equal_answers_alone() {
    let (_alone, alone) = start(&["--ctx", "1024", "--parallel", "1"]);
    let (_batched, batched) = start(&["--ctx", "1024", "--parallel", "8", "--prefill-chunk", "64"]);
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/server/batch_identity.py");
    let prompts = common::shared("data/specbench-dev.jsonl");
    let out = Command::new("python3")
        .arg(script)
        .args(["--alone", &alone, "--batched", &batched, "--clients", "16", "--prompts"])
        .arg(&prompts)
        .output()
        .expect("run python3");
    println!("{}", String::from_utf8_lossy(&out.stdout));
    eprintln!("{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "answers under load differ from answers alone ({:?})", out.status);
}

/// `--api-key` (here from `BITNEST_API_KEY`): 401 in OpenAI's shape without the key or with a
/// wrong one on every route but /health and /v1/models; the official client works with it
/// (`tests/server/api_key.py`).
#[test]
fn the_api_key_guards_every_route_but_health_and_models() {
    require_openai();
    const KEY: &str = "sk-bitnest-test-0123456789";
    let (_server, base) = start_with_env(&["--ctx", "256", "--parallel", "1"], &[("BITNEST_API_KEY", KEY)]);
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/server/api_key.py");
    let out =
        Command::new("python3").arg(script).args(["--base-url", &base, "--key", KEY]).output().expect("run python3");
    println!("{}", String::from_utf8_lossy(&out.stdout));
    eprintln!("{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "the API key checks failed ({:?})", out.status);
}

#[test]
fn impossible_speculative_modes_are_clear_errors() {
    let model = common::model_path();
    let run = |spec: &str| {
        let out = Command::new(BIN)
            .args(["serve", "--port", "0", "--f32", "--model"])
            .arg(&model)
            .args(["--spec", spec])
            .output()
            .expect("run bitnest");
        assert!(!out.status.success(), "--spec {spec} was accepted");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    // The default model's GGUF through the f32 path (`--f32`): no bit planes to draft from.
    let err = run("self");
    assert!(err.contains("no bit planes"), "{err}");
    let err = run("telepathy");
    assert!(err.contains("telepathy"), "{err}");
}

/// What a load balancer sees (`tests/server/lifecycle.py`): `/health` 503 `loading` while the
/// model loads (held here for 3 s), 200 once ready, 503 `draining` after SIGTERM while the
/// running request finishes; new generation requests get 503 with `Retry-After` in both
/// not-ready phases; then the process exits 0. With `--grace 1` the running request is cut
/// short instead, and the exit is still 0.
#[test]
fn health_and_drain_follow_the_servers_life() {
    // A grace far past what 160 tokens need even on a loaded CI machine (where the other server
    // tests share the two cores and a token can take 200 ms): the finish case must not race it.
    for (grace, long_tokens, expect_cancel) in [("600", "160", false), ("1", "1500", true)] {
        let model = common::model_path();
        let mut child = Command::new(BIN)
            .args(["serve", "--model"])
            .arg(&model)
            .args(["--host", "127.0.0.1", "--port", "0", "--ctx", "2048", "--parallel", "2", "--grace", grace])
            .env("BITNEST_SERVE_LOAD_DELAY_MS", "3000")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start bitnest serve");
        let stderr = child.stderr.take().expect("server stderr");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("{line}");
                if let Some(rest) = line.split("bound to ").nth(1) {
                    let _ = tx.send(rest.split(';').next().unwrap_or("").to_string());
                }
            }
        });
        let mut server = Server(child);
        let base = rx.recv_timeout(Duration::from_secs(60)).expect("server did not bind within 60 s");
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/server/lifecycle.py");
        let mut cmd = Command::new("python3");
        cmd.arg(script).args(["--base-url", &base, "--pid", &server.0.id().to_string(), "--long-tokens", long_tokens]);
        if expect_cancel {
            cmd.arg("--expect-cancel");
        }
        let out = cmd.output().expect("run python3");
        println!("{}", String::from_utf8_lossy(&out.stdout));
        eprintln!("{}", String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success(), "the lifecycle checks failed (--grace {grace}): {:?}", out.status);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = server.0.try_wait().expect("wait for server") {
                assert!(status.success(), "server exited with {status} after draining (--grace {grace})");
                break;
            }
            assert!(Instant::now() < deadline, "server still running 30 s after SIGTERM (--grace {grace})");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

//! `bitnest serve`: an OpenAI-compatible HTTP server.
//!
//! This lives in the binary, not the library: the engine core stays synchronous and free of
//! tokio and axum, and the server is one client of it among others (CLI, chat, benchmarks).
//! [`worker`] runs the model on one rayon pool thread and interleaves requests; [`routes`]
//! turns HTTP requests into jobs and worker events into JSON or server-sent events; [`api`]
//! parses and validates request bodies; [`stop`] cuts stop strings out of streamed text;
//! [`readiness`] answers for the server while the model loads and while it drains;
//! [`affinity`] names a conversation's prefix for routers in front of several replicas.

pub mod affinity;
pub mod api;
pub mod auth;
pub mod error;
pub mod metrics;
pub mod readiness;
pub mod routes;
pub mod stop;
pub mod worker;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use bitnest::engine::Engine;

use metrics::Metrics;
use readiness::Gate;
use worker::WorkerConfig;

pub struct ServeOptions {
    pub host: String,
    pub port: u16,
    pub model_id: String,
    pub threads: Option<usize>,
    pub parallel: usize,
    pub queue: usize,
    pub max_body: usize,
    pub prefill_chunk: usize,
    pub spec: bitnest::spec::SpecOptions,
    /// How long in-flight requests get to finish after SIGINT/SIGTERM.
    pub grace: Duration,
    /// The key clients must send as `Authorization: Bearer KEY` ([`auth`]).
    pub api_key: Option<auth::ApiKey>,
}

/// What [`serve`]'s loader gives back: the engine and the context each slot holds.
pub struct Loaded {
    pub engine: Engine,
    pub ctx: usize,
}

/// Binds the socket, loads the model with `load` (answering `/health` with 503 meanwhile),
/// then serves until SIGINT/SIGTERM and drains ([`readiness`]). Call it outside any rayon pool:
/// it builds its own pool for the worker and its own tokio runtime for the HTTP side.
pub fn serve(opts: ServeOptions, load: impl FnOnce() -> Result<Loaded>) -> Result<()> {
    let metrics = Arc::new(Metrics::default());
    metrics.slots.store(opts.parallel.max(1) as u64, Ordering::Relaxed);
    let gate = Gate::new(metrics.clone());
    // The HTTP side only parses, tokenizes and copies bytes: two threads are plenty and leave
    // the cores to the model.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("bitnest-http")
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let listener = rt
        .block_on(tokio::net::TcpListener::bind((opts.host.as_str(), opts.port)))
        .with_context(|| format!("cannot listen on {}:{}", opts.host, opts.port))?;
    let addr = listener.local_addr()?;
    eprintln!("bitnest serve: bound to http://{addr}; loading the model (/health answers 503 until it is ready)");
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let mut server = rt.spawn(
        axum::serve(listener, readiness::router(gate.clone()))
            .with_graceful_shutdown(async move {
                let _ = stop_rx.await;
            })
            .into_future(),
    );

    // Load on this thread while the runtime answers health checks.
    let Loaded { engine, ctx } = match load() {
        Ok(l) => l,
        Err(e) => {
            server.abort();
            return Err(e);
        }
    };
    let engine = Arc::new(engine);
    let abort = Arc::new(AtomicBool::new(false));
    let (submit, rx) = worker::queue(opts.queue, metrics.clone());
    let cfg = WorkerConfig { parallel: opts.parallel.max(1), ctx, prefill_chunk: opts.prefill_chunk, spec: opts.spec };
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(opts.threads.unwrap_or(0))
        .thread_name(|i| format!("bitnest-compute-{i}"))
        .build()
        .context("cannot set up the thread pool")?;
    let worker = {
        let (engine, metrics, abort) = (engine.clone(), metrics.clone(), abort.clone());
        std::thread::Builder::new()
            .name("bitnest-worker".into())
            .spawn(move || pool.install(|| worker::run(&engine, rx, cfg, &metrics, &abort)))
            .context("cannot start the inference worker")?
    };
    let state = Arc::new(routes::AppState {
        engine,
        submit,
        metrics,
        model_id: opts.model_id.clone(),
        ctx,
        parallel: cfg.parallel,
        spec: opts.spec.mode.to_string(),
        started: std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs()),
    });
    gate.open(routes::router(state, opts.max_body, opts.api_key.clone()));
    // Tests and scripts wait for this line (and read the port from it with --port 0): from
    // here on requests are served.
    println!(
        "bitnest serve: listening on http://{addr} (model {}, ctx {ctx}, parallel {}, queue {}{})",
        opts.model_id,
        cfg.parallel,
        opts.queue,
        if opts.api_key.is_some() { ", API key required" } else { "" }
    );
    if opts.api_key.is_none() && !addr.ip().is_loopback() {
        eprintln!(
            "bitnest serve: warning: listening on {} without --api-key: anyone who can reach this port \
             can use the model",
            addr.ip()
        );
    }
    use std::io::Write;
    let _ = std::io::stdout().flush();

    let result = rt.block_on(async {
        tokio::select! {
            _ = shutdown_signal() => {}
            r = &mut server => {
                // The server ended by itself: an accept error it could not survive.
                return match r {
                    Ok(r) => r.context("server error"),
                    Err(e) => Err(anyhow::anyhow!("server task failed: {e}")),
                };
            }
        }
        gate.drain();
        eprintln!(
            "bitnest serve: draining: new requests get 503, accepted ones finish (at most {} s; Ctrl-C again to stop now)",
            opts.grace.as_secs()
        );
        let deadline = Instant::now() + opts.grace;
        let finished = tokio::select! {
            idle = gate.wait_idle(deadline) => idle,
            _ = shutdown_signal() => false,
        };
        if !finished {
            eprintln!("bitnest serve: cancelling the requests still running");
            abort.store(true, Ordering::Relaxed);
            // Cancelled requests end at their next step.
            gate.wait_idle(Instant::now() + Duration::from_secs(10)).await;
        }
        // Close the listener and the idle connections; answers being sent complete.
        let _ = stop_tx.send(());
        match tokio::time::timeout(Duration::from_secs(10), &mut server).await {
            Ok(Ok(r)) => r.context("server error"),
            Ok(Err(e)) => Err(anyhow::anyhow!("server task failed: {e}")),
            Err(_) => Ok(()), // a client that never reads its answer does not hold the exit
        }
    });
    // Dropping the runtime drops the router's state and with it the job queue's sender: the
    // worker ends once its last request is done (or at once if aborted).
    drop(rt);
    abort.store(true, Ordering::Relaxed);
    let _ = worker.join();
    eprintln!("bitnest serve: stopped");
    result
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
}

//! `bitnest serve`: an OpenAI-compatible HTTP server.
//!
//! This lives in the binary, not the library: the engine core stays synchronous and free of
//! tokio and axum, and the server is one client of it among others (CLI, chat, benchmarks).
//! [`worker`] runs the model on one rayon pool thread and interleaves requests; [`routes`]
//! turns HTTP requests into jobs and worker events into JSON or server-sent events; [`api`]
//! parses and validates request bodies; [`stop`] cuts stop strings out of streamed text.

pub mod api;
pub mod auth;
pub mod error;
pub mod metrics;
pub mod routes;
pub mod stop;
pub mod worker;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, Result};

use bitnest::engine::Engine;

use metrics::Metrics;
use worker::WorkerConfig;

pub struct ServeOptions {
    pub host: String,
    pub port: u16,
    pub model_id: String,
    pub threads: Option<usize>,
    pub ctx: usize,
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

/// Serves until SIGINT/SIGTERM. Call it outside any rayon pool: it builds its own pool for the
/// worker and its own tokio runtime for the HTTP side.
pub fn serve(engine: Engine, opts: ServeOptions) -> Result<()> {
    let engine = Arc::new(engine);
    let metrics = Arc::new(Metrics::default());
    let abort = Arc::new(AtomicBool::new(false));
    let (submit, rx) = worker::queue(opts.queue, metrics.clone());
    let cfg = WorkerConfig {
        parallel: opts.parallel.max(1),
        ctx: opts.ctx,
        prefill_chunk: opts.prefill_chunk,
        spec: opts.spec,
    };
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
        ctx: opts.ctx,
        spec: opts.spec.mode.to_string(),
        started: std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs()),
    });
    // The HTTP side only parses, tokenizes and copies bytes: two threads are plenty and leave
    // the cores to the model.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("bitnest-http")
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let result = rt.block_on(async {
        let listener = tokio::net::TcpListener::bind((opts.host.as_str(), opts.port))
            .await
            .with_context(|| format!("cannot listen on {}:{}", opts.host, opts.port))?;
        let addr = listener.local_addr()?;
        // Tests and scripts wait for this line (and read the port from it with --port 0).
        println!(
            "bitnest serve: listening on http://{addr} (model {}, ctx {}, parallel {}, queue {}{})",
            opts.model_id,
            opts.ctx,
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
        let app = routes::router(state, opts.max_body, opts.api_key.clone());
        let abort2 = abort.clone();
        let grace = opts.grace;
        axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                shutdown_signal().await;
                eprintln!("bitnest serve: shutting down; finishing requests in flight (Ctrl-C again to stop now)");
                // In-flight requests get `grace` to finish; a second signal or the deadline
                // cancels them so the process always ends.
                tokio::spawn(async move {
                    tokio::select! {
                        _ = shutdown_signal() => {}
                        _ = tokio::time::sleep(grace) => {}
                    }
                    abort2.store(true, Ordering::Relaxed);
                });
            })
            .await
            .context("server error")
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

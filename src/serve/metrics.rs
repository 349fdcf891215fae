//! Server counters, rendered in the Prometheus text format at `GET /metrics`.
//!
//! Plain atomics: the HTTP side and the inference worker update them without locks, and a
//! scrape reads a consistent-enough snapshot (each value is exact; they are not read at one
//! instant, which Prometheus does not expect anyway).

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

#[derive(Default)]
pub struct Metrics {
    pub requests_chat: AtomicU64,
    pub requests_completion: AtomicU64,
    /// Finished with a response or a complete stream.
    pub requests_ok: AtomicU64,
    /// Rejected with a 4xx before reaching the model.
    pub requests_invalid: AtomicU64,
    /// Rejected with 503 because the queue was full.
    pub requests_rejected: AtomicU64,
    /// Client went away before the answer was complete.
    pub requests_cancelled: AtomicU64,
    /// Failed inside the engine.
    pub requests_failed: AtomicU64,
    pub prompt_tokens: AtomicU64,
    /// Prompt tokens found in a slot's cache and not recomputed.
    pub cached_prompt_tokens: AtomicU64,
    pub generated_tokens: AtomicU64,
    /// Seconds spent in prefill / decode forward passes, in microseconds.
    pub prefill_us: AtomicU64,
    pub decode_us: AtomicU64,
    /// Decode throughput over the last scheduling rounds, tok/s × 1000.
    pub recent_decode_milli_tok_s: AtomicU64,
    pub queue_depth: AtomicU64,
    pub active: AtomicU64,
    pub kv_bytes: AtomicU64,
    /// Forward passes of the worker, the sequences and tokens they held (continuous batching:
    /// every active request shares each pass), and the sequences of the latest.
    pub steps: AtomicU64,
    pub step_sequences: AtomicU64,
    pub step_rows: AtomicU64,
    pub batch_size: AtomicU64,
    /// Requests taken from the queue, and their total wait in it, in microseconds.
    pub requests_admitted: AtomicU64,
    pub queue_us: AtomicU64,
    /// Sum of finished requests' own decode rates (tok/s × 1000), and how many.
    pub request_decode_milli_tok_s: AtomicU64,
    pub requests_timed: AtomicU64,
    /// Speculative draft nodes verified, and how many the target accepted.
    pub spec_drafted: AtomicU64,
    pub spec_accepted: AtomicU64,
    /// The server's [`Phase`](super::readiness::Phase): 0 loading, 1 ready, 2 draining.
    pub phase: AtomicU64,
    /// Slots (`--parallel`): requests that can run at once.
    pub slots: AtomicU64,
}

impl Metrics {
    pub fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Relaxed);
    }

    pub fn render(&self, spec_mode: &str) -> String {
        let g = |c: &AtomicU64| c.load(Relaxed);
        let secs = |c: &AtomicU64| g(c) as f64 / 1e6;
        let rate = |n: u64, s: f64| if s > 0.0 { n as f64 / s } else { 0.0 };
        let mut o = String::new();
        let mut metric = |name: &str, kind: &str, help: &str, samples: &[(&str, f64)]| {
            let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for (labels, v) in samples {
                let _ = writeln!(o, "{name}{labels} {v}");
            }
        };
        metric(
            "bitnest_requests_total",
            "counter",
            "Generation requests received, by endpoint.",
            &[
                ("{endpoint=\"chat\"}", g(&self.requests_chat) as f64),
                ("{endpoint=\"completions\"}", g(&self.requests_completion) as f64),
            ],
        );
        metric(
            "bitnest_requests_finished_total",
            "counter",
            "Generation requests by outcome.",
            &[
                ("{outcome=\"ok\"}", g(&self.requests_ok) as f64),
                ("{outcome=\"invalid\"}", g(&self.requests_invalid) as f64),
                ("{outcome=\"rejected\"}", g(&self.requests_rejected) as f64),
                ("{outcome=\"cancelled\"}", g(&self.requests_cancelled) as f64),
                ("{outcome=\"failed\"}", g(&self.requests_failed) as f64),
            ],
        );
        metric(
            "bitnest_prompt_tokens_total",
            "counter",
            "Prompt tokens received.",
            &[("", g(&self.prompt_tokens) as f64)],
        );
        metric(
            "bitnest_prompt_tokens_cached_total",
            "counter",
            "Prompt tokens reused from a slot's KV cache instead of recomputed.",
            &[("", g(&self.cached_prompt_tokens) as f64)],
        );
        metric(
            "bitnest_generated_tokens_total",
            "counter",
            "Tokens generated.",
            &[("", g(&self.generated_tokens) as f64)],
        );
        metric(
            "bitnest_prefill_seconds_total",
            "counter",
            "Time in prompt forward passes.",
            &[("", secs(&self.prefill_us))],
        );
        metric(
            "bitnest_decode_seconds_total",
            "counter",
            "Time in decode forward passes.",
            &[("", secs(&self.decode_us))],
        );
        metric(
            "bitnest_prefill_tokens_per_second",
            "gauge",
            "Prompt tokens computed per second of prefill, since start.",
            &[("", rate(g(&self.prompt_tokens) - g(&self.cached_prompt_tokens), secs(&self.prefill_us)))],
        );
        metric(
            "bitnest_decode_tokens_per_second",
            "gauge",
            "Aggregate decode throughput over recent scheduling rounds.",
            &[("", g(&self.recent_decode_milli_tok_s) as f64 / 1000.0)],
        );
        let per = |a: &AtomicU64, b: &AtomicU64| if g(b) > 0 { g(a) as f64 / g(b) as f64 } else { 0.0 };
        metric("bitnest_steps_total", "counter", "Forward passes of the worker.", &[("", g(&self.steps) as f64)]);
        metric(
            "bitnest_batch_size_mean",
            "gauge",
            "Mean sequences per forward pass, since start.",
            &[("", per(&self.step_sequences, &self.steps))],
        );
        metric(
            "bitnest_batch_tokens_mean",
            "gauge",
            "Mean tokens (prompt chunks, decode tokens, draft nodes) per forward pass, since start.",
            &[("", per(&self.step_rows, &self.steps))],
        );
        metric(
            "bitnest_batch_size",
            "gauge",
            "Sequences in the latest forward pass.",
            &[("", g(&self.batch_size) as f64)],
        );
        metric(
            "bitnest_queue_seconds_mean",
            "gauge",
            "Mean time a request waited for a slot, since start.",
            &[("", per(&self.queue_us, &self.requests_admitted) / 1e6)],
        );
        metric(
            "bitnest_request_decode_tokens_per_second_mean",
            "gauge",
            "Mean of finished requests' own decode rates, since start.",
            &[("", per(&self.request_decode_milli_tok_s, &self.requests_timed) / 1000.0)],
        );
        let phase = g(&self.phase);
        metric(
            "bitnest_ready",
            "gauge",
            "1 when the model is loaded and new requests are taken (what /health's 200 says).",
            &[("", f64::from(phase == 1))],
        );
        metric(
            "bitnest_draining",
            "gauge",
            "1 after SIGTERM while accepted requests finish; new ones get 503.",
            &[("", f64::from(phase == 2))],
        );
        metric(
            "bitnest_prefix_cache_hit_ratio",
            "gauge",
            "Fraction of prompt tokens found in a slot's KV cache, since start.",
            &[("", per(&self.cached_prompt_tokens, &self.prompt_tokens))],
        );
        metric("bitnest_slots", "gauge", "Requests that can run at once (--parallel).", &[("", g(&self.slots) as f64)]);
        metric("bitnest_queue_depth", "gauge", "Requests waiting for a slot.", &[("", g(&self.queue_depth) as f64)]);
        metric("bitnest_active_requests", "gauge", "Requests holding a slot.", &[("", g(&self.active) as f64)]);
        metric("bitnest_kv_cache_bytes", "gauge", "Bytes of KV cache allocated.", &[("", g(&self.kv_bytes) as f64)]);
        metric(
            "bitnest_speculative_acceptance_rate",
            "gauge",
            "Fraction of drafted tokens accepted (0: speculative decoding is off).",
            &[(&format!("{{mode=\"{spec_mode}\"}}"), rate(g(&self.spec_accepted), g(&self.spec_drafted) as f64))],
        );
        o
    }
}

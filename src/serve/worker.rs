//! The inference worker: one thread owns the forward passes and batches the requests.
//!
//! The engine core is synchronous and already spreads each matmul over every core, so running
//! requests on several threads at once would only make them fight over the same cores. Instead
//! one worker thread (a rayon pool thread, so the kernels' parallel jobs stay allocation-free)
//! holds up to `parallel` requests, each in its own *slot* (a KV-cache [`Session`]), and drives
//! the decode driver ([`Decoder`]) over them: each step is one forward pass holding every active
//! request's decode token (or draft tree) and prompt chunks up to `prefill_chunk` tokens in all,
//! so the weights are read once per step for all of them, and a long prompt delays the others
//! by at most a chunk. Requests join and leave between steps; each gets exactly the tokens it
//! would get alone. Requests beyond `parallel` wait in a bounded channel; the HTTP side answers
//! 503 when it is full.
//!
//! Slots are created on demand (at most `parallel`) and kept, with the tokens their cache holds:
//! a new request takes the free slot whose cache shares the longest prefix with its prompt and
//! only computes the rest (chat clients resend the whole conversation every turn). Memory is
//! therefore bounded by `parallel` sessions of `ctx` tokens, whatever the traffic.
//!
//! Tokens go back to the HTTP side over an unbounded channel per request (a request produces at
//! most `ctx` events). A closed channel means the client went away: the request is dropped at
//! its next step and its slot freed.

use std::ops::ControlFlow;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TryRecvError, TrySendError};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use tokio::sync::mpsc::UnboundedSender;

use bitnest::decode::{Decoder, FinishReason, Sequence, common_prefix};
use bitnest::engine::Engine;
use bitnest::model::Session;
use bitnest::sampling::Sampler;
use bitnest::spec::{SpecMode, SpecOptions, Speculator, TokenRecycler};
use bitnest::tokenizer::TokenStream;

use super::api::GenParams;
use super::error::ApiError;
use super::metrics::Metrics;
use super::stop::StopMatcher;

/// One generation request, tokenized and validated.
pub struct Job {
    pub prompt: Vec<u32>,
    pub params: GenParams,
    /// Tokens to generate at most (already clamped to the context left after the prompt).
    pub max_tokens: usize,
    pub events: UnboundedSender<Event>,
    /// When the job was submitted (its time in the queue is a metric).
    pub queued: Instant,
}

/// A generated token's log-probability and the most likely alternatives at its position.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    pub id: u32,
    pub logprob: f32,
    pub top: Vec<(u32, f32)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    /// Prompt tokens reused from the slot's cache.
    pub cached_tokens: usize,
}

#[derive(Debug)]
pub enum Event {
    /// New text (never part of a stop string), with the log-probabilities of the tokens that
    /// completed it when they were asked for.
    Text {
        text: String,
        logprobs: Vec<TokenLogprob>,
    },
    Done {
        finish: FinishReason,
        usage: Usage,
    },
    Error(String),
    /// Cut short by shutdown (`--grace` ran out): nothing usable was finished here, so the
    /// client or its router may retry elsewhere.
    ShuttingDown,
}

#[derive(Debug, Clone, Copy)]
pub struct WorkerConfig {
    pub parallel: usize,
    pub ctx: usize,
    pub prefill_chunk: usize,
    /// Speculative decoding of every request (`SpecMode::None`: plain decoding).
    pub spec: SpecOptions,
}

/// The HTTP side's handle: submits jobs without ever blocking.
#[derive(Clone)]
pub struct Submitter {
    tx: SyncSender<Job>,
    metrics: Arc<Metrics>,
}

impl Submitter {
    pub fn submit(&self, job: Job) -> Result<(), ApiError> {
        // Counted before sending so the worker's decrement can never run first.
        Metrics::add(&self.metrics.queue_depth, 1);
        match self.tx.try_send(job) {
            Ok(()) => Ok(()),
            Err(e) => {
                self.metrics.queue_depth.fetch_sub(1, Ordering::Relaxed);
                match e {
                    TrySendError::Full(_) => {
                        Metrics::add(&self.metrics.requests_rejected, 1);
                        Err(ApiError::overloaded(1))
                    }
                    TrySendError::Disconnected(_) => Err(ApiError::shutting_down()),
                }
            }
        }
    }
}

/// A bounded queue of `queue` waiting jobs in front of the worker.
pub fn queue(queue: usize, metrics: Arc<Metrics>) -> (Submitter, Receiver<Job>) {
    let (tx, rx) = mpsc::sync_channel(queue.max(1));
    (Submitter { tx, metrics }, rx)
}

/// A KV cache and the tokens it currently holds, with its speculative decoder: the measured
/// costs and acceptance rates outlive a request, and the Token Recycling matrix behind every
/// slot's speculator is one, so each request starts from what all the earlier ones taught it.
struct Slot {
    session: Session,
    cached: Vec<u32>,
    spec: Option<Speculator>,
}

/// A request holding a slot: its sequence (the slot's session and speculator inside) and what
/// it has output.
struct Active<'e> {
    job: Job,
    seq: Sequence,
    out: Output<'e>,
    spec_before: (usize, usize),
}

/// What a request has output so far, and the text held back from it.
struct Output<'e> {
    stream: TokenStream<'e>,
    stop: StopMatcher,
    logprobs: Vec<TokenLogprob>,
    /// A stop string ended the answer: the held-back tail is not output.
    stopped_by_string: bool,
}

/// Runs until the submitters are all dropped and every request is done, or `abort` is set.
/// Call it on a rayon pool thread (`pool.install`).
pub fn run(engine: &Engine, rx: Receiver<Job>, cfg: WorkerConfig, metrics: &Metrics, abort: &AtomicBool) {
    let recycler = Arc::new(Mutex::new(TokenRecycler::new(engine.model.config.vocab_size)));
    let mut decoder = Decoder::new(&engine.model, engine.stop_ids(), cfg.prefill_chunk);
    let mut active: Vec<Active> = Vec::new();
    let mut free: Vec<Slot> = Vec::new();
    let mut created = 0usize;
    let mut window = (Instant::now(), 0u64);
    'main: loop {
        if abort.load(Ordering::Relaxed) {
            for a in active.drain(..) {
                let _ = a.job.events.send(Event::ShuttingDown);
                Metrics::add(&metrics.requests_cancelled, 1);
            }
            break;
        }
        // Admit waiting jobs into free slots: they join the next step.
        while active.len() < cfg.parallel {
            let job = if active.is_empty() {
                match rx.recv_timeout(Duration::from_millis(200)) {
                    Ok(j) => j,
                    Err(RecvTimeoutError::Timeout) => {
                        metrics.recent_decode_milli_tok_s.store(0, Ordering::Relaxed);
                        continue 'main;
                    }
                    Err(RecvTimeoutError::Disconnected) => break 'main,
                }
            } else {
                match rx.try_recv() {
                    Ok(j) => j,
                    Err(TryRecvError::Empty | TryRecvError::Disconnected) => break,
                }
            };
            metrics.queue_depth.fetch_sub(1, Ordering::Relaxed);
            Metrics::add(&metrics.queue_us, job.queued.elapsed().as_micros() as u64);
            Metrics::add(&metrics.requests_admitted, 1);
            if job.events.is_closed() {
                Metrics::add(&metrics.requests_cancelled, 1);
                continue;
            }
            let slot = take_slot(engine, &mut free, &mut created, cfg, &job.prompt, metrics, &recycler);
            match admit(engine, job, slot, metrics) {
                Ok(a) => active.push(a),
                Err((job, slot, e)) => {
                    Metrics::add(&metrics.requests_failed, 1);
                    let _ = job.events.send(Event::Error(format!("{e:#}")));
                    free.push(slot);
                }
            }
        }
        metrics.active.store(active.len() as u64, Ordering::Relaxed);

        // One step: every active request's decode token or draft tree, and prompt chunks up to
        // the budget, in one forward pass.
        for a in active.iter_mut() {
            if a.job.events.is_closed() && !a.seq.is_done() {
                Metrics::add(&metrics.requests_cancelled, 1);
                a.seq.cancel();
            }
        }
        let result = {
            let (mut seqs, mut outs): (Vec<&mut Sequence>, Vec<(&Job, &mut Output)>) =
                active.iter_mut().filter(|a| !a.seq.is_done()).map(|a| (&mut a.seq, (&a.job, &mut a.out))).unzip();
            std::panic::catch_unwind(AssertUnwindSafe(|| {
                decoder.step(&mut seqs, |i, id, logits| {
                    let (job, out) = &mut outs[i];
                    out.emit(job, id, logits, metrics)
                })
            }))
        };
        let failure = match result {
            Ok(Ok(r)) => {
                window.1 += r.outputs as u64;
                if r.sequences > 0 {
                    Metrics::add(&metrics.steps, 1);
                    Metrics::add(&metrics.step_sequences, r.sequences as u64);
                    Metrics::add(&metrics.step_rows, r.rows as u64);
                    metrics.batch_size.store(r.sequences as u64, Ordering::Relaxed);
                    let us = r.secs * 1e6;
                    let prefill = us * r.prefill_rows as f64 / r.rows.max(1) as f64;
                    Metrics::add(&metrics.prefill_us, prefill as u64);
                    Metrics::add(&metrics.decode_us, (us - prefill) as u64);
                }
                None
            }
            Ok(Err(e)) => Some(format!("{e:#}")),
            Err(_) => Some("internal error: the forward pass panicked".to_string()),
        };

        // Requests that ended leave; their slots keep what their caches hold.
        let mut i = 0;
        while i < active.len() {
            if failure.is_none() && !active[i].seq.is_done() {
                i += 1;
                continue;
            }
            let mut a = active.remove(i);
            let spec = a.seq.spec.as_ref().map(|s| (s.stats.drafted, s.stats.accepted));
            if let Some((d, acc)) = spec {
                Metrics::add(&metrics.spec_drafted, (d - a.spec_before.0) as u64);
                Metrics::add(&metrics.spec_accepted, (acc - a.spec_before.1) as u64);
            }
            let cancelled = a.seq.finish() == Some(FinishReason::Cancelled) && a.job.events.is_closed();
            let mut slot = match (&failure, a.seq.finish()) {
                (None, Some(finish)) => {
                    let stats = a.seq.stats();
                    if !cancelled {
                        let usage = Usage {
                            prompt_tokens: a.seq.prompt_len(),
                            completion_tokens: a.seq.generated(),
                            cached_tokens: a.seq.cached_tokens(),
                        };
                        // A stop string ends with the driver's "cancelled"; it is a stop.
                        let finish = if finish == FinishReason::Cancelled { FinishReason::Stop } else { finish };
                        a.out.finish(&a.job, finish, usage);
                        Metrics::add(&metrics.requests_ok, 1);
                        if a.seq.generated() > 1 {
                            Metrics::add(&metrics.request_decode_milli_tok_s, (stats.decode_tok_s * 1000.0) as u64);
                            Metrics::add(&metrics.requests_timed, 1);
                        }
                    }
                    let p = a.seq.into_parts();
                    Slot { session: p.session, cached: p.cached, spec: p.spec }
                }
                _ => {
                    Metrics::add(&metrics.requests_failed, 1);
                    let msg = failure.clone().unwrap_or_else(|| "internal error: the request did not finish".into());
                    let _ = a.job.events.send(Event::Error(msg));
                    let p = a.seq.into_parts();
                    Slot { session: p.session, cached: Vec::new(), spec: p.spec }
                }
            };
            if failure.is_some() {
                slot.session.reset();
            }
            free.push(slot);
        }
        metrics.active.store(active.len() as u64, Ordering::Relaxed);
        let elapsed = window.0.elapsed();
        if elapsed >= Duration::from_secs(1) {
            let rate = window.1 as f64 / elapsed.as_secs_f64();
            metrics.recent_decode_milli_tok_s.store((rate * 1000.0) as u64, Ordering::Relaxed);
            window = (Instant::now(), 0);
        }
    }
    metrics.active.store(0, Ordering::Relaxed);
}

/// The free slot sharing the longest prefix with `prompt`, else a new one.
fn take_slot(
    engine: &Engine,
    free: &mut Vec<Slot>,
    created: &mut usize,
    cfg: WorkerConfig,
    prompt: &[u32],
    metrics: &Metrics,
    recycler: &Arc<Mutex<TokenRecycler>>,
) -> Slot {
    let best = (0..free.len()).max_by_key(|&i| common_prefix(&free[i].cached, prompt));
    match best {
        Some(i) if *created >= cfg.parallel || common_prefix(&free[i].cached, prompt) > 0 => free.swap_remove(i),
        _ => {
            *created += 1;
            // Its passes run batched on the worker's buffers; trees and chunks stay under
            // `prefill_chunk` tokens.
            let session = engine.model.new_batched_session(cfg.ctx, cfg.prefill_chunk);
            Metrics::add(&metrics.kv_bytes, session.kv_bytes() as u64);
            let spec = (cfg.spec.mode != SpecMode::None).then(|| Speculator::new(cfg.spec, recycler.clone()));
            Slot { session, cached: Vec::new(), spec }
        }
    }
}

/// The request's sequence in `slot`, or the request and slot back with the reason it cannot run.
#[allow(clippy::result_large_err)]
fn admit<'e>(
    engine: &'e Engine,
    job: Job,
    slot: Slot,
    metrics: &Metrics,
) -> Result<Active<'e>, (Job, Slot, anyhow::Error)> {
    let reuse = match Sequence::check(&slot.session, &slot.cached, &job.prompt) {
        Ok(r) => r,
        Err(e) => return Err((job, slot, e)),
    };
    Metrics::add(&metrics.prompt_tokens, job.prompt.len() as u64);
    Metrics::add(&metrics.cached_prompt_tokens, reuse as u64);
    let mut sampler = Sampler::new(job.params.sampling.clone());
    sampler.reserve(engine.model.config.vocab_size);
    let spec_before = slot.spec.as_ref().map_or((0, 0), |s| (s.stats.drafted, s.stats.accepted));
    let seq = Sequence::new(slot.session, &slot.cached, &job.prompt, job.max_tokens, sampler, slot.spec)
        .expect("checked above");
    let stop = StopMatcher::new(job.params.stop.clone());
    Ok(Active {
        job,
        seq,
        out: Output { stream: engine.tokenizer.stream(), stop, logprobs: Vec::new(), stopped_by_string: false },
        spec_before,
    })
}

impl Output<'_> {
    /// Outputs token `id`, drawn from `logits`: its log-probabilities when asked for, its text
    /// up to any stop string; `Break` when a stop string ends the answer with it.
    fn emit(&mut self, job: &Job, id: u32, logits: &[f32], metrics: &Metrics) -> ControlFlow<()> {
        if let Some(n) = job.params.logprobs {
            self.logprobs.push(token_logprob(logits, id, n));
        }
        Metrics::add(&metrics.generated_tokens, 1);
        if let Some(text) = self.stream.push(id) {
            let m = self.stop.push(&text);
            self.send_text(job, m.emit);
            if m.stopped {
                self.stopped_by_string = true;
                return ControlFlow::Break(());
            }
        }
        ControlFlow::Continue(())
    }

    fn send_text(&mut self, job: &Job, text: String) {
        if !text.is_empty() {
            let logprobs = std::mem::take(&mut self.logprobs);
            let _ = job.events.send(Event::Text { text, logprobs });
        }
    }

    fn finish(&mut self, job: &Job, mut finish: FinishReason, usage: Usage) {
        if !self.stopped_by_string {
            let tail = self.stream.finish().unwrap_or_default();
            let m = self.stop.push(&tail);
            let mut text = m.emit;
            if m.stopped {
                finish = FinishReason::Stop;
            } else {
                text.push_str(&self.stop.flush());
            }
            self.send_text(job, text);
        }
        let _ = job.events.send(Event::Done { finish, usage });
    }
}

/// `ln p(id)` under the model's distribution (temperature 1, no filtering, as OpenAI reports
/// it) and the `n` most likely tokens with theirs.
pub fn token_logprob(logits: &[f32], id: u32, n: usize) -> TokenLogprob {
    let clean = |l: f32| if l.is_nan() { f64::NEG_INFINITY } else { f64::from(l) };
    let max = logits.iter().map(|&l| clean(l)).fold(f64::NEG_INFINITY, f64::max);
    let lse =
        if max.is_finite() { max + logits.iter().map(|&l| (clean(l) - max).exp()).sum::<f64>().ln() } else { max };
    let lp = |l: f32| (clean(l) - lse) as f32;
    let logprob = logits.get(id as usize).map_or(f32::NEG_INFINITY, |&l| lp(l));
    let mut top = Vec::new();
    if n > 0 && !logits.is_empty() {
        let mut idx: Vec<u32> = (0..logits.len() as u32).collect();
        let by = |a: &u32, b: &u32| clean(logits[*b as usize]).total_cmp(&clean(logits[*a as usize])).then(a.cmp(b));
        let n = n.min(idx.len());
        if n < idx.len() {
            idx.select_nth_unstable_by(n - 1, by);
            idx.truncate(n);
        }
        idx.sort_unstable_by(by);
        top = idx.into_iter().map(|i| (i, lp(logits[i as usize]))).collect();
    }
    TokenLogprob { id, logprob, top }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logprobs_are_normalised_and_ranked() {
        let logits = [1.0f32, 3.0, 2.0, f32::NAN, 3.0];
        let t = token_logprob(&logits, 2, 3);
        let z: f64 = [1.0f64, 3.0, 2.0, 3.0].iter().map(|l| l.exp()).sum();
        assert!((f64::from(t.logprob) - (2.0 - z.ln())).abs() < 1e-6);
        assert_eq!(t.top.iter().map(|p| p.0).collect::<Vec<_>>(), vec![1, 4, 2]);
        assert_eq!(token_logprob(&logits, 3, 0).logprob, f32::NEG_INFINITY);
        assert_eq!(token_logprob(&logits, 99, 0).logprob, f32::NEG_INFINITY);
        assert_eq!(token_logprob(&logits, 0, 50).top.len(), 5);
    }

    #[test]
    fn full_queue_is_a_503_with_retry_after() {
        let metrics = Arc::new(Metrics::default());
        let (sub, rx) = queue(1, metrics.clone());
        let job = || {
            let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
            Job {
                prompt: vec![1],
                params: GenParams {
                    max_tokens: Some(1),
                    sampling: Default::default(),
                    stop: vec![],
                    stream: false,
                    include_usage: false,
                    logprobs: None,
                    echo: false,
                },
                max_tokens: 1,
                events: tx,
                queued: Instant::now(),
            }
        };
        assert!(sub.submit(job()).is_ok());
        let e = sub.submit(job()).unwrap_err();
        assert_eq!(e.status.as_u16(), 503);
        assert_eq!(e.retry_after, Some(1));
        assert_eq!(metrics.queue_depth.load(Ordering::Relaxed), 1);
        drop(rx);
        assert_eq!(sub.submit(job()).unwrap_err().code, Some("shutting_down"));
    }
}

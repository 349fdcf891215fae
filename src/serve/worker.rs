//! The inference worker: one thread owns the forward passes and interleaves the requests.
//!
//! The engine core is synchronous and already spreads each matmul over every core with rayon,
//! so running requests on several threads at once would only make them fight over the same
//! cores. Instead one worker thread (a rayon pool thread, so the kernels' parallel jobs stay
//! allocation-free) holds up to `parallel` requests, each in its own *slot* (a KV-cache
//! [`Session`]), and round-robins one step at a time over them: a step is one decode token, or
//! one chunk of at most `prefill_chunk` prompt tokens, so a long prompt cannot stall the others
//! for more than a chunk. Requests beyond `parallel` wait in a bounded channel; the HTTP side
//! answers 503 when it is full.
//!
//! Slots are created on demand (at most `parallel`) and kept, with the tokens their cache holds:
//! a new request takes the free slot whose cache shares the longest prefix with its prompt and
//! only computes the rest (chat clients resend the whole conversation every turn). Memory is
//! therefore bounded by `parallel` sessions of `ctx` tokens, whatever the traffic.
//!
//! Tokens go back to the HTTP side over an unbounded channel per request (a request produces at
//! most `ctx` events). A closed channel means the client went away: the request is dropped at
//! its next step and its slot freed.

use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TryRecvError, TrySendError};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use tokio::sync::mpsc::UnboundedSender;

use bitnest::engine::Engine;
use bitnest::generate::FinishReason;
use bitnest::model::Session;
use bitnest::sampling::Sampler;
use bitnest::spec::{Pick, SpecMode, SpecOptions, Speculator, StepEnd, TokenRecycler};
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

/// A request holding a slot.
struct Active<'e> {
    job: Job,
    slot: Slot,
    sampler: Sampler,
    /// Prompt then generated ids (the repetition penalty's window, and what the cache holds).
    history: Vec<u32>,
    /// Prompt tokens already in the cache.
    fed: usize,
    /// Sampled, sent, not yet run through the model.
    next: Option<u32>,
    cached_tokens: usize,
    out: Output<'e>,
}

/// What a request has output so far, and the text held back from it.
struct Output<'e> {
    generated: usize,
    stream: TokenStream<'e>,
    stop: StopMatcher,
    logprobs: Vec<TokenLogprob>,
    /// A stop string ended the answer: the held-back tail is not output.
    stopped_by_string: bool,
}

enum Step {
    Continue,
    Finished(FinishReason),
}

/// Runs until the submitters are all dropped and every request is done, or `abort` is set.
/// Call it on a rayon pool thread (`pool.install`).
pub fn run(engine: &Engine, rx: Receiver<Job>, cfg: WorkerConfig, metrics: &Metrics, abort: &AtomicBool) {
    let stop_ids = engine.stop_ids();
    let recycler = Arc::new(Mutex::new(TokenRecycler::new(engine.model.config.vocab_size)));
    let mut active: Vec<Active> = Vec::new();
    let mut free: Vec<Slot> = Vec::new();
    let mut created = 0usize;
    let mut window = (Instant::now(), 0u64);
    'main: loop {
        if abort.load(Ordering::Relaxed) {
            for a in active.drain(..) {
                let _ = a.job.events.send(Event::Error("the server is shutting down".into()));
                Metrics::add(&metrics.requests_cancelled, 1);
            }
            break;
        }
        // Admit waiting jobs into free slots.
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
            if job.events.is_closed() {
                Metrics::add(&metrics.requests_cancelled, 1);
                continue;
            }
            let slot = take_slot(engine, &mut free, &mut created, cfg, &job.prompt, metrics, &recycler);
            active.push(admit(engine, job, slot, metrics));
        }
        metrics.active.store(active.len() as u64, Ordering::Relaxed);

        // One round: every active request advances by one step.
        let mut i = 0;
        while i < active.len() {
            let a = &mut active[i];
            let outcome = if a.job.events.is_closed() {
                Metrics::add(&metrics.requests_cancelled, 1);
                None
            } else {
                let before = a.out.generated;
                let r = std::panic::catch_unwind(AssertUnwindSafe(|| a.step(engine, &stop_ids, cfg, metrics)));
                window.1 += (a.out.generated - before) as u64;
                match r {
                    Ok(Ok(Step::Continue)) => {
                        i += 1;
                        continue;
                    }
                    Ok(Ok(Step::Finished(f))) => {
                        a.finish(f);
                        Metrics::add(&metrics.requests_ok, 1);
                        None
                    }
                    Ok(Err(e)) => Some(format!("{e:#}")),
                    Err(_) => Some("internal error: the forward pass panicked".to_string()),
                }
            };
            let mut a = active.remove(i);
            if let Some(msg) = outcome {
                Metrics::add(&metrics.requests_failed, 1);
                let _ = a.job.events.send(Event::Error(msg));
                a.history.clear();
                a.slot.session.reset();
            }
            // The cache holds exactly the ids that went through the model.
            let pos = a.slot.session.pos.min(a.history.len());
            a.history.truncate(pos);
            a.slot.cached = a.history;
            free.push(a.slot);
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
            let session = engine.model.new_session(cfg.ctx, cfg.prefill_chunk);
            Metrics::add(&metrics.kv_bytes, session.kv_bytes() as u64);
            let spec = (cfg.spec.mode != SpecMode::None).then(|| Speculator::new(cfg.spec, recycler.clone()));
            Slot { session, cached: Vec::new(), spec }
        }
    }
}

fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

fn admit<'e>(engine: &'e Engine, job: Job, mut slot: Slot, metrics: &Metrics) -> Active<'e> {
    // At least the last prompt token must run to produce the first logits.
    let reuse = common_prefix(&slot.cached, &job.prompt).min(job.prompt.len().saturating_sub(1));
    slot.session.truncate(reuse);
    slot.cached.clear();
    Metrics::add(&metrics.prompt_tokens, job.prompt.len() as u64);
    Metrics::add(&metrics.cached_prompt_tokens, reuse as u64);
    let mut sampler = Sampler::new(job.params.sampling.clone());
    sampler.reserve(engine.model.config.vocab_size);
    let stop = StopMatcher::new(job.params.stop.clone());
    let mut history = Vec::with_capacity(job.prompt.len() + job.max_tokens.min(4096));
    history.extend_from_slice(&job.prompt);
    Active {
        job,
        slot,
        sampler,
        history,
        fed: reuse,
        next: None,
        cached_tokens: reuse,
        out: Output {
            generated: 0,
            stream: engine.tokenizer.stream(),
            stop,
            logprobs: Vec::new(),
            stopped_by_string: false,
        },
    }
}

impl Active<'_> {
    fn step(
        &mut self,
        engine: &Engine,
        stop_ids: &[u32],
        cfg: WorkerConfig,
        metrics: &Metrics,
    ) -> anyhow::Result<Step> {
        let model = &engine.model;
        let prompt = &self.job.prompt;
        let t0 = Instant::now();
        let logits = if self.fed < prompt.len() {
            let end = (self.fed + cfg.prefill_chunk.max(1)).min(prompt.len());
            let last = end == prompt.len();
            let logits = model.forward(&mut self.slot.session, &prompt[self.fed..end], usize::from(last))?;
            Metrics::add(&metrics.prefill_us, t0.elapsed().as_micros() as u64);
            self.fed = end;
            if !last {
                return Ok(Step::Continue);
            }
            logits
        } else if let Some(spec) = self.slot.spec.as_mut() {
            // The root, `next`, is the history's last token.
            if self.next.take().is_none() {
                anyhow::bail!("internal error: no token to decode");
            }
            let session = &mut self.slot.session;
            if session.pos + 1 >= session.capacity() {
                return Ok(Step::Finished(FinishReason::Length));
            }
            let (job, out) = (&self.job, &mut self.out);
            let mut finish = FinishReason::Length;
            let (drafted, accepted) = (spec.stats.drafted, spec.stats.accepted);
            let end = spec.step(model, session, &mut self.sampler, &mut self.history, |id, logits| {
                match out.emit(job, id, logits, stop_ids, metrics) {
                    None => Pick::Take,
                    Some(f) => {
                        finish = f;
                        // An end-of-text token is not part of the answer; a stop string's or
                        // the limit's last token is (and the cache need not hold it).
                        if stop_ids.contains(&id) { Pick::Refuse } else { Pick::TakeAndStop }
                    }
                }
            })?;
            Metrics::add(&metrics.decode_us, t0.elapsed().as_micros() as u64);
            Metrics::add(&metrics.spec_drafted, (spec.stats.drafted - drafted) as u64);
            Metrics::add(&metrics.spec_accepted, (spec.stats.accepted - accepted) as u64);
            return Ok(match end {
                StepEnd::Next => {
                    self.next = self.history.last().copied();
                    Step::Continue
                }
                StepEnd::Ended(_) => Step::Finished(finish),
                StepEnd::Full => Step::Finished(FinishReason::Length),
            });
        } else {
            let Some(tok) = self.next.take() else { anyhow::bail!("internal error: no token to decode") };
            let logits = model.forward(&mut self.slot.session, &[tok], 1)?;
            Metrics::add(&metrics.decode_us, t0.elapsed().as_micros() as u64);
            logits
        };
        let id = self.sampler.sample(logits, &self.history);
        if let Some(f) = self.out.emit(&self.job, id, logits, stop_ids, metrics) {
            if !stop_ids.contains(&id) {
                self.history.push(id);
            }
            return Ok(Step::Finished(f));
        }
        self.history.push(id);
        if self.slot.session.pos >= self.slot.session.capacity() {
            return Ok(Step::Finished(FinishReason::Length));
        }
        self.next = Some(id);
        Ok(Step::Continue)
    }

    /// Sends the held-back text (unless a stop string ended the answer) and the final event.
    fn finish(&mut self, finish: FinishReason) {
        let usage = Usage {
            prompt_tokens: self.job.prompt.len(),
            completion_tokens: self.out.generated,
            cached_tokens: self.cached_tokens,
        };
        self.out.finish(&self.job, finish, usage);
    }
}

impl Output<'_> {
    /// Outputs token `id`, drawn from `logits`, as plain decoding does: the reason the answer
    /// ends with it, if it does (an end-of-text token, which is not output; a stop string; the
    /// token limit).
    fn emit(
        &mut self,
        job: &Job,
        id: u32,
        logits: &[f32],
        stop_ids: &[u32],
        metrics: &Metrics,
    ) -> Option<FinishReason> {
        if let Some(n) = job.params.logprobs {
            self.logprobs.push(token_logprob(logits, id, n));
        }
        if stop_ids.contains(&id) {
            return Some(FinishReason::Stop);
        }
        self.generated += 1;
        Metrics::add(&metrics.generated_tokens, 1);
        if let Some(text) = self.stream.push(id) {
            let m = self.stop.push(&text);
            self.send_text(job, m.emit);
            if m.stopped {
                self.stopped_by_string = true;
                return Some(FinishReason::Stop);
            }
        }
        (self.generated >= job.max_tokens).then_some(FinishReason::Length)
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

//! The decode driver: one loop for `run`, `chat`, `bench` and `serve`.
//!
//! A [`Decoder`] advances a set of [`Sequence`]s (each with its own KV cache, position, sampler
//! and limits) one step at a time. A step puts into **one** forward pass
//! ([`Llama::forward_batch`]) every sequence's next piece of work: the decode token of a plain
//! sequence, the draft tree of a speculating one ([`Speculator::propose`]), and prompt chunks
//! up to the step's prefill budget. Then each sequence takes its logits: it samples (or walks
//! its tree, [`Speculator::accept`]), and stop tokens, the length limit, the context size and
//! the caller's callback decide whether it goes on. Since every layer is batch invariant, each
//! sequence gets the tokens it would get alone, whatever shares its passes.

mod sequence;

use std::ops::ControlFlow;
use std::time::Instant;

use anyhow::Result;
use serde::Serialize;

use sequence::State;
pub use sequence::{Parts, Sequence, common_prefix};

use crate::model::{ALL_BITS, Llama, Scratch, Session, Span, SpanKind};
use crate::spec::{Pick, StepEnd};

/// Why generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// An end-of-generation token was sampled.
    Stop,
    /// `max_tokens` or the context size was reached.
    Length,
    /// The token callback asked to stop.
    Cancelled,
}

#[derive(Debug, Clone, Serialize)]
pub struct GenerationStats {
    pub prompt_tokens: usize,
    pub generated_tokens: usize,
    pub prefill_s: f64,
    pub decode_s: f64,
    pub prefill_tok_s: f64,
    pub decode_tok_s: f64,
    pub finish: FinishReason,
}

/// What one step did.
#[derive(Debug, Clone, Copy, Default)]
pub struct StepReport {
    /// Sequences in the pass.
    pub sequences: usize,
    /// Tokens in the pass: prompt chunks, decode tokens and draft-tree nodes.
    pub rows: usize,
    pub prefill_rows: usize,
    /// Tokens output by all sequences.
    pub outputs: usize,
    /// Seconds of the step, drafting included.
    pub secs: f64,
}

/// The piece of work a sequence puts into a step's pass.
#[derive(Clone, Copy)]
enum Work {
    Idle,
    /// Prompt tokens `fed..end`.
    Prefill {
        end: usize,
    },
    /// The history's last token, to sample the next from.
    Decode,
    /// Its speculator's draft tree.
    Tree,
    /// The history's last token into the cache; no logits.
    Feed,
}

/// Runs the steps. It owns the buffers of the batched passes, sized by the largest.
pub struct Decoder<'m> {
    model: &'m Llama,
    scratch: Scratch,
    stop_ids: Vec<u32>,
    /// Most prompt tokens one step takes, over all the sequences still in their prompt.
    pub prefill_budget: usize,
    work: Vec<Work>,
}

impl<'m> Decoder<'m> {
    /// A driver for `model` ending generations at `stop_ids`; each step takes at most
    /// `prefill_budget` prompt tokens.
    pub fn new(model: &'m Llama, stop_ids: Vec<u32>, prefill_budget: usize) -> Self {
        let prefill_budget = prefill_budget.max(1);
        Decoder { model, scratch: Scratch::default(), stop_ids, prefill_budget, work: Vec::new() }
    }

    pub fn model(&self) -> &'m Llama {
        self.model
    }

    /// Runs `tokens` into `session` (no logits), in passes of at most the prefill budget, on
    /// this driver's buffers: a context to start from.
    pub fn feed(&mut self, session: &mut Session, tokens: &[u32]) -> Result<()> {
        for chunk in tokens.chunks(self.prefill_budget) {
            let span = Span { session: &mut *session, tokens: chunk, kind: SpanKind::Run { logits: 0 } };
            self.model.forward_batch(&mut self.scratch, &mut [span], ALL_BITS)?;
        }
        Ok(())
    }

    /// Generates `seq` to its end, alone; `on_token` sees each output id (not end-of-text ones)
    /// with the logits it was drawn from, and may stop the generation (the token is output).
    pub fn generate(
        &mut self,
        seq: &mut Sequence,
        mut on_token: impl FnMut(u32, &[f32]) -> ControlFlow<()>,
    ) -> Result<GenerationStats> {
        if let Some(spec) = &seq.spec {
            spec.check(self.model)?;
        }
        while !seq.is_done() {
            self.step(&mut [&mut *seq], |_, id, logits| on_token(id, logits))?;
        }
        Ok(seq.stats())
    }

    /// One step of every sequence in `seqs` that is not done, in one forward pass (see the
    /// module documentation). `on_token(i, id, logits)` sees each token sequence `i` outputs;
    /// `Break` ends that sequence with the token output. An error leaves the sequences of the
    /// pass in an unknown state: the caller ends them.
    pub fn step(
        &mut self,
        seqs: &mut [&mut Sequence],
        mut on_token: impl FnMut(usize, u32, &[f32]) -> ControlFlow<()>,
    ) -> Result<StepReport> {
        let t0 = Instant::now();
        let model = self.model;
        // What each sequence does this step; drafting happens now, on each sequence alone.
        self.work.clear();
        let mut budget = self.prefill_budget;
        for seq in seqs.iter_mut() {
            let w = match seq.state {
                State::Done(_) => Work::Idle,
                State::Feed(_) => Work::Feed,
                State::Prefill if budget == 0 => Work::Idle,
                State::Prefill => {
                    let end = (seq.fed + budget).min(seq.history.len());
                    budget -= end - seq.fed;
                    Work::Prefill { end }
                }
                State::Decode => {
                    let s = &mut seq.session;
                    if s.pos + 1 > s.capacity() - 1 {
                        // Room for the root only: it goes in, and the context is full.
                        seq.state = State::Feed(FinishReason::Length);
                        Work::Feed
                    } else if let Some(spec) = seq.spec.as_mut() {
                        spec.propose(model, s, &seq.history)?;
                        Work::Tree
                    } else {
                        Work::Decode
                    }
                }
            };
            self.work.push(w);
        }
        let mut spans = Vec::with_capacity(seqs.len());
        for (seq, &w) in seqs.iter_mut().zip(&self.work) {
            let Sequence { session, history, spec, fed, .. } = &mut **seq;
            let last = history.len() - 1;
            let (tokens, kind) = match w {
                Work::Idle => continue,
                Work::Prefill { end } => {
                    (&history[*fed..end], SpanKind::Run { logits: usize::from(end == history.len()) })
                }
                Work::Decode => (&history[last..], SpanKind::Run { logits: 1 }),
                Work::Feed => (&history[last..], SpanKind::Run { logits: 0 }),
                Work::Tree => {
                    let tree = spec.as_ref().expect("a speculating sequence").tree();
                    (&tree.tokens[..], SpanKind::Tree { parents: &tree.parents[..] })
                }
            };
            spans.push(Span { session, tokens, kind });
        }
        let mut report = StepReport { sequences: spans.len(), ..StepReport::default() };
        if spans.is_empty() {
            return Ok(report);
        }
        report.rows = spans.iter().map(|s| s.tokens.len()).sum();
        report.prefill_rows = self.prefill_budget - budget;
        let tv = Instant::now();
        let logits = model.forward_batch(&mut self.scratch, &mut spans, ALL_BITS)?;
        let verify_s = tv.elapsed().as_secs_f64();
        drop(spans);

        // Each sequence takes its logits.
        let vocab = model.config.vocab_size;
        let mut at = 0;
        for (i, (seq, &w)) in seqs.iter_mut().zip(&self.work).enumerate() {
            let seq = &mut **seq;
            // What plain decoding does with an output token (`last`: the limit is reached).
            let mut judge = |last: bool, id: u32, row: &[f32]| -> Pick {
                if on_token(i, id, row).is_break() {
                    Pick::TakeAndStop
                } else if last {
                    Pick::TakeLast
                } else {
                    Pick::Take
                }
            };
            match w {
                Work::Idle => {}
                Work::Feed => {
                    let State::Feed(f) = seq.state else { unreachable!("fed a sequence not ending") };
                    seq.end_with(f);
                }
                Work::Prefill { end } => {
                    seq.fed = end;
                    if end == seq.history.len() {
                        let row = &logits[at * vocab..(at + 1) * vocab];
                        at += 1;
                        report.outputs += sample(&self.stop_ids, seq, row, &mut judge);
                    }
                }
                Work::Decode => {
                    let row = &logits[at * vocab..(at + 1) * vocab];
                    at += 1;
                    report.outputs += sample(&self.stop_ids, seq, row, &mut judge);
                }
                Work::Tree => {
                    let Sequence { session, sampler, history, spec, out, .. } = &mut *seq;
                    let spec = spec.as_mut().expect("a speculating sequence");
                    let n = spec.tree().len();
                    let rows = &logits[at * vocab..(at + n) * vocab];
                    at += n;
                    let stop_ids = &self.stop_ids;
                    let end = spec.accept(model, session, sampler, history, rows, verify_s, |id, row| {
                        if stop_ids.contains(&id) {
                            return Pick::Refuse;
                        }
                        report.outputs += 1;
                        let last = out.count();
                        judge(last, id, row)
                    })?;
                    match end {
                        StepEnd::Next => {}
                        StepEnd::Ended(Pick::Refuse) => seq.end_with(FinishReason::Stop),
                        StepEnd::Ended(Pick::TakeAndStop) => seq.end_with(FinishReason::Cancelled),
                        StepEnd::Ended(_) | StepEnd::Full => seq.end_with(FinishReason::Length),
                        StepEnd::EndedUnfed => seq.state = State::Feed(FinishReason::Length),
                    }
                }
            }
        }
        report.secs = t0.elapsed().as_secs_f64();
        Ok(report)
    }
}

/// Samples the token after `row` for `seq`, whose history's last token `row` belongs to, and
/// moves the sequence on; returns the tokens output (0 or 1).
fn sample(
    stop_ids: &[u32],
    seq: &mut Sequence,
    row: &[f32],
    judge: &mut impl FnMut(bool, u32, &[f32]) -> Pick,
) -> usize {
    let id = seq.sampler.sample(row, &seq.history);
    if stop_ids.contains(&id) {
        seq.end_with(FinishReason::Stop);
        return 0;
    }
    let last = seq.out.count();
    seq.history.push(id);
    match judge(last, id, row) {
        Pick::Take => seq.state = State::Decode,
        Pick::TakeLast => seq.state = State::Feed(FinishReason::Length),
        Pick::TakeAndStop => seq.end_with(FinishReason::Cancelled),
        Pick::Refuse => unreachable!("the judge refuses only end-of-text tokens"),
    }
    1
}

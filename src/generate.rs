//! The autoregressive decode loop: prefill the prompt, then sample one token per forward pass.

use std::ops::ControlFlow;
use std::time::Instant;

use anyhow::{Result, ensure};
use serde::Serialize;

use crate::model::{Llama, Session};
use crate::sampling::Sampler;

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

/// Generates up to `max_tokens` after `prompt`, continuing from whatever `session` already
/// holds (multi-turn chat keeps its cache). `on_token` sees each new id and may stop early.
/// End-of-generation ids are not passed to `on_token` and not kept in the cache.
#[allow(clippy::too_many_arguments)]
pub fn generate(
    model: &Llama,
    session: &mut Session,
    prompt: &[u32],
    max_tokens: usize,
    sampler: &mut Sampler,
    stop_ids: &[u32],
    history: &mut Vec<u32>,
    mut on_token: impl FnMut(u32) -> ControlFlow<()>,
) -> Result<GenerationStats> {
    ensure!(!prompt.is_empty(), "the prompt is empty");
    let room = session.capacity().saturating_sub(session.pos);
    ensure!(
        prompt.len() < room,
        "the prompt has {} tokens but only {room} fit in the remaining context (size {}); use a larger --ctx",
        prompt.len(),
        session.capacity()
    );
    let t0 = Instant::now();
    let logits = model.forward(session, prompt, 1)?;
    history.extend_from_slice(prompt);
    let mut next = sampler.sample(logits, history);
    let prefill_s = t0.elapsed().as_secs_f64();

    let t1 = Instant::now();
    let mut generated = 0;
    let mut forwards = 0;
    let finish = loop {
        if stop_ids.contains(&next) {
            break FinishReason::Stop;
        }
        generated += 1;
        history.push(next);
        if on_token(next).is_break() {
            break FinishReason::Cancelled;
        }
        if generated >= max_tokens || session.pos + 1 > session.capacity() - 1 {
            // Feed the last token so the cache holds the full turn for the next one.
            model.forward(session, &[next], 1)?;
            forwards += 1;
            break FinishReason::Length;
        }
        let logits = model.forward(session, &[next], 1)?;
        forwards += 1;
        next = sampler.sample(logits, history);
    };
    let decode_s = t1.elapsed().as_secs_f64();
    let rate = |n: usize, s: f64| if s > 0.0 { n as f64 / s } else { 0.0 };
    Ok(GenerationStats {
        prompt_tokens: prompt.len(),
        generated_tokens: generated,
        prefill_s,
        decode_s,
        prefill_tok_s: rate(prompt.len(), prefill_s),
        decode_tok_s: rate(forwards, decode_s),
        finish,
    })
}

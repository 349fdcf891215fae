//! One sequence being generated: its cache, sampler, history, limits and where it stands.

use std::time::Instant;

use anyhow::{Result, ensure};

use super::{FinishReason, GenerationStats};
use crate::model::Session;
use crate::sampling::Sampler;
use crate::spec::Speculator;

/// Length of the longest common prefix of two token lists.
pub fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

/// What a finished [`Sequence`] gives back.
pub struct Parts {
    pub session: Session,
    /// The tokens the session's cache holds.
    pub cached: Vec<u32>,
    pub sampler: Sampler,
    pub spec: Option<Speculator>,
}

/// Where a sequence stands between two steps of the [`super::Decoder`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum State {
    /// Prompt tokens from `fed` on still have to go through the model.
    Prefill,
    /// The history's last token was output and is the next one to run (with a draft tree
    /// behind it when the sequence speculates).
    Decode,
    /// The generation ended for this reason, but the history's last token still has to go
    /// into the cache (so that the next turn of a conversation starts from the whole answer).
    Feed(FinishReason),
    Done(FinishReason),
}

/// A sequence: its KV cache ([`Session`]), sampler, the tokens it holds, and how far its
/// prompt and generation have got. The [`super::Decoder`] advances any number of them together.
pub struct Sequence {
    pub session: Session,
    pub sampler: Sampler,
    /// The prompt, then every output token (the repetition penalty's window): the cache holds
    /// all of it but, while decoding, the last token.
    pub history: Vec<u32>,
    /// Speculative decoding of this sequence (`None`: plain).
    pub spec: Option<Speculator>,
    prompt_len: usize,
    pub(super) fed: usize,
    pub(super) out: Outputs,
    cached: usize,
    pub(super) state: State,
    start: Instant,
    end: Option<Instant>,
}

/// The count of output tokens against the limit.
pub(super) struct Outputs {
    generated: usize,
    max_tokens: usize,
    first: Option<Instant>,
}

impl Outputs {
    /// Counts an output token; whether the limit is reached.
    pub(super) fn count(&mut self) -> bool {
        self.generated += 1;
        if self.first.is_none() {
            self.first = Some(Instant::now());
        }
        self.generated >= self.max_tokens
    }
}

impl Sequence {
    /// A sequence generating up to `max_tokens` after `prompt`, in `session`, which already
    /// holds `cached` (the tokens it ran before: a chat's earlier turns, or a server slot's
    /// last request). The longest common prefix of the two is reused, and at least the
    /// prompt's last token runs again, for its logits.
    pub fn new(
        mut session: Session,
        cached: &[u32],
        prompt: &[u32],
        max_tokens: usize,
        sampler: Sampler,
        spec: Option<Speculator>,
    ) -> Result<Sequence> {
        let reuse = Self::check(&session, cached, prompt)?;
        session.truncate(reuse);
        let mut history = Vec::with_capacity(prompt.len() + max_tokens.min(4096) + 1);
        history.extend_from_slice(prompt);
        Ok(Sequence {
            session,
            sampler,
            history,
            spec,
            prompt_len: prompt.len(),
            fed: reuse,
            out: Outputs { generated: 0, max_tokens, first: None },
            cached: reuse,
            state: State::Prefill,
            start: Instant::now(),
            end: None,
        })
    }

    /// Whether `prompt` fits in `session` holding `cached` ([`Sequence::new`] fails exactly
    /// when this does); the prompt tokens it would reuse.
    pub fn check(session: &Session, cached: &[u32], prompt: &[u32]) -> Result<usize> {
        ensure!(!prompt.is_empty(), "the prompt is empty");
        let reuse = common_prefix(cached, prompt).min(prompt.len() - 1).min(session.pos);
        let (new, room) = (prompt.len() - reuse, session.capacity() - reuse);
        ensure!(
            new < room,
            "the prompt has {new} tokens but only {room} fit in the remaining context (size {}); use a larger --ctx",
            session.capacity()
        );
        Ok(reuse)
    }

    /// Why the generation ended, once it has.
    pub fn finish(&self) -> Option<FinishReason> {
        match self.state {
            State::Done(f) => Some(f),
            _ => None,
        }
    }

    pub fn is_done(&self) -> bool {
        self.finish().is_some()
    }

    /// Still running its prompt.
    pub fn in_prefill(&self) -> bool {
        self.state == State::Prefill
    }

    /// Tokens output so far.
    pub fn generated(&self) -> usize {
        self.out.generated
    }

    /// Prompt tokens reused from the session's earlier content.
    pub fn cached_tokens(&self) -> usize {
        self.cached
    }

    /// Prompt tokens.
    pub fn prompt_len(&self) -> usize {
        self.prompt_len
    }

    /// Ends the generation now (a client that went away); the cache keeps what it holds.
    pub fn cancel(&mut self) {
        if !self.is_done() {
            self.end_with(FinishReason::Cancelled);
        }
    }

    /// The session, the tokens its cache holds, the sampler and the speculator, for the next
    /// generation.
    pub fn into_parts(mut self) -> Parts {
        let pos = self.session.pos.min(self.history.len());
        self.history.truncate(pos);
        Parts { session: self.session, cached: self.history, sampler: self.sampler, spec: self.spec }
    }

    /// Rates and times: prefill from creation to the first output token, decoding from there
    /// to the end.
    pub fn stats(&self) -> GenerationStats {
        let now = Instant::now();
        let first = self.out.first.unwrap_or_else(|| self.end.unwrap_or(now));
        let prefill_s = (first - self.start).as_secs_f64();
        let decode_s = (self.end.unwrap_or(now) - first).as_secs_f64();
        let rate = |n: usize, s: f64| if s > 0.0 { n as f64 / s } else { 0.0 };
        let fed = self.prompt_len - self.cached;
        GenerationStats {
            prompt_tokens: self.prompt_len,
            generated_tokens: self.out.generated,
            prefill_s,
            decode_s,
            prefill_tok_s: rate(fed, prefill_s),
            decode_tok_s: rate(self.out.generated, decode_s),
            finish: self.finish().unwrap_or(FinishReason::Cancelled),
        }
    }

    pub(super) fn end_with(&mut self, f: FinishReason) {
        self.state = State::Done(f);
        self.end = Some(Instant::now());
    }
}

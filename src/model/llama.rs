//! The llama-family transformer (llama, Mistral, Qwen2): embeddings → blocks → output head.
//!
//! Read top to bottom, [`Llama::forward_batch`] → `blocks_pass` is the whole model. The weights
//! are immutable and shared; what changes while decoding lives in a [`Session`] per sequence
//! (KV cache, position) and in a [`Scratch`] per pass (activation buffers, grown to the largest
//! pass and then reused), so a pass allocates nothing once its size has been seen (a pass over
//! several sequences allocates only its attention task list).

use std::sync::Arc;

use anyhow::{Result, ensure};

use super::arch::FfnAct;
use super::config::LlamaConfig;
use super::ffn::{Ffn, FfnPass};
use super::session::{FFN_ROWS, KvCache, Side};
pub use super::session::{KvType, KvTypes, Scratch, Session};
use super::state::{self, StateBlocks};
use crate::kernels::attention::blocks::attend_group_blocks;
use crate::kernels::attention::{HeadView, Query, attend_group};
use crate::kernels::ops::{Rope, gelu_tanh_mul, rms_norm, rms_norm_heads, silu_mul};
use crate::kernels::{Linear, SyncPtr, forward_shared};

/// One transformer block: pre-norm attention and pre-norm gated MLP, both residual (Gemma
/// also normalizes each one's output before adding it back).
pub struct Block {
    pub attn_norm: Vec<f32>,
    pub wq: Box<dyn Linear>,
    pub wk: Box<dyn Linear>,
    pub wv: Box<dyn Linear>,
    /// RMS norms applied to each query and key head before RoPE (Qwen3), or to the whole query
    /// and key vectors (OLMoE: as wide as they are), when the file has them.
    pub q_norm: Option<Vec<f32>>,
    pub k_norm: Option<Vec<f32>>,
    pub wo: Box<dyn Linear>,
    /// RMS norm of the attention output before the residual add (Gemma), when the file has it.
    pub post_attn_norm: Option<Vec<f32>>,
    /// Positions this layer attends to, itself included, if it is a sliding-window layer.
    pub window: Option<usize>,
    pub ffn_norm: Vec<f32>,
    /// A gated MLP, or a mixture of them.
    pub ffn: Ffn,
    /// RMS norm of the MLP output before the residual add (Gemma), when the file has it.
    pub post_ffn_norm: Option<Vec<f32>>,
}

impl Block {
    /// Every linear layer of the block with its name (`attn_q` … `ffn_down`, and a mixture's
    /// as [`Ffn::linears`] names them), in the order a pass runs them.
    pub fn linears(&self) -> Vec<(String, &dyn Linear)> {
        let attn = [("attn_q", &self.wq), ("attn_k", &self.wk), ("attn_v", &self.wv), ("attn_output", &self.wo)];
        let mut v: Vec<(String, &dyn Linear)> = attn.iter().map(|(n, l)| (n.to_string(), &***l)).collect();
        v.extend(self.ffn.linears());
        v
    }

    /// [`Block::linears`], mutable.
    pub fn linears_mut(&mut self) -> Vec<(String, &mut Box<dyn Linear>)> {
        let mut v: Vec<(String, &mut Box<dyn Linear>)> = vec![
            ("attn_q".into(), &mut self.wq),
            ("attn_k".into(), &mut self.wk),
            ("attn_v".into(), &mut self.wv),
            ("attn_output".into(), &mut self.wo),
        ];
        v.extend(self.ffn.linears_mut());
        v
    }
}

pub struct Llama {
    pub config: LlamaConfig,
    /// Token embedding table, `vocab × dim`; shared with the head when the model ties them.
    pub embed: Arc<dyn Linear>,
    pub blocks: Vec<Block>,
    pub norm: Vec<f32>,
    pub head: Arc<dyn Linear>,
    pub rope: Rope,
    /// Phi-3's long rope and the original context past which a session uses it (llama.cpp
    /// chooses by the context it is given; so does a session, by its capacity).
    pub rope_long: Option<(Rope, usize)>,
    /// The rope of sliding-window layers where it differs (Gemma 3: base 10,000).
    pub rope_local: Option<Rope>,
    /// Factor on the token embeddings (Gemma: √width).
    pub embed_scale: Option<f32>,
    pub ffn_act: FfnAct,
    /// What new sessions store keys and values as.
    pub kv_type: KvTypes,
    /// Per layer, the largest magnitude of the key projection's bias (0 without one), which
    /// decides where 4-bit keys stay wider ([`KvTypes::for_layer`]).
    pub key_bias: Vec<f32>,
    /// Activations rounded through block formats as a pass makes them (a measurement of
    /// BCT's runtime-state compression; none by default).
    pub state: StateBlocks,
}

/// Runs `f(t)` for every token `t < n`: spread over the team for prefill-sized batches, in
/// place for a few tokens, where a parallel region costs more than these element-wise steps.
pub(super) fn each_token(n: usize, f: impl Fn(usize) + Sync) {
    const PER_TASK: usize = 16;
    if n < 2 * PER_TASK {
        (0..n).for_each(f);
        return;
    }
    crate::kernels::team::parallel_for(n.div_ceil(PER_TASK), |task| {
        (task * PER_TASK..((task + 1) * PER_TASK).min(n)).for_each(&f);
    });
}

/// Row `t` (`width` floats) of the buffer behind `p`.
///
/// # Safety
/// The row is inside the buffer, and no one else touches it while the slice lives.
pub(super) unsafe fn row_mut<'a>(p: SyncPtr, t: usize, width: usize) -> &'a mut [f32] {
    unsafe { std::slice::from_raw_parts_mut(p.get().add(t * width), width) }
}

/// RMSNorm of the first `n` rows of `x` into `out`, rows in parallel for large batches.
fn norm_rows(x: &[f32], w: &[f32], eps: f32, out: &mut [f32], n: usize, dim: usize) {
    assert!(x.len() >= n * dim && out.len() >= n * dim);
    let o = SyncPtr(out.as_mut_ptr());
    // SAFETY: token t owns row t of `out`, which holds n rows.
    each_token(n, |t| rms_norm(&x[t * dim..(t + 1) * dim], w, eps, unsafe { row_mut(o, t, dim) }));
}

/// RMSNorm of the first `n` rows of `x` in place (the norm of a block's output, Gemma).
fn norm_rows_in_place(x: &mut [f32], w: &[f32], eps: f32, n: usize, dim: usize) {
    assert!(x.len() >= n * dim);
    let p = SyncPtr(x.as_mut_ptr());
    each_token(n, |t| {
        // SAFETY: token t owns row t of `x`, which holds n rows.
        rms_norm_heads(unsafe { row_mut(p, t, dim) }, w, eps)
    });
}

/// Most queries one attention task takes: [`TOKENS_PER_ITEM`] tokens times the query heads
/// of a KV head (three for SmolLM2), under the kernel's block of 32.
const MAX_ITEM_QUERIES: usize = 24;
/// Tokens per attention task when there are many.
const TOKENS_PER_ITEM: usize = 8;
/// Fewest scores per query head for which attention is spread over the team. Decoding reads
/// every position's keys and values of the layer from memory (the weights streamed through
/// the caches since the last token evicted them), so from a few dozen positions on the second
/// core's bandwidth is worth a region's start: on the 2-core Zen 4 machine, decode attention
/// from 16 positions on took 26% less time (tg128 at r = 2, timed on the caller, rounds
/// alternated in one process; docs/KERNELS.md).
const PARALLEL_SCORES: usize = 16;

thread_local! {
    /// Attention scores of one task (a few query heads of one token), per worker thread.
    static SCORES: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// What one attention pass reads and writes besides the cache: the queries, the output rows,
/// where the new tokens start, and the tree's slot lists.
#[derive(Clone, Copy)]
struct AttendAt<'a> {
    q: &'a [f32],
    att: SyncPtr,
    start: usize,
    slots: &'a [u32],
    off: &'a [usize],
    n: usize,
    tree: bool,
}

/// How one span's attention splits into tasks ([`Llama::attend_plan`]): `blocks` of up to
/// `tokens_per` tokens, each with `per_block` tasks (a KV head's query heads, `heads_per` at
/// a time, in `head_chunks` pieces).
#[derive(Clone, Copy)]
struct AttendPlan {
    heads_per: usize,
    tokens_per: usize,
    head_chunks: usize,
    blocks: usize,
    per_block: usize,
    parallel: bool,
}

impl AttendPlan {
    fn items(&self) -> usize {
        self.blocks * self.per_block
    }
}

/// Read every plane a layer holds (no precision cap).
pub const ALL_BITS: u32 = u32::MAX;

/// How much of the model a pass reads: at most `bits` planes of every layer, and in a mixture
/// of experts at most `experts` experts per token (the router's best; `None`: as many as the
/// model uses). The full view is the model; the others draft for it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct View {
    pub bits: u32,
    pub experts: Option<usize>,
}

impl View {
    pub const FULL: View = View { bits: ALL_BITS, experts: None };
}

/// One sequence's tokens in a batched pass ([`Llama::forward_batch`]).
pub struct Span<'a> {
    pub session: &'a mut Session,
    pub tokens: &'a [u32],
    pub kind: SpanKind<'a>,
}

/// How a span's tokens relate to its sequence.
#[derive(Clone, Copy, Debug)]
pub enum SpanKind<'a> {
    /// The next tokens of the sequence, each attending to everything before it; the logits
    /// of the last `logits` of them (0: none) are computed, and the sequence advances.
    Run { logits: usize },
    /// A tree of draft tokens: node `i` holds `tokens[i]`, its parent is `parents[i]` (`None`
    /// for a root, else an earlier node), it sits at cache slot `pos + i` and position
    /// `pos + depth`, and attends to the committed sequence and its own ancestors. Every
    /// node's logits are computed; the sequence does not advance ([`Session::accept_path`]
    /// commits the nodes that verification keeps).
    Tree { parents: &'a [Option<usize>] },
}

impl Span<'_> {
    /// Rows of logits the span yields.
    pub fn logit_rows(&self) -> usize {
        match self.kind {
            SpanKind::Run { logits } => logits,
            SpanKind::Tree { .. } => self.tokens.len(),
        }
    }
}

impl Llama {
    /// A session able to hold `capacity` tokens, processing at most `max_batch` per pass, with
    /// its buffers for passes of its own allocated now.
    pub fn new_session(&self, capacity: usize, max_batch: usize) -> Session {
        let capacity = capacity.clamp(1, self.rope.max_pos());
        let mut s = Session::new(&self.config, &self.cache_layers(), capacity, max_batch.clamp(1, capacity), true);
        s.long_rope = self.long_rope(capacity);
        s
    }

    /// Whether a session of `capacity` tokens rotates with the long rope.
    fn long_rope(&self, capacity: usize) -> bool {
        self.rope_long.as_ref().is_some_and(|(_, orig)| capacity > *orig)
    }

    /// A session whose passes mostly run batched with others, on a shared [`Scratch`]: its
    /// own buffers are allocated only if it runs a pass alone.
    pub fn new_batched_session(&self, capacity: usize, max_batch: usize) -> Session {
        let capacity = capacity.clamp(1, self.rope.max_pos());
        let mut s = Session::new(&self.config, &self.cache_layers(), capacity, max_batch.clamp(1, capacity), false);
        s.long_rope = self.long_rope(capacity);
        s
    }

    /// The types every layer of a new session's cache stores keys and values as.
    pub fn cache_layers(&self) -> Vec<(KvType, KvType)> {
        self.kv_type.per_layer(self.config.n_layers, &self.key_bias)
    }

    /// Buffers for batched passes of up to `rows` tokens (they grow when a pass needs more).
    pub fn new_scratch(&self, rows: usize) -> Scratch {
        Scratch::new(&self.config, rows)
    }

    /// Runs `tokens` at positions `s.pos..` and returns the logits of the last `n_logits` of
    /// them (`n_logits × vocab`, row-major). Long inputs are split into `max_batch` chunks.
    pub fn forward<'s>(&self, s: &'s mut Session, tokens: &[u32], n_logits: usize) -> Result<&'s [f32]> {
        self.forward_capped(s, tokens, n_logits, ALL_BITS)
    }

    /// [`Llama::forward`] reading at most `max_bits` planes of every layer: the low-precision
    /// view of the same weights, which drafts tokens for the full view.
    pub fn forward_capped<'s>(
        &self,
        s: &'s mut Session,
        tokens: &[u32],
        n_logits: usize,
        max_bits: u32,
    ) -> Result<&'s [f32]> {
        self.forward_view(s, tokens, n_logits, View { bits: max_bits, experts: None })
    }

    /// [`Llama::forward`] through a cheaper view of the same weights: fewer planes, and in a
    /// mixture of experts fewer experts per token.
    pub fn forward_view<'s>(
        &self,
        s: &'s mut Session,
        tokens: &[u32],
        n_logits: usize,
        view: View,
    ) -> Result<&'s [f32]> {
        self.check_tokens(s, tokens)?;
        ensure!(n_logits <= tokens.len(), "asked for {n_logits} logit rows from {} tokens", tokens.len());
        let mut sc = std::mem::take(&mut s.scratch);
        sc.reserve(&self.config, s.max_batch().min(tokens.len()), n_logits);
        let first_logit = tokens.len() - n_logits;
        let mut done = 0;
        for chunk in tokens.chunks(s.max_batch()) {
            // The rows of this chunk whose logits were asked for, after those of earlier chunks.
            let logits = (done + chunk.len()).saturating_sub(first_logit.max(done));
            let at = done.saturating_sub(first_logit);
            let mut span = [Span { session: &mut *s, tokens: chunk, kind: SpanKind::Run { logits } }];
            self.pass(&mut sc, &mut span, view, at);
            done += chunk.len();
        }
        s.scratch = sc;
        Ok(&s.scratch.logits[..n_logits * self.config.vocab_size])
    }

    /// One pass over a tree of draft tokens ([`SpanKind::Tree`]) of `s`, returning every
    /// node's logits (`nodes × vocab`).
    ///
    /// A node's logits equal, bit for bit, those plain decoding computes for the same tokens,
    /// since every layer is batch invariant and attention visits the same positions in order.
    pub fn forward_tree<'s>(
        &self,
        s: &'s mut Session,
        tokens: &[u32],
        parents: &[Option<usize>],
        max_bits: u32,
    ) -> Result<&'s [f32]> {
        let n = tokens.len();
        ensure!(n <= s.max_batch(), "a tree of {n} nodes exceeds the batch size {}", s.max_batch());
        let mut sc = std::mem::take(&mut s.scratch);
        let r = self
            .forward_batch(
                &mut sc,
                &mut [Span { session: &mut *s, tokens, kind: SpanKind::Tree { parents } }],
                max_bits,
            )
            .map(|_| ());
        s.scratch = sc;
        r?;
        Ok(&s.scratch.logits[..n * self.config.vocab_size])
    }

    /// One pass over the spans of several sequences: the linear layers run once over all
    /// their tokens stacked, attention per sequence over its own cache. Returns the spans'
    /// logits in order ([`Span::logit_rows`] rows each). Every row is what its sequence would
    /// get alone, bit for bit: every layer is batch invariant.
    pub fn forward_batch<'a>(&self, sc: &'a mut Scratch, spans: &mut [Span], max_bits: u32) -> Result<&'a [f32]> {
        ensure!(!spans.is_empty(), "a batched pass needs at least one span");
        for (i, sp) in spans.iter().enumerate() {
            self.check_tokens(sp.session, sp.tokens)?;
            if spans[..i].iter().any(|o| std::ptr::eq(&*o.session, &*sp.session)) {
                anyhow::bail!("two spans of one batched pass share a session");
            }
            // Sliding-window caches hold the window and two passes of the session's size.
            ensure!(
                self.config.sliding_window.is_none() || sp.tokens.len() <= sp.session.max_batch(),
                "a span of {} tokens exceeds its session's batch size {}",
                sp.tokens.len(),
                sp.session.max_batch()
            );
            match sp.kind {
                SpanKind::Run { logits } => {
                    ensure!(logits <= sp.tokens.len(), "asked for {logits} logit rows from {} tokens", sp.tokens.len())
                }
                SpanKind::Tree { parents } => {
                    ensure!(
                        parents.len() == sp.tokens.len(),
                        "{} parents for {} tree nodes",
                        parents.len(),
                        sp.tokens.len()
                    );
                    if let Some((i, p)) = parents.iter().enumerate().find(|&(i, p)| p.is_some_and(|p| p >= i)) {
                        anyhow::bail!("tree node {i} has parent {}, which does not come before it", p.unwrap_or(0));
                    }
                }
            }
        }
        let logit_rows: usize = spans.iter().map(Span::logit_rows).sum();
        self.pass(sc, spans, View { bits: max_bits, experts: None }, 0);
        Ok(&sc.logits[..logit_rows * self.config.vocab_size])
    }

    fn check_tokens(&self, s: &Session, tokens: &[u32]) -> Result<()> {
        let c = &self.config;
        ensure!(!tokens.is_empty(), "forward needs at least one token");
        ensure!(
            tokens.len() <= s.room(),
            "context full: {} tokens already, {} more would exceed the context size {}",
            s.pos,
            tokens.len(),
            s.capacity()
        );
        if let Some(&bad) = tokens.iter().find(|&&t| t as usize >= c.vocab_size) {
            anyhow::bail!("token id {bad} is outside the vocabulary of {}", c.vocab_size);
        }
        Ok(())
    }

    /// A checked batch through the model: positions and tree slots, the blocks, the head (its
    /// logit rows from row `logits_at` of `sc.logits` on), and the runs' sequences advanced.
    fn pass(&self, sc: &mut Scratch, spans: &mut [Span], view: View, logits_at: usize) {
        let c = &self.config;
        let rows: usize = spans.iter().map(|s| s.tokens.len()).sum();
        sc.reserve(c, rows, logits_at + spans.iter().map(Span::logit_rows).sum::<usize>());
        sc.positions.clear();
        sc.long_rope.clear();
        sc.head_rows.clear();
        let mut row = 0;
        for sp in spans.iter_mut() {
            let (s, n) = (&mut *sp.session, sp.tokens.len());
            if self.rope_long.is_some() {
                sc.long_rope.extend(std::iter::repeat_n(s.long_rope, n));
            }
            match sp.kind {
                SpanKind::Run { logits } => {
                    sc.positions.extend(s.pos..s.pos + n);
                    sc.head_rows.extend(row + n - logits..row + n);
                }
                SpanKind::Tree { parents } => {
                    s.tree_slots.clear();
                    s.tree_off.clear();
                    s.tree_off.push(0);
                    for (i, p) in parents.iter().enumerate() {
                        match *p {
                            Some(p) => {
                                let (a, b) = (s.tree_off[p], s.tree_off[p + 1]);
                                s.tree_slots.extend_from_within(a..b);
                                sc.positions.push(sc.positions[row + p] + 1);
                            }
                            None => sc.positions.push(s.pos),
                        }
                        s.tree_slots.push((s.pos + i) as u32);
                        s.tree_off.push(s.tree_slots.len());
                    }
                    sc.head_rows.extend(row..row + n);
                }
            }
            row += n;
        }
        self.blocks_pass(sc, spans, view);
        self.head_rows(sc, logits_at, view.bits);
        for sp in spans.iter_mut() {
            if let SpanKind::Run { .. } = sp.kind {
                sp.session.pos += sp.tokens.len();
            }
        }
    }

    /// Final norm and output head over the hidden rows `sc.head_rows` of `sc.x`, into logit
    /// rows from `at` on.
    fn head_rows(&self, sc: &mut Scratch, at: usize, max_bits: u32) {
        let c = &self.config;
        let n = sc.head_rows.len();
        if n == 0 {
            return;
        }
        for (i, &row) in sc.head_rows.iter().enumerate() {
            let src = &sc.x[row * c.dim..(row + 1) * c.dim];
            rms_norm(src, &self.norm, c.rms_eps, &mut sc.tmp[i * c.dim..(i + 1) * c.dim]);
        }
        let out = &mut sc.logits[at * c.vocab_size..(at + n) * c.vocab_size];
        self.head.forward_capped(&sc.tmp, n, out, max_bits);
    }

    /// The blocks over every span's tokens, stacked in `sc` (positions in `sc.positions`);
    /// leaves the final hidden states in `sc.x`. A run's tokens attend to everything before
    /// them; a tree's to the prefix and their ancestors.
    fn blocks_pass(&self, sc: &mut Scratch, spans: &mut [Span], view: View) {
        let max_bits = view.bits;
        let c = &self.config;
        let n: usize = spans.iter().map(|s| s.tokens.len()).sum();
        let (dim, kv_dim, hd) = (c.dim, c.kv_dim(), c.head_dim);
        let q_dim = c.n_heads * hd;
        for (t, &tok) in spans.iter().flat_map(|s| s.tokens).enumerate() {
            self.embed.row(tok as usize, &mut sc.x[t * dim..(t + 1) * dim]);
        }
        if let Some(f) = self.embed_scale {
            sc.x[..n * dim].iter_mut().for_each(|x| *x *= f);
        }
        let st = self.state;
        state::apply(st.embed, &mut sc.x[..n * dim]);
        for (l, b) in self.blocks.iter().enumerate() {
            // Attention.
            norm_rows(&sc.x, &b.attn_norm, c.rms_eps, &mut sc.xn, n, dim);
            state::apply(st.norm, &mut sc.xn[..n * dim]);
            // One quantization of the input and one parallel region for all three.
            forward_shared(&[&*b.wq, &*b.wk, &*b.wv], &sc.xn, n, &mut [&mut sc.q, &mut sc.k, &mut sc.v], max_bits);
            assert!(
                sc.q.len() >= n * q_dim && sc.k.len() >= n * kv_dim && sc.gate.len() >= n.min(FFN_ROWS) * c.ffn_width()
            );
            let (q, k) = (SyncPtr(sc.q.as_mut_ptr()), SyncPtr(sc.k.as_mut_ptr()));
            let (positions, long_rope) = (&sc.positions, &sc.long_rope);
            each_token(n, |t| {
                // SAFETY: token t owns row t of the query and key buffers.
                let (q, k) = unsafe { (row_mut(q, t, q_dim), row_mut(k, t, kv_dim)) };
                if let Some(w) = &b.q_norm {
                    rms_norm_heads(q, w, c.rms_eps);
                }
                if let Some(w) = &b.k_norm {
                    rms_norm_heads(k, w, c.rms_eps);
                }
                let rope = match (&self.rope_long, &self.rope_local) {
                    (Some((long, _)), _) if long_rope[t] => long,
                    (_, Some(local)) if b.window.is_some() => local,
                    _ => &self.rope,
                };
                rope.apply(q, positions[t]);
                rope.apply(k, positions[t]);
            });
            let mut row = 0;
            for sp in spans.iter_mut() {
                let (s, m) = (&mut *sp.session, sp.tokens.len());
                let rows = row * kv_dim..(row + m) * kv_dim;
                s.kv.store(l, s.pos, &sc.k[rows.clone()], &sc.v[rows]);
                row += m;
            }
            self.attention(sc, spans, l);
            state::apply(st.attn_out, &mut sc.att[..n * q_dim]);
            b.wo.forward_capped(&sc.att, n, &mut sc.tmp, max_bits);
            if let Some(w) = &b.post_attn_norm {
                norm_rows_in_place(&mut sc.tmp, w, c.rms_eps, n, dim);
            }
            sc.x[..n * dim].iter_mut().zip(&sc.tmp).for_each(|(x, d)| *x += d);
            state::apply(st.residual, &mut sc.x[..n * dim]);

            // MLP.
            norm_rows(&sc.x, &b.ffn_norm, c.rms_eps, &mut sc.xn, n, dim);
            state::apply(st.norm, &mut sc.xn[..n * dim]);
            let act = match self.ffn_act {
                FfnAct::Silu => silu_mul,
                FfnAct::GeluTanh => gelu_tanh_mul,
            };
            let mut pass = FfnPass { gate: &mut sc.gate, up: &mut sc.up, act, mid: st.ffn_mid, max_bits };
            match &b.ffn {
                Ffn::Dense(mlp) => mlp.forward(&sc.xn, n, &mut sc.tmp, &mut pass),
                Ffn::Moe(moe) => {
                    let k = view.experts.map_or(moe.used, |k| k.min(moe.used));
                    moe.forward(&mut sc.moe, &sc.xn, n, k, &mut sc.tmp, &mut pass)
                }
            }
            if let Some(w) = &b.post_ffn_norm {
                norm_rows_in_place(&mut sc.tmp, w, c.rms_eps, n, dim);
            }
            sc.x[..n * dim].iter_mut().zip(&sc.tmp).for_each(|(x, d)| *x += d);
            state::apply(st.residual, &mut sc.x[..n * dim]);
        }
    }

    /// Attention of every span's new tokens (already in the caches), each over its own
    /// sequence: causal over everything before them, or for a tree, over the prefix and each
    /// node's ancestors. The (KV head, tokens) tasks of all the spans share one parallel
    /// region, so that a step of many one-token sequences keeps every thread busy.
    fn attention(&self, sc: &mut Scratch, spans: &[Span], layer: usize) {
        let att = SyncPtr(sc.att.as_mut_ptr());
        let mut row = 0;
        let q = &sc.q[..];
        let part = |sp, row| self.attend_part(q, att, sp, row, layer);
        if let [sp] = spans {
            let (kv, cache, at, plan) = part(sp, 0);
            let work = |item| self.attend_item(kv, cache, &at, &plan, item);
            if plan.parallel {
                crate::kernels::team::parallel_for(plan.items(), work);
            } else {
                (0..plan.items()).for_each(work);
            }
            return;
        }
        let mut parts = Vec::with_capacity(spans.len());
        let mut ends = Vec::with_capacity(spans.len());
        let (mut items, mut parallel) = (0, false);
        for sp in spans {
            let p = part(sp, row);
            row += sp.tokens.len();
            items += p.3.items();
            parallel |= p.3.parallel;
            ends.push(items);
            parts.push(p);
        }
        let work = |item: usize| {
            let i = ends.partition_point(|&e| e <= item);
            let (kv, cache, at, plan) = &parts[i];
            let first = if i == 0 { 0 } else { ends[i - 1] };
            self.attend_item(kv, *cache, at, plan, item - first);
        };
        if parallel {
            crate::kernels::team::parallel_for(items, work);
        } else {
            (0..items).for_each(work);
        }
    }

    /// The cache, its layer's range, the queries and outputs and the task plan of span `sp`,
    /// whose rows start at `row`.
    fn attend_part<'a>(
        &self,
        q: &'a [f32],
        att: SyncPtr,
        sp: &'a Span<'_>,
        row: usize,
        layer: usize,
    ) -> (&'a KvCache, usize, AttendAt<'a>, AttendPlan) {
        let q_dim = self.config.n_heads * self.config.head_dim;
        let (s, n) = (&*sp.session, sp.tokens.len());
        let at = AttendAt {
            q: &q[row * q_dim..(row + n) * q_dim],
            // SAFETY (of the later writes): rows row..row + n of `att` belong to this span.
            att: SyncPtr(unsafe { att.get().add(row * q_dim) }),
            start: s.pos,
            slots: &s.tree_slots,
            off: &s.tree_off,
            n,
            tree: matches!(sp.kind, SpanKind::Tree { .. }),
        };
        (&s.kv, layer, at, self.attend_plan(&at))
    }

    /// How the attention of one span splits into tasks. Short work (the first tokens of a
    /// context) runs on this thread. Each task takes all the query heads of a KV head: they
    /// share each key and value row the kernel reads (at long context those come from
    /// memory), and their sums are independent chains that hide each other's latency. Only
    /// when there are fewer (KV head, token) items than threads does a task take a single
    /// query head. Many tokens (prefill) go up to [`TOKENS_PER_ITEM`] to a task, so that all
    /// their query heads share each key; the latest tokens, which see the most positions, come
    /// first so that the team finishes together. Every query gets the same result whatever
    /// the split ([`attend_group`]).
    fn attend_plan(&self, at: &AttendAt) -> AttendPlan {
        let c = &self.config;
        let group = c.n_heads / c.n_kv_heads;
        let (n, start, tree) = (at.n, at.start, at.tree);
        let parallel = n * (start + n) >= PARALLEL_SCORES;
        let split = parallel && n * c.n_kv_heads < rayon::current_num_threads();
        let (heads_per, tokens_per) = if split {
            (1, 1)
        } else {
            let hp = group.div_ceil(group.div_ceil(MAX_ITEM_QUERIES));
            let most = (MAX_ITEM_QUERIES / hp).clamp(1, TOKENS_PER_ITEM);
            // A verification tree's nodes share the whole prefix: the more of them a task
            // takes, the fewer times each key is read and widened (a third less time per
            // score at 1016 positions for four or eight nodes, `examples/attention_cost`), as
            // long as every thread still gets a task.
            let per = if tree { n.div_ceil(rayon::current_num_threads()) } else { n / 4 };
            (hp, most.min(per.max(1)))
        };
        let head_chunks = group.div_ceil(heads_per);
        AttendPlan {
            heads_per,
            tokens_per,
            head_chunks,
            blocks: n.div_ceil(tokens_per),
            per_block: c.n_kv_heads * head_chunks,
            parallel,
        }
    }

    /// Task `item` of a span's attention planned as `p`, over the layer's part `cache` of `kv`.
    fn attend_item(&self, kv: &KvCache, layer: usize, at: &AttendAt, p: &AttendPlan, item: usize) {
        let c = &self.config;
        let (hd, kv_dim) = (c.head_dim, c.kv_dim());
        let scale = c.query_scale.unwrap_or(1.0 / (hd as f32).sqrt());
        let window = self.blocks[layer].window;
        // The layer's slot 0 holds position `base` (a sliding-window layer's rows move down).
        let base = kv.base[layer];
        match &kv.layers[layer] {
            (Side::F16(k), Side::F16(v)) => self.attend_task(at, p, item, window, |g, from, qs, sc| {
                let head = HeadView { keys: k, values: v, stride: kv_dim, offset: g * hd };
                attend_group(head.skip(from - base), scale, qs, sc)
            }),
            (Side::F32(k), Side::F32(v)) => self.attend_task(at, p, item, window, |g, from, qs, sc| {
                let head = HeadView { keys: k, values: v, stride: kv_dim, offset: g * hd };
                attend_group(head.skip(from - base), scale, qs, sc)
            }),
            // Block formats, or keys and values of different types.
            _ => self.attend_task(at, p, item, window, |g, from, qs, sc| {
                let (keys, values) = kv.views(layer, g);
                attend_group_blocks(keys.skip(from - base), values.skip(from - base), scale, qs, sc)
            }),
        }
    }

    /// [`Llama::attend_item`]'s queries of KV head `g`, attended by `attend(g, from, queries,
    /// scores)` over the layer's cache of whichever type from position `from` on (0 but in a
    /// sliding-window layer, whose tokens see only the last `window` positions: the task then
    /// runs once per group of its tokens that share a window start, with their cache
    /// positions counted from it).
    fn attend_task(
        &self,
        at: &AttendAt,
        p: &AttendPlan,
        item: usize,
        window: Option<usize>,
        mut attend: impl FnMut(usize, usize, &mut [Query], &mut [f32]),
    ) {
        let c = &self.config;
        let hd = c.head_dim;
        let q_dim = c.n_heads * hd;
        let group = c.n_heads / c.n_kv_heads;
        let AttendAt { q, att, start, slots, off, n, tree } = *at;
        let b = p.blocks - 1 - item / p.per_block;
        let (g, hc) = (item % p.per_block / p.head_chunks, item % p.head_chunks);
        let (t0, t1) = (b * p.tokens_per, ((b + 1) * p.tokens_per).min(n));
        let heads = hc * p.heads_per..((hc + 1) * p.heads_per).min(group);
        // A token's position (a tree node's is the prefix's end plus its depth) and the first
        // position it sees.
        let pos = |t: usize| if tree { start + off[t + 1] - off[t] - 1 } else { start + t };
        // (A tree deeper than the window would still see its whole own path.)
        let from_of = |t: usize| {
            let from = window.map_or(0, |w| (pos(t) + 1).saturating_sub(w));
            if tree { from.min(start) } else { from }
        };
        let mut t = t0;
        while t < t1 {
            let from = from_of(t);
            let e = (t + 1..t1).find(|&e| from_of(e) != from).unwrap_or(t1);
            // A tree's own slots, counted from the window's start (they all lie past it, the
            // tree being shallower than the window).
            let shifted: Vec<u32> = if tree && from > 0 {
                slots[off[t]..off[e]].iter().map(|&s| s - from as u32).collect()
            } else {
                Vec::new()
            };
            // The run's queries (a fixed array: no allocation).
            let mut qs: [Query; MAX_ITEM_QUERIES] = Default::default();
            let mut m = 0;
            for u in t..e {
                let (prefix, extra) = match (tree, shifted.is_empty()) {
                    (false, _) => (start + u + 1, &[][..]),
                    (true, true) => (start, &slots[off[u]..off[u + 1]]),
                    (true, false) => (start, &shifted[off[u] - off[t]..off[u + 1] - off[t]]),
                };
                for j in heads.clone() {
                    let h = g * group + j;
                    let at = u * q_dim + h * hd;
                    // SAFETY: (token u, head h) owns columns [h·hd, (h+1)·hd) of att row u; u < n.
                    let out = unsafe { std::slice::from_raw_parts_mut(att.get().add(at), hd) };
                    qs[m] = Query { q: &q[at..at + hd], prefix: prefix - from, extra, out };
                    m += 1;
                }
            }
            SCORES.with_borrow_mut(|sc| {
                let need: usize = qs[..m].iter().map(|q| q.prefix + q.extra.len()).sum();
                if sc.len() < need {
                    // Grows rarely: never below 64 Ki floats, then to a power of two.
                    sc.resize(need.next_power_of_two().max(1 << 16), 0.0);
                }
                attend(g, from, &mut qs[..m], sc);
            });
            t = e;
        }
    }

    /// The most planes any layer reads, for bit-plane models (`None` when no layer is one):
    /// a precision cap below it makes a cheaper, lower-precision view of the same model.
    pub fn bits(&self) -> Option<u32> {
        let layers = self.blocks.iter().flat_map(|b| b.linears().into_iter().map(|(_, l)| l));
        layers.filter_map(|l| l.bits()).chain(self.head.bits()).max()
    }

    /// Experts each token runs, in a mixture-of-experts model.
    pub fn experts_used(&self) -> Option<usize> {
        self.config.moe.map(|m| m.used)
    }

    /// Runs `k` experts per token instead of the number the model was trained with (llama.cpp's
    /// `--override-kv ARCH.expert_used_count=int:K`): fewer is cheaper and less accurate.
    pub fn set_experts_used(&mut self, k: usize) -> Result<()> {
        let Some(m) = &mut self.config.moe else { anyhow::bail!("--experts: this model is not a mixture of experts") };
        ensure!((1..=m.experts).contains(&k), "--experts {k}: the model has {} experts", m.experts);
        m.used = k;
        for b in &mut self.blocks {
            if let Ffn::Moe(moe) = &mut b.ffn {
                moe.used = k;
            }
        }
        Ok(())
    }

    /// Total bytes of weights (embedding table counted once even when tied).
    pub fn weight_bytes(&self) -> usize {
        let blocks: usize = self
            .blocks
            .iter()
            .map(|b| {
                b.linears().iter().map(|(_, l)| l.weight_bytes()).sum::<usize>()
                    + (b.attn_norm.len() + b.ffn_norm.len()) * 4
            })
            .sum();
        let tied = std::ptr::addr_eq(Arc::as_ptr(&self.head), Arc::as_ptr(&self.embed));
        let head = if tied { 0 } else { self.head.weight_bytes() };
        blocks + self.embed.weight_bytes() + head + self.norm.len() * 4
    }
}

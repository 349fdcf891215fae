//! The llama-family transformer (llama, Mistral, Qwen2): embeddings → blocks → output head.
//!
//! Read top to bottom, [`Llama::forward`] is the whole model. The weights are immutable and
//! shared; everything that changes while decoding lives in a [`Session`] (KV cache and scratch
//! buffers sized once), so the decode loop allocates nothing per token.

use std::sync::Arc;

use anyhow::{Result, ensure};

use super::config::LlamaConfig;
use crate::kernels::attention::{HeadView, KvElem, Query, attend_group};
use crate::kernels::ops::{Rope, rms_norm, silu_mul};
use crate::kernels::{Linear, SyncPtr, forward_shared};

/// One transformer block: pre-norm attention and pre-norm SiLU-gated MLP, both residual.
pub struct Block {
    pub attn_norm: Vec<f32>,
    pub wq: Box<dyn Linear>,
    pub wk: Box<dyn Linear>,
    pub wv: Box<dyn Linear>,
    pub wo: Box<dyn Linear>,
    pub ffn_norm: Vec<f32>,
    pub w_gate: Box<dyn Linear>,
    pub w_up: Box<dyn Linear>,
    pub w_down: Box<dyn Linear>,
}

pub struct Llama {
    pub config: LlamaConfig,
    /// Token embedding table, `vocab × dim`; shared with the head when the model ties them.
    pub embed: Arc<dyn Linear>,
    pub blocks: Vec<Block>,
    pub norm: Vec<f32>,
    pub head: Arc<dyn Linear>,
    pub rope: Rope,
    /// What new sessions store keys and values as.
    pub kv_type: KvType,
}

/// The element type of a session's KV cache (llama.cpp's `--cache-type-k/v`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum KvType {
    /// Half the bytes of `f32`; what llama.cpp stores by default. Attention reads every cached
    /// position of a layer from memory for each decoded token, so this halves its traffic.
    #[default]
    F16,
    /// Exact copies of the computed keys and values.
    F32,
}

impl KvType {
    /// Bytes of one cached key or value element.
    pub fn elem_bytes(self) -> usize {
        match self {
            KvType::F16 => 2,
            KvType::F32 => 4,
        }
    }

    /// The name the command line and JSON reports use.
    pub fn name(self) -> &'static str {
        match self {
            KvType::F16 => "f16",
            KvType::F32 => "f32",
        }
    }
}

/// Keys and values of every layer, `layer × capacity × kv_dim` each.
enum KvCache {
    F16 { k: Vec<half::f16>, v: Vec<half::f16> },
    F32 { k: Vec<f32>, v: Vec<f32> },
}

impl KvCache {
    fn new(kind: KvType, len: usize) -> KvCache {
        match kind {
            KvType::F16 => KvCache::F16 { k: vec![half::f16::ZERO; len], v: vec![half::f16::ZERO; len] },
            KvType::F32 => KvCache::F32 { k: vec![0.0; len], v: vec![0.0; len] },
        }
    }

    fn len(&self) -> usize {
        match self {
            KvCache::F16 { k, .. } => k.len(),
            KvCache::F32 { k, .. } => k.len(),
        }
    }

    fn bytes(&self) -> usize {
        match self {
            KvCache::F16 { k, v } => (k.len() + v.len()) * KvType::F16.elem_bytes(),
            KvCache::F32 { k, v } => (k.len() + v.len()) * KvType::F32.elem_bytes(),
        }
    }

    /// Stores `keys` and `values` (as many floats each) from element `at` on.
    fn store(&mut self, at: usize, keys: &[f32], values: &[f32]) {
        let n = keys.len();
        match self {
            KvCache::F16 { k, v } => {
                KvElem::store(&mut k[at..at + n], keys);
                KvElem::store(&mut v[at..at + n], values);
            }
            KvCache::F32 { k, v } => {
                KvElem::store(&mut k[at..at + n], keys);
                KvElem::store(&mut v[at..at + n], values);
            }
        }
    }

    /// Copies `len` elements of keys and values from `from` to `to`.
    fn copy_within(&mut self, from: usize, len: usize, to: usize) {
        match self {
            KvCache::F16 { k, v } => {
                k.copy_within(from..from + len, to);
                v.copy_within(from..from + len, to);
            }
            KvCache::F32 { k, v } => {
                k.copy_within(from..from + len, to);
                v.copy_within(from..from + len, to);
            }
        }
    }
}

/// Per-sequence state: KV cache, position and reusable buffers.
pub struct Session {
    /// Tokens processed so far (the next token's position).
    pub pos: usize,
    capacity: usize,
    max_batch: usize,
    kv: KvCache,
    x: Vec<f32>,
    xn: Vec<f32>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    att: Vec<f32>,
    tmp: Vec<f32>,
    gate: Vec<f32>,
    up: Vec<f32>,
    logits: Vec<f32>,
    /// Tree passes: each node's position, and the cache slots of its ancestors and itself
    /// (`tree_slots[tree_off[i]..tree_off[i + 1]]`, increasing).
    positions: Vec<usize>,
    tree_slots: Vec<u32>,
    tree_off: Vec<usize>,
}

/// Runs `f(t)` for every token `t < n`: spread over the team for prefill-sized batches, in
/// place for a few tokens, where a parallel region costs more than these element-wise steps.
fn each_token(n: usize, f: impl Fn(usize) + Sync) {
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
unsafe fn row_mut<'a>(p: SyncPtr, t: usize, width: usize) -> &'a mut [f32] {
    unsafe { std::slice::from_raw_parts_mut(p.get().add(t * width), width) }
}

/// RMSNorm of the first `n` rows of `x` into `out`, rows in parallel for large batches.
fn norm_rows(x: &[f32], w: &[f32], eps: f32, out: &mut [f32], n: usize, dim: usize) {
    assert!(x.len() >= n * dim && out.len() >= n * dim);
    let o = SyncPtr(out.as_mut_ptr());
    // SAFETY: token t owns row t of `out`, which holds n rows.
    each_token(n, |t| rms_norm(&x[t * dim..(t + 1) * dim], w, eps, unsafe { row_mut(o, t, dim) }));
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

/// Read every plane a layer holds (no precision cap).
pub const ALL_BITS: u32 = u32::MAX;

impl Session {
    pub fn capacity(&self) -> usize {
        self.capacity
    }
    /// Forgets the sequence; the buffers are kept.
    pub fn reset(&mut self) {
        self.pos = 0;
    }
    /// Drops the tail of the sequence after `pos` (the cache beyond it is simply overwritten).
    pub fn truncate(&mut self, pos: usize) {
        self.pos = self.pos.min(pos);
    }
    /// Largest number of tokens (or tree nodes) one pass takes.
    pub fn max_batch(&self) -> usize {
        self.max_batch
    }
    /// Commits the tree nodes `path` (indices into the last [`Llama::forward_tree`] pass,
    /// increasing, each the parent of the next) as the next tokens of the sequence: their keys
    /// and values move to consecutive positions, where plain decoding would have put them.
    pub fn accept_path(&mut self, path: &[usize], layers: usize) {
        let kv_dim = self.kv.len() / (layers * self.capacity).max(1);
        for (i, &node) in path.iter().enumerate() {
            debug_assert!(node >= i, "path nodes are increasing");
            if node == i {
                continue;
            }
            for l in 0..layers {
                let base = l * self.capacity * kv_dim;
                let (from, to) = (base + (self.pos + node) * kv_dim, base + (self.pos + i) * kv_dim);
                self.kv.copy_within(from, kv_dim, to);
            }
        }
        self.pos += path.len();
    }
    /// Bytes held by the KV cache.
    pub fn kv_bytes(&self) -> usize {
        self.kv.bytes()
    }
}

impl Llama {
    /// A session able to hold `capacity` tokens, processing at most `max_batch` per pass.
    pub fn new_session(&self, capacity: usize, max_batch: usize) -> Session {
        let c = &self.config;
        let capacity = capacity.clamp(1, self.rope.max_pos());
        let b = max_batch.clamp(1, capacity);
        let q_dim = c.n_heads * c.head_dim;
        Session {
            pos: 0,
            capacity,
            max_batch: b,
            kv: KvCache::new(self.kv_type, c.n_layers * capacity * c.kv_dim()),
            x: vec![0.0; b * c.dim],
            xn: vec![0.0; b * c.dim],
            q: vec![0.0; b * q_dim],
            k: vec![0.0; b * c.kv_dim()],
            v: vec![0.0; b * c.kv_dim()],
            att: vec![0.0; b * q_dim],
            tmp: vec![0.0; b * c.dim],
            gate: vec![0.0; b * c.ffn_dim],
            up: vec![0.0; b * c.ffn_dim],
            logits: vec![0.0; c.vocab_size],
            positions: Vec::with_capacity(b),
            tree_slots: Vec::new(),
            tree_off: Vec::with_capacity(b + 1),
        }
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
        let c = &self.config;
        self.check_tokens(s, tokens)?;
        ensure!(n_logits <= tokens.len(), "asked for {n_logits} logit rows from {} tokens", tokens.len());
        let need = n_logits * c.vocab_size;
        if s.logits.len() < need {
            s.logits.resize(need, 0.0);
        }
        let first_logit = tokens.len() - n_logits;
        let mut done = 0;
        for chunk in tokens.chunks(s.max_batch) {
            s.positions.clear();
            s.positions.extend(s.pos..s.pos + chunk.len());
            self.forward_chunk(s, chunk, max_bits, false);
            s.pos += chunk.len();
            // Head over the rows of this chunk whose logits were asked for.
            let lo = first_logit.max(done);
            let hi = done + chunk.len();
            if lo < hi {
                self.head_rows(s, lo - done..hi - done, lo - first_logit, max_bits);
            }
            done = hi;
        }
        Ok(&s.logits[..need])
    }

    /// One pass over a tree of draft tokens: node `i` holds `tokens[i]`, its parent is
    /// `parents[i]` (`None` for a root, else an earlier node), it sits at cache slot
    /// `s.pos + i` and position `s.pos + depth`, and attends to the committed sequence and its
    /// own ancestors. Returns every node's logits (`nodes × vocab`). The sequence does not
    /// advance; [`Session::accept_path`] commits the nodes that verification keeps.
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
        let c = &self.config;
        self.check_tokens(s, tokens)?;
        let n = tokens.len();
        ensure!(parents.len() == n, "{} parents for {n} tree nodes", parents.len());
        ensure!(n <= s.max_batch, "a tree of {n} nodes exceeds the batch size {}", s.max_batch);
        s.positions.clear();
        s.tree_slots.clear();
        s.tree_off.clear();
        s.tree_off.push(0);
        for (i, p) in parents.iter().enumerate() {
            let start = s.tree_slots.len();
            match *p {
                Some(p) => {
                    ensure!(p < i, "tree node {i} has parent {p}, which does not come before it");
                    let (a, b) = (s.tree_off[p], s.tree_off[p + 1]);
                    s.tree_slots.extend_from_within(a..b);
                    s.positions.push(s.positions[p] + 1);
                }
                None => s.positions.push(s.pos),
            }
            s.tree_slots.push((s.pos + i) as u32);
            debug_assert_eq!(s.tree_slots.len() - start, s.positions[i] - s.pos + 1);
            s.tree_off.push(s.tree_slots.len());
        }
        let need = n * c.vocab_size;
        if s.logits.len() < need {
            s.logits.resize(need, 0.0);
        }
        self.forward_chunk(s, tokens, max_bits, true);
        self.head_rows(s, 0..n, 0, max_bits);
        Ok(&s.logits[..need])
    }

    fn check_tokens(&self, s: &Session, tokens: &[u32]) -> Result<()> {
        let c = &self.config;
        ensure!(!tokens.is_empty(), "forward needs at least one token");
        ensure!(
            s.pos + tokens.len() <= s.capacity,
            "context full: {} tokens already, {} more would exceed the context size {}",
            s.pos,
            tokens.len(),
            s.capacity
        );
        if let Some(&bad) = tokens.iter().find(|&&t| t as usize >= c.vocab_size) {
            anyhow::bail!("token id {bad} is outside the vocabulary of {}", c.vocab_size);
        }
        Ok(())
    }

    /// Final norm and output head over hidden rows `rows` of `s.x`, into logit rows from `at`.
    fn head_rows(&self, s: &mut Session, rows: std::ops::Range<usize>, at: usize, max_bits: u32) {
        let c = &self.config;
        let n = rows.len();
        for (i, row) in rows.enumerate() {
            let src = &s.x[row * c.dim..(row + 1) * c.dim];
            rms_norm(src, &self.norm, c.rms_eps, &mut s.tmp[i * c.dim..(i + 1) * c.dim]);
        }
        let out = &mut s.logits[at * c.vocab_size..(at + n) * c.vocab_size];
        self.head.forward_capped(&s.tmp, n, out, max_bits);
    }

    /// One pass over at most `max_batch` tokens at slots `s.pos..` and positions
    /// `s.positions`; leaves the final hidden states in `s.x`. With `tree`, each token attends
    /// to the prefix and its `tree_slots`; otherwise to everything before it.
    fn forward_chunk(&self, s: &mut Session, tokens: &[u32], max_bits: u32, tree: bool) {
        let c = &self.config;
        let n = tokens.len();
        let (dim, kv_dim, hd) = (c.dim, c.kv_dim(), c.head_dim);
        let q_dim = c.n_heads * hd;
        for (t, &tok) in tokens.iter().enumerate() {
            self.embed.row(tok as usize, &mut s.x[t * dim..(t + 1) * dim]);
        }
        for (l, b) in self.blocks.iter().enumerate() {
            // Attention.
            norm_rows(&s.x, &b.attn_norm, c.rms_eps, &mut s.xn, n, dim);
            // One quantization of the input and one parallel region for all three.
            forward_shared(&[&*b.wq, &*b.wk, &*b.wv], &s.xn, n, &mut [&mut s.q, &mut s.k, &mut s.v], max_bits);
            let layer_base = l * s.capacity * kv_dim;
            assert!(s.q.len() >= n * q_dim && s.k.len() >= n * kv_dim && s.gate.len() >= n * c.ffn_dim);
            let (q, k) = (SyncPtr(s.q.as_mut_ptr()), SyncPtr(s.k.as_mut_ptr()));
            let positions = &s.positions;
            each_token(n, |t| {
                // SAFETY: token t owns row t of the query and key buffers.
                let (q, k) = unsafe { (row_mut(q, t, q_dim), row_mut(k, t, kv_dim)) };
                self.rope.apply(q, positions[t]);
                self.rope.apply(k, positions[t]);
            });
            let at = layer_base + s.pos * kv_dim;
            s.kv.store(at, &s.k[..n * kv_dim], &s.v[..n * kv_dim]);
            self.attention(s, l, n, tree);
            b.wo.forward_capped(&s.att, n, &mut s.tmp, max_bits);
            s.x[..n * dim].iter_mut().zip(&s.tmp).for_each(|(x, d)| *x += d);

            // MLP.
            norm_rows(&s.x, &b.ffn_norm, c.rms_eps, &mut s.xn, n, dim);
            forward_shared(&[&*b.w_gate, &*b.w_up], &s.xn, n, &mut [&mut s.gate, &mut s.up], max_bits);
            let (gate, up, f) = (SyncPtr(s.gate.as_mut_ptr()), &s.up, c.ffn_dim);
            // SAFETY: token t owns row t of the gate buffer.
            each_token(n, |t| silu_mul(unsafe { row_mut(gate, t, f) }, &up[t * f..(t + 1) * f]));
            b.w_down.forward_capped(&s.gate, n, &mut s.tmp, max_bits);
            s.x[..n * dim].iter_mut().zip(&s.tmp).for_each(|(x, d)| *x += d);
        }
    }

    /// Attention of `n` new tokens (already in the cache): causal over everything before them,
    /// or with `tree`, over the prefix and each node's ancestors. One task per (KV head, token)
    /// computes the query heads sharing that KV head together; each writes only its own slices
    /// of the `att` row.
    fn attention(&self, s: &mut Session, layer: usize, n: usize, tree: bool) {
        let span = layer * s.capacity * self.config.kv_dim()..(layer + 1) * s.capacity * self.config.kv_dim();
        let att = SyncPtr(s.att.as_mut_ptr());
        let at = AttendAt { q: &s.q, att, start: s.pos, slots: &s.tree_slots, off: &s.tree_off, n, tree };
        match &s.kv {
            KvCache::F16 { k, v } => self.attend_layer(&k[span.clone()], &v[span], at),
            KvCache::F32 { k, v } => self.attend_layer(&k[span.clone()], &v[span], at),
        }
    }

    /// [`Llama::attention`] over one layer's cache, `kc` and `vc`, of either element type.
    fn attend_layer<T: KvElem>(&self, kc: &[T], vc: &[T], at: AttendAt) {
        let c = &self.config;
        let (hd, kv_dim) = (c.head_dim, c.kv_dim());
        let q_dim = c.n_heads * hd;
        let group = c.n_heads / c.n_kv_heads;
        let scale = 1.0 / (hd as f32).sqrt();
        let AttendAt { q, att, start, slots, off, n, tree } = at;
        // Short work (the first tokens of a context) runs on this thread. Each task takes all the
        // query heads of a KV head: they share each key and value row the kernel reads (at long
        // context those come from memory), and their sums are independent chains that hide each
        // other's latency. Only when there are fewer (KV head, token) items than threads does a
        // task take a single query head. Many tokens (prefill) go up to [`TOKENS_PER_ITEM`] to
        // a task, so that all their query heads share each key; the latest tokens, which see
        // the most positions, come first so that the team finishes together.
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
        let blocks = n.div_ceil(tokens_per);
        let per_block = c.n_kv_heads * head_chunks;
        let work = |item: usize| {
            let b = blocks - 1 - item / per_block;
            let (g, hc) = (item % per_block / head_chunks, item % head_chunks);
            let (t0, t1) = (b * tokens_per, ((b + 1) * tokens_per).min(n));
            let heads = hc * heads_per..((hc + 1) * heads_per).min(group);
            let kv = HeadView { keys: kc, values: vc, stride: kv_dim, offset: g * hd };
            // The item's queries (a fixed array: no allocation).
            let mut qs: [Query; MAX_ITEM_QUERIES] = Default::default();
            let mut m = 0;
            for t in t0..t1 {
                let (prefix, extra) = if tree { (start, &slots[off[t]..off[t + 1]]) } else { (start + t + 1, &[][..]) };
                for j in heads.clone() {
                    let h = g * group + j;
                    let at = t * q_dim + h * hd;
                    // SAFETY: (token t, head h) owns columns [h·hd, (h+1)·hd) of att row t; t < n.
                    let out = unsafe { std::slice::from_raw_parts_mut(att.get().add(at), hd) };
                    qs[m] = Query { q: &q[at..at + hd], prefix, extra, out };
                    m += 1;
                }
            }
            SCORES.with_borrow_mut(|sc| {
                let need: usize = qs[..m].iter().map(|q| q.prefix + q.extra.len()).sum();
                if sc.len() < need {
                    // Grows rarely: never below 64 Ki floats, then to a power of two.
                    sc.resize(need.next_power_of_two().max(1 << 16), 0.0);
                }
                attend_group(kv, scale, &mut qs[..m], sc);
            });
        };
        let items = blocks * per_block;
        if parallel {
            crate::kernels::team::parallel_for(items, work);
        } else {
            (0..items).for_each(work);
        }
    }

    /// The most planes any layer reads, for bit-plane models (`None` when no layer is one):
    /// a precision cap below it makes a cheaper, lower-precision view of the same model.
    pub fn bits(&self) -> Option<u32> {
        let layers = self.blocks.iter().flat_map(|b| [&b.wq, &b.wk, &b.wv, &b.wo, &b.w_gate, &b.w_up, &b.w_down]);
        layers.filter_map(|l| l.bits()).chain(self.head.bits()).max()
    }

    /// Total bytes of weights (embedding table counted once even when tied).
    pub fn weight_bytes(&self) -> usize {
        let blocks: usize = self
            .blocks
            .iter()
            .map(|b| {
                [&b.wq, &b.wk, &b.wv, &b.wo, &b.w_gate, &b.w_up, &b.w_down]
                    .iter()
                    .map(|l| l.weight_bytes())
                    .sum::<usize>()
                    + (b.attn_norm.len() + b.ffn_norm.len()) * 4
            })
            .sum();
        let tied = std::ptr::addr_eq(Arc::as_ptr(&self.head), Arc::as_ptr(&self.embed));
        let head = if tied { 0 } else { self.head.weight_bytes() };
        blocks + self.embed.weight_bytes() + head + self.norm.len() * 4
    }
}

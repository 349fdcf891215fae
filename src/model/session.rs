//! What changes while a sequence is decoded: its KV cache and position ([`Session`]), and the
//! activation buffers of a forward pass ([`Scratch`]), which several sequences share when one
//! pass runs them together.

use crate::kernels::attention::KvElem;

use super::config::LlamaConfig;

/// Most tokens the MLP of a pass takes at once: its gate and up buffers (the widest a pass
/// has) hold this many rows, whatever the pass's length.
pub(super) const FFN_ROWS: usize = 128;

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
pub(super) enum KvCache {
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
    pub(super) fn store(&mut self, at: usize, keys: &[f32], values: &[f32]) {
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

/// Activation buffers of one forward pass over up to [`Scratch::rows`] tokens, of any number
/// of sequences. They grow when a pass needs more rows and never shrink, so a decode loop
/// allocates nothing once its largest pass has run.
#[derive(Default)]
pub struct Scratch {
    rows: usize,
    pub(super) x: Vec<f32>,
    pub(super) xn: Vec<f32>,
    pub(super) q: Vec<f32>,
    pub(super) k: Vec<f32>,
    pub(super) v: Vec<f32>,
    pub(super) att: Vec<f32>,
    pub(super) tmp: Vec<f32>,
    pub(super) gate: Vec<f32>,
    pub(super) up: Vec<f32>,
    pub(super) logits: Vec<f32>,
    /// Each row's position in its sequence.
    pub(super) positions: Vec<usize>,
    /// The rows whose logits the pass computes, in output order.
    pub(super) head_rows: Vec<usize>,
}

impl Scratch {
    /// Buffers for passes of up to `rows` tokens of a model shaped like `c`.
    pub fn new(c: &LlamaConfig, rows: usize) -> Scratch {
        let mut s = Scratch::default();
        s.reserve(c, rows, 1);
        s
    }

    /// Most tokens a pass fits without growing.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Grows the buffers to `rows` tokens and `logit_rows` rows of logits.
    pub(super) fn reserve(&mut self, c: &LlamaConfig, rows: usize, logit_rows: usize) {
        if rows > self.rows {
            let q_dim = c.n_heads * c.head_dim;
            let grow = |v: &mut Vec<f32>, width: usize| v.resize(rows * width, 0.0);
            grow(&mut self.x, c.dim);
            grow(&mut self.xn, c.dim);
            grow(&mut self.q, q_dim);
            grow(&mut self.k, c.kv_dim());
            grow(&mut self.v, c.kv_dim());
            grow(&mut self.att, q_dim);
            grow(&mut self.tmp, c.dim);
            // The MLP runs in chunks of `FFN_ROWS` tokens.
            self.gate.resize(rows.min(FFN_ROWS) * c.ffn_dim, 0.0);
            self.up.resize(rows.min(FFN_ROWS) * c.ffn_dim, 0.0);
            self.positions.reserve(rows.saturating_sub(self.positions.len()));
            self.head_rows.reserve(rows.saturating_sub(self.head_rows.len()));
            self.rows = rows;
        }
        let need = logit_rows.max(1) * c.vocab_size;
        if self.logits.len() < need {
            self.logits.resize(need, 0.0);
        }
    }
}

/// One sequence's state: its KV cache and position, the slots of its current draft tree, and
/// buffers for passes it runs alone.
pub struct Session {
    /// Tokens processed so far (the next token's position).
    pub pos: usize,
    capacity: usize,
    max_batch: usize,
    pub(super) kv: KvCache,
    /// Tree passes: the cache slots of each node's ancestors and itself
    /// (`tree_slots[tree_off[i]..tree_off[i + 1]]`, increasing).
    pub(super) tree_slots: Vec<u32>,
    pub(super) tree_off: Vec<usize>,
    /// Buffers of the passes this session runs alone ([`super::Llama::forward`]).
    pub(super) scratch: Scratch,
}

impl Session {
    /// A session of `capacity` tokens; passes it runs alone take at most `max_batch` tokens, and
    /// their buffers are allocated now when `buffers` is set (else on first use).
    pub(super) fn new(c: &LlamaConfig, kind: KvType, capacity: usize, max_batch: usize, buffers: bool) -> Session {
        Session {
            pos: 0,
            capacity,
            max_batch,
            kv: KvCache::new(kind, c.n_layers * capacity * c.kv_dim()),
            tree_slots: Vec::new(),
            tree_off: Vec::with_capacity(if buffers { max_batch + 1 } else { 0 }),
            scratch: if buffers { Scratch::new(c, max_batch) } else { Scratch::default() },
        }
    }

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
    /// Tokens that still fit in the cache.
    pub fn room(&self) -> usize {
        self.capacity - self.pos
    }
    /// Commits the tree nodes `path` (indices into the last tree pass, increasing, each the
    /// parent of the next) as the next tokens of the sequence: their keys and values move to
    /// consecutive positions, where plain decoding would have put them.
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

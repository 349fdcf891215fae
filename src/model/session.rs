//! What changes while a sequence is decoded: its KV cache and position ([`Session`]), and the
//! activation buffers of a forward pass ([`Scratch`]), which several sequences share when one
//! pass runs them together.

use crate::kernels::attention::{KvElem, q8};

use super::config::LlamaConfig;

/// Most tokens the MLP of a pass takes at once: its gate and up buffers (the widest a pass
/// has) hold this many rows, whatever the pass's length.
pub(super) const FFN_ROWS: usize = 128;

/// What a session's KV cache stores (llama.cpp's `--cache-type-k/v`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum KvType {
    /// Half the bytes of `f32`; what llama.cpp stores by default. Attention reads every cached
    /// position of a layer from memory for each decoded token, so this halves its traffic.
    #[default]
    F16,
    /// Exact copies of the computed keys and values.
    F32,
    /// llama.cpp's q8_0 blocks: per 32 values, int8 codes and one f16 step (8.5 bits a value,
    /// 53% of f16). Scores are integer dot products on the codes (`kernels::attention::q8`).
    /// Needs a head size that is a multiple of 32.
    #[value(name = "q8_0")]
    Q8_0,
}

impl KvType {
    /// Bytes of `n` cached key (or value) elements, `n` a multiple of 32.
    pub fn bytes(self, n: usize) -> usize {
        match self {
            KvType::F16 => 2 * n,
            KvType::F32 => 4 * n,
            KvType::Q8_0 => n + 2 * n.div_ceil(q8::BLOCK),
        }
    }

    /// The name the command line and JSON reports use.
    pub fn name(self) -> &'static str {
        match self {
            KvType::F16 => "f16",
            KvType::F32 => "f32",
            KvType::Q8_0 => "q8_0",
        }
    }

    /// Why a model shaped like `c` cannot store its cache as this type, if it cannot.
    pub fn unsupported(self, c: &LlamaConfig) -> Option<String> {
        match self {
            KvType::Q8_0 if !c.head_dim.is_multiple_of(q8::BLOCK) || c.head_dim > q8::MAX_HEAD => Some(format!(
                "cache type q8_0 needs a head size that is a multiple of {} (at most {}); this model's is {}",
                q8::BLOCK,
                q8::MAX_HEAD,
                c.head_dim
            )),
            _ => None,
        }
    }
}

/// Keys and values of every layer, `layer × capacity × kv_dim` each.
pub(super) enum KvCache {
    F16 { k: Vec<half::f16>, v: Vec<half::f16> },
    F32 { k: Vec<f32>, v: Vec<f32> },
    Q8(Q8Cache),
}

/// A q8_0 cache (see [`q8::Q8View`] for the layout): key codes offset by 128, key steps per
/// (layer, block of the row) in position order, value codes and steps per position.
pub(super) struct Q8Cache {
    key_codes: Vec<u8>,
    key_steps: Vec<half::f16>,
    value_codes: Vec<i8>,
    value_steps: Vec<half::f16>,
    capacity: usize,
    kv_dim: usize,
}

impl Q8Cache {
    /// Blocks of 32 per position.
    fn blocks(&self) -> usize {
        self.kv_dim / q8::BLOCK
    }

    /// (layer, position) of element offset `at` (the start of a position's row).
    fn locate(&self, at: usize) -> (usize, usize) {
        let per_layer = self.capacity * self.kv_dim;
        (at / per_layer, at % per_layer / self.kv_dim)
    }

    /// Quantizes whole rows `keys`, `values` into the positions from element offset `at` on.
    fn store(&mut self, at: usize, keys: &[f32], values: &[f32]) {
        let (nb, cap) = (self.blocks(), self.capacity);
        let (l, p0) = self.locate(at);
        let mut codes = [0i8; q8::BLOCK];
        let mut step = [half::f16::ZERO];
        for (r, (kr, vr)) in keys.chunks_exact(self.kv_dim).zip(values.chunks_exact(self.kv_dim)).enumerate() {
            let (p, row) = (p0 + r, at + r * self.kv_dim);
            for (b, kb) in kr.chunks_exact(q8::BLOCK).enumerate() {
                q8::quantize_row(kb, &mut codes, &mut step);
                let dst = &mut self.key_codes[row + b * q8::BLOCK..row + (b + 1) * q8::BLOCK];
                dst.iter_mut().zip(&codes).for_each(|(d, &c)| *d = c as u8 ^ 0x80);
                self.key_steps[(l * nb + b) * cap + p] = step[0];
            }
            let vs = (l * cap + p) * nb;
            q8::quantize_row(vr, &mut self.value_codes[row..row + self.kv_dim], &mut self.value_steps[vs..vs + nb]);
        }
    }

    /// Moves position `from`'s row (element offset) to `to`'s, in every array.
    fn copy_row(&mut self, from: usize, to: usize) {
        let (nb, cap, d) = (self.blocks(), self.capacity, self.kv_dim);
        let ((l, pf), (_, pt)) = (self.locate(from), self.locate(to));
        self.key_codes.copy_within(from..from + d, to);
        self.value_codes.copy_within(from..from + d, to);
        for b in 0..nb {
            self.key_steps[(l * nb + b) * cap + pt] = self.key_steps[(l * nb + b) * cap + pf];
        }
        self.value_steps.copy_within((l * cap + pf) * nb..(l * cap + pf + 1) * nb, (l * cap + pt) * nb);
    }

    /// KV head `g` (of `hd` dimensions) of layer `l`.
    pub(super) fn view(&self, l: usize, g: usize, hd: usize) -> q8::Q8View<'_> {
        let (nb, cap, d) = (self.blocks(), self.capacity, self.kv_dim);
        let layer = l * cap * d..(l + 1) * cap * d;
        q8::Q8View {
            key_codes: &self.key_codes[layer.clone()],
            key_steps: &self.key_steps[(l * nb + g * hd / q8::BLOCK) * cap..(l + 1) * nb * cap],
            value_codes: &self.value_codes[layer],
            value_steps: &self.value_steps[l * cap * nb..(l + 1) * cap * nb],
            stride: d,
            offset: g * hd,
            cap,
        }
    }
}

impl KvCache {
    fn new(kind: KvType, layers: usize, capacity: usize, kv_dim: usize) -> KvCache {
        let len = layers * capacity * kv_dim;
        match kind {
            KvType::F16 => KvCache::F16 { k: vec![half::f16::ZERO; len], v: vec![half::f16::ZERO; len] },
            KvType::F32 => KvCache::F32 { k: vec![0.0; len], v: vec![0.0; len] },
            KvType::Q8_0 => KvCache::Q8(Q8Cache {
                key_codes: vec![0x80; len],
                key_steps: vec![half::f16::ZERO; len / q8::BLOCK],
                value_codes: vec![0; len],
                value_steps: vec![half::f16::ZERO; len / q8::BLOCK],
                capacity,
                kv_dim,
            }),
        }
    }

    /// Elements of keys (as many of values) the cache holds.
    fn len(&self) -> usize {
        match self {
            KvCache::F16 { k, .. } => k.len(),
            KvCache::F32 { k, .. } => k.len(),
            KvCache::Q8(q) => q.key_codes.len(),
        }
    }

    fn bytes(&self) -> usize {
        match self {
            KvCache::F16 { k, v } => (k.len() + v.len()) * 2,
            KvCache::F32 { k, v } => (k.len() + v.len()) * 4,
            KvCache::Q8(q) => q.key_codes.len() + q.value_codes.len() + 2 * (q.key_steps.len() + q.value_steps.len()),
        }
    }

    /// Stores `keys` and `values` (whole rows of as many floats each) from element `at` on.
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
            KvCache::Q8(q) => q.store(at, keys, values),
        }
    }

    /// Copies one position's row of keys and values (`len` elements) from `from` to `to`.
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
            KvCache::Q8(q) => q.copy_row(from, to),
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
            kv: KvCache::new(kind, c.n_layers, capacity, c.kv_dim()),
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

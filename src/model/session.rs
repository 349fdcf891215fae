//! What changes while a sequence is decoded: its KV cache and position ([`Session`]), and the
//! activation buffers of a forward pass ([`Scratch`]), which several sequences share when one
//! pass runs them together.

use crate::kernels::attention::formats::{self, BLOCK};
use crate::kernels::attention::{KvElem, blocks};

use super::config::LlamaConfig;

/// Most tokens the MLP of a pass takes at once: its gate and up buffers (the widest a pass
/// has) hold this many rows, whatever the pass's length.
pub(super) const FFN_ROWS: usize = 128;

/// What a session's KV cache stores keys or values as (llama.cpp's `--cache-type-k/-v`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum KvType {
    /// Half the bytes of `f32`; what llama.cpp stores by default. Attention reads every cached
    /// position of a layer from memory for each decoded token, so this halves its traffic.
    #[default]
    F16,
    /// Exact copies of the computed keys and values (keys and values both, or neither).
    F32,
    /// llama.cpp's q8_0 blocks: per 32 values, int8 codes and one f16 step (8.5 bits a value,
    /// 53% of f16). Scores are integer dot products on the codes. Needs a head size that is
    /// a multiple of 32.
    #[value(name = "q8_0")]
    Q8_0,
    /// llama.cpp's q4_0 blocks: per 32 values, 4-bit codes and one f16 step (4.5 bits a value,
    /// 28% of f16). Needs a head size that is a multiple of 64.
    #[value(name = "q4_0")]
    Q4_0,
    /// q4_0 blocks of each head's row after an orthonormal Hadamard rotation, which spreads
    /// outlier channels before quantizing (same bytes as q4_0, much smaller error on models
    /// with large key channels). Needs a power-of-two head size (64–256).
    #[value(name = "q4h")]
    Q4H,
}

impl KvType {
    /// Bytes of `n` cached key (or value) elements, `n` a multiple of 32.
    pub fn bytes(self, n: usize) -> usize {
        match self {
            KvType::F16 => 2 * n,
            KvType::F32 => 4 * n,
            KvType::Q8_0 => n + 2 * n.div_ceil(BLOCK),
            KvType::Q4_0 | KvType::Q4H => n / 2 + 2 * n.div_ceil(BLOCK),
        }
    }

    /// The name the command line and JSON reports use.
    pub fn name(self) -> &'static str {
        match self {
            KvType::F16 => "f16",
            KvType::F32 => "f32",
            KvType::Q8_0 => "q8_0",
            KvType::Q4_0 => "q4_0",
            KvType::Q4H => "q4h",
        }
    }

    /// Why a model shaped like `c` cannot store its cache as this type, if it cannot.
    pub fn unsupported(self, c: &LlamaConfig) -> Option<String> {
        let hd = c.head_dim;
        let need = match self {
            KvType::F16 | KvType::F32 => return None,
            KvType::Q8_0 if hd.is_multiple_of(BLOCK) && hd <= blocks::MAX_HEAD => return None,
            KvType::Q4_0 if hd.is_multiple_of(64) && hd <= blocks::MAX_HEAD => return None,
            KvType::Q4H if formats::rotatable(hd) && hd >= 64 => return None,
            KvType::Q8_0 => format!("a multiple of {BLOCK} (at most {})", blocks::MAX_HEAD),
            KvType::Q4_0 => format!("a multiple of 64 (at most {})", blocks::MAX_HEAD),
            KvType::Q4H => format!("a power of two from 64 to {}", formats::MAX_ROTATED),
        };
        Some(format!("cache type {} needs a head size that is {need}; this model's is {hd}", self.name()))
    }
}

/// Largest key projection bias for which a layer's keys take a 4-bit type (see
/// [`KvTypes::for_layer`]).
pub const WIDE_KEY_BIAS: f32 = 16.0;

/// The types of a cache's keys and values, chosen independently.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KvTypes {
    pub k: KvType,
    pub v: KvType,
}

impl KvTypes {
    /// Keys and values both of type `t`.
    pub fn both(t: KvType) -> KvTypes {
        KvTypes { k: t, v: t }
    }

    /// `f16`, or `q8_0/q4_0` when keys and values differ.
    pub fn name(self) -> String {
        if self.k == self.v { self.k.name().to_string() } else { format!("{}/{}", self.k.name(), self.v.name()) }
    }

    /// Why a model shaped like `c` cannot use these types, if it cannot.
    pub fn unsupported(self, c: &LlamaConfig) -> Option<String> {
        if (self.k == KvType::F32) != (self.v == KvType::F32) {
            return Some("an f32 cache holds keys and values both as f32; pick another type for both".into());
        }
        self.k.unsupported(c).or_else(|| self.v.unsupported(c))
    }

    /// The types of layer `l`'s keys and values, for a model whose key projection bias peaks
    /// at `key_bias` (0 without one) in that layer: 4-bit keys stay at q8_0 in a layer whose
    /// bias exceeds [`WIDE_KEY_BIAS`]. Such a bias puts a large constant on many key channels
    /// (Qwen2.5-Coder-1.5B's first layer: 40 channels over 20, up to 354), which a 4-bit step
    /// sized to it erases the rest of the key under, rotated or not (perplexity in the
    /// thousands with every layer at 4 bits).
    pub fn for_layer(self, key_bias: f32) -> (KvType, KvType) {
        let wide = key_bias > WIDE_KEY_BIAS && matches!(self.k, KvType::Q4_0 | KvType::Q4H);
        (if wide { KvType::Q8_0 } else { self.k }, self.v)
    }

    /// Every layer's types, for per-layer key bias peaks `key_bias` (one per layer; missing
    /// entries count as none).
    pub fn per_layer(self, layers: usize, key_bias: &[f32]) -> Vec<(KvType, KvType)> {
        (0..layers).map(|l| self.for_layer(key_bias.get(l).copied().unwrap_or(0.0))).collect()
    }

    /// Bytes a token's keys and values take in every layer of a model shaped like `c`, whose
    /// key bias peaks per layer are `key_bias`.
    pub fn bytes_per_token(self, c: &LlamaConfig, key_bias: &[f32]) -> usize {
        self.per_layer(c.n_layers, key_bias).iter().map(|&(k, v)| k.bytes(c.kv_dim()) + v.bytes(c.kv_dim())).sum()
    }

    /// Bytes of a session's cache of `capacity` tokens and passes of up to `max_batch`: every
    /// layer's rows, a sliding-window layer holding only [`window_rows`] of them.
    pub fn cache_bytes(self, c: &LlamaConfig, key_bias: &[f32], capacity: usize, max_batch: usize) -> usize {
        let layers = self.per_layer(c.n_layers, key_bias).into_iter().enumerate();
        let rows = |l: usize| window_rows(c.layer_window(l), capacity, max_batch);
        layers.map(|(l, (k, v))| rows(l) * (k.bytes(c.kv_dim()) + v.bytes(c.kv_dim()))).sum()
    }
}

/// Rows a layer's cache holds in a session of `capacity` tokens whose passes take up to
/// `max_batch`: all of them, or for a sliding-window layer its window and two passes.
pub fn window_rows(window: Option<usize>, capacity: usize, max_batch: usize) -> usize {
    window.map_or(capacity, |w| capacity.min(w + 2 * max_batch))
}

/// Keys or values of one layer, `capacity × kv_dim` elements, in one format. Block formats
/// keep their steps per block of the row in position order for keys (`steps[block · capacity +
/// position]`: 16 positions' steps are one load when scoring), per position for values.
pub(super) enum Side {
    F16(Vec<half::f16>),
    F32(Vec<f32>),
    /// q8_0: keys' codes offset by 128 (as `u8`), values' codes as `i8` bits.
    Q8 {
        codes: Vec<u8>,
        steps: Vec<half::f16>,
    },
    /// q4_0, packed per 64 values; `rotated`: each head's row rotated first.
    Q4 {
        codes: Vec<u8>,
        steps: Vec<half::f16>,
        rotated: bool,
    },
}

/// Keys and values of every layer, each layer in the formats [`KvTypes::for_layer`] gives it.
///
/// A sliding-window layer keeps only the positions its window can still need: `rows[l]` slots
/// (its window plus two passes' worth, fewer than the session's capacity), slot 0 holding
/// position `base[l]`. When a pass would run past its last slot, the layer's rows move down so
/// that the window of the pass's first token, and one more pass before it (the most a draft
/// rolls back), stay ([`KvCache::make_room`]).
pub(super) struct KvCache {
    /// Per layer: keys, values.
    pub(super) layers: Vec<(Side, Side)>,
    /// Per layer: slots held (the capacity, or less for a sliding-window layer).
    rows: Vec<usize>,
    /// Per layer: the position in slot 0.
    pub(super) base: Vec<usize>,
    /// Per layer: the window of a sliding-window layer.
    windows: Vec<Option<usize>>,
    /// Most tokens one pass stores.
    max_batch: usize,
    kv_dim: usize,
    head_dim: usize,
}

impl Side {
    fn new(t: KvType, len: usize, key: bool) -> Side {
        match t {
            KvType::F16 => Side::F16(vec![half::f16::ZERO; len]),
            KvType::F32 => Side::F32(vec![0.0; len]),
            KvType::Q8_0 => {
                Side::Q8 { codes: vec![if key { 0x80 } else { 0 }; len], steps: vec![half::f16::ZERO; len / BLOCK] }
            }
            KvType::Q4_0 | KvType::Q4H => Side::Q4 {
                codes: vec![0x88; len / 2],
                steps: vec![half::f16::ZERO; len / BLOCK],
                rotated: t == KvType::Q4H,
            },
        }
    }

    fn bytes(&self) -> usize {
        match self {
            Side::F16(x) => 2 * x.len(),
            Side::F32(x) => 4 * x.len(),
            Side::Q8 { codes, steps } | Side::Q4 { codes, steps, .. } => codes.len() + 2 * steps.len(),
        }
    }

    /// Stores `row` (one position's `kv_dim` values, heads of `hd`) at position `p` of
    /// `capacity`; `key`: keys' layout.
    fn store(&mut self, p: usize, row: &[f32], hd: usize, capacity: usize, key: bool) {
        let d = row.len();
        let e = p * d;
        let step_at = |b: usize| if key { b * capacity + p } else { p * (d / BLOCK) + b };
        match self {
            Side::F16(x) => KvElem::store(&mut x[e..e + d], row),
            Side::F32(x) => x[e..e + d].copy_from_slice(row),
            Side::Q8 { codes, steps } => {
                let mut c = [0i8; BLOCK];
                let mut s = [half::f16::ZERO];
                let off = if key { 0x80 } else { 0 };
                for (b, xb) in row.chunks_exact(BLOCK).enumerate() {
                    formats::quantize_q8(xb, &mut c, &mut s);
                    let dst = &mut codes[e + b * BLOCK..e + (b + 1) * BLOCK];
                    dst.iter_mut().zip(&c).for_each(|(o, &x)| *o = x as u8 ^ off);
                    steps[step_at(b)] = s[0];
                }
            }
            Side::Q4 { codes, steps, rotated } => {
                let mut tmp = [0f32; formats::MAX_ROTATED];
                let mut s = [half::f16::ZERO; formats::MAX_ROTATED / BLOCK];
                for (g, xh) in row.chunks_exact(hd).enumerate() {
                    let x = &mut tmp[..hd];
                    x.copy_from_slice(xh);
                    if *rotated {
                        formats::rotate(x);
                    }
                    let c0 = (e + g * hd) / 2;
                    let quantize = if *rotated { formats::quantize_q4_fitted } else { formats::quantize_q4 };
                    quantize(x, &mut codes[c0..c0 + hd / 2], &mut s);
                    for (j, &sj) in s[..hd / BLOCK].iter().enumerate() {
                        steps[step_at(g * hd / BLOCK + j)] = sj;
                    }
                }
            }
        }
    }

    /// Copies position `from`'s row (`d` values) to position `to`.
    fn copy_row(&mut self, from: usize, to: usize, d: usize, capacity: usize, key: bool) {
        let nb = d / BLOCK;
        let steps = match self {
            Side::F16(x) => return x.copy_within(from * d..(from + 1) * d, to * d),
            Side::F32(x) => return x.copy_within(from * d..(from + 1) * d, to * d),
            Side::Q8 { codes, steps } => {
                codes.copy_within(from * d..(from + 1) * d, to * d);
                steps
            }
            Side::Q4 { codes, steps, .. } => {
                codes.copy_within(from * d / 2..(from + 1) * d / 2, to * d / 2);
                steps
            }
        };
        if key {
            for b in 0..nb {
                steps[b * capacity + to] = steps[b * capacity + from];
            }
        } else {
            steps.copy_within(from * nb..(from + 1) * nb, to * nb);
        }
    }
}

impl KvCache {
    fn new(t: &[(KvType, KvType)], c: &LlamaConfig, capacity: usize, max_batch: usize) -> KvCache {
        let (kv_dim, head_dim) = (c.kv_dim(), c.head_dim);
        let windows: Vec<Option<usize>> = (0..t.len()).map(|l| c.layer_window(l)).collect();
        let rows: Vec<usize> = windows.iter().map(|&w| window_rows(w, capacity, max_batch)).collect();
        let layers = t
            .iter()
            .zip(&rows)
            .map(|(&(k, v), &r)| (Side::new(k, r * kv_dim, true), Side::new(v, r * kv_dim, false)))
            .collect();
        KvCache { layers, base: vec![0; t.len()], rows, windows, max_batch, kv_dim, head_dim }
    }

    /// Makes layer `l` ready to store `n` positions from `p0` on, for queries from `p0` on:
    /// a sliding-window layer that would run past its slots moves its rows down, keeping the
    /// positions from `p0 + 1 − window − max_batch` on.
    fn make_room(&mut self, l: usize, p0: usize, n: usize) {
        let (rows, base) = (self.rows[l], self.base[l]);
        let Some(w) = self.windows[l] else { return };
        if p0 + n <= base + rows {
            return;
        }
        let keep_from = (p0 + 1).saturating_sub(w + self.max_batch).max(base);
        assert!(
            p0 + n - keep_from <= rows,
            "a pass of {n} tokens exceeds the sliding-window cache's {rows} slots (batch {})",
            self.max_batch
        );
        let (d, shift) = (self.kv_dim, keep_from - base);
        let (k, v) = &mut self.layers[l];
        for slot in shift..(p0 - base).min(rows) {
            k.copy_row(slot, slot - shift, d, rows, true);
            v.copy_row(slot, slot - shift, d, rows, false);
        }
        self.base[l] = keep_from;
    }

    /// Whether every layer still holds what a sequence continued at position `pos` needs.
    fn holds(&self, pos: usize) -> bool {
        self.windows.iter().zip(&self.base).all(|(w, &b)| w.is_none_or(|w| b <= (pos + 1).saturating_sub(w)))
    }

    /// Forgets everything: every layer starts again at position 0.
    fn clear(&mut self) {
        self.base.iter_mut().for_each(|b| *b = 0);
    }

    fn bytes(&self) -> usize {
        self.layers.iter().map(|(k, v)| k.bytes() + v.bytes()).sum()
    }

    /// Stores `keys` and `values` (whole rows of `kv_dim` floats each) of layer `l` at the
    /// positions from `p0` on.
    pub(super) fn store(&mut self, l: usize, p0: usize, keys: &[f32], values: &[f32]) {
        let d = self.kv_dim;
        self.make_room(l, p0, keys.len() / d);
        let (cap, hd, base) = (self.rows[l], self.head_dim, self.base[l]);
        let (k, v) = &mut self.layers[l];
        for (r, (kr, vr)) in keys.chunks_exact(d).zip(values.chunks_exact(d)).enumerate() {
            k.store(p0 + r - base, kr, hd, cap, true);
            v.store(p0 + r - base, vr, hd, cap, false);
        }
    }

    /// Copies position `from`'s keys and values to position `to`, in every layer.
    fn copy_position(&mut self, from: usize, to: usize) {
        let d = self.kv_dim;
        for (((k, v), &cap), &base) in self.layers.iter_mut().zip(&self.rows).zip(&self.base) {
            k.copy_row(from - base, to - base, d, cap, true);
            v.copy_row(from - base, to - base, d, cap, false);
        }
    }

    /// KV head `g` of layer `l`: its keys and values as the block kernel reads them.
    pub(super) fn views(&self, l: usize, g: usize) -> (blocks::KeyView<'_>, blocks::ValueView<'_>) {
        let (cap, hd) = (self.rows[l], self.head_dim);
        let (stride, offset) = (self.kv_dim, g * hd);
        let head_steps = g * hd / BLOCK * cap..;
        let keys = match &self.layers[l].0 {
            Side::F16(x) => blocks::KeyView::F16(blocks::F16Rows { data: x, stride, offset }),
            Side::Q8 { codes, steps } => {
                blocks::KeyView::Q8(blocks::Q8Keys { codes, steps: &steps[head_steps], stride, offset, cap })
            }
            Side::Q4 { codes, steps, rotated } => blocks::KeyView::Q4(blocks::Q4Keys {
                codes,
                steps: &steps[head_steps],
                stride,
                offset,
                cap,
                rotated: *rotated,
            }),
            Side::F32(_) => unreachable!("f32 keys go with f32 values, through the float kernel"),
        };
        let values = match &self.layers[l].1 {
            Side::F16(x) => blocks::ValueView::F16(blocks::F16Rows { data: x, stride, offset }),
            Side::Q8 { codes, steps } => {
                blocks::ValueView::Q8(blocks::Q8Values { codes: as_i8(codes), steps, stride, offset })
            }
            Side::Q4 { codes, steps, rotated } => {
                blocks::ValueView::Q4(blocks::Q4Values { codes, steps, stride, offset, rotated: *rotated })
            }
            Side::F32(_) => unreachable!("f32 values go with f32 keys, through the float kernel"),
        };
        (keys, values)
    }
}

/// The same bytes as `i8`.
fn as_i8(x: &[u8]) -> &[i8] {
    // SAFETY: `u8` and `i8` have the same size and alignment, and every bit pattern is valid.
    unsafe { std::slice::from_raw_parts(x.as_ptr() as *const i8, x.len()) }
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
    /// Each row's session rotates with the long rope.
    pub(super) long_rope: Vec<bool>,
    /// The rows whose logits the pass computes, in output order.
    pub(super) head_rows: Vec<usize>,
    /// Routing and expert buffers of mixture-of-experts blocks (grown on first use).
    pub(super) moe: super::ffn::MoeScratch,
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
            self.gate.resize(rows.min(FFN_ROWS) * c.ffn_width(), 0.0);
            self.up.resize(rows.min(FFN_ROWS) * c.ffn_width(), 0.0);
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
    /// Rotates with the model's long rope (Phi-3 past its original context).
    pub(super) long_rope: bool,
}

impl Session {
    /// A session of `capacity` tokens; passes it runs alone take at most `max_batch` tokens, and
    /// their buffers are allocated now when `buffers` is set (else on first use).
    pub(super) fn new(
        c: &LlamaConfig,
        kind: &[(KvType, KvType)],
        capacity: usize,
        max_batch: usize,
        buffers: bool,
    ) -> Session {
        Session {
            pos: 0,
            capacity,
            max_batch,
            kv: KvCache::new(kind, c, capacity, max_batch),
            tree_slots: Vec::new(),
            tree_off: Vec::with_capacity(if buffers { max_batch + 1 } else { 0 }),
            scratch: if buffers { Scratch::new(c, max_batch) } else { Scratch::default() },
            long_rope: false,
        }
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }
    /// Forgets the sequence; the buffers are kept.
    pub fn reset(&mut self) {
        self.pos = 0;
        self.kv.clear();
    }
    /// Drops the tail of the sequence after `pos` (the cache beyond it is simply overwritten)
    /// and returns where the sequence now ends: `pos`, or 0 where a sliding-window layer has
    /// already let go of positions that continuing at `pos` needs (then all is forgotten).
    pub fn truncate(&mut self, pos: usize) -> usize {
        self.pos = self.pos.min(pos);
        if !self.kv.holds(self.pos) {
            self.reset();
        }
        self.pos
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
    pub fn accept_path(&mut self, path: &[usize], _layers: usize) {
        for (i, &node) in path.iter().enumerate() {
            debug_assert!(node >= i, "path nodes are increasing");
            if node != i {
                self.kv.copy_position(self.pos + node, self.pos + i);
            }
        }
        self.pos += path.len();
    }
    /// Bytes held by the KV cache.
    pub fn kv_bytes(&self) -> usize {
        self.kv.bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 4-bit keys widen to q8_0 only in layers with a large key bias; values and other key
    /// types never change, and the byte count follows the per-layer types.
    #[test]
    fn wide_keys_only_where_the_key_bias_is_large() {
        let q4h = KvTypes::both(KvType::Q4H);
        assert_eq!(q4h.for_layer(354.0), (KvType::Q8_0, KvType::Q4H));
        assert_eq!(q4h.for_layer(5.0), (KvType::Q4H, KvType::Q4H));
        assert_eq!(KvTypes { k: KvType::Q4_0, v: KvType::F16 }.for_layer(100.0), (KvType::Q8_0, KvType::F16));
        assert_eq!(KvTypes::both(KvType::F16).for_layer(354.0), (KvType::F16, KvType::F16));
        assert_eq!(
            q4h.per_layer(3, &[354.0]),
            vec![(KvType::Q8_0, KvType::Q4H), (KvType::Q4H, KvType::Q4H), (KvType::Q4H, KvType::Q4H)]
        );
        let c = LlamaConfig {
            arch: "qwen2".into(),
            n_layers: 2,
            dim: 256,
            n_heads: 4,
            n_kv_heads: 2,
            head_dim: 64,
            ffn_dim: 512,
            vocab_size: 100,
            rope_base: 1e6,
            rms_eps: 1e-6,
            max_seq: 64,
            rope_style: Default::default(),
            rope_scaling: Default::default(),
            sliding_window: None,
            query_scale: None,
            moe: None,
        };
        let n = c.kv_dim();
        assert_eq!(q4h.bytes_per_token(&c, &[0.0, 0.0]), 4 * KvType::Q4H.bytes(n));
        assert_eq!(q4h.bytes_per_token(&c, &[50.0, 0.0]), KvType::Q8_0.bytes(n) + 3 * KvType::Q4H.bytes(n));
    }
}

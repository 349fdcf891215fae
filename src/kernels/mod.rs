//! Compute kernels. Every linear layer of the model goes through the [`Linear`] trait, so a new
//! weight format (the bit-plane formats) plugs in without touching the model code.

pub mod attention;
pub mod cpu;
pub mod dense;
pub mod ops;
pub mod planes;
pub mod team;

pub use dense::DenseF32;
pub use planes::PlaneLinear;

/// A linear layer `y = W·x (+ b)` applied to a batch of token rows.
///
/// Implementations must be *batch invariant*: the result for one row may not depend on how
/// many other rows are in the batch. Speculative verification relies on this to reproduce
/// plain decoding bit for bit.
pub trait Linear: Send + Sync {
    fn in_dim(&self) -> usize;
    fn out_dim(&self) -> usize;
    /// `x` is `n × in_dim` row-major, `y` is `n × out_dim` row-major.
    fn forward(&self, x: &[f32], n: usize, y: &mut [f32]);
    /// [`Linear::forward`] reading at most `max_bits` planes: the low-precision view of the same
    /// weights that self-speculative decoding drafts with. Formats without planes ignore the cap.
    fn forward_capped(&self, x: &[f32], n: usize, y: &mut [f32], max_bits: u32) {
        let _ = max_bits;
        self.forward(x, n, y)
    }
    /// Planes read by [`Linear::forward`], for formats stored as bit planes.
    fn bits(&self) -> Option<u32> {
        None
    }
    /// Bytes of weight data this layer reads per forward (for memory accounting).
    fn weight_bytes(&self) -> usize;
    /// Short human name of the storage format, for `inspect`.
    fn format_name(&self) -> String;
    /// The bit-plane layer behind this one, if it is one (lets layers sharing an input run
    /// together, see [`forward_shared`]).
    fn as_planes(&self) -> Option<&PlaneLinear> {
        None
    }
    /// Decodes weight row `i` into `out` (`in_dim` values): the embedding lookup of a table
    /// stored as a layer, which tied heads share.
    fn row(&self, i: usize, out: &mut [f32]);
    /// How many times the kernel has streamed this layer's weights so far (one pass over all
    /// of them serves every token of a call, up to the kernel's token chunk), for the formats
    /// that count: what proves that a mixture's batched pass reads each chosen expert once.
    fn weight_sweeps(&self) -> Option<u64> {
        None
    }
}

/// `ys[i] = layers[i]·x` for layers that read the same input, each at most `max_bits` planes
/// ([`Linear::forward_capped`]): bit-plane layers of one shape quantize the input once and run
/// in one parallel region; anything else runs layer by layer. Same results either way.
pub fn forward_shared(layers: &[&dyn Linear], x: &[f32], n: usize, ys: &mut [&mut [f32]], max_bits: u32) {
    assert_eq!(layers.len(), ys.len());
    let planes: [Option<&PlaneLinear>; planes::MAX_SHARED] =
        std::array::from_fn(|i| layers.get(i).and_then(|l| l.as_planes()));
    let k = layers.len();
    let together = (1..=planes::MAX_SHARED).contains(&k)
        && planes[..k].iter().all(|p| {
            p.is_some_and(|p| {
                let f = planes[0].expect("checked");
                p.in_dim() == f.in_dim() && p.group() == f.group()
            })
        });
    if together {
        let ls: [&PlaneLinear; planes::MAX_SHARED] = std::array::from_fn(|i| planes[i.min(k - 1)].expect("checked"));
        let bits: [u32; planes::MAX_SHARED] = std::array::from_fn(|i| ls[i].bits().min(max_bits.max(1)));
        PlaneLinear::forward_shared(&ls[..k], x, n, ys, &bits[..k], cpu::Isa::detect());
    } else {
        for (l, y) in layers.iter().zip(ys.iter_mut()) {
            l.forward_capped(x, n, y, max_bits);
        }
    }
}

/// A raw pointer that parallel tasks share to write *disjoint* parts of one buffer (rows of an
/// output, heads of an attention result). Whoever dereferences it promises disjointness.
#[derive(Clone, Copy)]
pub(crate) struct SyncPtr(pub(crate) *mut f32);
// SAFETY: the pointer is only used for disjoint writes, as each user documents.
unsafe impl Send for SyncPtr {}
unsafe impl Sync for SyncPtr {}
impl SyncPtr {
    /// A method rather than field access so closures capture the whole `Send` wrapper.
    pub(crate) fn get(self) -> *mut f32 {
        self.0
    }
}

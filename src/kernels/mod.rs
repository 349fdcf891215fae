//! Compute kernels. Every linear layer of the model goes through the [`Linear`] trait, so a new
//! weight format (the bit-plane formats) plugs in without touching the model code.

pub mod attention;
pub mod dense;
pub mod ops;
pub mod planes;

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
    /// Decodes weight row `i` into `out` (`in_dim` values): the embedding lookup of a table
    /// stored as a layer, which tied heads share.
    fn row(&self, i: usize, out: &mut [f32]);
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

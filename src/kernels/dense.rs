//! Dense f32 linear layer: the reference against which quantized formats are judged.
//!
//! The kernel computes each output as a dot product with eight running partial sums (one per
//! lane of a 256-bit vector), combined in a fixed order at the end. Every `(row, token)` pair
//! follows exactly the same arithmetic whatever the tile it falls in, which makes the layer
//! batch invariant. `f32::mul_add` is used throughout: with FMA enabled it is one instruction,
//! without it the same fused result comes from software, so the SIMD path and the portable
//! reference agree bit for bit.

use std::sync::Arc;

use rayon::prelude::*;

use super::Linear;

const LANES: usize = 8;
/// Output rows per micro-tile.
const TR: usize = 4;
/// Token rows per micro-tile.
const TT: usize = 3;
/// Output rows per parallel task: big enough to amortize scheduling, small enough to balance.
const ROWS_PER_TASK: usize = 32;
/// Tokens per cache block in batched matmuls.
const TOKEN_BLOCK: usize = 48;

/// `out × in` row-major f32 weights, optionally with a bias.
pub struct DenseF32 {
    w: Arc<[f32]>,
    bias: Option<Vec<f32>>,
    rows: usize,
    cols: usize,
}

impl DenseF32 {
    pub fn new(w: Arc<[f32]>, rows: usize, cols: usize, bias: Option<Vec<f32>>) -> Self {
        assert_eq!(w.len(), rows * cols, "weight size must equal rows × cols");
        if let Some(b) = &bias {
            assert_eq!(b.len(), rows, "bias length must equal rows");
        }
        DenseF32 { w, bias, rows, cols }
    }

    pub fn weights(&self) -> &[f32] {
        &self.w
    }
}

impl Linear for DenseF32 {
    fn in_dim(&self) -> usize {
        self.cols
    }
    fn out_dim(&self) -> usize {
        self.rows
    }
    fn forward(&self, x: &[f32], n: usize, y: &mut [f32]) {
        assert!(x.len() >= n * self.cols && y.len() >= n * self.rows);
        matmul(&self.w, self.rows, self.cols, &x[..n * self.cols], n, &mut y[..n * self.rows]);
        if let Some(b) = &self.bias {
            for row in y[..n * self.rows].chunks_exact_mut(self.rows) {
                row.iter_mut().zip(b).for_each(|(v, b)| *v += b);
            }
        }
    }
    fn weight_bytes(&self) -> usize {
        self.w.len() * 4
    }
    fn format_name(&self) -> String {
        "f32".into()
    }
}

/// Raw pointer wrapper so parallel tasks can write disjoint columns of `y`.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}
impl OutPtr {
    // A method (not field access) so closures capture the whole Send wrapper.
    fn get(self) -> *mut f32 {
        self.0
    }
}

/// `y[t, r] = Σ_k w[r, k] · x[t, k]` for `t < n`, `r < rows`, parallel over output rows.
pub fn matmul(w: &[f32], rows: usize, cols: usize, x: &[f32], n: usize, y: &mut [f32]) {
    let out = OutPtr(y.as_mut_ptr());
    let tasks = rows.div_ceil(ROWS_PER_TASK);
    let run = move |task: usize| {
        let r0 = task * ROWS_PER_TASK;
        let r1 = (r0 + ROWS_PER_TASK).min(rows);
        // SAFETY: tasks own disjoint row ranges [r0, r1) of every output token row.
        unsafe { matmul_rows(w, rows, cols, x, n, out, r0, r1) };
    };
    if tasks * n * cols < 1 << 15 {
        (0..tasks).for_each(run);
    } else {
        (0..tasks).into_par_iter().for_each(run);
    }
}

/// Computes output rows `[r0, r1)` for all tokens, choosing the best kernel the CPU supports.
///
/// # Safety
/// `out` must point to an `n × rows` buffer and no other thread may write rows `[r0, r1)`.
#[allow(clippy::too_many_arguments)]
unsafe fn matmul_rows(w: &[f32], rows: usize, cols: usize, x: &[f32], n: usize, out: OutPtr, r0: usize, r1: usize) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            // SAFETY: the features were just checked.
            return unsafe { avx2::matmul_rows(w, rows, cols, x, n, out, r0, r1) };
        }
    }
    unsafe { drive(w, rows, cols, x, n, out, r0, r1, tile_scalar::<TR, TT>, tile_scalar::<1, 1>) }
}

/// Walks the output in `TR × TT` tiles (edges one element at a time) with the given tile kernels.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn drive(
    w: &[f32],
    rows: usize,
    cols: usize,
    x: &[f32],
    n: usize,
    out: OutPtr,
    r0: usize,
    r1: usize,
    full: impl Fn(&[f32], usize, &[f32], usize, usize) -> [[f32; TT]; TR],
    one: impl Fn(&[f32], usize, &[f32], usize, usize) -> [[f32; 1]; 1],
) {
    // Token blocks sized so their activations stay in L2 while each 4-row weight tile is
    // reused from L1 across the block.
    for tb in (0..n).step_by(TOKEN_BLOCK) {
        let te = (tb + TOKEN_BLOCK).min(n);
        let mut r = r0;
        while r < r1 {
            let rn = (r1 - r).min(TR);
            let mut t = tb;
            while t < te {
                let tn = (te - t).min(TT);
                let mut res = [[0f32; TT]; TR];
                if (rn, tn) == (TR, TT) {
                    res = full(w, cols, x, r, t);
                } else {
                    for (i, row) in res.iter_mut().enumerate().take(rn) {
                        for (j, v) in row.iter_mut().enumerate().take(tn) {
                            *v = one(w, cols, x, r + i, t + j)[0][0];
                        }
                    }
                }
                for (i, row) in res.iter().enumerate().take(rn) {
                    for (j, &v) in row.iter().enumerate().take(tn) {
                        // SAFETY: (t + j) < n and (r + i) < r1 ≤ rows; the caller owns these rows.
                        unsafe { *out.get().add((t + j) * rows + r + i) = v };
                    }
                }
                t += tn;
            }
            r += rn;
        }
    }
}

/// Combines the eight lane sums in a fixed tree order, then the `cols % 8` tail in order.
#[inline(always)]
fn finish(a: &[f32; LANES], wr: &[f32], xr: &[f32], full: usize) -> f32 {
    let mut s = ((a[0] + a[4]) + (a[1] + a[5])) + ((a[2] + a[6]) + (a[3] + a[7]));
    for k in full..wr.len() {
        s = wr[k].mul_add(xr[k], s);
    }
    s
}

/// Scalar reference tile: dot products of `R` weight rows from `r` with `T` token rows from
/// `t`, eight interleaved partial sums each, exactly as the SIMD lanes compute them.
fn tile_scalar<const R: usize, const T: usize>(w: &[f32], cols: usize, x: &[f32], r: usize, t: usize) -> [[f32; T]; R] {
    let full = cols / LANES * LANES;
    let mut res = [[0f32; T]; R];
    for (i, res_row) in res.iter_mut().enumerate() {
        let wr = &w[(r + i) * cols..(r + i + 1) * cols];
        for (j, v) in res_row.iter_mut().enumerate() {
            let xr = &x[(t + j) * cols..(t + j + 1) * cols];
            let mut acc = [0f32; LANES];
            for k in (0..full).step_by(LANES) {
                for l in 0..LANES {
                    acc[l] = wr[k + l].mul_add(xr[k + l], acc[l]);
                }
            }
            *v = finish(&acc, wr, xr, full);
        }
    }
    res
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::*;
    use std::arch::x86_64::*;

    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn matmul_rows(
        w: &[f32],
        rows: usize,
        cols: usize,
        x: &[f32],
        n: usize,
        out: OutPtr,
        r0: usize,
        r1: usize,
    ) {
        // SAFETY: this function only runs when AVX2 and FMA are present.
        let full = |w: &[f32], c: usize, x: &[f32], r: usize, t: usize| unsafe { tile::<TR, TT>(w, c, x, r, t) };
        let one = |w: &[f32], c: usize, x: &[f32], r: usize, t: usize| unsafe { tile::<1, 1>(w, c, x, r, t) };
        unsafe { drive(w, rows, cols, x, n, out, r0, r1, full, one) }
    }

    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn tile<const R: usize, const T: usize>(
        w: &[f32],
        cols: usize,
        x: &[f32],
        r: usize,
        t: usize,
    ) -> [[f32; T]; R] {
        assert!((r + R) * cols <= w.len() && (t + T) * cols <= x.len());
        let full = cols / LANES * LANES;
        let wp = w.as_ptr();
        let xp = x.as_ptr();
        let mut acc = [[_mm256_setzero_ps(); T]; R];
        let mut k = 0;
        while k < full {
            // SAFETY: k + 8 ≤ cols and the rows were bounds-checked above.
            unsafe {
                let xv: [__m256; T] = std::array::from_fn(|j| _mm256_loadu_ps(xp.add((t + j) * cols + k)));
                for (i, acc_row) in acc.iter_mut().enumerate() {
                    let wv = _mm256_loadu_ps(wp.add((r + i) * cols + k));
                    for (a, xj) in acc_row.iter_mut().zip(&xv) {
                        *a = _mm256_fmadd_ps(wv, *xj, *a);
                    }
                }
            }
            k += LANES;
        }
        let mut res = [[0f32; T]; R];
        for i in 0..R {
            for j in 0..T {
                let mut lanes = [0f32; LANES];
                // SAFETY: `lanes` holds exactly eight f32.
                unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), acc[i][j]) };
                let wr = &w[(r + i) * cols..(r + i + 1) * cols];
                let xr = &x[(t + j) * cols..(t + j + 1) * cols];
                res[i][j] = finish(&lanes, wr, xr, full);
            }
        }
        res
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng, rngs::StdRng};

    fn reference(w: &[f32], rows: usize, cols: usize, x: &[f32], n: usize) -> Vec<f64> {
        let mut y = vec![0f64; n * rows];
        for t in 0..n {
            for r in 0..rows {
                y[t * rows + r] = (0..cols).map(|k| w[r * cols + k] as f64 * x[t * cols + k] as f64).sum();
            }
        }
        y
    }

    #[test]
    fn matches_f64_reference_on_odd_shapes() {
        let mut rng = StdRng::seed_from_u64(7);
        for &(rows, cols, n) in &[(1, 1, 1), (5, 13, 2), (37, 64, 7), (96, 577, 4), (130, 96, 1)] {
            let w: Vec<f32> = (0..rows * cols).map(|_| rng.random_range(-1.0..1.0)).collect();
            let x: Vec<f32> = (0..n * cols).map(|_| rng.random_range(-1.0..1.0)).collect();
            let mut y = vec![0f32; n * rows];
            matmul(&w, rows, cols, &x, n, &mut y);
            let r = reference(&w, rows, cols, &x, n);
            for (a, b) in y.iter().zip(&r) {
                assert!((*a as f64 - b).abs() < 1e-4 * (cols as f64).sqrt(), "{a} vs {b} at {rows}x{cols}x{n}");
            }
        }
    }

    #[test]
    fn simd_path_equals_portable_bit_for_bit() {
        let mut rng = StdRng::seed_from_u64(3);
        let (rows, cols, n) = (45, 203, 5);
        let w: Vec<f32> = (0..rows * cols).map(|_| rng.random_range(-1.0..1.0)).collect();
        let x: Vec<f32> = (0..n * cols).map(|_| rng.random_range(-1.0..1.0)).collect();
        let mut fast = vec![0f32; n * rows];
        let mut slow = vec![0f32; n * rows];
        matmul(&w, rows, cols, &x, n, &mut fast);
        unsafe {
            drive(&w, rows, cols, &x, n, OutPtr(slow.as_mut_ptr()), 0, rows, tile_scalar::<TR, TT>, tile_scalar::<1, 1>)
        };
        assert_eq!(fast, slow);
    }

    #[test]
    fn batch_invariant_bit_for_bit() {
        let mut rng = StdRng::seed_from_u64(11);
        let (rows, cols, n) = (70, 576, 9);
        let w: Vec<f32> = (0..rows * cols).map(|_| rng.random_range(-1.0..1.0)).collect();
        let x: Vec<f32> = (0..n * cols).map(|_| rng.random_range(-1.0..1.0)).collect();
        let mut all = vec![0f32; n * rows];
        matmul(&w, rows, cols, &x, n, &mut all);
        for t in 0..n {
            let mut one = vec![0f32; rows];
            matmul(&w, rows, cols, &x[t * cols..(t + 1) * cols], 1, &mut one);
            assert_eq!(&all[t * rows..(t + 1) * rows], &one[..], "token {t}");
        }
    }
}

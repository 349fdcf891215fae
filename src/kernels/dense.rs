//! Dense f32 linear layer: the reference against which quantized formats are judged.
//!
//! Weights are packed in panels of [`NR`] output rows, k-major (`panel[k][row]`), the layout a
//! register-blocked GEMM wants: one k step loads the panel's 16 weights as two 8-lane vectors
//! and multiplies them by one broadcast activation per token. Every output is a plain
//! sequential sum over k with fused multiply-adds, the same whether it is computed alone or in
//! a tile of six tokens, so the layer is batch invariant; `f32::mul_add` gives the scalar
//! reference the very same rounding, so SIMD and reference agree bit for bit.

use super::{Linear, SyncPtr};

/// Output rows per panel (two AVX2 vectors).
pub const NR: usize = 16;
/// Tokens per micro-tile (6 × 2 accumulators + 2 weights + 1 broadcast = 15 registers).
const MR: usize = 6;
/// Panels per parallel task.
const PANELS_PER_TASK: usize = 2;

/// `out × in` f32 weights packed in panels, optionally with a bias.
pub struct DenseF32 {
    packed: Vec<f32>,
    bias: Option<Vec<f32>>,
    rows: usize,
    cols: usize,
}

impl DenseF32 {
    /// Packs row-major `rows × cols` weights.
    pub fn new(w: &[f32], rows: usize, cols: usize, bias: Option<Vec<f32>>) -> Self {
        assert_eq!(w.len(), rows * cols, "weight size must equal rows × cols");
        if let Some(b) = &bias {
            assert_eq!(b.len(), rows, "bias length must equal rows");
        }
        let panels = rows.div_ceil(NR);
        let mut packed = vec![0f32; panels * cols * NR];
        for r in 0..rows {
            let (p, i) = (r / NR, r % NR);
            for k in 0..cols {
                packed[(p * cols + k) * NR + i] = w[r * cols + k];
            }
        }
        DenseF32 { packed, bias, rows, cols }
    }

    /// Copies row `r` (an embedding lookup when this is a tied embedding table).
    pub fn row(&self, r: usize, out: &mut [f32]) {
        let (p, i) = (r / NR, r % NR);
        for (k, o) in out[..self.cols].iter_mut().enumerate() {
            *o = self.packed[(p * self.cols + k) * NR + i];
        }
    }

    pub fn rows(&self) -> usize {
        self.rows
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
        matmul_packed(&self.packed, self.rows, self.cols, &x[..n * self.cols], n, &mut y[..n * self.rows]);
        if let Some(b) = &self.bias {
            for row in y[..n * self.rows].chunks_exact_mut(self.rows) {
                row.iter_mut().zip(b).for_each(|(v, b)| *v += b);
            }
        }
    }
    fn weight_bytes(&self) -> usize {
        self.rows * self.cols * 4
    }
    fn row(&self, i: usize, out: &mut [f32]) {
        DenseF32::row(self, i, out)
    }
    fn format_name(&self) -> String {
        "f32".into()
    }
}

/// `y[t, r] = Σ_k w[r, k] · x[t, k]` over packed weights, parallel over panels.
fn matmul_packed(packed: &[f32], rows: usize, cols: usize, x: &[f32], n: usize, y: &mut [f32]) {
    let out = SyncPtr(y.as_mut_ptr());
    let panels = rows.div_ceil(NR);
    let tasks = panels.div_ceil(PANELS_PER_TASK);
    let run = move |task: usize| {
        for p in task * PANELS_PER_TASK..((task + 1) * PANELS_PER_TASK).min(panels) {
            let panel = &packed[p * cols * NR..(p + 1) * cols * NR];
            // SAFETY: each panel's rows are written by exactly one task.
            unsafe { panel_rows(panel, cols, x, n, out, rows, p * NR) };
        }
    };
    if panels * n * cols < 1 << 15 {
        (0..tasks).for_each(run);
    } else {
        super::team::parallel_for(tasks, run);
    }
}

/// All tokens against one panel, with the best kernel the CPU has.
///
/// # Safety
/// `out` points to an `n × rows` buffer and no one else writes rows `[r0, r0 + NR)`.
unsafe fn panel_rows(panel: &[f32], cols: usize, x: &[f32], n: usize, out: SyncPtr, rows: usize, r0: usize) {
    #[cfg(target_arch = "x86_64")]
    {
        if super::cpu::avx2() {
            // SAFETY: AVX2 and FMA were detected (`cpu::avx2`).
            return unsafe { avx2::panel_rows(panel, cols, x, n, out, rows, r0) };
        }
    }
    unsafe { panel_rows_scalar(panel, cols, x, n, out, rows, r0) }
}

/// Writes a tile of results, dropping the padding rows of the last panel.
///
/// # Safety
/// As for [`panel_rows`].
#[inline(always)]
unsafe fn store(res: &[[f32; NR]], t0: usize, out: SyncPtr, rows: usize, r0: usize) {
    let live = (rows - r0).min(NR);
    for (j, row) in res.iter().enumerate() {
        // SAFETY: t0 + j < n and r0 + live ≤ rows.
        unsafe { std::ptr::copy_nonoverlapping(row.as_ptr(), out.get().add((t0 + j) * rows + r0), live) };
    }
}

/// Scalar reference: each output a sequential fused sum over k.
///
/// # Safety
/// As for [`panel_rows`].
unsafe fn panel_rows_scalar(panel: &[f32], cols: usize, x: &[f32], n: usize, out: SyncPtr, rows: usize, r0: usize) {
    for t in 0..n {
        let xr = &x[t * cols..(t + 1) * cols];
        let mut acc = [0f32; NR];
        for (k, &xv) in xr.iter().enumerate() {
            let w = &panel[k * NR..(k + 1) * NR];
            for i in 0..NR {
                acc[i] = xv.mul_add(w[i], acc[i]);
            }
        }
        unsafe { store(&[acc], t, out, rows, r0) };
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::*;
    use std::arch::x86_64::*;

    /// [`super::panel_rows`] with AVX2 and FMA: the tokens in micro-tiles of up to [`MR`].
    ///
    /// # Safety
    /// AVX2 and FMA present; `out` as for [`super::panel_rows`].
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn panel_rows(panel: &[f32], cols: usize, x: &[f32], n: usize, out: SyncPtr, rows: usize, r0: usize) {
        let mut t = 0;
        while t < n {
            let m = (n - t).min(MR);
            // SAFETY: AVX2/FMA are enabled here; tiles stay inside x and out.
            unsafe {
                match m {
                    6 => tile::<6>(panel, cols, x, t, out, rows, r0),
                    5 => tile::<5>(panel, cols, x, t, out, rows, r0),
                    4 => tile::<4>(panel, cols, x, t, out, rows, r0),
                    3 => tile::<3>(panel, cols, x, t, out, rows, r0),
                    2 => tile::<2>(panel, cols, x, t, out, rows, r0),
                    _ => tile::<1>(panel, cols, x, t, out, rows, r0),
                }
            }
            t += m;
        }
    }

    /// Tokens `t0..t0 + M` against the panel, their sums in `M × 2` registers.
    ///
    /// # Safety
    /// AVX2 and FMA present; `out` points to an `n × rows` buffer with `t0 + M ≤ n`, and no one else writes
    /// rows `[r0, r0 + NR)`.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn tile<const M: usize>(
        panel: &[f32],
        cols: usize,
        x: &[f32],
        t0: usize,
        out: SyncPtr,
        rows: usize,
        r0: usize,
    ) {
        assert!(panel.len() >= cols * NR && x.len() >= (t0 + M) * cols);
        let wp = panel.as_ptr();
        let xp = x.as_ptr();
        let mut acc = [[_mm256_setzero_ps(); 2]; M];
        for k in 0..cols {
            // SAFETY: k < cols; the asserts above bound every pointer.
            unsafe {
                let w0 = _mm256_loadu_ps(wp.add(k * NR));
                let w1 = _mm256_loadu_ps(wp.add(k * NR + 8));
                for (j, a) in acc.iter_mut().enumerate() {
                    let xv = _mm256_broadcast_ss(&*xp.add((t0 + j) * cols + k));
                    a[0] = _mm256_fmadd_ps(xv, w0, a[0]);
                    a[1] = _mm256_fmadd_ps(xv, w1, a[1]);
                }
            }
        }
        let mut res = [[0f32; NR]; M];
        for (r, a) in res.iter_mut().zip(&acc) {
            // SAFETY: each row of `res` holds 16 floats.
            unsafe {
                _mm256_storeu_ps(r.as_mut_ptr(), a[0]);
                _mm256_storeu_ps(r.as_mut_ptr().add(8), a[1]);
            }
        }
        unsafe { store(&res, t0, out, rows, r0) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng, rngs::StdRng};

    fn random(rng: &mut StdRng, n: usize) -> Vec<f32> {
        (0..n).map(|_| rng.random_range(-1.0..1.0)).collect()
    }

    #[test]
    fn matches_f64_reference_on_odd_shapes() {
        let mut rng = StdRng::seed_from_u64(7);
        for &(rows, cols, n) in &[(1, 1, 1), (5, 13, 2), (37, 64, 7), (96, 577, 4), (130, 96, 1), (17, 33, 13)] {
            let w = random(&mut rng, rows * cols);
            let x = random(&mut rng, n * cols);
            let mut y = vec![0f32; n * rows];
            DenseF32::new(&w, rows, cols, None).forward(&x, n, &mut y);
            for t in 0..n {
                for r in 0..rows {
                    let want: f64 = (0..cols).map(|k| w[r * cols + k] as f64 * x[t * cols + k] as f64).sum();
                    let got = y[t * rows + r] as f64;
                    assert!((got - want).abs() < 1e-4 * (cols as f64).sqrt(), "{got} vs {want} at {rows}x{cols}x{n}");
                }
            }
        }
    }

    #[test]
    fn simd_path_equals_scalar_reference_bit_for_bit() {
        let mut rng = StdRng::seed_from_u64(3);
        for &(rows, cols, n) in &[(45, 203, 5), (16, 64, 6), (33, 100, 13)] {
            let w = random(&mut rng, rows * cols);
            let x = random(&mut rng, n * cols);
            let d = DenseF32::new(&w, rows, cols, None);
            let mut fast = vec![0f32; n * rows];
            let mut slow = vec![0f32; n * rows];
            d.forward(&x, n, &mut fast);
            for p in 0..rows.div_ceil(NR) {
                let panel = &d.packed[p * cols * NR..(p + 1) * cols * NR];
                unsafe { panel_rows_scalar(panel, cols, &x, n, SyncPtr(slow.as_mut_ptr()), rows, p * NR) };
            }
            assert_eq!(fast, slow, "{rows}x{cols}x{n}");
        }
    }

    #[test]
    fn batch_invariant_bit_for_bit() {
        let mut rng = StdRng::seed_from_u64(11);
        let (rows, cols, n) = (70, 576, 9);
        let w = random(&mut rng, rows * cols);
        let x = random(&mut rng, n * cols);
        let d = DenseF32::new(&w, rows, cols, Some(random(&mut rng, rows)));
        let mut all = vec![0f32; n * rows];
        d.forward(&x, n, &mut all);
        for t in 0..n {
            let mut one = vec![0f32; rows];
            d.forward(&x[t * cols..(t + 1) * cols], 1, &mut one);
            assert_eq!(&all[t * rows..(t + 1) * rows], &one[..], "token {t}");
        }
    }

    #[test]
    fn row_reads_back_the_unpacked_weights() {
        let mut rng = StdRng::seed_from_u64(1);
        let (rows, cols) = (37, 24);
        let w = random(&mut rng, rows * cols);
        let d = DenseF32::new(&w, rows, cols, None);
        let mut out = vec![0f32; cols];
        for r in [0, 15, 16, 36] {
            d.row(r, &mut out);
            assert_eq!(out, &w[r * cols..(r + 1) * cols]);
        }
    }
}

//! What the CPU can run, decided in one place: the instruction-set paths ([`Isa`]), detected
//! once and overridable with `BITNEST_ISA=scalar|avx2|avx512` for every kernel alike (plane,
//! dense, attention, element-wise), and the SIMD helpers several kernels share (the `exp`
//! polynomial whose scalar form [`exp_ref`] and 16-lane form `x86::exp16` give the same bits).

use std::sync::OnceLock;

/// Instruction sets the kernels have a path for, worst first (so `>=` means "at least").
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Isa {
    Scalar,
    /// AVX2 with FMA and F16C.
    Avx2,
    /// AVX-512 F/BW/VL/VNNI/VBMI with FMA and F16C.
    Avx512,
    /// AVX-512 with GFNI: the plane kernels' decode loop builds codes by bit-matrix transposes.
    Avx512Gfni,
}

impl Isa {
    /// The best path this CPU runs (detected once), or the one `BITNEST_ISA` names when the CPU
    /// has it.
    pub fn detect() -> Isa {
        static ISA: OnceLock<Isa> = OnceLock::new();
        *ISA.get_or_init(|| {
            let forced = std::env::var("BITNEST_ISA").ok();
            let best = Isa::available().last().copied().unwrap_or(Isa::Scalar);
            match forced.as_deref() {
                Some("scalar") => Isa::Scalar,
                Some("avx2") if Isa::available().contains(&Isa::Avx2) => Isa::Avx2,
                Some("avx512") if Isa::available().contains(&Isa::Avx512) => Isa::Avx512,
                _ => best,
            }
        })
    }

    /// Every path this CPU can run, worst first.
    pub fn available() -> Vec<Isa> {
        #[allow(unused_mut)]
        let mut v = vec![Isa::Scalar];
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && is_x86_feature_detected!("f16c") {
                v.push(Isa::Avx2);
                if is_x86_feature_detected!("avx512f")
                    && is_x86_feature_detected!("avx512bw")
                    && is_x86_feature_detected!("avx512vl")
                    && is_x86_feature_detected!("avx512vnni")
                    && is_x86_feature_detected!("avx512vbmi")
                {
                    v.push(Isa::Avx512);
                    if is_x86_feature_detected!("gfni") {
                        v.push(Isa::Avx512Gfni);
                    }
                }
            }
        }
        v
    }
}

/// Whether the AVX-512 paths run: the CPU has them and `BITNEST_ISA` does not turn them off.
/// (Where this holds, AVX-512 F/BW/VL/VNNI/VBMI, FMA, F16C and AVX2 are all present.)
pub fn avx512() -> bool {
    Isa::detect() >= Isa::Avx512
}

/// Whether the AVX2 paths run (AVX2, FMA and F16C present, not turned off).
pub fn avx2() -> bool {
    Isa::detect() >= Isa::Avx2
}

/// Below this, `exp` is taken as zero (the result would be subnormal).
pub const EXP_MIN: f32 = -86.0;
const LOG2E: f32 = std::f32::consts::LOG2_E;
/// Adding and subtracting it rounds to an integer (to nearest even).
const ROUND: f32 = 12582912.0;
const LN2_HI: f32 = 0.693_145_75;
const LN2_LO: f32 = 1.428_606_8e-6;
/// `e^r ≈ 1 + r + r²·P(r)` on `|r| ≤ ln2/2` (Cephes' `expf`).
const EXP_P: [f32; 6] = [1.987_569_1e-4, 1.398_199_9e-3, 8.333_452e-3, 4.166_579_6e-2, 0.166_666_65, 0.5];

/// `e^x` for `x ≤ 0` within 2 ulp, from multiplies, adds and fused multiply-adds only, so
/// every path computes it alike; zero below [`EXP_MIN`] (and for NaN).
#[inline(always)]
pub fn exp_ref(x: f32) -> f32 {
    if x.is_nan() || x < EXP_MIN {
        return 0.0;
    }
    let n = (x * LOG2E + ROUND) - ROUND;
    let r = n.mul_add(-LN2_HI, x);
    let r = n.mul_add(-LN2_LO, r);
    let mut p = EXP_P[0];
    for &c in &EXP_P[1..] {
        p = p.mul_add(r, c);
    }
    let y = p.mul_add(r * r, r) + 1.0;
    f32::from_bits((y.to_bits() as i32).wrapping_add((n as i32) << 23) as u32)
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod x86 {
    use std::arch::x86_64::*;

    use super::{EXP_MIN, EXP_P, LN2_HI, LN2_LO, LOG2E, ROUND};

    /// Interleaved pairwise sums of `a` and `b` (first step of the transposing reductions).
    ///
    /// # Safety
    /// AVX-512F present, enabled by its caller's `target_feature`.
    #[inline(always)]
    unsafe fn pair(a: __m512i, b: __m512i) -> __m512i {
        unsafe { _mm512_add_epi32(_mm512_unpacklo_epi32(a, b), _mm512_unpackhi_epi32(a, b)) }
    }

    /// Second step of the transposing reductions: each 128-bit lane holds partial sums of four rows.
    ///
    /// # Safety
    /// AVX-512F present, enabled by its caller's `target_feature`.
    #[inline(always)]
    unsafe fn quad(a: __m512i, b: __m512i) -> __m512i {
        unsafe { _mm512_add_epi32(_mm512_unpacklo_epi64(a, b), _mm512_unpackhi_epi64(a, b)) }
    }

    /// Lane `i` of the first result is the sum of lanes 0–7 of `acc[i]` (columns 0–31 of the
    /// chunk), of the second lanes 8–15: the transposing reductions without its last addition.
    ///
    /// # Safety
    /// AVX-512F present, enabled by its caller's `target_feature`.
    #[inline(always)]
    pub(crate) unsafe fn reduce16_halves(acc: &[__m512i; 16]) -> (__m512i, __m512i) {
        unsafe {
            let v0 = quad(pair(acc[0], acc[1]), pair(acc[2], acc[3]));
            let v1 = quad(pair(acc[4], acc[5]), pair(acc[6], acc[7]));
            let v2 = quad(pair(acc[8], acc[9]), pair(acc[10], acc[11]));
            let v3 = quad(pair(acc[12], acc[13]), pair(acc[14], acc[15]));
            // Blocks: rows 0–3 first half, rows 0–3 second half, rows 4–7 first, rows 4–7 second.
            let s01 = _mm512_add_epi32(
                _mm512_shuffle_i32x4::<0b10_00_10_00>(v0, v1),
                _mm512_shuffle_i32x4::<0b11_01_11_01>(v0, v1),
            );
            let s23 = _mm512_add_epi32(
                _mm512_shuffle_i32x4::<0b10_00_10_00>(v2, v3),
                _mm512_shuffle_i32x4::<0b11_01_11_01>(v2, v3),
            );
            (_mm512_shuffle_i32x4::<0b10_00_10_00>(s01, s23), _mm512_shuffle_i32x4::<0b11_01_11_01>(s01, s23))
        }
    }

    /// [`super::exp_ref`] in 16 lanes, with the same bits.
    ///
    /// # Safety
    /// AVX-512F and FMA present (the caller's `target_feature`, checked by [`super::avx512`]).
    #[inline(always)]
    pub(crate) unsafe fn exp16(x: __m512) -> __m512 {
        unsafe {
            let ok = _mm512_cmp_ps_mask::<_CMP_GE_OQ>(x, _mm512_set1_ps(EXP_MIN));
            let round = _mm512_set1_ps(ROUND);
            let n = _mm512_sub_ps(_mm512_add_ps(_mm512_mul_ps(x, _mm512_set1_ps(LOG2E)), round), round);
            let r = _mm512_fmadd_ps(n, _mm512_set1_ps(-LN2_HI), x);
            let r = _mm512_fmadd_ps(n, _mm512_set1_ps(-LN2_LO), r);
            let mut p = _mm512_set1_ps(EXP_P[0]);
            for &c in &EXP_P[1..] {
                p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
            }
            let y = _mm512_add_ps(_mm512_fmadd_ps(p, _mm512_mul_ps(r, r), r), _mm512_set1_ps(1.0));
            let e = _mm512_add_epi32(_mm512_castps_si512(y), _mm512_slli_epi32::<23>(_mm512_cvtps_epi32(n)));
            _mm512_maskz_mov_ps(ok, _mm512_castsi512_ps(e))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_accurate_and_zero_far_below() {
        let mut x = 0.0f32;
        while x > -100.0 {
            let (got, want) = (exp_ref(x) as f64, (x as f64).exp());
            if x >= EXP_MIN {
                assert!((got - want).abs() <= 2.5 * f32::EPSILON as f64 * want, "exp({x}) = {got}, want {want}");
            } else {
                assert_eq!(got, 0.0);
            }
            x -= 0.0137;
        }
        assert_eq!(exp_ref(0.0), 1.0);
        assert_eq!(exp_ref(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp_ref(f32::NAN), 0.0);
    }

    #[test]
    fn paths_are_ordered_and_forcing_picks_an_available_one() {
        let av = Isa::available();
        assert_eq!(av[0], Isa::Scalar);
        assert!(av.windows(2).all(|w| w[0] < w[1]));
        assert!(av.contains(&Isa::detect()));
    }
}

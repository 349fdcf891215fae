//! Codes from bit planes by GF(2) bit-matrix transposes (`vgf2p8affineqb`), for the decode
//! loop of the AVX-512 path on CPUs with GFNI.

use std::arch::x86_64::*;

/// Codes of up to four consecutive 64-column chunks of one row, built with GFNI.
///
/// The `R` plane words of 8 adjacent weights, as the rows of an 8 × 8 bit matrix, transpose
/// into those weights' codes: one `vgf2p8affineqb` turns 64 such matrices into 64 codes. The
/// plane bytes reach their matrix rows by byte permutes, the first plane in the row that
/// becomes the code's top bit and the unused rows zero. Against
/// [`codes512`] (a mask move and a masked add per plane and chunk) this costs one load per two
/// planes, a permute or two and one transpose per chunk, whatever `R`.
///
/// Registers: plane pair `k` is loaded as `[plane 2k | plane 2k + 1]`, 32 bytes each (`NC`
/// chunks' worth, zero beyond). Up to four planes, a matrix holds two chunks, one per nibble
/// (one permute and one transpose per two chunks, then a shift and a mask); beyond four, two
/// permutes first gather planes 0–3 and 4–7 of two chunks, and a matrix holds one chunk.
///
/// # Safety
/// AVX-512 F/BW/VL/VBMI and GFNI present; `NC` ≤ 4 and each of the `R` plane pointers is readable for
/// `8·NC` bytes from `off`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vbmi,gfni")]
pub(super) unsafe fn codes_gf<const R: usize, const NC: usize>(planes: &[*const u8; R], off: usize) -> [__m512i; NC] {
    unsafe {
        let m: u32 = if NC >= 4 { u32::MAX } else { (1u32 << (8 * NC)) - 1 };
        // Byte j of each qword is 1 << j: the affine step then yields the transpose.
        let unit = _mm512_set1_epi64(0x8040_2010_0804_0201u64 as i64);
        let mut out = [_mm512_setzero_si512(); NC];
        if R <= 4 {
            // Two chunks per matrix, a nibble each: plane bytes of column byte `q` of chunk `c`
            // in rows 4 − R .. 4, of chunk `c + 1` in rows 8 − R .. 8, zeros (read from a zero
            // half of the second register) above each. No masking, one transpose per two chunks.
            let s0 = pair_regs::<R>(planes, off, 0, m);
            let s1 = if R > 2 { pair_regs::<R>(planes, off, 1, m) } else { _mm512_setzero_si512() };
            let low = _mm512_set1_epi8(0x0F);
            let shift4 = _mm512_set1_epi64(0x1020_4080_0000_0000u64 as i64);
            for h in 0..NC.div_ceil(2) {
                let idx = _mm512_loadu_si512(GF_N4[R][h].as_ptr() as *const __m512i);
                let both = _mm512_gf2p8affine_epi64_epi8::<0>(unit, _mm512_permutex2var_epi8(s0, idx, s1));
                out[2 * h] = _mm512_gf2p8affine_epi64_epi8::<0>(both, shift4);
                if 2 * h + 1 < NC {
                    out[2 * h + 1] = _mm512_and_si512(both, low);
                }
            }
        } else {
            let (s0, s1, s2) = (
                pair_regs::<R>(planes, off, 0, m),
                pair_regs::<R>(planes, off, 1, m),
                pair_regs::<R>(planes, off, 2, m),
            );
            let s3 = if R > 6 { pair_regs::<R>(planes, off, 3, m) } else { s2 };
            // Bytes of the matrices that hold a plane (rows `8 − R ..` of each qword).
            let zero_rows = ((0xFFu64 << (8 - R)) & 0xFF) * 0x0101_0101_0101_0101;
            for h in 0..NC.div_ceil(2) {
                let ti = _mm512_loadu_si512(GF_T[h].as_ptr() as *const __m512i);
                let t = _mm512_permutex2var_epi8(s0, ti, s1);
                let u = _mm512_permutex2var_epi8(s2, ti, s3);
                for c in 2 * h..(2 * h + 2).min(NC) {
                    let idx = _mm512_loadu_si512(GF_Q8[R][c % 2].as_ptr() as *const __m512i);
                    let q = _mm512_maskz_permutex2var_epi8(zero_rows, t, idx, u);
                    out[c] = _mm512_gf2p8affine_epi64_epi8::<0>(unit, q);
                }
            }
        }
        out
    }
}

/// The eight code vectors of a 32-column sub-block (`off`: its 64 bytes in each plane) of a
/// two-plane view, by "crumbs": with two planes, a matrix holds four chunks, two rows each, so
/// one permute (straight from the two planes' loads) and one transpose per four code vectors
/// yield bytes holding four 2-bit codes, which one masked shift each (an affine step) splits.
/// The same codes as [`codes_gf`] gives for the two halves, with about two thirds of its
/// operations.
///
/// # Safety
/// AVX-512 F/BW/VBMI and GFNI present; both plane pointers are readable for 64 bytes from `off`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vbmi,gfni")]
pub(super) unsafe fn codes_crumb2(planes: &[*const u8; 2], off: usize) -> [__m512i; 8] {
    unsafe {
        let a = _mm512_loadu_si512(planes[0].add(off) as *const __m512i);
        let b = _mm512_loadu_si512(planes[1].add(off) as *const __m512i);
        let unit = _mm512_set1_epi64(0x8040_2010_0804_0201u64 as i64);
        // Bits 2c + 1 and 2c of each byte (code c) down to bits 1 and 0, the rest cleared: the
        // matrix row of result bit i is byte 7 − i.
        let take: [__m512i; 4] = std::array::from_fn(|c| _mm512_set1_epi64(CRUMB_TAKE[c] as i64));
        let mut out = [_mm512_setzero_si512(); 8];
        for h in 0..2 {
            let idx = _mm512_loadu_si512(GF_CRUMB[h].as_ptr() as *const __m512i);
            let all = _mm512_gf2p8affine_epi64_epi8::<0>(unit, _mm512_permutex2var_epi8(a, idx, b));
            out[4 * h] = _mm512_and_si512(all, _mm512_set1_epi8(3));
            for c in 1..4 {
                out[4 * h + c] = _mm512_gf2p8affine_epi64_epi8::<0>(all, take[c]);
            }
        }
        out
    }
}

/// Affine matrices moving code `c`'s two bits of a crumb byte to bits 1 and 0.
const CRUMB_TAKE: [u64; 4] = {
    let mut t = [0u64; 4];
    let mut c = 0;
    while c < 4 {
        t[c] = ((1u64 << (2 * c)) << 56) | ((1u64 << (2 * c + 1)) << 48);
        c += 1;
    }
    t
};

/// `GF_CRUMB[h]`: matrix byte `8q + 6 − 2c` ← byte `32h + 8c + q` of plane 0 (first source),
/// byte `8q + 7 − 2c` ← the same byte of plane 1 (second source): after the transpose, code
/// `c` of each weight sits in bits `2c + 1` (plane 0) and `2c`.
static GF_CRUMB: [[u8; 64]; 2] = {
    let mut t = [[0u8; 64]; 2];
    let mut h = 0;
    while h < 2 {
        let mut c = 0;
        while c < 4 {
            let mut q = 0;
            while q < 8 {
                t[h][8 * q + 6 - 2 * c] = (32 * h + 8 * c + q) as u8;
                t[h][8 * q + 7 - 2 * c] = (64 + 32 * h + 8 * c + q) as u8;
                q += 1;
            }
            c += 1;
        }
        h += 1;
    }
    t
};

/// Planes `2k` and `2k + 1` at `off`, `m`-masked 32 bytes each, in the low and high halves.
///
/// # Safety
/// AVX-512 F/BW/VL present, enabled by its caller's `target_feature`; planes `2k` and `2k + 1` (those
/// below `R`) are readable from `off` for the bytes `m` selects.
#[inline(always)]
unsafe fn pair_regs<const R: usize>(planes: &[*const u8; R], off: usize, k: usize, m: u32) -> __m512i {
    unsafe {
        let lo = _mm512_zextsi256_si512(_mm256_maskz_loadu_epi8(m, planes[2 * k].add(off) as *const i8));
        if 2 * k + 1 < R {
            _mm512_inserti64x4::<1>(lo, _mm256_maskz_loadu_epi8(m, planes[2 * k + 1].add(off) as *const i8))
        } else {
            lo
        }
    }
}

/// Where plane `p` of a pair register lives in a two-source permute's index space.
const fn pair_pos(p: usize) -> usize {
    if p < 2 { 32 * p } else { 64 + 32 * (p - 2) }
}

/// `GF_N4[R][h]`, R ≤ 4: matrix byte `8q + 4·half + 4 − R + p` ← plane `p`, byte `8(2h + half)
/// + q`; the `4 − R` bytes above each nibble's planes point at a zero byte (the second
/// register's upper half, zero when `R` ≤ 3).
static GF_N4: [[[u8; 64]; 2]; 5] = {
    let mut t = [[[96u8; 64]; 2]; 5];
    let mut r = 1;
    while r <= 4 {
        let mut h = 0;
        while h < 2 {
            let mut q = 0;
            while q < 8 {
                let mut half = 0;
                while half < 2 {
                    let mut p = 0;
                    while p < r {
                        t[r][h][8 * q + 4 * half + 4 - r + p] = (pair_pos(p) + 8 * (2 * h + half) + q) as u8;
                        p += 1;
                    }
                    half += 1;
                }
                q += 1;
            }
            h += 1;
        }
        r += 1;
    }
    t
};

/// `GF_T[h]`: byte `16p + b` ← plane `p` (of the two pair registers), byte `16h + b`.
static GF_T: [[u8; 64]; 2] = {
    let mut t = [[0u8; 64]; 2];
    let mut h = 0;
    while h < 2 {
        let mut i = 0;
        while i < 64 {
            t[h][i] = (pair_pos(i / 16) + 16 * h + i % 16) as u8;
            i += 1;
        }
        h += 1;
    }
    t
};

/// `GF_Q8[R][c % 2]`, R > 4: matrix byte `8q + 8 − R + p` ← byte `8(c % 2) + q` of plane `p`
/// in the gathered registers (planes 0–3 in the first, 4–7 in the second).
static GF_Q8: [[[u8; 64]; 2]; 9] = {
    let mut t = [[[0u8; 64]; 2]; 9];
    let mut r = 5;
    while r <= 8 {
        let mut c = 0;
        while c < 2 {
            let mut q = 0;
            while q < 8 {
                let mut p = 0;
                while p < r {
                    let base = if p < 4 { 16 * p } else { 64 + 16 * (p - 4) };
                    t[r][c][8 * q + 8 - r + p] = (base + 8 * c + q) as u8;
                    p += 1;
                }
                q += 1;
            }
            c += 1;
        }
        r += 1;
    }
    t
};

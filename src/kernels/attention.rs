//! Attention of one query head over the cached keys and values of its KV head.

use super::ops::{axpy, dot, softmax};

/// Where one KV head's vectors sit in a `positions × kv_dim` cache.
#[derive(Clone, Copy)]
pub struct HeadView<'a> {
    pub keys: &'a [f32],
    pub values: &'a [f32],
    /// Floats between consecutive positions (`kv_dim`).
    pub stride: usize,
    /// Offset of this head inside a position (`kv_head · head_dim`).
    pub offset: usize,
}

/// `out = softmax(q·Kᵀ·scale) · V` over the first `len` positions, `scores` as scratch.
///
/// The arithmetic only uses plain multiply and add in a fixed order, so the AVX2 build of this
/// function and the baseline build give identical results; the dispatch only changes speed.
pub fn attend(q: &[f32], kv: HeadView, len: usize, scale: f32, scores: &mut [f32], out: &mut [f32]) {
    attend_slots(q, kv, len, &[], scale, scores, out)
}

/// Attention over positions `0..prefix` followed by the cache slots `extra` (increasing): a
/// node of a draft tree sees the committed sequence and then its own ancestors.
///
/// The positions are visited in the same order as [`attend`] visits a plain sequence, so a tree
/// node whose ancestors would sit at consecutive positions gets exactly, bit for bit, the
/// output plain decoding computes there: what makes tree verification lossless.
pub fn attend_slots(
    q: &[f32],
    kv: HeadView,
    prefix: usize,
    extra: &[u32],
    scale: f32,
    scores: &mut [f32],
    out: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx2") {
            // SAFETY: AVX2 was just detected.
            return unsafe { attend_avx2(q, kv, prefix, extra, scale, scores, out) };
        }
    }
    attend_body(q, kv, prefix, extra, scale, scores, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn attend_avx2(
    q: &[f32],
    kv: HeadView,
    prefix: usize,
    extra: &[u32],
    scale: f32,
    scores: &mut [f32],
    out: &mut [f32],
) {
    attend_body(q, kv, prefix, extra, scale, scores, out)
}

#[inline(always)]
fn attend_body(q: &[f32], kv: HeadView, prefix: usize, extra: &[u32], scale: f32, scores: &mut [f32], out: &mut [f32]) {
    let hd = q.len();
    let len = prefix + extra.len();
    let at = |p: usize| p * kv.stride + kv.offset..p * kv.stride + kv.offset + hd;
    let (head, tail) = scores[..len].split_at_mut(prefix);
    for (p, sc) in head.iter_mut().enumerate() {
        *sc = dot(q, &kv.keys[at(p)]) * scale;
    }
    for (&e, sc) in extra.iter().zip(tail.iter_mut()) {
        *sc = dot(q, &kv.keys[at(e as usize)]) * scale;
    }
    softmax(&mut scores[..len]);
    out.fill(0.0);
    for (p, &w) in scores[..prefix].iter().enumerate() {
        axpy(w, &kv.values[at(p)], out);
    }
    for (&e, &w) in extra.iter().zip(&scores[prefix..len]) {
        axpy(w, &kv.values[at(e as usize)], out);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_naive_f64_attention() {
        let (hd, stride, offset, len) = (16, 48, 16, 13);
        let keys: Vec<f32> = (0..len * stride).map(|i| ((i * 7 % 13) as f32 - 6.0) * 0.1).collect();
        let values: Vec<f32> = (0..len * stride).map(|i| ((i * 5 % 11) as f32 - 5.0) * 0.2).collect();
        let q: Vec<f32> = (0..hd).map(|i| (i as f32 * 0.3).sin()).collect();
        let mut scores = vec![0f32; len];
        let mut out = vec![0f32; hd];
        let kv = HeadView { keys: &keys, values: &values, stride, offset };
        attend(&q, kv, len, 0.25, &mut scores, &mut out);
        let s: Vec<f64> = (0..len)
            .map(|p| (0..hd).map(|d| q[d] as f64 * keys[p * stride + offset + d] as f64).sum::<f64>() * 0.25)
            .collect();
        let m = s.iter().cloned().fold(f64::MIN, f64::max);
        let z: f64 = s.iter().map(|v| (v - m).exp()).sum();
        for d in 0..hd {
            let want: f64 = (0..len).map(|p| (s[p] - m).exp() / z * values[p * stride + offset + d] as f64).sum();
            assert!((out[d] as f64 - want).abs() < 1e-5, "dim {d}: {} vs {want}", out[d]);
        }
        let mut base = vec![0f32; hd];
        attend_body(&q, kv, len, &[], 0.25, &mut scores, &mut base);
        assert_eq!(out, base, "dispatched path equals the baseline build bit for bit");
        // The same positions listed as extra slots give the same bits.
        let slots: Vec<u32> = (5..len as u32).collect();
        let mut via_slots = vec![0f32; hd];
        attend_slots(&q, kv, 5, &slots, 0.25, &mut scores, &mut via_slots);
        assert_eq!(out, via_slots);
    }
}

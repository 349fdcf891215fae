//! Group quantization into nested codes, and their storage as bit planes.
//!
//! Each group of `group` weights along a row picks the datatype (and scale) that minimizes a
//! weighted sum of squared errors over the precisions it will be read at, so the low-bit
//! slices that draft tokens stay good, not only the full-precision view (MatGPTQ's idea, with
//! round-to-nearest instead of GPTQ). Codes are then split into planes, most significant
//! first: plane `p` holds bit `m − 1 − p` of every code, one bit per weight, row-major, rows
//! padded to 64 bits. Reading the first `r` planes is reading the `r`-bit model.

use anyhow::{Result, ensure};
use half::f16;
use rayon::prelude::*;

use super::dtype::{GroupDtype, MAX_BITS};

/// How to quantize: group size, master width, candidate datatypes, objective.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct QuantConfig {
    pub group: usize,
    pub master_bits: u32,
    pub dtypes: Vec<GroupDtype>,
    /// `(r, λ_r)`: the objective is `Σ_r λ_r · ‖w − view_r(w)‖²`.
    pub objective: Vec<(u32, f32)>,
    /// Multipliers of the min-max (or absmax) scale tried per group; clipping a little often
    /// lowers the error of the coarse views.
    pub scale_search: Vec<f32>,
    /// Two-level scales: sub-blocks of this many weights refine each group's scale and offset
    /// ([`SubScales`]); 0 for one scale and offset per group.
    #[serde(default)]
    pub sub_group: usize,
    /// Bits of each sub-block's scale and of its offset.
    #[serde(default)]
    pub sub_bits: u32,
}

impl QuantConfig {
    /// The default objective for `master_bits` and no scale search: what tests and benchmarks
    /// want when only the grid matters.
    pub fn new(group: usize, master_bits: u32, dtypes: Vec<GroupDtype>) -> Self {
        QuantConfig {
            group,
            master_bits,
            dtypes,
            objective: QuantConfig::default_objective(master_bits),
            scale_search: vec![1.0],
            sub_group: 0,
            sub_bits: 0,
        }
    }

    /// The group size `bitnest quantize` uses for a model of width `dim`: one group per row of
    /// its square matrices where the kernel takes that (a multiple of 64 up to 2048), else 512.
    /// With sub-blocks of 32 the group only carries the f16 pair that sub-scales multiply, so
    /// a long group costs little; see docs/FORMAT.md for the measurements.
    pub fn default_group(dim: usize) -> usize {
        if dim.is_multiple_of(64) && (64..=2048).contains(&dim) { dim } else { 512 }
    }

    /// Sub-blocks per group, or `None` for one scale and offset per group.
    pub fn sub(&self) -> Option<(usize, u32)> {
        (self.sub_group > 0).then_some((self.sub_group, self.sub_bits))
    }

    /// Objective weights for a master of `m` bits: the master itself plus the 4-, 3- and 2-bit
    /// views below it, the ones that serve as low-precision models and drafts.
    pub fn default_objective(m: u32) -> Vec<(u32, f32)> {
        let mut o = vec![(m, 1.0)];
        for r in [4, 3, 2] {
            if r < m {
                o.push((r, 1.0 / (1u32 << (2 * (m.min(4) - r))) as f32));
            }
        }
        o
    }

    pub fn validate(&self) -> Result<()> {
        ensure!(
            self.group >= 8 && self.group <= 4096 && self.group.is_multiple_of(8),
            "group size {} must be a multiple of 8 in 8..=4096",
            self.group
        );
        ensure!(
            (2..=MAX_BITS).contains(&self.master_bits),
            "master bits {} must be in 2..={MAX_BITS}",
            self.master_bits
        );
        ensure!(!self.dtypes.is_empty(), "no datatypes to choose from");
        for d in &self.dtypes {
            ensure!(
                d.native_bits() <= self.master_bits,
                "datatype {d:?} needs at least {} master bits, have {}",
                d.native_bits(),
                self.master_bits
            );
        }
        ensure!(!self.objective.is_empty(), "empty objective");
        for &(r, l) in &self.objective {
            ensure!(
                r >= 1 && r <= self.master_bits && l >= 0.0 && l.is_finite(),
                "objective term ({r}, {l}) is invalid"
            );
        }
        ensure!(
            !self.scale_search.is_empty() && self.scale_search.iter().all(|s| *s > 0.0 && s.is_finite()),
            "scale search multipliers must be positive"
        );
        if let Some((size, bits)) = self.sub() {
            ensure!(
                size < self.group && self.group.is_multiple_of(size),
                "sub-group size {size} must divide the group size {} and be smaller",
                self.group
            );
            ensure!(
                (SUB_BITS_MIN..=SUB_BITS_MAX).contains(&bits),
                "sub-scale bits {bits} must be in {SUB_BITS_MIN}..={SUB_BITS_MAX}"
            );
        }
        Ok(())
    }
}

/// Scale bits, offset bits and datatype id of one group.
type GroupMeta = (u16, u16, u8);
/// One row's quantization: its plane bits, group metadata and sub-block multipliers.
type RowQuant = (Vec<u8>, Vec<GroupMeta>, Vec<(u8, i8)>);

/// Narrowest and widest sub-block scale the format takes.
pub const SUB_BITS_MIN: u32 = 2;
pub const SUB_BITS_MAX: u32 = 8;

/// Second-level scales, as in llama.cpp's k-quants: sub-block `k` of a group decodes with scale
/// `S · scale[k]` and offset `O · offset[k]`, where `S` and `O` are the group's f16 scale and
/// offset. A source quantized in blocks of 32 (this model's Q4_1) has a different grid every 32
/// weights; following it costs `2·bits` bits per sub-block instead of 40 per group, which is
/// what lets a 4-bit view stay under 4.5 bits per weight with groups of 256.
#[derive(Debug, Clone, PartialEq)]
pub struct SubScales {
    /// Weights per sub-block; divides the group size.
    pub size: usize,
    /// Bits of each scale and each offset ([`SubKind::Unsigned`] and [`SubKind::Signed`]).
    pub bits: u32,
    pub kind: SubKind,
    /// Per (row, sub-block), row-major: the integer multipliers (the scale's byte is two's
    /// complement when [`SubKind::Signed`]); empty for [`SubKind::Half`].
    pub scale: Vec<u8>,
    pub offset: Vec<i8>,
    /// Per (row, sub-block), row-major: f16 bits of each sub-block's own scale and offset;
    /// only for [`SubKind::Half`].
    pub half_scale: Vec<u16>,
    pub half_offset: Vec<u16>,
}

/// What a sub-block stores, and so how its scale and offset are formed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SubKind {
    /// `bits`-bit integers: the scale unsigned (`1..2^bits` when bitnest quantizes), the
    /// offset two's complement; they multiply the group's f16 `S` and `O`.
    #[default]
    Unsigned,
    /// As `Unsigned` with a two's complement scale: llama.cpp's signed sub-block scales
    /// (`Q3_K`, `Q6_K`, `IQ4_XS`).
    Signed,
    /// Each sub-block's own f16 scale and offset, multiplying group values of 1: llama.cpp's
    /// blocks of 32 with a scale of their own (`Q4_0`, `Q4_1`, `Q5_0`, `Q5_1`, `Q8_0`, `IQ4_NL`).
    Half,
}

impl SubScales {
    /// Integer multipliers of `bits` bits (the quantizer's form).
    pub fn ints(size: usize, bits: u32, kind: SubKind, scale: Vec<u8>, offset: Vec<i8>) -> Self {
        SubScales { size, bits, kind, scale, offset, half_scale: Vec::new(), half_offset: Vec::new() }
    }

    /// Sub-blocks per row of `cols` weights.
    pub fn per_row(&self, cols: usize) -> usize {
        cols.div_ceil(self.size)
    }

    /// Sub-blocks held.
    pub fn len(&self) -> usize {
        match self.kind {
            SubKind::Half => self.half_scale.len(),
            _ => self.scale.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Sub-block `k`'s multipliers of the group's scale and offset, as floats.
    #[inline]
    pub fn multipliers(&self, k: usize) -> (f32, f32) {
        match self.kind {
            SubKind::Unsigned => (self.scale[k] as f32, self.offset[k] as f32),
            SubKind::Signed => (self.scale[k] as i8 as f32, self.offset[k] as f32),
            SubKind::Half => {
                (f16::from_bits(self.half_scale[k]).to_f32(), f16::from_bits(self.half_offset[k]).to_f32())
            }
        }
    }

    /// Sub-block `k`'s scale multiplier and its offset multiplier negated, `−mn` (the negation
    /// taken on the integer, so a zero offset gives +0): what [`BitPlanes::dequantize`] forms
    /// `w = (S·sc)·level − O·(−mn)` from, llama.cpp's `d1·q − m1` to the sign of a zero.
    #[inline]
    pub fn neg_multipliers(&self, k: usize) -> (f32, f32) {
        match self.kind {
            SubKind::Unsigned => (self.scale[k] as f32, (-(self.offset[k] as i32)) as f32),
            SubKind::Signed => (self.scale[k] as i8 as f32, (-(self.offset[k] as i32)) as f32),
            SubKind::Half => {
                (f16::from_bits(self.half_scale[k]).to_f32(), -f16::from_bits(self.half_offset[k]).to_f32())
            }
        }
    }

    /// Bits stored per sub-block.
    pub fn bits_per_sub_block(&self) -> usize {
        match self.kind {
            SubKind::Half => 32,
            _ => 2 * self.bits as usize,
        }
    }

    /// Packs scale and offset of every sub-block into what the file stores: for integer kinds a
    /// little-endian bit stream (`bits` bits of scale, then of offset), for [`SubKind::Half`]
    /// little-endian f16 pairs (scale, offset).
    pub fn pack(&self) -> Vec<u8> {
        if self.kind == SubKind::Half {
            return self
                .half_scale
                .iter()
                .zip(&self.half_offset)
                .flat_map(|(s, o)| s.to_le_bytes().into_iter().chain(o.to_le_bytes()))
                .collect();
        }
        let b = self.bits as usize;
        let mut out = vec![0u8; (self.scale.len() * 2 * b).div_ceil(8)];
        let mask = (1u32 << b) - 1;
        let mut pos = 0usize;
        for (&s, &o) in self.scale.iter().zip(&self.offset) {
            for v in [s as u32 & mask, o as u8 as u32 & mask] {
                for i in 0..b {
                    if (v >> i) & 1 == 1 {
                        out[(pos + i) / 8] |= 1 << ((pos + i) % 8);
                    }
                }
                pos += b;
            }
        }
        out
    }

    /// The inverse of [`SubScales::pack`] for `n` sub-blocks.
    pub fn unpack(bytes: &[u8], size: usize, bits: u32, kind: SubKind, n: usize) -> Result<Self> {
        if kind == SubKind::Half {
            ensure!(bytes.len() == n * 4, "f16 sub-scales have {} bytes for {n} sub-blocks", bytes.len());
            let u16s = |i: usize| u16::from_le_bytes([bytes[i], bytes[i + 1]]);
            return Ok(SubScales {
                size,
                bits,
                kind,
                scale: Vec::new(),
                offset: Vec::new(),
                half_scale: (0..n).map(|k| u16s(4 * k)).collect(),
                half_offset: (0..n).map(|k| u16s(4 * k + 2)).collect(),
            });
        }
        ensure!((SUB_BITS_MIN..=SUB_BITS_MAX).contains(&bits), "sub-scale bits {bits} out of range");
        let b = bits as usize;
        ensure!(bytes.len() == (n * 2 * b).div_ceil(8), "sub-scales have {} bytes for {n} sub-blocks", bytes.len());
        if b == 8 {
            // Whole bytes (transcoded GGUF tensors): scale, offset, scale, offset…
            let scale = bytes.iter().step_by(2).copied().collect();
            let offset = bytes.iter().skip(1).step_by(2).map(|&o| o as i8).collect();
            return Ok(SubScales::ints(size, bits, kind, scale, offset));
        }
        let get =
            |pos: usize| -> u32 { (0..b).map(|i| (((bytes[(pos + i) / 8] >> ((pos + i) % 8)) & 1) as u32) << i).sum() };
        // Sign-extends a two's complement field.
        let signed = |v: u32| -> i32 { if v >= 1 << (b - 1) { v as i32 - (1 << b) } else { v as i32 } };
        let (mut scale, mut offset) = (Vec::with_capacity(n), Vec::with_capacity(n));
        for k in 0..n {
            let s = get(2 * k * b);
            scale.push(if kind == SubKind::Signed { signed(s) as i8 as u8 } else { s as u8 });
            offset.push(signed(get((2 * k + 1) * b)) as i8);
        }
        Ok(SubScales::ints(size, bits, kind, scale, offset))
    }
}

/// A quantized `rows × cols` matrix as bit planes plus per-group metadata.
#[derive(Debug, Clone, PartialEq)]
pub struct BitPlanes {
    pub rows: usize,
    pub cols: usize,
    pub group: usize,
    pub master_bits: u32,
    /// `master_bits` planes, each `rows × row_bytes`.
    pub planes: Vec<Vec<u8>>,
    /// Per (row, group), row-major: scale, offset (f16 bits) and datatype id.
    pub scales: Vec<u16>,
    pub offsets: Vec<u16>,
    pub dtypes: Vec<u8>,
    /// Second-level scales, if the tensor has them.
    pub sub: Option<SubScales>,
}

/// Bytes per row of one plane: `cols` bits padded to a multiple of 64.
pub fn row_bytes(cols: usize) -> usize {
    cols.div_ceil(64) * 8
}

impl BitPlanes {
    pub fn groups_per_row(&self) -> usize {
        self.cols.div_ceil(self.group)
    }

    /// Quantizes `w` (`rows × cols`, row-major).
    pub fn quantize(w: &[f32], rows: usize, cols: usize, cfg: &QuantConfig) -> Result<Self> {
        Self::quantize_weighted(w, rows, cols, cfg, None)
    }

    /// [`BitPlanes::quantize`] with an importance per input column (`cols` values ≥ 0, such as
    /// the mean square of the activations a calibration text feeds this layer): a weight's
    /// squared error counts `importance[col]` times when datatypes and scales are chosen, so
    /// the columns that carry large activations are kept more exact (llama.cpp's imatrix idea).
    pub fn quantize_weighted(
        w: &[f32],
        rows: usize,
        cols: usize,
        cfg: &QuantConfig,
        importance: Option<&[f32]>,
    ) -> Result<Self> {
        cfg.validate()?;
        if let Some(h) = importance {
            ensure!(h.len() == cols, "importance has {} values for {cols} columns", h.len());
            ensure!(h.iter().all(|v| v.is_finite() && *v >= 0.0), "importance must be finite and ≥ 0");
        }
        ensure!(w.len() == rows * cols, "weights have {} values, expected {rows} × {cols}", w.len());
        ensure!(w.iter().all(|v| v.is_finite()), "weights contain NaN or infinity");
        let gpr = cols.div_ceil(cfg.group);
        let rb = row_bytes(cols);
        let m = cfg.master_bits as usize;
        let sub_per_group = cfg.sub().map_or(1, |(size, _)| cfg.group / size);
        // Per row: codes packed into planes, group metadata and sub-block scales.
        let per_row: Vec<RowQuant> = w
            .par_chunks(cols)
            .map(|row| {
                let mut bits = vec![0u8; m * rb];
                let mut meta = Vec::with_capacity(gpr);
                let mut subs = Vec::new();
                let mut codes = vec![0u8; cfg.group];
                let mut sub = vec![(0u8, 0i8); sub_per_group];
                for (g, x) in row.chunks(cfg.group).enumerate() {
                    let nsub = if cfg.sub().is_some() { x.len().div_ceil(cfg.sub_group) } else { 0 };
                    let h = importance.map(|h| &h[g * cfg.group..g * cfg.group + x.len()]);
                    let (d, s, o) = quantize_group_weighted(x, h, cfg, &mut codes[..x.len()], &mut sub[..nsub]);
                    meta.push((s.to_bits(), o.to_bits(), d.id()));
                    subs.extend_from_slice(&sub[..nsub]);
                    for (i, &q) in codes[..x.len()].iter().enumerate() {
                        let col = g * cfg.group + i;
                        for p in 0..m {
                            if (q >> (m - 1 - p)) & 1 == 1 {
                                bits[p * rb + col / 8] |= 1 << (col % 8);
                            }
                        }
                    }
                }
                (bits, meta, subs)
            })
            .collect();
        let mut planes = vec![Vec::with_capacity(rows * rb); m];
        let (mut scales, mut offsets, mut dtypes) = (Vec::new(), Vec::new(), Vec::new());
        let mut sub =
            cfg.sub().map(|(size, bits)| SubScales::ints(size, bits, SubKind::Unsigned, Vec::new(), Vec::new()));
        for (bits, meta, subs) in per_row {
            for (p, plane) in planes.iter_mut().enumerate() {
                plane.extend_from_slice(&bits[p * rb..(p + 1) * rb]);
            }
            for (s, o, d) in meta {
                scales.push(s);
                offsets.push(o);
                dtypes.push(d);
            }
            if let Some(sub) = sub.as_mut() {
                for (sc, mn) in subs {
                    sub.scale.push(sc);
                    sub.offset.push(mn);
                }
            }
        }
        Ok(BitPlanes {
            rows,
            cols,
            group: cfg.group,
            master_bits: cfg.master_bits,
            planes,
            scales,
            offsets,
            dtypes,
            sub,
        })
    }

    /// Scale and offset of the weight in column `col` of `row`: the group's, refined by its
    /// sub-block's where the tensor has sub-scales. The one definition every reader follows.
    #[inline]
    pub fn scale_offset(&self, row: usize, col: usize) -> (f32, f32) {
        let meta = row * self.groups_per_row() + col / self.group;
        let s = f16::from_bits(self.scales[meta]).to_f32();
        let o = f16::from_bits(self.offsets[meta]).to_f32();
        match &self.sub {
            None => (s, o),
            Some(sub) => {
                let (sc, mn) = sub.multipliers(row * sub.per_row(self.cols) + col / sub.size);
                (s * sc, o * mn)
            }
        }
    }

    /// [`BitPlanes::scale_offset`] with the offset negated, `(S·sc, O·(−mn))`, so that the
    /// weight `scale·level − neg_offset` is computed in llama.cpp's order (`d1·q − m1`) and a
    /// transcoded GGUF tensor decodes to exactly its source's bits, signs of zeros included.
    #[inline]
    pub fn scale_neg_offset(&self, row: usize, col: usize) -> (f32, f32) {
        let meta = row * self.groups_per_row() + col / self.group;
        let s = f16::from_bits(self.scales[meta]).to_f32();
        let o = f16::from_bits(self.offsets[meta]).to_f32();
        match &self.sub {
            None => (s, -o),
            Some(sub) => {
                let (sc, nmn) = sub.neg_multipliers(row * sub.per_row(self.cols) + col / sub.size);
                (s * sc, o * nmn)
            }
        }
    }

    /// The master code of weight (`row`, `col`) as far as the first `r` planes tell.
    #[inline]
    pub fn code(&self, row: usize, col: usize, r: u32) -> u32 {
        let rb = row_bytes(self.cols);
        let mut q = 0u32;
        for plane in &self.planes[..r as usize] {
            q = (q << 1) | ((plane[row * rb + col / 8] >> (col % 8)) & 1) as u32;
        }
        q
    }

    /// Reference decode of the `r`-plane view into `out` (`rows × cols`). This is the meaning
    /// of the format; fast kernels are tested against it.
    pub fn dequantize(&self, r: u32, out: &mut [f32]) -> Result<()> {
        ensure!(r >= 1 && r <= self.master_bits, "cannot read {r} planes of a {}-plane tensor", self.master_bits);
        ensure!(out.len() == self.rows * self.cols, "output has the wrong size");
        let gpr = self.groups_per_row();
        let m = self.master_bits;
        out.par_chunks_mut(self.cols).enumerate().try_for_each(|(row, o)| -> Result<()> {
            for g in 0..gpr {
                let meta = row * gpr + g;
                let dtype = GroupDtype::from_id(self.dtypes[meta])?;
                ensure!(dtype.native_bits() <= m, "group datatype {dtype:?} does not fit {m} master bits");
                let grid = dtype.grid(m);
                let end = ((g + 1) * self.group).min(self.cols);
                for (col, v) in o.iter_mut().enumerate().take(end).skip(g * self.group) {
                    let (s, neg_off) = self.scale_neg_offset(row, col);
                    // Top r bits of the code, shifted back to master position for decode().
                    let q = self.code(row, col, r) << (m - r);
                    *v = s * grid.decode(q, r) - neg_off;
                }
            }
            Ok(())
        })
    }

    /// Stored bits per weight at precision `r`, everything counted: `r` planes (with row
    /// padding) plus 40 bits of metadata (f16 scale, f16 offset, u8 datatype) per group and
    /// `2·bits` per sub-block.
    pub fn bits_per_weight(&self, r: u32) -> f64 {
        let plane_bits = (row_bytes(self.cols) * 8 * self.rows) as f64 * r as f64;
        let sub_bits = self.sub.as_ref().map_or(0, |s| s.len() * s.bits_per_sub_block());
        let meta_bits = (self.scales.len() * 40 + sub_bits) as f64;
        (plane_bits + meta_bits) / (self.rows * self.cols) as f64
    }
}

/// Quantizes one group; writes master codes and returns the chosen datatype, scale, offset.
/// With sub-scales (`sub` holds one entry per sub-block of `x`), the returned scale and offset
/// are the group's `S` and `O`, and `sub` receives each sub-block's integer multipliers.
pub fn quantize_group(x: &[f32], cfg: &QuantConfig, codes: &mut [u8], sub: &mut [(u8, i8)]) -> (GroupDtype, f16, f16) {
    quantize_group_weighted(x, None, cfg, codes, sub)
}

/// [`quantize_group`] with per-weight importances `h` (see [`BitPlanes::quantize_weighted`]).
/// They change which datatype and scales win, not the code chosen for a weight once those are
/// fixed (scaling one weight's error does not move its minimum).
pub fn quantize_group_weighted(
    x: &[f32],
    h: Option<&[f32]>,
    cfg: &QuantConfig,
    codes: &mut [u8],
    sub: &mut [(u8, i8)],
) -> (GroupDtype, f16, f16) {
    let m = cfg.master_bits;
    let hw = |j: usize| -> f64 { h.map_or(1.0, |h| h[j] as f64) };
    // Per sub-block (the whole group without sub-scales): min, max.
    let size = if sub.is_empty() { x.len() } else { cfg.sub_group };
    let ranges: Vec<(f32, f32)> = x
        .chunks(size)
        .map(|c| c.iter().fold((f32::INFINITY, f32::NEG_INFINITY), |(a, b), &v| (a.min(v), b.max(v))))
        .collect();
    let mut best: Option<(f64, GroupDtype, f16, f16)> = None;
    let mut best_sub = sub.to_vec();
    let mut trial = sub.to_vec();
    for &d in &cfg.dtypes {
        let grid = d.grid(m);
        // The datatype's own scale and offset for a block of range (min, max).
        let base = |(min, max): (f32, f32)| -> (f32, f32) {
            if d.is_int() {
                let lv = grid.master();
                ((max - min) / (lv[lv.len() - 1] - lv[0]), (max + min) / 2.0)
            } else {
                (min.abs().max(max.abs()) / d.native_absmax(), 0.0)
            }
        };
        for &mult in &cfg.scale_search {
            let (err, s16, o16) = if sub.is_empty() {
                let (bs, bo) = base(ranges[0]);
                let (s, o) = stored_scale(bs * mult, bo);
                let e = x
                    .iter()
                    .enumerate()
                    .map(|(j, &v)| hw(j) * objective(v, grid.nearest((v - o) / s), grid, s, o, &cfg.objective))
                    .sum();
                (e, f16::from_f32(s), f16::from_f32(o))
            } else {
                let wanted: Vec<(f32, f32)> = ranges.iter().map(|&r| base(r)).map(|(s, o)| (s * mult, o)).collect();
                let (s16, o16) = two_level(&wanted, cfg.sub_bits, &mut trial);
                // Summed sub-block by sub-block; a candidate already worse than the best is
                // dropped early (the sum only grows, so the choice is the same).
                let mut e = 0f64;
                for (k, (c, &(sc, mn))) in x.chunks(size).zip(&trial).enumerate() {
                    let (s, o) = (s16.to_f32() * sc as f32, o16.to_f32() * mn as f32);
                    e += c
                        .iter()
                        .enumerate()
                        .map(|(j, &v)| {
                            hw(k * size + j) * objective(v, grid.nearest((v - o) / s), grid, s, o, &cfg.objective)
                        })
                        .sum::<f64>();
                    if best.as_ref().is_some_and(|b| e >= b.0) {
                        break;
                    }
                }
                (e, s16, o16)
            };
            if best.as_ref().is_none_or(|b| err < b.0) {
                best = Some((err, d, s16, o16));
                best_sub.copy_from_slice(&trial);
            }
        }
    }
    let (_, d, s16, o16) = best.expect("at least one datatype");
    sub.copy_from_slice(&best_sub);
    let grid = d.grid(m);
    for (k, (cs, xs)) in codes.chunks_mut(size).zip(x.chunks(size)).enumerate() {
        let (s, o) = match sub.get(k) {
            Some(&(sc, mn)) => (s16.to_f32() * sc as f32, o16.to_f32() * mn as f32),
            None => (s16.to_f32(), o16.to_f32()),
        };
        for (c, &v) in cs.iter_mut().zip(xs) {
            *c = best_code(v, grid, s, o, &cfg.objective) as u8;
        }
    }
    (d, s16, o16)
}

/// Splits wanted per-sub-block (scale, offset) pairs into a group's f16 `S`, `O` and integer
/// multipliers of `bits` bits: scales in `1..2^bits`, offsets in `±(2^(bits−1) − 1)`.
fn two_level(wanted: &[(f32, f32)], bits: u32, out: &mut [(u8, i8)]) -> (f16, f16) {
    let smax = ((1u32 << bits) - 1) as f32;
    let omax = ((1u32 << (bits - 1)) - 1) as f32;
    let top_s = wanted.iter().fold(0f32, |a, w| a.max(w.0));
    let top_o = wanted.iter().fold(0f32, |a, w| a.max(w.1.abs()));
    let (s, o) = stored_scale(top_s / smax, if omax > 0.0 { top_o / omax } else { 0.0 });
    for (t, &(ws, wo)) in out.iter_mut().zip(wanted) {
        let sc = (ws / s).round().clamp(1.0, smax);
        let mn = if o > 0.0 { (wo / o).round().clamp(-omax, omax) } else { 0.0 };
        *t = (sc as u8, mn as i8);
    }
    (f16::from_f32(s), f16::from_f32(o))
}

/// Rounds scale and offset to what will be stored (f16), keeping the scale usable.
fn stored_scale(s: f32, o: f32) -> (f32, f32) {
    let s = f16::from_f32(s).to_f32();
    let s = if s.is_finite() && s > 0.0 { s } else { f16::MIN_POSITIVE_SUBNORMAL.to_f32() };
    (s, f16::from_f32(o).to_f32())
}

#[inline]
fn objective(v: f32, q: u32, grid: &super::dtype::Grid, s: f32, o: f32, obj: &[(u32, f32)]) -> f64 {
    let m = grid.master_bits;
    obj.iter()
        .map(|&(r, l)| {
            let e = (v - (s * grid.view(r)[(q >> (m - r)) as usize] + o)) as f64;
            l as f64 * e * e
        })
        .sum()
}

/// The code minimizing the objective: the nearest master code, or the nearest code inside a
/// neighbouring coarse bucket when moving across the bucket boundary helps the coarse views.
fn best_code(v: f32, grid: &super::dtype::Grid, s: f32, o: f32, obj: &[(u32, f32)]) -> u32 {
    let m = grid.master_bits;
    let q0 = grid.nearest((v - o) / s);
    let mut best = (objective(v, q0, grid, s, o, obj), q0);
    for &(r, _) in obj {
        if r >= m {
            continue;
        }
        let d = m - r;
        let bucket = q0 >> d;
        for b in [bucket.wrapping_sub(1), bucket + 1] {
            if b >= (1 << r) {
                continue;
            }
            let q = q0.clamp(b << d, ((b + 1) << d) - 1);
            let e = objective(v, q, grid, s, o, obj);
            if e < best.0 {
                best = (e, q);
            }
        }
    }
    best.1
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn bitmod4() -> QuantConfig {
        QuantConfig {
            group: 8,
            master_bits: 4,
            dtypes: vec![GroupDtype::Fp4ErPos, GroupDtype::Fp4ErNeg, GroupDtype::Fp4EaPos, GroupDtype::Fp4EaNeg],
            objective: vec![(4, 1.0)],
            scale_search: vec![1.0],
            sub_group: 0,
            sub_bits: 0,
        }
    }

    fn bitmod3() -> QuantConfig {
        QuantConfig {
            master_bits: 3,
            dtypes: vec![GroupDtype::Fp3ErPos, GroupDtype::Fp3ErNeg, GroupDtype::Fp3EaPos, GroupDtype::Fp3EaNeg],
            objective: vec![(3, 1.0)],
            ..bitmod4()
        }
    }

    /// The notes' test vectors (BitMoD RTN selection, §1.2): type, scale, codes.
    fn check(cfg: &QuantConfig, w: [f32; 8], want: GroupDtype, scale: f32, q: [f32; 8]) {
        let mut codes = [0u8; 8];
        let (d, s, o) = quantize_group(&w, cfg, &mut codes, &mut []);
        assert_eq!(d, want, "{w:?}");
        assert!((s.to_f32() - scale).abs() < scale * 1e-3, "scale {} vs {scale}", s.to_f32());
        assert_eq!(o.to_f32(), 0.0);
        let grid = d.grid(cfg.master_bits);
        let got: Vec<f32> = codes.iter().map(|&c| grid.decode(c as u32, cfg.master_bits)).collect();
        assert_eq!(got, q);
    }

    #[test]
    fn bitmod_selection_reproduces_the_reference_vectors() {
        check(
            &bitmod4(),
            [1.0, 0.5, 0.25, -0.5, -0.75, 0.75, 0.375, -0.1875],
            GroupDtype::Fp4EaPos,
            0.0625,
            [16., 8., 4., -8., -12., 12., 6., -3.],
        );
        check(
            &bitmod4(),
            [-1.0, -10.0 / 12.0, 0.5, 0.25, -0.25, 2.0 / 12.0, 8.0 / 12.0, -1.0 / 12.0],
            GroupDtype::Fp4ErNeg,
            1.0 / 12.0,
            [-12., -10., 6., 3., -3., 2., 8., -1.],
        );
        check(
            &bitmod3(),
            [1.0, 0.75, -0.5, 0.25, -1.0, 0.0, 0.5, -0.25],
            GroupDtype::Fp3ErPos,
            0.25,
            [4., 3., -2., 1., -4., 0., 2., -1.],
        );
        let w = [0.8, 0.11, -0.23, 0.37, 0.05, -0.14, 0.52, -0.31];
        check(&bitmod4(), w, GroupDtype::Fp4ErPos, 0.8 / 12.0, [12., 2., -3., 6., 1., -2., 8., -4.]);
        check(&bitmod3(), w, GroupDtype::Fp3EaPos, 0.8 / 6.0, [6., 1., -2., 2., 0., -1., 4., -2.]);
    }

    fn cfg_all(m: u32, group: usize) -> QuantConfig {
        let dtypes = super::super::dtype::ALL.iter().copied().filter(|d| d.native_bits() <= m).collect();
        QuantConfig {
            group,
            master_bits: m,
            dtypes,
            objective: QuantConfig::default_objective(m),
            scale_search: vec![1.0, 0.9],
            sub_group: 0,
            sub_bits: 0,
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]
        /// Nesting: for every datatype, master width and r, with and without sub-block scales,
        /// the r-plane view of each weight is exactly the r-bit decode of its stored code's top
        /// r bits.
        #[test]
        fn planes_nest(m in 2u32..=8, rows in 1usize..4, groups in 1usize..4, tail in 0usize..2, two_level in any::<bool>(), seed in any::<u64>()) {
            use rand::{Rng, SeedableRng};
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            let cols = groups * 16 + tail * 8;
            let w: Vec<f32> = (0..rows * cols).map(|_| rng.random_range(-2.0f32..2.0).powi(3)).collect();
            let mut cfg = cfg_all(m, 16);
            if two_level {
                (cfg.sub_group, cfg.sub_bits) = (8, 4);
            }
            let bp = BitPlanes::quantize(&w, rows, cols, &cfg).unwrap();
            prop_assert_eq!(bp.sub.is_some(), two_level);
            let gpr = bp.groups_per_row();
            for r in 1..=m {
                let mut out = vec![0f32; rows * cols];
                bp.dequantize(r, &mut out).unwrap();
                for row in 0..rows {
                    for col in 0..cols {
                        let meta = row * gpr + col / 16;
                        let d = GroupDtype::from_id(bp.dtypes[meta]).unwrap();
                        let full = bp.code(row, col, m);
                        let (s, o) = bp.scale_offset(row, col);
                        let want = s * d.grid(m).view(r)[(full >> (m - r)) as usize] + o;
                        prop_assert_eq!(out[row * cols + col], want);
                    }
                }
            }
        }

        /// The packed sub-scale stream decodes to exactly what was packed, for every width.
        #[test]
        fn sub_scales_pack_round_trip(bits in SUB_BITS_MIN..=SUB_BITS_MAX, n in 0usize..40, seed in any::<u64>()) {
            use rand::{Rng, SeedableRng};
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            let smax = (1u32 << bits) - 1;
            let omax = (1i32 << (bits - 1)) - 1;
            let s = SubScales::ints(
                32,
                bits,
                SubKind::Unsigned,
                (0..n).map(|_| rng.random_range(1..=smax) as u8).collect(),
                (0..n).map(|_| rng.random_range(-omax..=omax) as i8).collect(),
            );
            let packed = s.pack();
            prop_assert_eq!(packed.len(), (n * 2 * bits as usize).div_ceil(8));
            prop_assert_eq!(SubScales::unpack(&packed, 32, bits, SubKind::Unsigned, n).unwrap(), s);
            // Signed scales: any two's complement value of the width.
            let lo = -(1i32 << (bits - 1));
            let s = SubScales::ints(
                16,
                bits,
                SubKind::Signed,
                (0..n).map(|_| rng.random_range(lo..=omax) as i8 as u8).collect(),
                (0..n).map(|_| rng.random_range(lo..=omax) as i8).collect(),
            );
            prop_assert_eq!(SubScales::unpack(&s.pack(), 16, bits, SubKind::Signed, n).unwrap(), s);
            // f16 pairs.
            let h = SubScales {
                size: 32,
                bits: 16,
                kind: SubKind::Half,
                scale: Vec::new(),
                offset: Vec::new(),
                half_scale: (0..n).map(|_| rng.random()).collect(),
                half_offset: (0..n).map(|_| rng.random()).collect(),
            };
            prop_assert_eq!(h.pack().len(), 4 * n);
            prop_assert_eq!(SubScales::unpack(&h.pack(), 32, 16, SubKind::Half, n).unwrap(), h);
        }
    }

    /// A matrix quantized upstream in blocks of 32 with unrelated scales (as this model's Q4_1
    /// source is): sub-scales of 32 recover most of what groups of 256 lose, at a fraction of
    /// the metadata of groups of 32.
    #[test]
    fn sub_scales_follow_blockwise_sources() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        let (rows, cols) = (32, 512);
        let mut w = vec![0f32; rows * cols];
        for block in w.chunks_mut(32) {
            let (d, min) = (rng.random_range(0.001f32..0.02), rng.random_range(-0.15f32..-0.01));
            for v in block.iter_mut() {
                *v = min + d * rng.random_range(0..16) as f32;
            }
        }
        let nmse = |cfg: &QuantConfig| -> (f64, f64) {
            let bp = BitPlanes::quantize(&w, rows, cols, cfg).unwrap();
            let mut out = vec![0f32; rows * cols];
            bp.dequantize(4, &mut out).unwrap();
            let err: f64 = w.iter().zip(&out).map(|(a, b)| ((a - b) as f64).powi(2)).sum();
            (err / w.iter().map(|a| (*a as f64).powi(2)).sum::<f64>(), bp.bits_per_weight(4))
        };
        let int4 = |group| QuantConfig::new(group, 4, vec![GroupDtype::Int]);
        let (flat, flat_bpw) = nmse(&int4(256));
        let (fine, fine_bpw) = nmse(&int4(32));
        let (two, two_bpw) = nmse(&QuantConfig { sub_group: 32, sub_bits: 5, ..int4(256) });
        assert!((two_bpw - (4.0 + 120.0 / 256.0)).abs() < 1e-9, "{two_bpw}");
        assert!(two_bpw < 4.5 && fine_bpw > 5.2 && flat_bpw < two_bpw);
        assert!(two < flat / 4.0, "two-level {two} vs groups of 256 {flat}");
        assert!(two < fine * 20.0, "two-level {two} vs groups of 32 {fine}");
    }

    #[test]
    fn more_planes_never_hurt_on_average() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        let (rows, cols) = (64, 256);
        let w: Vec<f32> =
            (0..rows * cols).map(|_| rng.random_range(-1.0f32..1.0) * rng.random_range(0.0f32..1.0)).collect();
        for cfg in [cfg_all(8, 128), cfg_all(4, 128)] {
            let bp = BitPlanes::quantize(&w, rows, cols, &cfg).unwrap();
            let mut prev = f64::INFINITY;
            for r in 2..=cfg.master_bits {
                let mut out = vec![0f32; rows * cols];
                bp.dequantize(r, &mut out).unwrap();
                let mse: f64 = w.iter().zip(&out).map(|(a, b)| ((a - b) as f64).powi(2)).sum::<f64>() / w.len() as f64;
                assert!(mse < prev, "m={} r={r}: {mse} ≥ {prev}", cfg.master_bits);
                prev = mse;
            }
        }
    }
}

//! Per-group datatypes and the one nesting rule that makes every precision a view of the same
//! codes.
//!
//! A datatype is a sorted *native grid* of `2^nb` levels (BitMoD's FP4/FP3 grids, or the
//! two-level grid from which uniform INT grows). A master of `m ≥ nb` bits subdivides each
//! native level's cell uniformly, so codes stay sorted by value and the top `nb` bits of a code
//! name its native level. Reading only the top `r` planes of a code `q` means knowing only the
//! bucket `q >> (m − r)`; **the `r`-bit view decodes a bucket to the mean of the master levels
//! in it.** For uniform grids that mean is the bucket centre (the "LSB-augmented" slice: no
//! bias, no extra plane); for BitMoD it is the exact BitMoD level at `r = nb` and the mean of
//! neighbouring levels below.

use std::sync::OnceLock;

use anyhow::{Result, bail};

/// The datatype a group of weights is stored in. The discriminant is the on-disk id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[repr(u8)]
pub enum GroupDtype {
    /// Asymmetric uniform integer (scale and offset per group).
    Int = 0,
    Fp4ErPos = 1,
    Fp4ErNeg = 2,
    Fp4EaPos = 3,
    Fp4EaNeg = 4,
    Fp3ErPos = 5,
    Fp3ErNeg = 6,
    Fp3EaPos = 7,
    Fp3EaNeg = 8,
    /// Unsigned integer codes as llama.cpp stores them, level `q` for code `q` (`Q4_1`,
    /// `Q5_1`, `Q2_K`, `Q4_K`, `Q5_K`): scale and offset come from the tensor's source.
    Uint = 9,
    /// Signed integer codes, level `q − 2^(m−1)` (`Q4_0`, `Q5_0`, `Q8_0`, `Q3_K`, `Q6_K`).
    Sint = 10,
    /// llama.cpp's IQ4_NL / IQ4_XS levels ([`IQ4_LEVELS`]), a fixed non-uniform 4-bit grid.
    Iq4 = 11,
}

/// The non-uniform levels of llama.cpp's `IQ4_NL` and `IQ4_XS` (`kvalues_iq4nl`).
pub const IQ4_LEVELS: [f32; 16] =
    [-127., -104., -83., -65., -49., -35., -22., -10., 1., 13., 25., 38., 53., 69., 89., 113.];

/// BitMoD's grids, in the paper's code units (FP4 values are twice E2M1's).
pub const FP4_ER_POS: [f32; 16] = [-12., -8., -6., -4., -3., -2., -1., 0., 1., 2., 3., 4., 6., 8., 10., 12.];
pub const FP4_ER_NEG: [f32; 16] = [-12., -10., -8., -6., -4., -3., -2., -1., 0., 1., 2., 3., 4., 6., 8., 12.];
pub const FP4_EA_POS: [f32; 16] = [-12., -8., -6., -4., -3., -2., -1., 0., 1., 2., 3., 4., 6., 8., 12., 16.];
pub const FP4_EA_NEG: [f32; 16] = [-16., -12., -8., -6., -4., -3., -2., -1., 0., 1., 2., 3., 4., 6., 8., 12.];
pub const FP3_ER_POS: [f32; 8] = [-4., -2., -1., 0., 1., 2., 3., 4.];
pub const FP3_ER_NEG: [f32; 8] = [-4., -3., -2., -1., 0., 1., 2., 4.];
pub const FP3_EA_POS: [f32; 8] = [-4., -2., -1., 0., 1., 2., 4., 6.];
pub const FP3_EA_NEG: [f32; 8] = [-6., -4., -2., -1., 0., 1., 2., 4.];

pub const ALL: [GroupDtype; 9] = [
    GroupDtype::Int,
    GroupDtype::Fp4ErPos,
    GroupDtype::Fp4ErNeg,
    GroupDtype::Fp4EaPos,
    GroupDtype::Fp4EaNeg,
    GroupDtype::Fp3ErPos,
    GroupDtype::Fp3ErNeg,
    GroupDtype::Fp3EaPos,
    GroupDtype::Fp3EaNeg,
];

/// The datatypes of tensors transcoded from GGUF: their levels are the source's integer codes.
pub const GGML: [GroupDtype; 3] = [GroupDtype::Uint, GroupDtype::Sint, GroupDtype::Iq4];

/// Every datatype, indexed by id: what a file may name.
pub const EVERY: [GroupDtype; 12] = [
    GroupDtype::Int,
    GroupDtype::Fp4ErPos,
    GroupDtype::Fp4ErNeg,
    GroupDtype::Fp4EaPos,
    GroupDtype::Fp4EaNeg,
    GroupDtype::Fp3ErPos,
    GroupDtype::Fp3ErNeg,
    GroupDtype::Fp3EaPos,
    GroupDtype::Fp3EaNeg,
    GroupDtype::Uint,
    GroupDtype::Sint,
    GroupDtype::Iq4,
];

pub const MAX_BITS: u32 = 8;

impl GroupDtype {
    pub fn from_id(id: u8) -> Result<Self> {
        match EVERY.get(id as usize) {
            Some(d) => Ok(*d),
            None => bail!("unknown group datatype id {id}"),
        }
    }
    pub fn id(self) -> u8 {
        self as u8
    }
    pub fn is_int(self) -> bool {
        self == GroupDtype::Int
    }
    /// One of BitMoD's floating-point grids (what `--dtypes bitmod` selects).
    pub fn is_bitmod(self) -> bool {
        ALL.contains(&self) && !self.is_int()
    }
    /// Sorted native levels.
    pub fn native(self) -> &'static [f32] {
        use GroupDtype::*;
        match self {
            Int => &[-0.5, 0.5],
            Fp4ErPos => &FP4_ER_POS,
            Fp4ErNeg => &FP4_ER_NEG,
            Fp4EaPos => &FP4_EA_POS,
            Fp4EaNeg => &FP4_EA_NEG,
            Fp3ErPos => &FP3_ER_POS,
            Fp3ErNeg => &FP3_ER_NEG,
            Fp3EaPos => &FP3_EA_POS,
            Fp3EaNeg => &FP3_EA_NEG,
            // Integer codes have no native grid to subdivide (see `master_levels`); any width
            // from one bit on is valid.
            Uint => &[0.0, 1.0],
            Sint => &[-1.0, 0.0],
            Iq4 => &IQ4_LEVELS,
        }
    }
    /// Bits of the native grid; a master must have at least this many.
    pub fn native_bits(self) -> u32 {
        self.native().len().trailing_zeros()
    }
    /// The largest magnitude of the native grid: BitMoD maps the group's absmax onto it.
    pub fn native_absmax(self) -> f32 {
        self.native().iter().fold(0f32, |a, v| a.max(v.abs()))
    }

    /// Decoding tables of this datatype for an `m`-bit master (cached).
    pub fn grid(self, m: u32) -> &'static Grid {
        static GRIDS: OnceLock<Vec<Grid>> = OnceLock::new();
        let all = GRIDS.get_or_init(|| {
            let mut v = Vec::new();
            for d in EVERY {
                for m in 1..=MAX_BITS {
                    v.push(Grid::build(d, m));
                }
            }
            v
        });
        assert!(
            (1..=MAX_BITS).contains(&m) && m >= self.native_bits(),
            "{self:?} needs at least {} master bits",
            self.native_bits()
        );
        &all[self.id() as usize * MAX_BITS as usize + (m - 1) as usize]
    }
}

/// All views of one datatype at one master width.
pub struct Grid {
    pub dtype: GroupDtype,
    pub master_bits: u32,
    /// `views[r]` has `2^r` entries: the value of each `r`-bit bucket (`views[0]` is unused).
    views: Vec<Vec<f32>>,
    /// Search accelerator for [`Grid::nearest`]: for each of `LUT_BINS` equal bins over the
    /// master range, the number of master levels below the bin's left edge.
    lut: Vec<u16>,
    lut_lo: f32,
    lut_scale: f32,
}

const LUT_BINS: usize = 4096;

impl Grid {
    fn build(dtype: GroupDtype, m: u32) -> Grid {
        let native = dtype.native();
        let nb = dtype.native_bits();
        if m < nb {
            return Grid { dtype, master_bits: m, views: vec![], lut: vec![], lut_lo: 0.0, lut_scale: 0.0 };
        }
        let k = m - nb;
        let sub = 1usize << k;
        let mut master = Vec::with_capacity(1 << m);
        let half = (1i32 << m) / 2;
        match dtype {
            GroupDtype::Uint => master.extend((0..1i32 << m).map(|q| q as f32)),
            GroupDtype::Sint => master.extend((0..1i32 << m).map(|q| (q - half) as f32)),
            _ => {}
        }
        let subdivide = master.is_empty();
        for (i, &v) in native.iter().enumerate().filter(|_| subdivide) {
            // Half-width of the cell: the distance to the nearer neighbour's midpoint, so that
            // subdivided cells never overlap and codes stay sorted by value.
            let lo = if i > 0 { (v - native[i - 1]) / 2.0 } else { f32::INFINITY };
            let hi = if i + 1 < native.len() { (native[i + 1] - v) / 2.0 } else { f32::INFINITY };
            let h = lo.min(hi);
            for j in 0..sub {
                master.push(v + h * ((2 * j + 1) as f32 / sub as f32 - 1.0));
            }
        }
        let mut views = vec![Vec::new(); m as usize + 1];
        for r in 1..=m {
            let width = 1usize << (m - r);
            views[r as usize] = master
                .chunks(width)
                .map(|b| (b.iter().map(|&x| x as f64).sum::<f64>() / width as f64) as f32)
                .collect();
        }
        let (lo, hi) = (master[0], master[master.len() - 1]);
        let lut_scale = LUT_BINS as f32 / (hi - lo);
        let lut = (0..LUT_BINS)
            .map(|b| {
                let edge = lo + b as f32 / lut_scale;
                master.partition_point(|&v| v < edge) as u16
            })
            .collect();
        Grid { dtype, master_bits: m, views, lut, lut_lo: lo, lut_scale }
    }

    /// Values of the `r`-bit buckets, sorted ascending.
    #[inline]
    pub fn view(&self, r: u32) -> &[f32] {
        &self.views[r as usize]
    }
    /// All master levels, sorted ascending.
    pub fn master(&self) -> &[f32] {
        self.view(self.master_bits)
    }
    /// Value of master code `q` read at `r` planes.
    #[inline]
    pub fn decode(&self, q: u32, r: u32) -> f32 {
        self.views[r as usize][(q >> (self.master_bits - r)) as usize]
    }
    /// The master code whose level is nearest to `x` (ties to the lower code).
    pub fn nearest(&self, x: f32) -> u32 {
        let m = self.master();
        // Start from the count below the bin's left edge (≤ the answer), then step up: the same
        // result as a binary search, in one or two comparisons.
        let bin = ((x - self.lut_lo) * self.lut_scale).clamp(0.0, (LUT_BINS - 1) as f32) as usize;
        let mut i = if x.is_nan() { 0 } else { self.lut[bin] as usize };
        while i < m.len() && m[i] < x {
            i += 1;
        }
        if i == 0 {
            0
        } else if i == m.len() {
            (m.len() - 1) as u32
        } else if x - m[i - 1] <= m[i] - x {
            (i - 1) as u32
        } else {
            i as u32
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bitmod_grids_are_the_papers() {
        // Mirror property: NEG = −POS.
        for (p, n) in [
            (&FP4_ER_POS[..], &FP4_ER_NEG[..]),
            (&FP4_EA_POS, &FP4_EA_NEG),
            (&FP3_ER_POS, &FP3_ER_NEG),
            (&FP3_EA_POS, &FP3_EA_NEG),
        ] {
            let mut neg: Vec<f32> = p.iter().map(|v| -v).collect();
            neg.sort_by(f32::total_cmp);
            assert_eq!(neg, n);
        }
        // FP4 E2M1 (×2) plus exactly one special value: ±10 (ER) or ±16 (EA).
        let e2m1 = [-12., -8., -6., -4., -3., -2., -1., 0., 1., 2., 3., 4., 6., 8., 12.];
        for (g, sv) in [(FP4_ER_POS, 10.), (FP4_ER_NEG, -10.), (FP4_EA_POS, 16.), (FP4_EA_NEG, -16.)] {
            let rest: Vec<f32> = g.iter().copied().filter(|&v| v != sv).collect();
            assert_eq!(rest, e2m1);
        }
        assert_eq!(GroupDtype::Fp4EaPos.native_absmax(), 16.0);
        assert_eq!(GroupDtype::Fp3ErPos.native_absmax(), 4.0);
        assert_eq!(GroupDtype::Fp3EaNeg.native_absmax(), 6.0);
    }

    #[test]
    fn native_view_is_the_native_grid_at_every_master_width() {
        for d in ALL.into_iter().chain([GroupDtype::Iq4]) {
            for m in d.native_bits().max(1)..=MAX_BITS {
                let g = d.grid(m);
                assert_eq!(g.view(d.native_bits()), d.native(), "{d:?} m={m}");
                assert!(g.master().windows(2).all(|w| w[0] < w[1]), "{d:?} m={m}: master levels sorted");
            }
        }
    }

    #[test]
    fn int_views_are_bucket_centres_of_a_uniform_grid() {
        // The ±1 bit-plane identity: dropping low planes gives the centre of the coarser bucket.
        for m in 1..=8u32 {
            let g = GroupDtype::Int.grid(m);
            for q in 0..(1u32 << m) {
                let full = g.decode(q, m) as f64;
                assert!((full - (2.0 * q as f64 + 1.0 - (1u64 << m) as f64) / (1u64 << m) as f64).abs() < 1e-6);
                for r in 1..=m {
                    let d = m - r;
                    let centre = (((q >> d) << d) as f64 + ((1u64 << d) as f64 - 1.0) / 2.0) * 2.0 / (1u64 << m) as f64
                        + 1.0 / (1u64 << m) as f64
                        - 1.0;
                    assert!((g.decode(q, r) as f64 - centre).abs() < 1e-6, "m={m} q={q} r={r}");
                }
            }
        }
    }

    #[test]
    fn nearest_equals_a_full_scan() {
        for d in ALL {
            for m in [d.native_bits(), 4.max(d.native_bits()), 8] {
                let g = d.grid(m);
                let lv = g.master();
                let span = lv[lv.len() - 1] - lv[0];
                for i in 0..20000 {
                    let x = lv[0] - span * 0.1 + span * 1.2 * i as f32 / 20000.0;
                    let want = (0..lv.len())
                        .min_by(|&a, &b| (lv[a] - x).abs().total_cmp(&(lv[b] - x).abs()).then(a.cmp(&b)))
                        .unwrap();
                    assert_eq!(g.nearest(x) as usize, want, "{d:?} m={m} x={x}");
                }
            }
        }
    }

    #[test]
    fn ggml_levels_are_the_codes_and_views_are_bucket_means() {
        for m in 1..=8u32 {
            let (u, s) = (GroupDtype::Uint.grid(m), GroupDtype::Sint.grid(m));
            for q in 0..1u32 << m {
                assert_eq!(u.decode(q, m), q as f32);
                assert_eq!(s.decode(q, m), q as f32 - (1u32 << (m - 1)) as f32);
                for r in 1..=m {
                    let d = m - r;
                    let mean = ((q >> d) << d) as f32 + ((1u32 << d) - 1) as f32 / 2.0;
                    assert_eq!(u.decode(q, r), mean, "m={m} q={q} r={r}");
                }
            }
        }
        assert_eq!(GroupDtype::Iq4.grid(4).master(), IQ4_LEVELS);
        assert_eq!(GroupDtype::Iq4.grid(4).view(1), [-61.875, 50.125]);
        assert!(GroupDtype::from_id(12).is_err());
    }

    #[test]
    fn nearest_picks_the_closest_level() {
        let g = GroupDtype::Fp4ErPos.grid(4);
        assert_eq!(g.master()[g.nearest(9.1) as usize], 10.0);
        assert_eq!(g.master()[g.nearest(8.9) as usize], 8.0);
        assert_eq!(g.master()[g.nearest(9.0) as usize], 8.0, "ties go to the lower level, as BitMoD");
        assert_eq!(g.nearest(-100.0), 0);
        assert_eq!(g.nearest(100.0), 15);
    }
}

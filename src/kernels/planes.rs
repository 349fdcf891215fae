//! Bit-serial linear layer: computes straight from the bit planes of a `.bnest` tensor, so the
//! work and the bytes read fall with the number of planes.
//!
//! For every output row and weight group the kernel
//! 1. rebuilds the `r`-bit codes of 64 weights from `r` plane words, one masked byte add per
//!    plane (AVX-512: `kmov` + `vpaddb{k}`), so the cost is linear in `r`; with GFNI the
//!    decode loop instead transposes 8 × 8 bit matrices of plane bytes into codes
//!    (`vgf2p8affineqb`, one per 64 weights whatever `r`, after a byte permute or two);
//! 2. maps codes to unsigned 8-bit *levels* through the group datatype's table at `r` bits
//!    (`vpermb` / `vpermi2b`; skipped where the table is the identity, as for uniform INT);
//! 3. takes the exact integer dot product with the activations, quantized to int8 once per
//!    matmul per group (`vpdpbusd`, u8 × s8);
//! 4. turns the group's integer sum into f32 with the group's scale and offset.
//!
//! A level stands for `μ·(level − z)` in the datatype's native units, with `μ` and `z` per
//! (datatype, `r`). Uniform grids and BitMoD grids at or below their native width map onto
//! 8-bit levels exactly; BitMoD views wider than their native grid (5–8 bits of an FP4 group)
//! are rounded to the nearest of 256 evenly spaced levels, at most half a level off.
//!
//! Because the integer part is exact and the float part is the same short sequence of scalar
//! or lane-wise operations in every path, the AVX-512, AVX2 and scalar paths agree bit for bit,
//! and a token's result does not depend on the other tokens of the batch.

use std::ops::Range;
use std::sync::{Arc, OnceLock};

use half::f16;

pub use super::cpu::Isa;
use super::{Linear, SyncPtr};

mod acts;
use crate::quant::bitplane::{BitPlanes, SubKind, SubScales, row_bytes};
use crate::quant::dtype::{EVERY as ALL, GroupDtype, MAX_BITS};
pub use acts::{Q8MAX, QMAX, QuantActs};

/// Rows computed together: they share the activation loads and one transpose-reduce.
pub const TILE: usize = 16;
/// Largest group the kernel takes: keeps every group's integer sum `Σ level·q` (levels < 2^8,
/// |q| < 2^14) inside an i32.
pub const MAX_GROUP: usize = 256;

/// The code → level table of one datatype read at `r` bits, and what a level means.
#[repr(C, align(64))]
pub struct Levels {
    pub table: [u8; 256],
    /// A level `l` stands for `mu · (l − z)` native units.
    pub mu: f32,
    pub z: f32,
    /// The table is `l = code` (uniform grids), so the lookup can be skipped.
    pub identity: bool,
    /// Every level is represented exactly.
    pub exact: bool,
}

impl Levels {
    fn build(values: &[f32]) -> Levels {
        let (lo, hi) = (values[0], values[values.len() - 1]);
        let mut table = [0u8; 256];
        // Evenly spaced levels (uniform INT at any width) are the codes themselves.
        let step = if values.len() > 1 { values[1] - values[0] } else { 1.0 };
        if values.windows(2).all(|w| w[1] - w[0] == step) {
            for (i, t) in table.iter_mut().enumerate().take(values.len()) {
                *t = i as u8;
            }
            return Levels { table, mu: step, z: -lo / step, identity: true, exact: true };
        }
        // Exact when some power of two turns every value into an integer spanning ≤ 255.
        for k in 0..=16 {
            let f = (1u32 << k) as f64;
            let ints: Vec<f64> = values.iter().map(|&v| v as f64 * f).collect();
            if ints.iter().all(|x| x.fract() == 0.0) && ints[ints.len() - 1] - ints[0] <= 255.0 {
                for (t, x) in table.iter_mut().zip(&ints) {
                    *t = (x - ints[0]) as u8;
                }
                let identity = table.iter().take(values.len()).enumerate().all(|(i, &t)| t as usize == i);
                return Levels { table, mu: (1.0 / f) as f32, z: (-ints[0]) as f32, identity, exact: true };
            }
        }
        let mu = (hi - lo) / 255.0;
        for (t, &v) in table.iter_mut().zip(values) {
            *t = ((v - lo) / mu).round().clamp(0.0, 255.0) as u8;
        }
        Levels { table, mu, z: -lo / mu, identity: false, exact: false }
    }

    /// Tables of datatype `d` with an `m`-bit master, read at `r` bits (cached).
    pub fn get(d: GroupDtype, m: u32, r: u32) -> &'static Levels {
        static ALL_LEVELS: OnceLock<Vec<Option<Levels>>> = OnceLock::new();
        let all = ALL_LEVELS.get_or_init(|| {
            let mut v = Vec::new();
            for d in ALL {
                for m in 1..=MAX_BITS {
                    for r in 1..=MAX_BITS {
                        v.push((m >= d.native_bits() && r <= m).then(|| Levels::build(d.grid(m).view(r))));
                    }
                }
            }
            v
        });
        let i = (d.id() as usize * MAX_BITS as usize + (m - 1) as usize) * MAX_BITS as usize + (r - 1) as usize;
        all[i].as_ref().expect("datatype tables exist for every valid (master, r)")
    }
}

/// Per-group metadata of one tile of [`TILE`] rows, stored together so one load serves the tile.
#[derive(Clone, Copy, Default)]
#[repr(C)]
struct TileMeta {
    scale: [u16; TILE],
    offset: [u16; TILE],
    dtype: [u8; TILE],
}

/// The activation block, and the larger sub-block size the kernel takes: half a 64-column
/// chunk. Sub-blocks of 16 (llama.cpp's `Q2_K`, `Q3_K`, `Q6_K`) are taken too.
pub const SUB: usize = 32;
/// Largest group of a two-level layer the kernel takes (its batch path keeps a whole group's
/// transposed codes on the stack).
pub const MAX_SUB_GROUP: usize = 2048;

/// Sub-block multipliers of a layer, tile-major like [`TileMeta`]: entry `tile · spr + k` holds
/// sub-block `k` of the tile's 16 rows. `spr` counts `64 / size` sub-blocks per 64-column
/// chunk; those past the row's end are zero. Integer kinds fill `scale` and `offset` (the
/// scale's bytes are two's complement for [`SubKind::Signed`]), [`SubKind::Half`] the f16 pair.
struct SubMeta {
    spr: usize,
    /// Weights per sub-block: 32 or 16.
    size: usize,
    kind: SubKind,
    scale: Vec<[u8; TILE]>,
    offset: Vec<[i8; TILE]>,
    half_scale: Vec<[u16; TILE]>,
    half_offset: Vec<[u16; TILE]>,
}

impl SubMeta {
    /// Entry `e`'s multipliers of row `i` of the tile, as floats.
    #[inline(always)]
    fn multipliers(&self, e: usize, i: usize) -> (f32, f32) {
        match self.kind {
            SubKind::Unsigned => (self.scale[e][i] as f32, self.offset[e][i] as f32),
            SubKind::Signed => (self.scale[e][i] as i8 as f32, self.offset[e][i] as f32),
            SubKind::Half => {
                (f16::from_bits(self.half_scale[e][i]).to_f32(), f16::from_bits(self.half_offset[e][i]).to_f32())
            }
        }
    }

    /// [`SubMeta::multipliers`] with the offset's negated (`SubScales::neg_multipliers`).
    fn neg_multipliers(&self, e: usize, i: usize) -> (f32, f32) {
        match self.kind {
            SubKind::Half => {
                (f16::from_bits(self.half_scale[e][i]).to_f32(), -f16::from_bits(self.half_offset[e][i]).to_f32())
            }
            _ => (self.multipliers(e, i).0, (-(self.offset[e][i] as i32)) as f32),
        }
    }

    /// Sub-blocks per 64-column chunk.
    fn per_chunk(&self) -> usize {
        64 / self.size
    }
}

/// Tokens one parallel region of [`PlaneLinear::forward_shared`] takes: about 512 KiB of
/// quantized activations (a byte a column), a multiple of eight (the batch kernels' block)
/// between 32 and 128.
fn token_chunk(cols: usize) -> usize {
    (512 * 1024 / cols.max(1)).clamp(32, 128) / 8 * 8
}

/// Most layers [`PlaneLinear::forward_shared`] takes at once.
pub const MAX_SHARED: usize = 4;

thread_local! {
    /// Quantized activations of the matmul running on this thread (grown once, reused).
    static ACTS: std::cell::RefCell<QuantActs> = std::cell::RefCell::new(QuantActs::default());
}

/// Bytes of planes: borrowed from a mapped `.bnest` file or owned.
type Store = Arc<dyn AsRef<[u8]> + Send + Sync>;

/// A `rows × cols` matrix stored as bit planes, computed on directly at any precision `r`
/// up to the planes stored.
pub struct PlaneLinear {
    rows: usize,
    cols: usize,
    group: usize,
    master_bits: u32,
    /// Precision used by [`Linear::forward`].
    bits: u32,
    store: Store,
    planes: Vec<Range<usize>>,
    row_bytes: usize,
    /// `tiles × groups`, rows past `rows` padded with zero scale and offset.
    meta: Vec<TileMeta>,
    sub: Option<SubMeta>,
    /// The first `bits` planes again, tile-interleaved for the rows-in-lanes loop; built for
    /// two-level layers on CPUs whose best path is [`Isa::Avx512Gfni`].
    quads: Option<QuadPlanes>,
    bias: Option<Vec<f32>>,
    /// Passes over the planes so far ([`Linear::weight_sweeps`]).
    sweeps: std::sync::atomic::AtomicU64,
}

/// Why a plane tensor cannot use this kernel (it then falls back to f32). `sub` is the
/// sub-block size and scale bits of two-level tensors (16 for f16 pairs).
pub fn unsupported(group: usize, sub: Option<(usize, u32)>) -> Option<String> {
    match sub {
        Some((16, bits)) => return unsupported(group, Some((SUB, bits))),
        Some((size, 16)) => return unsupported(group, Some((size, 8))),
        _ => {}
    }
    match sub {
        None => (!group.is_multiple_of(64) || group > MAX_GROUP)
            .then(|| format!("group size {group} (the bit-serial kernel needs a multiple of 64 up to {MAX_GROUP})")),
        // Multipliers are kept as bytes.
        Some((size, bits)) => {
            (size != SUB || !group.is_multiple_of(64) || group > MAX_SUB_GROUP || bits > 8).then(|| {
                format!(
                    "sub-blocks of {size} with {bits}-bit scales in groups of {group} (the bit-serial kernel needs \
                     sub-blocks of 16 or {SUB} with scales of at most 8 bits or f16, in groups that are a multiple \
                     of 64 up to {MAX_SUB_GROUP})"
                )
            })
        }
    }
}

impl PlaneLinear {
    /// Wraps planes lying in `store` (each range one plane, most significant first) with their
    /// per-group metadata (f16 scale and offset bits, datatype ids) and, for two-level tensors,
    /// their sub-block multipliers, read at `bits` planes.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        store: Store,
        planes: Vec<Range<usize>>,
        rows: usize,
        cols: usize,
        group: usize,
        scales: &[u16],
        offsets: &[u16],
        dtypes: &[u8],
        sub: Option<&SubScales>,
        bits: u32,
    ) -> anyhow::Result<Self> {
        use anyhow::ensure;
        if let Some(why) = unsupported(group, sub.map(|s| (s.size, s.bits))) {
            anyhow::bail!("{why}");
        }
        let master_bits = planes.len() as u32;
        ensure!((1..=MAX_BITS).contains(&master_bits), "{master_bits} planes");
        ensure!(bits >= 1 && bits <= master_bits, "cannot read {bits} planes of {master_bits}");
        let rb = row_bytes(cols);
        let len = (*store).as_ref().len();
        for p in &planes {
            ensure!(p.len() == rows * rb && p.end <= len, "plane range {p:?} does not hold {rows} rows");
        }
        let gpr = cols.div_ceil(group);
        ensure!(
            scales.len() == rows * gpr && offsets.len() == rows * gpr && dtypes.len() == rows * gpr,
            "group metadata does not match {rows} × {gpr} groups"
        );
        let tiles = rows.div_ceil(TILE);
        let mut meta = vec![TileMeta::default(); tiles * gpr];
        for row in 0..rows {
            for g in 0..gpr {
                let d = GroupDtype::from_id(dtypes[row * gpr + g])?;
                ensure!(d.native_bits() <= master_bits, "datatype {d:?} does not fit {master_bits} planes");
                let m = &mut meta[(row / TILE) * gpr + g];
                m.scale[row % TILE] = scales[row * gpr + g];
                m.offset[row % TILE] = offsets[row * gpr + g];
                m.dtype[row % TILE] = d.id();
            }
        }
        let l = PlaneLinear {
            rows,
            cols,
            group,
            master_bits,
            bits,
            store,
            planes,
            row_bytes: rb,
            meta,
            sub: None,
            quads: None,
            bias: None,
            sweeps: Default::default(),
        };
        match sub {
            Some(sub) => l.with_sub(sub),
            None => Ok(l),
        }
    }

    /// Adds the tile-interleaved copy of the planes read at [`PlaneLinear::bits`] when this
    /// CPU's best path computes from it (two-level layers, [`Isa::Avx512Gfni`]). `release`
    /// gets each row-major plane range the copy replaces (full tiles) as soon as it is
    /// copied: a mapped file can drop those pages then, so the weights are never resident
    /// twice, not even while loading.
    pub fn interleaved(mut self, mut release: impl FnMut(Range<usize>)) -> Self {
        if self.sub.is_some() && Isa::detect() == Isa::Avx512Gfni && self.rows >= TILE {
            self.quads = Some(QuadPlanes::build(&self, self.bits, &mut release));
        }
        self
    }

    /// Lays out a two-level tensor's sub-block multipliers tile-major.
    fn with_sub(mut self, sub: &SubScales) -> anyhow::Result<Self> {
        use anyhow::ensure;
        let per_row = sub.per_row(self.cols);
        ensure!(sub.size == SUB || sub.size == SUB / 2, "sub-blocks of {}", sub.size);
        let half = sub.kind == SubKind::Half;
        let n = self.rows * per_row;
        ensure!(
            if half {
                sub.half_scale.len() == n && sub.half_offset.len() == n
            } else {
                sub.scale.len() == n && sub.offset.len() == n
            },
            "sub-scales do not match the tensor"
        );
        let spr = self.cols.div_ceil(64) * (64 / sub.size);
        let tiles = self.rows.div_ceil(TILE);
        let slots = if half { 0 } else { tiles * spr };
        let mut scale = vec![[0u8; TILE]; slots];
        let mut offset = vec![[0i8; TILE]; slots];
        let hslots = if half { tiles * spr } else { 0 };
        let mut half_scale = vec![[0u16; TILE]; hslots];
        let mut half_offset = vec![[0u16; TILE]; hslots];
        for row in 0..self.rows {
            for k in 0..per_row {
                let (e, i, src) = ((row / TILE) * spr + k, row % TILE, row * per_row + k);
                if half {
                    half_scale[e][i] = sub.half_scale[src];
                    half_offset[e][i] = sub.half_offset[src];
                } else {
                    scale[e][i] = sub.scale[src];
                    offset[e][i] = sub.offset[src];
                }
            }
        }
        self.sub = Some(SubMeta { spr, size: sub.size, kind: sub.kind, scale, offset, half_scale, half_offset });
        Ok(self)
    }

    /// Owned copy of in-memory [`BitPlanes`] (tests, freshly quantized tensors).
    pub fn from_bitplanes(bp: &BitPlanes, bits: u32) -> anyhow::Result<Self> {
        let mut bytes = Vec::with_capacity(bp.planes.iter().map(Vec::len).sum());
        let mut ranges = Vec::new();
        for p in &bp.planes {
            ranges.push(bytes.len()..bytes.len() + p.len());
            bytes.extend_from_slice(p);
        }
        PlaneLinear::new(
            Arc::new(bytes),
            ranges,
            bp.rows,
            bp.cols,
            bp.group,
            &bp.scales,
            &bp.offsets,
            &bp.dtypes,
            bp.sub.as_ref(),
            bits,
        )
        .map(|l| l.interleaved(|_| {}))
    }

    pub fn with_bias(mut self, bias: Option<Vec<f32>>) -> Self {
        self.bias = bias;
        self
    }

    pub fn bits(&self) -> u32 {
        self.bits
    }
    pub fn master_bits(&self) -> u32 {
        self.master_bits
    }
    pub fn group(&self) -> usize {
        self.group
    }

    /// `y = W_r·x (+ b)` for `n` tokens at `r` planes with the given instruction set.
    pub fn forward_with(&self, x: &[f32], n: usize, y: &mut [f32], r: u32, isa: Isa) {
        PlaneLinear::forward_shared(&[self], x, n, &mut [y], &[r], isa);
    }

    /// `ys[i] = layers[i]·x (+ b)` at `bits[i]` planes, for up to [`MAX_SHARED`] layers that
    /// read the same input (query, key and value; gate and up): the activations are quantized
    /// once, and one parallel region covers the tiles of every layer. Each result is what
    /// [`PlaneLinear::forward_with`] gives for that layer alone.
    pub fn forward_shared(layers: &[&PlaneLinear], x: &[f32], n: usize, ys: &mut [&mut [f32]], bits: &[u32], isa: Isa) {
        let first = layers.first().expect("at least one layer");
        let (cols, group) = (first.cols, first.group);
        assert!(layers.len() <= MAX_SHARED && ys.len() == layers.len() && bits.len() == layers.len());
        // A long batch in chunks of tokens, each a pass over every tile: a chunk's quantized
        // activations stay in L2 while the tiles stream over them (with all of a 512-token
        // prompt at once they did not, and a tile's reads went to L3). Each token's result is
        // what it is alone, so chunking changes no bit.
        let chunk = token_chunk(cols);
        if n > chunk {
            for t0 in (0..n).step_by(chunk) {
                let m = chunk.min(n - t0);
                let mut parts: Vec<&mut [f32]> =
                    ys.iter_mut().zip(layers).map(|(y, l)| &mut y[t0 * l.rows..(t0 + m) * l.rows]).collect();
                PlaneLinear::forward_shared(layers, &x[t0 * cols..(t0 + m) * cols], m, &mut parts, bits, isa);
            }
            return;
        }
        for ((l, y), &r) in layers.iter().zip(ys.iter()).zip(bits) {
            assert!(l.cols == cols && l.group == group, "layers sharing an input have its width and group size");
            assert!(r >= 1 && r <= l.master_bits, "cannot read {r} planes of {}", l.master_bits);
            assert!(x.len() >= n * cols && y.len() >= n * l.rows);
            // One pass over every tile of the layer follows, for all n tokens.
            l.sweeps.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        ACTS.with_borrow_mut(|acts| {
            // Each form only where a layer reads it (a shared input has one kind in practice).
            if layers.iter().any(|l| l.sub.is_none()) {
                acts.quantize_with(&x[..n * cols], n, cols, group, isa);
            }
            if layers.iter().any(|l| l.sub.is_some()) {
                acts.quantize_blocks_with(&x[..n * cols], n, cols, isa);
            }
            let ctxs: [Option<Ctx>; MAX_SHARED] = std::array::from_fn(|i| layers.get(i).map(|l| Ctx::new(l, bits[i])));
            let outs: [SyncPtr; MAX_SHARED] =
                std::array::from_fn(|i| SyncPtr(ys.get_mut(i).map_or(std::ptr::null_mut(), |y| y.as_mut_ptr())));
            // Tiles of all layers, one after the other.
            let mut ends = [0usize; MAX_SHARED];
            let mut total = 0;
            for (i, l) in layers.iter().enumerate() {
                total += l.rows.div_ceil(TILE);
                ends[i] = total;
            }
            let acts = &*acts;
            let run = |tiles: std::ops::Range<usize>| {
                let mut li = 0;
                for t in tiles {
                    while t >= ends[li] {
                        li += 1;
                    }
                    let tile = t - if li == 0 { 0 } else { ends[li - 1] };
                    let ctx = ctxs[li].as_ref().expect("a context per layer");
                    // SAFETY: tiles write disjoint rows of their layer's output.
                    unsafe { ctx.tile(tile, acts, n, outs[li], isa) };
                }
            };
            // Long runs of tiles first (each streams a long stretch of planes), single tiles at
            // the end, so neither thread idles long waiting for the other.
            super::team::parallel_chunks(total, 1, run);
        });
        for (l, y) in layers.iter().zip(ys.iter_mut()) {
            if let Some(b) = &l.bias {
                for row in y[..n * l.rows].chunks_exact_mut(l.rows) {
                    row.iter_mut().zip(b).for_each(|(v, b)| *v += b);
                }
            }
        }
    }

    /// Decodes row `i` at `r` planes with exact f32 levels (embedding lookups).
    pub fn row_at(&self, i: usize, out: &mut [f32], r: u32) {
        let gpr = self.cols.div_ceil(self.group);
        let bytes = (*self.store).as_ref();
        for (g, og) in out[..self.cols].chunks_mut(self.group).enumerate() {
            let m = &self.meta[(i / TILE) * gpr + g];
            let d = GroupDtype::from_id(m.dtype[i % TILE]).expect("validated at construction");
            let view = d.grid(self.master_bits).view(r);
            let s = f16::from_bits(m.scale[i % TILE]).to_f32();
            let o = f16::from_bits(m.offset[i % TILE]).to_f32();
            for (j, v) in og.iter_mut().enumerate() {
                let col = g * self.group + j;
                // As `BitPlanes::dequantize`: scale·level − O·(−mn).
                let (s, neg_o) = match &self.sub {
                    None => (s, -o),
                    Some(sub) => {
                        let (sc, nmn) = sub.neg_multipliers((i / TILE) * sub.spr + col / sub.size, i % TILE);
                        (s * sc, o * nmn)
                    }
                };
                let mut c = 0usize;
                for (p, plane) in self.planes[..r as usize].iter().enumerate() {
                    let bit = match &self.quads {
                        // The interleaved copy, where there is one: the row-major pages it
                        // replaced stay untouched (and, from a file, not resident).
                        Some(q) if p < q.planes as usize && i < (self.rows / TILE) * TILE => {
                            q.bit(p, i, col, self.row_bytes)
                        }
                        _ => u64::from(bytes[plane.start + i * self.row_bytes + col / 8] >> (col % 8)) & 1,
                    };
                    c = (c << 1) | bit as usize;
                }
                *v = s * view[c] - neg_o;
            }
        }
    }
}

impl Linear for PlaneLinear {
    fn in_dim(&self) -> usize {
        self.cols
    }
    fn out_dim(&self) -> usize {
        self.rows
    }
    fn forward(&self, x: &[f32], n: usize, y: &mut [f32]) {
        self.forward_with(x, n, y, self.bits, Isa::detect());
    }
    fn bits(&self) -> Option<u32> {
        Some(self.bits)
    }
    fn as_planes(&self) -> Option<&PlaneLinear> {
        Some(self)
    }
    fn forward_capped(&self, x: &[f32], n: usize, y: &mut [f32], max_bits: u32) {
        self.forward_with(x, n, y, self.bits.min(max_bits.max(1)), Isa::detect());
    }
    fn weight_bytes(&self) -> usize {
        self.rows * self.row_bytes * self.bits as usize
            + self.meta.len() * std::mem::size_of::<TileMeta>()
            + self.sub.as_ref().map_or(0, |s| (s.scale.len() + s.half_scale.len() * 2) * 2 * TILE)
    }
    fn format_name(&self) -> String {
        match &self.sub {
            None => format!("planes {}/{} g{}", self.bits, self.master_bits, self.group),
            Some(s) => format!("planes {}/{} g{}/{}", self.bits, self.master_bits, self.group, s.size),
        }
    }
    fn row(&self, i: usize, out: &mut [f32]) {
        self.row_at(i, out, self.bits);
    }
    fn weight_sweeps(&self) -> Option<u64> {
        Some(self.sweeps.load(std::sync::atomic::Ordering::Relaxed))
    }
}

/// Everything a tile needs, resolved once per matmul.
struct Ctx<'a> {
    bytes: &'a [u8],
    /// Start of each plane read, most significant first (the first `r` entries).
    planes: [usize; MAX_BITS as usize],
    row_bytes: usize,
    rows: usize,
    cols: usize,
    group: usize,
    gpr: usize,
    meta: &'a [TileMeta],
    sub: Option<&'a SubMeta>,
    /// The tile-interleaved planes and bytes per plane, when they hold the `r` planes read.
    quads: Option<(&'a [u8], usize)>,
    r: u32,
    /// Per datatype id: its tables at `r`.
    levels: [&'static Levels; ALL.len()],
    /// `mu` and `z` of every datatype id at `r`, padded to 16 lanes for a vector permute.
    mu: [f32; 16],
    z: [f32; 16],
}

impl<'a> Ctx<'a> {
    fn new(l: &'a PlaneLinear, r: u32) -> Self {
        let levels = std::array::from_fn(|d| {
            let dt = ALL[d];
            // Datatypes wider than the master never occur (checked at construction); give
            // them any table.
            if dt.native_bits() <= l.master_bits {
                Levels::get(dt, l.master_bits, r)
            } else {
                Levels::get(ALL[0], l.master_bits, r)
            }
        });
        let mu = std::array::from_fn(|d| if d < ALL.len() { levels[d].mu } else { 0.0 });
        let z = std::array::from_fn(|d| if d < ALL.len() { levels[d].z } else { 0.0 });
        Ctx {
            mu,
            z,
            bytes: (*l.store).as_ref(),
            planes: std::array::from_fn(|p| l.planes.get(p).map_or(0, |p| p.start)),
            row_bytes: l.row_bytes,
            rows: l.rows,
            cols: l.cols,
            group: l.group,
            gpr: l.cols.div_ceil(l.group),
            meta: &l.meta,
            sub: l.sub.as_ref(),
            quads: l.quads.as_ref().filter(|q| r <= q.planes).map(|q| (q.bytes(), q.plane_len)),
            r,
            levels,
        }
    }

    /// Chunks of 64 columns in group `g`.
    fn chunks(&self, g: usize) -> Range<usize> {
        let start = g * self.group / 64;
        start..((g + 1) * self.group).min(self.cols).div_ceil(64)
    }

    /// The plane word holding columns `64·ch..` of `row` in plane `p`.
    #[inline(always)]
    fn word(&self, p: usize, row: usize, ch: usize) -> u64 {
        let at = self.planes[p] + row * self.row_bytes + ch * 8;
        u64::from_le_bytes(self.bytes[at..at + 8].try_into().unwrap())
    }

    /// The float part shared by every path: group scale and offset applied to an exact
    /// integer sum, accumulated in group order. `a` and `b` come from [`Ctx::ab`].
    #[inline(always)]
    fn term(dot: i32, a: f32, b: f32, d: f32, dsum: f32) -> f32 {
        (dot as f32) * (a * d) + b * dsum
    }

    /// `(A, B)` of one row's group: level `l` times `A` plus `B` is the weight.
    #[inline(always)]
    fn ab(&self, m: &TileMeta, i: usize) -> (f32, f32) {
        let d = m.dtype[i] as usize;
        let s = f16::from_bits(m.scale[i]).to_f32();
        let o = f16::from_bits(m.offset[i]).to_f32();
        let a = s * self.mu[d];
        (a, o - a * self.z[d])
    }

    /// `(A, z, O)` of one row's group in a two-level layer: level `l` of sub-block `k` is the
    /// weight `A·sc_k·(l − z) + O·mn_k`.
    #[inline(always)]
    fn azo(&self, m: &TileMeta, i: usize) -> (f32, f32, f32) {
        let d = m.dtype[i] as usize;
        let s = f16::from_bits(m.scale[i]).to_f32();
        (s * self.mu[d], self.z[d], f16::from_bits(m.offset[i]).to_f32())
    }

    /// One sub-block's float steps, shared by every path in this order: `dot` is the exact
    /// `Σ level·q` of the sub-block, `e` and `eq` the activations' step and step·`Σq`.
    /// Each sum is one fused multiply-add (one rounding), as the SIMD paths compute it.
    #[inline(always)]
    fn sub_step(acc: &mut [f32; 3], dot: i32, sc: f32, mn: f32, e: f32, eq: f32) {
        acc[0] = (dot as f32).mul_add(sc * e, acc[0]);
        acc[1] = sc.mul_add(eq, acc[1]);
        acc[2] = mn.mul_add(eq, acc[2]);
    }

    /// The float part of a two-level group, shared by every path: from `[F, T1, T2]` of
    /// [`Ctx::sub_step`] (summed in sub-block order), `A·(F − z·T1) + O·T2`.
    #[inline(always)]
    fn sub_term(acc: [f32; 3], a: f32, z: f32, o: f32) -> f32 {
        (acc[0] - z * acc[1]) * a + o * acc[2]
    }

    /// # Safety
    /// `out` must point to an `n × rows` buffer of which this call alone writes the tile's rows.
    unsafe fn tile(&self, tile: usize, acts: &QuantActs, n: usize, out: SyncPtr, isa: Isa) {
        let full = (tile + 1) * TILE <= self.rows;
        if let Some(sub) = self.sub {
            #[cfg(target_arch = "x86_64")]
            if full && sub.size == SUB / 2 && isa == Isa::Avx512Gfni && self.quads.is_some() {
                return unsafe { x86::tile_quads(self, sub, tile, acts, n, out) };
            }
            #[cfg(target_arch = "x86_64")]
            if full && sub.size == SUB / 2 && matches!(isa, Isa::Avx512 | Isa::Avx512Gfni) {
                return unsafe { x86::tile_sub_avx512(self, sub, tile, acts, n, out, isa == Isa::Avx512Gfni) };
            }
            #[cfg(target_arch = "x86_64")]
            if full && sub.size == SUB {
                match isa {
                    Isa::Avx512 => return unsafe { x86::tile_sub_avx512(self, sub, tile, acts, n, out, false) },
                    Isa::Avx512Gfni if self.quads.is_some() => {
                        return unsafe { x86::tile_quads(self, sub, tile, acts, n, out) };
                    }
                    Isa::Avx512Gfni => return unsafe { x86::tile_sub_avx512(self, sub, tile, acts, n, out, true) },
                    Isa::Avx2 if sub.kind == SubKind::Unsigned => {
                        return unsafe { x86::tile_sub_avx2(self, sub, tile, acts, n, out) };
                    }
                    Isa::Avx2 => {}
                    Isa::Scalar => {}
                }
            }
            return unsafe { self.tile_sub_scalar(sub, tile, acts, n, out) };
        }
        #[cfg(target_arch = "x86_64")]
        if full {
            match isa {
                Isa::Avx512 | Isa::Avx512Gfni => return unsafe { x86::tile_avx512(self, tile, acts, n, out) },
                Isa::Avx2 => return unsafe { x86::tile_avx2(self, tile, acts, n, out) },
                Isa::Scalar => {}
            }
        }
        let _ = (full, isa);
        unsafe { self.tile_scalar(tile, acts, n, out) }
    }

    /// `Σ level·q` of token `t` over columns `js` of chunk `ch` of `row`, for each activation
    /// byte array in `qs` (both halves of 15-bit activations, or the int8 of two-level layers):
    /// the exact integer part of the references, bit by bit.
    #[allow(clippy::too_many_arguments)]
    fn dot_scalar<const K: usize>(
        &self,
        row: usize,
        ch: usize,
        js: Range<usize>,
        t: usize,
        padded: usize,
        qs: [&[i8]; K],
        table: &[u8; 256],
    ) -> [i32; K] {
        let r = self.r as usize;
        let words: [u64; MAX_BITS as usize] = std::array::from_fn(|p| if p < r { self.word(p, row, ch) } else { 0 });
        let mut dot = [0i32; K];
        for j in js {
            let mut c = 0usize;
            for w in &words[..r] {
                c = (c << 1) | ((w >> j) & 1) as usize;
            }
            let at = t * padded + ch * 64 + j;
            for (d, q) in dot.iter_mut().zip(&qs) {
                *d += table[c] as i32 * q[at] as i32;
            }
        }
        dot
    }

    /// The reference: plain loops over rows, tokens, groups and columns.
    ///
    /// # Safety
    /// `out` must point to an `n × rows` buffer of which this call alone writes the tile's rows.
    unsafe fn tile_scalar(&self, tile: usize, acts: &QuantActs, n: usize, out: SyncPtr) {
        for i in 0..TILE {
            let row = tile * TILE + i;
            if row >= self.rows {
                break;
            }
            for t in 0..n {
                let mut acc = 0f32;
                for g in 0..self.gpr {
                    let m = &self.meta[tile * self.gpr + g];
                    let table = &self.levels[m.dtype[i] as usize].table;
                    let (mut hi, mut lo) = (0i32, 0i32);
                    for ch in self.chunks(g) {
                        let [h, l] = self.dot_scalar(row, ch, 0..64, t, acts.padded, [&acts.hi, &acts.lo], table);
                        (hi, lo) = (hi + h, lo + l);
                    }
                    let (a, b) = self.ab(m, i);
                    let k = t * acts.groups + g;
                    acc += Ctx::term(128 * hi + lo, a, b, acts.d[k], acts.dsum[k]);
                }
                unsafe { *out.get().add(t * self.rows + row) = acc };
            }
        }
    }
}

impl Ctx<'_> {
    /// The two-level reference: per sub-block of 32 an exact integer dot product, then
    /// [`Ctx::sub_term`] per group. Every sub-block slot of a chunk is visited, the empty one
    /// past a row's end included (its multipliers are zero), as the vector paths do.
    ///
    /// # Safety
    /// As [`Ctx::tile_scalar`].
    unsafe fn tile_sub_scalar(&self, sub: &SubMeta, tile: usize, acts: &QuantActs, n: usize, out: SyncPtr) {
        let blocks = acts.padded / SUB;
        for i in 0..TILE {
            let row = tile * TILE + i;
            if row >= self.rows {
                break;
            }
            for t in 0..n {
                let mut acc = 0f32;
                for g in 0..self.gpr {
                    let m = &self.meta[tile * self.gpr + g];
                    let table = &self.levels[m.dtype[i] as usize].table;
                    let mut fs = [0f32; 3];
                    let (pc, size) = (sub.per_chunk(), sub.size);
                    for ch in self.chunks(g) {
                        for part in 0..pc {
                            let k = pc * ch + part;
                            let js = part * size..(part + 1) * size;
                            let [dot] = self.dot_scalar(row, ch, js, t, acts.padded, [&acts.q8], table);
                            let (sc, mn) = sub.multipliers(tile * sub.spr + k, i);
                            // The activation block holding the sub-block, and the sub-block's Σq.
                            let b = t * blocks + k * size / SUB;
                            let eq = if size == SUB { acts.eq[b] } else { acts.eq16[2 * t * blocks + k] };
                            Ctx::sub_step(&mut fs, dot, sc, mn, acts.e[b], eq);
                        }
                    }
                    let (a, z, o) = self.azo(m, i);
                    acc += Ctx::sub_term(fs, a, z, o);
                }
                unsafe { *out.get().add(t * self.rows + row) = acc };
            }
        }
    }
}

mod quads;
use quads::QuadPlanes;

#[cfg(target_arch = "x86_64")]
// Index loops walk several parallel arrays (codes, accumulators, activations) in step.
#[allow(clippy::needless_range_loop)]
mod x86;

#[cfg(test)]
mod tests;

//! Lossless transcoding of a GGUF file into a `.bnest` file.
//!
//! Every quantized GGUF type bitnest reads is integer codes with per-block scales
//! ([`GgmlType::unpack_into`]): `w = (d·scale_k)·L[q] − dmin·(−min_k)`. The codes become bit planes,
//! most significant first, so the file decodes to exactly the source's weights and its top
//! planes are every lower precision of the same weights (the nesting rule of `docs/FORMAT.md`).
//!
//! | GGUF types | planes | group (`S`, `O`) | sub-blocks |
//! |---|---|---|---|
//! | `Q4_K`, `Q5_K`, `Q2_K` | 4, 5, 2 | 256 (`d`, `dmin`) | 32 / 16, unsigned scale, signed min |
//! | `Q6_K`, `Q3_K`, `IQ4_XS` | 6, 3, 4 | 256 (`d`, 0) | 16 / 32, signed scale |
//! | `Q4_0`, `Q4_1`, `Q5_0`, `Q5_1`, `Q8_0`, `IQ4_NL` | 4, 4, 5, 5, 8, 4 | the row (1, 1) | 32, the block's f16 `d` and `m` |
//!
//! Levels are [`GroupDtype::Uint`] (`q`), [`GroupDtype::Sint`] (`q − 2^(m−1)`) or
//! [`GroupDtype::Iq4`]. F32, F16 and BF16 tensors are stored as f32.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail, ensure};
use half::f16;
use indicatif::{ProgressBar, ProgressStyle};
use rayon::prelude::*;

use crate::format::bnest::{self, Header, TensorData};
use crate::format::gguf::{GgufFile, TensorInfo};
use crate::model::ModelSource;
use crate::quant::bitplane::{BitPlanes, QuantConfig, SubKind, SubScales, row_bytes};
use crate::quant::dtype::{GGML, GroupDtype};
use crate::quant::ggml::GgmlType;

/// The planes datatype whose master levels are `levels` (a GGUF type's level table).
fn dtype_for(levels: &[i32], bits: u32) -> Result<GroupDtype> {
    for d in GGML {
        if d.native_bits() <= bits {
            let master = d.grid(bits).master();
            if master.len() == levels.len() && master.iter().zip(levels).all(|(&a, &b)| a == b as f32) {
                return Ok(d);
            }
        }
    }
    bail!("no bit-plane datatype has the levels {levels:?}")
}

/// Group size of a row of `cols` weights whose sub-blocks carry their own f16 pair: one group
/// per row where the kernel takes it, else groups of 2048.
fn row_group(cols: usize) -> usize {
    cols.next_multiple_of(64).min(crate::kernels::planes::MAX_SUB_GROUP)
}

/// Transcodes one quantized GGUF tensor (`rows × cols`, row-major blocks) into bit planes
/// that decode to exactly its weights.
pub fn transcode_tensor(ty: GgmlType, bytes: &[u8], rows: usize, cols: usize) -> Result<BitPlanes> {
    let (Some(bits), Some(sub), Some(levels)) = (ty.code_bits(), ty.sub_block(), ty.levels()) else {
        bail!("{ty:?} has no integer form to transcode");
    };
    let (bw, bb) = (ty.block_size(), ty.block_bytes());
    ensure!(cols.is_multiple_of(bw), "{ty:?}: rows of {cols} are not whole blocks of {bw}");
    ensure!(bytes.len() == rows * cols / bw * bb, "{ty:?}: {} bytes for {rows}×{cols}", bytes.len());
    let dtype = dtype_for(levels, bits)?;
    // One sub-block per block: each block's own f16 scale and offset; else super-blocks.
    let half = bw == sub;
    let group = if half { row_group(cols) } else { bw };
    ensure!(half || sub == 16 || sub == 32, "{ty:?}: sub-blocks of {sub}");
    let signed = !half && !ty.has_min();
    let rb = row_bytes(cols);
    let m = bits as usize;
    let gpr = cols.div_ceil(group);
    let spr = cols / sub;
    let blocks_per_row = cols / bw;

    struct Row {
        planes: Vec<Vec<u8>>,
        scales: Vec<u16>,
        offsets: Vec<u16>,
        sc: Vec<u8>,
        mn: Vec<i8>,
        hs: Vec<u16>,
        ho: Vec<u16>,
    }
    let one = f16::ONE.to_bits();
    let per_row: Vec<Result<Row>> = (0..rows)
        .into_par_iter()
        .map(|r| {
            let mut row = Row {
                planes: vec![vec![0u8; rb]; m],
                scales: Vec::with_capacity(gpr),
                offsets: Vec::with_capacity(gpr),
                sc: Vec::with_capacity(if half { 0 } else { spr }),
                mn: Vec::with_capacity(if half { 0 } else { spr }),
                hs: Vec::with_capacity(if half { spr } else { 0 }),
                ho: Vec::with_capacity(if half { spr } else { 0 }),
            };
            let mut codes = vec![0u8; bw];
            let mut scale = vec![0i32; bw / sub];
            let mut min = vec![0i32; bw / sub];
            let src = &bytes[r * blocks_per_row * bb..(r + 1) * blocks_per_row * bb];
            for (b, block) in src.chunks_exact(bb).enumerate() {
                let (d, dmin) = ty.unpack_into(block, &mut codes, &mut scale, &mut min)?;
                if half {
                    // w = (d·1)·L + dmin·min: the sub-block's scale is d, its offset dmin·min
                    // (min is 1 or 0: exact in f16). Without a minimum the offset is −0, so that
                    // `level·d − (−offset)` subtracts +0 and keeps a −0 product, as C does.
                    ensure!(scale[0] == 1 && (min[0] == 0 || min[0] == 1), "{ty:?}: unexpected block form");
                    row.hs.push(d.to_bits());
                    row.ho.push(if min[0] == 1 { dmin.to_bits() } else { f16::NEG_ZERO.to_bits() });
                } else {
                    row.scales.push(d.to_bits());
                    row.offsets.push(if ty.has_min() { dmin.to_bits() } else { 0 });
                    for (&s, &n) in scale.iter().zip(&min) {
                        let s8 = if signed {
                            ensure!((-128..=127).contains(&s), "{ty:?}: scale {s} does not fit a signed byte");
                            s as i8 as u8
                        } else {
                            ensure!((0..=255).contains(&s), "{ty:?}: scale {s} does not fit a byte");
                            s as u8
                        };
                        ensure!((-128..=127).contains(&n), "{ty:?}: minimum {n} does not fit a signed byte");
                        row.sc.push(s8);
                        row.mn.push(n as i8);
                    }
                }
                // Codes into planes, eight weights (one byte of every plane) at a time.
                let col0 = b * bw;
                for (j, c8) in codes.chunks_exact(8).enumerate() {
                    let at = (col0 + 8 * j) / 8;
                    for (p, plane) in row.planes.iter_mut().enumerate() {
                        let shift = m - 1 - p;
                        let mut byte = 0u8;
                        for (k, &c) in c8.iter().enumerate() {
                            byte |= ((c >> shift) & 1) << k;
                        }
                        plane[at] = byte;
                    }
                }
            }
            if half {
                row.scales = vec![one; gpr];
                row.offsets = vec![one; gpr];
            }
            Ok(row)
        })
        .collect();
    let mut planes = vec![Vec::with_capacity(rows * rb); m];
    let (mut scales, mut offsets) = (Vec::with_capacity(rows * gpr), Vec::with_capacity(rows * gpr));
    let (mut sc, mut mn, mut hs, mut ho) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for row in per_row {
        let row = row?;
        for (p, rp) in planes.iter_mut().zip(row.planes) {
            p.extend_from_slice(&rp);
        }
        scales.extend(row.scales);
        offsets.extend(row.offsets);
        sc.extend(row.sc);
        mn.extend(row.mn);
        hs.extend(row.hs);
        ho.extend(row.ho);
    }
    let sub = if half {
        SubScales {
            size: sub,
            bits: 16,
            kind: SubKind::Half,
            scale: Vec::new(),
            offset: Vec::new(),
            half_scale: hs,
            half_offset: ho,
        }
    } else {
        SubScales::ints(sub, 8, if signed { SubKind::Signed } else { SubKind::Unsigned }, sc, mn)
    };
    Ok(BitPlanes {
        rows,
        cols,
        group,
        master_bits: bits,
        planes,
        scales,
        offsets,
        dtypes: vec![dtype.id(); rows * gpr],
        sub: Some(sub),
    })
}

/// The tensor as stored in the `.bnest` file: planes for quantized matrices, f32 otherwise.
fn tensor_data(g: &GgufFile, t: &TensorInfo) -> Result<TensorData> {
    if t.shape.len() == 2 && t.dtype.code_bits().is_some() {
        let bp = transcode_tensor(t.dtype, g.tensor_bytes(t), t.shape[0], t.shape[1])?;
        return Ok(TensorData::Planes(bp));
    }
    Ok(TensorData::F32(g.tensor_f32(t)?))
}

/// What identifies a source file cheaply: its size and modification time. A transcoded file
/// records them, and is reused only while they match.
pub fn fingerprint(path: &Path) -> Result<String> {
    let md = std::fs::metadata(path).with_context(|| format!("cannot stat {}", path.display()))?;
    let mtime =
        md.modified().ok().and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok()).map_or(0, |d| d.as_nanos());
    Ok(format!("{}:{mtime}", md.len()))
}

/// Transcodes the GGUF file at `src` into the `.bnest` file `out` (written atomically). Every
/// tensor keeps its own width; the file's weights are bit-identical to the source's.
pub fn transcode_file(src: &Path, out: &Path, progress: bool) -> Result<()> {
    let source = ModelSource::open(src, None)?;
    let ModelSource::Gguf(g) = &source else { bail!("{} is not a GGUF file", src.display()) };
    let config = source.config()?;
    let tokenizer = source.tokenizer()?.to_embedded()?;
    let total: u64 = g.tensors.iter().map(|t| t.size_bytes as u64).sum();
    let bar = if progress { ProgressBar::new(total) } else { ProgressBar::hidden() };
    bar.set_style(
        ProgressStyle::with_template("transcoding into bit planes {bar:40} {bytes}/{total_bytes} {elapsed} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let mut tensors = Vec::with_capacity(g.tensors.len());
    let mut widest = 2;
    for whole in &g.tensors {
        bar.set_message(whole.name.clone());
        // Fused tensors (Phi-3's q/k/v, gate/up) become the model's separate matrices.
        for t in &crate::model::source::gguf_parts(g, whole) {
            let data = tensor_data(g, t).with_context(|| format!("tensor {} ({:?})", t.name, t.dtype))?;
            if let TensorData::Planes(bp) = &data {
                widest = widest.max(bp.master_bits);
            }
            tensors.push((t.name.clone(), t.shape.clone(), data));
        }
        bar.inc(whole.size_bytes as u64);
    }
    bar.set_message("writing");
    // What the header's quantization record says of a transcoded file: its widest tensor and
    // the datatypes it may use (each tensor's own width and layout are in its descriptor).
    let dtypes = GGML.iter().copied().filter(|d| d.native_bits() <= widest).collect();
    let mut quant = QuantConfig::new(256, widest, dtypes);
    quant.objective = vec![(widest, 1.0)];
    let name = src.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let header = Header {
        format_version: bnest::VERSION,
        config: serde_json::to_value(&config)?,
        tokenizer,
        chat_template: source.chat_template(),
        quant,
        source: format!("{name} (transcoded from GGUF; {})", fingerprint(src)?),
        tensors: Vec::new(),
    };
    bnest::write(out, header, tensors)?;
    bar.finish_and_clear();
    Ok(())
}

/// The `.bnest` file a GGUF model runs from: transcoded on first use, then reused. `None` when
/// the file holds no quantized matrix (an F16/F32 GGUF keeps the f32 path).
///
/// The file lies beside the source (`NAME.gguf` → `NAME.v6.bnest`, the format version in the
/// name) where that folder is writable, else in `$BITNEST_CACHE/transcoded/` under a name
/// keyed by a checksum of the source's first 16 MiB and its size. It is reused while its
/// header records the source's current size and modification time, and transcoded again
/// (atomically) otherwise, so a replaced source is never answered by a stale file.
pub fn cached_planes(src: &Path, progress: bool) -> Result<Option<PathBuf>> {
    let g = GgufFile::open(src)?;
    if !g.tensors.iter().any(|t| t.shape.len() == 2 && t.dtype.code_bits().is_some()) {
        return Ok(None);
    }
    drop(g);
    let stem = src.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "model".into());
    let name = format!("{stem}.v{}.bnest", bnest::VERSION);
    let beside = src.parent().map(|d| if d.as_os_str().is_empty() { Path::new(".") } else { d }).map(|d| d.join(&name));
    let fp = fingerprint(src)?;
    // The header alone: the full open (every section's checksum) happens once, when the model
    // loads.
    let fresh =
        |p: &Path| -> bool { bnest::BnestFile::read_header(p).is_ok_and(|h| h.source.ends_with(&format!("; {fp})"))) };
    if let Some(b) = beside.as_deref().filter(|b| fresh(b)) {
        return Ok(Some(b.to_path_buf()));
    }
    let cached = crate::fetch::cache_dir().join("transcoded").join(format!(
        "{stem}-{:08x}.v{}.bnest",
        head_crc(src)?,
        bnest::VERSION
    ));
    if fresh(&cached) {
        return Ok(Some(cached));
    }
    let target = match beside.filter(|b| dir_writable(b.parent().unwrap_or(Path::new(".")))) {
        Some(b) => b,
        None => {
            let dir = cached.parent().expect("a cache path has a parent");
            std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
            cached
        }
    };
    if progress {
        eprintln!("bitnest: transcoding {} into bit planes (once): {}", src.display(), target.display());
    }
    let t0 = std::time::Instant::now();
    transcode_file(src, &target, progress)?;
    if progress {
        eprintln!("bitnest: transcoded in {:.1} s", t0.elapsed().as_secs_f64());
    }
    Ok(Some(target))
}

/// CRC-32 of the first 16 MiB of a file (its GGUF header and first tensors).
fn head_crc(path: &Path) -> Result<u32> {
    use std::io::Read;
    let f = std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut buf = Vec::new();
    f.take(16 << 20).read_to_end(&mut buf)?;
    Ok(crc32fast::hash(&buf))
}

/// Whether a file can be created in `dir` (tried, not guessed from permission bits).
fn dir_writable(dir: &Path) -> bool {
    let probe = dir.join(format!(".bitnest-probe{}", std::process::id()));
    let ok = std::fs::File::create(&probe).is_ok();
    let _ = std::fs::remove_file(&probe);
    ok
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng, rngs::StdRng};

    /// Random blocks of `ty` with finite, moderate f16 fields.
    pub(crate) fn random_blocks(ty: GgmlType, n: usize, seed: u64) -> Vec<u8> {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut b: Vec<u8> = (0..n * ty.block_bytes()).map(|_| rng.random()).collect();
        for blk in b.chunks_exact_mut(ty.block_bytes()) {
            for &at in ty.f16_offsets() {
                let v = f16::from_f32(rng.random_range(-0.05f32..0.05)).to_bits().to_le_bytes();
                blk[at..at + 2].copy_from_slice(&v);
            }
        }
        b
    }

    const TYPES: [GgmlType; 11] = [
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q5_0,
        GgmlType::Q5_1,
        GgmlType::Q8_0,
        GgmlType::Q2_K,
        GgmlType::Q3_K,
        GgmlType::Q4_K,
        GgmlType::Q5_K,
        GgmlType::Q6_K,
        GgmlType::IQ4_NL,
    ];

    #[test]
    fn every_type_transcodes_to_the_exact_source_weights() {
        for ty in TYPES.into_iter().chain([GgmlType::IQ4_XS]) {
            for (rows, cols) in [(3, 512), (17, 1536), (2, 2560)] {
                let bytes = random_blocks(ty, rows * cols / ty.block_size(), ty.id() as u64 * 31 + cols as u64);
                let mut want = vec![0f32; rows * cols];
                ty.dequantize(&bytes, &mut want).unwrap();
                let bp = transcode_tensor(ty, &bytes, rows, cols).unwrap();
                assert_eq!(bp.master_bits, ty.code_bits().unwrap());
                let mut got = vec![0f32; rows * cols];
                bp.dequantize(bp.master_bits, &mut got).unwrap();
                // Bit for bit, signs of zeros included.
                for (i, (a, b)) in want.iter().zip(&got).enumerate() {
                    assert!(a.to_bits() == b.to_bits(), "{ty:?} {rows}x{cols} weight {i}: source {a:e}, planes {b:e}");
                }
                // And the kernel takes the layout.
                crate::kernels::PlaneLinear::from_bitplanes(&bp, bp.master_bits).unwrap();
            }
        }
    }

    #[test]
    fn lower_views_are_bucket_means_of_the_source_levels() {
        // A Q6_K tensor read at 4 planes: each weight is (d·sc)·(mean level of its bucket).
        let ty = GgmlType::Q6_K;
        let bytes = random_blocks(ty, 4, 9);
        let bp = transcode_tensor(ty, &bytes, 2, 512).unwrap();
        let mut got = vec![0f32; 1024];
        bp.dequantize(4, &mut got).unwrap();
        let c = ty.unpack(&bytes[..ty.block_bytes()]).unwrap();
        for (i, &code) in c.codes.iter().enumerate() {
            let q = code as i32;
            let mean = ((q >> 2) << 2) as f32 + 1.5 - 32.0;
            let want = c.d.to_f32() * c.scale[i / 16] as f32 * mean;
            assert!((got[i] - want).abs() <= 1e-6 * want.abs().max(1e-3), "weight {i}: {} vs {want}", got[i]);
        }
    }

    #[test]
    fn malformed_tensors_are_errors() {
        let ty = GgmlType::Q4_K;
        let bytes = random_blocks(ty, 2, 1);
        assert!(transcode_tensor(ty, &bytes[..bytes.len() - 1], 1, 512).is_err());
        assert!(transcode_tensor(ty, &bytes, 1, 300).is_err());
        assert!(transcode_tensor(GgmlType::F16, &[0; 4], 1, 2).is_err());
    }
}

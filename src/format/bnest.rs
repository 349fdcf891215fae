//! The `.bnest` file: one model, every precision. Specified in `docs/FORMAT.md`.
//!
//! Layout: a 32-byte preamble, a JSON header (config, tokenizer, chat template, quantization
//! settings, tensor descriptors), then 64-byte-aligned data sections. Every section carries a
//! CRC-32 checked at load. Bit planes of a tensor are separate sections, most significant
//! first, so reading `r` planes touches only the first `r` of them.

use std::fs::File;
use std::io::Write;
use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result, bail, ensure};
use memmap2::Mmap;
use serde::{Deserialize, Serialize};

use crate::quant::bitplane::{BitPlanes, QuantConfig, SUB_BITS_MAX, SUB_BITS_MIN, SubKind, SubScales, row_bytes};
use crate::quant::dtype::MAX_BITS;

pub const MAGIC: &[u8; 8] = b"BITNEST\0";
/// Written by this build. Version 2 added optional sub-block scales; version 3 added the kinds
/// of sub-block scales and the datatypes that GGUF tensors transcode into losslessly; version 4
/// the rope scaling in `config` and the optional tensors of Qwen3, Phi-3 and Llama 3.1 (rope
/// factors, head norms), which a version-3 reader would ignore and so run the model wrong
/// (`docs/FORMAT.md`); version 5 Gemma 3: `sliding_window` in `config`, the block's post norms,
/// and a SentencePiece tokenizer (`spm` in `tokenizer`), which a version-4 reader would ignore
/// in the same way. Older versions read as before.
pub const VERSION: u32 = 6;
const OLDEST_VERSION: u32 = 1;
const PREAMBLE: usize = 32;
const ALIGN: u64 = 64;
/// A header larger than this is not a header.
const MAX_HEADER: u64 = 256 << 20;

/// A byte range of the data section with its checksum.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
pub struct Section {
    pub offset: u64,
    pub len: u64,
    pub crc32: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Encoding {
    /// Plain little-endian f32 (norms, biases).
    F32 { data: Section },
    /// Nested bit planes with per-group f16 scale, f16 offset and u8 datatype id, and
    /// optionally second-level scales per sub-block.
    Planes {
        group: usize,
        master_bits: u32,
        planes: Vec<Section>,
        scales: Section,
        offsets: Section,
        dtypes: Section,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        sub: Option<SubSection>,
    },
}

/// Where a tensor's sub-block scales lie: [`SubScales::pack`]'s bit stream.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
pub struct SubSection {
    pub size: usize,
    pub bits: u32,
    /// Absent before version 3, where every sub-block scale was unsigned.
    #[serde(default, skip_serializing_if = "is_unsigned")]
    pub kind: SubKind,
    pub data: Section,
}

fn is_unsigned(k: &SubKind) -> bool {
    *k == SubKind::Unsigned
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TensorDesc {
    /// GGUF naming (`blk.3.attn_q.weight`).
    pub name: String,
    /// Row-major shape (`[rows, cols]` for matrices).
    pub shape: Vec<usize>,
    pub encoding: Encoding,
}

impl TensorDesc {
    /// Bits stored per weight when `r` planes are read: the planes (with row padding), every
    /// group's scale and offset (40 bits) and sub-block multipliers; 32 for an f32 tensor.
    pub fn bits_per_weight(&self, r: u32) -> f64 {
        let n: usize = self.shape.iter().product();
        match &self.encoding {
            Encoding::F32 { .. } => 32.0,
            Encoding::Planes { group, sub, .. } => {
                let (rows, cols) = (self.shape[0], self.shape[1]);
                let per_sub = |s: &SubSection| if s.kind == SubKind::Half { 32 } else { 2 * s.bits as usize };
                let sub_bits = sub.map_or(0, |s| rows * cols.div_ceil(s.size) * per_sub(&s));
                let bits = (rows * row_bytes(cols) * 8) as f64 * r as f64
                    + (rows * cols.div_ceil(*group)) as f64 * 40.0
                    + sub_bits as f64;
                bits / n as f64
            }
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Header {
    pub format_version: u32,
    /// The architecture's hyper-parameters, as the model layer writes and reads them
    /// (`model::LlamaConfig`); the format only carries them.
    pub config: serde_json::Value,
    /// See [`crate::tokenizer::Tokenizer::to_embedded`].
    pub tokenizer: serde_json::Value,
    pub chat_template: Option<String>,
    pub quant: QuantConfig,
    /// Where the weights came from (file name), for provenance.
    pub source: String,
    pub tensors: Vec<TensorDesc>,
}

/// Tensor payloads handed to the writer.
#[allow(clippy::large_enum_variant)] // built one at a time, moved straight into the writer
pub enum TensorData {
    F32(Vec<f32>),
    Planes(BitPlanes),
}

/// Writes a `.bnest` file atomically (temporary file, then rename).
pub fn write(path: &Path, mut header: Header, tensors: Vec<(String, Vec<usize>, TensorData)>) -> Result<()> {
    // Lay out the sections first, so the header can name their offsets.
    let mut blobs: Vec<Vec<u8>> = Vec::new();
    let mut cursor = 0u64;
    let mut place = |bytes: Vec<u8>, blobs: &mut Vec<Vec<u8>>| -> Section {
        let s = Section { offset: cursor, len: bytes.len() as u64, crc32: crc32fast::hash(&bytes) };
        cursor += (bytes.len() as u64).div_ceil(ALIGN) * ALIGN;
        blobs.push(bytes);
        s
    };
    header.tensors.clear();
    for (name, shape, data) in tensors {
        let encoding = match data {
            TensorData::F32(v) => {
                Encoding::F32 { data: place(v.iter().flat_map(|x| x.to_le_bytes()).collect(), &mut blobs) }
            }
            TensorData::Planes(bp) => {
                ensure!(
                    shape == [bp.rows, bp.cols],
                    "tensor {name}: planes are {}×{}, shape {shape:?}",
                    bp.rows,
                    bp.cols
                );
                let planes = bp.planes.into_iter().map(|p| place(p, &mut blobs)).collect();
                let scales = place(bp.scales.iter().flat_map(|x| x.to_le_bytes()).collect(), &mut blobs);
                let offsets = place(bp.offsets.iter().flat_map(|x| x.to_le_bytes()).collect(), &mut blobs);
                let dtypes = place(bp.dtypes, &mut blobs);
                let sub = bp.sub.map(|s| SubSection {
                    size: s.size,
                    bits: s.bits,
                    kind: s.kind,
                    data: place(s.pack(), &mut blobs),
                });
                Encoding::Planes { group: bp.group, master_bits: bp.master_bits, planes, scales, offsets, dtypes, sub }
            }
        };
        header.tensors.push(TensorDesc { name, shape, encoding });
    }
    let json = serde_json::to_vec(&header)?;
    let data_start = (PREAMBLE as u64 + json.len() as u64).div_ceil(ALIGN) * ALIGN;
    crate::format::write_atomic(path, |w| {
        w.write_all(MAGIC)?;
        w.write_all(&VERSION.to_le_bytes())?;
        w.write_all(&0u32.to_le_bytes())?;
        w.write_all(&(json.len() as u64).to_le_bytes())?;
        w.write_all(&crc32fast::hash(&json).to_le_bytes())?;
        w.write_all(&0u32.to_le_bytes())?;
        w.write_all(&json)?;
        let mut pos = PREAMBLE as u64 + json.len() as u64;
        let pad = |w: &mut dyn Write, pos: &mut u64| -> std::io::Result<()> {
            let target = pos.div_ceil(ALIGN) * ALIGN;
            w.write_all(&vec![0u8; (target - *pos) as usize])?;
            *pos = target;
            Ok(())
        };
        pad(w, &mut pos)?;
        debug_assert_eq!(pos, data_start);
        for (i, b) in blobs.iter().enumerate() {
            w.write_all(b)?;
            pos += b.len() as u64;
            // No padding after the last section: every byte of the file is then covered by a
            // length check, so any truncation is detected.
            if i + 1 < blobs.len() {
                pad(w, &mut pos)?;
            }
        }
        Ok(())
    })
}

/// An opened, validated `.bnest` file.
pub struct BnestFile {
    pub header: Header,
    /// Shared so that bit-plane layers can compute straight from the mapping (zero copy).
    mmap: Arc<Mmap>,
    data_start: u64,
}

/// Where a plane tensor's bytes lie in the mapped file, for kernels that read them in place.
pub struct PlaneRanges {
    pub map: Arc<Mmap>,
    pub group: usize,
    pub master_bits: u32,
    /// Byte ranges of every stored plane, most significant first.
    pub planes: Vec<std::ops::Range<usize>>,
    pub scales: std::ops::Range<usize>,
    pub offsets: std::ops::Range<usize>,
    pub dtypes: std::ops::Range<usize>,
}

impl BnestFile {
    /// True when `path` starts with the `.bnest` magic.
    pub fn sniff(path: &Path) -> bool {
        let mut buf = [0u8; 8];
        File::open(path).and_then(|mut f| std::io::Read::read_exact(&mut f, &mut buf)).is_ok() && &buf == MAGIC
    }

    /// The header alone (preamble and JSON, its checksum verified), without mapping or checking
    /// the data sections: what deciding whether a cached file is current needs.
    pub fn read_header(path: &Path) -> Result<Header> {
        use std::io::Read;
        let mut f = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
        let mut pre = [0u8; PREAMBLE];
        f.read_exact(&mut pre).context("file truncated: no preamble")?;
        ensure!(&pre[..8] == MAGIC, "bad magic: not a .bnest file");
        let version = u32::from_le_bytes(pre[8..12].try_into().unwrap());
        ensure!((OLDEST_VERSION..=VERSION).contains(&version), "unsupported .bnest version {version}");
        let hlen = u64::from_le_bytes(pre[16..24].try_into().unwrap());
        ensure!(hlen <= MAX_HEADER, "header length {hlen} is absurd");
        let mut json = vec![0u8; hlen as usize];
        f.read_exact(&mut json).context("file truncated inside the header")?;
        ensure!(
            crc32fast::hash(&json) == u32::from_le_bytes(pre[24..28].try_into().unwrap()),
            "header checksum mismatch"
        );
        serde_json::from_slice(&json).context("header is not valid JSON for this version")
    }

    pub fn open(path: &Path) -> Result<Self> {
        let f = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
        // SAFETY: read-only map; all accesses are bounds-checked below.
        let mmap = unsafe { Mmap::map(&f) }.with_context(|| format!("cannot map {}", path.display()))?;
        Self::parse(mmap).with_context(|| format!("invalid .bnest file {}", path.display()))
    }

    /// Parses a `.bnest` image held in memory (the fuzzer's entry point; tests).
    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        Self::parse(super::map_bytes(bytes)?).context("invalid .bnest file")
    }

    fn parse(mmap: Mmap) -> Result<Self> {
        let len = mmap.len() as u64;
        ensure!(len >= PREAMBLE as u64, "file truncated: {len} bytes, no preamble");
        ensure!(&mmap[..8] == MAGIC, "bad magic: not a .bnest file");
        let version = u32::from_le_bytes(mmap[8..12].try_into().unwrap());
        ensure!(
            (OLDEST_VERSION..=VERSION).contains(&version),
            "unsupported .bnest version {version} (this build reads {OLDEST_VERSION} to {VERSION})"
        );
        let hlen = u64::from_le_bytes(mmap[16..24].try_into().unwrap());
        ensure!(hlen <= MAX_HEADER, "header length {hlen} is absurd");
        ensure!(PREAMBLE as u64 + hlen <= len, "file truncated: header needs {hlen} bytes");
        let json = &mmap[PREAMBLE..PREAMBLE + hlen as usize];
        let crc = u32::from_le_bytes(mmap[24..28].try_into().unwrap());
        // Fuzz builds skip the checksums (`cargo fuzz` sets `cfg(fuzzing)`), or the fuzzer could
        // never get a mutated header or section past them to the checks that follow.
        ensure!(cfg!(fuzzing) || crc32fast::hash(json) == crc, "header checksum mismatch (file corrupted)");
        let header: Header = serde_json::from_slice(json).context("header is not valid JSON for this version")?;
        ensure!(header.config.is_object(), "header config is not an object");
        header.quant.validate()?;
        let data_start = (PREAMBLE as u64 + hlen).div_ceil(ALIGN) * ALIGN;
        let has_sub = header.tensors.iter().any(|t| matches!(t.encoding, Encoding::Planes { sub: Some(_), .. }));
        ensure!(version >= 2 || !has_sub, "sub-block scales in a version {version} file");
        let has_v3 = header.tensors.iter().any(|t| match &t.encoding {
            Encoding::Planes { sub: Some(s), .. } => s.kind != SubKind::Unsigned,
            _ => false,
        });
        ensure!(version >= 3 || !has_v3, "signed or f16 sub-block scales in a version {version} file");
        let file = BnestFile { header, mmap: Arc::new(mmap), data_start };
        for t in &file.header.tensors {
            file.validate_tensor(t).with_context(|| format!("tensor {}", t.name))?;
        }
        Ok(file)
    }

    fn section(&self, s: &Section) -> Result<&[u8]> {
        ensure!(s.offset.is_multiple_of(ALIGN), "section offset {} is not {ALIGN}-aligned", s.offset);
        let start = self.data_start.checked_add(s.offset).context("section offset overflows")?;
        let end = start.checked_add(s.len).context("section length overflows")?;
        ensure!(
            end <= self.mmap.len() as u64,
            "file truncated: section {start}..{end} beyond {} bytes",
            self.mmap.len()
        );
        let bytes = &self.mmap[start as usize..end as usize];
        ensure!(
            cfg!(fuzzing) || crc32fast::hash(bytes) == s.crc32,
            "checksum mismatch in section at {start} (file corrupted)"
        );
        // Checking the sum faulted the section in; give the pages back so that resident memory
        // reflects only what inference reads (fewer planes, less memory), not the whole file.
        #[cfg(unix)]
        // SAFETY: the map is read-only and file-backed, so dropped pages are simply read again
        // from the file on the next access; no data can be lost.
        unsafe {
            let _ =
                self.mmap.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, start as usize, s.len as usize);
        }
        Ok(bytes)
    }

    /// A section's bytes after [`BnestFile::open`] has checked its bounds and checksum, so
    /// reading tensors does not pay for a second CRC pass.
    fn bytes(&self, s: &Section) -> Result<&[u8]> {
        let start = (self.data_start + s.offset) as usize;
        self.mmap.get(start..start + s.len as usize).context("section outside the file")
    }

    fn validate_tensor(&self, t: &TensorDesc) -> Result<()> {
        let n: usize = t.shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d)).context("shape overflows")?;
        ensure!(!t.shape.is_empty() && n > 0 && n <= 1 << 40, "shape {:?} is invalid", t.shape);
        match &t.encoding {
            Encoding::F32 { data } => {
                ensure!(data.len == n as u64 * 4, "f32 data has {} bytes for {n} values", data.len);
                self.section(data)?;
            }
            Encoding::Planes { group, master_bits, planes, scales, offsets, dtypes, sub } => {
                ensure!(t.shape.len() == 2, "bit planes need a 2-D shape");
                ensure!(
                    (1..=MAX_BITS).contains(master_bits) && planes.len() == *master_bits as usize,
                    "{} planes for {master_bits} master bits",
                    planes.len()
                );
                ensure!(*group >= 8 && group.is_multiple_of(8), "group size {group} invalid");
                let (rows, cols) = (t.shape[0], t.shape[1]);
                let groups = (rows * cols.div_ceil(*group)) as u64;
                for p in planes {
                    ensure!(
                        p.len == (rows * row_bytes(cols)) as u64,
                        "plane has {} bytes, expected {}",
                        p.len,
                        rows * row_bytes(cols)
                    );
                    self.section(p)?;
                }
                ensure!(
                    scales.len == groups * 2 && offsets.len == groups * 2 && dtypes.len == groups,
                    "group metadata sizes do not match {groups} groups"
                );
                self.section(scales)?;
                self.section(offsets)?;
                self.section(dtypes)?;
                if let Some(s) = sub {
                    ensure!(
                        s.size >= 8 && s.size < *group && group.is_multiple_of(s.size),
                        "sub-block size {} does not divide group size {group}",
                        s.size
                    );
                    let n = (rows * cols.div_ceil(s.size)) as u64;
                    let want = match s.kind {
                        SubKind::Half => n * 4,
                        _ => {
                            ensure!(
                                (SUB_BITS_MIN..=SUB_BITS_MAX).contains(&s.bits),
                                "sub-scale bits {} out of range",
                                s.bits
                            );
                            (n * 2 * s.bits as u64).div_ceil(8)
                        }
                    };
                    ensure!(s.data.len == want, "sub-scales have {} bytes for {n} sub-blocks", s.data.len);
                    self.section(&s.data)?;
                }
            }
        }
        Ok(())
    }

    pub fn tensor(&self, name: &str) -> Option<&TensorDesc> {
        self.header.tensors.iter().find(|t| t.name == name)
    }

    /// The f32 values of an `F32` tensor, or an error for other encodings.
    pub fn f32_data(&self, t: &TensorDesc) -> Result<Vec<f32>> {
        match &t.encoding {
            Encoding::F32 { data } => {
                Ok(self.bytes(data)?.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect())
            }
            _ => bail!("tensor {} is not stored as f32", t.name),
        }
    }

    /// The bit planes of a `Planes` tensor, reading only the first `r` planes (the others
    /// are left empty: they are never touched).
    pub fn planes(&self, t: &TensorDesc, r: u32) -> Result<BitPlanes> {
        let Encoding::Planes { group, master_bits, planes, scales, offsets, dtypes, .. } = &t.encoding else {
            bail!("tensor {} is not stored as bit planes", t.name)
        };
        ensure!(r >= 1 && r <= *master_bits, "tensor {} has {master_bits} planes; cannot read {r}", t.name);
        let u16s = |s: &Section| -> Result<Vec<u16>> {
            Ok(self.bytes(s)?.chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]])).collect())
        };
        let mut pl = Vec::with_capacity(*master_bits as usize);
        for (i, p) in planes.iter().enumerate() {
            pl.push(if i < r as usize { self.bytes(p)?.to_vec() } else { Vec::new() });
        }
        Ok(BitPlanes {
            rows: t.shape[0],
            cols: t.shape[1],
            group: *group,
            master_bits: *master_bits,
            planes: pl,
            scales: u16s(scales)?,
            offsets: u16s(offsets)?,
            dtypes: self.bytes(dtypes)?.to_vec(),
            sub: self.sub_scales(t)?,
        })
    }

    /// The sub-block multipliers of a two-level `Planes` tensor; `None` for other tensors.
    pub fn sub_scales(&self, t: &TensorDesc) -> Result<Option<SubScales>> {
        let Encoding::Planes { sub: Some(s), .. } = &t.encoding else { return Ok(None) };
        let n = t.shape[0] * t.shape[1].div_ceil(s.size);
        Ok(Some(SubScales::unpack(self.bytes(&s.data)?, s.size, s.bits, s.kind, n)?))
    }

    /// The byte ranges of a `Planes` tensor inside the shared mapping (bounds and checksums
    /// were checked at open).
    pub fn plane_ranges(&self, t: &TensorDesc) -> Result<PlaneRanges> {
        let Encoding::Planes { group, master_bits, planes, scales, offsets, dtypes, .. } = &t.encoding else {
            bail!("tensor {} is not stored as bit planes", t.name)
        };
        let range = |s: &Section| -> Result<std::ops::Range<usize>> {
            let start = (self.data_start + s.offset) as usize;
            let end = start + s.len as usize;
            ensure!(end <= self.mmap.len(), "section outside the file");
            Ok(start..end)
        };
        Ok(PlaneRanges {
            map: self.mmap.clone(),
            group: *group,
            master_bits: *master_bits,
            planes: planes.iter().map(range).collect::<Result<_>>()?,
            scales: range(scales)?,
            offsets: range(offsets)?,
            dtypes: range(dtypes)?,
        })
    }

    /// All-in bits per weight when read with `plan`: the planes read (with row padding), every
    /// group's metadata and every f32 tensor, over all parameters.
    pub fn bits_per_weight(&self, bits_for: impl Fn(&str, u32) -> Result<u32>) -> Result<f64> {
        let (mut bits, mut params) = (0f64, 0f64);
        for t in &self.header.tensors {
            let n: usize = t.shape.iter().product();
            params += n as f64;
            let r = match &t.encoding {
                Encoding::F32 { .. } => 0,
                Encoding::Planes { master_bits, .. } => bits_for(&t.name, *master_bits)?,
            };
            bits += t.bits_per_weight(r) * n as f64;
        }
        Ok(bits / params)
    }

    /// Size of the file in bytes.
    pub fn file_bytes(&self) -> usize {
        self.mmap.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::LlamaConfig;
    use crate::quant::dtype::ALL;
    use rand::{Rng, SeedableRng, rngs::StdRng};

    fn config() -> LlamaConfig {
        LlamaConfig {
            arch: "llama".into(),
            n_layers: 1,
            dim: 64,
            n_heads: 4,
            n_kv_heads: 2,
            head_dim: 16,
            ffn_dim: 96,
            vocab_size: 128,
            rope_base: 10000.0,
            rms_eps: 1e-5,
            max_seq: 256,
            rope_style: Default::default(),
            rope_scaling: Default::default(),
            sliding_window: None,
            query_scale: None,
            moe: None,
        }
    }

    fn quant() -> QuantConfig {
        QuantConfig {
            group: 32,
            master_bits: 6,
            dtypes: ALL.to_vec(),
            objective: QuantConfig::default_objective(6),
            scale_search: vec![1.0, 0.9],
            sub_group: 0,
            sub_bits: 0,
        }
    }

    /// Writes a file with two plane tensors (one with sub-block scales) and one f32 tensor;
    /// returns it and the originals.
    fn sample(dir: &Path) -> (std::path::PathBuf, BitPlanes, BitPlanes, Vec<f32>) {
        let mut rng = StdRng::seed_from_u64(9);
        let (rows, cols) = (24, 80);
        let w: Vec<f32> = (0..rows * cols).map(|_| rng.random_range(-1.0f32..1.0).powi(3)).collect();
        let planes = BitPlanes::quantize(&w, rows, cols, &quant()).unwrap();
        let two_level = QuantConfig { sub_group: 8, sub_bits: 5, ..quant() };
        let sub_planes = BitPlanes::quantize(&w, rows, cols, &two_level).unwrap();
        assert!(sub_planes.sub.is_some());
        let norm: Vec<f32> = (0..64).map(|i| 1.0 + i as f32 / 100.0).collect();
        let header = Header {
            format_version: VERSION,
            config: serde_json::to_value(config()).unwrap(),
            tokenizer: serde_json::json!({"note": "not needed by the format layer"}),
            chat_template: Some("{{ messages }}".into()),
            quant: quant(),
            source: "test".into(),
            tensors: vec![],
        };
        let path = dir.join("t.bnest");
        let tensors = vec![
            ("blk.0.attn_q.weight".to_string(), vec![rows, cols], TensorData::Planes(planes.clone())),
            ("blk.0.attn_norm.weight".to_string(), vec![64], TensorData::F32(norm.clone())),
            ("blk.0.attn_k.weight".to_string(), vec![rows, cols], TensorData::Planes(sub_planes.clone())),
        ];
        write(&path, header, tensors).unwrap();
        (path, planes, sub_planes, norm)
    }

    #[test]
    fn write_then_read_is_bit_exact() {
        let dir = tempfile::tempdir().unwrap();
        let (path, planes, sub_planes, norm) = sample(dir.path());
        let f = BnestFile::open(&path).unwrap();
        assert_eq!(serde_json::from_value::<LlamaConfig>(f.header.config.clone()).unwrap(), config());
        assert_eq!(f.header.chat_template.as_deref(), Some("{{ messages }}"));
        let t = f.tensor("blk.0.attn_q.weight").unwrap();
        assert_eq!(f.planes(t, 6).unwrap(), planes);
        assert_eq!(f.planes(f.tensor("blk.0.attn_k.weight").unwrap(), 6).unwrap(), sub_planes);
        // Reading fewer planes returns exactly the leading planes.
        let three = f.planes(t, 3).unwrap();
        assert_eq!(&three.planes[..3], &planes.planes[..3]);
        assert!(three.planes[3..].iter().all(|p| p.is_empty()));
        let n = f.tensor("blk.0.attn_norm.weight").unwrap();
        assert_eq!(f.f32_data(n).unwrap(), norm);
        assert!(f.planes(t, 7).is_err());
        assert!(f.f32_data(t).is_err());
        // No temporary file is left behind.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn every_truncation_and_corruption_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let (path, ..) = sample(dir.path());
        let full = std::fs::read(&path).unwrap();
        let bad = dir.path().join("bad.bnest");
        let step = (full.len() / 400).max(1);
        for cut in (0..full.len()).step_by(step) {
            std::fs::write(&bad, &full[..cut]).unwrap();
            assert!(BnestFile::open(&bad).is_err(), "truncation at {cut} accepted");
        }
        // Flip one bit anywhere in the header or a section: the checksums must notice.
        let good = BnestFile::open(&path).unwrap();
        let hlen = u64::from_le_bytes(full[16..24].try_into().unwrap()) as usize;
        let mut covered: Vec<std::ops::Range<usize>> = vec![0..12, 16..28, PREAMBLE..PREAMBLE + hlen];
        for t in &good.header.tensors {
            let secs: Vec<Section> = match &t.encoding {
                Encoding::F32 { data } => vec![*data],
                Encoding::Planes { planes, scales, offsets, dtypes, sub, .. } => {
                    planes.iter().copied().chain([*scales, *offsets, *dtypes]).chain(sub.map(|s| s.data)).collect()
                }
            };
            for s in secs {
                let start = (good.data_start + s.offset) as usize;
                covered.push(start..start + s.len as usize);
            }
        }
        for at in (0..full.len()).step_by(step) {
            let mut b = full.clone();
            b[at] ^= 0x10;
            std::fs::write(&bad, &b).unwrap();
            if covered.iter().any(|r| r.contains(&at)) {
                assert!(BnestFile::open(&bad).is_err(), "corruption at byte {at} undetected");
            }
        }
        let mut b = full.clone();
        b[8..12].copy_from_slice(&(VERSION + 1).to_le_bytes());
        std::fs::write(&bad, &b).unwrap();
        assert!(format!("{:#}", BnestFile::open(&bad).err().unwrap()).contains("unsupported .bnest version"));
        let mut b = full.clone();
        b[8..12].copy_from_slice(&1u32.to_le_bytes());
        std::fs::write(&bad, &b).unwrap();
        assert!(format!("{:#}", BnestFile::open(&bad).err().unwrap()).contains("sub-block scales in a version 1"));
        let mut b = full.clone();
        b[16..24].copy_from_slice(&u64::MAX.to_le_bytes());
        std::fs::write(&bad, &b).unwrap();
        assert!(format!("{:#}", BnestFile::open(&bad).err().unwrap()).contains("absurd"));
    }
}

//! GGUF reader over a memory map, and a small writer for fixtures and exports.
//!
//! The reader never trusts the file: every count, length and offset is checked against the
//! bytes actually present before anything is allocated, so a truncated or hostile file yields
//! an error instead of a panic or a multi-gigabyte allocation. Tensor data is borrowed from the
//! map (zero copy); callers decide when to dequantize.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::Path;

use anyhow::{Context, Result, bail, ensure};
use memmap2::Mmap;

use crate::quant::ggml::GgmlType;

const MAGIC: &[u8; 4] = b"GGUF";
/// Longest string we accept (keys, values, tensor names). Real files stay far below.
const MAX_STRING: u64 = 1 << 26;
/// Most elements in one metadata array (a 256k vocabulary with merges fits easily).
const MAX_ARRAY: u64 = 1 << 24;
const MAX_DIMS: u32 = 4;
const MAX_NESTING: u32 = 4;
const DEFAULT_ALIGNMENT: u64 = 32;

/// One metadata value, with the GGUF type it was stored as.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    String(String),
    Array(Vec<Value>),
    U64(u64),
    I64(i64),
    F64(f64),
}

impl Value {
    /// Any integer type as u64 (negative values are rejected), because writers disagree on
    /// which width they use for counts.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(v as u64),
            Value::U16(v) => Some(v as u64),
            Value::U32(v) => Some(v as u64),
            Value::U64(v) => Some(v),
            Value::I8(v) => u64::try_from(v).ok(),
            Value::I16(v) => u64::try_from(v).ok(),
            Value::I32(v) => u64::try_from(v).ok(),
            Value::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(v) => Some(v as f64),
            Value::F64(v) => Some(v),
            _ => self.as_u64().map(|v| v as f64),
        }
    }
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }
    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Value::Bool(b) => Some(b),
            _ => self.as_u64().map(|v| v != 0),
        }
    }
    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(a) => Some(a),
            _ => None,
        }
    }
    fn type_id(&self) -> u32 {
        match self {
            Value::U8(_) => 0,
            Value::I8(_) => 1,
            Value::U16(_) => 2,
            Value::I16(_) => 3,
            Value::U32(_) => 4,
            Value::I32(_) => 5,
            Value::F32(_) => 6,
            Value::Bool(_) => 7,
            Value::String(_) => 8,
            Value::Array(_) => 9,
            Value::U64(_) => 10,
            Value::I64(_) => 11,
            Value::F64(_) => 12,
        }
    }
    fn short(&self) -> String {
        match self {
            Value::String(s) if s.len() > 60 => {
                format!("{:?}… ({} bytes)", &s[..s.floor_char_boundary(60)], s.len())
            }
            Value::String(s) => format!("{s:?}"),
            Value::Array(a) => {
                let head: Vec<String> = a.iter().take(4).map(|v| v.short()).collect();
                format!("[{}{}] ({} items)", head.join(", "), if a.len() > 4 { ", …" } else { "" }, a.len())
            }
            v => format!("{v:?}").split('(').nth(1).unwrap_or("").trim_end_matches(')').to_string(),
        }
    }
}

/// Where a tensor lives in the data section and how it is encoded.
#[derive(Debug, Clone)]
pub struct TensorInfo {
    pub name: String,
    /// Shape in row-major order (outermost first), i.e. GGUF's dims reversed.
    pub shape: Vec<usize>,
    pub dtype: GgmlType,
    /// Offset from the start of the file.
    pub offset: usize,
    pub size_bytes: usize,
}

impl TensorInfo {
    pub fn n_elements(&self) -> usize {
        self.shape.iter().product()
    }
}

/// A parsed, validated GGUF file. Tensor bytes are borrowed from the memory map.
pub struct GgufFile {
    pub version: u32,
    pub metadata: BTreeMap<String, Value>,
    pub tensors: Vec<TensorInfo>,
    pub alignment: u64,
    mmap: Mmap,
}

struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: u64, what: &str) -> Result<&'a [u8]> {
        let remaining = (self.buf.len() - self.pos) as u64;
        if n > remaining {
            bail!("file truncated: {what} needs {n} bytes at offset {} but only {remaining} remain", self.pos);
        }
        let s = &self.buf[self.pos..self.pos + n as usize];
        self.pos += n as usize;
        Ok(s)
    }
    fn arr<const N: usize>(&mut self, what: &str) -> Result<[u8; N]> {
        Ok(self.take(N as u64, what)?.try_into().expect("length checked"))
    }
    fn u32(&mut self, what: &str) -> Result<u32> {
        Ok(u32::from_le_bytes(self.arr(what)?))
    }
    fn u64(&mut self, what: &str) -> Result<u64> {
        Ok(u64::from_le_bytes(self.arr(what)?))
    }
    fn string(&mut self, what: &str) -> Result<String> {
        let len = self.u64(what)?;
        ensure!(len <= MAX_STRING, "{what}: string length {len} exceeds the {MAX_STRING}-byte limit");
        let bytes = self.take(len, what)?;
        String::from_utf8(bytes.to_vec()).with_context(|| format!("{what}: string is not valid UTF-8"))
    }
    fn value(&mut self, ty: u32, depth: u32, what: &str) -> Result<Value> {
        Ok(match ty {
            0 => Value::U8(self.arr::<1>(what)?[0]),
            1 => Value::I8(self.arr::<1>(what)?[0] as i8),
            2 => Value::U16(u16::from_le_bytes(self.arr(what)?)),
            3 => Value::I16(i16::from_le_bytes(self.arr(what)?)),
            4 => Value::U32(self.u32(what)?),
            5 => Value::I32(i32::from_le_bytes(self.arr(what)?)),
            6 => Value::F32(f32::from_le_bytes(self.arr(what)?)),
            7 => match self.arr::<1>(what)?[0] {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                b => bail!("{what}: invalid bool byte {b}"),
            },
            8 => Value::String(self.string(what)?),
            9 => {
                ensure!(depth < MAX_NESTING, "{what}: arrays nested deeper than {MAX_NESTING}");
                let elem_ty = self.u32(what)?;
                let len = self.u64(what)?;
                ensure!(len <= MAX_ARRAY, "{what}: array of {len} items exceeds the {MAX_ARRAY} limit");
                // Every element takes at least one byte, so a count larger than the rest of
                // the file is a lie; refuse before reserving memory for it.
                let remaining = (self.buf.len() - self.pos) as u64;
                ensure!(
                    len <= remaining,
                    "file truncated: {what} claims {len} items but only {remaining} bytes remain"
                );
                let mut items = Vec::with_capacity(len as usize);
                for _ in 0..len {
                    items.push(self.value(elem_ty, depth + 1, what)?);
                }
                Value::Array(items)
            }
            10 => Value::U64(self.u64(what)?),
            11 => Value::I64(i64::from_le_bytes(self.arr(what)?)),
            12 => Value::F64(f64::from_le_bytes(self.arr(what)?)),
            t => bail!("{what}: unknown metadata value type {t}"),
        })
    }
}

impl GgufFile {
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
        // SAFETY: the map is read-only; the file is not expected to change while we run, and
        // every access below is bounds-checked against the map's length.
        let mmap = unsafe { Mmap::map(&file) }.with_context(|| format!("cannot map {}", path.display()))?;
        Self::parse(mmap).with_context(|| format!("invalid GGUF file {}", path.display()))
    }

    /// Parses a GGUF image held in memory (the fuzzer's entry point; tests).
    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        Self::parse(super::map_bytes(bytes)?).context("invalid GGUF file")
    }

    fn parse(mmap: Mmap) -> Result<Self> {
        let mut c = Cursor { buf: &mmap[..], pos: 0 };
        let magic = c.arr::<4>("magic")?;
        ensure!(&magic == MAGIC, "bad magic {:?}: not a GGUF file", String::from_utf8_lossy(&magic));
        let version = c.u32("version")?;
        ensure!(version == 2 || version == 3, "unsupported GGUF version {version} (supported: 2, 3)");
        let n_tensors = c.u64("tensor count")?;
        let n_kv = c.u64("metadata count")?;
        let len = mmap.len() as u64;
        // A metadata entry is at least 13 bytes and a tensor info at least 24.
        ensure!(n_kv.saturating_mul(13) <= len, "metadata count {n_kv} cannot fit in a {len}-byte file");
        ensure!(n_tensors.saturating_mul(24) <= len, "tensor count {n_tensors} cannot fit in a {len}-byte file");

        let mut metadata = BTreeMap::new();
        for i in 0..n_kv {
            let key = c.string(&format!("metadata key #{i}"))?;
            let ty = c.u32(&format!("type of {key}"))?;
            let v = c.value(ty, 0, &key)?;
            if metadata.insert(key.clone(), v).is_some() {
                bail!("duplicate metadata key {key}");
            }
        }
        let alignment = match metadata.get("general.alignment") {
            None => DEFAULT_ALIGNMENT,
            Some(v) => {
                let a = v.as_u64().context("general.alignment is not an integer")?;
                ensure!(a.is_power_of_two() && a <= 1 << 16, "general.alignment {a} is not a power of two ≤ 65536");
                a
            }
        };

        let mut raw = Vec::with_capacity(n_tensors as usize);
        for i in 0..n_tensors {
            let name = c.string(&format!("tensor #{i} name"))?;
            let n_dims = c.u32(&name)?;
            ensure!((1..=MAX_DIMS).contains(&n_dims), "tensor {name}: {n_dims} dimensions (1..={MAX_DIMS} allowed)");
            let mut dims = Vec::with_capacity(n_dims as usize);
            for _ in 0..n_dims {
                let d = c.u64(&name)?;
                ensure!(d > 0 && d <= 1 << 32, "tensor {name}: dimension {d} out of range");
                dims.push(d);
            }
            let ty = c.u32(&name)?;
            let dtype = GgmlType::from_id(ty).with_context(|| format!("tensor {name}"))?;
            let off = c.u64(&name)?;
            raw.push((name, dims, dtype, off));
        }
        let data_start = (c.pos as u64).div_ceil(alignment) * alignment;
        ensure!(data_start <= len, "file truncated before the tensor data section");

        let mut tensors = Vec::with_capacity(raw.len());
        let mut names = std::collections::HashSet::new();
        for (name, dims, dtype, off) in raw {
            ensure!(names.insert(name.clone()), "duplicate tensor name {name}");
            let n: u64 = dims.iter().try_fold(1u64, |a, &d| a.checked_mul(d)).context("tensor size overflows")?;
            ensure!(n <= 1 << 40, "tensor {name}: {n} elements is absurd");
            ensure!(
                dims[0] % dtype.block_size() as u64 == 0,
                "tensor {name}: row length {} is not a multiple of the {:?} block size {}",
                dims[0],
                dtype,
                dtype.block_size()
            );
            let size = n / dtype.block_size() as u64 * dtype.block_bytes() as u64;
            ensure!(off % alignment == 0, "tensor {name}: offset {off} is not aligned to {alignment}");
            let start = data_start.checked_add(off).context("tensor offset overflows")?;
            let end = start.checked_add(size).context("tensor size overflows")?;
            ensure!(end <= len, "file truncated: tensor {name} needs bytes {start}..{end} but the file has {len}");
            tensors.push(TensorInfo {
                name,
                shape: dims.iter().rev().map(|&d| d as usize).collect(),
                dtype,
                offset: start as usize,
                size_bytes: size as usize,
            });
        }
        Ok(GgufFile { version, metadata, tensors, alignment, mmap })
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.get(key)
    }

    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// The raw encoded bytes of a tensor, borrowed from the map.
    pub fn tensor_bytes(&self, info: &TensorInfo) -> &[u8] {
        &self.mmap[info.offset..info.offset + info.size_bytes]
    }

    /// Dequantize a tensor to f32 (row-major, `info.shape`).
    pub fn tensor_f32(&self, info: &TensorInfo) -> Result<Vec<f32>> {
        let mut out = vec![0f32; info.n_elements()];
        info.dtype.dequantize(self.tensor_bytes(info), &mut out)?;
        Ok(out)
    }

    /// A one-line rendering of a metadata value, for `inspect`.
    pub fn describe_value(v: &Value) -> String {
        v.short()
    }
}

/// Builds GGUF v3 files. Used by tests to make fixtures and by exports; writes atomically.
#[derive(Default)]
pub struct GgufWriter {
    metadata: Vec<(String, Value)>,
    tensors: Vec<(String, Vec<usize>, GgmlType, Vec<u8>)>,
}

impl GgufWriter {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn meta(&mut self, key: &str, v: Value) -> &mut Self {
        self.metadata.push((key.to_string(), v));
        self
    }
    /// Adds an already-encoded tensor; `shape` is row-major (outermost first).
    pub fn tensor(&mut self, name: &str, shape: &[usize], dtype: GgmlType, bytes: Vec<u8>) -> &mut Self {
        self.tensors.push((name.to_string(), shape.to_vec(), dtype, bytes));
        self
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        fn put_str(b: &mut Vec<u8>, s: &str) {
            b.extend((s.len() as u64).to_le_bytes());
            b.extend(s.as_bytes());
        }
        fn put_val(b: &mut Vec<u8>, v: &Value) {
            match v {
                Value::U8(x) => b.push(*x),
                Value::I8(x) => b.push(*x as u8),
                Value::U16(x) => b.extend(x.to_le_bytes()),
                Value::I16(x) => b.extend(x.to_le_bytes()),
                Value::U32(x) => b.extend(x.to_le_bytes()),
                Value::I32(x) => b.extend(x.to_le_bytes()),
                Value::F32(x) => b.extend(x.to_le_bytes()),
                Value::Bool(x) => b.push(*x as u8),
                Value::String(s) => put_str(b, s),
                Value::Array(a) => {
                    let ty = a.first().map(|v| v.type_id()).unwrap_or(4);
                    b.extend(ty.to_le_bytes());
                    b.extend((a.len() as u64).to_le_bytes());
                    for x in a {
                        put_val(b, x);
                    }
                }
                Value::U64(x) => b.extend(x.to_le_bytes()),
                Value::I64(x) => b.extend(x.to_le_bytes()),
                Value::F64(x) => b.extend(x.to_le_bytes()),
            }
        }
        let align = DEFAULT_ALIGNMENT as usize;
        let mut b = Vec::new();
        b.extend(MAGIC);
        b.extend(3u32.to_le_bytes());
        b.extend((self.tensors.len() as u64).to_le_bytes());
        b.extend((self.metadata.len() as u64).to_le_bytes());
        for (k, v) in &self.metadata {
            put_str(&mut b, k);
            b.extend(v.type_id().to_le_bytes());
            put_val(&mut b, v);
        }
        let mut off = 0usize;
        for (name, shape, dtype, bytes) in &self.tensors {
            put_str(&mut b, name);
            b.extend((shape.len() as u32).to_le_bytes());
            for &d in shape.iter().rev() {
                b.extend((d as u64).to_le_bytes());
            }
            b.extend(dtype.id().to_le_bytes());
            b.extend((off as u64).to_le_bytes());
            off += bytes.len().div_ceil(align) * align;
        }
        b.resize(b.len().div_ceil(align) * align, 0);
        for (_, _, _, bytes) in &self.tensors {
            b.extend(bytes);
            b.resize(b.len().div_ceil(align) * align, 0);
        }
        b
    }

    pub fn write(&self, path: &Path) -> Result<()> {
        crate::format::write_atomic(path, |f| std::io::Write::write_all(f, &self.to_bytes()))
    }
}

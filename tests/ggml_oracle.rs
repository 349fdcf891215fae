//! bitnest's ggml dequantization against an independent reference, llama.cpp's gguf-py (numpy),
//! bit for bit; and malformed k-quant tensors in GGUF files.
//!
//! The reference runs as `python3 tests/ggml_oracle.py FILE` (needs the `gguf` and `numpy`
//! packages; installed with pip when missing). `random_blocks_match_gguf_py_bit_for_bit` writes a
//! GGUF of random blocks of every type; `real_gguf_files_match_gguf_py` does the same over every
//! tensor of the files named in `BITNEST_TEST_GGUF_ORACLE` (colon-separated; skipped when unset).

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bitnest::format::gguf::{GgufFile, GgufWriter, Value};
use bitnest::quant::ggml::GgmlType;
use half::{bf16, f16};
use rand::{Rng, SeedableRng, rngs::StdRng};

const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/ggml_oracle.py");

/// Makes sure `python3` can import `gguf` and `numpy`, installing them with pip if needed (as
/// .ci/run does for the server tests' `openai`); panics with what to do otherwise.
fn ensure_python() {
    static DONE: OnceLock<Result<(), String>> = OnceLock::new();
    let check = || {
        Command::new("python3")
            .args(["-c", "import numpy, gguf.quants, gguf.gguf_reader; gguf.quants.IQ4_XS"])
            .stderr(Stdio::null())
            .status()
            .map(|s| s.success())
    };
    let r = DONE.get_or_init(|| {
        match check() {
            Ok(true) => return Ok(()),
            Ok(false) => {}
            Err(e) => {
                return Err(format!(
                    "cannot run python3 ({e}); the ggml oracle tests need python3 with gguf and numpy"
                ));
            }
        }
        eprintln!("ggml_oracle: installing the python packages gguf and numpy with pip");
        let pip = |extra: &[&str]| {
            Command::new("python3")
                .args(["-m", "pip", "install", "--quiet"])
                .args(extra)
                .args(["gguf", "numpy"])
                .status()
                .is_ok_and(|s| s.success())
        };
        // A system-managed Python refuses plain pip installs; then install into the user site.
        if !pip(&[]) {
            pip(&["--user", "--break-system-packages"]);
        }
        match check() {
            Ok(true) => Ok(()),
            _ => Err("python3 cannot import gguf and numpy even after `python3 -m pip install gguf numpy`; \
                      install them (python3 -m pip install gguf numpy) and rerun"
                .into()),
        }
    });
    if let Err(e) = r {
        panic!("{e}");
    }
}

/// What one comparison found, per ggml type.
#[derive(Default, Debug)]
struct TypeStats {
    tensors: usize,
    weights: usize,
    mismatches: usize,
}

struct Comparison {
    per_type: BTreeMap<String, TypeStats>,
    /// The first few differing weights: tensor, index, bitnest's and gguf-py's bits.
    examples: Vec<String>,
    bitnest_time: Duration,
    total_time: Duration,
}

impl Comparison {
    fn mismatches(&self) -> usize {
        self.per_type.values().map(|s| s.mismatches).sum()
    }
    fn table(&self) -> String {
        let mut s = String::new();
        for (t, st) in &self.per_type {
            s += &format!(
                "  {t:<7} {:>4} tensors {:>13} weights {:>9} mismatches\n",
                st.tensors, st.weights, st.mismatches
            );
        }
        s
    }
}

/// Dequantizes every tensor of `path` with bitnest and with gguf-py, streaming one chunk at a
/// time, and compares the f32 bit patterns.
fn compare_with_gguf_py(path: &Path) -> Comparison {
    ensure_python();
    let start = Instant::now();
    let file = GgufFile::open(path).unwrap_or_else(|e| panic!("bitnest cannot open {}: {e:#}", path.display()));
    static RUN: AtomicUsize = AtomicUsize::new(0);
    let run = RUN.fetch_add(1, Ordering::Relaxed);
    let err_path = std::env::temp_dir().join(format!("ggml_oracle_{}_{run}.stderr", std::process::id()));
    let err_file = std::fs::File::create(&err_path).unwrap();
    let mut child = Command::new("python3")
        .arg(SCRIPT)
        .arg(path)
        .stdout(Stdio::piped())
        .stderr(Stdio::from(err_file))
        .spawn()
        .expect("run python3");
    let mut py = BufReader::with_capacity(1 << 20, child.stdout.take().unwrap());

    const CHUNK: usize = 1 << 20; // weights; a multiple of every block size
    let mut ours = vec![0f32; CHUNK];
    let mut theirs = vec![0u8; CHUNK * 4];
    let mut cmp = Comparison {
        per_type: BTreeMap::new(),
        examples: Vec::new(),
        bitnest_time: Duration::ZERO,
        total_time: Duration::ZERO,
    };
    let mut seen = Vec::new();
    let mut line = String::new();
    loop {
        line.clear();
        if py.read_line(&mut line).expect("read from ggml_oracle.py") == 0 {
            break;
        }
        let f: Vec<&str> = line.trim_end_matches('\n').split('\t').collect();
        assert_eq!(f.len(), 3, "bad header line from ggml_oracle.py: {line:?}");
        let (name, ty, n): (&str, u32, usize) = (f[0], f[1].parse().unwrap(), f[2].parse().unwrap());
        let info = file.tensor(name).unwrap_or_else(|| panic!("gguf-py lists tensor {name}, bitnest does not"));
        assert_eq!(info.dtype.id(), ty, "{name}: type");
        assert_eq!(info.n_elements(), n, "{name}: element count");
        let (bs, bb) = (info.dtype.block_size(), info.dtype.block_bytes());
        let bytes = file.tensor_bytes(info);
        let stats = cmp.per_type.entry(format!("{:?}", info.dtype)).or_default();
        stats.tensors += 1;
        stats.weights += n;
        let mut at = 0;
        while at < n {
            let m = CHUNK.min(n - at);
            py.read_exact(&mut theirs[..m * 4]).unwrap_or_else(|e| panic!("{name}: gguf-py's data ended early: {e}"));
            let t0 = Instant::now();
            info.dtype.dequantize(&bytes[at / bs * bb..(at + m) / bs * bb], &mut ours[..m]).unwrap();
            cmp.bitnest_time += t0.elapsed();
            for (i, (a, b)) in ours[..m].iter().zip(theirs[..m * 4].chunks_exact(4)).enumerate() {
                let b = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                if a.to_bits() != b {
                    stats.mismatches += 1;
                    if cmp.examples.len() < 10 {
                        cmp.examples.push(format!(
                            "{name}[{}] ({:?}): bitnest {a:e} ({:#010x}), gguf-py {:e} ({b:#010x})",
                            at + i,
                            info.dtype,
                            a.to_bits(),
                            f32::from_bits(b)
                        ));
                    }
                }
            }
            at += m;
        }
        seen.push(name.to_string());
    }
    let status = child.wait().unwrap();
    let stderr = std::fs::read_to_string(&err_path).unwrap_or_default();
    let _ = std::fs::remove_file(&err_path);
    assert!(status.success(), "ggml_oracle.py failed on {}: {stderr}", path.display());
    let ours_names: Vec<&str> = file.tensors.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(seen, ours_names, "gguf-py and bitnest list different tensors");
    cmp.total_time = start.elapsed();
    cmp
}

/// A random finite f16 of moderate size and either sign; zeros of both signs now and then.
fn random_f16(rng: &mut StdRng) -> f16 {
    match rng.random_range(0..16) {
        0 => f16::ZERO,
        1 => f16::NEG_ZERO,
        _ => {
            let mag = 2f32.powf(rng.random_range(-14.0f32..3.0));
            f16::from_f32(if rng.random_bool(0.5) { mag } else { -mag })
        }
    }
}

/// `blocks` random blocks of `t`: random bytes, f16 scale fields forced finite and moderate.
fn random_tensor(t: GgmlType, blocks: usize, rng: &mut StdRng) -> Vec<u8> {
    let mut b = vec![0u8; blocks * t.block_bytes()];
    rng.fill(&mut b[..]);
    for block in b.chunks_exact_mut(t.block_bytes()) {
        for &at in t.f16_offsets() {
            block[at..at + 2].copy_from_slice(&random_f16(rng).to_le_bytes());
        }
    }
    // F16/BF16 elements: any finite value (NaN payloads are not what this test is about).
    match t {
        GgmlType::F16 => b.chunks_exact_mut(2).for_each(|h| {
            if !f16::from_le_bytes([h[0], h[1]]).is_finite() {
                h.copy_from_slice(&random_f16(rng).to_le_bytes());
            }
        }),
        GgmlType::BF16 => b.chunks_exact_mut(2).for_each(|h| {
            if !bf16::from_le_bytes([h[0], h[1]]).is_finite() {
                h.copy_from_slice(&bf16::from_f32(1.5).to_le_bytes());
            }
        }),
        GgmlType::F32 => b.chunks_exact_mut(4).for_each(|h| {
            if !f32::from_le_bytes([h[0], h[1], h[2], h[3]]).is_finite() {
                h.copy_from_slice(&0.25f32.to_le_bytes());
            }
        }),
        _ => {}
    }
    b
}

#[test]
fn random_blocks_match_gguf_py_bit_for_bit() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = StdRng::seed_from_u64(0x6767_6d6c);
    let mut w = GgufWriter::new();
    w.meta("general.architecture", Value::String("oracle".into()));
    const COLS: usize = 2048;
    for t in GgmlType::ALL {
        // A few thousand blocks per type: 4096 of the 32-weight ones, 1024 of the 256-weight ones.
        let blocks = match t.block_size() {
            1 => 1 << 16,
            32 => 4096,
            _ => 1024,
        };
        let weights = blocks * t.block_size();
        w.tensor(&format!("{t:?}"), &[weights / COLS, COLS], t, random_tensor(t, blocks, &mut rng));
    }
    let path = dir.path().join("random.gguf");
    w.write(&path).unwrap();

    let cmp = compare_with_gguf_py(&path);
    eprintln!("random blocks vs gguf-py ({:.2?}):\n{}", cmp.total_time, cmp.table());
    assert_eq!(cmp.per_type.len(), GgmlType::ALL.len());
    assert!(
        cmp.mismatches() == 0,
        "{} weights differ from gguf-py:\n{}\n{}",
        cmp.mismatches(),
        cmp.table(),
        cmp.examples.join("\n")
    );
}

/// Opt-in: `BITNEST_TEST_GGUF_ORACLE=a.gguf:b.gguf cargo test --release --test ggml_oracle -- --nocapture`.
#[test]
fn real_gguf_files_match_gguf_py() {
    let Some(list) = std::env::var_os("BITNEST_TEST_GGUF_ORACLE") else {
        eprintln!("BITNEST_TEST_GGUF_ORACLE is not set: no real GGUF files compared");
        return;
    };
    let files: Vec<PathBuf> = std::env::split_paths(&list).filter(|p| !p.as_os_str().is_empty()).collect();
    assert!(!files.is_empty(), "BITNEST_TEST_GGUF_ORACLE names no files");
    for path in files {
        let cmp = compare_with_gguf_py(&path);
        eprintln!(
            "{}: {} tensors vs gguf-py in {:.1?} (bitnest dequantization {:.1?}):\n{}",
            path.display(),
            cmp.per_type.values().map(|s| s.tensors).sum::<usize>(),
            cmp.total_time,
            cmp.bitnest_time,
            cmp.table()
        );
        assert!(
            cmp.mismatches() == 0,
            "{}: {} weights differ:\n{}",
            path.display(),
            cmp.mismatches(),
            cmp.examples.join("\n")
        );
    }
}

/// The CLI must exit non-zero with an error line, not a panic message.
fn assert_cli_rejects(model: &Path, expect: &str) {
    let out = Command::new(env!("CARGO_BIN_EXE_bitnest")).args(["inspect", "--model"]).arg(model).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{}: expected failure", model.display());
    assert!(err.contains("bitnest: error:"), "{}: stderr was {err}", model.display());
    assert!(!err.contains("panicked"), "{}: panicked: {err}", model.display());
    assert!(err.contains(expect), "{}: stderr {err:?} lacks {expect:?}", model.display());
}

fn one_tensor_gguf(dir: &Path, t: GgmlType, shape: &[usize], bytes: Vec<u8>) -> PathBuf {
    let mut w = GgufWriter::new();
    w.meta("general.architecture", Value::String("llama".into()));
    w.tensor("blk.0.ffn_down.weight", shape, t, bytes);
    let p = dir.join(format!("{t:?}-{}x{}.gguf", shape[0], shape[1]));
    w.write(&p).unwrap();
    p
}

const SUPER_BLOCK_TYPES: [GgmlType; 6] =
    [GgmlType::Q2_K, GgmlType::Q3_K, GgmlType::Q4_K, GgmlType::Q5_K, GgmlType::Q6_K, GgmlType::IQ4_XS];

#[test]
fn super_block_rows_must_be_multiples_of_256() {
    let dir = tempfile::tempdir().unwrap();
    for t in SUPER_BLOCK_TYPES {
        // A whole block's worth of bytes, but rows of 128 (or 288) weights.
        for cols in [128, 288] {
            let p = one_tensor_gguf(dir.path(), t, &[2, cols], vec![0u8; 4 * t.block_bytes()]);
            let e =
                format!("{:#}", GgufFile::open(&p).err().unwrap_or_else(|| panic!("{t:?} rows of {cols} accepted")));
            assert!(e.contains("not a multiple of") && e.contains("256"), "{t:?}: {e}");
        }
        let p = one_tensor_gguf(dir.path(), t, &[2, 128], vec![0u8; t.block_bytes()]);
        assert_cli_rejects(&p, "not a multiple of");
        // The same shape with 256-weight rows is fine and decodes.
        let p = one_tensor_gguf(dir.path(), t, &[2, 256], vec![0u8; 2 * t.block_bytes()]);
        let f = GgufFile::open(&p).unwrap();
        assert_eq!(f.tensor_f32(&f.tensors[0]).unwrap(), vec![0f32; 512], "{t:?}");
    }
}

#[test]
fn quant_tensor_with_too_few_bytes_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    for t in GgmlType::ALL.into_iter().filter(|t| t.code_bits().is_some()) {
        // Rows of 1024 weights, 8 rows, but only half the bytes: the data runs past the file end.
        let need = 8 * 1024 / t.block_size() * t.block_bytes();
        let p = one_tensor_gguf(dir.path(), t, &[8, 1024], vec![0u8; need / 2]);
        let e = format!("{:#}", GgufFile::open(&p).err().unwrap_or_else(|| panic!("{t:?}: short tensor accepted")));
        assert!(e.contains("truncated"), "{t:?}: {e}");
        assert_cli_rejects(&p, "truncated");
    }
}

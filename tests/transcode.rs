//! A GGUF of k-quant and legacy-quant tensors, end to end: transcoded once into a cached
//! `.bnest` whose every weight is bit-identical to the source's, reused while the source is
//! unchanged, and run on the bit-plane kernels with logits that follow the f32 reference path.
//!
//! The model is a tiny random llama (2 layers, width 256) written with the `GgufWriter`, its
//! matrices random blocks of Q4_K, Q6_K, Q5_K, Q3_K, Q2_K, IQ4_XS, Q4_0, Q4_1, Q5_0, Q5_1,
//! Q8_0 and IQ4_NL (any bytes with finite scales are valid blocks), and SmolLM2's tokenizer
//! borrowed from the default model so that the CLI can run it.

use std::path::{Path, PathBuf};
use std::process::Command;

use bitnest::format::bnest::BnestFile;
use bitnest::format::gguf::{GgufFile, GgufWriter};
use bitnest::model::ModelSource;
use bitnest::quant::ggml::GgmlType;
use half::f16;
use rand::{Rng, SeedableRng, rngs::StdRng};

mod common;

const DIM: usize = 256;
const FFN: usize = 512;
const HEADS: usize = 4;
const KV_HEADS: usize = 2;
const LAYERS: usize = 2;

/// Random blocks of `ty` whose f16 scales are small enough that the model's activations stay
/// moderate (weights within about ±1).
fn blocks(rng: &mut StdRng, ty: GgmlType, n: usize) -> Vec<u8> {
    let mut b: Vec<u8> = (0..n * ty.block_bytes()).map(|_| rng.random()).collect();
    // Largest |scale · level| of a block with d = 1, so d can be set for |w| ≲ 1.
    let span = match ty {
        GgmlType::Q2_K => 15.0 * 3.0,
        GgmlType::Q3_K => 32.0 * 4.0,
        GgmlType::Q4_K => 63.0 * 15.0,
        GgmlType::Q5_K => 63.0 * 31.0,
        GgmlType::Q6_K => 128.0 * 32.0,
        GgmlType::IQ4_XS => 32.0 * 127.0,
        GgmlType::IQ4_NL => 127.0,
        GgmlType::Q8_0 => 128.0,
        GgmlType::Q5_0 | GgmlType::Q5_1 => 16.0,
        _ => 8.0,
    };
    for blk in b.chunks_exact_mut(ty.block_bytes()) {
        for &at in ty.f16_offsets() {
            let v = rng.random_range(-1.0f32..1.0) / span;
            blk[at..at + 2].copy_from_slice(&f16::from_f32(v).to_le_bytes());
        }
    }
    b
}

/// Writes the tiny model; returns its path.
fn write_model(dir: &Path) -> PathBuf {
    let src = GgufFile::open(&common::model_path()).unwrap();
    let vocab = src.get("tokenizer.ggml.tokens").unwrap().as_array().unwrap().len();
    let mut w = GgufWriter::new();
    use bitnest::format::gguf::Value;
    w.meta("general.architecture", Value::String("llama".into()))
        .meta("llama.block_count", Value::U32(LAYERS as u32))
        .meta("llama.embedding_length", Value::U32(DIM as u32))
        .meta("llama.feed_forward_length", Value::U32(FFN as u32))
        .meta("llama.attention.head_count", Value::U32(HEADS as u32))
        .meta("llama.attention.head_count_kv", Value::U32(KV_HEADS as u32))
        .meta("llama.rope.freq_base", Value::F32(10000.0))
        .meta("llama.attention.layer_norm_rms_epsilon", Value::F32(1e-5))
        .meta("llama.context_length", Value::U32(512))
        .meta("llama.vocab_size", Value::U32(vocab as u32));
    for (k, v) in &src.metadata {
        if k.starts_with("tokenizer.") {
            w.meta(k, v.clone());
        }
    }
    let mut rng = StdRng::seed_from_u64(7);
    let mut quant = |w: &mut GgufWriter, name: &str, rows: usize, cols: usize, ty: GgmlType| {
        let b = blocks(&mut rng, ty, rows * cols / ty.block_size());
        w.tensor(name, &[rows, cols], ty, b);
    };
    quant(&mut w, "token_embd.weight", vocab, DIM, GgmlType::Q4_K);
    quant(&mut w, "output.weight", vocab, DIM, GgmlType::Q6_K);
    let ones = GgmlType::F32.quantize(&[1.0f32; DIM]).unwrap();
    w.tensor("output_norm.weight", &[DIM], GgmlType::F32, ones.clone());
    let hd = DIM / HEADS;
    // Every type somewhere: (tensor, rows, cols, type) per layer.
    let layers = [
        [
            GgmlType::Q4_K,
            GgmlType::Q5_K,
            GgmlType::Q6_K,
            GgmlType::Q3_K,
            GgmlType::Q2_K,
            GgmlType::IQ4_XS,
            GgmlType::Q4_0,
        ],
        [
            GgmlType::Q4_1,
            GgmlType::Q5_0,
            GgmlType::Q5_1,
            GgmlType::Q8_0,
            GgmlType::IQ4_NL,
            GgmlType::Q4_K,
            GgmlType::Q6_K,
        ],
    ];
    for (l, types) in layers.iter().enumerate() {
        let p = format!("blk.{l}");
        w.tensor(&format!("{p}.attn_norm.weight"), &[DIM], GgmlType::F32, ones.clone());
        w.tensor(&format!("{p}.ffn_norm.weight"), &[DIM], GgmlType::F32, ones.clone());
        quant(&mut w, &format!("{p}.attn_q.weight"), HEADS * hd, DIM, types[0]);
        quant(&mut w, &format!("{p}.attn_k.weight"), KV_HEADS * hd, DIM, types[1]);
        quant(&mut w, &format!("{p}.attn_v.weight"), KV_HEADS * hd, DIM, types[2]);
        quant(&mut w, &format!("{p}.attn_output.weight"), DIM, HEADS * hd, types[3]);
        quant(&mut w, &format!("{p}.ffn_gate.weight"), FFN, DIM, types[4]);
        quant(&mut w, &format!("{p}.ffn_up.weight"), FFN, DIM, types[5]);
        quant(&mut w, &format!("{p}.ffn_down.weight"), DIM, FFN, types[6]);
    }
    let path = dir.join("tiny-kquant.gguf");
    w.write(&path).unwrap();
    path
}

fn logits(path: &Path, tokens: &[u32]) -> Vec<f32> {
    let m = ModelSource::open(path, None).unwrap().load_f32().unwrap();
    let mut s = m.new_session(64, 16);
    m.forward(&mut s, tokens, tokens.len()).unwrap().to_vec()
}

#[test]
fn a_kquant_gguf_transcodes_losslessly_runs_on_planes_and_is_cached() {
    let dir = tempfile::tempdir().unwrap();
    let gguf = write_model(dir.path());
    let t0 = std::time::Instant::now();
    let planes = bitnest::transcode::cached_planes(&gguf, false).unwrap().expect("quantized tensors transcode");
    eprintln!("transcoded in {:.2} s: {}", t0.elapsed().as_secs_f64(), planes.display());
    assert_eq!(planes.parent(), gguf.parent(), "beside a source in a writable folder");
    assert!(
        planes
            .file_name()
            .unwrap()
            .to_string_lossy()
            .ends_with(&format!(".v{}.bnest", bitnest::format::bnest::VERSION))
    );

    // Every weight bit-identical to the source's: each matrix's planes, read whole.
    let g = GgufFile::open(&gguf).unwrap();
    let b = BnestFile::open(&planes).unwrap();
    let mut types = std::collections::BTreeSet::new();
    for t in &g.tensors {
        let want = g.tensor_f32(t).unwrap();
        let d = b.tensor(&t.name).unwrap();
        let got = match t.shape.len() {
            2 => {
                let bp = b.planes(d, bp_bits(d)).unwrap();
                let mut out = vec![0f32; want.len()];
                bp.dequantize(bp.master_bits, &mut out).unwrap();
                assert_eq!(bp.master_bits, t.dtype.code_bits().unwrap(), "{}: one plane per source bit", t.name);
                types.insert(format!("{:?}", t.dtype));
                out
            }
            _ => b.f32_data(d).unwrap(),
        };
        assert!(want.iter().zip(&got).all(|(a, b)| a.to_bits() == b.to_bits()), "{} ({:?}) differs", t.name, t.dtype);
    }
    assert_eq!(types.len(), 12, "every quantized type covered: {types:?}");

    // The planes path (int8 activations per 32 columns) follows the f32 reference.
    let tokens = [1u32, 450, 7099, 314, 4510, 28, 9, 2012];
    let (want, got) = (logits(&gguf, &tokens), logits(&planes, &tokens));
    let scale = want.iter().fold(0f32, |a, v| a.max(v.abs()));
    let worst = want.iter().zip(&got).fold(0f32, |a, (x, y)| a.max((x - y).abs()));
    assert!(scale > 0.5, "logits are not degenerate ({scale})");
    assert!(worst < 0.05 * scale, "max |Δlogit| {worst} against a scale of {scale}");

    // Reused while the source is unchanged (the file is not rewritten)…
    let mtime = |p: &Path| std::fs::metadata(p).unwrap().modified().unwrap();
    let first = mtime(&planes);
    std::thread::sleep(std::time::Duration::from_millis(20));
    assert_eq!(bitnest::transcode::cached_planes(&gguf, false).unwrap().unwrap(), planes);
    assert_eq!(mtime(&planes), first);
    // …and made again when the source changes.
    let bytes = std::fs::read(&gguf).unwrap();
    std::fs::write(&gguf, &bytes).unwrap();
    let f = std::fs::File::options().write(true).open(&gguf).unwrap();
    f.set_modified(std::time::SystemTime::now() + std::time::Duration::from_secs(5)).unwrap();
    drop(f);
    assert_eq!(bitnest::transcode::cached_planes(&gguf, false).unwrap().unwrap(), planes);
    assert_ne!(mtime(&planes), first, "a changed source is transcoded again");

    // The CLI runs the GGUF through its transcode, at its own precision and at fewer planes.
    for extra in [&[][..], &["--bits", "2"][..], &["--f32"][..]] {
        let out = Command::new(env!("CARGO_BIN_EXE_bitnest"))
            .args(["run", "-p", "Hello", "-n", "4", "--temperature", "0", "--format", "json", "-t", "2", "--model"])
            .arg(&gguf)
            .args(extra)
            .output()
            .unwrap();
        assert!(out.status.success(), "{extra:?}: {}", String::from_utf8_lossy(&out.stderr));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(v["ids"].as_array().unwrap().len(), 4, "{extra:?}");
    }
}

/// All the planes of a tensor descriptor.
fn bp_bits(d: &bitnest::format::bnest::TensorDesc) -> u32 {
    match &d.encoding {
        bitnest::format::bnest::Encoding::Planes { master_bits, .. } => *master_bits,
        _ => unreachable!("a matrix is stored as planes"),
    }
}

/// A source folder that cannot be written: the transcode goes to the cache directory.
#[test]
fn an_unwritable_source_folder_uses_the_cache_directory() {
    let dir = tempfile::tempdir().unwrap();
    let gguf = write_model(dir.path());
    let ro = dir.path().join("ro");
    std::fs::create_dir(&ro).unwrap();
    let src = ro.join("model.gguf");
    std::fs::rename(&gguf, &src).unwrap();
    let mut perms = std::fs::metadata(&ro).unwrap().permissions();
    use std::os::unix::fs::PermissionsExt;
    perms.set_mode(0o555);
    std::fs::set_permissions(&ro, perms.clone()).unwrap();
    // Root writes anywhere: then the folder is writable after all and the test says nothing.
    let probe = ro.join("probe");
    let root = std::fs::File::create(&probe).is_ok();
    let _ = std::fs::remove_file(&probe);
    let cache = dir.path().join("cache");
    let planes = Command::new(env!("CARGO_BIN_EXE_bitnest"))
        .env("BITNEST_CACHE", &cache)
        .args(["run", "-p", "Hi", "-n", "1", "-t", "2", "--model"])
        .arg(&src)
        .output()
        .unwrap();
    perms.set_mode(0o755);
    std::fs::set_permissions(&ro, perms).unwrap();
    assert!(planes.status.success(), "{}", String::from_utf8_lossy(&planes.stderr));
    let in_cache = std::fs::read_dir(cache.join("transcoded")).map(|d| d.count()).unwrap_or(0);
    if root {
        eprintln!("running as root: the read-only folder was writable; transcode placed beside the source");
        assert!(ro.join(format!("model.v{}.bnest", bitnest::format::bnest::VERSION)).exists());
    } else {
        assert_eq!(in_cache, 1, "one transcode in $BITNEST_CACHE/transcoded");
    }
}

//! Malformed model files give a clear error and a non-zero exit, never a panic or a huge
//! allocation.

use std::path::Path;
use std::process::Command;

use bitnest::format::gguf::GgufFile;
use bitnest::model::ModelSource;

mod common;

fn write(dir: &Path, name: &str, bytes: &[u8]) -> std::path::PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
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

fn tiny_gguf_bytes(dir: &Path) -> Vec<u8> {
    let (gguf, _) = common::write_tiny_llama(dir);
    std::fs::read(gguf).unwrap()
}

#[test]
fn every_truncation_of_a_gguf_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let full = tiny_gguf_bytes(dir.path());
    assert!(GgufFile::open(&write(dir.path(), "ok.gguf", &full)).is_ok());
    // Every cut inside the header and tensor infos, then coarse cuts through the data.
    let header_end = 2048.min(full.len());
    let cuts = (0..header_end).chain((header_end..full.len()).step_by(997));
    for cut in cuts {
        let p = write(dir.path(), "cut.gguf", &full[..cut]);
        assert!(GgufFile::open(&p).is_err(), "truncation at {cut} of {} was accepted", full.len());
    }
    assert_cli_rejects(&write(dir.path(), "half.gguf", &full[..full.len() / 2]), "truncated");
}

#[test]
fn bad_magic_and_wrong_version_are_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let full = tiny_gguf_bytes(dir.path());
    let mut bad = full.clone();
    bad[..4].copy_from_slice(b"GGML");
    assert_cli_rejects(&write(dir.path(), "magic.gguf", &bad), "bad magic");
    for v in [1u32, 4, 0xffff_ffff] {
        let mut bad = full.clone();
        bad[4..8].copy_from_slice(&v.to_le_bytes());
        assert_cli_rejects(&write(dir.path(), "version.gguf", &bad), "unsupported GGUF version");
    }
}

#[test]
fn absurd_sizes_are_rejected_without_allocating() {
    let dir = tempfile::tempdir().unwrap();
    let full = tiny_gguf_bytes(dir.path());
    // Header: magic(4) version(4) n_tensors(8) n_kv(8), then the first key's length (8).
    let patch = |at: usize, v: u64| {
        let mut b = full.clone();
        b[at..at + 8].copy_from_slice(&v.to_le_bytes());
        b
    };
    assert_cli_rejects(&write(dir.path(), "tensors.gguf", &patch(8, u64::MAX)), "tensor count");
    assert_cli_rejects(&write(dir.path(), "kv.gguf", &patch(16, 1 << 60)), "metadata count");
    assert_cli_rejects(&write(dir.path(), "key.gguf", &patch(24, u64::MAX)), "exceeds");

    // An array whose declared length is enormous: hand-built file.
    let mut b = Vec::new();
    b.extend(b"GGUF");
    b.extend(3u32.to_le_bytes());
    b.extend(0u64.to_le_bytes());
    b.extend(1u64.to_le_bytes());
    b.extend(3u64.to_le_bytes());
    b.extend(b"arr");
    b.extend(9u32.to_le_bytes()); // array
    b.extend(4u32.to_le_bytes()); // of u32
    b.extend((1u64 << 40).to_le_bytes());
    assert_cli_rejects(&write(dir.path(), "array.gguf", &b), "array");

    // A tensor with an absurd dimension, and one whose data lies past the end of the file.
    let mut w = bitnest::format::gguf::GgufWriter::new();
    w.meta("general.architecture", bitnest::format::gguf::Value::String("llama".into()));
    w.tensor("t", &[4, 32], bitnest::quant::ggml::GgmlType::F32, vec![0u8; 4 * 32 * 4]);
    let good = w.to_bytes();
    // Locate the tensor info: name "t" (len 1) follows the metadata.
    let name_at = good.windows(9).position(|w| w == [1, 0, 0, 0, 0, 0, 0, 0, b't']).unwrap();
    let first_dim = name_at + 9 + 4;
    let mut huge = good.clone();
    huge[first_dim..first_dim + 8].copy_from_slice(&(1u64 << 40).to_le_bytes());
    assert_cli_rejects(&write(dir.path(), "dim.gguf", &huge), "out of range");
    let offset_at = first_dim + 16 + 4;
    let mut past = good.clone();
    past[offset_at..offset_at + 8].copy_from_slice(&(1u64 << 20).to_le_bytes());
    assert_cli_rejects(&write(dir.path(), "offset.gguf", &past), "truncated");
    let mut bad_type = good.clone();
    bad_type[first_dim + 16..first_dim + 20].copy_from_slice(&999u32.to_le_bytes());
    assert_cli_rejects(&write(dir.path(), "type.gguf", &bad_type), "unknown ggml type");
}

#[test]
fn broken_safetensors_are_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let (_, hf) = common::write_tiny_llama(dir.path());
    let st = hf.join("model.safetensors");
    let full = std::fs::read(&st).unwrap();
    assert!(ModelSource::open(&hf, None).is_ok());

    for cut in [0usize, 4, 8, 100, full.len() / 2, full.len() - 1] {
        std::fs::write(&st, &full[..cut]).unwrap();
        assert!(ModelSource::open(&hf, None).and_then(|s| s.load_f32()).is_err(), "cut at {cut} accepted");
    }
    let mut huge = full.clone();
    huge[..8].copy_from_slice(&u64::MAX.to_le_bytes());
    std::fs::write(&st, &huge).unwrap();
    assert_cli_rejects(&hf, "header length");

    let mut garbage = full.clone();
    garbage[8..16].copy_from_slice(b"not json");
    std::fs::write(&st, &garbage).unwrap();
    assert_cli_rejects(&hf, "invalid safetensors");

    std::fs::write(&st, &full).unwrap();
    std::fs::write(hf.join("config.json"), "{\"architectures\": [\"GPTNeoX\"]}").unwrap();
    assert_cli_rejects(&hf, "not supported");
    std::fs::write(hf.join("config.json"), "{").unwrap();
    assert_cli_rejects(&hf, "not valid JSON");
}

#[test]
fn missing_model_and_bad_options_fail_cleanly() {
    assert_cli_rejects(Path::new("/nonexistent/model.gguf"), "neither an existing file");
    let out = Command::new(env!("CARGO_BIN_EXE_bitnest"))
        .args(["run", "--prompt", "hi", "--temperature", "-1"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(!String::from_utf8_lossy(&out.stderr).contains("panicked"));
}

#[test]
fn bad_quantize_options_fail_before_reading_the_model() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("x.bnest");
    for (args, expect) in [
        (&["--group", "128", "--sub-group", "48"][..], "sub-group size 48"),
        (&["--group", "100"][..], "multiple of 8"),
        (&["--sub-bits", "9", "--group", "64"][..], "sub-scale bits 9"),
        (&["--master-bits", "9"][..], "9"),
    ] {
        // The model path does not exist: options must be rejected first (or the path named).
        let o = Command::new(env!("CARGO_BIN_EXE_bitnest"))
            .args(["quantize", "/nonexistent/model.gguf", "-o"])
            .arg(&out)
            .args(args)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{args:?} accepted");
        assert!(err.contains(expect), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{args:?}: {err}");
        assert!(!out.exists());
    }
}

#[test]
fn an_unknown_model_name_lists_the_known_ones() {
    let names: Vec<&str> = bitnest::fetch::KNOWN_MODELS.iter().map(|m| m.name).collect();
    assert!(names.contains(&"qwen2.5-coder-1.5b") && names.contains(&"qwen2.5-coder-0.5b"));
    assert_cli_rejects(Path::new("no-such-model"), &names.join(", "));
}

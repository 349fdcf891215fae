//! Architectures no real file here has, proven against llama.cpp on small random-weight GGUF
//! files (`tests/synth/make_gguf.py`, SmolLM2's tokenizer borrowed; the `gguf` and `numpy`
//! packages write them, deterministically): Qwen3 (q/k norms, no biases, a head size of its own),
//! Llama 3.1's rope scaling (the `rope_freqs` factors, over positions past the original context
//! of 32) and Phi-3 (fused q/k/v and gate/up tensors; LongRoPE's short factors at a context of
//! 128 and its long ones at 512, past the original 256, with its attention factor). llama.cpp's figures for the same files are in `tests/golden/arch_synth.json`
//! (`tests/synth/llamacpp_goldens.py` makes them): f32 perplexity over 4 chunks of 128 tokens
//! must be within 0.5% and greedy continuations identical; each file also quantizes to `.bnest`
//! and runs at 8 and 4 planes. Mixtures of experts likewise (`tests/moe.rs` for more): Mixtral
//! (experts stacked in one tensor, and the same weights one tensor per expert as files before
//! llama.cpp's PR #6387 stored them, which llama.cpp no longer loads: its figures for the stacked
//! file stand for both), Qwen2-MoE (q/k/v biases, a gated shared expert), Qwen3-MoE and OLMoE
//! (q/k norms over whole vectors), 8 experts of which 2 run per token, and also 1 or 4
//! (`--experts`, llama.cpp's `--override-kv ARCH.expert_used_count=int:K`). Q8_0 files of Phi-3 and of Mixtral run through the lossless
//! transcode into bit planes (Phi-3's fused tensors and Mixtral's stacked experts cut apart there):
//! perplexity within 2%, and greedy continuations agreeing for at least three quarters of their
//! text (Phi-3's wholly; the plane kernels round activations differently from llama.cpp's Q8_0 dot
//! products, so a near tie may go the other way). Gemma 3 (√width
//! embeddings, four norms a block, GeGLU, five sliding-window layers of 16 positions with their
//! own rope base to each global one) likewise, and its windowed caches, whose rows move down as
//! a sequence outgrows them, give the logits of a cache that keeps every position.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_bitnest");

fn golden() -> serde_json::Value {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/golden/arch_synth.json");
    serde_json::from_str(&std::fs::read_to_string(path).expect("read the golden")).expect("parse the golden")
}

fn make(dir: &Path, name: &str, arch: &str, ty: &str) -> PathBuf {
    common::synth_gguf(dir, name, arch, ty)
}

fn bitnest_json(args: &[&std::ffi::OsStr]) -> serde_json::Value {
    let out = Command::new(BIN).args(args).args(["--format", "json", "-t", "1"]).output().expect("run bitnest");
    assert!(out.status.success(), "bitnest {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("JSON output")
}

fn ppl(model: &Path, text: &Path, extra: &[&str]) -> f64 {
    ppl_at(model, text, extra, "128")
}

fn ppl_at(model: &Path, text: &Path, extra: &[&str], ctx: &str) -> f64 {
    let mut args: Vec<&std::ffi::OsStr> = vec!["ppl".as_ref(), "--model".as_ref(), model.as_os_str()];
    args.extend(extra.iter().map(std::ffi::OsStr::new));
    args.extend([
        "--file".as_ref(),
        text.as_os_str(),
        "--ctx".as_ref(),
        ctx.as_ref(),
        "--chunks".as_ref(),
        "4".as_ref(),
    ]);
    bitnest_json(&args)["ppl"].as_f64().expect("ppl in the JSON")
}

#[test]
fn synthetic_architectures_match_llama_cpp() {
    let g = golden();
    let dir = tempfile::tempdir().unwrap();
    let text = dir.path().join("wiki.txt");
    let all = std::fs::read(common::shared("data/wikitext-2-raw-test.txt")).expect("WikiText-2");
    std::fs::write(&text, &all[..g["text_bytes"].as_u64().unwrap() as usize]).unwrap();
    let prompt = g["prompt"].as_str().unwrap();
    let n = g["n_predict"].as_u64().unwrap().to_string();
    for (name, want) in g["archs"].as_object().unwrap() {
        let (arch, ty) = (want["arch"].as_str().unwrap(), want["type"].as_str().unwrap());
        let gguf = make(dir.path(), name, arch, ty);
        // f32 weights on the f32 path, to 0.5%; Q8_0 weights transcoded into bit planes, whose
        // kernels round activations differently from llama.cpp's, to 2%.
        let (path, tolerance): (&[&str], f64) = if ty == "f32" { (&["--f32"], 0.005) } else { (&[], 0.02) };
        let arch = name.as_str();
        let ours = ppl(&gguf, &text, path);
        let theirs = want["ppl"].as_f64().unwrap();
        let rel = (ours - theirs).abs() / theirs;
        println!("{arch}: PPL {ours:.4} here, {theirs:.4} llama.cpp ({:+.4}%)", 100.0 * (ours - theirs) / theirs);
        assert!(rel < tolerance, "{arch}: perplexity {ours} against llama.cpp's {theirs}");
        for (ctx, theirs) in want["ppl_at"].as_object().unwrap() {
            let (ours, theirs) = (ppl_at(&gguf, &text, path, ctx), theirs.as_f64().unwrap());
            println!("{arch}: PPL at ctx {ctx} {ours:.4} here, {theirs:.4} llama.cpp");
            assert!(
                (ours - theirs).abs() / theirs < tolerance,
                "{arch} at ctx {ctx}: {ours} against llama.cpp's {theirs}"
            );
        }

        // Mixtures with fewer or more experts per token than they were made with.
        for (k, theirs) in want["ppl_experts"].as_object().into_iter().flatten() {
            let mut extra = path.to_vec();
            extra.extend(["--experts", k.as_str()]);
            let (ours, theirs) = (ppl(&gguf, &text, &extra), theirs.as_f64().unwrap());
            println!("{arch}: PPL with {k} experts a token {ours:.4} here, {theirs:.4} llama.cpp");
            assert!((ours - theirs).abs() / theirs < tolerance, "{arch} with {k} experts: {ours} against {theirs}");
        }

        let mut run_args: Vec<&std::ffi::OsStr> = vec!["run".as_ref(), "--model".as_ref(), gguf.as_os_str()];
        run_args.extend(path.iter().map(std::ffi::OsStr::new));
        run_args
            .extend(["--prompt", prompt, "--temperature", "0", "--max-tokens", n.as_str()].map(std::ffi::OsStr::new));
        let run = bitnest_json(&run_args);
        let (text_ours, text_theirs) = (run["text"].as_str().unwrap(), want["continuation"].as_str().unwrap());
        if ty == "f32" {
            assert_eq!(text_ours, text_theirs, "{arch}: greedy continuation");
        } else {
            let (ours, theirs) = (text_ours, text_theirs);
            // Rounded differently from llama.cpp's Q8_0 dot products, a near tie may go the
            // other way: the first three quarters of the text must agree (Phi-3's all does;
            // Mixtral's 24th token differs).
            let same = ours.chars().zip(theirs.chars()).take_while(|(a, b)| a == b).count();
            println!("{arch}: greedy continuation agrees for {same} of {} characters", theirs.chars().count());
            assert!(4 * same >= 3 * theirs.chars().count(), "{arch}: greedy continuation {ours:?} against {theirs:?}");
        }

        if ty != "f32" {
            continue;
        }
        // The same weights as nested bit planes: 8 planes are close to f32, 4 still run.
        let bnest = dir.path().join(format!("{arch}.bnest"));
        let q = Command::new(BIN).arg("quantize").arg(&gguf).arg("-o").arg(&bnest).args(["-t", "1"]).output().unwrap();
        assert!(q.status.success(), "{arch}: quantize: {}", String::from_utf8_lossy(&q.stderr));
        let p8 = ppl(&bnest, &text, &["--bits", "8"]);
        let p4 = ppl(&bnest, &text, &["--bits", "4"]);
        println!("{arch}: .bnest PPL {p8:.1} at 8 planes, {p4:.1} at 4");
        assert!((p8 - ours).abs() / ours < 0.05, "{arch}: 8 planes {p8} against f32 {ours}");
        assert!(p4.is_finite() && p4 > 1.0, "{arch}: 4 planes {p4}");
    }
}

/// Gemma 3's sliding-window layers keep only their window and two passes' worth of positions:
/// decoding 150 tokens in passes of 1 and 3 through sessions whose windowed caches hold 16 + 2·3
/// rows (so they move down every few tokens) gives, bit for bit, the logits of one pass over a
/// cache that holds them all; and a rollback past what a window layer still holds starts over.
#[test]
fn sliding_window_caches_move_without_changing_logits() {
    let dir = tempfile::tempdir().unwrap();
    let gguf = make(dir.path(), "gemma3", "gemma3", "f32");
    let model = bitnest::model::ModelSource::open(&gguf, None).unwrap().load_f32().unwrap();
    let (n, vocab) = (150, model.config.vocab_size);
    let tokens: Vec<u32> = (0..n as u32).map(|i| (i * 7919 + 13) % vocab as u32).collect();
    let mut full = model.new_session(n, n);
    let want = model.forward(&mut full, &tokens, n).unwrap().to_vec();
    let full_bytes = full.kv_bytes();
    for step in [1, 3] {
        let mut s = model.new_session(n, 3);
        assert!(s.kv_bytes() < full_bytes / 2, "windowed layers hold {} bytes of {full_bytes}", s.kv_bytes());
        for (i, chunk) in tokens.chunks(step).enumerate() {
            let got = model.forward(&mut s, chunk, chunk.len()).unwrap();
            let at = i * step;
            assert!(
                got == &want[at * vocab..(at + chunk.len()) * vocab],
                "passes of {step}: logits of tokens {at}.. differ from the full cache's"
            );
        }
        // Back by one pass: still held. Back by far more: everything is forgotten.
        assert_eq!(s.truncate(n - 3), n - 3);
        let got = model.forward(&mut s, &tokens[n - 3..], 3).unwrap();
        assert!(got == &want[(n - 3) * vocab..], "after a short rollback");
        assert_eq!(s.truncate(40), 0, "a window layer no longer holds what position 40 needs");
    }
}

/// Pre-tokenizers no real vocabulary here uses, proven on a borrowed one: SmolLM2's vocabulary
/// and merges under Llama 3's `llama-bpe` split give llama-tokenize's ids on the 42 tokenization
/// texts of the real-model goldens (`tests/golden/pre_tokenizers.json`, made by
/// `tests/synth/pre_tokenizer_goldens.py`), and differ from SmolLM2's own split on some.
#[test]
fn pre_tokenizers_match_llama_tokenize() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/golden/pre_tokenizers.json");
    let g: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let own = bitnest::tokenizer::Tokenizer::from_gguf(
        &bitnest::format::gguf::GgufFile::open(&common::model_path()).unwrap(),
    )
    .unwrap();
    for (pre, rows) in g["pre"].as_object().unwrap() {
        let out = dir.path().join(format!("{pre}.gguf"));
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/synth/make_gguf.py");
        let r = Command::new("python3")
            .arg(script)
            .args(["--arch", "llama3", "--pre", pre, "--tokenizer-from"])
            .arg(common::model_path())
            .arg("--out")
            .arg(&out)
            .output()
            .expect("run python3");
        assert!(r.status.success(), "make_gguf.py: {}", String::from_utf8_lossy(&r.stderr));
        let tok =
            bitnest::tokenizer::Tokenizer::from_gguf(&bitnest::format::gguf::GgufFile::open(&out).unwrap()).unwrap();
        let (mut same, mut differs_from_own) = (0, 0);
        for row in rows.as_array().unwrap() {
            let text = row["text"].as_str().unwrap();
            let want: Vec<u32> = row["ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
            let got = tok.encode(text, true).unwrap();
            assert_eq!(got, want, "{pre}: {:?}", row["name"]);
            same += 1;
            differs_from_own += (own.encode(text, true).unwrap() != want) as usize;
        }
        println!("{pre}: {same} texts as llama-tokenize; {differs_from_own} of them split unlike SmolLM2's own");
        assert!(differs_from_own > 0, "{pre}: the split never mattered");
    }
}

/// A GGUF of an architecture bitnest does not run names it and the ones it does.
#[test]
fn unsupported_architectures_name_the_supported_ones() {
    let e = bitnest::model::arch::Arch::from_gguf("gemma4").unwrap_err().to_string();
    assert!(e.contains("gemma4") && e.contains("qwen3") && e.contains("llama"), "{e}");
}

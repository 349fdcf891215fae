//! Every input the fuzzers found a bug with (`tests/fuzz/<target>/`, copied from
//! `fuzz/artifacts/`), run through the same check as its fuzz target (`fuzz/checks.rs`), so a
//! fixed bug stays fixed without the nightly toolchain. `bench/fuzz.sh` runs the fuzzers
//! themselves; docs/RELIABILITY.md has their figures.

use std::path::Path;
use std::time::{Duration, Instant};

#[allow(dead_code, clippy::all)]
#[path = "../fuzz/checks.rs"]
mod checks;

/// Runs every saved input of `target` through `check`; each must pass within `limit` (the
/// fuzzers' per-input timeout is 10 s).
fn replay(target: &str, check: fn(&[u8]), limit: Duration) -> usize {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fuzz").join(target);
    let Ok(entries) = std::fs::read_dir(&dir) else { return 0 };
    let mut files: Vec<_> = entries.map(|e| e.unwrap().path()).collect();
    files.sort();
    for f in &files {
        let data = std::fs::read(f).unwrap();
        check(&data); // warm the check's one-time setup (loading a tokenizer or a model)
        let t0 = Instant::now();
        check(&data);
        assert!(t0.elapsed() < limit, "{}: {:?}, past {limit:?}", f.display(), t0.elapsed());
    }
    files.len()
}

#[test]
fn fuzz_findings_stay_fixed() {
    let limit = Duration::from_secs(2);
    let n = replay("gguf", checks::gguf, limit)
        + replay("bnest", checks::bnest, limit)
        + replay("safetensors", checks::safetensors, limit)
        + replay("tokenizer", checks::tokenizer, limit)
        + replay("chat_template", checks::chat_template, limit)
        + replay("request", checks::request, limit);
    assert!(n > 0, "no saved fuzz findings found under tests/fuzz/");
}

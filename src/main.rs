//! The `bitnest` command line: run, chat, serve, ppl, inspect, quantize, bench, accel-report.

mod accel_report;
mod args;
mod repl;
mod serve;

use std::io::Write;
use std::ops::ControlFlow;
use std::process::ExitCode;

use anyhow::{Context, Result, bail};

use args::*;
use clap::Parser;

use bitnest::chat::Message;
use bitnest::engine::Engine;
use bitnest::fetch::resolve_model;
use std::sync::{Arc, Mutex};

use bitnest::decode::{Decoder, Sequence};
use bitnest::quant::{GroupDtype, QuantConfig};
use bitnest::sampling::Sampler;
use bitnest::spec::{SpecMode, Speculator, TokenRecycler};

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The server builds its own compute pool (for its worker thread) and async runtime.
    if let Cmd::Serve(a) = cli.cmd {
        return exit(cmd_serve(a));
    }
    let threads = match &cli.cmd {
        Cmd::Run(a) => a.model.threads,
        Cmd::Chat(a) => a.model.threads,
        Cmd::Ppl(a) => a.model.threads,
        Cmd::Inspect(a) => a.model.threads,
        Cmd::Quantize(a) => a.threads,
        Cmd::Moefy(a) => a.quantize.threads,
        Cmd::Serve(_) => None,
        Cmd::AccelReport(a) => a.model.threads,
        Cmd::Bench(a) => match &a.what {
            Some(BenchWhat::Spec(s)) => s.model.threads,
            None => a.model.threads,
        },
    };
    // The whole command runs on a worker of its own pool: parallel kernels called from a pool
    // thread push their jobs to its local queue, which (unlike injection from outside the
    // pool) allocates nothing per call, keeping the decode loop allocation-free.
    let result = match threads {
        Some(0) => Err(anyhow::anyhow!("--threads must be at least 1")),
        _ => rayon::ThreadPoolBuilder::new()
            .num_threads(threads.unwrap_or(0))
            .build()
            .context("cannot set up the thread pool")
            .and_then(|pool| pool.install(|| run(cli))),
    };
    exit(result)
}

fn exit(result: Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bitnest: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::Run(a) => cmd_run(a),
        Cmd::Chat(a) => cmd_chat(a),
        Cmd::Ppl(a) => cmd_ppl(a),
        Cmd::Inspect(a) => cmd_inspect(a),
        Cmd::Quantize(a) => cmd_quantize(a, None),
        Cmd::Moefy(a) => cmd_quantize(a.quantize, Some(a.experts as usize)),
        Cmd::Serve(a) => cmd_serve(a),
        Cmd::Bench(a) => cmd_bench(a),
        Cmd::AccelReport(a) => accel_report::cmd(a),
    }
}

fn cmd_serve(a: ServeArgs) -> Result<()> {
    let spec = a.spec.options()?;
    if a.model.threads == Some(0) {
        bail!("--threads must be at least 1");
    }
    let model_id = a.alias.clone().unwrap_or_else(|| {
        let p = std::path::Path::new(&a.model.model);
        match p.file_name() {
            Some(f) if p.exists() => f.to_string_lossy().into_owned(),
            _ => a.model.model.clone(),
        }
    });
    let opts = serve::ServeOptions {
        host: a.host,
        port: a.port,
        model_id,
        threads: a.model.threads,
        parallel: a.parallel as usize,
        queue: a.queue as usize,
        max_body: a.max_body,
        prefill_chunk: a.prefill_chunk as usize,
        spec,
        grace: std::time::Duration::from_secs(a.grace),
        api_key: a.api_key.as_deref().and_then(serve::auth::ApiKey::new),
    };
    // The socket is bound first, so a load balancer sees "loading" (503) rather than nothing.
    serve::serve(opts, || {
        // A test hook: holds the load so the test suite can watch the loading phase.
        if let Some(ms) = std::env::var("BITNEST_SERVE_LOAD_DELAY_MS").ok().and_then(|v| v.parse::<u64>().ok()) {
            std::thread::sleep(std::time::Duration::from_millis(ms.min(60_000)));
        }
        let engine = load(&a.model)?;
        Speculator::new(spec, Arc::new(Mutex::new(TokenRecycler::new(0)))).check(&engine.model)?;
        let ctx = context_size(&engine, Some(a.ctx))?;
        let m = &engine.model;
        let slot_bytes = m.kv_type.cache_bytes(&m.config, &m.key_bias, ctx, a.prefill_chunk.max(1) as usize);
        eprintln!(
            "bitnest serve: {} loaded; KV cache {:.1} MiB per slot, at most {:.1} MiB for {} slots",
            engine.path.display(),
            slot_bytes as f64 / 1048576.0,
            (slot_bytes * a.parallel as usize) as f64 / 1048576.0,
            a.parallel
        );
        Ok(serve::Loaded { engine, ctx })
    })
}

/// The file `--model` runs from: the named or given model, and for a quantized GGUF its
/// lossless bit-plane transcode (made once, cached), unless `--f32` asks for the reference path.
pub(crate) fn model_path(m: &ModelArgs) -> Result<std::path::PathBuf> {
    let path = resolve_model(&m.model)?;
    if m.f32 || !path.is_file() || bitnest::format::bnest::BnestFile::sniff(&path) {
        return Ok(path);
    }
    Ok(bitnest::transcode::cached_planes(&path, true)?.unwrap_or(path))
}

/// Sets the thread count and loads the model named by `--model`.
pub(crate) fn load(m: &ModelArgs) -> Result<Engine> {
    let plan = m.plan()?;
    let path = model_path(m)?;
    let mut engine = Engine::load(&path, plan)?;
    set_kv_type(&mut engine, m)?;
    Ok(engine)
}

/// The cache type `--cache-type[-k|-v]` ask for, if the model can use it; and the experts
/// per token `--experts` asks for.
fn set_kv_type(engine: &mut Engine, m: &ModelArgs) -> Result<()> {
    if let Some(k) = m.experts {
        engine.model.set_experts_used(k as usize)?;
    }
    let kind = m.kv_type();
    if let Some(why) = kind.unsupported(&engine.model.config) {
        bail!("{why}");
    }
    engine.model.kv_type = kind;
    Ok(())
}

/// `bitnest quantize`, or with `moefy_experts` `bitnest moefy` (the model cut into that many
/// experts first).
fn cmd_quantize(a: QuantizeArgs, moefy_experts: Option<usize>) -> Result<()> {
    let mut dtypes = Vec::new();
    for fam in a.dtypes.split(',').map(str::trim) {
        match fam {
            "int" => dtypes.push(GroupDtype::Int),
            "bitmod" => dtypes.extend(
                bitnest::quant::dtype::ALL.iter().filter(|d| d.is_bitmod() && d.native_bits() <= a.master_bits),
            ),
            other => bail!("unknown datatype family {other:?} (int, bitmod)"),
        }
    }
    let objective = match &a.objective {
        None => QuantConfig::default_objective(a.master_bits),
        Some(s) => s
            .split(',')
            .map(|t| {
                let (r, l) = t.split_once(':').with_context(|| format!("objective term {t:?} is not r:λ"))?;
                Ok((r.trim().parse::<u32>()?, l.trim().parse::<f32>()?))
            })
            .collect::<Result<Vec<_>>>()
            .context("bad --objective")?,
    };
    let scale_search = a
        .scale_search
        .split(',')
        .map(|t| t.trim().parse::<f32>())
        .collect::<Result<Vec<_>, _>>()
        .context("bad --scale-search")?;
    let mut cfg = QuantConfig {
        group: a.group.unwrap_or(512),
        master_bits: a.master_bits,
        dtypes,
        objective,
        scale_search,
        sub_group: 0,
        sub_bits: 0,
    };
    let set_sub = |cfg: &mut QuantConfig| {
        let g = cfg.group;
        cfg.sub_group = a.sub_group.unwrap_or(if g > 32 && g.is_multiple_of(32) { 32 } else { 0 });
        cfg.sub_bits = if cfg.sub_group > 0 { a.sub_bits } else { 0 };
    };
    set_sub(&mut cfg);
    // Bad options fail before the model is read (the default group is checked below).
    if a.group.is_some() {
        cfg.validate()?;
    }
    let path = resolve_model(&a.input)?;
    let mut source = bitnest::model::ModelSource::open(&path, None)?;
    let mut name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    if let Some(e) = moefy_experts {
        let t0 = std::time::Instant::now();
        source = bitnest::moefy::moefy(&source, e)?;
        name = format!("{name} (moefied into {e} experts)");
        eprintln!("cut every feed-forward layer into {e} experts in {:.1} s", t0.elapsed().as_secs_f64());
    }
    if a.group.is_none() {
        cfg.group = QuantConfig::default_group(source.config()?.dim);
        set_sub(&mut cfg);
    }
    cfg.validate()?;
    let t0 = std::time::Instant::now();
    let importance = match &a.calib {
        None => None,
        Some(f) => {
            let text = std::fs::read_to_string(f).with_context(|| format!("cannot read --calib {}", f.display()))?;
            eprintln!("calibrating on {} (up to {} tokens)…", f.display(), a.calib_tokens);
            let imp = bitnest::quantize::calibrate(&source, &text, a.calib_tokens)
                .with_context(|| format!("calibration on {}", f.display()))?;
            let file = f.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            name = format!("{name} (calibrated on {file}, {} tokens)", a.calib_tokens);
            Some(imp)
        }
    };
    bitnest::quantize::quantize_model_with(&source, &name, &cfg, importance.as_ref(), &a.output, true)?;
    let size = std::fs::metadata(&a.output)?.len();
    eprintln!(
        "wrote {} ({:.1} MiB) in {:.1} s",
        a.output.display(),
        size as f64 / 1048576.0,
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}

fn context_size(engine: &Engine, ctx: Option<usize>) -> Result<usize> {
    let max = engine.model.config.max_seq;
    match ctx {
        Some(0) => bail!("--ctx must be positive"),
        Some(c) if c > max => bail!("--ctx {c} exceeds the model's context length {max}"),
        Some(c) => Ok(c),
        None => Ok(max.min(4096)),
    }
}

fn cmd_run(a: RunArgs) -> Result<()> {
    let params = a.sampling.params()?;
    let spec_opts = a.spec.options()?;
    let engine = load(&a.model)?;
    let recycler = Arc::new(Mutex::new(TokenRecycler::new(engine.model.config.vocab_size)));
    let spec = Speculator::new(spec_opts, recycler);
    spec.check(&engine.model)?;
    let prompt = if a.chat {
        engine.chat_prompt(&[Message::new("user", a.prompt.as_str())])?
    } else {
        engine.tokenizer.encode(&a.prompt, true)?
    };
    let ctx = context_size(&engine, a.ctx)?;
    let session = engine.model.new_batched_session(ctx, 512);
    let spec = (spec.opts.mode != SpecMode::None).then_some(spec);
    let mut seq = Sequence::new(session, &[], &prompt, a.max_tokens, Sampler::new(params), spec)?;
    let mut decoder = Decoder::new(&engine.model, engine.stop_ids(), 512);
    let mut stream = engine.tokenizer.stream();
    let mut ids = Vec::new();
    let json = matches!(a.format, OutputFormat::Json);
    let mut out = std::io::stdout().lock();
    let stats = decoder.generate(&mut seq, |id, _| {
        ids.push(id);
        if !json && let Some(text) = stream.push(id) {
            let _ = write!(out, "{text}");
            let _ = out.flush();
        }
        ControlFlow::Continue(())
    })?;
    let spec_stats = seq.spec.as_ref().map(|s| s.stats.clone()).unwrap_or_default();
    if json {
        let text = engine.tokenizer.decode(&ids)?;
        let v = serde_json::json!({
            "prompt_ids": prompt,
            "ids": ids,
            "text": text,
            "prefill_tok_s": stats.prefill_tok_s,
            "decode_tok_s": stats.decode_tok_s,
            "finish_reason": stats.finish,
            "spec": spec_opts.mode,
            "mat": spec_stats.mat(),
        });
        writeln!(out, "{v}")?;
    } else {
        if let Some(rest) = stream.finish() {
            write!(out, "{rest}")?;
        }
        writeln!(out)?;
        eprintln!(
            "[prompt {} tokens, {:.1} tok/s | generated {} tokens, {:.1} tok/s | {:?}]",
            stats.prompt_tokens, stats.prefill_tok_s, stats.generated_tokens, stats.decode_tok_s, stats.finish
        );
        if spec_stats.steps > 0 {
            let st = &spec_stats;
            eprintln!(
                "[speculative {}: {} passes, {:.2} tokens per pass, {:.1} nodes per pass, self-draft acceptance {:.0}%]",
                spec_opts.mode,
                st.steps,
                st.mat(),
                st.nodes as f64 / st.steps as f64,
                100.0 * st.self_acceptance()
            );
        }
    }
    Ok(())
}

fn cmd_bench_spec(a: SpecBenchArgs) -> Result<()> {
    use bitnest::bench::spec as bench;
    use bitnest::spec::{SpecMode, SpecOptions};
    fn list<T: std::str::FromStr>(s: &str, what: &str) -> Result<Vec<T>> {
        s.split(',').map(|x| x.trim().parse::<T>().map_err(|_| anyhow::anyhow!("bad {what} {x:?}"))).collect()
    }
    let modes: Vec<SpecMode> = s_modes(&a.spec)?;
    fn s_modes(s: &str) -> Result<Vec<SpecMode>> {
        s.split(',').map(|m| m.trim().parse()).collect()
    }
    let draft_bits: Vec<u32> = list(&a.draft_bits, "--draft-bits")?;
    let draft_experts: Vec<bitnest::spec::DraftExperts> =
        a.draft_experts.split(',').map(|x| x.trim().parse()).collect::<Result<_>>()?;
    let tree_nodes: Vec<usize> = list(&a.tree_nodes, "--tree-nodes")?;
    if a.max_draft > 64 || tree_nodes.iter().any(|&n| n > 256) || draft_bits.iter().any(|b| !(1..=8).contains(b)) {
        bail!("--max-draft is at most 64, --tree-nodes at most 256, --draft-bits 1..=8");
    }
    let engine = load(&a.model)?;
    let ctx = context_size(&engine, Some(a.ctx))?;
    let mut prompts = bench::read_prompts(&a.prompts)?;
    if let Some(k) = a.per_category {
        let mut seen = std::collections::HashMap::new();
        prompts.retain(|p| {
            let c = seen.entry(p.category.clone()).or_insert(0usize);
            *c += 1;
            *c <= k
        });
    }
    if let Some(path) = &a.dump_prompts {
        let mut lines = String::new();
        for p in &prompts {
            let text = engine.template.render(&[Message::new("user", p.turns[0].as_str())], true)?;
            let v = serde_json::json!({"question_id": p.question_id, "category": p.category, "text": text});
            lines.push_str(&v.to_string());
            lines.push('\n');
        }
        std::fs::write(path, lines).with_context(|| format!("cannot write {}", path.display()))?;
        return Ok(());
    }
    let text = matches!(a.format, OutputFormat::Text);
    if text {
        eprintln!(
            "bench spec: {} prompts, {} new tokens each, plain and every configuration in turn per prompt…",
            prompts.len(),
            a.max_tokens
        );
    }
    let mut configs = Vec::new();
    for &mode in &modes {
        let uses_self = mode.may_use(bitnest::spec::FROM_SELF);
        let uses_tree = mode.may_use(bitnest::spec::FROM_RECYCLE);
        for &b in if uses_self { &draft_bits[..] } else { &draft_bits[..1] } {
            for &e in if uses_self { &draft_experts[..] } else { &draft_experts[..1] } {
                for &t in if uses_tree { &tree_nodes[..] } else { &tree_nodes[..1] } {
                    configs.push(SpecOptions {
                        mode,
                        draft_bits: b,
                        draft_experts: e,
                        max_draft: a.max_draft,
                        tree_nodes: t,
                        adaptive: !a.fixed,
                    });
                }
            }
        }
    }
    let total = prompts.len();
    let results = bench::run(&engine, &prompts, &configs, a.max_tokens, ctx, a.warmup, |done| {
        if text && (done % 10 == 0 || done == total) {
            eprint!("\r{done}/{total} prompts");
        }
    })?;
    if text {
        eprintln!();
    }
    let mut out = std::io::stdout().lock();
    for r in results {
        if text {
            writeln!(
                out,
                "\n--spec {} --draft-bits {} --draft-experts {} --tree-nodes {}: speedup {:.2}x, MAT {:.2}, {:.1} tok/s (plain {:.1}), {:.1} nodes/pass, self-draft acceptance {:.0}%, identical: {}",
                r.mode,
                r.draft_bits,
                r.draft_experts,
                r.tree_nodes,
                r.speedup,
                r.mat,
                r.tok_s,
                r.plain_tok_s,
                r.nodes_per_pass,
                100.0 * r.self_acceptance,
                r.identical
            )?;
            writeln!(out, "| category | prompts | MAT | tok/s | plain tok/s | speedup | identical |")?;
            writeln!(out, "|---|---|---|---|---|---|---|")?;
            for (c, v) in &r.categories {
                writeln!(
                    out,
                    "| {c} | {} | {:.2} | {:.1} | {:.1} | {:.2}x | {} |",
                    v.prompts, v.mat, v.tok_s, v.plain_tok_s, v.speedup, v.identical
                )?;
            }
        } else {
            writeln!(out, "{}", serde_json::to_string(&r)?)?;
        }
    }
    Ok(())
}

fn cmd_chat(a: ChatArgs) -> Result<()> {
    let params = a.sampling.params()?;
    let engine = load(&a.model)?;
    let ctx = context_size(&engine, a.ctx)?;
    let spec = a.spec.options()?;
    let opts =
        repl::ChatOptions { path: engine.path.clone(), system: a.system, max_tokens: a.max_tokens, ctx, params, spec };
    repl::chat(engine, opts)
}

fn cmd_ppl(a: PplArgs) -> Result<()> {
    let mut engine = load(&a.model)?;
    if let Some(spec) = &a.state_blocks {
        let st = bitnest::model::StateBlocks::parse(spec)?;
        let c = &engine.model.config;
        if let Some(why) = st.unsupported(c.dim, c.n_heads * c.head_dim, c.ffn_dim) {
            bail!("{why}");
        }
        engine.model.state = st;
    }
    let text = std::fs::read_to_string(&a.file).with_context(|| format!("cannot read {}", a.file.display()))?;
    let tokens = engine.tokenizer.encode(&text, false)?;
    let bos = engine.tokenizer.add_bos().then(|| engine.tokenizer.bos_id()).flatten();
    let n_chunks = (tokens.len() / a.ctx.max(1)).min(a.chunks.unwrap_or(usize::MAX));
    eprintln!("bitnest ppl: {} tokens, ctx {}, {} chunks", tokens.len(), a.ctx, n_chunks);
    let t0 = std::time::Instant::now();
    let text_mode = matches!(a.format, OutputFormat::Text);
    let r = bitnest::ppl::perplexity(&engine.model, &tokens, a.ctx, a.chunks, bos, |p| {
        if text_mode {
            eprint!("[{}]{:.4},", p.chunks, p.ppl());
        }
    })?;
    let secs = t0.elapsed().as_secs_f64();
    if text_mode {
        eprintln!();
        eprintln!(
            "{} tokens scored in {:.1} s ({:.1} tok/s evaluated)",
            r.tokens_scored,
            secs,
            (r.chunks * a.ctx) as f64 / secs
        );
        println!("PPL = {:.4} ± {:.4}", r.ppl(), r.stderr());
    } else {
        let path = model_path(&a.model)?;
        let bpw = match bitnest::format::bnest::BnestFile::sniff(&path) {
            true => Some(
                bitnest::format::bnest::BnestFile::open(&path)?
                    .bits_per_weight(|n, m| a.model.plan()?.unwrap_or_default().bits_for(n, m))?,
            ),
            false => None,
        };
        let v = serde_json::json!({
            "ppl": r.ppl(), "stderr": r.stderr(), "chunks": r.chunks, "ctx": a.ctx,
            "tokens_scored": r.tokens_scored, "seconds": secs, "bits_per_weight": bpw,
        });
        println!("{v}");
    }
    Ok(())
}

fn cmd_bench(a: BenchArgs) -> Result<()> {
    if let Some(BenchWhat::Spec(s)) = a.what {
        return cmd_bench_spec(s);
    }
    let path = model_path(&a.model)?;
    let plan = a.model.plan()?;
    let file_bytes = model_bytes(&path)?;
    let t0 = std::time::Instant::now();
    let mut engine = Engine::load(&path, plan.clone())?;
    set_kv_type(&mut engine, &a.model)?;
    let load_s = t0.elapsed().as_secs_f64();
    let bos = engine.tokenizer.add_bos().then(|| engine.tokenizer.bos_id()).flatten();
    let opts = bitnest::bench::BenchOptions {
        n_prompt: a.n_prompt,
        n_gen: a.n_gen,
        reps: a.reps,
        bos,
        max_batch: 512,
        depth: a.depth,
    };
    let r = bitnest::bench::run_bench(&engine.model, &opts)?;
    let mib = |b: f64| b / 1048576.0;
    let peak_rss_mb = bitnest::bench::peak_rss_bytes().map(|b| mib(b as f64));
    // Only after the peak RSS is taken: opening the file again must not count towards it.
    let bpw = if bitnest::format::bnest::BnestFile::sniff(&path) {
        Some(
            bitnest::format::bnest::BnestFile::open(&path)?
                .bits_per_weight(|n, m| plan.clone().unwrap_or_default().bits_for(n, m))?,
        )
    } else {
        None
    };
    let (file_mb, kv_mb) = (mib(file_bytes as f64), mib(r.kv_bytes as f64));
    let weights_mb = mib(engine.model.weight_bytes() as f64);
    let bits = match (&a.model.bits_plan, a.model.bits) {
        (Some(f), _) => serde_json::json!(format!("plan:{}", f.display())),
        (None, b) => serde_json::json!(b),
    };
    let rate = |x: &Option<bitnest::bench::Rate>| x.as_ref().map(|r| (r.tok_s, r.std, r.samples.clone()));
    let (pp, tg) = (rate(&r.pp), rate(&r.tg));
    if matches!(a.format, OutputFormat::Json) {
        let v = serde_json::json!({
            "model": path.display().to_string(),
            "bits": bits,
            "bits_per_weight": bpw,
            "threads": r.threads,
            "cache_type": engine.model.kv_type.name(),
            "n_prompt": a.n_prompt,
            "n_gen": a.n_gen,
            "depth": a.depth,
            "reps": a.reps,
            "pp512_tok_s": pp.as_ref().map(|p| p.0),
            "pp512_std": pp.as_ref().map(|p| p.1),
            "pp512_samples": pp.as_ref().map(|p| p.2.clone()),
            "tg128_tok_s": tg.as_ref().map(|p| p.0),
            "tg128_std": tg.as_ref().map(|p| p.1),
            "tg128_samples": tg.as_ref().map(|p| p.2.clone()),
            "peak_rss_mb": peak_rss_mb,
            "file_mb": file_mb,
            "kv_mb": kv_mb,
            "weights_mb": weights_mb,
            "load_s": load_s,
            "units": "tok/s; *_mb are MiB; peak_rss_mb is VmHWM",
        });
        println!("{v}");
    } else {
        let cell = |x: &Option<(f64, f64, Vec<f64>)>| match x {
            Some((m, s, _)) => format!("{m:>10.2} ± {s:<8.2}"),
            None => format!("{:>10}   {:<8}", "-", ""),
        };
        let bits_txt = match &bits {
            serde_json::Value::Null => "all".to_string(),
            serde_json::Value::String(s) => s.clone(),
            v => v.to_string(),
        };
        let bpw_txt = bpw.map(|b| format!("{b:.2}")).unwrap_or_else(|| "-".into());
        println!("model: {} ({file_mb:.1} MiB file, {weights_mb:.1} MiB weights in memory)", path.display());
        println!("| bits | bits/weight | threads | test    | {:^21} |", "tok/s");
        println!("|------|-------------|---------|---------|-----------------------|");
        let row = |name: String, c: String| {
            println!("| {bits_txt:<4} | {bpw_txt:>11} | {:>7} | {name:<7} | {c} |", r.threads);
        };
        let at = if a.depth > 0 { format!(" @ d{}", a.depth) } else { String::new() };
        row(format!("pp{}{at}", a.n_prompt), cell(&pp));
        row(format!("tg{}{at}", a.n_gen), cell(&tg));
        let rss = peak_rss_mb.map(|m| format!("{m:.1} MiB")).unwrap_or_else(|| "n/a".into());
        println!(
            "peak RSS (VmHWM): {rss}; KV cache {kv_mb:.1} MiB ({}); load {load_s:.2} s; {} reps after 1 warm-up",
            engine.model.kv_type.name(),
            a.reps
        );
    }
    Ok(())
}

/// Size on disk of a model: the file, or every file of a Hugging Face directory.
fn model_bytes(path: &std::path::Path) -> Result<u64> {
    let meta = std::fs::metadata(path).with_context(|| format!("cannot stat {}", path.display()))?;
    if !meta.is_dir() {
        return Ok(meta.len());
    }
    let mut total = 0;
    for e in std::fs::read_dir(path)? {
        let m = e?.metadata()?;
        if m.is_file() {
            total += m.len();
        }
    }
    Ok(total)
}

fn inspect_bnest(b: &bitnest::format::bnest::BnestFile, all: bool) {
    use bitnest::format::bnest::Encoding;
    let h = &b.header;
    println!(
        "format: .bnest v{} from {} ({:.1} MiB): group {}, {} master bits, datatypes {:?}, objective {:?}",
        h.format_version,
        h.source,
        b.file_bytes() as f64 / 1048576.0,
        h.quant.group,
        h.quant.master_bits,
        h.quant.dtypes,
        h.quant.objective
    );
    if all {
        for t in &h.tensors {
            let enc = match &t.encoding {
                Encoding::F32 { .. } => "f32".to_string(),
                Encoding::Planes { group, master_bits, sub: None, .. } => {
                    format!("{master_bits} planes, group {group}")
                }
                Encoding::Planes { group, master_bits, sub: Some(s), .. } => {
                    format!("{master_bits} planes, group {group}, {}-bit sub-scales per {}", s.bits, s.size)
                }
            };
            println!("  {:<28} {:?} {enc}", t.name, t.shape);
        }
    }
    // All-in bits per weight at each precision, over all matrices: each reads `r` planes (or all
    // it stores, if fewer) plus its group metadata (`TensorDesc::bits_per_weight`).
    let matrices: Vec<(&bitnest::format::bnest::TensorDesc, u32, f64)> = h
        .tensors
        .iter()
        .filter_map(|t| match &t.encoding {
            Encoding::Planes { master_bits, .. } => Some((t, *master_bits, (t.shape[0] * t.shape[1]) as f64)),
            Encoding::F32 { .. } => None,
        })
        .collect();
    let weights: f64 = matrices.iter().map(|m| m.2).sum();
    for r in (1..=h.quant.master_bits).rev() {
        let bits: f64 = matrices.iter().map(|(t, master, n)| t.bits_per_weight(r.min(*master)) * n).sum();
        println!(
            "  read at {r} bits: {:.3} bits/weight all-in over {:.1} M plane weights",
            bits / weights,
            weights / 1e6
        );
    }
}

fn cmd_inspect(a: InspectArgs) -> Result<()> {
    let path = resolve_model(&a.model.model)?;
    let source = bitnest::model::ModelSource::open(&path, a.model.plan()?)?;
    let cfg = source.config()?;
    println!("model: {}", path.display());
    println!("architecture: {}", serde_json::to_string_pretty(&cfg)?);
    // What a session will hold besides the weights, so a user can size --ctx before running.
    let kind = a.model.kv_type();
    if let Some(why) = kind.unsupported(&cfg) {
        bail!("{why}");
    }
    let key_bias = source.key_bias(&cfg)?;
    let kv_per_token = kind.bytes_per_token(&cfg, &key_bias);
    println!(
        "KV cache ({}): {} bytes per token, {:.1} MiB at the trained context of {} tokens{}",
        kind.name(),
        kv_per_token,
        kind.cache_bytes(&cfg, &key_bias, cfg.max_seq, 512) as f64 / 1048576.0,
        cfg.max_seq,
        if cfg.sliding_window.is_some() { " (sliding-window layers keep their window only)" } else { "" }
    );
    let wide: Vec<usize> = (0..cfg.n_layers).filter(|&l| kind.for_layer(key_bias[l]).0 != kind.k).collect();
    if !wide.is_empty() {
        println!(
            "  keys of layers {wide:?} stay q8_0: their key bias exceeds {}",
            bitnest::model::session::WIDE_KEY_BIAS
        );
    }
    match &source {
        bitnest::model::ModelSource::Gguf(g) => {
            println!("format: GGUF v{} (alignment {}), {} metadata keys", g.version, g.alignment, g.metadata.len());
            for (k, v) in &g.metadata {
                println!("  {k} = {}", bitnest::format::gguf::GgufFile::describe_value(v));
            }
            let total: usize = g.tensors.iter().map(|t| t.n_elements()).sum();
            let bytes: usize = g.tensors.iter().map(|t| t.size_bytes).sum();
            println!(
                "tensors: {} ({} parameters, {:.1} MiB, {:.2} bits/weight)",
                g.tensors.len(),
                total,
                bytes as f64 / 1048576.0,
                bytes as f64 * 8.0 / total as f64
            );
            if a.tensors {
                for t in &g.tensors {
                    println!("  {:<28} {:<10} {:?} {} bytes", t.name, format!("{:?}", t.dtype), t.shape, t.size_bytes);
                }
            } else {
                let mut by_type: std::collections::BTreeMap<String, (usize, usize, usize)> = Default::default();
                for t in &g.tensors {
                    let e = by_type.entry(format!("{:?}", t.dtype)).or_default();
                    e.0 += 1;
                    e.1 += t.n_elements();
                    e.2 += t.size_bytes;
                }
                for (ty, (n, el, b)) in by_type {
                    println!("  {ty:<6} {n:>4} tensors {el:>12} weights {:>8.1} MiB", b as f64 / 1048576.0);
                }
            }
        }
        bitnest::model::ModelSource::HfDir(d) => {
            println!("format: Hugging Face safetensors directory");
            let mut names: Vec<&str> = d.names().collect();
            names.sort();
            println!("tensors: {}", names.len());
            if a.tensors {
                names.iter().for_each(|n| println!("  {n}"));
            }
        }
        bitnest::model::ModelSource::Bnest(b, _) => inspect_bnest(b, a.tensors),
        bitnest::model::ModelSource::Memory(m) => println!("format: in memory, {} tensors", m.tensors.len()),
    }
    let engine_tok = source.tokenizer()?;
    let name = |id: Option<u32>| {
        id.map(|i| format!("{i} {:?}", engine_tok.token_str(i).unwrap_or_default())).unwrap_or("none".into())
    };
    println!(
        "tokenizer: {} tokens, bos {}, eos {}, adds bos: {}",
        engine_tok.vocab_size(),
        name(engine_tok.bos_id()),
        name(engine_tok.eos_id()),
        engine_tok.add_bos()
    );
    let arch_template = source.config().ok().and_then(|c| c.spec().chat_template);
    match (source.chat_template(), arch_template) {
        (Some(t), _) => println!("chat template:\n{t}"),
        (None, Some(t)) => println!("chat template: none in the file; the architecture's own:\n{t}"),
        (None, None) => println!("chat template: none (ChatML fallback)"),
    }
    Ok(())
}

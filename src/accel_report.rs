//! `bitnest accel-report`: a model (its file, plan and cache type) or a shape file priced on an
//! accelerator with [`bitnest::accel`], layer by layer, beside the baselines the paper compares
//! and, with `--cpu`, beside this CPU's measured time for every linear layer.

use std::collections::BTreeMap;
use std::time::Instant;

use anyhow::{Context, Result, ensure};
use serde::Serialize;
use serde_json::json;

use bitnest::accel::{Cost, Hardware, OpCost, Phase, Shapes, simulate};
use bitnest::format::bnest::BnestFile;
use bitnest::kernels::Linear;

use crate::args::{AccelArgs, OutputFormat};

/// One block's ops (or the head's) summed.
#[derive(Serialize)]
struct LayerSum {
    layer: String,
    /// Mean bits per weight of its linear layers, weighted by their sizes.
    w_bits: f64,
    compute_cycles: u64,
    dram_cycles: u64,
    cycles: u64,
    bound: &'static str,
    dram_bytes: u64,
    energy_pe_uj: f64,
    energy_sram_uj: f64,
    energy_dram_uj: f64,
    /// Measured on this CPU with `--cpu`: the layer's linear layers, microseconds, and the
    /// weight bytes they read per second.
    cpu_us: Option<f64>,
    cpu_gb_s: Option<f64>,
    cpu_bound: Option<&'static str>,
}

pub(crate) fn cmd(a: AccelArgs) -> Result<()> {
    let hw = match &a.hw {
        Some(p) => Hardware::from_json(&read(p)?).with_context(|| format!("hardware file {}", p.display()))?,
        None => Hardware::preset(&a.accel)?,
    };
    if a.print_hw {
        println!("{}", serde_json::to_string_pretty(&hw)?);
        return Ok(());
    }
    ensure!(a.clock_mhz.is_finite() && a.clock_mhz > 0.0, "--clock-mhz must be a positive number");
    let ctx = a.ctx as usize;
    // What is priced: a shape file at one precision, or the model's file read with its plan.
    let (source, shapes, default_bits, kv_bits) = match &a.shapes {
        Some(path) => {
            let w = a.w_prec.unwrap_or(16.0);
            ensure!(w.is_finite() && w > 0.0 && w <= 32.0, "--w-prec must be between 0 and 32 bits");
            let s = Shapes::from_json(&read(path)?).with_context(|| format!("shape file {}", path.display()))?;
            (format!("{} at {w} bits per weight", path.display()), s, w, [hw.act_bits; 2])
        }
        None => {
            let path = crate::model_path(&a.model)?;
            ensure!(
                BnestFile::sniff(&path),
                "{} is not stored as bit planes: accel-report reads a .bnest file or a quantized GGUF \
                 (through its transcode), or a shape file (--shapes FILE --w-prec BITS)",
                path.display()
            );
            let file = BnestFile::open(&path)?;
            let plan = a.model.plan()?.unwrap_or_default();
            let s = Shapes::from_bnest(&file, &plan)?;
            let kv = a.model.kv_type();
            let bits = |t: bitnest::model::llama::KvType| t.bytes(4096) as f64 * 8.0 / 4096.0;
            let how = match (&a.model.bits_plan, a.model.bits) {
                (Some(p), _) => format!("plan {}", p.display()),
                (None, Some(b)) => format!("{b} planes"),
                (None, None) => "every plane".into(),
            };
            let desc = format!("{} ({how}; KV cache {}/{})", path.display(), kv.k.name(), kv.v.name());
            (desc, s, 16.0, [bits(kv.k), bits(kv.v)])
        }
    };
    let phase = a.phase;
    let ops = shapes.ops(phase, ctx, default_bits, hw.act_bits, kv_bits);
    let cost = simulate(&hw, &ops, phase)?;

    // The designs the paper compares, each at its own precision, on the same shapes.
    let mut baselines = Vec::new();
    for name in bitnest::accel::hardware::NAMES {
        if name == hw.name {
            continue;
        }
        let b = Hardware::preset(name)?;
        let Some(w) = b.default_w_bits else { continue };
        let mut plain = shapes.clone();
        plain.linears.iter_mut().for_each(|l| l.2 = None);
        let c = simulate(&b, &plain.ops(phase, ctx, w, b.act_bits, [b.act_bits; 2]), phase)?;
        baselines.push(json!({
            "accelerator": name, "w_bits": w, "cycles": c.totals.cycles,
            "energy_total_uj": c.totals.energy_total_uj,
            "speedup": c.totals.cycles as f64 / cost.totals.cycles as f64,
            "energy_ratio": c.totals.energy_total_uj / cost.totals.energy_total_uj,
        }));
    }

    let cpu = if a.cpu {
        ensure!(a.shapes.is_none(), "--cpu times a model's layers: give --model, not --shapes");
        Some(time_on_cpu(&a, &cost, phase, ctx)?)
    } else {
        None
    };
    let layers = sum_layers(&cost, cpu.as_ref());
    let seconds = cost.totals.cycles as f64 / (a.clock_mhz * 1e6);
    let tokens = if phase == Phase::Decode { 1.0 } else { ctx as f64 };

    match a.format {
        OutputFormat::Json => {
            let v = json!({
                "source": source,
                "phase": phase,
                "ctx": ctx,
                "hardware": hw,
                "clock_mhz": a.clock_mhz,
                "totals": cost.totals,
                "seconds": seconds,
                "tokens_per_second": tokens / seconds,
                "baselines": baselines,
                "layers": layers,
                "ops": if a.ops { serde_json::to_value(&cost.ops)? } else { serde_json::Value::Null },
                "cpu": cpu.as_ref().map(|c| json!({"stream_gb_s": c.stream_gb_s, "linear_us": c.total_us})),
            });
            println!("{}", serde_json::to_string_pretty(&v)?);
        }
        OutputFormat::Text => print_text(&a, &hw, &source, &cost, &layers, &baselines, cpu.as_ref(), seconds, tokens),
    }
    Ok(())
}

fn read(p: &std::path::Path) -> Result<String> {
    std::fs::read_to_string(p).with_context(|| format!("cannot read {}", p.display()))
}

/// Per-block sums, the head last.
fn sum_layers(cost: &Cost, cpu: Option<&CpuTimes>) -> Vec<LayerSum> {
    let mut groups: BTreeMap<(bool, usize), Vec<&OpCost>> = BTreeMap::new();
    for o in &cost.ops {
        groups.entry((o.layer.is_none(), o.layer.unwrap_or(0))).or_default().push(o);
    }
    groups
        .into_iter()
        .map(|((head, l), ops)| {
            let (mut wb, mut wn) = (0.0, 0.0);
            for o in ops.iter().filter(|o| !o.attention) {
                let n = (o.weight[0] * o.weight[1]) as f64;
                wb += o.w_bits * n;
                wn += n;
            }
            let compute: u64 = ops.iter().map(|o| o.compute_cycles).sum();
            let dram: u64 = ops.iter().map(|o| o.dram_cycles).sum();
            let key = if head { None } else { Some(l) };
            let (cpu_us, cpu_bytes) = cpu.map_or((None, 0), |c| {
                let mine: Vec<&OpTime> = c.ops.iter().filter(|t| t.layer == key).collect();
                (Some(mine.iter().map(|t| t.us).sum::<f64>()), mine.iter().map(|t| t.bytes).sum::<usize>())
            });
            let gb_s = cpu_us.map(|us| cpu_bytes as f64 / (us * 1e-6) / 1e9);
            LayerSum {
                layer: if head { "head".into() } else { l.to_string() },
                w_bits: if wn > 0.0 { wb / wn } else { 0.0 },
                compute_cycles: compute,
                dram_cycles: dram,
                cycles: ops.iter().map(|o| o.cycles).sum(),
                bound: if compute >= dram { "compute" } else { "memory" },
                dram_bytes: ops.iter().map(|o| o.dram_bytes()).sum(),
                energy_pe_uj: ops.iter().map(|o| o.energy_pe_uj).sum(),
                energy_sram_uj: ops.iter().map(|o| o.energy_sram_read_uj + o.energy_sram_write_uj).sum(),
                energy_dram_uj: ops.iter().map(|o| o.energy_dram_uj).sum(),
                cpu_us,
                cpu_gb_s: gb_s,
                cpu_bound: cpu.zip(gb_s).map(|(c, g)| if g >= 0.5 * c.stream_gb_s { "memory" } else { "compute" }),
            }
        })
        .collect()
}

#[allow(clippy::too_many_arguments)]
fn print_text(
    a: &AccelArgs,
    hw: &Hardware,
    source: &str,
    cost: &Cost,
    layers: &[LayerSum],
    baselines: &[serde_json::Value],
    cpu: Option<&CpuTimes>,
    seconds: f64,
    tokens: f64,
) {
    let t = &cost.totals;
    let decode = a.phase == Phase::Decode;
    let [h, w] = hw.array(decode);
    println!("model: {source}");
    println!(
        "accelerator: {} ({}, {h}×{w} PEs of dot width {}, {} KiB buffers), {} pass, context {}, clock {} MHz",
        hw.name,
        if hw.bit_serial { "bit-serial" } else { "bit-parallel" },
        hw.pe_dot,
        hw.sram_bytes / 1024,
        if decode { "decode (one token)" } else { "prefill" },
        a.ctx,
        a.clock_mhz
    );
    let cpu_cols = if cpu.is_some() { " | CPU µs | CPU GB/s | CPU bound" } else { "" };
    println!(
        "\n| layer | w bits | compute cycles | DRAM cycles | cycles | bound | DRAM KB | PE µJ | SRAM µJ | DRAM µJ{cpu_cols} |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---{}|", if cpu.is_some() { "|---|---|---" } else { "" });
    for l in layers {
        let cpu_cells = match (l.cpu_us, l.cpu_gb_s, l.cpu_bound) {
            (Some(us), Some(g), Some(b)) => format!(" | {us:.1} | {g:.1} | {b}"),
            _ => String::new(),
        };
        println!(
            "| {} | {:.3} | {} | {} | {} | {} | {:.1} | {:.3} | {:.3} | {:.3}{cpu_cells} |",
            l.layer,
            l.w_bits,
            l.compute_cycles,
            l.dram_cycles,
            l.cycles,
            l.bound,
            l.dram_bytes as f64 / 1e3,
            l.energy_pe_uj,
            l.energy_sram_uj,
            l.energy_dram_uj
        );
    }
    if a.ops {
        println!("\n| op | [out, in] | w bits | tiles | compute | DRAM | bound | refetch W/I |");
        println!("|---|---|---|---|---|---|---|---|");
        for o in &cost.ops {
            println!(
                "| {} | {:?} | {:.4} | {} | {} | {} | {} | {}/{} |",
                o.name,
                o.weight,
                o.w_bits,
                o.tiles,
                o.compute_cycles,
                o.dram_cycles,
                o.bound,
                o.refetch[0],
                o.refetch[1]
            );
        }
    }
    let memory_ops = cost.ops.iter().filter(|o| o.bound == "memory").count();
    println!(
        "\ntotal: {} cycles ({} compute alone; {} of {} ops memory-bound), {:.3} MB from DRAM",
        t.cycles,
        t.compute_cycles,
        memory_ops,
        cost.ops.len(),
        t.dram_bytes as f64 / 1e6
    );
    println!(
        "energy: {:.3} µJ on chip (PE {:.3}, buffer reads {:.3}, writes {:.3}) + DRAM {:.3} = {:.3} µJ",
        t.energy_on_chip_uj,
        t.energy_pe_uj,
        t.energy_sram_read_uj,
        t.energy_sram_write_uj,
        t.energy_dram_uj,
        t.energy_total_uj
    );
    println!(
        "time at {} MHz: {:.3} ms per pass, {:.1} tokens/s; areas: PE array {:.4} mm², buffers {:.4} + {:.4} mm²",
        a.clock_mhz,
        seconds * 1e3,
        tokens / seconds,
        t.pe_array_area_mm2,
        t.w_buffer_area_mm2,
        t.i_buffer_area_mm2
    );
    for b in baselines {
        println!(
            "{} at {} bits: {} cycles, {:.3} µJ; speedup of this over it {:.2}×, its energy ÷ this one's {:.2}×",
            b["accelerator"].as_str().unwrap_or(""),
            b["w_bits"],
            b["cycles"],
            b["energy_total_uj"].as_f64().unwrap_or(0.0),
            b["speedup"].as_f64().unwrap_or(0.0),
            b["energy_ratio"].as_f64().unwrap_or(0.0)
        );
    }
    if let Some(c) = cpu {
        println!(
            "CPU: the linear layers take {:.3} ms per pass here ({} threads; streamed read bandwidth {:.1} GB/s; \
             a layer is called memory-bound on the CPU when it reads its weights at half that or more)",
            c.total_us / 1e3,
            rayon::current_num_threads(),
            c.stream_gb_s
        );
    }
}

struct OpTime {
    layer: Option<usize>,
    us: f64,
    bytes: usize,
}

struct CpuTimes {
    ops: Vec<OpTime>,
    total_us: f64,
    stream_gb_s: f64,
}

/// Every linear layer of the model run on this CPU at the report's precision, in model order as
/// a pass runs them (so each reads its weights from memory, not cache): the fastest of five
/// rounds per layer. Attention is not timed here (`examples/attention_cost` does).
fn time_on_cpu(a: &AccelArgs, cost: &Cost, phase: Phase, ctx: usize) -> Result<CpuTimes> {
    let engine = crate::load(&a.model)?;
    let m = &engine.model;
    let n = if phase == Phase::Decode { 1 } else { ctx };
    let mut layers: Vec<(Option<usize>, &dyn Linear)> = Vec::new();
    for (l, b) in m.blocks.iter().enumerate() {
        for (_, w) in b.linears() {
            layers.push((Some(l), w));
        }
    }
    layers.push((None, &*m.head));
    let linear_ops = cost.ops.iter().filter(|o| !o.attention).count();
    ensure!(
        linear_ops == layers.len(),
        "the model's layers do not match the report's ({} vs {linear_ops})",
        layers.len()
    );
    let max_in = layers.iter().map(|(_, l)| l.in_dim()).max().unwrap_or(1);
    let max_out = layers.iter().map(|(_, l)| l.out_dim()).max().unwrap_or(1);
    let x: Vec<f32> = (0..n * max_in).map(|i| ((i * 37 % 101) as f32 - 50.0) / 25.0).collect();
    let mut y = vec![0f32; n * max_out];
    let mut best = vec![f64::MAX; layers.len()];
    for _ in 0..5 {
        for (i, (_, l)) in layers.iter().enumerate() {
            let t0 = Instant::now();
            l.forward(&x[..n * l.in_dim()], n, &mut y[..n * l.out_dim()]);
            best[i] = best[i].min(t0.elapsed().as_secs_f64() * 1e6);
        }
    }
    let ops: Vec<OpTime> = layers
        .iter()
        .zip(&best)
        .map(|((layer, l), &us)| OpTime { layer: *layer, us, bytes: l.weight_bytes() })
        .collect();
    Ok(CpuTimes { total_us: best.iter().sum(), ops, stream_gb_s: stream_bandwidth() })
}

/// Read bandwidth of this machine: the best of three parallel sums over 512 MiB.
fn stream_bandwidth() -> f64 {
    use rayon::prelude::*;
    let buf = vec![1u64; 64 << 20];
    let mut best = f64::MAX;
    for _ in 0..3 {
        let t0 = Instant::now();
        let s: u64 = buf.par_chunks(1 << 16).map(|c| c.iter().fold(0u64, |a, &b| a.wrapping_add(b))).sum();
        std::hint::black_box(s);
        best = best.min(t0.elapsed().as_secs_f64());
    }
    (buf.len() * 8) as f64 / best / 1e9
}

//! `bitnest accel-report` against the BitMoD authors' simulator: every row of
//! `../shared/anchors/bitmod-sim.md` (8 models × FP16/ANT/OliVe/BitMoD-lossy/BitMoD-lossless ×
//! prefill/decode, and the precision sweep of ANT and OliVe), recomputed from the shape files in
//! `../shared/anchors/bitmod-sim-configs/`: both cycle counts exactly, every energy to the printed
//! 0.001 µJ, the areas to their printed digits; then the average speedups over ANT and OliVe.

mod common;

use std::collections::HashMap;
use std::process::Command;

use bitnest::accel::{Hardware, Phase, Shapes, Totals, simulate};

const BIN: &str = env!("CARGO_BIN_EXE_bitnest");

/// The anchor tables' model names and shape files (in the anchor's order).
const MODELS: [(&str, &str); 8] = [
    ("OPT-1.3B", "opt_1_point_3"),
    ("Phi-2", "phi_2"),
    ("Yi-6B", "yi_6"),
    ("Llama-2-7B", "llama_2_7"),
    ("Llama-2-13B", "llama_2_13"),
    ("Llama-3-8B", "llama_3_8"),
    ("SmolLM2-135M*", "smollm2_135m"),
    ("Qwen2.5-Coder-1.5B*", "qwen2_5_coder_1_point_5"),
];

fn shapes(file: &str) -> Shapes {
    let path = common::shared(&format!("anchors/bitmod-sim-configs/{file}.json"));
    Shapes::from_json(&std::fs::read_to_string(&path).expect("read shape file")).expect("parse shape file")
}

fn run(accel: &str, file: &str, phase: Phase, w: f64) -> Totals {
    let hw = Hardware::preset(accel).unwrap();
    let ops = shapes(file).ops(phase, 256, w, hw.act_bits, [hw.act_bits; 2]);
    simulate(&hw, &ops, phase).unwrap().totals
}

/// One row of an anchor table.
struct Row {
    accel: &'static str,
    phase: Phase,
    model: String,
    cells: Vec<String>,
}

fn num(s: &str) -> f64 {
    s.replace(',', "").parse().unwrap_or_else(|_| panic!("not a number: {s:?}"))
}

/// Rows of the ten result tables (sections "## <accel>, <phase> (…)").
fn anchor_rows() -> Vec<Row> {
    let text = std::fs::read_to_string(common::shared("anchors/bitmod-sim.md")).expect("read the anchor");
    let mut rows = Vec::new();
    let mut section: Option<(&'static str, Phase)> = None;
    for line in text.lines() {
        if let Some(h) = line.strip_prefix("## ") {
            let accel = if h.starts_with("FP16 baseline") {
                Some("fp16")
            } else if h.starts_with("ANT,") {
                Some("ant")
            } else if h.starts_with("OliVe,") {
                Some("olive")
            } else if h.starts_with("BitMoD") {
                Some("bitmod")
            } else {
                None
            };
            let phase = if h.contains(", discriminative") {
                Some(Phase::Prefill)
            } else if h.contains(", generation") {
                Some(Phase::Decode)
            } else {
                None
            };
            section = accel.zip(phase);
            continue;
        }
        let Some((accel, phase)) = section else { continue };
        let cells: Vec<String> = line.split('|').map(|c| c.trim().to_string()).collect();
        if cells.len() < 14 || !MODELS.iter().any(|(m, _)| *m == cells[1]) {
            continue;
        }
        rows.push(Row { accel, phase, model: cells[1].clone(), cells: cells[2..].to_vec() });
    }
    rows
}

#[test]
fn every_anchor_row_is_reproduced() {
    let rows = anchor_rows();
    assert_eq!(rows.len(), 80, "the anchor's ten tables of eight models");
    let mut failures = Vec::new();
    for r in &rows {
        let file = MODELS.iter().find(|(m, _)| *m == r.model).unwrap().1;
        let w = num(&r.cells[0]);
        let t = run(r.accel, file, r.phase, w);
        let what = format!("{} {:?} {} w{w}", r.accel, r.phase, r.model);
        let want_int = |i: usize| num(&r.cells[i]) as u64;
        if t.compute_cycles != want_int(1) || t.cycles != want_int(2) {
            failures.push(format!(
                "{what}: cycles {} / {}, anchor {} / {}",
                t.compute_cycles,
                t.cycles,
                want_int(1),
                want_int(2)
            ));
        }
        for (i, (name, got)) in [
            (3, ("PE area", t.pe_array_area_mm2)),
            (4, ("W-buffer area", t.w_buffer_area_mm2)),
            (5, ("I-buffer area", t.i_buffer_area_mm2)),
        ] {
            let want = num(&r.cells[i]);
            if (got - want).abs() > 6e-6 {
                failures.push(format!("{what}: {name} {got}, anchor {want}"));
            }
        }
        let energies = [
            ("compute", t.energy_pe_uj),
            ("SRAM read", t.energy_sram_read_uj),
            ("SRAM write", t.energy_sram_write_uj),
            ("DRAM", t.energy_dram_uj),
            ("on-chip", t.energy_on_chip_uj),
            ("total", t.energy_total_uj),
        ];
        for (k, (name, got)) in energies.iter().enumerate() {
            let want = r.cells[6 + k].replace(',', "");
            let mine = format!("{got:.3}");
            if mine != want {
                failures.push(format!("{what}: {name} energy {mine} µJ, anchor {want}"));
            }
        }
    }
    assert!(failures.is_empty(), "{} mismatches:\n{}", failures.len(), failures.join("\n"));
}

/// The anchor's sweep of ANT and OliVe decode precisions for the two new models: cycles,
/// on-chip and total energy, W-buffer area.
#[test]
fn the_precision_sweep_is_reproduced() {
    let text = std::fs::read_to_string(common::shared("anchors/bitmod-sim.md")).unwrap();
    let mut n = 0;
    for line in text.lines().skip_while(|l| !l.starts_with("## Sensitivity")) {
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        if cells.len() < 5 || !(cells[1] == "ANT" || cells[1] == "OliVe") {
            continue;
        }
        let accel = if cells[1] == "ANT" { "ant" } else { "olive" };
        let w = num(cells[2]);
        for (cell, file) in [(cells[3], "smollm2_135m"), (cells[4], "qwen2_5_coder_1_point_5")] {
            let want: Vec<&str> = cell.split(" / ").collect();
            let t = run(accel, file, Phase::Decode, w);
            assert_eq!(t.compute_cycles, num(want[0]) as u64, "{accel} w{w} {file}");
            assert_eq!(t.cycles, num(want[1]) as u64, "{accel} w{w} {file}");
            assert_eq!(format!("{:.3}", t.energy_on_chip_uj), want[2].replace(',', ""), "{accel} w{w} {file} on-chip");
            assert_eq!(format!("{:.3}", t.energy_total_uj), want[3].replace(',', ""), "{accel} w{w} {file} total");
            assert!((t.w_buffer_area_mm2 - num(want[4])).abs() < 6e-6, "{accel} w{w} {file} area");
            n += 1;
        }
    }
    assert_eq!(n, 20, "ten precisions × two models");
}

/// BitMoD (lossy: 4.0625 bits for prefill, 3.0625 for decode) over ANT and OliVe at the paper's
/// precisions, mean over the six paper models, as the anchor (and `plot/speedup_plot.ipynb`)
/// forms them: prefill, decode alone, and 20 decoded tokens after a 256-token prefill.
#[test]
fn average_speedups_over_ant_and_olive_match() {
    // The authors' per-model decode precisions (test_ant.py, test_olive.py).
    let ant_dec = [5.0, 5.0, 5.25, 5.0, 5.0, 4.5];
    let olive_dec = [3.875, 4.0, 4.25, 3.75, 3.75, 3.5];
    let mut sums: HashMap<(&str, &str), f64> = HashMap::new();
    for (i, (_, file)) in MODELS[..6].iter().enumerate() {
        let b_pre = run("bitmod", file, Phase::Prefill, 4.0625).cycles as f64;
        let b_dec = run("bitmod", file, Phase::Decode, 3.0625).cycles as f64;
        for (base, pre_w, dec_w) in [("ant", 5.5, ant_dec[i]), ("olive", 4.5, olive_dec[i])] {
            let o_pre = run(base, file, Phase::Prefill, pre_w).cycles as f64;
            let o_dec = run(base, file, Phase::Decode, dec_w).cycles as f64;
            *sums.entry((base, "prefill")).or_default() += o_pre / b_pre / 6.0;
            *sums.entry((base, "decode")).or_default() += o_dec / b_dec / 6.0;
            *sums.entry((base, "20+prefill")).or_default() += (20.0 * o_dec + o_pre) / (20.0 * b_dec + b_pre) / 6.0;
        }
    }
    // The anchor's "Average speedup" table, lossy rows.
    for ((base, kind), want) in [
        (("ant", "prefill"), 1.7229),
        (("ant", "decode"), 1.6157),
        (("ant", "20+prefill"), 1.6599),
        (("olive", "prefill"), 1.5597),
        (("olive", "decode"), 1.2611),
        (("olive", "20+prefill"), 1.3881),
    ] {
        let got = sums[&(base, kind)];
        assert_eq!(format!("{got:.4}"), format!("{want:.4}"), "BitMoD over {base}, {kind}");
    }
    // The paper's headline: the mean of the prefill and 20-token figures, each rounded to two
    // decimals first: 1.69× over ANT and 1.48× over OliVe.
    let r2 = |x: f64| (x * 100.0).round() / 100.0;
    let headline = |b| (r2(sums[&(b, "prefill")]) + r2(sums[&(b, "20+prefill")])) / 2.0;
    assert_eq!(format!("{:.2}", headline("ant")), "1.69");
    assert_eq!(format!("{:.2}", headline("olive")), "1.48");
}

/// The command line's shape-file mode prints the same totals as JSON.
#[test]
fn the_command_reproduces_a_row_from_a_shape_file() {
    let shapes = common::shared("anchors/bitmod-sim-configs/llama_2_7.json");
    let out = Command::new(BIN)
        .args(["accel-report", "--shapes"])
        .arg(&shapes)
        .args(["--w-prec", "3.0625", "--phase", "decode", "--format", "json"])
        .output()
        .expect("run bitnest");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON report");
    // Anchor: BitMoD lossy, generation, Llama-2-7B.
    assert_eq!(v["totals"]["compute_cycles"], 51_752_960);
    assert_eq!(v["totals"]["cycles"], 79_493_200);
    assert_eq!(format!("{:.3}", v["totals"]["energy_total_uj"].as_f64().unwrap()), "434198.122");
}

/// The report follows the file and the plan: on the default model (a lossless 4-plane
/// transcode), a `--bits-plan` that reads one block at 4 planes and the rest at 3 changes exactly
/// that block's seven matrices (one more bit per weight, more DRAM bytes); every other op is
/// priced as under `--bits 3`.
#[test]
fn a_bits_plan_changes_exactly_its_layers() {
    let dir = tempfile::tempdir().unwrap();
    let model = common::model_path();
    let plan = dir.path().join("plan.txt");
    std::fs::write(&plan, "* 3\nblk.1. 4\n").unwrap();
    let report = |extra: &[&std::ffi::OsStr]| -> serde_json::Value {
        let out = Command::new(BIN)
            .args(["accel-report", "--model"])
            .arg(&model)
            .args(extra)
            .args(["--ops", "--format", "json"])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let uniform = report(&["--bits".as_ref(), "3".as_ref()]);
    let planned = report(&["--bits-plan".as_ref(), plan.as_os_str()]);
    let (a, b) = (uniform["ops"].as_array().unwrap(), planned["ops"].as_array().unwrap());
    assert_eq!(a.len(), b.len());
    let mut changed = Vec::new();
    for (x, y) in a.iter().zip(b) {
        assert_eq!(x["name"], y["name"]);
        let name = x["name"].as_str().unwrap();
        if x != y {
            changed.push(name.to_string());
            let (wx, wy) = (x["w_bits"].as_f64().unwrap(), y["w_bits"].as_f64().unwrap());
            // One more plane: one more bit per weight, metadata unchanged.
            assert!((wy - wx - 1.0).abs() < 1e-9, "{name}: {wx} → {wy}");
            assert!(y["w_bytes"].as_u64() > x["w_bytes"].as_u64(), "{name}");
        }
    }
    let want: Vec<String> = ["attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"]
        .iter()
        .map(|m| format!("blk.1.{m}"))
        .collect();
    assert_eq!(changed, want);
    // Three planes plus group metadata.
    let q0 = a.iter().find(|o| o["name"] == "blk.0.attn_q").unwrap()["w_bits"].as_f64().unwrap();
    assert!(q0 > 3.0 && q0 < 5.0, "{q0}");
    assert!(planned["totals"]["cycles"].as_u64() > uniform["totals"]["cycles"].as_u64());
}

#[test]
fn bad_options_are_clear_errors() {
    let run = |args: &[&str]| {
        let out = Command::new(BIN).arg("accel-report").args(args).output().unwrap();
        assert!(!out.status.success(), "{args:?} accepted");
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(!err.contains("panicked"), "{args:?}: {err}");
        err
    };
    assert!(run(&["--accel", "tpu"]).contains("unknown accelerator"));
    assert!(run(&["--shapes", "/nonexistent.json", "--w-prec", "4"]).contains("cannot read"));
    assert!(run(&["--shapes", "/nonexistent.json"]).contains("--w-prec"));
    assert!(run(&["--clock-mhz", "0", "--shapes", "/dev/null", "--w-prec", "4"]).contains("clock"));
    let dir = tempfile::tempdir().unwrap();
    let hw = dir.path().join("hw.json");
    std::fs::write(&hw, r#"{"name": "x"}"#).unwrap();
    assert!(run(&["--hw", hw.to_str().unwrap()]).contains("hardware file"));
}

/// `--print-hw` writes a file `--hw` reads back to the same machine.
#[test]
fn a_printed_hardware_file_reads_back() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(BIN).args(["accel-report", "--accel", "olive", "--print-hw"]).output().unwrap();
    assert!(out.status.success());
    let hw = dir.path().join("olive.json");
    std::fs::write(&hw, &out.stdout).unwrap();
    let shapes = common::shared("anchors/bitmod-sim-configs/smollm2_135m.json");
    let cycles = |extra: &[&std::ffi::OsStr]| {
        let o = Command::new(BIN)
            .args(["accel-report", "--shapes"])
            .arg(&shapes)
            .args(["--w-prec", "4.5", "--phase", "prefill", "--format", "json"])
            .args(extra)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        v["totals"]["cycles"].as_u64().unwrap()
    };
    // Anchor: OliVe, discriminative, SmolLM2-135M: 44,049,408 cycles.
    assert_eq!(cycles(&["--accel".as_ref(), "olive".as_ref()]), 44_049_408);
    assert_eq!(cycles(&["--hw".as_ref(), hw.as_os_str()]), 44_049_408);
}

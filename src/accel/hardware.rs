//! The accelerator a report prices a model on: BitMoD's bit-serial PE array, or one of the
//! baselines the paper compares it with (FP16, ANT, OliVe), as the authors' simulator
//! (`yc2367/BitMoD-HPCA-25` @58d7bdb, `bitmod_sim/`) describes them. A JSON file of the same
//! shape (`bitnest accel-report --accel bitmod --print-hw`) describes any other.

use anyhow::{Result, bail, ensure};
use serde::{Deserialize, Serialize};

/// Per-access energy and area of one on-chip buffer (512 KiB in 8 banks, 28 nm, one read and
/// one write port), for one access width. CACTI cannot run here: these are the numbers CACTI 7
/// gave for the simulator's own configurations (`../shared/anchors/bitmod-sim.md`, "CACTI-derived
/// SRAM costs"), all 8 banks together.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
pub struct SramCost {
    /// Bits delivered per access, all banks together.
    pub width_bits: f64,
    pub read_pj: f64,
    pub write_pj: f64,
    pub area_mm2: f64,
}

/// The CACTI 7 results for the widths the four accelerators use (source above).
pub const CACTI_28NM_512KIB_8BANKS: [SramCost; 7] = [
    SramCost { width_bits: 192.0, read_pj: 66.57808, write_pj: 43.31840, area_mm2: 1.529144 },
    SramCost { width_bits: 256.0, read_pj: 70.09280, write_pj: 51.71784, area_mm2: 1.484560 },
    SramCost { width_bits: 288.0, read_pj: 72.59616, write_pj: 54.11920, area_mm2: 1.500336 },
    SramCost { width_bits: 384.0, read_pj: 82.83040, write_pj: 64.04792, area_mm2: 1.590344 },
    SramCost { width_bits: 512.0, read_pj: 92.79440, write_pj: 83.35360, area_mm2: 1.601896 },
    SramCost { width_bits: 576.0, read_pj: 107.69600, write_pj: 89.34320, area_mm2: 1.431360 },
    SramCost { width_bits: 1024.0, read_pj: 138.44160, write_pj: 156.09040, area_mm2: 1.570672 },
];

/// A processing-element array with its buffers and DRAM.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Hardware {
    pub name: String,
    /// Bit-serial PEs take ⌈⌊w⌋/2⌉ cycles per weight (two bits a cycle, BitMoD's PE);
    /// bit-parallel ones one cycle.
    pub bit_serial: bool,
    /// Multiply-adds one PE does per cycle (its dot-product width).
    pub pe_dot: usize,
    /// PE array [rows, columns] for decoding (one token) and for prefill (a context of tokens):
    /// rows split the output channels, columns the tokens.
    pub pe_array_decode: [usize; 2],
    pub pe_array_prefill: [usize; 2],
    /// Energy of one PE for one cycle (pJ) and its area (µm²), before place-and-route.
    pub pe_energy_pj: f64,
    pub pe_area_um2: f64,
    /// Place-and-route factor applied to PE energy (the simulator's `PR_SCALING`).
    pub place_and_route: f64,
    /// Activation (input and output) precision in bits.
    pub act_bits: f64,
    /// Each of the two buffers (weights, inputs), bytes.
    pub sram_bytes: u64,
    /// Bits of the smallest buffer write (the simulator's `min_w_granularity`).
    pub sram_write_granularity_bits: f64,
    /// DRAM bus width in bits (double data rate: two transfers a cycle) and energy per bus-wide access.
    pub dram_bus_bits: f64,
    pub dram_access_pj: f64,
    /// The buffers' per-access costs by access width.
    pub sram_costs: Vec<SramCost>,
    /// The weight precision this design runs its models at when none is given (the paper's:
    /// ANT 5.5 bits, OliVe 4.5, FP16 16; BitMoD takes the model file's own).
    pub default_w_bits: Option<f64>,
}

/// The accelerators the paper compares, by name.
pub const NAMES: [&str; 4] = ["bitmod", "ant", "olive", "fp16"];

impl Hardware {
    /// One of [`NAMES`], with the values of the authors' `test_*.py` scripts.
    pub fn preset(name: &str) -> Result<Self> {
        let base = |name: &str, bit_serial, pe_dot, dec, pre, pe_energy_pj, pe_area_um2, default_w_bits| Hardware {
            name: name.to_string(),
            bit_serial,
            pe_dot,
            pe_array_decode: dec,
            pe_array_prefill: pre,
            pe_energy_pj,
            pe_area_um2,
            place_and_route: 1.5,
            act_bits: 16.0,
            sram_bytes: 512 * 1024,
            sram_write_granularity_bits: 64.0,
            dram_bus_bits: 128.0,
            dram_access_pj: 128.0 / 64.0 * 1200.0,
            sram_costs: CACTI_28NM_512KIB_8BANKS.to_vec(),
            default_w_bits,
        };
        Ok(match name {
            "bitmod" => base("bitmod", true, 4, [64, 16], [32, 32], 0.56, 1507.7, None),
            "ant" => base("ant", false, 1, [64, 16], [32, 32], 0.56, 1318.6, Some(5.5)),
            "olive" => base("olive", false, 1, [72, 16], [36, 32], 0.613, 1318.6, Some(4.5)),
            "fp16" => base("fp16", false, 1, [64, 12], [32, 24], 0.77, 1968.7, Some(16.0)),
            _ => bail!("unknown accelerator {name:?}; built in: {}", NAMES.join(", ")),
        })
    }

    /// Reads a hardware description (the JSON `--print-hw` writes).
    pub fn from_json(text: &str) -> Result<Self> {
        let hw: Hardware = serde_json::from_str(text)?;
        hw.validate()?;
        Ok(hw)
    }

    pub fn validate(&self) -> Result<()> {
        let dims = self.pe_array_decode.iter().chain(&self.pe_array_prefill);
        ensure!(self.pe_dot >= 1 && dims.clone().all(|&d| d >= 1), "PE array dimensions must be at least 1");
        for (what, v) in [
            ("pe_energy_pj", self.pe_energy_pj),
            ("pe_area_um2", self.pe_area_um2),
            ("place_and_route", self.place_and_route),
            ("act_bits", self.act_bits),
            ("sram_write_granularity_bits", self.sram_write_granularity_bits),
            ("dram_bus_bits", self.dram_bus_bits),
            ("dram_access_pj", self.dram_access_pj),
        ] {
            ensure!(v.is_finite() && v > 0.0, "{what} must be a positive number (got {v})");
        }
        ensure!(self.sram_bytes > 0, "sram_bytes must be positive");
        Ok(())
    }

    /// The array [rows, columns] for a phase.
    pub fn array(&self, decode: bool) -> [usize; 2] {
        if decode { self.pe_array_decode } else { self.pe_array_prefill }
    }

    pub fn pe_count(&self, decode: bool) -> usize {
        let [h, w] = self.array(decode);
        h * w
    }

    /// Cycles a PE spends on one weight of `w_bits` (the simulator's `pe_latency`).
    pub fn pe_latency(&self, w_bits: f64) -> u64 {
        if self.bit_serial { (w_bits.floor() / 2.0).ceil() as u64 } else { 1 }
    }

    /// Access widths of the weight and input buffers: what the array consumes per cycle (half
    /// for bit-serial arrays, whose PEs hold an operand for two cycles).
    pub fn buffer_widths(&self, decode: bool, w_bits: f64) -> (f64, f64) {
        let [h, w] = self.array(decode);
        let half = if self.bit_serial { 2.0 } else { 1.0 };
        let dot = self.pe_dot as f64;
        let w_width = dot * (w_bits / 4.0).ceil() * 4.0 * h as f64 / half;
        let i_width = dot * self.act_bits * w as f64 / half;
        (w_width, i_width)
    }

    /// The buffer cost for an access width.
    pub fn sram_cost(&self, width_bits: f64, which: &str) -> Result<SramCost> {
        match self.sram_costs.iter().find(|c| c.width_bits == width_bits) {
            Some(c) => Ok(*c),
            None => bail!(
                "{}: no SRAM cost for a {which} buffer {width_bits} bits wide; add one to `sram_costs` \
                 (CACTI cannot run here; widths known: {:?})",
                self.name,
                self.sram_costs.iter().map(|c| c.width_bits).collect::<Vec<_>>()
            ),
        }
    }
}

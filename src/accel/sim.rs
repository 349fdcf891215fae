//! The cost of a pass on a [`Hardware`], op by op, with the simulator's formulas
//! (`bitmod_sim/accelerator.py`), in its order of floating-point operations so that its printed
//! figures come out the same:
//!
//! - tiles = ⌈cin ÷ dot⌉ · ⌈cout ÷ rows⌉ · ⌈tokens ÷ columns⌉; compute cycles = tiles × PE latency;
//! - bytes: W = ⌈cin·w ÷ 8⌉·cout, I = ⌈cin_in·i ÷ 8⌉·rows, O = ⌈cout·a ÷ 8⌉·tokens; when both W and I
//!   overflow their buffers, whichever refetch costs less (W per input tile, or I per weight tile);
//! - DRAM cycles = ⌊bytes·8 ÷ (2·bus)⌋; an op takes max(compute, DRAM) cycles; no overlap between ops;
//! - energy: PE = pJ·P&R·PEs·compute cycles; buffer reads = tiles·(W read + I read); buffer
//!   writes per 64-bit word of W (× refetch), I (× refetch) and O; DRAM = bytes·8 ÷ bus × access pJ.
//!
//! Two quirks kept for fidelity: attention ops take the weight precision's PE latency and buffer
//! writes, and their operands are counted at the activation precision in DRAM.

use anyhow::Result;
use serde::Serialize;

use super::hardware::Hardware;
use super::workload::{Op, Phase, nominal_bits};

/// One op's cost.
#[derive(Debug, Clone, Serialize)]
pub struct OpCost {
    pub name: String,
    pub layer: Option<usize>,
    pub weight: [usize; 2],
    pub w_bits: f64,
    pub i_bits: f64,
    /// One of the two attention products (not a weight matrix).
    pub attention: bool,
    pub tiles: u64,
    pub compute_cycles: u64,
    pub dram_cycles: u64,
    /// max(compute, DRAM): what the op takes.
    pub cycles: u64,
    /// `compute` or `memory`: which of the two sets `cycles`.
    pub bound: &'static str,
    pub w_bytes: u64,
    pub i_bytes: u64,
    pub o_bytes: u64,
    /// Times W and I are fetched from DRAM.
    pub refetch: [u64; 2],
    pub energy_pe_uj: f64,
    pub energy_sram_read_uj: f64,
    pub energy_sram_write_uj: f64,
    pub energy_dram_uj: f64,
}

impl OpCost {
    /// Bytes this op moves to or from DRAM, refetches included.
    pub fn dram_bytes(&self) -> u64 {
        self.w_bytes * self.refetch[0] + self.i_bytes * self.refetch[1] + self.o_bytes
    }
}

/// A pass's totals, summed in op order.
#[derive(Debug, Clone, Serialize)]
pub struct Totals {
    /// Compute cycles alone (infinite DRAM bandwidth): the simulator's `cycles[0]`.
    pub compute_cycles: u64,
    /// Σ max(compute, DRAM): the simulator's `cycles[1]`, its latency.
    pub cycles: u64,
    pub tiles: u64,
    pub dram_bytes: u64,
    pub energy_pe_uj: f64,
    pub energy_sram_read_uj: f64,
    pub energy_sram_write_uj: f64,
    pub energy_dram_uj: f64,
    /// PE + buffer reads + buffer writes.
    pub energy_on_chip_uj: f64,
    pub energy_total_uj: f64,
    pub pe_array_area_mm2: f64,
    pub w_buffer_area_mm2: f64,
    pub i_buffer_area_mm2: f64,
    /// Width of each buffer's access, bits.
    pub w_buffer_width_bits: f64,
    pub i_buffer_width_bits: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Cost {
    pub ops: Vec<OpCost>,
    pub totals: Totals,
}

/// Prices `ops` (one pass, `phase`) on `hw`.
pub fn simulate(hw: &Hardware, ops: &[Op], phase: Phase) -> Result<Cost> {
    let decode = phase == Phase::Decode;
    let [rows, cols] = hw.array(decode);
    let pes = hw.pe_count(decode) as f64;
    // The weight buffer is built for the precision most weights have.
    let (w_width, i_width) = hw.buffer_widths(decode, nominal_bits(ops));
    let w_sram = hw.sram_cost(w_width, "weight")?;
    let i_sram = hw.sram_cost(i_width, "input")?;
    let gran = hw.sram_write_granularity_bits;
    let w_write_min = w_sram.write_pj / (w_width / gran);
    let i_write_min = i_sram.write_pj / (i_width / gran);
    let size = hw.sram_bytes as f64;
    let bus = hw.dram_bus_bits;
    let ddr = bus * 2.0;
    let pe_pj = hw.pe_energy_pj * hw.place_and_route;

    let mut out = Vec::with_capacity(ops.len());
    // Buffer-write and DRAM energies in pJ, summed op by op as the simulator does.
    let (mut write_pj, mut dram_pj) = (0.0, 0.0);
    for op in ops {
        let [cout, cin] = op.weight;
        let [_, cin_i] = op.input;
        let tokens = op.output[0];
        let tiles = (cin.div_ceil(hw.pe_dot) * cout.div_ceil(rows) * tokens.div_ceil(cols)) as u64;
        let compute = tiles * hw.pe_latency(op.pe_bits);

        let w_bytes = (cin as f64 * op.w_bits / 8.0).ceil() as u64 * cout as u64;
        let i_bytes = (cin_i * op.i_bits / 8.0).ceil() as u64 * tokens as u64;
        let o_bytes = (cout as f64 * hw.act_bits / 8.0).ceil() as u64 * tokens as u64;
        let refetch = if w_bytes as f64 > size && i_bytes as f64 > size {
            let input_times = (w_bytes as f64 / size).ceil() as u64;
            let weight_times = (i_bytes as f64 / size).ceil() as u64;
            if weight_times * w_bytes + i_bytes < input_times * i_bytes + w_bytes {
                [weight_times, 1]
            } else {
                [1, input_times]
            }
        } else {
            [1, 1]
        };
        let (fw, fi) = (refetch[0] as f64, refetch[1] as f64);
        let dram_w = w_bytes as f64 * 8.0 / ddr * fw;
        let dram_i = i_bytes as f64 * 8.0 / ddr * fi;
        let dram_o = o_bytes as f64 * 8.0 / ddr;
        let dram = (dram_w + dram_o + dram_i) as u64;

        // Buffer writes: 64-bit words of W at the op's PE precision (the simulator's quirk for
        // attention), I and O at the activation precision.
        let n_w = (cin as f64 * op.pe_bits / gran).ceil() * cout as f64;
        let n_i = (cin_i * hw.act_bits / gran).ceil() * tokens as f64;
        let n_o = (cout as f64 * hw.act_bits / gran).ceil() * tokens as f64;
        let sram_write = n_w * w_write_min * fw + n_i * i_write_min * fi + n_o * i_write_min;

        let e_w = w_bytes as f64 * 8.0 / bus * hw.dram_access_pj * fw;
        let e_i = i_bytes as f64 * 8.0 / bus * hw.dram_access_pj * fi;
        let e_o = o_bytes as f64 * 8.0 / bus * hw.dram_access_pj;
        let dram_e = e_w + e_i + e_o;
        write_pj += sram_write;
        dram_pj += dram_e;
        out.push(OpCost {
            name: op.name.clone(),
            layer: op.layer,
            weight: op.weight,
            w_bits: op.w_bits,
            i_bits: op.i_bits,
            attention: op.attention,
            tiles,
            compute_cycles: compute,
            dram_cycles: dram,
            cycles: compute.max(dram),
            bound: if compute >= dram { "compute" } else { "memory" },
            w_bytes,
            i_bytes,
            o_bytes,
            refetch,
            energy_pe_uj: pe_pj * pes * compute as f64 / 1e6,
            energy_sram_read_uj: tiles as f64 * (w_sram.read_pj + i_sram.read_pj) / 1e6,
            energy_sram_write_uj: sram_write / 1e6,
            energy_dram_uj: dram_e / 1e6,
        });
    }

    // Totals as the simulator forms them: integer sums, then each energy from its own total
    // (PE and reads from total cycles and tiles; writes and DRAM summed op by op in pJ).
    let compute_cycles: u64 = out.iter().map(|o| o.compute_cycles).sum();
    let cycles: u64 = out.iter().map(|o| o.cycles).sum();
    let tiles: u64 = out.iter().map(|o| o.tiles).sum();
    let pe = pe_pj * pes * compute_cycles as f64 / 1e6;
    let read = tiles as f64 * (w_sram.read_pj + i_sram.read_pj) / 1e6;
    let write = write_pj / 1e6;
    let dram = dram_pj / 1e6;
    let on_chip = pe + read + write;
    let totals = Totals {
        compute_cycles,
        cycles,
        tiles,
        dram_bytes: out.iter().map(OpCost::dram_bytes).sum(),
        energy_pe_uj: pe,
        energy_sram_read_uj: read,
        energy_sram_write_uj: write,
        energy_dram_uj: dram,
        energy_on_chip_uj: on_chip,
        energy_total_uj: pe + read + write + dram,
        pe_array_area_mm2: hw.pe_area_um2 * pes / 1e6,
        w_buffer_area_mm2: w_sram.area_mm2,
        i_buffer_area_mm2: i_sram.area_mm2,
        w_buffer_width_bits: w_width,
        i_buffer_width_bits: i_width,
    };
    Ok(Cost { ops: out, totals })
}

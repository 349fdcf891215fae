//! What a model would cost on a bit-serial accelerator (BitMoD's PE array) or the designs it is
//! compared with, layer by layer: compute cycles, DRAM bytes and cycles, which binds, and energy,
//! with the formulas and constants of the BitMoD authors' simulator. [`hardware`] describes the
//! machine, [`workload`] the ops of one pass (from a model file and its plan, or a shape file),
//! [`sim`] prices them. `bitnest accel-report` is the command; `docs/ACCEL.md` the manual.

pub mod hardware;
pub mod sim;
pub mod workload;

pub use hardware::Hardware;
pub use sim::{Cost, OpCost, Totals, simulate};
pub use workload::{Op, Phase, Shapes};

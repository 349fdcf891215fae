//! bitnest: one quantized model file serves every precision.
//!
//! The path of a token: [`fetch`] finds the model file, [`format`] parses it, [`model`] holds
//! the weights and runs the forward pass over [`kernels`], [`tokenizer`] and [`chat`] turn text
//! into ids, [`sampling`] picks the next id, and [`generate`] / [`ppl`] drive the loop.

pub mod format;
pub mod quant;
pub mod kernels;
pub mod model;

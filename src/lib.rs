//! bitnest: one quantized model file serves every precision.
//!
//! The path of a token: [`fetch`] finds the model file, [`format`](mod@format) parses it, [`model`] holds
//! the weights and runs the forward pass over [`kernels`], [`tokenizer`] and [`chat`] turn text
//! into ids, [`sampling`] picks the next id, and [`decode`] / [`ppl`] drive the loop.

pub mod accel;
pub mod bench;
pub mod chat;
pub mod decode;
pub mod engine;
pub mod fetch;
pub mod format;
pub mod kernels;
pub mod model;
pub mod moefy;
pub mod ppl;
pub mod quant;
pub mod quantize;
pub mod sampling;
pub mod spec;
pub mod tokenizer;
pub mod transcode;

//! The model: configuration, weights and the forward pass.

pub mod arch;
pub mod config;
pub mod llama;
pub mod plan;
pub mod source;

pub use config::LlamaConfig;
pub use llama::{ALL_BITS, Llama, Session};
pub use plan::BitsPlan;
pub use source::ModelSource;

//! The model: configuration, weights and the forward pass.

pub mod arch;
pub mod config;
pub mod ffn;
pub mod llama;
pub mod plan;
pub mod session;
pub mod source;
pub mod state;

pub use config::LlamaConfig;
pub use llama::{ALL_BITS, Llama, Span, SpanKind, View};
pub use plan::BitsPlan;
pub use session::{KvType, KvTypes, Scratch, Session};
pub use source::ModelSource;
pub use state::{StateBlocks, StateFormat};

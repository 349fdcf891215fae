//! Weight encodings: the ggml formats we import, and bitnest's own nested bit-plane format.

pub mod bitplane;
pub mod dtype;
pub mod ggml;

pub use bitplane::{BitPlanes, QuantConfig};
pub use dtype::GroupDtype;

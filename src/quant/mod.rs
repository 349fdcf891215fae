//! Weight encodings: the ggml formats we import (and, later, bitnest's own bit-plane formats).

pub mod ggml;

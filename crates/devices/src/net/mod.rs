//! Host network backends for virtio-net. Only tap devices for now.

pub mod tap;

pub use tap::{Tap, TapError};

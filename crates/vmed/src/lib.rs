//! `vmed`, the daemon that manages VMs: it owns the REST API (over a Unix socket), the state
//! store, the lifecycle state machine and the supervision of one `vme-vmm` process per VM.
//! It must never map guest memory or emulate devices: it talks to each monitor only over its
//! control socket, so a daemon bug cannot reach into a guest.

pub mod admission;
pub mod api;
pub mod console_attach;
pub mod daemon;
pub mod devices;
pub mod guest;
pub mod lifecycle;
pub mod metrics;
pub mod reconcile;
pub mod settings;
pub mod store;
pub mod validate;

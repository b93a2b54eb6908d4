//! Types shared by the monitor, the daemon, the CLI and the guest agent: machine
//! specifications, sizes, the control-socket protocol and the agent protocol, with their
//! small clients. No KVM, nothing that runs a VM.

pub mod agent;
pub mod base64;
pub mod console_log;
pub mod control;
pub mod identity;
pub mod jail;
pub mod limits;
pub mod overlay;
pub mod size;
pub mod spec;
#[cfg(feature = "tls")]
pub mod tls;
pub mod vsock;

pub use size::ByteSize;
pub use spec::{Arch, MachineSpec, RebootAction, SerialSpec, SpecError};

//! Types shared by the monitor, the daemon and the CLI: machine specifications, sizes, and the
//! control-socket protocol. Pure data and parsing: no I/O, no KVM, nothing that runs a VM.

pub mod control;
pub mod limits;
pub mod size;
pub mod spec;
pub mod vsock;

pub use size::ByteSize;
pub use spec::{Arch, MachineSpec, RebootAction, SerialSpec, SpecError};

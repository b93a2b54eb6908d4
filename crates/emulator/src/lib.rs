//! The x86 instructions the monitor completes itself when KVM cannot (PVM hosts' emulator
//! gives up on some): decode, execute against guest registers and memory, raise exceptions.
//! It makes no KVM calls: registers and memory come through traits.

mod access;
mod cpu;
mod dispatch;
mod error;
mod insn;
mod mem;
mod paging;
mod stats;

#[cfg(test)]
mod tests;
#[cfg(test)]
mod testutil;

pub use cpu::{CpuState, Gpr, Seg, Segment, bits};
pub use error::{Completion, EmulationError, vector};
pub use mem::{GuestPhysMemory, MemError};
pub use stats::Stats;

/// Completes the instruction at the vCPU's RIP after KVM gave up on it.
pub fn complete(
    cpu: &mut dyn CpuState,
    mem: &mut dyn GuestPhysMemory,
    insn_bytes_hint: Option<&[u8]>,
) -> Result<Completion, EmulationError> {
    dispatch::run(cpu, mem, insn_bytes_hint, &mut Stats::default())
}

/// A per-vCPU completer that counts what it completes.
#[derive(Debug, Default, Clone)]
pub struct Completer {
    stats: Stats,
}

impl Completer {
    pub fn new() -> Self {
        Self::default()
    }

    /// As [`complete`], counting the instruction in [`Completer::stats`].
    pub fn complete(
        &mut self,
        cpu: &mut dyn CpuState,
        mem: &mut dyn GuestPhysMemory,
        insn_bytes_hint: Option<&[u8]>,
    ) -> Result<Completion, EmulationError> {
        dispatch::run(cpu, mem, insn_bytes_hint, &mut self.stats)
    }

    pub fn stats(&self) -> &Stats {
        &self.stats
    }
}

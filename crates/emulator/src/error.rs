//! Outcomes of a completion: done, an exception for the monitor to inject, or an error that
//! stops the VM.

use std::fmt;

use crate::mem::MemError;

/// Architectural exception vectors the completer raises.
pub mod vector {
    pub const DB: u8 = 1;
    pub const BP: u8 = 3;
    pub const UD: u8 = 6;
    pub const NM: u8 = 7;
    pub const SS: u8 = 12;
    pub const GP: u8 = 13;
    pub const PF: u8 = 14;
}

/// What the monitor must do after a successful [`crate::complete`] call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Completion {
    /// The instruction was performed; registers (RIP included) and memory are updated.
    Done,
    /// The instruction raised an exception: inject `vector` (with `error_code` if present;
    /// for #PF also set CR2 to `cr2`). RIP is already set per the exception's class: left at
    /// the instruction for faults (#UD, #GP, #SS, #PF, #NM), advanced past it for traps (#BP
    /// from `int3`, which the monitor injects so that the return address is the next byte).
    Inject {
        vector: u8,
        error_code: Option<u32>,
        cr2: Option<u64>,
    },
}

/// Why the completer could not finish an instruction. Every variant means the vCPU cannot
/// continue correctly; the monitor should stop the VM and report the message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EmulationError {
    /// The instruction is not one the completer implements.
    #[error(
        "vCPU {vcpu}: cannot complete instruction at RIP {rip:#x} (bytes {}: {mnemonic}): KVM's \
         emulator gave up on it and vme-emulator does not implement it, so the VM cannot \
         continue; hide the CPU feature that provides it in the VM's CPU template (or the guest \
         command line), or add it to vme-emulator",
        Hex(&bytes[..usize::from(*len).min(bytes.len())])
    )]
    Unsupported {
        vcpu: u32,
        rip: u64,
        /// Instruction bytes as fetched (first `len` valid).
        bytes: [u8; 15],
        len: u8,
        /// Disassembly of the instruction (or "(undecodable)").
        mnemonic: String,
    },
    /// A guest access (fetch, page-table walk or data) resolved to guest-physical memory that is
    /// not RAM; the completer only reaches RAM (MMIO needs the device model).
    #[error(
        "vCPU {vcpu}: cannot complete instruction at RIP {rip:#x}: its {what} reaches \
         guest-physical {gpa:#x} (+{len} bytes), which is not RAM ({source}); the completer \
         cannot perform device (MMIO) accesses, so the VM cannot continue; check the guest's \
         page tables and memory map"
    )]
    NotRam {
        vcpu: u32,
        rip: u64,
        what: &'static str,
        gpa: u64,
        len: usize,
        source: MemError,
    },
}

/// Lower-case hex bytes separated by spaces.
pub(crate) struct Hex<'a>(pub &'a [u8]);

impl fmt::Display for Hex<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, b) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(" ")?;
            }
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

/// An architectural exception raised while performing an instruction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Exception {
    pub vector: u8,
    pub error_code: Option<u32>,
    pub cr2: Option<u64>,
}

impl Exception {
    pub fn gp0() -> Self {
        Exception {
            vector: vector::GP,
            error_code: Some(0),
            cr2: None,
        }
    }
    pub fn ss0() -> Self {
        Exception {
            vector: vector::SS,
            error_code: Some(0),
            cr2: None,
        }
    }
    pub fn ud() -> Self {
        Exception {
            vector: vector::UD,
            error_code: None,
            cr2: None,
        }
    }
    pub fn nm() -> Self {
        Exception {
            vector: vector::NM,
            error_code: None,
            cr2: None,
        }
    }
    pub fn pf(linear: u64, code: u32) -> Self {
        Exception {
            vector: vector::PF,
            error_code: Some(code),
            cr2: Some(linear),
        }
    }
}

/// Why an instruction stopped before completing, inside the crate; turned into a
/// [`Completion::Inject`] or an [`EmulationError`] at the top.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Stop {
    Exception(Exception),
    NotRam {
        what: &'static str,
        gpa: u64,
        len: usize,
        source: MemError,
    },
}

impl From<Exception> for Stop {
    fn from(e: Exception) -> Self {
        Stop::Exception(e)
    }
}

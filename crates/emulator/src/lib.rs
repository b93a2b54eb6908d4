//! The x86 instructions the monitor completes itself when KVM cannot (PVM hosts' emulator
//! gives up on some): decode, execute against guest registers and memory, raise exceptions.
//! It makes no KVM calls: registers and memory come through traits.
//!
//! # What it owns, what it must not do
//! It owns the semantics of a short list of instructions (below) and the guest-visible checks
//! around them: instruction fetch through the guest's page tables, segmentation, canonical
//! addresses, page-permission checks and the exceptions they raise. It must not call KVM,
//! touch host memory other than through [`GuestPhysMemory`], or panic on anything a guest can
//! put in its registers, page tables or code (a fuzz test feeds it random bytes in every mode).
//!
//! # Use (by the vCPU loop)
//! On `KVM_EXIT_INTERNAL_ERROR` with suberror `KVM_INTERNAL_ERROR_EMULATION` (1):
//! 1. implement [`CpuState`] over `KVM_GET_REGS`/`KVM_GET_SREGS` (and write the changed copy
//!    back with `KVM_SET_REGS`/`KVM_SET_SREGS` afterwards), [`GuestPhysMemory`] over the guest
//!    RAM mapping (bounds-checked; the compare-exchanges must be real host atomics);
//! 2. call [`Completer::complete`] (one `Completer` per vCPU; it counts) or the free
//!    [`complete`], passing as `insn_bytes_hint` the `insn_bytes[..insn_size]` of
//!    `kvm_run.emulation_failure` when its flags carry
//!    `KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES` (else `None`: the completer then
//!    fetches the bytes itself, which is always correct, only slower);
//! 3. act on the result:
//!    - `Ok(`[`Completion::Done`]`)`: registers and memory are updated, RIP is past the
//!      instruction, RFLAGS.RF cleared; write the registers back and resume.
//!    - `Ok(`[`Completion::Inject`]` { vector, error_code, cr2 })`: write the registers back and
//!      inject the exception (`KVM_SET_VCPU_EVENTS`; for #PF also CR2). RIP is already right
//!      for the exception's class: at the instruction for faults, past it for the #BP trap of
//!      `int3`, so inject #BP as an ordinary exception, not as a software exception with an
//!      instruction length (that would skip a byte).
//!    - `Err(`[`EmulationError`]`)`: the vCPU cannot continue; stop the VM and report the
//!      message, which names the vCPU, RIP, bytes, disassembly and what to do.
//!
//! # Instructions
//! | instruction | effect |
//! |---|---|
//! | `int3` | #BP, trap (RIP after it): Linux's live patching and its int3 self-test |
//! | `ud0`/`ud1`/`ud2` | #UD, fault |
//! | `mfence`/`lfence`/`sfence` | the same fence on the host |
//! | `fwait` | #NM if CR0.MP and CR0.TS, else no-op (x87 status is not visible here) |
//! | `pause`, `nop` forms, `endbr32/64`, `prefetch*` | no-op (prefetches never fault) |
//! | `clflush`/`clflushopt`/`clwb` | checks the address like a one-byte load; no-op otherwise |
//! | `popcnt` | count; ZF = (src == 0), CF/OF/SF/AF/PF cleared |
//! | `lzcnt`/`tzcnt` | count in operand width; CF = (src == 0), ZF = (result == 0) |
//! | `movbe` | byte-swapped load or store |
//! | `crc32` | CRC-32C accumulate, as SSE4.2 |
//! | `cmpxchg8b`/`cmpxchg16b` (locked or not) | atomic through [`GuestPhysMemory`]; ZF; EDX:EAX/RDX:RAX loaded on mismatch; #GP(0) if a `cmpxchg16b` operand is not 16-aligned |
//! | `rdrand`/`rdseed` | the host instruction's value, CF = 1; CF = 0 and 0 if the host has none |
//!
//! Anything else that decodes is [`EmulationError::Unsupported`]. Bytes that do not decode are
//! #UD (as on hardware), an instruction longer than 15 bytes or past the CS limit #GP(0), and a
//! LOCK prefix where none is allowed #UD. All prefixes are honoured: operand and address size
//! (32-bit addressing in 64-bit mode), segment overrides (only FS/GS bases count in 64-bit mode),
//! REX, RIP-relative operands.
//!
//! # Addressing
//! Modes: real, virtual-8086, 16/32-bit protected (also compatibility mode) and 64-bit.
//! Segmentation: bases, limits (expand-down too), read-only/execute-only types → #GP(0), or
//! #SS(0) for stack-segment operands; in 64-bit mode non-canonical operands (first or last
//! byte, 48- or 57-bit) → #GP(0)/#SS(0). Paging: none, 32-bit (4 MiB pages, PSE-36), PAE,
//! 4-level and 5-level (CR4.LA57), with 2 MiB/1 GiB pages. Each access checks present, write
//! (CR0.WP for the supervisor), user (CPL 3), NX (EFER.NXE), SMEP and SMAP (RFLAGS.AC); a
//! failure is #PF with the architectural error code (P, W, U, RSVD, I/D) and CR2. Accessed and
//! dirty bits are set with atomic compare-exchanges, as the CPU would. Accesses that cross a
//! page are translated on both pages before any byte is written. Instruction fetch stops at
//! the first unreadable page and faults only if the decoder needed those bytes.
//!
//! # Known gaps (deliberate; each is rare or invisible for the guests we run)
//! - A single-step trap (RFLAGS.TF) after a completed instruction is not raised: it needs DR6,
//!   which this interface does not carry.
//! - `fwait` cannot see pending unmasked x87 exceptions (#MF); modern kernels mask them.
//! - A misaligned `cmpxchg8b` (a split lock on hardware) is read-compare-write, not atomic.
//! - No alignment checking (#AC), protection keys (PKU: guests run with `nopku`), or reserved
//!   physical-address bits beyond MAXPHYADDR (unknown here); PAE PDPTEs are read from memory,
//!   not from the copy the CPU loaded with CR3.
//! - `int n`, `int1`, `into`, XSAVE-family and SSE/AVX instructions are unsupported (hide the
//!   features in the CPU template instead); operands in MMIO are an error, not a device access.
//! - The monitor must clear an STI/MOV-SS interrupt shadow itself when it resumes after a
//!   completion (KVM's `interrupt.shadow` in `KVM_SET_VCPU_EVENTS`).
//!
//! # Cost
//! Measured on this host (release build, in-memory fixture): 0.2–0.45 µs per instruction with
//! KVM's bytes, 0.4–0.6 µs when the completer walks the page tables to fetch them; an exit
//! costs tens of µs here, so the completer is not the bottleneck.

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
    /// A completer with zeroed statistics.
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

    /// What this completer has handled so far.
    pub fn stats(&self) -> &Stats {
        &self.stats
    }
}

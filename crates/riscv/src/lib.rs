//! The software machine: an RV64GC interpreter (harts, MMU, CLINT, PLIC, SBI) that needs no
//! hardware support. It does no I/O of its own: devices reach it through the MMIO bus trait
//! ([`MmioDevice`]) and interrupt lines ([`IrqLine`]); it must not open files, sockets or
//! terminals (examples and the monitor do that).
//!
//! # What it emulates
//! - Harts: RV64IMAFDC + Zicsr + Zifencei + Sstc, privilege modes M/S/U with traps,
//!   interrupts, delegation, vectored/direct tvecs, WFI, Sv39/Sv48 paging. One host thread
//!   per hart.
//! - Memory map (QEMU `virt`-like): test finisher at 0x10_0000, CLINT at 0x200_0000, PLIC
//!   at 0xc00_0000, the caller's UART expected at 0x1000_0000 (IRQ 10) and virtio-mmio slots
//!   at 0x1000_1000 + i * 0x1000 (IRQ 1 + i), RAM at 0x8000_0000.
//!
//! # Boot: SBI in the monitor ("firmware-less")
//! There is no M-mode firmware image. [`Machine::load_kernel`] makes hart 0 start in S-mode
//! at the kernel with a0 = hartid, a1 = device tree, satp = 0, and the CSR setup an SBI
//! firmware would leave (exceptions and S interrupts delegated, counters and `stimecmp`
//! open to S). Other harts stay stopped until SBI HSM `hart_start`. Every `ecall` from
//! S-mode is served by the monitor: base, TIME, IPI, RFENCE, HSM, SRST, DBCN and legacy
//! console putchar/getchar (through the UART at 0x1000_0000). A trap that would reach M-mode
//! in this mode ends the run with [`ExitReason::Fault`], describing the trap.
//! M-mode remains fully implemented: [`Machine::load_program`] runs bare-metal programs in
//! M-mode from 0x8000_0000 (the self-checking test programs), with ecalls trapping to them.
//!
//! # Documented choices
//! - Misaligned loads and stores are performed by the machine (also across pages), never
//!   trapped: Linux 6.1 in S-mode relies on firmware for them. Misaligned LR/SC/AMOs raise
//!   address-misaligned exceptions. MMIO accesses must be naturally aligned (else access
//!   fault).
//! - Any physical access outside RAM and outside every device window raises an access fault;
//!   guest addresses never reach host memory unchecked.
//! - A/D bits are set by the page walker (atomically with a compare-and-swap on the PTE).
//! - PMP CSRs accept writes but are not enforced.
//! - LR/SC: LR records the physical address and the loaded value; SC is a host
//!   compare-and-swap against that value. A store of the same value by another hart between
//!   them is not detected (the ABA case), which the RISC-V spec permits for a constrained
//!   LR/SC loop's forward progress and which Linux's uses (lock-free loops that re-check
//!   the value) tolerate. Traps clear the reservation. AMOs are host atomic RMW operations.
//! - Guest RAM is accessed with relaxed host atomics; `fence` with store→load ordering maps
//!   to a host full fence (x86 is TSO, other orderings hold by construction).
//! - `mtime`/`time` follow host monotonic time at the timebase (10 MHz by default) and stop
//!   while the machine is paused, so guest time does not jump across a pause.
//! - Floating point: host f32/f64 with NaN-boxing and canonical NaNs; all rounding modes for
//!   add/sub/mul/div/sqrt/conversions (derived from the exact rounding error), fused
//!   multiply-add always to nearest; see `fpu.rs` for the flag accuracy.
//! - Speed: a per-hart cache of decoded instructions per physical page (keyed by physical
//!   page, so satp writes and sfence.vma keep it; invalidated by fence.i, remote fence.i and
//!   by stores into decoded pages on any hart); a direct-mapped TLB per privilege context
//!   whose entries point at host memory (also used by LR/SC/AMOs).
//! - Snapshots: [`MachineHandle::save_state`] returns every hart's registers, CSRs,
//!   counters and LR/SC reservation, the CLINT and the PLIC of a paused machine as serde
//!   structures ([`MachineState`]); [`Machine::restore_state`] takes them back (checked:
//!   registers must hold values the guest could have written) before `run`, with RAM mapped
//!   privately from the snapshot's memory file ([`GuestRam::from_file`]). `mtime` continues
//!   from the saved value. The caller saves RAM and devices.
//! - Dirty-page log (diff snapshots, migration): off until
//!   [`MachineHandle::enable_dirty_log`]; then [`MachineHandle::harvest_dirty`] returns the
//!   4 KiB pages written since the last harvest (hart stores, AMOs, SC, FPU stores, A/D
//!   updates, device writes and discards through [`GuestRam`]). Harts mark a page when they
//!   fill a write TLB entry and drop their write entries at each harvest (`dirty.rs`). A diff
//!   snapshot's pages are mapped over RAM with [`GuestRam::with_file_pages`].
//! - Debugging speed: `VME_RISCV_COUNTERS=1` makes each hart print event counters (traps by
//!   cause, TLB flushes, page walks, decode-cache fills, MMIO, instructions by privilege)
//!   when it stops; see `counters.rs`.
//!
//! # API
//! ```no_run
//! use std::sync::Arc;
//! use vme_riscv::{Machine, MachineConfig, ExitReason};
//! # fn main() -> Result<(), vme_riscv::Error> {
//! let mut m = Machine::new(MachineConfig { harts: 2, memory_bytes: 256 << 20,
//!     cmdline: "console=ttyS0".into(), ..MachineConfig::default() })?;
//! // m.add_mmio_device(0x1000_0000, 0x100, uart)?;   // Arc<dyn MmioDevice>
//! // let line = m.irq_line(10)?;                     // give to the UART: line.set_level(..)
//! m.load_kernel(&std::fs::read("Image").unwrap())?;
//! m.load_initrd(&std::fs::read("initramfs.cpio").unwrap())?;
//! let handle = m.handle();                           // pause()/resume()/stop()/stats()
//! match m.run()? { ExitReason::PowerOff => {}, other => println!("{other:?}") }
//! # Ok(()) }
//! ```

mod clint;
mod counters;
mod csr;
mod decode;
mod dirty;
mod exec;
mod fdt;
mod fpu;
mod hart;
mod icache;
mod machine;
mod memory;
mod mmu;
mod plic;
mod sbi;
mod shared;
mod snapshot;

pub use clint::{CLINT_BASE, CLINT_SIZE};
pub use dirty::DirtyBitmap;
pub use fdt::{ISA, MAX_VIRTIO_SLOTS, UART_IRQ, VIRTIO_BASE, VIRTIO_STRIDE};
pub use machine::{
    ExitReason, FINISHER_BASE, MAX_HARTS, Machine, MachineConfig, MachineHandle, Stats,
};
pub use memory::{GuestRam, MmioDevice, PAGE_SIZE, RAM_BASE};
pub use plic::{IrqLine, PLIC_BASE, PLIC_NDEV, PLIC_SIZE};
pub use sbi::UART_BASE;
pub use snapshot::{ClintState, CsrState, HartState, MachineState, PlicState};

/// Errors of the machine's setup and run (guest misbehaviour is an `ExitReason`, not this).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid machine configuration: {0}")]
    Config(String),
    #[error(
        "cannot allocate {bytes} bytes of guest RAM; lower the memory size or free host memory"
    )]
    RamAlloc { bytes: u64 },
    #[error("guest range {addr:#x}+{len:#x} is outside RAM; check the load address and RAM size")]
    OutOfRam { addr: u64, len: u64 },
    #[error(
        "MMIO window {base:#x}+{size:#x} is empty, wraps, or overlaps RAM or another device; pick a free range"
    )]
    MmioRange { base: u64, size: u64 },
    #[error("kernel image: {0}")]
    Kernel(String),
    #[error("initrd: {0}")]
    Initrd(String),
    #[error("device tree: {0}")]
    Fdt(String),
    #[error(
        "the machine is running; stop it first (MachineHandle::stop) before changing or re-running it"
    )]
    AlreadyRunning,
    #[error("cannot start a hart thread: {0}; check the process thread limit")]
    Thread(String),
    #[error("the host refused to free guest pages (madvise): {0}")]
    Discard(String),
    #[error("memory file: {0}")]
    MemoryFile(String),
    #[error("machine state: {0}")]
    State(String),
}

/// A function the embedding monitor runs at the start of each of this crate's hart threads,
/// before any guest-influenced work, with the thread's kind ("vcpu"): the monitor confines
/// the thread there (its seccomp filter). Set once; later calls are ignored.
static THREAD_START_HOOK: std::sync::OnceLock<fn(&'static str)> = std::sync::OnceLock::new();

pub fn set_thread_start_hook(hook: fn(&'static str)) {
    let _ = THREAD_START_HOOK.set(hook);
}

pub(crate) fn thread_started() {
    if let Some(hook) = THREAD_START_HOOK.get() {
        hook("vcpu");
    }
}

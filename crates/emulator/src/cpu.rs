//! The vCPU state the completer reads and changes, as a trait the monitor implements over
//! `KVM_GET/SET_REGS` and `KVM_GET/SET_SREGS` (or over any other source, such as a test fixture).

/// A general-purpose register, by its 64-bit name. Narrower views (EAX, AX, AL, AH) are derived
/// by the completer with the architectural zero/merge rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Gpr {
    Rax = 0,
    Rcx = 1,
    Rdx = 2,
    Rbx = 3,
    Rsp = 4,
    Rbp = 5,
    Rsi = 6,
    Rdi = 7,
    R8 = 8,
    R9 = 9,
    R10 = 10,
    R11 = 11,
    R12 = 12,
    R13 = 13,
    R14 = 14,
    R15 = 15,
}

impl Gpr {
    /// All sixteen registers in encoding order (index = register number).
    pub const ALL: [Gpr; 16] = [
        Gpr::Rax,
        Gpr::Rcx,
        Gpr::Rdx,
        Gpr::Rbx,
        Gpr::Rsp,
        Gpr::Rbp,
        Gpr::Rsi,
        Gpr::Rdi,
        Gpr::R8,
        Gpr::R9,
        Gpr::R10,
        Gpr::R11,
        Gpr::R12,
        Gpr::R13,
        Gpr::R14,
        Gpr::R15,
    ];

    /// The register with encoding number `n` (0..=15), if any.
    pub fn from_number(n: usize) -> Option<Gpr> {
        Self::ALL.get(n).copied()
    }
}

/// A segment register.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Seg {
    Es,
    Cs,
    Ss,
    Ds,
    Fs,
    Gs,
}

/// The hidden (descriptor-cache) part of a segment register, as `kvm_segment` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Segment {
    pub base: u64,
    /// Limit in bytes (already scaled by the granularity bit, as KVM reports it).
    pub limit: u32,
    pub selector: u16,
    /// Descriptor type field (bits 0..=3): bit 2 set on a data segment means expand-down.
    pub type_: u8,
    /// S bit: code/data (true) or system descriptor.
    pub s: bool,
    pub dpl: u8,
    pub present: bool,
    /// D/B bit: 32-bit default operand/address size (or 32-bit stack for SS).
    pub db: bool,
    /// L bit: 64-bit code segment (only meaningful for CS with EFER.LMA).
    pub long: bool,
    /// Granularity bit (informational; `limit` is already in bytes).
    pub g: bool,
    /// KVM's "unusable" flag (a null selector loaded in protected mode).
    pub unusable: bool,
}

/// Architectural bits the completer looks at.
pub mod bits {
    pub const CR0_PE: u64 = 1 << 0;
    pub const CR0_MP: u64 = 1 << 1;
    pub const CR0_TS: u64 = 1 << 3;
    pub const CR0_WP: u64 = 1 << 16;
    pub const CR0_PG: u64 = 1 << 31;
    pub const CR4_PSE: u64 = 1 << 4;
    pub const CR4_PAE: u64 = 1 << 5;
    pub const CR4_LA57: u64 = 1 << 12;
    pub const CR4_SMEP: u64 = 1 << 20;
    pub const CR4_SMAP: u64 = 1 << 21;
    pub const EFER_LMA: u64 = 1 << 10;
    pub const EFER_NXE: u64 = 1 << 11;
    pub const RFLAGS_CF: u64 = 1 << 0;
    pub const RFLAGS_PF: u64 = 1 << 2;
    pub const RFLAGS_AF: u64 = 1 << 4;
    pub const RFLAGS_ZF: u64 = 1 << 6;
    pub const RFLAGS_SF: u64 = 1 << 7;
    pub const RFLAGS_TF: u64 = 1 << 8;
    pub const RFLAGS_OF: u64 = 1 << 11;
    pub const RFLAGS_RF: u64 = 1 << 16;
    pub const RFLAGS_VM: u64 = 1 << 17;
    pub const RFLAGS_AC: u64 = 1 << 18;
    /// The six arithmetic status flags.
    pub const RFLAGS_STATUS: u64 =
        RFLAGS_CF | RFLAGS_PF | RFLAGS_AF | RFLAGS_ZF | RFLAGS_SF | RFLAGS_OF;
}

/// The vCPU registers the completer needs. The monitor implements this over KVM's register
/// ioctls; setters only change the cached copy, which the monitor writes back before resuming.
pub trait CpuState {
    /// Index of the vCPU, used only in error messages ("vCPU 0: ...").
    fn vcpu_index(&self) -> u32;
    fn gpr(&self, r: Gpr) -> u64;
    fn set_gpr(&mut self, r: Gpr, v: u64);
    fn rip(&self) -> u64;
    fn set_rip(&mut self, v: u64);
    fn rflags(&self) -> u64;
    fn set_rflags(&mut self, v: u64);
    fn cr0(&self) -> u64;
    /// CR2 is not read: a page fault's address is returned in [`crate::Completion::Inject`].
    fn cr3(&self) -> u64;
    fn cr4(&self) -> u64;
    fn efer(&self) -> u64;
    /// Current privilege level (KVM: `SS.dpl`, which equals `CS.selector & 3` outside transitions).
    fn cpl(&self) -> u8;
    fn segment(&self, s: Seg) -> Segment;
}

/// The processor mode, derived from CR0, EFER, RFLAGS and CS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mode {
    Real,
    Virtual8086,
    /// Protected mode with a 16- or 32-bit code segment (also compatibility mode under LMA).
    Protected,
    Long64,
}

pub(crate) fn mode(cpu: &dyn CpuState) -> Mode {
    if cpu.cr0() & bits::CR0_PE == 0 {
        return Mode::Real;
    }
    if cpu.efer() & bits::EFER_LMA != 0 && cpu.segment(Seg::Cs).long {
        return Mode::Long64;
    }
    if cpu.rflags() & bits::RFLAGS_VM != 0 {
        return Mode::Virtual8086;
    }
    Mode::Protected
}

/// Code size in bits (16, 32, 64) for the decoder.
pub(crate) fn bitness(cpu: &dyn CpuState, m: Mode) -> u32 {
    match m {
        Mode::Long64 => 64,
        Mode::Real | Mode::Virtual8086 => {
            // Real mode with a 32-bit CS cache ("unreal" big code) is rare; honour D anyway.
            if m == Mode::Real && cpu.segment(Seg::Cs).db {
                32
            } else {
                16
            }
        }
        Mode::Protected => {
            if cpu.segment(Seg::Cs).db {
                32
            } else {
                16
            }
        }
    }
}

//! The state the boot vCPU starts in, and the low-memory structures (GDT, identity page
//! tables) that state points at.

use crate::ArchError;
use crate::layout::{BOOT_STACK, GDT_ADDR, IDT_ADDR, PD_ADDR, PD_COUNT, PDPT_ADDR, PML4_ADDR};
use crate::loader::{BootProtocol, KernelBoot};
use kvm_bindings::{kvm_fpu, kvm_lapic_state, kvm_regs, kvm_segment, kvm_sregs};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// GDT the monitor builds. Linux's 64-bit boot protocol wants CS = 0x10, DS/ES/SS = 0x18.
const GDT: [u64; 5] = [
    0,                     // null
    0x00cf_9b00_0000_ffff, // 0x08: 32-bit flat code (PVH entry)
    0x00af_9b00_0000_ffff, // 0x10: 64-bit code
    0x00cf_9300_0000_ffff, // 0x18: flat data
    0x0000_8b00_0000_0067, // 0x20: 32-bit TSS, busy, base 0, limit 0x67
];
const CODE32_SEL: u16 = 0x08;
const CODE64_SEL: u16 = 0x10;
const DATA_SEL: u16 = 0x18;
const TSS_SEL: u16 = 0x20;

const CR0_PE: u64 = 1;
const CR0_ET: u64 = 1 << 4;
const CR0_NE: u64 = 1 << 5;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

pub const MSR_IA32_TSC: u32 = 0x10;
pub const MSR_IA32_SYSENTER_CS: u32 = 0x174;
pub const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
pub const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
pub const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
pub const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
pub const MSR_STAR: u32 = 0xc000_0081;
pub const MSR_LSTAR: u32 = 0xc000_0082;
pub const MSR_CSTAR: u32 = 0xc000_0083;
pub const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
pub const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;

/// Decodes a GDT descriptor into the form KVM takes.
fn segment(selector: u16, descriptor: u64) -> kvm_segment {
    let base = ((descriptor >> 16) & 0xff_ffff) | (((descriptor >> 56) & 0xff) << 24);
    let limit = (descriptor & 0xffff) | (((descriptor >> 48) & 0xf) << 16);
    let g = ((descriptor >> 55) & 1) as u8;
    kvm_segment {
        base,
        // With G set the limit counts 4 KiB pages; KVM wants bytes.
        limit: if g == 1 {
            ((limit << 12) | 0xfff) as u32
        } else {
            limit as u32
        },
        selector,
        type_: ((descriptor >> 40) & 0xf) as u8,
        present: ((descriptor >> 47) & 1) as u8,
        dpl: ((descriptor >> 45) & 3) as u8,
        db: ((descriptor >> 54) & 1) as u8,
        s: ((descriptor >> 44) & 1) as u8,
        l: ((descriptor >> 53) & 1) as u8,
        g,
        avl: ((descriptor >> 52) & 1) as u8,
        unusable: 0,
        padding: 0,
    }
}

fn gdt_segment(selector: u16) -> kvm_segment {
    segment(selector, GDT[usize::from(selector >> 3)])
}

/// Writes the GDT, an empty IDT and identity page tables mapping the first 4 GiB with 2 MiB
/// pages (the 64-bit boot protocol needs paging on and everything the kernel touches mapped).
pub fn write_boot_structures(mem: &GuestMemoryMmap) -> Result<(), ArchError> {
    let err = |e: vm_memory::GuestMemoryError| ArchError::Memory(format!("boot structures: {e}"));
    for (i, d) in GDT.iter().enumerate() {
        mem.write_obj(*d, GuestAddress(GDT_ADDR + i as u64 * 8))
            .map_err(err)?;
    }
    mem.write_obj(0u64, GuestAddress(IDT_ADDR)).map_err(err)?;
    mem.write_obj(PDPT_ADDR | 0x3, GuestAddress(PML4_ADDR))
        .map_err(err)?;
    for pd in 0..PD_COUNT {
        let pd_addr = PD_ADDR + pd * 0x1000;
        mem.write_obj(pd_addr | 0x3, GuestAddress(PDPT_ADDR + pd * 8))
            .map_err(err)?;
        for i in 0..512u64 {
            let page = ((pd << 9) + i) << 21;
            // Present, writable, 2 MiB page.
            mem.write_obj(page | 0x83, GuestAddress(pd_addr + i * 8))
                .map_err(err)?;
        }
    }
    Ok(())
}

/// General registers of the boot vCPU.
pub fn boot_regs(boot: &KernelBoot) -> kvm_regs {
    let mut regs = kvm_regs {
        rflags: 0x2,
        rip: boot.entry,
        rsp: BOOT_STACK,
        rbp: BOOT_STACK,
        ..Default::default()
    };
    match boot.protocol {
        BootProtocol::Linux64 { zero_page } => regs.rsi = zero_page,
        BootProtocol::Pvh { start_info } => regs.rbx = start_info,
    }
    regs
}

/// Segment and control registers of the boot vCPU (edits KVM's reset state in place).
pub fn boot_sregs(boot: &KernelBoot, sregs: &mut kvm_sregs) {
    let data = gdt_segment(DATA_SEL);
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = gdt_segment(TSS_SEL);
    sregs.gdt.base = GDT_ADDR;
    sregs.gdt.limit = (GDT.len() * 8 - 1) as u16;
    sregs.idt.base = IDT_ADDR;
    sregs.idt.limit = 7;
    match boot.protocol {
        BootProtocol::Linux64 { .. } => {
            sregs.cs = gdt_segment(CODE64_SEL);
            sregs.cr3 = PML4_ADDR;
            sregs.cr4 = CR4_PAE;
            sregs.cr0 = CR0_PE | CR0_ET | CR0_NE | CR0_PG;
            sregs.efer = EFER_LME | EFER_LMA;
        }
        BootProtocol::Pvh { .. } => {
            sregs.cs = gdt_segment(CODE32_SEL);
            sregs.cr0 = CR0_PE | CR0_ET;
            sregs.cr4 = 0;
            sregs.efer = 0;
        }
    }
}

/// MSRs every vCPU starts with: syscall/sysenter entry points cleared (the kernel sets them),
/// fast strings enabled, and MTRRs enabled with write-back as the default memory type (so the
/// guest does not run uncached). kvmclock MSRs are left to the guest.
pub fn boot_msrs() -> Vec<(u32, u64)> {
    vec![
        (MSR_IA32_SYSENTER_CS, 0),
        (MSR_IA32_SYSENTER_ESP, 0),
        (MSR_IA32_SYSENTER_EIP, 0),
        (MSR_STAR, 0),
        (MSR_CSTAR, 0),
        (MSR_KERNEL_GS_BASE, 0),
        (MSR_SYSCALL_MASK, 0),
        (MSR_LSTAR, 0),
        (MSR_IA32_TSC, 0),
        (MSR_IA32_MISC_ENABLE, 1),
        (MSR_MTRR_DEF_TYPE, (1 << 11) | 6),
    ]
}

/// x87/SSE control words as after FNINIT and a reset MXCSR.
pub fn boot_fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    }
}

const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_EXTINT: u32 = 0x7;
const APIC_MODE_NMI: u32 = 0x4;

fn lapic_reg(lapic: &kvm_lapic_state, offset: usize) -> u32 {
    let b = &lapic.regs[offset..offset + 4];
    u32::from_le_bytes([b[0] as u8, b[1] as u8, b[2] as u8, b[3] as u8])
}

fn set_lapic_reg(lapic: &mut kvm_lapic_state, offset: usize, value: u32) {
    for (i, b) in value.to_le_bytes().iter().enumerate() {
        lapic.regs[offset + i] = *b as _;
    }
}

/// Wires LINT0 as ExtINT (the PIC's output) and LINT1 as NMI, as firmware would.
pub fn configure_lapic(lapic: &mut kvm_lapic_state) {
    let lvt0 = lapic_reg(lapic, APIC_LVT0);
    set_lapic_reg(lapic, APIC_LVT0, (lvt0 & !0x700) | (APIC_MODE_EXTINT << 8));
    let lvt1 = lapic_reg(lapic, APIC_LVT1);
    set_lapic_reg(lapic, APIC_LVT1, (lvt1 & !0x700) | (APIC_MODE_NMI << 8));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segments_decode_from_the_gdt() {
        let cs = gdt_segment(CODE64_SEL);
        assert_eq!((cs.l, cs.db, cs.type_, cs.present, cs.s), (1, 0, 0xb, 1, 1));
        assert_eq!(cs.limit, 0xffff_ffff);
        let cs32 = gdt_segment(CODE32_SEL);
        assert_eq!((cs32.l, cs32.db), (0, 1));
        let tr = gdt_segment(TSS_SEL);
        assert_eq!((tr.type_, tr.s, tr.limit, tr.g), (0xb, 0, 0x67, 0));
    }

    #[test]
    fn page_tables_identity_map_4g() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        write_boot_structures(&mem).unwrap();
        let pml4: u64 = mem.read_obj(GuestAddress(PML4_ADDR)).unwrap();
        assert_eq!(pml4 & !0xfff, PDPT_ADDR);
        let pdpt3: u64 = mem.read_obj(GuestAddress(PDPT_ADDR + 24)).unwrap();
        let last: u64 = mem
            .read_obj(GuestAddress((pdpt3 & !0xfff) + 511 * 8))
            .unwrap();
        assert_eq!(last & !0xfff, (4 << 30) - (2 << 20));
        assert_eq!(last & 0x83, 0x83);
    }

    #[test]
    fn entry_registers_follow_the_protocol() {
        let linux = KernelBoot {
            entry: 0x100200,
            protocol: BootProtocol::Linux64 { zero_page: 0x7000 },
        };
        assert_eq!(
            (boot_regs(&linux).rip, boot_regs(&linux).rsi),
            (0x100200, 0x7000)
        );
        let mut sregs = kvm_sregs::default();
        boot_sregs(&linux, &mut sregs);
        assert_eq!((sregs.cs.selector, sregs.ds.selector), (0x10, 0x18));
        assert_eq!(sregs.efer & EFER_LMA, EFER_LMA);
        let pvh = KernelBoot {
            entry: 0x1000000,
            protocol: BootProtocol::Pvh { start_info: 0x6000 },
        };
        assert_eq!(boot_regs(&pvh).rbx, 0x6000);
        boot_sregs(&pvh, &mut sregs);
        assert_eq!((sregs.cr0 & CR0_PG, sregs.efer, sregs.cs.db), (0, 0, 1));
    }

    #[test]
    fn lapic_lint_pins_are_wired() {
        let mut lapic = kvm_lapic_state::default();
        configure_lapic(&mut lapic);
        assert_eq!((lapic_reg(&lapic, APIC_LVT0) >> 8) & 7, APIC_MODE_EXTINT);
        assert_eq!((lapic_reg(&lapic, APIC_LVT1) >> 8) & 7, APIC_MODE_NMI);
    }
}

//! Where things live in an x86_64 guest's physical address space.
//!
//! RAM starts at 0. The 32-bit PCI/MMIO hole, 3 GiB – 4 GiB, is never RAM (the in-kernel
//! IOAPIC, local APICs and KVM's private pages live there); RAM beyond 3 GiB continues at
//! 4 GiB. The boot structures sit in low memory, below the legacy EBDA/BIOS area.

/// Start of the 32-bit MMIO hole.
pub const MMIO_HOLE_START: u64 = 3 << 30;
/// End of the 32-bit MMIO hole (RAM resumes here).
pub const MMIO_HOLE_END: u64 = 4 << 30;

pub const GDT_ADDR: u64 = 0x500;
pub const IDT_ADDR: u64 = 0x520;
/// PVH `hvm_start_info`, then the module list right after it.
pub const PVH_INFO_ADDR: u64 = 0x6000;
pub const PVH_MODLIST_ADDR: u64 = 0x6040;
/// The bzImage zero page (`boot_params`) or, for PVH, the memory map table.
pub const ZERO_PAGE_ADDR: u64 = 0x7000;
pub const PVH_MEMMAP_ADDR: u64 = 0x7000;
pub const BOOT_STACK: u64 = 0x8ff0;
/// Identity page tables: PML4, one PDPT, four page directories of 2 MiB pages (4 GiB).
pub const PML4_ADDR: u64 = 0x9000;
pub const PDPT_ADDR: u64 = 0xa000;
pub const PD_ADDR: u64 = 0xb000;
pub const PD_COUNT: u64 = 4;
pub const CMDLINE_ADDR: u64 = 0x20000;
/// Longest command line we pass (Linux x86 accepts 2048 bytes unless its header says more).
pub const CMDLINE_MAX: usize = 2048;
/// Top of usable low memory; the EBDA and legacy BIOS area follow.
pub const EBDA_START: u64 = 0x9fc00;
/// ACPI tables (RSDP first): inside the legacy BIOS area, marked reserved.
pub const ACPI_START: u64 = 0xe0000;
pub const ACPI_END: u64 = 0x100000;
/// The VM Generation ID (16 bytes), in the last page of the reserved ACPI area: the DSDT's
/// `\_SB_.VGEN.ADDR` returns this address, and the guest maps it (Linux: vmgenid).
pub const VMGENID_ADDR: u64 = ACPI_END - 0x1000;
/// Kernels load at 1 MiB.
pub const HIMEM_START: u64 = 0x100000;

/// The in-kernel IOAPIC and local APIC addresses (KVM's defaults).
pub const IOAPIC_ADDR: u64 = 0xfec0_0000;
pub const LAPIC_ADDR: u64 = 0xfee0_0000;

/// The PCI BAR window: the host bridge forwards memory accesses in
/// `[PCI_MMIO_BASE, PCI_MMIO_BASE + PCI_MMIO_SIZE)` to BARs; the monitor assigns every BAR
/// inside it at boot. It ends below 0xd000_0000 on purpose: tests read that page to check
/// that unclaimed MMIO reads as all-ones.
pub const PCI_MMIO_BASE: u64 = 0xc000_0000;
pub const PCI_MMIO_SIZE: u64 = 0x1000_0000;
/// ECAM (memory-mapped configuration space) of PCI bus 0: 1 MiB, described in the MCFG and
/// reserved in the e820 map (Linux uses ECAM only where the firmware reserved it).
pub const PCI_ECAM_BASE: u64 = 0xe000_0000;
pub const PCI_ECAM_SIZE: u64 = 1 << 20;
/// PCI devices (function 0 of device numbers 1..31 on bus 0; device 0 is the host bridge).
pub const PCI_DEVICE_SLOTS: usize = 31;

/// One e820 entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct E820Entry {
    pub addr: u64,
    pub size: u64,
    pub kind: E820Kind,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum E820Kind {
    Ram = 1,
    Reserved = 2,
}

/// The guest-physical RAM ranges (start, length) for `size` bytes of memory.
pub fn ram_regions(size: u64) -> Vec<(u64, u64)> {
    if size <= MMIO_HOLE_START {
        vec![(0, size)]
    } else {
        vec![
            (0, MMIO_HOLE_START),
            (MMIO_HOLE_END, size - MMIO_HOLE_START),
        ]
    }
}

/// The memory map the guest sees: RAM except the EBDA/BIOS area, which is reserved (the ACPI
/// tables live there), and the reserved PCI ECAM window.
pub fn e820_map(size: u64) -> Vec<E820Entry> {
    let mut map = vec![
        E820Entry {
            addr: 0,
            size: EBDA_START,
            kind: E820Kind::Ram,
        },
        E820Entry {
            addr: EBDA_START,
            size: HIMEM_START - EBDA_START,
            kind: E820Kind::Reserved,
        },
    ];
    map.push(E820Entry {
        addr: PCI_ECAM_BASE,
        size: PCI_ECAM_SIZE,
        kind: E820Kind::Reserved,
    });
    for (start, len) in ram_regions(size) {
        let start = start.max(HIMEM_START);
        let end = if start == HIMEM_START {
            len
        } else {
            start + len
        };
        if end > start {
            map.push(E820Entry {
                addr: start,
                size: end - start,
                kind: E820Kind::Ram,
            });
        }
    }
    map.sort_by_key(|e| e.addr);
    map
}

/// The end of RAM below the MMIO hole (exclusive).
pub fn low_ram_end(size: u64) -> u64 {
    size.min(MMIO_HOLE_START)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ram_skips_the_hole() {
        assert_eq!(ram_regions(256 << 20), vec![(0, 256 << 20)]);
        assert_eq!(ram_regions(3 << 30), vec![(0, 3 << 30)]);
        assert_eq!(ram_regions(5 << 30), vec![(0, 3 << 30), (4 << 30, 2 << 30)]);
    }

    #[test]
    fn e820_reserves_the_bios_area_and_covers_all_ram() {
        let map = e820_map(5 << 30);
        let ram: u64 = map
            .iter()
            .filter(|e| e.kind == E820Kind::Ram)
            .map(|e| e.size)
            .sum();
        assert_eq!(ram, (5 << 30) - (HIMEM_START - EBDA_START));
        assert!(map.iter().any(|e| e.kind == E820Kind::Reserved
            && e.addr <= ACPI_START
            && e.addr + e.size >= ACPI_END));
        // The ECAM window is reserved and the map is in address order.
        assert!(map.iter().any(|e| e.kind == E820Kind::Reserved
            && e.addr == PCI_ECAM_BASE
            && e.size == PCI_ECAM_SIZE));
        assert!(map.windows(2).all(|w| w[0].addr + w[0].size <= w[1].addr));
        // No RAM entry overlaps the hole.
        assert!(map.iter().all(|e| e.kind != E820Kind::Ram
            || e.addr + e.size <= MMIO_HOLE_START
            || e.addr >= MMIO_HOLE_END));
    }
}

//! ACPI tables: RSDP → XSDT → FADT (hardware-reduced, with DSDT), MADT and MCFG.
//!
//! Linux finds every vCPU here (one local APIC entry each; there is no MP table), the IOAPIC
//! with the ISA overrides (IRQ0 → GSI2; IRQ9 level), how to power off (`\_S5_` and the FADT
//! sleep control register) and the power button (a GED, ACPI0013, whose `_EVT` notifies a
//! PNP0C0C button). The registers are `vme_devices::acpi`'s port block.
//!
//! PCI: the DSDT's `\_SB_.PCI0` (PNP0A08, compatible PNP0A03) is the host bridge of segment
//! 0, bus 0. Its `_CRS` gives bus 0, the type-1 configuration ports 0xCF8..0xCFF, the I/O
//! ports around them, and the 32-bit BAR window; the MCFG gives bus 0's ECAM window (also
//! reserved in the e820 map, which Linux requires before it uses ECAM). Functions interrupt
//! through MSI-X only, so there is no `_PRT`.

use crate::ArchError;
use crate::layout::{
    ACPI_START, IOAPIC_ADDR, LAPIC_ADDR, PCI_ECAM_BASE, PCI_MMIO_BASE, PCI_MMIO_SIZE, VMGENID_ADDR,
};
use acpi_tables::aml::{
    self, AddressSpace, AddressSpaceCacheable, Device, EISAName, Field, FieldAccessType,
    FieldEntry, FieldLockRule, FieldUpdateRule, IO, If, Interrupt, Local, Method, Name, Notify,
    OpRegion, OpRegionSpace, Package, Path, ResourceTemplate, Return, Scope, Store,
};
use acpi_tables::{Aml, mcfg::MCFG, rsdp::Rsdp, sdt::Sdt};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const OEM_ID: [u8; 6] = *b"VME   ";
const OEM_TABLE: [u8; 8] = *b"VMEACPI ";

/// Register offsets inside the ACPI port block (must match `vme_devices::acpi`).
const SLEEP_CONTROL: u16 = 0;
const SLEEP_STATUS: u16 = 1;
const RESET: u16 = 2;
const GED_EVENT: u16 = 4;
/// GED event bit: the VM Generation ID changed (bit 0 is the power button).
const EVENT_GENERATION: u8 = 2;
const RESET_VALUE: u8 = 1;
const SLP_TYP_S5: u8 = 5;

/// FADT flags.
const FADT_RESET_REG_SUP: u32 = 1 << 10;
const FADT_HW_REDUCED_ACPI: u32 = 1 << 20;
const FADT_PWR_BUTTON: u32 = 1 << 4;
/// IA-PC boot architecture flags: an i8042 exists (reboot through it); no VGA.
const IAPC_8042: u16 = 1 << 1;
const IAPC_NO_VGA: u16 = 1 << 2;

/// A Generic Address Structure for a byte-wide I/O port.
fn gas_io8(port: u16) -> [u8; 12] {
    let mut g = [0u8; 12];
    g[0] = 1; // system I/O
    g[1] = 8; // bit width
    g[3] = 1; // byte access
    g[4..6].copy_from_slice(&port.to_le_bytes());
    g
}

fn fadt(dsdt: u64, acpi_port: u16) -> Sdt {
    let mut t = Sdt::new(*b"FACP", 276, 6, OEM_ID, OEM_TABLE, 1);
    t.write_u16(109, IAPC_8042 | IAPC_NO_VGA);
    t.write_u32(
        112,
        FADT_HW_REDUCED_ACPI | FADT_RESET_REG_SUP | FADT_PWR_BUTTON,
    );
    t.write_bytes(116, &gas_io8(acpi_port + RESET));
    t.write_u8(128, RESET_VALUE);
    t.write_u8(131, 3); // FADT minor version (6.3)
    t.write_u64(140, dsdt); // X_DSDT
    t.write_bytes(244, &gas_io8(acpi_port + SLEEP_CONTROL));
    t.write_bytes(256, &gas_io8(acpi_port + SLEEP_STATUS));
    t.write_bytes(268, b"VMEVMEVM"); // hypervisor vendor identity
    t
}

fn madt(vcpus: u32, ged_gsi: u32) -> Sdt {
    let mut t = Sdt::new(*b"APIC", 44, 5, OEM_ID, OEM_TABLE, 1);
    t.write_u32(36, LAPIC_ADDR as u32);
    t.write_u32(40, 1); // PCAT_COMPAT: there are 8259s (KVM's in-kernel PIC)
    for id in 0..vcpus {
        // Processor Local APIC: type 0, length 8, UID, APIC ID, flags (enabled).
        let id = id as u8;
        t.append_slice(&[0, 8, id, id, 1, 0, 0, 0]);
    }
    // IOAPIC: type 1, length 12, ID, reserved, address, GSI base 0.
    let mut ioapic = vec![1, 12, 0, 0];
    ioapic.extend_from_slice(&(IOAPIC_ADDR as u32).to_le_bytes());
    ioapic.extend_from_slice(&0u32.to_le_bytes());
    t.append_slice(&ioapic);
    // Interrupt source overrides: type 2, length 10, bus 0 (ISA), source, GSI, flags.
    let iso = |source: u8, gsi: u32, flags: u16| {
        let mut v = vec![2, 10, 0, source];
        v.extend_from_slice(&gsi.to_le_bytes());
        v.extend_from_slice(&flags.to_le_bytes());
        v
    };
    t.append_slice(&iso(0, 2, 0)); // the PIT's IRQ0 arrives on IOAPIC pin 2
    // Level-triggered, active high: the GED line stays up until its event is read.
    t.append_slice(&iso(ged_gsi as u8, ged_gsi, 0x0d));
    t
}

fn dsdt(acpi_port: u16, ged_gsi: u32) -> Sdt {
    let mut t = Sdt::new(*b"DSDT", 36, 6, OEM_ID, OEM_TABLE, 1);
    let s5 = Package::new(vec![&SLP_TYP_S5, &SLP_TYP_S5, &0u8, &0u8]);
    Name::new("_S5_".into(), &s5).to_aml_bytes(&mut t);

    // The power button, notified by the GED's event method.
    let button_hid = EISAName::new("PNP0C0C");
    let button_hid = Name::new("_HID".into(), &button_hid);
    let pwrb = Device::new("PWRB".into(), vec![&button_hid]);

    let ged_irq = Interrupt::new(true, false, false, false, ged_gsi);
    let ged_crs = ResourceTemplate::new(vec![&ged_irq]);
    let event_port = u64::from(acpi_port + GED_EVENT);
    let region = OpRegion::new("GDST".into(), OpRegionSpace::SystemIO, &event_port, &4u8);
    let field = Field::new(
        "GDST".into(),
        FieldAccessType::DWord,
        FieldLockRule::NoLock,
        FieldUpdateRule::WriteAsZeroes,
        vec![FieldEntry::Named(*b"GDAT", 32)],
    );
    let gdat = Path::new("GDAT");
    let read_event = Store::new(&Local(0), &gdat);
    let pressed = aml::And::new(&Local(1), &Local(0), &1u8);
    let button = Path::new("\\_SB_.PWRB");
    let notify_button = Notify::new(&button, &0x80u8);
    let on_press = If::new(&pressed, vec![&notify_button]);
    let changed = aml::And::new(&Local(1), &Local(0), &EVENT_GENERATION);
    let vgen = Path::new("\\_SB_.VGEN");
    let notify_vgen = Notify::new(&vgen, &0x80u8);
    let on_change = If::new(&changed, vec![&notify_vgen]);
    let evt = Method::new(
        "_EVT".into(),
        1,
        true,
        vec![&read_event, &on_press, &on_change],
    );
    let ged_hid = Name::new("_HID".into(), &"ACPI0013");
    let ged_uid = Name::new("_UID".into(), &0u8);
    let ged_crs = Name::new("_CRS".into(), &ged_crs);
    let ged = Device::new(
        "GED0".into(),
        vec![&ged_hid, &ged_uid, &ged_crs, &region, &field, &evt],
    );

    let com1_io = IO::new(0x3f8, 0x3f8, 0, 8);
    let com1_irq = Interrupt::new(true, true, false, false, 4);
    let com1_crs = ResourceTemplate::new(vec![&com1_io, &com1_irq]);
    let com1_hid = EISAName::new("PNP0501");
    let com1_hid = Name::new("_HID".into(), &com1_hid);
    let com1_uid = Name::new("_UID".into(), &1u8);
    let com1_crs = Name::new("_CRS".into(), &com1_crs);
    let com1 = Device::new("COM1".into(), vec![&com1_hid, &com1_uid, &com1_crs]);

    // The VM Generation ID device (Microsoft's spec; Linux's vmgenid driver matches the
    // _HID): ADDR returns the ID's address as two 32-bit halves; the GED notifies it when
    // a clone gets a new ID, and Linux then reseeds its random generator.
    let vgen_hid = Name::new("_HID".into(), &"VMGENCTR");
    let vgen_cid = Name::new("_CID".into(), &"VM_GEN_COUNTER");
    let (lo, hi) = (VMGENID_ADDR as u32, (VMGENID_ADDR >> 32) as u32);
    let addr_pkg = Package::new(vec![&lo, &hi]);
    let addr_ret = Return::new(&addr_pkg);
    let addr = Method::new("ADDR".into(), 0, false, vec![&addr_ret]);
    let vgen = Device::new("VGEN".into(), vec![&vgen_hid, &vgen_cid, &addr]);

    Scope::new("\\_SB_".into(), vec![&pwrb, &ged, &com1, &vgen]).to_aml_bytes(&mut t);

    pci_host_bridge(&mut t);
    t
}

/// `\_SB_.PCI0`: the host bridge of segment 0, bus 0, and the resources it decodes.
fn pci_host_bridge(t: &mut Sdt) {
    let bus = AddressSpace::<u16>::new_bus_number(0, 0);
    let config_ports = IO::new(0xcf8, 0xcf8, 1, 8);
    // Port I/O below and above the configuration ports passes through the bridge.
    let io_low = AddressSpace::<u16>::new_io(0, 0xcf7, None);
    let io_high = AddressSpace::<u16>::new_io(0xd00, 0xffff, None);
    let window = AddressSpace::<u32>::new_memory(
        AddressSpaceCacheable::NotCacheable,
        true,
        PCI_MMIO_BASE as u32,
        (PCI_MMIO_BASE + PCI_MMIO_SIZE - 1) as u32,
        None,
    );
    let crs = ResourceTemplate::new(vec![&bus, &config_ports, &io_low, &io_high, &window]);
    let hid = EISAName::new("PNP0A08");
    let cid = EISAName::new("PNP0A03");
    let names = [
        Name::new("_HID".into(), &hid),
        Name::new("_CID".into(), &cid),
        Name::new("_ADR".into(), &0u8),
        Name::new("_SEG".into(), &0u8),
        Name::new("_UID".into(), &0u8),
        Name::new("_BBN".into(), &0u8),
        Name::new("_CRS".into(), &crs),
    ];
    let children: Vec<&dyn Aml> = names.iter().map(|n| n as &dyn Aml).collect();
    let dev = Device::new("PCI0".into(), children);
    Scope::new("\\_SB_".into(), vec![&dev]).to_aml_bytes(t);
}

fn mcfg() -> Vec<u8> {
    let mut t = MCFG::new(OEM_ID, OEM_TABLE, 1);
    t.add_ecam(PCI_ECAM_BASE, 0, 0, 0);
    let mut bytes = Vec::new();
    t.to_aml_bytes(&mut bytes);
    bytes
}

fn xsdt(entries: &[u64]) -> Sdt {
    let mut t = Sdt::new(*b"XSDT", 36, 1, OEM_ID, OEM_TABLE, 1);
    for e in entries {
        t.append_slice(&e.to_le_bytes());
    }
    t
}

fn align8(x: u64) -> u64 {
    (x + 7) & !7
}

/// Writes the VM Generation ID the guest reads at `VMGENID_ADDR` (notify it through the
/// GED's `EVENT_GENERATION` when it changes).
pub fn write_generation_id(mem: &GuestMemoryMmap, id: &[u8; 16]) -> Result<(), ArchError> {
    mem.write_slice(id, GuestAddress(VMGENID_ADDR))
        .map_err(|e| ArchError::Acpi(format!("writing the VM generation ID: {e}")))
}

/// Writes the tables for `vcpus` vCPUs at `ACPI_START`; returns the RSDP's address.
pub fn write_tables(
    mem: &GuestMemoryMmap,
    vcpus: u32,
    acpi_port: u16,
    ged_gsi: u32,
) -> Result<u64, ArchError> {
    if vcpus == 0 || vcpus > 255 {
        return Err(ArchError::Acpi(format!(
            "{vcpus} vCPUs: the MADT describes 1 to 255 local APICs"
        )));
    }
    let rsdp_addr = ACPI_START;
    let xsdt_addr = align8(rsdp_addr + Rsdp::len() as u64);
    // XSDT: header + three 8-byte entries.
    let dsdt_addr = align8(xsdt_addr + 36 + 24);
    let dsdt = dsdt(acpi_port, ged_gsi);
    let fadt_addr = align8(dsdt_addr + dsdt.len() as u64);
    let fadt = fadt(dsdt_addr, acpi_port);
    let madt_addr = align8(fadt_addr + fadt.len() as u64);
    let madt = madt(vcpus, ged_gsi);
    let mcfg_addr = align8(madt_addr + madt.len() as u64);
    let mcfg = mcfg();
    let xsdt = xsdt(&[fadt_addr, madt_addr, mcfg_addr]);
    let end = mcfg_addr + mcfg.len() as u64;
    if end > VMGENID_ADDR {
        return Err(ArchError::Acpi(format!(
            "tables need {} bytes but only {} are reserved",
            end - ACPI_START,
            VMGENID_ADDR - ACPI_START
        )));
    }
    let mut rsdp = Vec::new();
    Rsdp::new(OEM_ID, xsdt_addr).to_aml_bytes(&mut rsdp);
    for (addr, bytes) in [
        (rsdp_addr, rsdp.as_slice()),
        (xsdt_addr, xsdt.as_slice()),
        (dsdt_addr, dsdt.as_slice()),
        (fadt_addr, fadt.as_slice()),
        (madt_addr, madt.as_slice()),
        (mcfg_addr, mcfg.as_slice()),
    ] {
        mem.write_slice(bytes, GuestAddress(addr))
            .map_err(|e| ArchError::Acpi(format!("writing at {addr:#x}: {e}")))?;
    }
    Ok(rsdp_addr)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }

    fn read(mem: &GuestMemoryMmap, addr: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0; len];
        mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
        v
    }

    fn table(mem: &GuestMemoryMmap, addr: u64) -> Vec<u8> {
        let len = u32::from_le_bytes(read(mem, addr + 4, 4).try_into().unwrap());
        read(mem, addr, len as usize)
    }

    #[test]
    fn tables_chain_with_valid_checksums() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let rsdp = write_tables(&mem, 4, 0x600, 9).unwrap();
        let r = read(&mem, rsdp, 36);
        assert_eq!(&r[..8], b"RSD PTR ");
        assert_eq!(sum(&r[..20]), 0);
        assert_eq!(sum(&r), 0);
        let xsdt_addr = u64::from_le_bytes(r[24..32].try_into().unwrap());
        let xsdt = table(&mem, xsdt_addr);
        assert_eq!((&xsdt[..4], sum(&xsdt)), (&b"XSDT"[..], 0));
        let fadt_addr = u64::from_le_bytes(xsdt[36..44].try_into().unwrap());
        let madt_addr = u64::from_le_bytes(xsdt[44..52].try_into().unwrap());
        let fadt = table(&mem, fadt_addr);
        assert_eq!((&fadt[..4], sum(&fadt), fadt.len()), (&b"FACP"[..], 0, 276));
        // Sleep control register is the port block's first byte.
        assert_eq!(fadt[244], 1);
        assert_eq!(u16::from_le_bytes([fadt[248], fadt[249]]), 0x600);
        let dsdt_addr = u64::from_le_bytes(fadt[140..148].try_into().unwrap());
        let dsdt = table(&mem, dsdt_addr);
        assert_eq!((&dsdt[..4], sum(&dsdt)), (&b"DSDT"[..], 0));
        assert!(dsdt.windows(4).any(|w| w == b"_S5_"));
        assert!(dsdt.windows(8).any(|w| w == b"ACPI0013"));
        // The generation ID device, and its address (as a DWord) in ADDR's package.
        assert!(dsdt.windows(8).any(|w| w == b"VMGENCTR"));
        assert!(dsdt.windows(4).any(|w| w == b"ADDR"));
        let mut addr = vec![0x0c]; // DWordPrefix
        addr.extend_from_slice(&(VMGENID_ADDR as u32).to_le_bytes());
        assert!(dsdt.windows(5).any(|w| w == addr.as_slice()));
        write_generation_id(&mem, &[0xab; 16]).unwrap();
        assert_eq!(read(&mem, VMGENID_ADDR, 16), vec![0xab; 16]);
        let madt = table(&mem, madt_addr);
        assert_eq!((&madt[..4], sum(&madt)), (&b"APIC"[..], 0));
        // Four local APIC entries with IDs 0..3.
        let lapics: Vec<u8> = madt[44..]
            .chunks(1)
            .enumerate()
            .filter(|(i, _)| i % 8 == 0 && *i < 32)
            .map(|(i, _)| madt[44 + i + 3])
            .collect();
        assert_eq!(lapics, vec![0, 1, 2, 3]);
    }

    #[test]
    fn the_pci_host_bridge_is_in_the_dsdt_and_ecam_in_the_mcfg() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let rsdp = write_tables(&mem, 1, 0x600, 9).unwrap();
        let xsdt_addr = u64::from_le_bytes(read(&mem, rsdp + 24, 8).try_into().unwrap());
        let xsdt = table(&mem, xsdt_addr);
        assert_eq!(xsdt.len(), 36 + 24);
        let fadt_addr = u64::from_le_bytes(xsdt[36..44].try_into().unwrap());
        let mcfg_addr = u64::from_le_bytes(xsdt[52..60].try_into().unwrap());
        let dsdt_addr = u64::from_le_bytes(read(&mem, fadt_addr + 140, 8).try_into().unwrap());
        let dsdt = table(&mem, dsdt_addr);
        assert_eq!(sum(&dsdt), 0);
        assert!(dsdt.windows(4).any(|w| w == b"PCI0"));
        for name in [b"_SEG", b"_BBN", b"_CRS", b"_CID"] {
            assert!(dsdt.windows(4).any(|w| w == name), "{name:?}");
        }
        // EISA IDs of PNP0A08 and PNP0A03, compressed.
        assert!(dsdt.windows(4).any(|w| w == [0x41, 0xd0, 0x0a, 0x08]));
        assert!(dsdt.windows(4).any(|w| w == [0x41, 0xd0, 0x0a, 0x03]));
        // IO descriptor for 0xCF8..0xCFF: tag 0x47, decode16, min, max, align 1, len 8.
        assert!(
            dsdt.windows(8)
                .any(|w| w == [0x47, 1, 0xf8, 0x0c, 0xf8, 0x0c, 1, 8])
        );
        // DWordMemory window: min and max of the BAR window.
        let mut win = (PCI_MMIO_BASE as u32).to_le_bytes().to_vec();
        win.extend_from_slice(&((PCI_MMIO_BASE + PCI_MMIO_SIZE - 1) as u32).to_le_bytes());
        assert!(dsdt.windows(8).any(|w| w == win));
        let mcfg = table(&mem, mcfg_addr);
        assert_eq!((&mcfg[..4], sum(&mcfg), mcfg.len()), (&b"MCFG"[..], 0, 60));
        assert_eq!(
            u64::from_le_bytes(mcfg[44..52].try_into().unwrap()),
            PCI_ECAM_BASE
        );
        // Segment 0, buses 0..0.
        assert_eq!(&mcfg[52..56], &[0, 0, 0, 0]);
    }

    #[test]
    fn vcpu_count_is_checked() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        assert!(write_tables(&mem, 0, 0x600, 9).is_err());
        assert!(write_tables(&mem, 256, 0x600, 9).is_err());
        assert!(write_tables(&mem, 255, 0x600, 9).is_ok());
    }
}

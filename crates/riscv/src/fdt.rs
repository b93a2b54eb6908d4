//! The flattened device tree handed to the kernel in a1 (QEMU `virt`-like layout).

use vm_fdt::FdtWriter;

use crate::Error;
use crate::clint::{CLINT_BASE, CLINT_SIZE};
use crate::memory::RAM_BASE;
use crate::plic::{PLIC_BASE, PLIC_NDEV, PLIC_SIZE};
use crate::sbi::UART_BASE;

/// ISA string of every hart (Sstc is implemented, so it is advertised).
pub const ISA: &str = "rv64imafdc_zicsr_zifencei_sstc";
/// First virtio-mmio slot; slot i is at VIRTIO_BASE + i * VIRTIO_STRIDE with PLIC source 1+i.
pub const VIRTIO_BASE: u64 = 0x1000_1000;
pub const VIRTIO_STRIDE: u64 = 0x1000;
/// PLIC source of the UART.
pub const UART_IRQ: u32 = 10;
/// Most virtio-mmio slots (sources 1..=8 are below the UART's 10, as on QEMU virt).
pub const MAX_VIRTIO_SLOTS: usize = 8;

pub(crate) struct FdtParams<'a> {
    pub harts: usize,
    pub memory_bytes: u64,
    pub cmdline: &'a str,
    pub initrd: Option<(u64, u64)>,
    pub virtio_slots: usize,
    pub timebase: u64,
}

fn e(err: vm_fdt::Error) -> Error {
    Error::Fdt(err.to_string())
}

pub(crate) fn build(p: &FdtParams) -> Result<Vec<u8>, Error> {
    let mut f = FdtWriter::new().map_err(e)?;
    let intc_phandle = |h: usize| 1 + h as u32;
    let plic_phandle = 100u32;
    let root = f.begin_node("").map_err(e)?;
    f.property_u32("#address-cells", 2).map_err(e)?;
    f.property_u32("#size-cells", 2).map_err(e)?;
    f.property_string("compatible", "vme,riscv-virt")
        .map_err(e)?;
    f.property_string("model", "vme riscv64 software machine")
        .map_err(e)?;

    let chosen = f.begin_node("chosen").map_err(e)?;
    f.property_string("bootargs", p.cmdline).map_err(e)?;
    f.property_string("stdout-path", &format!("/soc/serial@{UART_BASE:x}"))
        .map_err(e)?;
    if let Some((start, end)) = p.initrd {
        f.property_u64("linux,initrd-start", start).map_err(e)?;
        f.property_u64("linux,initrd-end", end).map_err(e)?;
    }
    f.end_node(chosen).map_err(e)?;

    let mem = f.begin_node(&format!("memory@{RAM_BASE:x}")).map_err(e)?;
    f.property_string("device_type", "memory").map_err(e)?;
    f.property_array_u64("reg", &[RAM_BASE, p.memory_bytes])
        .map_err(e)?;
    f.end_node(mem).map_err(e)?;

    let cpus = f.begin_node("cpus").map_err(e)?;
    f.property_u32("#address-cells", 1).map_err(e)?;
    f.property_u32("#size-cells", 0).map_err(e)?;
    f.property_u32("timebase-frequency", p.timebase as u32)
        .map_err(e)?;
    for h in 0..p.harts {
        let cpu = f.begin_node(&format!("cpu@{h}")).map_err(e)?;
        f.property_string("device_type", "cpu").map_err(e)?;
        f.property_u32("reg", h as u32).map_err(e)?;
        f.property_string("status", "okay").map_err(e)?;
        f.property_string("compatible", "riscv").map_err(e)?;
        f.property_string("riscv,isa", ISA).map_err(e)?;
        f.property_string("mmu-type", "riscv,sv48").map_err(e)?;
        let intc = f.begin_node("interrupt-controller").map_err(e)?;
        f.property_u32("#interrupt-cells", 1).map_err(e)?;
        f.property_null("interrupt-controller").map_err(e)?;
        f.property_string("compatible", "riscv,cpu-intc")
            .map_err(e)?;
        f.property_phandle(intc_phandle(h)).map_err(e)?;
        f.end_node(intc).map_err(e)?;
        f.end_node(cpu).map_err(e)?;
    }
    f.end_node(cpus).map_err(e)?;

    let soc = f.begin_node("soc").map_err(e)?;
    f.property_u32("#address-cells", 2).map_err(e)?;
    f.property_u32("#size-cells", 2).map_err(e)?;
    f.property_string("compatible", "simple-bus").map_err(e)?;
    f.property_null("ranges").map_err(e)?;

    let clint = f.begin_node(&format!("clint@{CLINT_BASE:x}")).map_err(e)?;
    f.property_string_list(
        "compatible",
        vec!["sifive,clint0".into(), "riscv,clint0".into()],
    )
    .map_err(e)?;
    f.property_array_u64("reg", &[CLINT_BASE, CLINT_SIZE])
        .map_err(e)?;
    let mut ie = Vec::new();
    for h in 0..p.harts {
        ie.extend_from_slice(&[intc_phandle(h), 3, intc_phandle(h), 7]);
    }
    f.property_array_u32("interrupts-extended", &ie)
        .map_err(e)?;
    f.end_node(clint).map_err(e)?;

    let plic = f.begin_node(&format!("plic@{PLIC_BASE:x}")).map_err(e)?;
    f.property_string_list(
        "compatible",
        vec!["sifive,plic-1.0.0".into(), "riscv,plic0".into()],
    )
    .map_err(e)?;
    f.property_array_u64("reg", &[PLIC_BASE, PLIC_SIZE])
        .map_err(e)?;
    f.property_u32("#interrupt-cells", 1).map_err(e)?;
    f.property_u32("#address-cells", 0).map_err(e)?;
    f.property_null("interrupt-controller").map_err(e)?;
    f.property_u32("riscv,ndev", PLIC_NDEV).map_err(e)?;
    let mut ie = Vec::new();
    for h in 0..p.harts {
        ie.extend_from_slice(&[intc_phandle(h), 11, intc_phandle(h), 9]);
    }
    f.property_array_u32("interrupts-extended", &ie)
        .map_err(e)?;
    f.property_phandle(plic_phandle).map_err(e)?;
    f.end_node(plic).map_err(e)?;

    let uart = f.begin_node(&format!("serial@{UART_BASE:x}")).map_err(e)?;
    f.property_string("compatible", "ns16550a").map_err(e)?;
    f.property_array_u64("reg", &[UART_BASE, 0x100])
        .map_err(e)?;
    f.property_u32("clock-frequency", 3_686_400).map_err(e)?;
    f.property_u32("interrupts", UART_IRQ).map_err(e)?;
    f.property_u32("interrupt-parent", plic_phandle)
        .map_err(e)?;
    f.end_node(uart).map_err(e)?;

    for i in 0..p.virtio_slots {
        let base = VIRTIO_BASE + i as u64 * VIRTIO_STRIDE;
        let v = f.begin_node(&format!("virtio_mmio@{base:x}")).map_err(e)?;
        f.property_string("compatible", "virtio,mmio").map_err(e)?;
        f.property_array_u64("reg", &[base, VIRTIO_STRIDE])
            .map_err(e)?;
        f.property_u32("interrupts", 1 + i as u32).map_err(e)?;
        f.property_u32("interrupt-parent", plic_phandle)
            .map_err(e)?;
        f.end_node(v).map_err(e)?;
    }
    f.end_node(soc).map_err(e)?;
    f.end_node(root).map_err(e)?;
    f.finish().map_err(e)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builds_a_tree_that_dtc_style_checks_accept() {
        let dtb = build(&FdtParams {
            harts: 2,
            memory_bytes: 256 << 20,
            cmdline: "console=ttyS0",
            initrd: Some((0x8800_0000, 0x8810_0000)),
            virtio_slots: 2,
            timebase: 10_000_000,
        })
        .unwrap();
        assert_eq!(&dtb[..4], &[0xd0, 0x0d, 0xfe, 0xed], "FDT magic");
        let s = String::from_utf8_lossy(&dtb);
        for needle in [
            "riscv,plic0",
            "riscv,clint0",
            "ns16550a",
            "virtio,mmio",
            ISA,
            "console=ttyS0",
            "linux,initrd-start",
            "virtio_mmio@10002000",
            "cpu@1",
        ] {
            assert!(s.contains(needle), "missing {needle}");
        }
        assert!(!s.contains("virtio_mmio@10003000"));
    }
}

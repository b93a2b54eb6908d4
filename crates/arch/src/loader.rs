//! Putting a Linux kernel, its initrd and command line into guest memory.
//!
//! Two formats: a bzImage, entered through the 64-bit boot protocol (zero page, e820 table,
//! entry at load address + 0x200), and an ELF `vmlinux` with a PVH note, entered in 32-bit
//! protected mode with EBX pointing at `hvm_start_info`. Anything else is refused before any
//! of it is trusted: files are hostile input.

use crate::ArchError;
use crate::layout::{
    self, CMDLINE_ADDR, CMDLINE_MAX, HIMEM_START, PVH_INFO_ADDR, PVH_MEMMAP_ADDR, PVH_MODLIST_ADDR,
    ZERO_PAGE_ADDR,
};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use linux_loader::loader::{BzImage, Elf, KernelLoader, PvhBootCapability};
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};

const HDRS_MAGIC: u32 = 0x5372_6448; // "HdrS"
/// setup_header.xloadflags: the kernel has the 64-bit entry point at +0x200.
const XLF_KERNEL_64: u16 = 1;
const XEN_HVM_START_MAGIC: u32 = 0x336e_c578;
/// Linux's default initrd ceiling for boot protocols before 2.03.
const DEFAULT_INITRD_ADDR_MAX: u64 = 0x37ff_ffff;

/// How the vCPU must enter the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BootProtocol {
    /// 64-bit long mode at `entry`, RSI = zero page.
    Linux64 { zero_page: u64 },
    /// 32-bit protected mode, paging off, at `entry`, EBX = start info.
    Pvh { start_info: u64 },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KernelBoot {
    pub entry: u64,
    pub protocol: BootProtocol,
}

enum Format {
    BzImage,
    Elf,
}

fn detect(kernel: &mut File) -> Result<Format, ArchError> {
    let mut magic = [0u8; 4];
    let io = |e| ArchError::KernelRead(e);
    kernel.seek(SeekFrom::Start(0)).map_err(io)?;
    if kernel.read_exact(&mut magic).is_ok() && magic == *b"\x7fELF" {
        return Ok(Format::Elf);
    }
    kernel.seek(SeekFrom::Start(0x202)).map_err(io)?;
    if kernel.read_exact(&mut magic).is_ok() && u32::from_le_bytes(magic) == HDRS_MAGIC {
        return Ok(Format::BzImage);
    }
    Err(ArchError::NotAKernel(
        "neither the ELF magic nor the bzImage \"HdrS\" header was found".into(),
    ))
}

/// Loads `kernel` (and `initrd`) into `mem` for a guest of `mem_size` bytes and writes the
/// boot parameters. `rsdp` is where the ACPI tables start, if the machine has them.
pub fn load_kernel(
    mem: &GuestMemoryMmap,
    mem_size: u64,
    kernel: &mut File,
    initrd: Option<&mut File>,
    cmdline: &str,
    rsdp: Option<u64>,
) -> Result<KernelBoot, ArchError> {
    match detect(kernel)? {
        Format::BzImage => load_bzimage(mem, mem_size, kernel, initrd, cmdline, rsdp),
        Format::Elf => load_pvh(mem, mem_size, kernel, initrd, cmdline, rsdp),
    }
}

fn write_cmdline(mem: &GuestMemoryMmap, cmdline: &str, max: usize) -> Result<u32, ArchError> {
    if cmdline.len() >= max || cmdline.contains('\0') {
        return Err(ArchError::Cmdline(format!(
            "the kernel command line is {} bytes; this kernel accepts at most {} (and no NUL): shorten it",
            cmdline.len(),
            max.saturating_sub(1)
        )));
    }
    let mut bytes = cmdline.as_bytes().to_vec();
    bytes.push(0);
    mem.write_slice(&bytes, GuestAddress(CMDLINE_ADDR))
        .map_err(|e| ArchError::Memory(format!("writing the command line: {e}")))?;
    Ok(cmdline.len() as u32)
}

/// Reads the initrd into the highest page-aligned spot below `ceiling` that stays above
/// `floor`. Returns (address, size).
fn load_initrd(
    mem: &GuestMemoryMmap,
    initrd: &mut File,
    floor: u64,
    ceiling: u64,
) -> Result<(u64, u64), ArchError> {
    let size = initrd
        .seek(SeekFrom::End(0))
        .and_then(|s| initrd.seek(SeekFrom::Start(0)).map(|_| s))
        .map_err(ArchError::InitrdRead)?;
    let too_large = || ArchError::InitrdTooLarge {
        size,
        available: ceiling.saturating_sub(floor),
    };
    let addr = ceiling.checked_sub(size).ok_or_else(too_large)? & !0xfff;
    if addr < floor {
        return Err(too_large());
    }
    let len = usize::try_from(size).map_err(|_| too_large())?;
    mem.read_exact_volatile_from(GuestAddress(addr), initrd, len)
        .map_err(|e| ArchError::Memory(format!("reading the initrd into guest memory: {e}")))?;
    Ok((addr, size))
}

fn load_bzimage(
    mem: &GuestMemoryMmap,
    mem_size: u64,
    kernel: &mut File,
    initrd: Option<&mut File>,
    cmdline: &str,
    rsdp: Option<u64>,
) -> Result<KernelBoot, ArchError> {
    let loaded = BzImage::load(mem, None, kernel, Some(GuestAddress(HIMEM_START)))
        .map_err(|e| ArchError::NotAKernel(format!("bzImage refused: {e}")))?;
    let Some(mut hdr) = loaded.setup_header else {
        return Err(ArchError::NotAKernel(
            "bzImage without a setup header".into(),
        ));
    };
    let version = hdr.version;
    if version < 0x020c || hdr.xloadflags & XLF_KERNEL_64 == 0 {
        return Err(ArchError::NotAKernel(format!(
            "this bzImage (boot protocol {:#x}) has no 64-bit entry point: use a 64-bit kernel built with boot protocol 2.12 or later",
            version
        )));
    }
    let kernel_load = loaded.kernel_load.raw_value();
    let max_cmdline = if hdr.cmdline_size > 0 {
        (hdr.cmdline_size as usize + 1).min(64 * 1024)
    } else {
        CMDLINE_MAX
    };
    let cmdline_len = write_cmdline(mem, cmdline, max_cmdline)?;
    hdr.type_of_loader = 0xff;
    hdr.cmd_line_ptr = CMDLINE_ADDR as u32;
    hdr.cmdline_size = cmdline_len;
    if let Some(initrd) = initrd {
        let max = if hdr.initrd_addr_max != 0 {
            u64::from(hdr.initrd_addr_max)
        } else {
            DEFAULT_INITRD_ADDR_MAX
        };
        // The decompressor uses [load, load + init_size): the initrd must stay clear of it.
        let floor = kernel_load + u64::from(hdr.init_size).max(loaded.kernel_end - kernel_load);
        let ceiling = layout::low_ram_end(mem_size).min(max.saturating_add(1));
        let (addr, size) = load_initrd(mem, initrd, floor, ceiling)?;
        hdr.ramdisk_image = addr as u32;
        hdr.ramdisk_size = size as u32;
    }
    let mut params = boot_params {
        hdr,
        ..Default::default()
    };
    if let Some(rsdp) = rsdp {
        params.acpi_rsdp_addr = rsdp;
    }
    let map = layout::e820_map(mem_size);
    if map.len() > params.e820_table.len() {
        return Err(ArchError::Memory("too many e820 entries".into()));
    }
    for (slot, e) in params.e820_table.iter_mut().zip(&map) {
        *slot = boot_e820_entry {
            addr: e.addr,
            size: e.size,
            r#type: e.kind as u32,
        };
    }
    params.e820_entries = map.len() as u8;
    mem.write_obj(params, GuestAddress(ZERO_PAGE_ADDR))
        .map_err(|e| ArchError::Memory(format!("writing the zero page: {e}")))?;
    Ok(KernelBoot {
        entry: kernel_load + 0x200,
        protocol: BootProtocol::Linux64 {
            zero_page: ZERO_PAGE_ADDR,
        },
    })
}

fn load_pvh(
    mem: &GuestMemoryMmap,
    mem_size: u64,
    kernel: &mut File,
    initrd: Option<&mut File>,
    cmdline: &str,
    rsdp: Option<u64>,
) -> Result<KernelBoot, ArchError> {
    let loaded = Elf::load(mem, None, kernel, Some(GuestAddress(HIMEM_START))).map_err(|e| {
        ArchError::NotAKernel(format!("ELF image refused ({e}); is it an x86_64 vmlinux?"))
    })?;
    let PvhBootCapability::PvhEntryPresent(entry) = loaded.pvh_boot_cap else {
        return Err(ArchError::NotAKernel(
            "this ELF vmlinux has no PVH entry note: build it with CONFIG_PVH=y, or boot its bzImage".into(),
        ));
    };
    write_cmdline(mem, cmdline, CMDLINE_MAX)?;
    let mut info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC,
        version: 1,
        cmdline_paddr: CMDLINE_ADDR,
        rsdp_paddr: rsdp.unwrap_or(0),
        memmap_paddr: PVH_MEMMAP_ADDR,
        ..Default::default()
    };
    if let Some(initrd) = initrd {
        let floor = loaded.kernel_end;
        let ceiling = layout::low_ram_end(mem_size);
        let (addr, size) = load_initrd(mem, initrd, floor, ceiling)?;
        let module = hvm_modlist_entry {
            paddr: addr,
            size,
            ..Default::default()
        };
        mem.write_obj(module, GuestAddress(PVH_MODLIST_ADDR))
            .map_err(|e| ArchError::Memory(format!("writing the PVH module list: {e}")))?;
        info.nr_modules = 1;
        info.modlist_paddr = PVH_MODLIST_ADDR;
    }
    let map = layout::e820_map(mem_size);
    for (i, e) in map.iter().enumerate() {
        let entry = hvm_memmap_table_entry {
            addr: e.addr,
            size: e.size,
            type_: e.kind as u32,
            reserved: 0,
        };
        let at = PVH_MEMMAP_ADDR + (i * std::mem::size_of::<hvm_memmap_table_entry>()) as u64;
        mem.write_obj(entry, GuestAddress(at))
            .map_err(|e| ArchError::Memory(format!("writing the PVH memory map: {e}")))?;
    }
    info.memmap_entries = map.len() as u32;
    mem.write_obj(info, GuestAddress(PVH_INFO_ADDR))
        .map_err(|e| ArchError::Memory(format!("writing the PVH start info: {e}")))?;
    Ok(KernelBoot {
        entry: entry.raw_value(),
        protocol: BootProtocol::Pvh {
            start_info: PVH_INFO_ADDR,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn memory() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 64 << 20)]).unwrap()
    }

    fn temp_file(name: &str, bytes: &[u8]) -> File {
        let path = std::env::temp_dir().join(format!("vme-arch-{}-{name}", std::process::id()));
        let mut f = File::create(&path).unwrap();
        f.write_all(bytes).unwrap();
        let f = File::open(&path).unwrap();
        let _ = std::fs::remove_file(&path);
        f
    }

    #[test]
    fn random_file_is_not_a_kernel() {
        // A deterministic pseudo-random 1 MiB file.
        let mut x = 0x1234_5678u32;
        let bytes: Vec<u8> = (0..1 << 20)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                x as u8
            })
            .collect();
        let mut f = temp_file("random", &bytes);
        let err = load_kernel(&memory(), 64 << 20, &mut f, None, "", None).unwrap_err();
        assert!(err.to_string().contains("not a Linux kernel"), "{err}");
    }

    #[test]
    fn truncated_headers_are_refused() {
        let mut elf = temp_file("elf", b"\x7fELF\x02\x01\x01");
        assert!(load_kernel(&memory(), 64 << 20, &mut elf, None, "", None).is_err());
        let mut bz = vec![0u8; 0x210];
        bz[0x202..0x206].copy_from_slice(b"HdrS");
        let mut bz = temp_file("bz", &bz);
        let err = load_kernel(&memory(), 64 << 20, &mut bz, None, "", None).unwrap_err();
        assert!(err.to_string().contains("not a Linux kernel"), "{err}");
        let mut empty = temp_file("empty", b"");
        assert!(load_kernel(&memory(), 64 << 20, &mut empty, None, "", None).is_err());
    }

    #[test]
    fn initrd_goes_high_and_too_large_names_sizes() {
        let mem = memory();
        let mut small = temp_file("initrd", &[7u8; 5000]);
        let (addr, size) = load_initrd(&mem, &mut small, 0x200_0000, 64 << 20).unwrap();
        assert_eq!(size, 5000);
        assert_eq!(addr % 4096, 0);
        assert!(addr + size <= 64 << 20 && addr >= (64 << 20) - 8192);
        let mut big = temp_file("big", &vec![0u8; 3 << 20]);
        let err = load_initrd(&mem, &mut big, 62 << 20, 64 << 20).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("3145728") && msg.contains("2097152"), "{msg}");
    }

    #[test]
    fn overlong_cmdline_is_refused() {
        let long = "x".repeat(CMDLINE_MAX);
        assert!(write_cmdline(&memory(), &long, CMDLINE_MAX).is_err());
        assert_eq!(
            write_cmdline(&memory(), "console=ttyS0", CMDLINE_MAX).unwrap(),
            13
        );
    }
}

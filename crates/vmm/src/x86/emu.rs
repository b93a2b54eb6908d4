//! The emulator's view of a vCPU and guest memory: registers read once from KVM per
//! completion and written back after, and guest RAM through vm-memory with every access
//! bounds-checked (MMIO and holes are refused, never touched).

use super::dirty::DirtyPages;
use std::sync::atomic::{AtomicU64, Ordering};
use vm_memory::{
    Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
    MemoryRegionAddress,
};
use vme_emulator::{CpuState, Gpr, GuestPhysMemory, MemError, Seg, Segment};
use vme_hypervisor::{kvm_regs, kvm_segment, kvm_sregs};

pub struct KvmCpu {
    pub id: u32,
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
}

fn to_segment(s: &kvm_segment) -> Segment {
    Segment {
        base: s.base,
        limit: s.limit,
        selector: s.selector,
        type_: s.type_,
        s: s.s != 0,
        dpl: s.dpl,
        present: s.present != 0,
        db: s.db != 0,
        long: s.l != 0,
        g: s.g != 0,
        unusable: s.unusable != 0,
    }
}

impl CpuState for KvmCpu {
    fn vcpu_index(&self) -> u32 {
        self.id
    }

    fn gpr(&self, r: Gpr) -> u64 {
        let g = &self.regs;
        match r {
            Gpr::Rax => g.rax,
            Gpr::Rcx => g.rcx,
            Gpr::Rdx => g.rdx,
            Gpr::Rbx => g.rbx,
            Gpr::Rsp => g.rsp,
            Gpr::Rbp => g.rbp,
            Gpr::Rsi => g.rsi,
            Gpr::Rdi => g.rdi,
            Gpr::R8 => g.r8,
            Gpr::R9 => g.r9,
            Gpr::R10 => g.r10,
            Gpr::R11 => g.r11,
            Gpr::R12 => g.r12,
            Gpr::R13 => g.r13,
            Gpr::R14 => g.r14,
            Gpr::R15 => g.r15,
        }
    }

    fn set_gpr(&mut self, r: Gpr, v: u64) {
        let g = &mut self.regs;
        let slot = match r {
            Gpr::Rax => &mut g.rax,
            Gpr::Rcx => &mut g.rcx,
            Gpr::Rdx => &mut g.rdx,
            Gpr::Rbx => &mut g.rbx,
            Gpr::Rsp => &mut g.rsp,
            Gpr::Rbp => &mut g.rbp,
            Gpr::Rsi => &mut g.rsi,
            Gpr::Rdi => &mut g.rdi,
            Gpr::R8 => &mut g.r8,
            Gpr::R9 => &mut g.r9,
            Gpr::R10 => &mut g.r10,
            Gpr::R11 => &mut g.r11,
            Gpr::R12 => &mut g.r12,
            Gpr::R13 => &mut g.r13,
            Gpr::R14 => &mut g.r14,
            Gpr::R15 => &mut g.r15,
        };
        *slot = v;
    }

    fn rip(&self) -> u64 {
        self.regs.rip
    }
    fn set_rip(&mut self, v: u64) {
        self.regs.rip = v;
    }
    fn rflags(&self) -> u64 {
        self.regs.rflags
    }
    fn set_rflags(&mut self, v: u64) {
        self.regs.rflags = v;
    }
    fn cr0(&self) -> u64 {
        self.sregs.cr0
    }
    fn cr3(&self) -> u64 {
        self.sregs.cr3
    }
    fn cr4(&self) -> u64 {
        self.sregs.cr4
    }
    fn efer(&self) -> u64 {
        self.sregs.efer
    }
    fn cpl(&self) -> u8 {
        self.sregs.ss.dpl
    }
    fn segment(&self, s: Seg) -> Segment {
        let k = &self.sregs;
        to_segment(match s {
            Seg::Es => &k.es,
            Seg::Cs => &k.cs,
            Seg::Ss => &k.ss,
            Seg::Ds => &k.ds,
            Seg::Fs => &k.fs,
            Seg::Gs => &k.gs,
        })
    }
}

/// Guest RAM for the emulator, and the log its writes go into (for diff snapshots).
pub struct GuestRam<'a>(pub &'a GuestMemoryMmap, pub &'a DirtyPages);

impl GuestRam<'_> {
    /// The host address of `[gpa, gpa+len)` if it lies inside one RAM region.
    fn host_range(&self, gpa: u64, len: usize) -> Result<*mut u8, MemError> {
        let not_ram = MemError::NotRam { gpa, len };
        let region = self
            .0
            .find_region(GuestAddress(gpa))
            .ok_or(not_ram.clone())?;
        let offset = gpa - region.start_addr().0;
        let end = offset.checked_add(len as u64).ok_or(not_ram.clone())?;
        if end > region.len() {
            return Err(not_ram);
        }
        region
            .get_host_address(MemoryRegionAddress(offset))
            .map_err(|_| not_ram)
    }
}

impl GuestPhysMemory for GuestRam<'_> {
    fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), MemError> {
        let len = buf.len();
        self.0
            .read_slice(buf, GuestAddress(gpa))
            .map_err(|_| MemError::NotRam { gpa, len })
    }

    fn write(&mut self, gpa: u64, buf: &[u8]) -> Result<(), MemError> {
        self.1.mark(gpa, buf.len() as u64);
        self.0
            .write_slice(buf, GuestAddress(gpa))
            .map_err(|_| MemError::NotRam {
                gpa,
                len: buf.len(),
            })
    }

    fn compare_exchange_u64(&mut self, gpa: u64, expected: u64, new: u64) -> Result<u64, MemError> {
        if gpa % 8 != 0 {
            return Err(MemError::Unaligned { gpa, len: 8 });
        }
        let ptr = self.host_range(gpa, 8)?.cast::<u64>();
        self.1.mark(gpa, 8);
        // SAFETY: `ptr` points at 8 bytes inside a live guest RAM mapping (checked by
        // host_range), 8-aligned (gpa is 8-aligned and regions are page-aligned); guest memory
        // is shared with vCPUs that access it concurrently, which is why this is atomic.
        let cell = unsafe { AtomicU64::from_ptr(ptr) };
        Ok(
            match cell.compare_exchange(expected, new, Ordering::SeqCst, Ordering::SeqCst) {
                Ok(v) | Err(v) => v,
            },
        )
    }

    fn compare_exchange_u128(
        &mut self,
        gpa: u64,
        expected: u128,
        new: u128,
    ) -> Result<u128, MemError> {
        if gpa % 16 != 0 {
            return Err(MemError::Unaligned { gpa, len: 16 });
        }
        let ptr = self.host_range(gpa, 16)?;
        self.1.mark(gpa, 16);
        let (mut lo, mut hi) = (expected as u64, (expected >> 64) as u64);
        // SAFETY: `ptr` addresses 16 bytes of live guest RAM, 16-aligned (checked above), so
        // `lock cmpxchg16b` on it is defined (the host has CX16: x86-64 hosts running KVM do).
        // RBX is reserved by the compiler, so the new low half is swapped into it and back.
        unsafe {
            std::arch::asm!(
                "xchg {nlo}, rbx",
                "lock cmpxchg16b xmmword ptr [{ptr}]",
                "xchg {nlo}, rbx",
                ptr = in(reg) ptr,
                nlo = inout(reg) new as u64 => _,
                inout("rax") lo,
                inout("rdx") hi,
                in("rcx") (new >> 64) as u64,
                options(nostack),
            );
        }
        Ok((u128::from(hi) << 64) | u128::from(lo))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ram() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x2000), (GuestAddress(0x10000), 0x1000)])
            .unwrap()
    }

    #[test]
    fn accesses_outside_ram_are_refused() {
        let mem = ram();
        let dirty = DirtyPages::new(&mem);
        let mut r = GuestRam(&mem, &dirty);
        let mut b = [0u8; 8];
        assert!(r.read(0x1ffc, &mut b).is_err(), "straddles the end of RAM");
        assert!(r.read(u64::MAX - 2, &mut b).is_err());
        assert!(r.write(0x5000, &b).is_err(), "hole");
        assert!(r.compare_exchange_u64(0x1ffc, 0, 1).is_err());
        assert!(r.compare_exchange_u64(0x3000, 0, 1).is_err());
        assert!(r.compare_exchange_u128(0x10ff8, 0, 1).is_err());
        assert!(r.compare_exchange_u128(0x10008, 0, 1).is_err(), "unaligned");
        dirty.enable();
        r.write(0x10010, &7u64.to_le_bytes()).unwrap();
        r.read(0x10010, &mut b).unwrap();
        assert_eq!(u64::from_le_bytes(b), 7);
        assert_eq!(dirty.harvest(&[]), vec![(2, 1)], "the write is logged");
    }

    #[test]
    fn compare_exchange_is_real() {
        let mem = ram();
        let dirty = DirtyPages::new(&mem);
        let mut r = GuestRam(&mem, &dirty);
        assert_eq!(r.compare_exchange_u64(0x100, 0, 5).unwrap(), 0);
        assert_eq!(
            r.compare_exchange_u64(0x100, 0, 9).unwrap(),
            5,
            "fails, reports 5"
        );
        let big = (3u128 << 64) | 4;
        assert_eq!(r.compare_exchange_u128(0x200, 0, big).unwrap(), 0);
        assert_eq!(r.compare_exchange_u128(0x200, 1, 0).unwrap(), big);
        assert_eq!(r.compare_exchange_u128(0x200, big, 1).unwrap(), big);
        let mut b = [0u8; 16];
        r.read(0x200, &mut b).unwrap();
        assert_eq!(u128::from_le_bytes(b), 1);
    }
}

//! The x86_64 machine as a migration source: RAM as the memory file lays it out (below the
//! PCI hole, then above 4 GiB), KVM's dirty-page log joined with the monitor's own, and the
//! sections a full snapshot writes.

use super::send::{SendPages, Source};
use crate::snapshot::x86::{ARCH, X86Snapshotter};
use crate::x86::ram;
use std::sync::{Arc, Mutex};
use vm_memory::GuestMemoryMmap;
use vme_hypervisor::Vm;

pub struct X86Source<'a> {
    s: &'a X86Snapshotter,
    vm: Arc<Vm>,
    mem: GuestMemoryMmap,
    /// Every run harvested, for [`Source::give_back`].
    kept: Mutex<Vec<(u64, u64)>>,
}

impl<'a> X86Source<'a> {
    pub fn new(s: &'a X86Snapshotter) -> Result<X86Source<'a>, String> {
        let gone = "the VM has stopped: there is nothing to migrate";
        let vm = s.vm.upgrade().ok_or(gone)?;
        let mem = vm.memory().ok_or(gone)?.clone();
        Ok(X86Source {
            s,
            vm,
            mem,
            kept: Mutex::new(Vec::new()),
        })
    }
}

impl Source for X86Source<'_> {
    fn arch(&self) -> &'static str {
        ARCH
    }

    fn ram_bytes(&self) -> u64 {
        self.s.spec.memory.bytes()
    }

    fn read(&self, off: u64, buf: &mut [u8]) -> Result<(), String> {
        ram::read_at(&self.mem, off, buf)
    }

    fn harvest(&self) -> Result<Vec<(u64, u64)>, String> {
        let runs = self.s.harvest_dirty(&self.vm)?;
        self.kept
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend_from_slice(&runs);
        Ok(runs)
    }

    fn give_back(&self) {
        self.s
            .dirty
            .remark(&self.kept.lock().unwrap_or_else(|p| p.into_inner()));
    }

    fn stop_and_copy(&self, last_pages: &mut SendPages<'_>) -> Result<Vec<u8>, String> {
        self.s.with_sections(|w, _, _| {
            last_pages(&self.harvest()?)?;
            w.encode().map_err(|e| e.to_string())
        })
    }
}

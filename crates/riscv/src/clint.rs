//! CLINT (SiFive layout, as on QEMU `virt` at 0x0200_0000): msip per hart at 0x0,
//! mtimecmp per hart at 0x4000, mtime at 0xbff8. mtime is the guest clock and is read-only
//! here (writes are ignored: the clock follows host time and stops while paused).

use std::sync::Weak;
use std::sync::atomic::Ordering;

use crate::csr::MIP_MSIP;
use crate::memory::MmioDevice;
use crate::shared::Shared;

pub const CLINT_BASE: u64 = 0x0200_0000;
pub const CLINT_SIZE: u64 = 0x1_0000;
const MTIMECMP: u64 = 0x4000;
const MTIME: u64 = 0xbff8;

pub(crate) struct Clint {
    shared: Weak<Shared>,
}

impl Clint {
    pub fn new(shared: Weak<Shared>) -> Self {
        Self { shared }
    }
}

fn get(data: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    b[..data.len()].copy_from_slice(data);
    u64::from_le_bytes(b)
}

impl MmioDevice for Clint {
    fn read(&self, offset: u64, data: &mut [u8]) {
        let Some(s) = self.shared.upgrade() else {
            return data.fill(0);
        };
        let harts = s.links.len() as u64;
        let (base_off, v) = if offset < 4 * harts {
            let h = (offset / 4) as usize;
            (
                offset & !3,
                (s.links[h].ext_mip.load(Ordering::Relaxed) & MIP_MSIP != 0) as u64,
            )
        } else if (MTIMECMP..MTIMECMP + 8 * harts).contains(&offset) {
            let h = ((offset - MTIMECMP) / 8) as usize;
            (offset & !7, s.links[h].mtimecmp.load(Ordering::Relaxed))
        } else if (MTIME..MTIME + 8).contains(&offset) {
            (MTIME, s.clock.ticks())
        } else {
            (offset, 0)
        };
        let shift = (offset - base_off) * 8;
        let v = if shift >= 64 { 0 } else { v >> shift };
        data.copy_from_slice(&v.to_le_bytes()[..data.len()]);
    }

    fn write(&self, offset: u64, data: &[u8]) {
        let Some(s) = self.shared.upgrade() else {
            return;
        };
        let harts = s.links.len() as u64;
        let v = get(data);
        if offset < 4 * harts && offset & 3 == 0 {
            s.set_ext_mip((offset / 4) as usize, MIP_MSIP, v & 1 != 0);
        } else if (MTIMECMP..MTIMECMP + 8 * harts).contains(&offset) {
            let h = ((offset - MTIMECMP) / 8) as usize;
            let link = &s.links[h];
            let within = offset & 7;
            if data.len() == 8 && within == 0 {
                link.mtimecmp.store(v, Ordering::SeqCst);
            } else if data.len() == 4 && (within == 0 || within == 4) {
                let sh = within * 8;
                let old = link.mtimecmp.load(Ordering::SeqCst);
                link.mtimecmp
                    .store((old & !(0xffff_ffff << sh)) | (v << sh), Ordering::SeqCst);
            }
            s.kick(h);
        }
    }
}

//! One hart: architectural state, traps and interrupts, and the run loop that alternates
//! between polling (interrupts, pause, remote requests, WFI) and executing slices of
//! instructions from the decode cache.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use crate::ExitReason;
use crate::counters::{Counters, Ev};
use crate::csr::*;
use crate::icache::ICache;
use crate::memory::Bus;
use crate::mmu::Tlb;
use crate::shared::{
    HSM_START_PENDING, HSM_STARTED, HSM_STOPPED, REQ_DROP_WRITES, REQ_FENCE_I, REQ_SFENCE, Shared,
    lock,
};

/// Privilege levels.
pub const PRV_U: u8 = 0;
/// Supervisor.
pub const PRV_S: u8 = 1;
/// Machine.
pub const PRV_M: u8 = 3;

/// Exception causes.
pub mod cause {
    pub const FETCH_ACCESS: u64 = 1;
    pub const ILLEGAL_INSN: u64 = 2;
    pub const BREAKPOINT: u64 = 3;
    pub const MISALIGNED_LOAD: u64 = 4;
    pub const LOAD_ACCESS: u64 = 5;
    pub const MISALIGNED_STORE: u64 = 6;
    pub const STORE_ACCESS: u64 = 7;
    pub const ECALL_U: u64 = 8;
    pub const ECALL_S: u64 = 9;
    pub const ECALL_M: u64 = 11;
    pub const FETCH_PAGE: u64 = 12;
    pub const LOAD_PAGE: u64 = 13;
    pub const STORE_PAGE: u64 = 15;
    /// Set in mcause/scause for interrupts.
    pub const INTERRUPT: u64 = 1 << 63;
}

/// A synchronous exception about to be taken.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Trap {
    pub cause: u64,
    pub tval: u64,
}

impl Trap {
    pub fn new(cause: u64, tval: u64) -> Self {
        Self { cause, tval }
    }
    pub fn illegal(bits: u64) -> Self {
        Self {
            cause: cause::ILLEGAL_INSN,
            tval: bits,
        }
    }
}

/// Instructions per slice between polls (interrupt latency vs polling overhead).
const SLICE: u32 = 2048;

/// Architectural state of one hart, in plain fields so it can be inspected and serialized.
pub struct Hart {
    /// x0..x31, then x32 = sink for writes to x0 (see `decode`), padded to 64 so register
    /// indexes masked with 63 need no bounds check.
    pub x: [u64; 64],
    pub f: [u64; 32],
    pub pc: u64,
    pub prv: u8,
    pub csr: Csrs,
    pub hartid: usize,
    pub instret: u64,
    /// WFI executed, waiting for an interrupt.
    pub wfi: bool,
    /// LR reservation: physical address (u64::MAX = none), loaded value, size.
    pub(crate) resv_addr: u64,
    pub(crate) resv_val: u64,
    pub(crate) shared: Arc<Shared>,
    /// Copy of the machine's MMIO bus (fixed once running), so MMIO needs no lock.
    pub(crate) bus: Bus,
    pub(crate) tlb: Tlb,
    pub(crate) icache: ICache,
    pub(crate) code_epoch: u64,
    /// End the current slice after this instruction (CSR/interrupt state changed).
    pub(crate) break_slice: bool,
    /// Machine must stop (set when an unrecoverable guest condition ends the run).
    pub(crate) halted: bool,
    /// Debug event counters (see `counters`).
    pub(crate) counters: Counters,
}

impl Hart {
    pub(crate) fn new(shared: Arc<Shared>, hartid: usize) -> Self {
        Self {
            x: [0; 64],
            f: [0; 32],
            pc: crate::memory::RAM_BASE,
            prv: PRV_M,
            csr: Csrs::new(hartid),
            hartid,
            instret: 0,
            wfi: false,
            resv_addr: u64::MAX,
            resv_val: 0,
            bus: Bus::default(),
            shared,
            tlb: Tlb::new(),
            icache: ICache::new(),
            code_epoch: 0,
            break_slice: false,
            halted: false,
            counters: Counters::new(),
        }
    }

    /// Changes privilege level; translation contexts depend on it.
    pub(crate) fn set_prv(&mut self, prv: u8) {
        self.prv = prv;
        self.icache.forget_fetch();
        self.update_data_ctx();
    }

    /// Takes an exception or interrupt (`cause` has bit 63 for interrupts).
    pub(crate) fn take_trap(&mut self, cause: u64, tval: u64) {
        self.counters.trap(cause);
        let is_int = cause & cause::INTERRUPT != 0;
        let code = cause & 63;
        let deleg = if is_int {
            self.csr.mideleg
        } else {
            self.csr.medeleg
        };
        self.resv_addr = u64::MAX;
        self.wfi = false;
        self.break_slice = true;
        if self.prv <= PRV_S && (deleg >> code) & 1 != 0 {
            self.csr.scause = cause;
            self.csr.sepc = self.pc;
            self.csr.stval = tval;
            let s = self.csr.mstatus;
            let sie = (s >> 1) & 1;
            let mut n = s & !(MSTATUS_SPIE | MSTATUS_SIE | MSTATUS_SPP);
            n |= sie << 5;
            if self.prv == PRV_S {
                n |= MSTATUS_SPP;
            }
            self.csr.mstatus = n;
            let base = self.csr.stvec & !3;
            self.pc = if is_int && self.csr.stvec & 1 == 1 {
                base + 4 * code
            } else {
                base
            };
            self.set_prv(PRV_S);
        } else {
            if self.shared.firmware.load(Ordering::Relaxed) {
                // No M-mode firmware exists in a firmware-less boot: an M-mode trap means the
                // guest did something the monitor's SBI does not cover.
                self.shared.finish(ExitReason::Fault(format!(
                    "hart {} took a trap to M-mode (cause {cause:#x}, tval {tval:#x}) at pc {:#x} in \
                     privilege {}; the monitor's built-in SBI has no handler for it",
                    self.hartid, self.pc, self.prv
                )));
                self.halted = true;
                return;
            }
            self.csr.mcause = cause;
            self.csr.mepc = self.pc;
            self.csr.mtval = tval;
            let s = self.csr.mstatus;
            let mie = (s >> 3) & 1;
            let mut n = s & !(MSTATUS_MPIE | MSTATUS_MIE | MSTATUS_MPP);
            n |= mie << 7;
            n |= (self.prv as u64) << 11;
            self.csr.mstatus = n;
            let base = self.csr.mtvec & !3;
            self.pc = if is_int && self.csr.mtvec & 1 == 1 {
                base + 4 * code
            } else {
                base
            };
            self.set_prv(PRV_M);
        }
    }

    pub(crate) fn raise(&mut self, t: Trap) {
        self.take_trap(t.cause, t.tval);
    }

    /// mip as the guest sees it: software bits, device lines, and timer comparisons.
    pub(crate) fn mip(&self) -> u64 {
        let link = &self.shared.links[self.hartid];
        let mut mip = self.csr.mip | link.ext_mip.load(Ordering::Relaxed);
        let now = self.shared.clock.ticks();
        if now >= link.mtimecmp.load(Ordering::Relaxed) {
            mip |= MIP_MTIP;
        }
        if self.csr.menvcfg & MENVCFG_STCE != 0 {
            mip &= !MIP_STIP;
            if now >= self.csr.stimecmp {
                mip |= MIP_STIP;
            }
        }
        mip
    }

    /// The interrupt to take now, if any (priority order of the privileged spec).
    pub(crate) fn pending_interrupt(&self, mip: u64) -> Option<u64> {
        let pending = mip & self.csr.mie;
        if pending == 0 {
            return None;
        }
        let m_enabled = self.prv < PRV_M || self.csr.mstatus & MSTATUS_MIE != 0;
        let s_enabled =
            self.prv < PRV_S || (self.prv == PRV_S && self.csr.mstatus & MSTATUS_SIE != 0);
        let m = if m_enabled {
            pending & !self.csr.mideleg
        } else {
            0
        };
        let s = if s_enabled {
            pending & self.csr.mideleg
        } else {
            0
        };
        for set in [m, s] {
            if set == 0 {
                continue;
            }
            for bit in [11u64, 3, 7, 9, 1, 5] {
                if set & (1 << bit) != 0 {
                    return Some(bit);
                }
            }
        }
        None
    }

    fn handle_requests(&mut self) {
        let req = self.shared.links[self.hartid]
            .requests
            .load(Ordering::SeqCst);
        self.apply_requests(req);
        if req != 0 {
            self.shared.links[self.hartid]
                .requests
                .fetch_and(!req, Ordering::SeqCst);
        }
    }

    /// Does what REQ_* bits `req` ask (the caller clears them afterwards).
    pub(crate) fn apply_requests(&mut self, req: u32) {
        if req & REQ_FENCE_I != 0 {
            self.icache.flush();
        }
        if req & REQ_SFENCE != 0 {
            self.flush_tlb();
        }
        if req & REQ_DROP_WRITES != 0 {
            self.drop_write_entries();
        }
    }

    /// Drops decoded pages whose physical page was written since they were decoded.
    fn check_code_epoch(&mut self) {
        let e = self.shared.code_epoch.load(Ordering::Acquire);
        if e != self.code_epoch {
            self.code_epoch = e;
            self.counters.bump(Ev::Revalidations);
            self.icache.revalidate(&self.shared.code_pages);
        }
    }

    /// Starts this hart as SBI hart_start asked: S-mode, MMU off, a0 = hartid, a1 = opaque.
    fn hsm_enter(&mut self) {
        let (addr, opaque) = *lock(&self.shared.links[self.hartid].start);
        self.x[10] = self.hartid as u64;
        self.x[11] = opaque;
        self.pc = addr;
        self.csr.satp = 0;
        self.csr.mstatus &= !(MSTATUS_SIE | MSTATUS_MIE);
        self.set_prv(PRV_S);
        self.flush_tlb();
        self.icache.flush();
        self.wfi = false;
        self.shared.links[self.hartid]
            .hsm
            .store(HSM_STARTED, Ordering::SeqCst);
    }

    /// Blocks while paused or HSM-stopped, and in WFI until an interrupt is pending.
    /// Returns false when the machine stops.
    fn poll(&mut self) -> bool {
        let shared = Arc::clone(&self.shared);
        let link = &shared.links[self.hartid];
        loop {
            if self.halted {
                return false;
            }
            if link.attention.swap(false, Ordering::SeqCst) {
                self.handle_requests();
                let mut c = lock(&shared.control);
                if c.stop {
                    return false;
                }
                if c.paused {
                    // Published for snapshots while parked, under the control lock, so a
                    // reader that sees every hart parked sees every state.
                    *lock(&link.parked_state) = Some(self.save());
                    c.parked += 1;
                    shared.cv.notify_all();
                    while c.paused && !c.stop {
                        c = shared.cv.wait(c).unwrap_or_else(|e| e.into_inner());
                    }
                    c.parked -= 1;
                    *lock(&link.parked_state) = None;
                    link.attention.store(true, Ordering::SeqCst);
                    continue;
                }
                drop(c);
                let set = link.set_mip.swap(0, Ordering::SeqCst);
                self.csr.mip |= set;
            }
            self.check_code_epoch();
            match link.hsm.load(Ordering::SeqCst) {
                HSM_STARTED => {}
                HSM_START_PENDING => {
                    self.hsm_enter();
                    continue;
                }
                _ => {
                    // Stopped: sleep until hart_start (which kicks us) or stop/pause.
                    let c = lock(&shared.control);
                    if !c.stop
                        && !c.paused
                        && !link.attention.load(Ordering::SeqCst)
                        && link.hsm.load(Ordering::SeqCst) == HSM_STOPPED
                    {
                        drop(shared.cv.wait(c).unwrap_or_else(|e| e.into_inner()));
                    }
                    continue;
                }
            }
            let mip = self.mip();
            if let Some(irq) = self.pending_interrupt(mip) {
                self.take_trap(cause::INTERRUPT | irq, 0);
                return !self.halted;
            }
            if !self.wfi {
                return true;
            }
            if mip & self.csr.mie != 0 {
                // WFI resumes on any locally enabled pending interrupt, even if globally masked.
                self.wfi = false;
                return true;
            }
            self.wait_for_interrupt();
        }
    }

    /// Sleeps until the next timer deadline or a kick.
    fn wait_for_interrupt(&mut self) {
        self.counters.bump(Ev::WfiSleeps);
        let shared = &self.shared;
        let link = &shared.links[self.hartid];
        let mut deadline = u64::MAX;
        if self.csr.mie & MIP_MTIP != 0 {
            deadline = deadline.min(link.mtimecmp.load(Ordering::Relaxed));
        }
        if self.csr.mie & MIP_STIP != 0 && self.csr.menvcfg & MENVCFG_STCE != 0 {
            deadline = deadline.min(self.csr.stimecmp);
        }
        let c = lock(&shared.control);
        if c.stop || c.paused || link.attention.load(Ordering::SeqCst) {
            return;
        }
        if deadline == u64::MAX {
            drop(shared.cv.wait(c).unwrap_or_else(|e| e.into_inner()));
        } else {
            let d = shared.clock.until(deadline);
            if !d.is_zero() {
                drop(
                    shared
                        .cv
                        .wait_timeout(c, d)
                        .unwrap_or_else(|e| e.into_inner()),
                );
            }
        }
    }

    /// Runs this hart until the machine stops.
    pub(crate) fn run(&mut self) {
        while self.poll() {
            let (prv, before) = (self.prv, self.instret);
            self.execute_slice(SLICE);
            self.counters.bump(Ev::Slices);
            if self.break_slice {
                self.counters.bump(Ev::SliceBreaks);
            }
            self.counters.instret[prv as usize & 3] += self.instret - before;
            self.shared.links[self.hartid]
                .retired
                .store(self.instret, Ordering::Relaxed);
        }
        self.shared.links[self.hartid]
            .retired
            .store(self.instret, Ordering::Relaxed);
        self.counters.ev[Ev::IcacheFills as usize] = self.icache.fills;
        self.counters.dump(self.hartid);
    }
}

#[cfg(test)]
pub(crate) mod tests_support {
    use super::*;
    use crate::memory::GuestRam;

    /// A lone hart in M-mode with 8 MiB of RAM, no devices.
    pub(crate) fn hart() -> Hart {
        let ram = GuestRam::new(8 << 20).unwrap();
        let shared = Arc::new(Shared::new(ram, 1, 10_000_000));
        Hart::new(shared, 0)
    }
}

//! The machine's state for snapshots: every hart (registers, CSRs, counters, LR/SC
//! reservation, SBI HSM state), the CLINT (mtime, mtimecmp, msip) and the PLIC, as plain
//! serde structures. Saving needs a paused machine (harts publish their state when they
//! park); restoring happens before `run`, on a machine built with the same configuration
//! (usually on RAM mapped from the snapshot's memory file: [`crate::GuestRam::from_file`]).
//!
//! A state read back is untrusted: counts must match the machine, and every register must
//! hold a value the guest could have put there itself (the WARL masks of `csr.rs`), so
//! the interpreter never runs from a state it could not have reached.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::csr::{self, Csrs, MIP_MSIP};
use crate::hart::{Hart, PRV_M, PRV_S, PRV_U};
use crate::machine::{Machine, MachineHandle};
use crate::shared::{HSM_START_PENDING, HSM_STARTED, HSM_STOPPED, lock};
use crate::{Error, ISA};

/// CSRs of one hart (what `Csrs` holds; derived bits such as mip's timer and external
/// lines come from the CLINT and PLIC).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CsrState {
    pub mstatus: u64,
    pub medeleg: u64,
    pub mideleg: u64,
    pub mie: u64,
    pub mip: u64,
    pub mtvec: u64,
    pub mcounteren: u64,
    pub menvcfg: u64,
    pub mcountinhibit: u64,
    pub mscratch: u64,
    pub mepc: u64,
    pub mcause: u64,
    pub mtval: u64,
    pub stvec: u64,
    pub scounteren: u64,
    pub senvcfg: u64,
    pub sscratch: u64,
    pub sepc: u64,
    pub scause: u64,
    pub stval: u64,
    pub satp: u64,
    pub stimecmp: u64,
    pub fcsr: u64,
    /// 8 and 64 entries.
    pub pmpcfg: Vec<u64>,
    pub pmpaddr: Vec<u64>,
    /// mcycle/minstret = instret + this.
    pub instret_offset: u64,
    pub mhartid: u64,
}

/// One hart.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HartState {
    /// x0..x31 (x0 is zero).
    pub x: Vec<u64>,
    pub f: Vec<u64>,
    pub pc: u64,
    /// 0 (U), 1 (S) or 3 (M).
    pub prv: u8,
    pub csr: CsrState,
    pub instret: u64,
    /// Waiting in WFI.
    pub wfi: bool,
    /// LR reservation: (physical address, value loaded).
    pub reservation: Option<(u64, u64)>,
    /// SBI HSM state: 0 started, 1 stopped, 2 start pending; and the pending start's
    /// (address, opaque).
    pub hsm: u8,
    pub hsm_start: (u64, u64),
}

/// The CLINT.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClintState {
    /// The guest clock when saved; a restored clock continues from it.
    pub mtime: u64,
    /// Per hart.
    pub mtimecmp: Vec<u64>,
    pub msip: Vec<bool>,
}

/// The PLIC: per source priority (64, source 0 unused), pending (latched edges and raised
/// levels), line levels and claimed (in service) bits, and per context (2 per hart: M, S)
/// enables and thresholds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlicState {
    pub priority: Vec<u32>,
    pub pending: u64,
    pub level: u64,
    pub in_service: u64,
    pub enable: Vec<u64>,
    pub threshold: Vec<u32>,
}

/// Everything of the machine but RAM and the external devices.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MachineState {
    /// The ISA every hart implements ([`ISA`]): a machine with another refuses the state.
    pub isa: String,
    pub timebase_hz: u64,
    pub memory_bytes: u64,
    /// SBI served by the monitor (a Linux boot) rather than by M-mode guest code.
    pub firmware: bool,
    pub harts: Vec<HartState>,
    pub clint: ClintState,
    pub plic: PlicState,
}

impl Hart {
    /// This hart's state; called by the hart itself when it parks, and by the machine
    /// while it does not run.
    pub(crate) fn save(&self) -> HartState {
        let c = &self.csr;
        let link = &self.shared.links[self.hartid];
        let start = *lock(&link.start);
        HartState {
            x: self.x[..32].to_vec(),
            f: self.f.to_vec(),
            pc: self.pc,
            prv: self.prv,
            csr: CsrState {
                mstatus: c.mstatus,
                medeleg: c.medeleg,
                mideleg: c.mideleg,
                mie: c.mie,
                // An IPI posted but not yet taken in is as good as taken in.
                mip: c.mip | link.set_mip.load(Ordering::SeqCst),
                mtvec: c.mtvec,
                mcounteren: c.mcounteren,
                menvcfg: c.menvcfg,
                mcountinhibit: c.mcountinhibit,
                mscratch: c.mscratch,
                mepc: c.mepc,
                mcause: c.mcause,
                mtval: c.mtval,
                stvec: c.stvec,
                scounteren: c.scounteren,
                senvcfg: c.senvcfg,
                sscratch: c.sscratch,
                sepc: c.sepc,
                scause: c.scause,
                stval: c.stval,
                satp: c.satp,
                stimecmp: c.stimecmp,
                fcsr: c.fcsr,
                pmpcfg: c.pmpcfg.to_vec(),
                pmpaddr: c.pmpaddr.to_vec(),
                instret_offset: c.instret_offset,
                mhartid: c.mhartid,
            },
            instret: self.instret,
            wfi: self.wfi,
            reservation: (self.resv_addr != u64::MAX).then_some((self.resv_addr, self.resv_val)),
            hsm: link.hsm.load(Ordering::SeqCst),
            hsm_start: start,
        }
    }

    /// The registers of `s`, checked (see the module documentation).
    fn checked(&self, s: &HartState) -> Result<Checked, String> {
        let c = &s.csr;
        let x: [u64; 32] =
            s.x.as_slice()
                .try_into()
                .map_err(|_| format!("{} x registers instead of 32", s.x.len()))?;
        let f: [u64; 32] =
            s.f.as_slice()
                .try_into()
                .map_err(|_| format!("{} f registers instead of 32", s.f.len()))?;
        let pmpcfg: [u64; 8] = c
            .pmpcfg
            .as_slice()
            .try_into()
            .map_err(|_| format!("{} pmpcfg registers instead of 8", c.pmpcfg.len()))?;
        let pmpaddr: [u64; 64] = c
            .pmpaddr
            .as_slice()
            .try_into()
            .map_err(|_| format!("{} pmpaddr registers instead of 64", c.pmpaddr.len()))?;
        if x[0] != 0 {
            return Err("x0 is not zero".into());
        }
        if ![PRV_U, PRV_S, PRV_M].contains(&s.prv) {
            return Err(format!("privilege mode {} does not exist", s.prv));
        }
        if s.pc & 1 != 0 {
            return Err(format!("pc {:#x} is odd", s.pc));
        }
        if ![HSM_STARTED, HSM_STOPPED, HSM_START_PENDING].contains(&s.hsm) {
            return Err(format!("SBI HSM state {} does not exist", s.hsm));
        }
        let csr = Csrs {
            mstatus: c.mstatus,
            medeleg: c.medeleg,
            mideleg: c.mideleg,
            mie: c.mie,
            mip: c.mip,
            mtvec: c.mtvec,
            mcounteren: c.mcounteren,
            menvcfg: c.menvcfg,
            mcountinhibit: c.mcountinhibit,
            mscratch: c.mscratch,
            mepc: c.mepc,
            mcause: c.mcause,
            mtval: c.mtval,
            stvec: c.stvec,
            scounteren: c.scounteren,
            senvcfg: c.senvcfg,
            sscratch: c.sscratch,
            sepc: c.sepc,
            scause: c.scause,
            stval: c.stval,
            satp: c.satp,
            stimecmp: c.stimecmp,
            fcsr: c.fcsr,
            pmpcfg,
            pmpaddr,
            instret_offset: c.instret_offset,
            mhartid: c.mhartid,
        };
        csr::check(&csr, self.hartid)?;
        Ok(Checked { x, f, csr })
    }

    /// Takes `s`, whose registers `checked` accepted. Caches start empty.
    fn load_state(&mut self, s: &HartState, regs: Checked) {
        self.x = [0; 64];
        self.x[..32].copy_from_slice(&regs.x);
        self.f = regs.f;
        self.pc = s.pc;
        self.csr = regs.csr;
        self.instret = s.instret;
        self.wfi = s.wfi;
        (self.resv_addr, self.resv_val) = s.reservation.unwrap_or((u64::MAX, 0));
        let link = &self.shared.links[self.hartid];
        link.hsm.store(s.hsm, Ordering::SeqCst);
        *lock(&link.start) = s.hsm_start;
        link.set_mip.store(0, Ordering::SeqCst);
        link.retired.store(s.instret, Ordering::Relaxed);
        self.set_prv(s.prv);
        self.flush_tlb();
        self.icache.flush();
    }
}

/// A hart's registers from a state that passed the checks.
struct Checked {
    x: [u64; 32],
    f: [u64; 32],
    csr: Csrs,
}

impl MachineHandle {
    /// The machine's state (not RAM). The machine must be running and paused; waits up to
    /// `timeout` for every hart to park (a pause returns before late-starting harts have).
    pub fn save_state(&self, timeout: Duration) -> Result<MachineState, Error> {
        let s = &self.shared;
        let n = s.links.len();
        let deadline = Instant::now() + timeout;
        let mut c = lock(&s.control);
        loop {
            if !c.paused {
                return Err(Error::State(
                    "pause the machine before saving its state".into(),
                ));
            }
            if c.stop {
                return Err(Error::State("the machine is stopping".into()));
            }
            if c.running == n && c.parked == n {
                break;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(Error::State(format!(
                    "only {} of {n} harts stopped within {timeout:?}; try again",
                    c.parked
                )));
            }
            c =
                s.cv.wait_timeout(c, left.min(Duration::from_millis(50)))
                    .map(|(g, _)| g)
                    .unwrap_or_else(|p| p.into_inner().0);
        }
        let mut harts = Vec::with_capacity(n);
        for (h, link) in s.links.iter().enumerate() {
            match lock(&link.parked_state).clone() {
                Some(state) => harts.push(state),
                None => {
                    return Err(Error::State(format!(
                        "hart {h} is parked without its state (interpreter bug)"
                    )));
                }
            }
        }
        drop(c);
        Ok(MachineState {
            isa: ISA.to_string(),
            timebase_hz: s.clock.freq(),
            memory_bytes: s.ram.size(),
            firmware: s.firmware.load(Ordering::SeqCst),
            harts,
            clint: ClintState {
                mtime: s.clock.ticks(),
                mtimecmp: s
                    .links
                    .iter()
                    .map(|l| l.mtimecmp.load(Ordering::SeqCst))
                    .collect(),
                msip: s
                    .links
                    .iter()
                    .map(|l| l.ext_mip.load(Ordering::SeqCst) & MIP_MSIP != 0)
                    .collect(),
            },
            plic: self.plic.state(),
        })
    }
}

impl Machine {
    /// Takes a snapshot's state before `run`: harts continue where they were, the guest
    /// clock continues from the saved `mtime`, and no kernel or device tree is placed.
    /// A state that does not fit this machine is an error, after which the machine is
    /// half restored and must be dropped, not run.
    pub fn restore_state(&mut self, s: &MachineState) -> Result<(), Error> {
        let bad = |what: String| Err(Error::State(what));
        let n = self.cfg.harts;
        if s.isa != ISA {
            return bad(format!(
                "it is of harts implementing {}, but this machine's implement {ISA}",
                s.isa
            ));
        }
        if s.harts.len() != n || s.clint.mtimecmp.len() != n || s.clint.msip.len() != n {
            return bad(format!("it has {} harts, this machine {n}", s.harts.len()));
        }
        if s.timebase_hz != self.cfg.timebase_hz || s.memory_bytes != self.cfg.memory_bytes {
            return bad(format!(
                "it is of a machine with a {} Hz timebase and {} bytes of RAM, this one has {} Hz and {}",
                s.timebase_hz, s.memory_bytes, self.cfg.timebase_hz, self.cfg.memory_bytes
            ));
        }
        let mut harts = lock(&self.harts);
        // Every hart is checked before any changes.
        let regs = harts
            .iter()
            .zip(&s.harts)
            .map(|(h, hs)| {
                h.checked(hs)
                    .map_err(|e| Error::State(format!("hart {}: {e}", h.hartid)))
            })
            .collect::<Result<Vec<_>, _>>()?;
        for ((h, hs), regs) in harts.iter_mut().zip(&s.harts).zip(regs) {
            h.load_state(hs, regs);
        }
        drop(harts);
        self.plic
            .restore(&s.plic)
            .map_err(|e| Error::State(format!("PLIC: {e}")))?;
        let shared = &self.shared;
        for (i, link) in shared.links.iter().enumerate() {
            link.mtimecmp.store(s.clint.mtimecmp[i], Ordering::SeqCst);
            shared.set_ext_mip(i, MIP_MSIP, s.clint.msip[i]);
            link.attention.store(true, Ordering::SeqCst);
        }
        shared.clock.set_ticks(s.clint.mtime);
        shared.firmware.store(s.firmware, Ordering::SeqCst);
        self.fdt_pending.store(false, Ordering::SeqCst);
        Ok(())
    }
}

#[cfg(test)]
#[path = "snapshot_tests.rs"]
mod tests;

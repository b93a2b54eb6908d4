//! PLIC (SiFive layout, as on QEMU `virt` at 0x0c00_0000): per-source priorities, pending
//! bits, per-context enables, thresholds and claim/complete. Context 2h is hart h's M-mode,
//! 2h+1 its S-mode. Sources are level-triggered: a raised line becomes pending, stays
//! latched until claimed, and becomes pending again on completion if still raised.

use std::sync::{Arc, Mutex, Weak};

use crate::csr::{MIP_MEIP, MIP_SEIP};
use crate::memory::MmioDevice;
use crate::shared::{Shared, lock};
use crate::snapshot::PlicState;

pub const PLIC_BASE: u64 = 0x0c00_0000;
pub const PLIC_SIZE: u64 = 0x400_0000;
/// Number of interrupt sources (1..=NDEV; 0 means "no interrupt").
pub const PLIC_NDEV: u32 = 63;

const PENDING: u64 = 0x1000;
const ENABLE: u64 = 0x2000;
const CONTEXT: u64 = 0x20_0000;

struct State {
    priority: [u32; 64],
    pending: u64,
    level: u64,
    in_service: u64,
    enable: Vec<u64>,
    threshold: Vec<u32>,
}

/// The interrupt controller; `IrqLine`s hold a reference to raise sources.
pub struct Plic {
    state: Mutex<State>,
    shared: Weak<Shared>,
    contexts: usize,
}

impl Plic {
    pub(crate) fn new(shared: Weak<Shared>, harts: usize) -> Self {
        let contexts = 2 * harts;
        Self {
            state: Mutex::new(State {
                priority: [0; 64],
                pending: 0,
                level: 0,
                in_service: 0,
                enable: vec![0; contexts],
                threshold: vec![0; contexts],
            }),
            shared,
            contexts,
        }
    }

    /// Best claimable source of context `c`.
    fn best(st: &State, c: usize) -> u32 {
        let cand = st.pending & st.enable[c] & !st.in_service;
        let mut best = 0u32;
        let mut best_prio = st.threshold[c];
        for irq in 1..=PLIC_NDEV {
            if cand >> irq & 1 != 0 && st.priority[irq as usize] > best_prio {
                best = irq;
                best_prio = st.priority[irq as usize];
            }
        }
        best
    }

    /// Recomputes every context's output line into the harts' mip.
    fn update(&self, st: &State) {
        let Some(s) = self.shared.upgrade() else {
            return;
        };
        for c in 0..self.contexts {
            let bit = if c % 2 == 0 { MIP_MEIP } else { MIP_SEIP };
            s.set_ext_mip(c / 2, bit, Self::best(st, c) != 0);
        }
    }

    /// Sets the level of source `irq` (ignored if out of range).
    pub(crate) fn set_level(&self, irq: u32, high: bool) {
        if irq == 0 || irq > PLIC_NDEV {
            return;
        }
        let mut st = lock(&self.state);
        let bit = 1u64 << irq;
        if high {
            st.level |= bit;
            if st.in_service & bit == 0 {
                st.pending |= bit;
            }
        } else {
            st.level &= !bit;
        }
        self.update(&st);
    }

    /// The controller's registers, for a snapshot.
    pub(crate) fn state(&self) -> PlicState {
        let st = lock(&self.state);
        PlicState {
            priority: st.priority.to_vec(),
            pending: st.pending,
            level: st.level,
            in_service: st.in_service,
            enable: st.enable.clone(),
            threshold: st.threshold.clone(),
        }
    }

    /// Takes a snapshot's registers (checked first: a wrong count or a value no register
    /// can hold is refused) and drives the harts' interrupt lines from them.
    pub(crate) fn restore(&self, s: &PlicState) -> Result<(), String> {
        let valid = (u64::MAX << 1) & (u64::MAX >> (63 - PLIC_NDEV));
        if s.priority.len() != 64 || s.enable.len() != self.contexts {
            return Err(format!(
                "{} priorities and {} enable sets, but this machine has 64 and {}",
                s.priority.len(),
                s.enable.len(),
                self.contexts
            ));
        }
        if s.threshold.len() != self.contexts {
            return Err(format!(
                "{} thresholds for {} contexts",
                s.threshold.len(),
                self.contexts
            ));
        }
        if s.priority[0] != 0 || s.priority.iter().chain(&s.threshold).any(|&p| p > 7) {
            return Err("a priority or threshold above 7 (or one for source 0)".into());
        }
        if [s.pending, s.level, s.in_service]
            .iter()
            .chain(&s.enable)
            .any(|&bits| bits & !valid != 0)
        {
            return Err(format!(
                "interrupt bits for source 0 or sources above {PLIC_NDEV}"
            ));
        }
        let mut st = lock(&self.state);
        st.priority.copy_from_slice(&s.priority);
        st.pending = s.pending;
        st.level = s.level;
        st.in_service = s.in_service;
        st.enable.clone_from(&s.enable);
        st.threshold.clone_from(&s.threshold);
        self.update(&st);
        Ok(())
    }

    /// An edge on source `irq`: latched pending even while the source is claimed, so it is
    /// delivered again after completion. Dropping it there loses interrupts: with two harts a
    /// UART event raised by one hart while the other is finishing its handler for the same
    /// source was never delivered, and the console stalled.
    pub(crate) fn pulse(&self, irq: u32) {
        if irq == 0 || irq > PLIC_NDEV {
            return;
        }
        let mut st = lock(&self.state);
        st.pending |= 1u64 << irq;
        self.update(&st);
    }
}

impl MmioDevice for Plic {
    fn read(&self, offset: u64, data: &mut [u8]) {
        let mut st = lock(&self.state);
        let v: u32 = if data.len() != 4 {
            0
        } else if offset < 4 * 64 {
            st.priority[(offset / 4) as usize]
        } else if (PENDING..PENDING + 8).contains(&offset) {
            (st.pending >> ((offset - PENDING) * 8)) as u32
        } else if (ENABLE..CONTEXT).contains(&offset) {
            let c = ((offset - ENABLE) / 0x80) as usize;
            let w = (offset - ENABLE) % 0x80;
            if c < self.contexts && w < 8 {
                (st.enable[c] >> (w * 8)) as u32
            } else {
                0
            }
        } else if offset >= CONTEXT {
            let c = ((offset - CONTEXT) / 0x1000) as usize;
            match ((offset - CONTEXT) % 0x1000, c < self.contexts) {
                (0, true) => st.threshold[c],
                (4, true) => {
                    let irq = Self::best(&st, c);
                    if irq != 0 {
                        st.pending &= !(1 << irq);
                        st.in_service |= 1 << irq;
                        self.update(&st);
                    }
                    irq
                }
                _ => 0,
            }
        } else {
            0
        };
        let b = v.to_le_bytes();
        let n = data.len().min(4);
        data[..n].copy_from_slice(&b[..n]);
    }

    fn write(&self, offset: u64, data: &[u8]) {
        if data.len() != 4 {
            return;
        }
        let v = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
        let mut st = lock(&self.state);
        if offset < 4 * 64 {
            let irq = (offset / 4) as usize;
            if irq != 0 && irq as u32 <= PLIC_NDEV {
                st.priority[irq] = v & 7;
            }
        } else if (ENABLE..CONTEXT).contains(&offset) {
            let c = ((offset - ENABLE) / 0x80) as usize;
            let w = (offset - ENABLE) % 0x80;
            if c < self.contexts && (w == 0 || w == 4) {
                let sh = w * 8;
                let mask = 0xffff_ffffu64 << sh;
                // Source 0 does not exist; sources above NDEV are hard-wired off.
                let valid = (u64::MAX << 1) & mask;
                st.enable[c] = (st.enable[c] & !mask) | (((v as u64) << sh) & valid);
            }
        } else if offset >= CONTEXT {
            let c = ((offset - CONTEXT) / 0x1000) as usize;
            if c < self.contexts {
                match (offset - CONTEXT) % 0x1000 {
                    0 => st.threshold[c] = v & 7,
                    4 => {
                        let irq = v;
                        if irq != 0 && irq <= PLIC_NDEV && st.in_service >> irq & 1 != 0 {
                            st.in_service &= !(1 << irq);
                            if st.level >> irq & 1 != 0 {
                                st.pending |= 1 << irq;
                            }
                        }
                    }
                    _ => {}
                }
            }
        }
        self.update(&st);
    }
}

/// One interrupt source of the machine's PLIC. Cloneable and usable from any thread.
#[derive(Clone)]
pub struct IrqLine {
    plic: Arc<Plic>,
    irq: u32,
}

impl IrqLine {
    pub(crate) fn new(plic: Arc<Plic>, irq: u32) -> Self {
        Self { plic, irq }
    }

    /// Source number.
    pub fn irq(&self) -> u32 {
        self.irq
    }

    /// Drives the line high or low (level-triggered).
    pub fn set_level(&self, high: bool) {
        self.plic.set_level(self.irq, high);
    }

    /// An edge: latches the source pending once (for devices that only signal events).
    pub fn pulse(&self) {
        self.plic.pulse(self.irq);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::GuestRam;
    use std::sync::atomic::Ordering;

    fn rd(p: &Plic, off: u64) -> u32 {
        let mut b = [0u8; 4];
        p.read(off, &mut b);
        u32::from_le_bytes(b)
    }
    fn wr(p: &Plic, off: u64, v: u32) {
        p.write(off, &v.to_le_bytes());
    }

    #[test]
    fn a_pulse_during_service_is_delivered_after_completion() {
        let shared = Arc::new(Shared::new(GuestRam::new(2 << 20).unwrap(), 1, 10_000_000));
        let plic = Arc::new(Plic::new(Arc::downgrade(&shared), 1));
        let claim = CONTEXT + 0x1000 + 4; // hart 0's S context (1)
        wr(&plic, 4 * 10, 1);
        wr(&plic, ENABLE + 0x80, 1 << 10);
        let line = IrqLine::new(plic.clone(), 10);
        line.pulse();
        assert_eq!(rd(&plic, claim), 10);
        // Raised (by another hart) while this one is still in its handler.
        line.pulse();
        assert_eq!(rd(&plic, claim), 0, "not delivered while in service");
        wr(&plic, claim, 10);
        assert_eq!(rd(&plic, claim), 10, "delivered after completion");
        wr(&plic, claim, 10);
        assert_eq!(rd(&plic, claim), 0, "exactly once");
    }

    #[test]
    fn claim_complete_priorities_threshold() {
        let shared = Arc::new(Shared::new(GuestRam::new(2 << 20).unwrap(), 2, 10_000_000));
        let plic = Arc::new(Plic::new(Arc::downgrade(&shared), 2));
        let seip = |h: usize| shared.links[h].ext_mip.load(Ordering::SeqCst) & MIP_SEIP != 0;
        wr(&plic, 4 * 10, 1);
        wr(&plic, 4 * 3, 5);
        // Hart 1's S context (3) enables 3 and 10.
        wr(&plic, ENABLE + 3 * 0x80, (1 << 10) | (1 << 3));
        let l10 = IrqLine::new(plic.clone(), 10);
        let l3 = IrqLine::new(plic.clone(), 3);
        l10.set_level(true);
        assert!(seip(1));
        assert!(!seip(0), "hart 0 has nothing enabled");
        assert_eq!(rd(&plic, PENDING), 1 << 10);
        l3.pulse();
        // Highest priority first.
        assert_eq!(rd(&plic, CONTEXT + 3 * 0x1000 + 4), 3);
        assert_eq!(rd(&plic, CONTEXT + 3 * 0x1000 + 4), 10);
        assert!(!seip(1), "both claimed");
        assert_eq!(rd(&plic, CONTEXT + 3 * 0x1000 + 4), 0);
        // Completing 10 while the line is still high makes it pending again.
        wr(&plic, CONTEXT + 3 * 0x1000 + 4, 10);
        assert!(seip(1));
        // Threshold at 1 masks priority-1 source 10.
        wr(&plic, CONTEXT + 3 * 0x1000, 1);
        assert!(!seip(1));
        wr(&plic, CONTEXT + 3 * 0x1000, 0);
        l10.set_level(false);
        assert_eq!(
            rd(&plic, CONTEXT + 3 * 0x1000 + 4),
            10,
            "latched until claimed"
        );
        wr(&plic, CONTEXT + 3 * 0x1000 + 4, 10);
        assert!(!seip(1));
        // Out-of-range sources and contexts are ignored.
        IrqLine::new(plic.clone(), 1000).set_level(true);
        wr(&plic, ENABLE + 99 * 0x80, u32::MAX);
        assert_eq!(rd(&plic, CONTEXT + 99 * 0x1000 + 4), 0);
    }
}

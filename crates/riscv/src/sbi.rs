//! The SBI implementation of a firmware-less boot: ecalls from S-mode are served by the
//! monitor itself (there is no M-mode firmware image). Covers what Linux uses: base, TIME,
//! IPI, RFENCE (conservative: full flushes, waited for), HSM, SRST, DBCN and the legacy
//! console calls.

use std::sync::atomic::Ordering;

use crate::ExitReason;
use crate::csr::MIP_SSIP;
use crate::hart::Hart;
use crate::shared::{HSM_START_PENDING, HSM_STARTED, HSM_STOPPED, REQ_FENCE_I, REQ_SFENCE, lock};

const EXT_LEGACY_PUTCHAR: u64 = 0x01;
const EXT_LEGACY_GETCHAR: u64 = 0x02;
const EXT_BASE: u64 = 0x10;
const EXT_TIME: u64 = 0x5449_4d45;
const EXT_IPI: u64 = 0x73_5049;
const EXT_RFENCE: u64 = 0x5246_4e43;
const EXT_HSM: u64 = 0x48_534d;
const EXT_SRST: u64 = 0x5352_5354;
const EXT_DBCN: u64 = 0x4442_434e;

const SUCCESS: i64 = 0;
const ERR_NOT_SUPPORTED: i64 = -2;
const ERR_INVALID_PARAM: i64 = -3;
const ERR_INVALID_ADDRESS: i64 = -5;
const ERR_ALREADY_AVAILABLE: i64 = -6;

/// Implementation ID reported by sbi_get_impl_id (not a registered ID: "vme").
const IMPL_ID: u64 = 0x766d65;
/// Where the legacy/DBCN console writes: the ns16550a of the device tree.
pub const UART_BASE: u64 = 0x1000_0000;

impl Hart {
    /// Serves the ecall in a0..a7 and writes the SBI return pair into a0/a1.
    pub(crate) fn sbi_call(&mut self) {
        self.counters.bump(crate::counters::Ev::SbiCalls);
        let (eid, fid) = (self.x[17], self.x[16]);
        let args = [
            self.x[10], self.x[11], self.x[12], self.x[13], self.x[14], self.x[15],
        ];
        let (err, val): (i64, u64) = match eid {
            EXT_LEGACY_PUTCHAR => {
                self.console_put(args[0] as u8);
                self.x[10] = 0;
                return;
            }
            EXT_LEGACY_GETCHAR => {
                self.x[10] = self.console_get().map_or(u64::MAX, |c| c as u64);
                return;
            }
            EXT_BASE => match fid {
                0 => (SUCCESS, 0x0100_0000), // spec version 1.0
                1 => (SUCCESS, IMPL_ID),
                2 => (SUCCESS, 1),
                3 => (
                    SUCCESS,
                    matches!(
                        args[0],
                        EXT_TIME
                            | EXT_IPI
                            | EXT_RFENCE
                            | EXT_HSM
                            | EXT_SRST
                            | EXT_DBCN
                            | EXT_LEGACY_PUTCHAR
                            | EXT_LEGACY_GETCHAR
                    ) as u64,
                ),
                4..=6 => (SUCCESS, 0), // mvendorid, marchid, mimpid
                _ => (ERR_NOT_SUPPORTED, 0),
            },
            EXT_TIME if fid == 0 => {
                // Same path as Sstc: the timer interrupt is STIP = (time >= stimecmp).
                self.csr.stimecmp = args[0];
                (SUCCESS, 0)
            }
            EXT_IPI if fid == 0 => match self.hart_mask(args[0], args[1]) {
                Some(mask) => {
                    for h in 0..self.shared.links.len() {
                        if mask >> h & 1 != 0 {
                            self.shared.links[h]
                                .set_mip
                                .fetch_or(MIP_SSIP, Ordering::SeqCst);
                            self.shared.kick(h);
                        }
                    }
                    (SUCCESS, 0)
                }
                None => (ERR_INVALID_PARAM, 0),
            },
            EXT_RFENCE => match (fid, self.hart_mask(args[0], args[1])) {
                (0..=2, Some(mask)) => {
                    let req = if fid == 0 { REQ_FENCE_I } else { REQ_SFENCE };
                    self.remote_request(mask, req);
                    (SUCCESS, 0)
                }
                (0..=2, None) => (ERR_INVALID_PARAM, 0),
                _ => (ERR_NOT_SUPPORTED, 0),
            },
            EXT_HSM => self.sbi_hsm(fid, args),
            EXT_SRST if fid == 0 => match args[0] {
                0 => {
                    self.shared.finish(ExitReason::PowerOff);
                    (SUCCESS, 0)
                }
                1 | 2 => {
                    self.shared.finish(ExitReason::Reboot);
                    (SUCCESS, 0)
                }
                _ => (ERR_INVALID_PARAM, 0),
            },
            EXT_DBCN => match fid {
                0 => {
                    // write(num_bytes, base_lo, base_hi): physical addresses.
                    let len = args[0].min(4096);
                    let mut buf = vec![0u8; len as usize];
                    if args[2] != 0 || self.shared.ram.read_bytes(args[1], &mut buf).is_err() {
                        (ERR_INVALID_PARAM, 0)
                    } else {
                        for b in &buf {
                            self.console_put(*b);
                        }
                        (SUCCESS, len)
                    }
                }
                1 => {
                    let len = args[0].min(4096);
                    let mut n = 0;
                    while n < len {
                        let Some(c) = self.console_get() else { break };
                        if args[2] != 0
                            || !self.shared.ram.write(args[1].wrapping_add(n), 1, c as u64)
                        {
                            return self.sbi_ret(ERR_INVALID_ADDRESS, n);
                        }
                        n += 1;
                    }
                    (SUCCESS, n)
                }
                2 => {
                    self.console_put(args[0] as u8);
                    (SUCCESS, 0)
                }
                _ => (ERR_NOT_SUPPORTED, 0),
            },
            _ => (ERR_NOT_SUPPORTED, 0),
        };
        self.sbi_ret(err, val);
    }

    fn sbi_ret(&mut self, err: i64, val: u64) {
        self.x[10] = err as u64;
        self.x[11] = val;
    }

    /// Resolves an SBI (hart_mask, hart_mask_base) pair; base = -1 means all harts.
    fn hart_mask(&self, mask: u64, base: u64) -> Option<u64> {
        let n = self.shared.links.len() as u64;
        let all = if n >= 64 { u64::MAX } else { (1 << n) - 1 };
        if base == u64::MAX {
            return Some(all);
        }
        if base >= n {
            return None;
        }
        let m = mask << base;
        if m >> base != mask || m & !all != 0 {
            return None;
        }
        Some(m)
    }

    /// Posts `req` to the harts in `mask` and waits until each started hart has handled it.
    fn remote_request(&mut self, mask: u64, req: u32) {
        let shared = std::sync::Arc::clone(&self.shared);
        for h in 0..shared.links.len() {
            if mask >> h & 1 == 0 {
                continue;
            }
            if h == self.hartid {
                if req & REQ_FENCE_I != 0 {
                    self.icache.flush();
                }
                if req & REQ_SFENCE != 0 {
                    self.flush_tlb();
                }
            } else {
                shared.links[h].requests.fetch_or(req, Ordering::SeqCst);
                shared.kick(h);
            }
        }
        loop {
            let pending = (0..shared.links.len()).any(|h| {
                h != self.hartid
                    && mask >> h & 1 != 0
                    && shared.links[h].hsm.load(Ordering::SeqCst) == HSM_STARTED
                    && shared.links[h].requests.load(Ordering::SeqCst) & req != 0
            });
            if !pending {
                return;
            }
            // Serve requests aimed at us meanwhile, so two harts fencing each other cannot
            // deadlock; stopping the machine ends the wait.
            let own = shared.links[self.hartid].requests.swap(0, Ordering::SeqCst);
            self.apply_requests(own);
            if lock(&shared.control).stop {
                return;
            }
            std::thread::yield_now();
        }
    }

    fn sbi_hsm(&mut self, fid: u64, args: [u64; 6]) -> (i64, u64) {
        let shared = std::sync::Arc::clone(&self.shared);
        match fid {
            0 => {
                let Some(link) = usize::try_from(args[0])
                    .ok()
                    .and_then(|h| shared.links.get(h))
                else {
                    return (ERR_INVALID_PARAM, 0);
                };
                if !shared.ram.contains(args[1], 2) {
                    return (ERR_INVALID_ADDRESS, 0);
                }
                *lock(&link.start) = (args[1], args[2]);
                if link
                    .hsm
                    .compare_exchange(
                        HSM_STOPPED,
                        HSM_START_PENDING,
                        Ordering::SeqCst,
                        Ordering::SeqCst,
                    )
                    .is_err()
                {
                    return (ERR_ALREADY_AVAILABLE, 0);
                }
                shared.kick(args[0] as usize);
                (SUCCESS, 0)
            }
            1 => {
                shared.links[self.hartid]
                    .hsm
                    .store(HSM_STOPPED, Ordering::SeqCst);
                self.break_slice = true;
                (SUCCESS, 0)
            }
            2 => match usize::try_from(args[0])
                .ok()
                .and_then(|h| shared.links.get(h))
            {
                Some(l) => (SUCCESS, l.hsm.load(Ordering::SeqCst) as u64),
                None => (ERR_INVALID_PARAM, 0),
            },
            3 => {
                // Retentive suspend behaves as WFI. Non-retentive suspend needs idle states
                // in the device tree, which this machine does not describe.
                if args[0] == 0 {
                    self.wfi = true;
                    (SUCCESS, 0)
                } else if args[0] == 0x8000_0000 {
                    (ERR_NOT_SUPPORTED, 0)
                } else {
                    (ERR_INVALID_PARAM, 0)
                }
            }
            _ => (ERR_NOT_SUPPORTED, 0),
        }
    }

    fn console_put(&mut self, c: u8) {
        // Wait for THR empty (LSR bit 5) is unnecessary with an emulated UART; write directly.
        self.bus.write(UART_BASE, 1, c as u64);
    }

    fn console_get(&mut self) -> Option<u8> {
        let lsr = self.bus.read(UART_BASE + 5, 1)?;
        if lsr & 1 == 0 {
            return None;
        }
        self.bus.read(UART_BASE, 1).map(|v| v as u8)
    }
}

//! State shared between hart threads, devices and the machine's handle: RAM, per-hart
//! interrupt/wake links, the run-control lock and the guest clock.

use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU32, AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::ExitReason;
use crate::memory::{Bus, GuestRam, PAGE_SIZE};

/// Hart requests posted by other harts (SBI RFENCE) and handled at the next poll.
pub(crate) const REQ_FENCE_I: u32 = 1;
pub(crate) const REQ_SFENCE: u32 = 2;
/// Posted by a dirty-log harvest: drop write TLB entries.
pub(crate) const REQ_DROP_WRITES: u32 = 4;

/// SBI HSM states (values as in the SBI specification).
pub(crate) const HSM_STARTED: u8 = 0;
pub(crate) const HSM_STOPPED: u8 = 1;
pub(crate) const HSM_START_PENDING: u8 = 2;

/// What other threads may do to one hart.
pub(crate) struct HartLink {
    /// Set whenever the hart must look at something outside its own state at its next poll.
    pub attention: AtomicBool,
    /// mip bits driven by devices: MSIP (CLINT), MEIP/SEIP (PLIC contexts).
    pub ext_mip: AtomicU64,
    /// mip bits to OR into the hart's software-writable mip (SSIP from SBI send_ipi).
    pub set_mip: AtomicU64,
    /// REQ_* bits; cleared by the hart once done (remote fences wait for that).
    pub requests: AtomicU32,
    /// CLINT mtimecmp of this hart.
    pub mtimecmp: AtomicU64,
    /// SBI HSM state.
    pub hsm: AtomicU8,
    /// (start address, opaque) of a pending HSM hart_start.
    pub start: Mutex<(u64, u64)>,
    /// Instructions retired (updated once per slice, for stats).
    pub retired: AtomicU64,
    /// The hart's architectural state while it is parked by a pause (for snapshots);
    /// `None` while it runs.
    pub parked_state: Mutex<Option<crate::snapshot::HartState>>,
}

impl HartLink {
    fn new(started: bool) -> Self {
        Self {
            attention: AtomicBool::new(false),
            ext_mip: AtomicU64::new(0),
            set_mip: AtomicU64::new(0),
            requests: AtomicU32::new(0),
            mtimecmp: AtomicU64::new(u64::MAX),
            hsm: AtomicU8::new(if started { HSM_STARTED } else { HSM_STOPPED }),
            start: Mutex::new((0, 0)),
            retired: AtomicU64::new(0),
            parked_state: Mutex::new(None),
        }
    }
}

/// Run control, protected by `Shared::control`.
#[derive(Default)]
pub(crate) struct Control {
    pub paused: bool,
    pub stop: bool,
    pub exit: Option<ExitReason>,
    /// Harts currently parked because of `paused`.
    pub parked: usize,
    /// Hart threads currently inside `run`.
    pub running: usize,
}

/// The guest clock: host monotonic time minus the time spent paused, at `freq` Hz, plus an
/// offset that a restored machine sets so its clock continues from the snapshot's.
pub(crate) struct Clock {
    origin: Instant,
    freq: u64,
    paused_ns: AtomicU64,
    pause_start: Mutex<Option<Instant>>,
    /// Host nanoseconds (since `origin`) when the clock was frozen, u64::MAX while it runs:
    /// a paused machine's `mtime` stands still (a snapshot records the value the guest
    /// will see when it continues).
    frozen_ns: AtomicU64,
    offset: AtomicU64,
}

impl Clock {
    pub fn new(freq: u64) -> Self {
        Self {
            origin: Instant::now(),
            freq,
            paused_ns: AtomicU64::new(0),
            pause_start: Mutex::new(None),
            frozen_ns: AtomicU64::new(u64::MAX),
            offset: AtomicU64::new(0),
        }
    }

    pub fn freq(&self) -> u64 {
        self.freq
    }

    /// Current `mtime` in ticks.
    pub fn ticks(&self) -> u64 {
        let ns = (self.origin.elapsed().as_nanos() as u64)
            .min(self.frozen_ns.load(Ordering::Relaxed))
            .saturating_sub(self.paused_ns.load(Ordering::Relaxed));
        let raw = ((ns as u128 * self.freq as u128) / 1_000_000_000) as u64;
        raw.wrapping_add(self.offset.load(Ordering::Relaxed))
    }

    /// Makes `mtime` read `ticks` now and go on from there (a restored machine's clock
    /// continues from its snapshot, never backwards).
    pub fn set_ticks(&self, ticks: u64) {
        let now = self
            .ticks()
            .wrapping_sub(self.offset.load(Ordering::Relaxed));
        self.offset
            .store(ticks.wrapping_sub(now), Ordering::Relaxed);
    }

    /// Host duration until `mtime` reaches `deadline` (zero if already past).
    pub fn until(&self, deadline: u64) -> Duration {
        let now = self.ticks();
        if deadline <= now {
            return Duration::ZERO;
        }
        let ns = ((deadline - now) as u128 * 1_000_000_000).div_ceil(self.freq as u128);
        Duration::from_nanos(u64::try_from(ns).unwrap_or(u64::MAX))
    }

    pub fn freeze(&self) {
        let mut p = lock(&self.pause_start);
        if p.is_none() {
            let now = Instant::now();
            *p = Some(now);
            let ns = now.saturating_duration_since(self.origin).as_nanos() as u64;
            self.frozen_ns.store(ns, Ordering::Relaxed);
        }
    }

    pub fn thaw(&self) {
        if let Some(t) = lock(&self.pause_start).take() {
            self.paused_ns
                .fetch_add(t.elapsed().as_nanos() as u64, Ordering::Relaxed);
            self.frozen_ns.store(u64::MAX, Ordering::Relaxed);
        }
    }
}

/// Locks a mutex, ignoring poisoning: every protected value stays consistent across panics
/// because each update is a single assignment.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Per physical page: bit 31 = "some hart holds decoded instructions of this page", low bits =
/// write generation (bumped by the first store after the flag was set).
pub(crate) const CODE_FLAG: u32 = 1 << 31;

pub(crate) struct Shared {
    pub ram: GuestRam,
    pub bus: Mutex<Bus>,
    pub links: Vec<HartLink>,
    pub control: Mutex<Control>,
    pub cv: Condvar,
    pub clock: Clock,
    pub code_pages: Box<[AtomicU32]>,
    /// Bumped whenever a code page is written, so harts re-validate their decode caches.
    pub code_epoch: AtomicU64,
    /// SBI is provided by the monitor (Linux boot) rather than by M-mode guest code (tests).
    pub firmware: AtomicBool,
}

impl Shared {
    pub fn new(ram: GuestRam, harts: usize, freq: u64) -> Self {
        let pages = (ram.size() / PAGE_SIZE) as usize;
        Self {
            ram,
            bus: Mutex::new(Bus::default()),
            links: (0..harts).map(|i| HartLink::new(i == 0)).collect(),
            control: Mutex::new(Control::default()),
            cv: Condvar::new(),
            clock: Clock::new(freq),
            code_pages: (0..pages).map(|_| AtomicU32::new(0)).collect(),
            code_epoch: AtomicU64::new(0),
            firmware: AtomicBool::new(false),
        }
    }

    /// Makes hart `h` look at its link at the next poll and wakes it if it waits.
    pub fn kick(&self, h: usize) {
        if let Some(l) = self.links.get(h) {
            l.attention.store(true, Ordering::SeqCst);
        }
        // Taking the lock orders this notify after any waiter's check-then-wait.
        let _g = lock(&self.control);
        self.cv.notify_all();
    }

    /// Kicks every hart.
    pub fn kick_all(&self) {
        for l in &self.links {
            l.attention.store(true, Ordering::SeqCst);
        }
        let _g = lock(&self.control);
        self.cv.notify_all();
    }

    /// Records why the machine ends (first reason wins) and stops every hart.
    pub fn finish(&self, why: ExitReason) {
        {
            let mut c = lock(&self.control);
            if c.exit.is_none() {
                c.exit = Some(why);
            }
            c.stop = true;
        }
        self.kick_all();
    }

    /// Sets or clears device-driven mip bits of hart `h` and wakes it on a change.
    pub fn set_ext_mip(&self, h: usize, bit: u64, level: bool) {
        let Some(l) = self.links.get(h) else { return };
        let old = if level {
            l.ext_mip.fetch_or(bit, Ordering::SeqCst)
        } else {
            l.ext_mip.fetch_and(!bit, Ordering::SeqCst)
        };
        if (old & bit != 0) != level {
            self.kick(h);
        }
    }
}

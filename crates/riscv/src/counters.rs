//! Debug event counters of one hart (traps by cause, flushes, page walks, decode-cache fills,
//! MMIO, instructions by privilege). They are plain per-hart integers bumped only on slow
//! paths, so they cost nothing measurable; with `VME_RISCV_COUNTERS=1` in the environment
//! each hart prints them (totals and per second) to stderr when it stops.

use std::time::Instant;

#[derive(Clone, Copy, Debug)]
#[repr(usize)]
pub(crate) enum Ev {
    Slices,
    SliceBreaks,
    TlbFlushAll,
    TlbFlushPage,
    SatpWrites,
    Walks,
    WalksFetch,
    IcacheFills,
    IcacheFlushes,
    CodePageWrites,
    Revalidations,
    MmioReads,
    MmioWrites,
    SbiCalls,
    WfiSleeps,
    FetchRefills,
    LoadSlow,
    StoreSlow,
    Count,
}

const NAMES: [&str; Ev::Count as usize] = [
    "slices",
    "slice_breaks",
    "tlb_flush_all",
    "tlb_flush_page",
    "satp_writes",
    "walks",
    "walks_fetch",
    "icache_fills",
    "icache_flushes",
    "code_page_writes",
    "revalidations",
    "mmio_reads",
    "mmio_writes",
    "sbi_calls",
    "wfi_sleeps",
    "fetch_refills",
    "load_slow",
    "store_slow",
];

pub(crate) struct Counters {
    pub ev: [u64; Ev::Count as usize],
    /// Exceptions by cause (0..16) and interrupts by code (16..32).
    pub traps: [u64; 32],
    /// Instructions by privilege of the slice that ran them (U, S, -, M).
    pub instret: [u64; 4],
    start: Instant,
}

impl Counters {
    pub fn new() -> Self {
        Self {
            ev: [0; Ev::Count as usize],
            traps: [0; 32],
            instret: [0; 4],
            start: Instant::now(),
        }
    }

    #[inline(always)]
    pub fn bump(&mut self, e: Ev) {
        self.ev[e as usize] += 1;
    }

    pub fn trap(&mut self, cause: u64) {
        let i = if cause >> 63 != 0 { 16 } else { 0 } + (cause & 15) as usize;
        self.traps[i] += 1;
    }

    /// Prints the counters if `VME_RISCV_COUNTERS` is set.
    pub fn dump(&self, hartid: usize) {
        if std::env::var_os("VME_RISCV_COUNTERS").is_none() {
            return;
        }
        let secs = self.start.elapsed().as_secs_f64().max(1e-9);
        let mut out = format!("hart {hartid} counters over {secs:.2} s:\n");
        let mut line = |name: String, v: u64| {
            if v != 0 {
                out += &format!("  {name:<20} {v:>14} {:>14.0}/s\n", v as f64 / secs);
            }
        };
        for (i, n) in NAMES.iter().enumerate() {
            line((*n).to_string(), self.ev[i]);
        }
        for (i, v) in self.traps.iter().enumerate() {
            let name = if i < 16 {
                format!("exception_{i}")
            } else {
                format!("interrupt_{}", i - 16)
            };
            line(name, *v);
        }
        for (p, v) in ["U", "S", "?", "M"].iter().zip(self.instret) {
            line(format!("instret_{p}"), v);
        }
        eprint!("{out}");
    }
}

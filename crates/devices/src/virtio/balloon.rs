//! virtio-balloon (virtio 1.2 §5.5): the host asks the guest to give memory back by setting a
//! target (`num_pages`, in 4 KiB pages); the guest's driver allocates that many pages from
//! its own allocator ("inflates") and names them on the inflate queue, and the device returns
//! them to the host ([`GuestMemory::discard`]). Lowering the target makes the guest take
//! pages back ("deflate"); nothing is needed on the host for that, because a discarded page
//! is backed again (with zeros) when the guest next touches it. The guest writes the number
//! of pages it holds in the balloon to `actual`.
//!
//! Also offered:
//! - `VIRTIO_BALLOON_F_STATS_VQ`: the guest posts one buffer of memory statistics and gets it
//!   back when the host wants fresh numbers ([`BalloonShared::request_stats`]).
//! - `VIRTIO_BALLOON_F_FREE_PAGE_REPORTING` (optional, [`Balloon::new`]): the guest reports
//!   large free blocks on their own queue while it keeps using them as free memory; the
//!   device discards them, so the host gets back what the guest does not use without any
//!   target being set.
//! - `VIRTIO_BALLOON_F_DEFLATE_ON_OOM`: the guest may deflate by itself rather than run out
//!   of memory. The device does nothing for it (deflating is free, see above).
//!
//! `VIRTIO_BALLOON_F_MUST_TELL_HOST` is not offered: the guest may reuse deflated pages
//! before telling us, which is harmless because we keep no record of balloon pages.
//!
//! # Queue numbering
//! Queues that a negotiated feature set does not create are skipped, not left as holes: the
//! reporting queue is index 3 when the statistics queue exists and 2 when it does not. That
//! is what Linux's virtio-mmio and virtio-pci transports do (they number only the queues
//! they set up) and what other devices (QEMU, Firecracker) expect, so the roles of queues 2
//! and 3 are fixed when the driver accepts its features ([`VirtioDevice::activate`]).
//!
//! # Untrusted input
//! Every PFN is checked against guest RAM (outside RAM or in a hole: skipped and counted);
//! duplicates within a request are discarded once and counted; at most
//! [`MAX_PFNS_PER_CHAIN`] PFNs are taken from one chain, so a chain naming gigabytes of
//! "PFNs" cannot hold a vCPU; statistics buffers are read up to [`MAX_STATS_BYTES`].
//! None of this puts the device into DEVICE_NEEDS_RESET: the guest can only hurt itself
//! (discarding pages it still uses zeroes them), so its requests are served as far as they
//! make sense and complaints go to the log, rate-limited.

use super::block::copy_config;
use super::queue::{Chain, Cursor, Queue, QueueError};
use super::{
    DISCARD_PAGE, DeviceState, DiscardError, GuestMemory, ID_BALLOON, StateError, VirtioDevice,
};
use serde::{Deserialize, Serialize};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

pub const F_STATS_VQ: u64 = 1 << 1;
pub const F_DEFLATE_ON_OOM: u64 = 1 << 2;
pub const F_FREE_PAGE_REPORTING: u64 = 1 << 5;

/// Size of every queue. Linux's free page reporting needs at least 32 descriptors (one
/// chain of up to 32 blocks).
const QUEUE_SIZE: u16 = 128;
/// The balloon's page: PFNs on the inflate and deflate queues are in 4 KiB units whatever
/// the guest's page size (`VIRTIO_BALLOON_PFN_SHIFT`).
pub const PFN_SHIFT: u32 = 12;
/// Most PFNs taken from one inflate or deflate chain (16 MiB). Linux sends at most 256.
pub const MAX_PFNS_PER_CHAIN: usize = 4096;
/// One statistic: `le16 tag; le64 val`, packed.
pub const STAT_LEN: usize = 10;
/// Most bytes read from one statistics buffer: room for 64 statistics (Linux 6.x sends
/// at most 16).
pub const MAX_STATS_BYTES: usize = 64 * STAT_LEN;
/// Warnings logged about one device before it goes quiet (a hostile guest could otherwise
/// fill the host's log).
const MAX_WARNINGS: u32 = 16;

// Statistics tags (virtio 1.2 §5.5.6.3).
const S_SWAP_IN: u16 = 0;
const S_SWAP_OUT: u16 = 1;
const S_MAJFLT: u16 = 2;
const S_MINFLT: u16 = 3;
const S_MEMFREE: u16 = 4;
const S_MEMTOT: u16 = 5;
const S_AVAIL: u16 = 6;
const S_CACHES: u16 = 7;
const S_HTLB_PGALLOC: u16 = 8;
const S_HTLB_PGFAIL: u16 = 9;

/// The guest's memory statistics as it last reported them. A statistic the guest did not
/// send is `None` (Linux leaves out swap and fault counts without `CONFIG_VM_EVENT_COUNTERS`).
/// Amounts of memory are in bytes, faults are counts.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GuestStats {
    pub swap_in: Option<u64>,
    pub swap_out: Option<u64>,
    pub major_faults: Option<u64>,
    pub minor_faults: Option<u64>,
    pub free_memory: Option<u64>,
    pub total_memory: Option<u64>,
    pub available_memory: Option<u64>,
    pub disk_caches: Option<u64>,
    pub hugetlb_allocations: Option<u64>,
    pub hugetlb_failures: Option<u64>,
}

impl GuestStats {
    /// Parses a statistics buffer: packed (tag, value) pairs. Unknown tags (newer guests
    /// send more) are skipped; a trailing partial entry is ignored. Returns the statistics
    /// and whether the buffer was well-formed (a whole number of entries).
    pub fn parse(bytes: &[u8]) -> (GuestStats, bool) {
        let mut s = GuestStats::default();
        let entries = bytes.chunks_exact(STAT_LEN);
        let whole = entries.remainder().is_empty();
        for e in entries {
            let tag = u16::from_le_bytes([e[0], e[1]]);
            let mut v = [0u8; 8];
            v.copy_from_slice(&e[2..]);
            let val = Some(u64::from_le_bytes(v));
            match tag {
                S_SWAP_IN => s.swap_in = val,
                S_SWAP_OUT => s.swap_out = val,
                S_MAJFLT => s.major_faults = val,
                S_MINFLT => s.minor_faults = val,
                S_MEMFREE => s.free_memory = val,
                S_MEMTOT => s.total_memory = val,
                S_AVAIL => s.available_memory = val,
                S_CACHES => s.disk_caches = val,
                S_HTLB_PGALLOC => s.hugetlb_allocations = val,
                S_HTLB_PGFAIL => s.hugetlb_failures = val,
                _ => {}
            }
        }
        (s, whole)
    }
}

/// What the device has done since the VM started (for `balloon-stats` and tests).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counters {
    /// Pages named on the inflate queue and given back to the host.
    pub inflated_pages: u64,
    /// Pages named on the deflate queue.
    pub deflated_pages: u64,
    /// Bytes of free memory the guest reported and the host took back.
    pub reported_bytes: u64,
    /// PFNs refused: outside RAM, in a hole, or repeated within one request.
    pub refused_pfns: u64,
    /// Discards the host's memory could not do.
    pub failed_discards: u64,
}

/// The balloon in a snapshot. The guest's statistics are not saved (it sends fresh ones
/// when asked); the statistics buffer the device holds is, since the guest waits for it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BalloonState {
    pub target_pages: u32,
    pub actual_pages: u32,
    /// Head of the statistics chain held until the host wants fresh numbers.
    pub stats_head: Option<u16>,
    pub counters: Counters,
}

/// The balloon as the host sees it at one moment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Snapshot {
    /// Pages the host asked for (`num_pages`).
    pub target_pages: u32,
    /// Pages the guest says are in the balloon (`actual`).
    pub actual_pages: u32,
    /// Whether the guest's driver is running (DRIVER_OK and not reset since).
    pub driver_ready: bool,
    /// The last statistics the guest sent, and how long ago.
    pub stats: Option<GuestStats>,
    pub stats_age: Option<Duration>,
    pub counters: Counters,
}

struct Inner {
    target: u32,
    actual: u32,
    driver_ready: bool,
    stats: Option<GuestStats>,
    stats_at: Option<Instant>,
    /// Bumped by every statistics buffer the guest sends.
    stats_seq: u64,
    /// The host asked for fresh statistics and has not had them yet.
    refresh: bool,
    /// Index of the statistics queue while the driver runs with one.
    stats_queue: Option<u32>,
    counters: Counters,
}

/// The state the device and the host side (control socket) share. The host changes the
/// target here and must then tell the transport (`config_changed`), which owns the
/// interrupt; it asks for statistics with [`Self::request_stats`] and a kick of the queue
/// that returns.
pub struct BalloonShared {
    inner: Mutex<Inner>,
    changed: Condvar,
    guest_pages: u64,
}

/// The host asked for a balloon the guest cannot give.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "a balloon of {pages} pages is more than the guest's {guest_pages} pages of memory: ask for at most {guest_pages}"
)]
pub struct TargetError {
    pub pages: u64,
    pub guest_pages: u64,
}

impl BalloonShared {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Every critical section leaves the state whole: a panicked holder poisons nothing.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Guest RAM in balloon pages.
    pub fn guest_pages(&self) -> u64 {
        self.guest_pages
    }

    /// Sets the target. The caller then raises the configuration-change interrupt.
    pub fn set_target(&self, pages: u64) -> Result<(), TargetError> {
        let too_big = TargetError {
            pages,
            guest_pages: self.guest_pages,
        };
        if pages > self.guest_pages {
            return Err(too_big);
        }
        self.lock().target = u32::try_from(pages).map_err(|_| too_big)?;
        Ok(())
    }

    pub fn snapshot(&self) -> Snapshot {
        let i = self.lock();
        Snapshot {
            target_pages: i.target,
            actual_pages: i.actual,
            driver_ready: i.driver_ready,
            stats: i.stats.clone(),
            stats_age: i.stats_at.map(|t| t.elapsed()),
            counters: i.counters,
        }
    }

    /// Asks the device to hand the guest its statistics buffer back, so it sends fresh
    /// numbers. Returns the sequence number of the statistics held now (for
    /// [`Self::wait_stats_after`]) and the queue to kick, if the driver has one.
    pub fn request_stats(&self) -> (u64, Option<u32>) {
        let mut i = self.lock();
        if i.stats_queue.is_some() {
            i.refresh = true;
        }
        (i.stats_seq, i.stats_queue)
    }

    /// Waits until the guest sent statistics newer than `seq`, at most `timeout`; returns
    /// whether it did.
    pub fn wait_stats_after(&self, seq: u64, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut i = self.lock();
        while i.stats_seq == seq {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            i = self
                .changed
                .wait_timeout(i, left)
                .map(|(g, _)| g)
                .unwrap_or_else(|p| p.into_inner().0);
        }
        true
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Role {
    Inflate,
    Deflate,
    Stats,
    Reporting,
}

pub struct Balloon {
    shared: Arc<BalloonShared>,
    offered: u64,
    sizes: Vec<u16>,
    /// Each queue's job under the negotiated features; empty until the driver runs.
    roles: Vec<Role>,
    /// The statistics buffer the guest posted, held until the host wants fresh numbers.
    stats_head: Option<u16>,
    buf: Vec<u8>,
    pfns: Vec<u64>,
    warnings: u32,
}

impl Balloon {
    /// A balloon for a guest with `guest_bytes` of RAM; `free_page_reporting` offers the
    /// reporting queue.
    pub fn new(guest_bytes: u64, free_page_reporting: bool) -> Balloon {
        let mut offered = F_STATS_VQ | F_DEFLATE_ON_OOM;
        // Inflate, deflate, statistics, and reporting when offered.
        let mut queues = 3;
        if free_page_reporting {
            offered |= F_FREE_PAGE_REPORTING;
            queues += 1;
        }
        Balloon {
            shared: Arc::new(BalloonShared {
                inner: Mutex::new(Inner {
                    target: 0,
                    actual: 0,
                    driver_ready: false,
                    stats: None,
                    stats_at: None,
                    stats_seq: 0,
                    refresh: false,
                    stats_queue: None,
                    counters: Counters::default(),
                }),
                changed: Condvar::new(),
                guest_pages: guest_bytes >> PFN_SHIFT,
            }),
            offered,
            sizes: vec![QUEUE_SIZE; queues],
            roles: Vec::new(),
            stats_head: None,
            buf: Vec::new(),
            pfns: Vec::new(),
            warnings: 0,
        }
    }

    /// The state the host side uses to set targets and read statistics.
    pub fn shared(&self) -> Arc<BalloonShared> {
        self.shared.clone()
    }

    fn warn(&mut self, what: std::fmt::Arguments<'_>) {
        if self.warnings < MAX_WARNINGS {
            log::warn!("virtio-balloon: {what}");
        } else if self.warnings == MAX_WARNINGS {
            log::warn!("virtio-balloon: more problems with the guest's requests; not logging them");
        }
        self.warnings = self.warnings.saturating_add(1);
    }

    fn config(&self) -> [u8; 8] {
        let i = self.shared.lock();
        let mut c = [0u8; 8];
        c[..4].copy_from_slice(&i.target.to_le_bytes());
        c[4..].copy_from_slice(&i.actual.to_le_bytes());
        c
    }

    /// Reads the PFNs of an inflate or deflate request into `self.pfns` as guest addresses,
    /// sorted and without duplicates, keeping only pages in RAM. Returns how many were
    /// refused.
    fn read_pfns(&mut self, chain: &Chain, mem: &dyn GuestMemory) -> Result<u64, QueueError> {
        let len = chain.readable_len();
        let take = len.min(4 * MAX_PFNS_PER_CHAIN as u64) as usize;
        if len % 4 != 0 || len > take as u64 {
            self.warn(format_args!(
                "request {} has {len} bytes of PFNs, not a multiple of 4 or more than \
                 {MAX_PFNS_PER_CHAIN} PFNs; using the first {} PFNs",
                chain.head,
                take / 4
            ));
        }
        self.buf.resize(take, 0);
        let got = Cursor::new(&chain.readable).read_to(mem, &mut self.buf)?;
        self.pfns.clear();
        let mut refused = 0u64;
        for b in self.buf[..got].chunks_exact(4) {
            let pfn = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            let addr = u64::from(pfn) << PFN_SHIFT;
            if mem.check(addr, DISCARD_PAGE).is_ok() {
                self.pfns.push(addr);
            } else {
                refused += 1;
            }
        }
        let named = self.pfns.len();
        self.pfns.sort_unstable();
        self.pfns.dedup();
        let repeated = (named - self.pfns.len()) as u64;
        if refused + repeated > 0 {
            self.warn(format_args!(
                "request {} names {refused} pages outside guest RAM and {repeated} pages twice; \
                 they were skipped",
                chain.head
            ));
        }
        Ok(refused + repeated)
    }

    fn inflate(&mut self, chain: &Chain, mem: &dyn GuestMemory) -> Result<(), QueueError> {
        let refused = self.read_pfns(chain, mem)?;
        let mut failed = 0;
        // Neighbouring pages go to the host in one call.
        let mut i = 0;
        while i < self.pfns.len() {
            let start = self.pfns[i];
            let mut end = start + DISCARD_PAGE;
            i += 1;
            while i < self.pfns.len() && self.pfns[i] == end {
                end += DISCARD_PAGE;
                i += 1;
            }
            if let Err(e) = mem.discard(start, end - start) {
                failed += 1;
                self.discard_failed(&e);
            }
        }
        let mut s = self.shared.lock();
        s.counters.inflated_pages += self.pfns.len() as u64;
        s.counters.refused_pfns += refused;
        s.counters.failed_discards += failed;
        Ok(())
    }

    fn discard_failed(&mut self, e: &DiscardError) {
        self.warn(format_args!(
            "cannot give guest pages back to the host: {e}"
        ));
    }

    fn deflate(&mut self, chain: &Chain, mem: &dyn GuestMemory) -> Result<(), QueueError> {
        let refused = self.read_pfns(chain, mem)?;
        let mut s = self.shared.lock();
        s.counters.deflated_pages += self.pfns.len() as u64;
        s.counters.refused_pfns += refused;
        Ok(())
    }

    /// Free page reporting: every buffer of the chain is a free block of guest memory.
    /// Only whole pages inside each buffer are discarded.
    fn report(&mut self, chain: &Chain, mem: &dyn GuestMemory) {
        let mut bytes = 0;
        let mut failed = 0;
        for d in chain.readable.iter().chain(&chain.writable) {
            let start = d.addr.next_multiple_of(DISCARD_PAGE);
            // The queue checked that the buffer lies in RAM, so this cannot overflow.
            let end = (d.addr + u64::from(d.len)) / DISCARD_PAGE * DISCARD_PAGE;
            if end <= start {
                continue;
            }
            match mem.discard(start, end - start) {
                Ok(()) => bytes += end - start,
                Err(e) => {
                    failed += 1;
                    self.discard_failed(&e);
                }
            }
        }
        let mut s = self.shared.lock();
        s.counters.reported_bytes += bytes;
        s.counters.failed_discards += failed;
    }

    /// A statistics buffer arrived: records its numbers.
    fn take_stats(&mut self, chain: &Chain, mem: &dyn GuestMemory) -> Result<(), QueueError> {
        let take = chain.readable_len().min(MAX_STATS_BYTES as u64) as usize;
        self.buf.resize(take, 0);
        let got = Cursor::new(&chain.readable).read_to(mem, &mut self.buf)?;
        let (stats, whole) = GuestStats::parse(&self.buf[..got]);
        if !whole || chain.readable_len() > MAX_STATS_BYTES as u64 {
            self.warn(format_args!(
                "statistics buffer of {} bytes is not a whole number of {STAT_LEN}-byte \
                 entries or longer than {MAX_STATS_BYTES}; using the whole entries at its start",
                chain.readable_len()
            ));
        }
        {
            let mut s = self.shared.lock();
            s.stats = Some(stats);
            s.stats_at = Some(Instant::now());
            s.stats_seq += 1;
            s.refresh = false;
        }
        self.shared.changed.notify_all();
        Ok(())
    }

    fn serve_stats(
        &mut self,
        queue: &mut Queue,
        mem: &dyn GuestMemory,
    ) -> Result<bool, QueueError> {
        let mut used = false;
        while let Some(chain) = queue.pop(mem)? {
            self.take_stats(&chain, mem)?;
            // A driver keeps one buffer posted; an older one it posted is returned.
            if let Some(old) = self.stats_head.replace(chain.head) {
                queue.add_used(mem, old, 0)?;
                used = true;
            }
        }
        let refresh = std::mem::take(&mut self.shared.lock().refresh);
        if refresh {
            if let Some(head) = self.stats_head.take() {
                queue.add_used(mem, head, 0)?;
                used = true;
            } else {
                // The guest is refreshing already; its next buffer answers.
                self.shared.lock().refresh = true;
            }
        }
        Ok(used)
    }
}

impl VirtioDevice for Balloon {
    fn device_id(&self) -> u32 {
        ID_BALLOON
    }

    fn features(&self) -> u64 {
        self.offered
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.sizes
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        copy_config(&self.config(), offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // Only `actual` (bytes 4..8) is the driver's to write; other bytes are ignored.
        let mut c = self.config();
        for (k, &b) in data.iter().enumerate() {
            let at = offset.saturating_add(k as u64);
            if (4..8).contains(&at) {
                c[at as usize] = b;
            }
        }
        let actual = u32::from_le_bytes([c[4], c[5], c[6], c[7]]);
        // Only reported, never acted on: a wrong value misleads nobody but the host's reader.
        let old = self.shared.lock().actual;
        let ram = self.shared.guest_pages;
        if actual != old && u64::from(actual) > ram {
            self.warn(format_args!(
                "the guest says its balloon holds {actual} pages, more than its {ram} pages of RAM"
            ));
        }
        self.shared.lock().actual = actual;
    }

    fn save_state(&self) -> DeviceState {
        let i = self.shared.lock();
        DeviceState::Balloon(BalloonState {
            target_pages: i.target,
            actual_pages: i.actual,
            stats_head: self.stats_head,
            counters: i.counters,
        })
    }

    fn restore_state(&mut self, state: &DeviceState, sizes: &[u16]) -> Result<(), StateError> {
        let DeviceState::Balloon(s) = state else {
            return Err(StateError("the saved state is not a balloon's".into()));
        };
        let ram = self.shared.guest_pages;
        if u64::from(s.target_pages) > ram {
            return Err(StateError(format!(
                "a target of {} pages is more than the guest's {ram}",
                s.target_pages
            )));
        }
        if let Some(head) = s.stats_head {
            let queue = self.roles.iter().position(|&r| r == Role::Stats);
            match queue.and_then(|q| sizes.get(q)) {
                Some(&size) if head < size => {}
                _ => {
                    return Err(StateError(format!(
                        "it holds statistics chain {head}, which the driver's queues cannot have"
                    )));
                }
            }
        }
        self.stats_head = s.stats_head;
        let mut i = self.shared.lock();
        i.target = s.target_pages;
        i.actual = s.actual_pages;
        i.counters = s.counters;
        Ok(())
    }

    fn activate(&mut self, features: u64) {
        self.roles = vec![Role::Inflate, Role::Deflate];
        if features & F_STATS_VQ != 0 {
            self.roles.push(Role::Stats);
        }
        if features & F_FREE_PAGE_REPORTING != 0 {
            self.roles.push(Role::Reporting);
        }
        let stats_queue = self
            .roles
            .iter()
            .position(|&r| r == Role::Stats)
            .map(|i| i as u32);
        let mut s = self.shared.lock();
        s.driver_ready = true;
        s.stats_queue = stats_queue;
    }

    fn process(
        &mut self,
        index: usize,
        queue: &mut Queue,
        mem: &dyn GuestMemory,
    ) -> Result<bool, QueueError> {
        let role = self.roles.get(index).copied();
        if role == Some(Role::Stats) {
            return self.serve_stats(queue, mem);
        }
        let mut used = false;
        while let Some(chain) = queue.pop(mem)? {
            match role {
                Some(Role::Inflate) => self.inflate(&chain, mem)?,
                Some(Role::Deflate) => self.deflate(&chain, mem)?,
                Some(Role::Reporting) => self.report(&chain, mem),
                // A queue the negotiated features do not use: its buffers go back unread.
                Some(Role::Stats) | None => {}
            }
            queue.add_used(mem, chain.head, 0)?;
            used = true;
        }
        Ok(used)
    }

    fn reset(&mut self) {
        // A reset driver owns all of its memory again; the host's target stays.
        self.roles.clear();
        self.stats_head = None;
        let mut s = self.shared.lock();
        s.actual = 0;
        s.driver_ready = false;
        s.stats_queue = None;
        s.refresh = false;
    }
}

#[cfg(test)]
#[path = "balloon_tests.rs"]
mod tests;

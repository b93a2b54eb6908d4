use super::*;
use crate::IrqLine;
use crate::bus::BusDevice;
use crate::virtio::mmio::{
    INT_CONFIG, MmioTransport, S_ACKNOWLEDGE, S_DRIVER, S_DRIVER_OK, S_FEATURES_OK,
};
use crate::virtio::testmem::{BASE, Driver, SIZE, TestMemory};
use crate::virtio::{F_VERSION_1, MemError};
use std::sync::atomic::{AtomicBool, Ordering};

/// Where test data lives: above the rings of four queues.
const DATA: u64 = BASE + 0x40000;
const PAGE: u64 = DISCARD_PAGE;
const ALL: u64 = F_STATS_VQ | F_FREE_PAGE_REPORTING | F_DEFLATE_ON_OOM;

/// The driver side of queue `k`, its rings apart from the other queues'.
fn driver(k: u64) -> Driver {
    let mut d = Driver::new(QUEUE_SIZE);
    d.desc = BASE + k * 0x8000;
    d.avail = d.desc + 0x4000;
    d.used = d.desc + 0x6000;
    d
}

fn running(features: u64) -> Balloon {
    let mut b = Balloon::new(SIZE, true);
    b.activate(features | F_VERSION_1);
    b
}

fn pfn(addr: u64) -> u32 {
    (addr >> PFN_SHIFT) as u32
}

fn pfn_bytes(pfns: &[u32]) -> Vec<u8> {
    pfns.iter().flat_map(|p| p.to_le_bytes()).collect()
}

/// Posts one device-readable buffer holding `data` at `at` on queue `k`'s driver.
fn post_bytes(mem: &TestMemory, drv: &mut Driver, at: u64, data: &[u8]) {
    mem.put(at, data);
    drv.post(mem, &[(at, data.len() as u32, false)]);
}

fn stat(tag: u16, val: u64) -> Vec<u8> {
    let mut v = tag.to_le_bytes().to_vec();
    v.extend_from_slice(&val.to_le_bytes());
    v
}

#[test]
fn inflate_discards_guest_pages_and_skips_hostile_pfns() {
    let mem = TestMemory::new();
    let mut drv = driver(0);
    let mut q = drv.queue(QUEUE_SIZE);
    let mut b = running(ALL);
    let (p1, p3) = (BASE + 0x80000, BASE + 0xa0000);
    for p in [p1, p1 + PAGE, p3] {
        mem.put(p, &[0xaa; 64]);
    }
    let pfns = [
        pfn(p1),
        pfn(p1 + PAGE),
        pfn(p1),          // twice
        0,                // below RAM
        pfn(BASE + SIZE), // just past the end
        u32::MAX,
        pfn(p3),
    ];
    post_bytes(&mem, &mut drv, DATA, &pfn_bytes(&pfns));
    assert!(b.process(0, &mut q, &mem).unwrap());
    assert_eq!(drv.used_idx(&mem), 1);
    assert_eq!(drv.used_elem(&mem, 0), (0, 0));
    // Neighbours go in one call; each page once; nothing outside RAM.
    assert_eq!(
        *mem.discarded.lock().unwrap(),
        vec![(p1, 2 * PAGE), (p3, PAGE)]
    );
    assert!(
        mem.get(p1, 64)
            .iter()
            .chain(&mem.get(p3, 64))
            .all(|&x| x == 0)
    );
    assert_eq!(
        mem.refused.load(Ordering::SeqCst),
        0,
        "no access outside RAM"
    );
    let c = b.shared().snapshot().counters;
    assert_eq!((c.inflated_pages, c.refused_pfns), (3, 4));
}

#[test]
fn odd_empty_and_oversized_requests_are_served_without_harm() {
    let mem = TestMemory::new();
    let mut drv = driver(0);
    let mut q = drv.queue(QUEUE_SIZE);
    let mut b = running(ALL);
    let (a, c) = (BASE + 0x80000, BASE + 0x90000);
    // Empty buffer; a chain with only device-writable buffers; 6 bytes (1.5 PFNs).
    drv.post(&mem, &[(DATA, 0, false)]);
    drv.post(&mem, &[(DATA, 64, true)]);
    let mut six = pfn_bytes(&[pfn(a)]);
    six.extend_from_slice(&[1, 2]);
    post_bytes(&mem, &mut drv, DATA + 0x100, &six);
    // Far more PFNs than any driver sends: the ones past the cap are not looked at.
    let mut many = vec![pfn(a + PAGE); MAX_PFNS_PER_CHAIN];
    many.extend(vec![pfn(c); 1000]);
    post_bytes(&mem, &mut drv, DATA + 0x1000, &pfn_bytes(&many));
    assert!(b.process(0, &mut q, &mem).unwrap());
    assert_eq!(drv.used_idx(&mem), 4, "every chain is returned");
    assert_eq!(
        *mem.discarded.lock().unwrap(),
        vec![(a, PAGE), (a + PAGE, PAGE)],
        "page c lies past the cap"
    );
    let s = b.shared().snapshot().counters;
    assert_eq!(s.inflated_pages, 2);
    assert_eq!(s.refused_pfns, MAX_PFNS_PER_CHAIN as u64 - 1, "repeats");
}

#[test]
fn deflate_only_counts() {
    let mem = TestMemory::new();
    let mut drv = driver(1);
    let mut q = drv.queue(QUEUE_SIZE);
    let mut b = running(ALL);
    post_bytes(&mem, &mut drv, DATA, &pfn_bytes(&[pfn(BASE + 0x80000), 7]));
    assert!(b.process(1, &mut q, &mem).unwrap());
    assert_eq!(drv.used_idx(&mem), 1);
    assert!(mem.discarded.lock().unwrap().is_empty());
    let c = b.shared().snapshot().counters;
    assert_eq!((c.deflated_pages, c.refused_pfns), (1, 1));
}

/// Memory that cannot discard (the trait's default).
struct NoDiscard(TestMemory);

impl GuestMemory for NoDiscard {
    fn check(&self, addr: u64, len: u64) -> Result<(), MemError> {
        self.0.check(addr, len)
    }
    fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), MemError> {
        self.0.read(addr, buf)
    }
    fn write(&self, addr: u64, data: &[u8]) -> Result<(), MemError> {
        self.0.write(addr, data)
    }
    fn load_u16(&self, addr: u64) -> Result<u16, MemError> {
        self.0.load_u16(addr)
    }
    fn store_u16(&self, addr: u64, val: u16) -> Result<(), MemError> {
        self.0.store_u16(addr, val)
    }
}

#[test]
fn memory_that_cannot_discard_is_reported_not_fatal() {
    let mem = NoDiscard(TestMemory::new());
    assert!(matches!(
        mem.discard(BASE, PAGE),
        Err(DiscardError::Unsupported)
    ));
    assert!(matches!(
        mem.discard(BASE + 1, PAGE),
        Err(DiscardError::Unaligned { .. })
    ));
    assert!(matches!(
        mem.discard(BASE + SIZE, PAGE),
        Err(DiscardError::OutsideRam(_))
    ));
    let mut drv = driver(0);
    let mut q = drv.queue(QUEUE_SIZE);
    let mut b = running(ALL);
    post_bytes(&mem.0, &mut drv, DATA, &pfn_bytes(&[pfn(BASE + 0x80000)]));
    assert!(b.process(0, &mut q, &mem).unwrap());
    assert_eq!(b.shared().snapshot().counters.failed_discards, 1);
}

#[test]
fn statistics_parse_and_skip_what_they_do_not_know() {
    let mut buf = stat(S_MEMFREE, 100 << 20);
    buf.extend(stat(S_MEMTOT, 256 << 20));
    buf.extend(stat(42, 7)); // a tag from a newer guest
    buf.extend(stat(S_MINFLT, 12345));
    let (s, whole) = GuestStats::parse(&buf);
    assert!(whole);
    assert_eq!(s.free_memory, Some(100 << 20));
    assert_eq!(s.total_memory, Some(256 << 20));
    assert_eq!(s.minor_faults, Some(12345));
    assert_eq!(s.swap_in, None, "not sent, not invented");
    buf.extend([1, 2, 3]);
    let (t, whole) = GuestStats::parse(&buf);
    assert!(!whole);
    assert_eq!(t, s, "a partial entry is ignored");
    assert_eq!(GuestStats::parse(&[]), (GuestStats::default(), true));
}

#[test]
fn statistics_buffer_is_held_and_returned_on_request() {
    let mem = TestMemory::new();
    let mut drv = driver(2);
    let mut q = drv.queue(QUEUE_SIZE);
    let mut b = running(ALL);
    let shared = b.shared();
    assert_eq!(shared.request_stats().1, Some(2), "stats on queue 2");
    post_bytes(&mem, &mut drv, DATA, &stat(S_AVAIL, 1 << 20));
    // The guest's first buffer answers the pending request, so it is kept.
    assert!(!b.process(2, &mut q, &mem).unwrap());
    assert_eq!(drv.used_idx(&mem), 0);
    let snap = shared.snapshot();
    assert_eq!(snap.stats.unwrap().available_memory, Some(1 << 20));
    assert!(snap.stats_age.is_some());

    // The host wants fresh numbers: the buffer goes back to the guest.
    let (seq, q_index) = shared.request_stats();
    assert_eq!(q_index, Some(2));
    assert!(b.process(2, &mut q, &mem).unwrap());
    assert_eq!(drv.used_idx(&mem), 1);
    assert!(!shared.wait_stats_after(seq, Duration::from_millis(1)));
    // The guest refreshes and posts again.
    post_bytes(&mem, &mut drv, DATA, &stat(S_AVAIL, 2 << 20));
    assert!(!b.process(2, &mut q, &mem).unwrap());
    assert!(shared.wait_stats_after(seq, Duration::from_millis(1)));
    assert_eq!(
        shared.snapshot().stats.unwrap().available_memory,
        Some(2 << 20)
    );
    // An oversized, ragged buffer: the whole entries at its start count.
    let (seq, _) = shared.request_stats();
    assert!(b.process(2, &mut q, &mem).unwrap());
    let mut big = stat(S_AVAIL, 3 << 20);
    big.resize(MAX_STATS_BYTES * 4 + 3, 0xff);
    post_bytes(&mem, &mut drv, DATA, &big);
    b.process(2, &mut q, &mem).unwrap();
    assert!(shared.wait_stats_after(seq, Duration::from_millis(1)));
    assert_eq!(
        shared.snapshot().stats.unwrap().available_memory,
        Some(3 << 20)
    );
    // A second buffer posted while one is held: the older goes back.
    post_bytes(&mem, &mut drv, DATA + 0x1000, &stat(S_AVAIL, 4 << 20));
    let before = drv.used_idx(&mem);
    assert!(b.process(2, &mut q, &mem).unwrap());
    assert_eq!(drv.used_idx(&mem), before + 1);
}

#[test]
fn reported_free_blocks_are_discarded_in_whole_pages() {
    let mem = TestMemory::new();
    let blk = BASE + 0x80000;
    mem.put(blk, &[0x55; 32]);
    let bufs = [
        (blk, 2 * PAGE as u32, true),
        // Unaligned: only the pages wholly inside count.
        (blk + 0x10000 + 100, 3 * PAGE as u32, true),
        // Smaller than a page: nothing.
        (blk + 0x20000 + 8, 100, true),
    ];
    // With statistics the reporting queue is 3; without, it is 2 (queues are numbered
    // without holes).
    for (features, index) in [(ALL, 3u64), (F_FREE_PAGE_REPORTING, 2)] {
        mem.discarded.lock().unwrap().clear();
        let mut drv = driver(index);
        let mut q = drv.queue(QUEUE_SIZE);
        let mut b = running(features);
        drv.post(&mem, &bufs);
        assert!(b.process(index as usize, &mut q, &mem).unwrap());
        assert_eq!(drv.used_idx(&mem), 1);
        assert_eq!(
            *mem.discarded.lock().unwrap(),
            vec![(blk, 2 * PAGE), (blk + 0x11000, 2 * PAGE)]
        );
        assert_eq!(b.shared().snapshot().counters.reported_bytes, 4 * PAGE);
        assert!(mem.get(blk, 32).iter().all(|&x| x == 0));
    }
}

#[test]
fn without_reporting_there_is_no_reporting_queue() {
    let b = Balloon::new(SIZE, false);
    assert_eq!(b.features() & F_FREE_PAGE_REPORTING, 0);
    assert_eq!(b.queue_max_sizes().len(), 3);
    let b = Balloon::new(SIZE, true);
    assert_ne!(b.features() & F_FREE_PAGE_REPORTING, 0);
    assert_eq!(b.queue_max_sizes().len(), 4);
    assert_ne!(b.features() & F_DEFLATE_ON_OOM, 0);
}

#[test]
fn a_queue_beyond_the_negotiated_ones_gets_its_buffers_back_unread() {
    let mem = TestMemory::new();
    let mut drv = driver(3);
    let mut q = drv.queue(QUEUE_SIZE);
    // Statistics only: queue 3 has no job.
    let mut b = running(F_STATS_VQ);
    drv.post(&mem, &[(BASE + 0x80000, PAGE as u32, true)]);
    assert!(b.process(3, &mut q, &mem).unwrap());
    assert_eq!(drv.used_idx(&mem), 1);
    assert!(mem.discarded.lock().unwrap().is_empty());
}

#[test]
fn config_space_target_and_actual() {
    let mut b = Balloon::new(SIZE, true);
    let shared = b.shared();
    let pages = SIZE / PAGE;
    assert_eq!(shared.guest_pages(), pages);
    shared.set_target(pages / 2).unwrap();
    let e = shared.set_target(pages + 1).unwrap_err();
    assert!(e.to_string().contains("at most 256"), "{e}");
    let mut c = [0u8; 8];
    b.read_config(0, &mut c);
    assert_eq!(c[..4], ((pages / 2) as u32).to_le_bytes());
    // The driver cannot write the target; it writes `actual`, here a byte at a time.
    b.write_config(0, &[0xff; 4]);
    for (k, byte) in 100u32.to_le_bytes().iter().enumerate() {
        b.write_config(4 + k as u64, &[*byte]);
    }
    b.write_config(u64::MAX, &[1, 2]);
    let s = shared.snapshot();
    assert_eq!((s.target_pages, s.actual_pages), ((pages / 2) as u32, 100));
    let mut tail = [0xeeu8; 4];
    b.read_config(6, &mut tail);
    assert_eq!(tail, [0, 0, 0, 0], "bytes past the end read as zero");
    // Nonsense from the guest is recorded (and logged), never acted on.
    b.write_config(4, &u32::MAX.to_le_bytes());
    assert_eq!(shared.snapshot().actual_pages, u32::MAX);
}

#[test]
fn reset_in_the_middle_forgets_the_driver_but_keeps_the_target() {
    let mem = TestMemory::new();
    let mut drv = driver(2);
    let mut q = drv.queue(QUEUE_SIZE);
    let mut b = running(ALL);
    let shared = b.shared();
    shared.set_target(10).unwrap();
    b.write_config(4, &7u32.to_le_bytes());
    post_bytes(&mem, &mut drv, DATA, &stat(S_MEMFREE, 1));
    b.process(2, &mut q, &mem).unwrap();
    b.reset();
    let s = shared.snapshot();
    assert_eq!(
        (s.target_pages, s.actual_pages, s.driver_ready),
        (10, 0, false)
    );
    assert_eq!(shared.request_stats().1, None, "no statistics queue now");
    // The held buffer belonged to the old driver; a new one starts clean.
    let mut drv = driver(2);
    let mut q = drv.queue(QUEUE_SIZE);
    b.activate(ALL | F_VERSION_1);
    assert!(shared.snapshot().driver_ready);
    post_bytes(&mem, &mut drv, DATA, &stat(S_MEMFREE, 2));
    assert!(!b.process(2, &mut q, &mem).unwrap(), "nothing old returned");
    assert_eq!(shared.snapshot().stats.unwrap().free_memory, Some(2));
}

#[derive(Default)]
struct Line(AtomicBool);

impl IrqLine for Line {
    fn set_level(&self, high: bool) {
        self.0.store(high, Ordering::SeqCst);
    }
}

#[test]
fn a_new_target_raises_the_config_interrupt_once_the_driver_runs() {
    // virtio-mmio registers (virtio 1.2 §4.2.2).
    const INTERRUPT_STATUS: u64 = 0x60;
    const DRIVER_FEATURES: u64 = 0x20;
    const DRIVER_FEATURES_SEL: u64 = 0x24;
    const STATUS: u64 = 0x70;
    const GENERATION: u64 = 0xfc;
    let mem = Arc::new(TestMemory::new());
    let line = Arc::new(Line::default());
    let b = Balloon::new(SIZE, true);
    let shared = b.shared();
    let mut t = MmioTransport::new(Box::new(b), mem, line.clone());
    let rd = |t: &mut MmioTransport, off| {
        let mut v = [0u8; 4];
        t.read(off, &mut v);
        u32::from_le_bytes(v)
    };
    let wr = |t: &mut MmioTransport, off, v: u32| t.write(off, &v.to_le_bytes());

    shared.set_target(64).unwrap();
    t.config_changed();
    assert!(
        !line.0.load(Ordering::SeqCst),
        "no driver yet: no interrupt"
    );
    assert_eq!(
        rd(&mut t, 0x100),
        64,
        "the driver reads the target when it starts"
    );
    let generation = rd(&mut t, GENERATION);

    wr(&mut t, STATUS, S_ACKNOWLEDGE | S_DRIVER);
    wr(&mut t, DRIVER_FEATURES_SEL, 1);
    wr(&mut t, DRIVER_FEATURES, 1);
    wr(&mut t, DRIVER_FEATURES_SEL, 0);
    wr(&mut t, DRIVER_FEATURES, F_STATS_VQ as u32);
    wr(&mut t, STATUS, S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK);
    wr(
        &mut t,
        STATUS,
        S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK,
    );
    assert_eq!(shared.request_stats().1, Some(2));

    shared.set_target(128).unwrap();
    t.config_changed();
    assert!(line.0.load(Ordering::SeqCst));
    assert_eq!(rd(&mut t, INTERRUPT_STATUS), INT_CONFIG);
    assert_ne!(rd(&mut t, GENERATION), generation);
    assert_eq!(rd(&mut t, 0x100), 128);
    wr(&mut t, 0x104, 128);
    assert_eq!(shared.snapshot().actual_pages, 128);
    // A reset (status 0) drops the balloon: the guest owns its memory again.
    wr(&mut t, STATUS, 0);
    assert_eq!(shared.snapshot().actual_pages, 0);
}

#[test]
fn state_keeps_the_target_and_the_held_statistics_buffer() {
    let mut b = running(ALL);
    b.shared().set_target(64).unwrap();
    b.write_config(4, &7u32.to_le_bytes());
    b.stats_head = Some(5);
    let state = b.save_state();
    let mut c = running(ALL);
    c.restore_state(&state, &[QUEUE_SIZE; 4]).unwrap();
    assert_eq!(c.save_state(), state);
    let s = c.shared().snapshot();
    assert_eq!((s.target_pages, s.actual_pages), (64, 7));
    // A held chain beyond its queue, a target beyond RAM, a driver without statistics.
    let DeviceState::Balloon(good) = state else {
        unreachable!()
    };
    let bad = |f: &dyn Fn(&mut BalloonState)| {
        let mut s = good.clone();
        f(&mut s);
        DeviceState::Balloon(s)
    };
    let err = |b: &mut Balloon, s: DeviceState| b.restore_state(&s, &[8; 4]).unwrap_err().0;
    assert!(err(&mut running(ALL), bad(&|s| s.stats_head = Some(8))).contains("chain 8"));
    assert!(err(&mut running(ALL), bad(&|s| s.target_pages = u32::MAX)).contains("more than"));
    assert!(err(&mut running(0), bad(&|_| {})).contains("chain 5"));
    assert!(err(&mut running(ALL), DeviceState::Rng).contains("not a balloon"));
}

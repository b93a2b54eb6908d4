use super::*;
use crate::virtio::rate_limit::Limits;
use crate::virtio::testmem::{BASE, Driver, SIZE, TestMemory};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const HDR: u64 = BASE + 0x10000;
const DATA: u64 = BASE + 0x20000;
const STATUS: u64 = BASE + 0x11000;
const DISK: u64 = 1 << 20;

/// A fresh image of `DISK` bytes filled with a pattern; removed on drop.
struct Image(PathBuf);

impl Image {
    fn new() -> Image {
        static N: AtomicUsize = AtomicUsize::new(0);
        let p = std::env::temp_dir().join(format!(
            "vme-blk-test-{}-{}.img",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        let data: Vec<u8> = (0..DISK).map(|i| (i / SECTOR) as u8 ^ 0x5a).collect();
        std::fs::write(&p, data).unwrap();
        Image(p)
    }
    fn bytes(&self) -> Vec<u8> {
        std::fs::read(&self.0).unwrap()
    }
}

impl Drop for Image {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

struct Rig {
    mem: TestMemory,
    drv: Driver,
    q: Queue,
    blk: Block,
}

impl Rig {
    fn new(img: &Image, readonly: bool) -> Rig {
        Rig::with(Block::open(&img.0, readonly, "vme-serial-1").unwrap())
    }

    fn with(blk: Block) -> Rig {
        let drv = Driver::new(16);
        let q = drv.queue(QUEUE_SIZE);
        Rig {
            mem: TestMemory::new(),
            drv,
            q,
            blk,
        }
    }

    fn header(&self, kind: u32, sector: u64) {
        let mut h = [0u8; 16];
        h[..4].copy_from_slice(&kind.to_le_bytes());
        h[8..].copy_from_slice(&sector.to_le_bytes());
        self.mem.put(HDR, &h);
        self.mem.put(STATUS, &[0xff]);
    }

    /// Posts one request, runs the device; returns (status byte, used length).
    fn run(&mut self, kind: u32, sector: u64, data: Option<(u32, bool)>) -> (u8, u32) {
        self.header(kind, sector);
        let mut bufs = vec![(HDR, 16, false)];
        if let Some((len, w)) = data {
            bufs.push((DATA, len, w));
        }
        bufs.push((STATUS, 1, true));
        self.drv.post(&self.mem, &bufs);
        let before = self.drv.used_idx(&self.mem);
        assert!(self.blk.process(0, &mut self.q, &self.mem).unwrap());
        assert_eq!(self.drv.used_idx(&self.mem), before.wrapping_add(1));
        let (_, len) = self.drv.used_elem(&self.mem, before);
        (self.mem.get(STATUS, 1)[0], len)
    }

    fn refused(&self) -> usize {
        self.mem.refused.load(Ordering::SeqCst)
    }
}

#[test]
fn writes_and_reads_back() {
    let img = Image::new();
    let mut r = Rig::new(&img, false);
    let payload: Vec<u8> = (0..8192u32).map(|i| (i * 7) as u8).collect();
    r.mem.put(DATA, &payload);
    assert_eq!(r.run(T_OUT, 8, Some((8192, false))), (S_OK, 1));
    assert_eq!(&img.bytes()[4096..4096 + 8192], &payload[..]);
    r.mem.put(DATA, &[0u8; 8192]);
    assert_eq!(r.run(T_IN, 8, Some((8192, true))), (S_OK, 8193));
    assert_eq!(r.mem.get(DATA, 8192), payload);
    assert_eq!(r.run(T_FLUSH, 0, None), (S_OK, 1));
    assert_eq!(r.blk.read_config_u64(0), DISK / SECTOR);
    assert_eq!(r.refused(), 0);
}

#[test]
fn requests_past_the_end_move_nothing() {
    let img = Image::new();
    let before = img.bytes();
    let mut r = Rig::new(&img, false);
    let last = DISK / SECTOR - 1;
    r.mem.put(DATA, &[0xee; 1024]);
    for sector in [last, DISK / SECTOR, u64::MAX / SECTOR, u64::MAX] {
        assert_eq!(
            r.run(T_OUT, sector, Some((1024, false))).0,
            S_IOERR,
            "{sector}"
        );
        assert_eq!(
            r.run(T_IN, sector, Some((1024, true))),
            (S_IOERR, 1),
            "{sector}"
        );
    }
    assert_eq!(
        r.mem.get(DATA, 1024),
        vec![0xee; 1024],
        "no bytes were read"
    );
    assert_eq!(img.bytes(), before, "no bytes were written");
    // The very last sector is fine; a partial sector is not.
    assert_eq!(r.run(T_IN, last, Some((512, true))), (S_OK, 513));
    assert_eq!(r.run(T_IN, 0, Some((100, true))).0, S_IOERR);
}

#[test]
fn wrong_directions_and_malformed_requests() {
    let img = Image::new();
    let before = img.bytes();
    let mut r = Rig::new(&img, false);
    // A read whose data buffer is device-readable, a write whose data is device-writable.
    assert_eq!(r.run(T_IN, 0, Some((512, false))).0, S_IOERR);
    assert_eq!(r.run(T_OUT, 0, Some((512, true))).0, S_IOERR);
    assert_eq!(img.bytes(), before);
    assert_eq!(r.run(77, 0, None), (S_UNSUPP, 1));
    // No writable status byte: the queue is broken.
    r.header(T_IN, 0);
    r.drv.post(&r.mem, &[(HDR, 16, false)]);
    assert!(matches!(
        r.blk.process(0, &mut r.q, &r.mem),
        Err(QueueError::Malformed { .. })
    ));
    // A header shorter than 16 bytes.
    drop(r);
    let mut r = Rig::new(&img, false);
    r.drv.post(&r.mem, &[(HDR, 8, false), (STATUS, 1, true)]);
    assert!(matches!(
        r.blk.process(0, &mut r.q, &r.mem),
        Err(QueueError::Malformed { .. })
    ));
    // A data buffer at the very end of RAM is fine; one beyond it never reaches the device.
    drop(r);
    let mut r = Rig::new(&img, false);
    r.header(T_IN, 0);
    r.drv.post(
        &r.mem,
        &[
            (HDR, 16, false),
            (BASE + SIZE - 512, 512, true),
            (STATUS, 1, true),
        ],
    );
    r.blk.process(0, &mut r.q, &r.mem).unwrap();
    assert_eq!(r.mem.get(STATUS, 1)[0], S_OK);
    assert_eq!(r.refused(), 0);
}

#[test]
fn read_only_disks_refuse_writes() {
    let img = Image::new();
    let before = img.bytes();
    let mut r = Rig::new(&img, true);
    assert_ne!(r.blk.features() & F_RO, 0);
    assert_eq!(r.blk.features() & (F_DISCARD | F_WRITE_ZEROES), 0);
    r.mem.put(DATA, &[1; 512]);
    assert_eq!(r.run(T_OUT, 0, Some((512, false))).0, S_IOERR);
    r.mem.put(DATA, &[0; 16]);
    assert_eq!(r.run(T_DISCARD, 0, Some((16, false))).0, S_UNSUPP);
    assert_eq!(r.run(T_IN, 0, Some((512, true))).0, S_OK);
    assert_eq!(img.bytes(), before);
    // Readers share the image; a writer needs it alone.
    assert!(Block::open(&img.0, true, "").is_ok());
    assert!(matches!(
        Block::open(&img.0, false, ""),
        Err(BlockError::Locked { .. })
    ));
}

#[test]
fn get_id_and_serial_limits() {
    let img = Image::new();
    let mut r = Rig::new(&img, false);
    assert_eq!(r.run(T_GET_ID, 0, Some((20, true))), (S_OK, 21));
    assert_eq!(&r.mem.get(DATA, 20)[..], b"vme-serial-1\0\0\0\0\0\0\0\0");
    drop(r);
    let e = Block::open(&img.0, false, "123456789012345678901")
        .err()
        .unwrap();
    assert!(e.to_string().contains("limit is 20"), "{e}");
}

#[test]
fn write_zeroes_and_discard_punch_holes() {
    let img = Image::new();
    let mut r = Rig::new(&img, false);
    let seg = |sector: u64, n: u32, flags: u32| {
        let mut s = [0u8; 16];
        s[..8].copy_from_slice(&sector.to_le_bytes());
        s[8..12].copy_from_slice(&n.to_le_bytes());
        s[12..].copy_from_slice(&flags.to_le_bytes());
        s
    };
    r.mem.put(DATA, &seg(16, 16, WZ_UNMAP));
    assert_eq!(r.run(T_WRITE_ZEROES, 0, Some((16, false))).0, S_OK);
    let b = img.bytes();
    assert_eq!(b.len() as u64, DISK, "the size is kept");
    assert!(b[16 * 512..32 * 512].iter().all(|&x| x == 0));
    assert_eq!(b[32 * 512], 32 ^ 0x5a, "the next sector is untouched");
    r.mem.put(DATA, &seg(0, 8, 0));
    assert_eq!(r.run(T_DISCARD, 0, Some((16, false))).0, S_OK);
    // Bad segments: past the end, unknown flags, two segments, a partial segment.
    let before = img.bytes();
    r.mem.put(DATA, &seg(DISK / SECTOR - 1, 2, 0));
    assert_eq!(r.run(T_WRITE_ZEROES, 0, Some((16, false))).0, S_IOERR);
    r.mem.put(DATA, &seg(0, 1, 2));
    assert_eq!(r.run(T_WRITE_ZEROES, 0, Some((16, false))).0, S_UNSUPP);
    r.mem.put(DATA, &seg(0, 1, WZ_UNMAP));
    assert_eq!(r.run(T_DISCARD, 0, Some((16, false))).0, S_UNSUPP);
    assert_eq!(r.run(T_DISCARD, 0, Some((32, false))).0, S_UNSUPP);
    assert_eq!(r.run(T_DISCARD, 0, Some((8, false))).0, S_UNSUPP);
    assert_eq!(img.bytes(), before);
}

impl Block {
    fn read_config_u64(&self, off: u64) -> u64 {
        let mut b = [0u8; 8];
        self.read_config(off, &mut b);
        u64::from_le_bytes(b)
    }
}

/// A clock the test moves by hand.
fn manual_clock() -> (Arc<Mutex<Instant>>, crate::virtio::rate_limit::Clock) {
    let now = Arc::new(Mutex::new(Instant::now()));
    let n = now.clone();
    (now, Arc::new(move || *n.lock().unwrap()))
}

#[test]
fn a_limited_disk_serves_its_budget_and_the_rest_after_refill() {
    let img = Image::new();
    let mut r = Rig::new(&img, false);
    // 100 requests/s with 30 ms of burst: 3 at once, then one per 10 ms.
    let limits = Limits {
        bytes: None,
        ops: Some(100),
        burst_ms: 30,
    };
    r.blk.set_limits(limits);
    let timer = r.blk.refill_timer().expect("a limited disk has a timer");
    let (now, clock) = manual_clock();
    r.blk.throttle_mut().unwrap().set_clock(clock, limits);
    r.header(T_IN, 0);
    for _ in 0..5 {
        r.drv.post(
            &r.mem,
            &[(HDR, 16, false), (DATA, 512, true), (STATUS, 1, true)],
        );
    }
    assert!(r.blk.process(0, &mut r.q, &r.mem).unwrap());
    assert_eq!(r.drv.used_idx(&r.mem), 3, "only the burst is served");
    let t0 = *now.lock().unwrap();
    assert_eq!(timer.due(0), Some(t0 + Duration::from_millis(10)));
    // A notify before the refill serves nothing and does not spin.
    assert!(!r.blk.process(0, &mut r.q, &r.mem).unwrap());
    *now.lock().unwrap() += Duration::from_millis(10);
    assert_eq!(timer.take_due(*now.lock().unwrap()), vec![0]);
    assert!(r.blk.process(0, &mut r.q, &r.mem).unwrap());
    assert_eq!(r.drv.used_idx(&r.mem), 4);
    *now.lock().unwrap() += Duration::from_secs(1);
    assert!(r.blk.process(0, &mut r.q, &r.mem).unwrap());
    assert_eq!(r.drv.used_idx(&r.mem), 5);
    assert_eq!(r.mem.get(STATUS, 1)[0], S_OK);
}

#[test]
fn a_disk_byte_limit_lets_an_oversized_request_through_when_full() {
    let img = Image::new();
    let mut r = Rig::new(&img, false);
    // 10 KB/s, 100 ms: a 1000-byte bucket; an 8 KiB read still goes when it is full.
    let limits = Limits {
        bytes: Some(10_000),
        ops: None,
        burst_ms: 100,
    };
    r.blk.set_limits(limits);
    let (now, clock) = manual_clock();
    r.blk.throttle_mut().unwrap().set_clock(clock, limits);
    assert_eq!(r.run(T_IN, 0, Some((8192, true))).0, S_OK);
    // In debt: the next waits about 0.8 s.
    r.header(T_IN, 0);
    r.drv.post(
        &r.mem,
        &[(HDR, 16, false), (DATA, 512, true), (STATUS, 1, true)],
    );
    assert!(!r.blk.process(0, &mut r.q, &r.mem).unwrap());
    *now.lock().unwrap() += Duration::from_millis(800);
    assert!(r.blk.process(0, &mut r.q, &r.mem).unwrap());
}

#[test]
fn an_unlimited_disk_never_arms_its_timer() {
    let img = Image::new();
    let mut r = Rig::new(&img, false);
    let timer = r
        .blk
        .refill_timer()
        .expect("disks can be limited while they run");
    r.blk.set_limits(Limits::default());
    assert!(r.blk.throttle_mut().is_none());
    for _ in 0..50 {
        assert_eq!(r.run(T_IN, 0, Some((512, true))).0, S_OK);
    }
    assert_eq!(timer.due(0), None);
}

#[test]
fn limits_change_while_requests_wait_and_the_queue_is_served_again() {
    let img = Image::new();
    let mut r = Rig::new(&img, false);
    // 10 requests/s, 100 ms of burst: one at once, the next after 100 ms.
    let slow = Limits {
        bytes: None,
        ops: Some(10),
        burst_ms: 100,
    };
    r.blk.set_limits(slow);
    let timer = r.blk.refill_timer().unwrap();
    let (_now, clock) = manual_clock();
    r.blk.throttle_mut().unwrap().set_clock(clock, slow);
    r.header(T_IN, 0);
    for _ in 0..3 {
        r.drv.post(
            &r.mem,
            &[(HDR, 16, false), (DATA, 512, true), (STATUS, 1, true)],
        );
    }
    assert!(r.blk.process(0, &mut r.q, &r.mem).unwrap());
    assert_eq!(r.drv.used_idx(&r.mem), 1, "the burst of one");
    // Raised: the bucket keeps its (empty) level, so nothing goes before time passes, but
    // the waiting queue is due for a look at once rather than at the old rate's deadline.
    let fast = Limits {
        bytes: None,
        ops: Some(1000),
        burst_ms: 100,
    };
    assert!(r.blk.update_limits(&LimitSet::Disk(fast)));
    assert!(timer.due(0).unwrap() <= Instant::now());
    assert!(!r.blk.process(0, &mut r.q, &r.mem).unwrap());
    // A network device's limits are not a disk's: refused, nothing changes.
    assert!(!r.blk.update_limits(&LimitSet::Net { rx: fast, tx: fast }));
    // Lifted: the waiting requests go at once.
    assert!(r.blk.update_limits(&LimitSet::Disk(Limits::default())));
    assert!(r.blk.throttle_mut().is_none());
    assert!(r.blk.process(0, &mut r.q, &r.mem).unwrap());
    assert_eq!(r.drv.used_idx(&r.mem), 3);
}

#[test]
fn a_restored_disk_must_be_the_one_the_guest_knows() {
    let (a, b) = (Image::new(), Image::new());
    let state = Block::open(&a.0, false, "").unwrap().save_state();
    drop(a);
    let mut same = Block::open(&b.0, false, "").unwrap();
    same.restore_state(&state, &[QUEUE_SIZE]).unwrap();
    drop(same);
    let err = Block::open(&b.0, true, "")
        .unwrap()
        .restore_state(&state, &[QUEUE_SIZE])
        .unwrap_err();
    assert!(err.0.contains("without readonly=on"), "{err}");
    std::fs::OpenOptions::new()
        .write(true)
        .open(&b.0)
        .unwrap()
        .set_len(DISK * 2)
        .unwrap();
    let err = Block::open(&b.0, false, "")
        .unwrap()
        .restore_state(&state, &[QUEUE_SIZE])
        .unwrap_err();
    assert!(
        err.0
            .contains("1048576 bytes, but the image now is 2097152"),
        "{err}"
    );
}

#[test]
fn overlay_disks_through_the_queue() {
    let base = Image::new();
    let before = base.bytes();
    let ovl = Image(base.0.with_extension("ovl"));
    crate::virtio::cow::new_overlay_file(&base.0, &ovl.0).unwrap();
    let open = |ro| Block::open_disk(&ovl.0, Some(&base.0), ro, "").unwrap();
    let mut r = Rig::with(open(false));
    assert_eq!(r.blk.read_config_u64(0), DISK / SECTOR);
    assert_eq!(r.blk.features() & F_RO, 0);
    assert_eq!(r.run(T_IN, 3, Some((1024, true))).0, S_OK);
    assert_eq!(r.mem.get(DATA, 1024), before[1536..2560], "the base shows");

    let payload: Vec<u8> = (0..8192u32).map(|i| (i * 13) as u8).collect();
    r.mem.put(DATA, &payload);
    assert_eq!(r.run(T_OUT, 8, Some((8192, false))).0, S_OK);
    r.mem.put(DATA, &[0u8; 8192]);
    assert_eq!(r.run(T_IN, 8, Some((8192, true))).0, S_OK);
    assert_eq!(r.mem.get(DATA, 8192), payload);
    // Cluster 0's bit reaches the file on a snapshot (and on FLUSH), not before.
    let bitmap = || std::fs::read(&ovl.0).unwrap()[4096];
    assert_eq!(bitmap(), 0);
    let _ = r.blk.save_state();
    assert_eq!(bitmap(), 1);

    // Zeroes over clusters 1 and 2 (sectors 128..384) and the start of 3.
    let mut seg = [0u8; 16];
    seg[..8].copy_from_slice(&128u64.to_le_bytes());
    seg[8..12].copy_from_slice(&300u32.to_le_bytes());
    r.mem.put(DATA, &seg);
    assert_eq!(r.run(T_WRITE_ZEROES, 0, Some((16, false))).0, S_OK);
    assert_eq!(r.run(T_FLUSH, 0, None).0, S_OK);
    assert_eq!(bitmap(), 0b1111);
    assert_eq!(r.run(T_IN, 120, Some((8192, true))).0, S_OK);
    let got = r.mem.get(DATA, 8192);
    assert_eq!(got[..4096], before[120 * 512..128 * 512]);
    assert!(got[4096..].iter().all(|&b| b == 0));
    let last = DISK / SECTOR - 1;
    assert_eq!(r.run(T_OUT, last, Some((1024, false))).0, S_IOERR);
    assert_eq!(r.run(T_IN, last, Some((1024, true))).0, S_IOERR);
    assert_eq!(base.bytes(), before, "the base is never written");
    drop(r);

    let mut r = Rig::with(open(true));
    assert_ne!(r.blk.features() & F_RO, 0);
    assert_eq!(r.run(T_OUT, 8, Some((512, false))).0, S_IOERR);
    assert_eq!(r.run(T_IN, 8, Some((8192, true))).0, S_OK);
    assert_eq!(r.mem.get(DATA, 8192), payload);
    assert_eq!(r.refused(), 0);
}

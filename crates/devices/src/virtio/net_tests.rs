use super::*;
use crate::virtio::fuzz::Frames;
use crate::virtio::rate_limit::{Limits, RefillTimer};
use crate::virtio::testmem::{BASE, Driver, SIZE, TestMemory};
use std::os::unix::net::UnixDatagram;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const DATA: u64 = BASE + 0x10000;

struct Rig {
    mem: TestMemory,
    drv: Driver,
    q: Queue,
    net: Net,
    peer: UnixDatagram,
    offload: Arc<AtomicU32>,
}

const MAC: [u8; 6] = [0x52, 0x54, 0, 0x12, 0x34, 0x56];

impl Rig {
    fn new(features: u64) -> Rig {
        let (a, peer) = UnixDatagram::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        // Room for a few 64 KiB frames in the socket.
        let io = Frames::new(a);
        let offload = io.offload.clone();
        let mut net = Net::new(Box::new(io), MAC).unwrap();
        net.activate(features | crate::virtio::F_VERSION_1);
        let drv = Driver::new(16);
        let q = drv.queue(QUEUE_SIZE);
        Rig {
            mem: TestMemory::new(),
            drv,
            q,
            net,
            peer,
            offload,
        }
    }

    fn run(&mut self, index: usize) -> Result<bool, QueueError> {
        self.net.process(index, &mut self.q, &self.mem)
    }

    fn refused(&self) -> usize {
        self.mem.refused.load(Ordering::SeqCst)
    }
}

fn frame(len: usize, seed: u8) -> Vec<u8> {
    let mut f: Vec<u8> = (0..len).map(|i| (i as u8).wrapping_mul(7) ^ seed).collect();
    f[..HDR_LEN].fill(0);
    f[0] = 1; // NEEDS_CSUM, passed through untouched
    f
}

#[test]
fn config_space_has_the_mac_and_link_up() {
    let rig = Rig::new(0);
    let mut c = [0u8; 10];
    rig.net.read_config(0, &mut c);
    assert_eq!(&c[..6], &MAC);
    assert_eq!(u16::from_le_bytes([c[6], c[7]]), 1);
    let mut past = [0xffu8; 4];
    rig.net.read_config(100, &mut past);
    assert_eq!(past, [0; 4]);
    assert_eq!(rig.net.features() & F_MRG_RXBUF, F_MRG_RXBUF);
}

#[test]
fn transmit_gathers_a_chain_into_one_frame() {
    let mut rig = Rig::new(0);
    let f = frame(1514 + HDR_LEN, 3);
    rig.mem.put(DATA, &f[..HDR_LEN]);
    rig.mem.put(DATA + 0x1000, &f[HDR_LEN..100]);
    rig.mem.put(DATA + 0x3000, &f[100..]);
    rig.drv.post(
        &rig.mem,
        &[
            (DATA, HDR_LEN as u32, false),
            (DATA + 0x1000, 100 - HDR_LEN as u32, false),
            (DATA + 0x3000, (f.len() - 100) as u32, false),
        ],
    );
    assert!(rig.run(TX_QUEUE).unwrap());
    assert_eq!(rig.drv.used_idx(&rig.mem), 1);
    assert_eq!(rig.drv.used_elem(&rig.mem, 0), (0, 0));
    let mut got = vec![0u8; 70000];
    let n = rig.peer.recv(&mut got).unwrap();
    assert_eq!(&got[..n], &f[..]);
    assert_eq!(rig.net.stats().tx_frames, 1);
    assert_eq!(rig.net.stats().tx_bytes, 1514);
}

#[test]
fn receive_merges_buffers_and_sets_num_buffers() {
    let mut rig = Rig::new(F_MRG_RXBUF | F_GUEST_CSUM | F_GUEST_TSO4);
    assert_eq!(
        rig.offload.load(Ordering::SeqCst),
        TUN_F_CSUM | TUN_F_TSO4,
        "negotiated offloads reach the backend"
    );
    let f = frame(HDR_LEN + 3000, 9);
    rig.peer.send(&f).unwrap();
    for k in 0..3 {
        rig.drv.post(&rig.mem, &[(DATA + k * 0x1000, 2048, true)]);
    }
    assert!(rig.run(RX_QUEUE).unwrap());
    assert_eq!(rig.drv.used_idx(&rig.mem), 2, "two chains for one frame");
    assert_eq!(rig.drv.used_elem(&rig.mem, 0), (0, 2048));
    assert_eq!(rig.drv.used_elem(&rig.mem, 1), (1, (f.len() - 2048) as u32));
    let mut want = f.clone();
    want[10..12].copy_from_slice(&2u16.to_le_bytes());
    let mut got = rig.mem.get(DATA, 2048);
    got.extend(rig.mem.get(DATA + 0x1000, f.len() - 2048));
    assert_eq!(got, want);
    assert!(
        rig.net.signal.watching(),
        "the backend is drained: keep watching"
    );
    // The third chain is still posted and takes the next frame.
    let g = frame(HDR_LEN + 60, 1);
    rig.peer.send(&g).unwrap();
    assert!(rig.run(RX_QUEUE).unwrap());
    assert_eq!(rig.drv.used_elem(&rig.mem, 2), (2, g.len() as u32));
    assert_eq!(rig.mem.get(DATA + 0x2000 + 10, 2), vec![1, 0]);
    assert_eq!(rig.net.stats().rx_frames, 2);
}

#[test]
fn a_frame_waits_for_buffers_without_watching_the_backend() {
    let mut rig = Rig::new(F_MRG_RXBUF);
    let f = frame(HDR_LEN + 3000, 5);
    rig.peer.send(&f).unwrap();
    // One chain is too little for the frame: nothing is used, the chain stays posted.
    rig.drv.post(&rig.mem, &[(DATA, 2048, true)]);
    assert!(!rig.run(RX_QUEUE).unwrap());
    assert_eq!(rig.drv.used_idx(&rig.mem), 0);
    assert!(
        !rig.net.signal.watching(),
        "no busy polling while the guest has no room"
    );
    rig.drv.post(&rig.mem, &[(DATA + 0x1000, 2048, true)]);
    assert!(
        rig.run(RX_QUEUE).unwrap(),
        "the guest's notify delivers the waiting frame"
    );
    assert_eq!(rig.drv.used_idx(&rig.mem), 2);
    assert!(rig.net.signal.watching());
}

#[test]
fn without_merging_a_frame_too_large_for_a_chain_is_dropped() {
    let mut rig = Rig::new(0);
    rig.peer.send(&frame(HDR_LEN + 3000, 5)).unwrap();
    rig.peer.send(&frame(HDR_LEN + 100, 6)).unwrap();
    rig.drv.post(&rig.mem, &[(DATA, 1600, true)]);
    assert!(rig.run(RX_QUEUE).unwrap());
    assert_eq!(
        rig.drv.used_idx(&rig.mem),
        1,
        "the small frame used the chain"
    );
    assert_eq!(rig.drv.used_elem(&rig.mem, 0), (0, HDR_LEN as u32 + 100));
    assert_eq!(rig.net.stats().rx_dropped, 1);
    assert_eq!(rig.mem.get(DATA + 10, 2), vec![1, 0], "num_buffers is 1");
}

#[test]
fn hostile_transmit_chains_need_reset() {
    // Device-writable buffers, shorter than the header, longer than the largest frame,
    // outside RAM.
    let cases: [&[(u64, u32, bool)]; 4] = [
        &[(DATA, 64, false), (DATA + 0x1000, 64, true)],
        &[(DATA, HDR_LEN as u32 - 1, false)],
        &[
            (DATA, 0x8000, false),
            (DATA + 0x8000, 0x8000, false),
            (DATA, 0x8000, false),
        ],
        &[(BASE + SIZE - 16, 64, false)],
    ];
    for bufs in cases {
        let mut rig = Rig::new(0);
        rig.drv.post(&rig.mem, bufs);
        assert!(rig.run(TX_QUEUE).is_err(), "{bufs:?}");
        assert_eq!(rig.drv.used_idx(&rig.mem), 0);
        assert_eq!(rig.refused(), 0, "nothing touched outside RAM");
        let mut buf = [0u8; 16];
        rig.peer.set_nonblocking(true).unwrap();
        assert!(rig.peer.recv(&mut buf).is_err(), "no frame left the device");
    }
}

#[test]
fn hostile_receive_chains_need_reset() {
    let cases: [&[(u64, u32, bool)]; 4] = [
        &[(DATA, 64, false), (DATA + 0x1000, 2048, true)],
        &[(DATA, HDR_LEN as u32 - 1, true)],
        &[(BASE + SIZE - 1024, 2048, true)],
        &[(u64::MAX - 10, 2048, true)],
    ];
    for bufs in cases {
        let mut rig = Rig::new(F_MRG_RXBUF);
        rig.peer.send(&frame(HDR_LEN + 100, 1)).unwrap();
        rig.drv.post(&rig.mem, bufs);
        assert!(rig.run(RX_QUEUE).is_err(), "{bufs:?}");
        assert_eq!(rig.drv.used_idx(&rig.mem), 0);
        assert_eq!(rig.refused(), 0, "nothing touched outside RAM");
    }
}

#[test]
fn reset_turns_offloads_off_and_forgets_the_waiting_frame() {
    let mut rig = Rig::new(F_MRG_RXBUF | F_GUEST_CSUM);
    assert_eq!(rig.offload.load(Ordering::SeqCst), TUN_F_CSUM);
    rig.peer.send(&frame(HDR_LEN + 100, 1)).unwrap();
    assert!(!rig.run(RX_QUEUE).unwrap());
    assert!(rig.net.pending.is_some());
    rig.net.reset();
    assert_eq!(rig.offload.load(Ordering::SeqCst), 0);
    assert!(rig.net.pending.is_none());
    assert!(!rig.net.signal.watching());
}

#[test]
fn the_worker_delivers_frames_as_they_arrive_and_stops() {
    let rig = Rig::new(F_MRG_RXBUF);
    let Rig {
        mem,
        mut drv,
        q,
        net,
        peer,
        ..
    } = rig;
    let mem = Arc::new(mem);
    for k in 0..4 {
        drv.post(&mem, &[(DATA + k * 0x1000, 2048, true)]);
    }
    let dev = Arc::new(Mutex::new((net, q)));
    let (d, m) = (dev.clone(), mem.clone());
    let kicks = Arc::new(AtomicU32::new(0));
    let k = kicks.clone();
    let source = dev.lock().unwrap().0.rx_source().unwrap();
    let worker = source
        .spawn(
            "test",
            Box::new(move || {
                k.fetch_add(1, Ordering::SeqCst);
                let mut g = d.lock().unwrap();
                let (net, q) = &mut *g;
                net.process(RX_QUEUE, q, &*m).is_ok()
            }),
        )
        .unwrap();
    let wait_used = |n: u16| {
        let t = Instant::now();
        while drv.used_idx(&mem) < n {
            assert!(t.elapsed() < Duration::from_secs(5), "frame not delivered");
            std::thread::sleep(Duration::from_millis(5));
        }
    };
    peer.send(&frame(HDR_LEN + 200, 1)).unwrap();
    wait_used(1);
    // Paused: nothing is delivered.
    worker.signal().set_paused(true);
    std::thread::sleep(Duration::from_millis(50));
    peer.send(&frame(HDR_LEN + 200, 2)).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(drv.used_idx(&mem), 1, "no delivery while paused");
    let before = kicks.load(Ordering::SeqCst);
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(
        kicks.load(Ordering::SeqCst),
        before,
        "no spinning while paused"
    );
    worker.signal().set_paused(false);
    wait_used(2);
    drop(worker); // joins the thread
    peer.send(&frame(HDR_LEN + 200, 3)).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(drv.used_idx(&mem), 2, "a stopped worker delivers nothing");
}

/// Random descriptor tables on both queues (addresses in, across and outside RAM, any
/// lengths and flags, loops): the device never panics and never touches memory outside RAM.
#[test]
fn random_chains_never_panic_or_escape_ram() {
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    for round in 0..300 {
        let mut rig = Rig::new(if round % 2 == 0 { F_MRG_RXBUF } else { 0 });
        let _ = rig.peer.send(&frame(HDR_LEN + (next() % 5000) as usize, 1));
        for i in 0..16u16 {
            let addr = match next() % 4 {
                0 => DATA + next() % 0x8000,
                1 => BASE + SIZE - next() % 0x100,
                2 => next(),
                _ => BASE + next() % SIZE,
            };
            let len = match next() % 3 {
                0 => (next() % 0x2000) as u32,
                1 => next() as u32,
                _ => 0,
            };
            let flags = (next() % 8) as u16 & 3;
            rig.drv
                .set_desc(&rig.mem, i, addr, len, flags, (next() % 20) as u16);
        }
        for _ in 0..(next() % 20) {
            rig.drv.publish(&rig.mem, (next() % 18) as u16);
        }
        let _ = rig.run(RX_QUEUE);
        let _ = rig.run(TX_QUEUE);
        assert_eq!(rig.refused(), 0, "round {round}");
    }
}

/// Limits `rig`'s device with a clock the test moves by hand.
fn limit(rig: &mut Rig, rx: Limits, tx: Limits) -> (Arc<Mutex<Instant>>, Arc<RefillTimer>) {
    rig.net.set_limits(rx, tx);
    let now = Arc::new(Mutex::new(Instant::now()));
    let n = now.clone();
    let clock: crate::virtio::rate_limit::Clock = Arc::new(move || *n.lock().unwrap());
    let (r, t) = rig.net.throttles_mut();
    if let Some(r) = r {
        r.set_clock(clock.clone(), rx);
    }
    if let Some(t) = t {
        t.set_clock(clock, tx);
    }
    (now, rig.net.refill_timer().unwrap())
}

#[test]
fn a_transmit_frame_limit_leaves_the_rest_in_the_ring_until_refill() {
    let mut rig = Rig::new(0);
    // 100 frames/s, 20 ms of burst: 2 at once, then one per 10 ms.
    let tx = Limits {
        bytes: None,
        ops: Some(100),
        burst_ms: 20,
    };
    let (now, timer) = limit(&mut rig, Limits::default(), tx);
    let f = frame(HDR_LEN + 100, 1);
    rig.mem.put(DATA, &f);
    for _ in 0..4 {
        rig.drv.post(&rig.mem, &[(DATA, f.len() as u32, false)]);
    }
    assert!(rig.run(TX_QUEUE).unwrap());
    assert_eq!(rig.drv.used_idx(&rig.mem), 2);
    assert_eq!(rig.net.stats().tx_frames, 2);
    let t0 = *now.lock().unwrap();
    assert_eq!(timer.due(TX_QUEUE), Some(t0 + Duration::from_millis(10)));
    *now.lock().unwrap() += Duration::from_millis(10);
    assert_eq!(timer.take_due(*now.lock().unwrap()), vec![TX_QUEUE]);
    assert!(rig.run(TX_QUEUE).unwrap());
    assert_eq!(rig.net.stats().tx_frames, 3);
    *now.lock().unwrap() += Duration::from_secs(1);
    assert!(rig.run(TX_QUEUE).unwrap());
    assert_eq!(rig.drv.used_idx(&rig.mem), 4);
}

#[test]
fn a_receive_byte_limit_holds_the_frame_and_stops_watching_the_backend() {
    let mut rig = Rig::new(0);
    // 10 KB/s, 100 ms: a 1000-byte bucket, so one 600-byte frame at a time.
    let rx = Limits {
        bytes: Some(10_000),
        ops: None,
        burst_ms: 100,
    };
    let (now, timer) = limit(&mut rig, rx, Limits::default());
    for k in 0..3 {
        rig.peer.send(&frame(HDR_LEN + 600, k)).unwrap();
        rig.drv
            .post(&rig.mem, &[(DATA + u64::from(k) * 0x1000, 2048, true)]);
    }
    assert!(rig.run(RX_QUEUE).unwrap());
    assert_eq!(rig.net.stats().rx_frames, 1);
    assert!(!rig.net.signal.watching(), "no polling while out of tokens");
    let t0 = *now.lock().unwrap();
    // 200 more bytes are needed: 20 ms.
    assert_eq!(timer.due(RX_QUEUE), Some(t0 + Duration::from_millis(20)));
    // The guest posting buffers meanwhile delivers nothing.
    assert!(!rig.run(RX_QUEUE).unwrap());
    *now.lock().unwrap() += Duration::from_millis(20);
    assert!(rig.run(RX_QUEUE).unwrap());
    assert_eq!(rig.net.stats().rx_frames, 2);
    *now.lock().unwrap() += Duration::from_secs(1);
    assert!(rig.run(RX_QUEUE).unwrap());
    assert_eq!(rig.net.stats().rx_frames, 3);
    assert!(
        rig.net.signal.watching(),
        "drained and under budget: watch again"
    );
    assert_eq!(rig.drv.used_idx(&rig.mem), 3);
}

#[test]
fn lifting_a_receive_limit_delivers_the_held_frame_and_watches_again() {
    let mut rig = Rig::new(0);
    let rx = Limits {
        bytes: Some(10_000),
        ops: None,
        burst_ms: 100,
    };
    let (_now, timer) = limit(&mut rig, rx, Limits::default());
    for k in 0..2 {
        rig.peer.send(&frame(HDR_LEN + 600, k)).unwrap();
        rig.drv
            .post(&rig.mem, &[(DATA + u64::from(k) * 0x1000, 2048, true)]);
    }
    assert!(rig.run(RX_QUEUE).unwrap());
    assert_eq!(rig.net.stats().rx_frames, 1);
    assert!(!rig.net.signal.watching());
    // Disk limits do not fit a network device: refused, nothing changes.
    assert!(!rig.net.update_limits(&LimitSet::Disk(rx)));
    assert!(!rig.net.signal.watching());
    let lifted = LimitSet::Net {
        rx: Limits::default(),
        tx: Limits::default(),
    };
    assert!(rig.net.update_limits(&lifted));
    // The refill thread would kick the receive queue now; the held frame goes at once.
    assert!(timer.due(RX_QUEUE).unwrap() <= Instant::now());
    assert!(rig.run(RX_QUEUE).unwrap());
    assert_eq!(rig.net.stats().rx_frames, 2);
    assert!(rig.net.signal.watching());
}

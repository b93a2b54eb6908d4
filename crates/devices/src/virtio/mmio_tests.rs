use super::*;
use crate::virtio::rng::Rng;
use crate::virtio::testmem::{BASE, Driver, F_NEXT, TestMemory};
use std::sync::atomic::{AtomicBool, Ordering};

#[derive(Default)]
struct Line(AtomicBool);

impl IrqLine for Line {
    fn set_level(&self, high: bool) {
        self.0.store(high, Ordering::SeqCst);
    }
}

struct Rig {
    t: MmioTransport,
    mem: Arc<TestMemory>,
    line: Arc<Line>,
    drv: Driver,
}

impl Rig {
    fn new() -> Rig {
        Rig::with(Box::new(Rng::new()))
    }
    fn with(device: Box<dyn VirtioDevice>) -> Rig {
        let mem = Arc::new(TestMemory::new());
        let line = Arc::new(Line::default());
        let t = MmioTransport::new(device, mem.clone(), line.clone());
        Rig {
            t,
            mem,
            line,
            drv: Driver::new(8),
        }
    }
    fn rd(&mut self, off: u64) -> u32 {
        let mut b = [0u8; 4];
        self.t.read(off, &mut b);
        u32::from_le_bytes(b)
    }
    fn wr(&mut self, off: u64, v: u32) {
        self.t.write(off, &v.to_le_bytes());
    }
    fn irq(&self) -> bool {
        self.line.0.load(Ordering::SeqCst)
    }

    /// The Linux driver's bring-up sequence, with queue 0 at the driver's rings.
    fn bring_up(&mut self) {
        self.bring_up_with(&[]);
    }

    /// Same, with more queues (index, rings) set up before DRIVER_OK.
    fn bring_up_with(&mut self, more: &[(u32, &Driver)]) {
        self.wr(R_STATUS, 0);
        self.wr(R_STATUS, S_ACKNOWLEDGE);
        self.wr(R_STATUS, S_ACKNOWLEDGE | S_DRIVER);
        self.wr(R_DRIVER_FEATURES_SEL, 1);
        self.wr(R_DRIVER_FEATURES, 1); // VERSION_1
        self.wr(R_DRIVER_FEATURES_SEL, 0);
        self.wr(R_DRIVER_FEATURES, 0);
        self.wr(R_STATUS, S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK);
        assert_ne!(self.rd(R_STATUS) & S_FEATURES_OK, 0);
        self.wr(R_QUEUE_SEL, 0);
        assert_eq!(self.rd(R_QUEUE_READY), 0);
        self.wr(R_QUEUE_NUM, u32::from(self.drv.size));
        for (reg, addr) in [
            (R_QUEUE_DESC_LOW, self.drv.desc),
            (R_QUEUE_DRIVER_LOW, self.drv.avail),
            (R_QUEUE_DEVICE_LOW, self.drv.used),
        ] {
            self.wr(reg, addr as u32);
            self.wr(reg + 4, (addr >> 32) as u32);
        }
        self.wr(R_QUEUE_READY, 1);
        assert_eq!(self.rd(R_QUEUE_READY), 1);
        for &(i, d) in more {
            self.wr(R_QUEUE_SEL, i);
            self.wr(R_QUEUE_NUM, u32::from(d.size));
            for (reg, addr) in [
                (R_QUEUE_DESC_LOW, d.desc),
                (R_QUEUE_DRIVER_LOW, d.avail),
                (R_QUEUE_DEVICE_LOW, d.used),
            ] {
                self.wr(reg, addr as u32);
                self.wr(reg + 4, (addr >> 32) as u32);
            }
            self.wr(R_QUEUE_READY, 1);
        }
        self.wr(
            R_STATUS,
            S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK,
        );
        assert_eq!(self.rd(R_STATUS) & S_NEEDS_RESET, 0);
    }
}

const DATA: u64 = BASE + 0x10000;

#[test]
fn identifies_and_serves_a_queue_with_level_interrupts() {
    let mut r = Rig::new();
    assert_eq!(r.rd(R_MAGIC), MAGIC);
    assert_eq!(r.rd(R_VERSION), 2);
    assert_eq!(r.rd(R_DEVICE_ID), 4);
    r.wr(R_DEVICE_FEATURES_SEL, 1);
    assert_eq!(r.rd(R_DEVICE_FEATURES), 1, "VERSION_1 is offered");
    r.wr(R_DEVICE_FEATURES_SEL, 7);
    assert_eq!(r.rd(R_DEVICE_FEATURES), 0);
    assert_eq!(r.rd(R_QUEUE_NUM_MAX), 64);
    r.wr(R_QUEUE_SEL, 1);
    assert_eq!(r.rd(R_QUEUE_NUM_MAX), 0, "no queue 1");
    assert_eq!(r.rd(R_SHM_LEN_LOW), u32::MAX);
    r.bring_up();
    r.drv.post(&r.mem, &[(DATA, 16, true)]);
    assert!(!r.irq());
    r.wr(R_QUEUE_NOTIFY, 0);
    assert_eq!(r.drv.used_idx(&r.mem), 1);
    assert!(r.irq());
    assert_eq!(r.rd(R_INTERRUPT_STATUS), INT_USED);
    r.wr(R_INTERRUPT_ACK, INT_USED);
    assert!(!r.irq());
    // Notifying a queue that does not exist does nothing.
    r.wr(R_QUEUE_NOTIFY, 9);
    assert_eq!(r.rd(R_STATUS) & S_NEEDS_RESET, 0);
    assert_eq!(r.mem.refused.load(Ordering::SeqCst), 0);
}

#[test]
fn feature_negotiation_requires_version_1() {
    let mut r = Rig::new();
    r.wr(R_STATUS, S_ACKNOWLEDGE | S_DRIVER);
    r.wr(R_STATUS, S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK);
    assert_eq!(
        r.rd(R_STATUS) & S_FEATURES_OK,
        0,
        "legacy drivers are refused"
    );
    r.wr(R_STATUS, 0);
    r.wr(R_STATUS, S_ACKNOWLEDGE | S_DRIVER);
    r.wr(R_DRIVER_FEATURES_SEL, 1);
    r.wr(R_DRIVER_FEATURES, 1 | 2); // VERSION_1 and an unoffered bit
    r.wr(R_STATUS, S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK);
    assert_eq!(
        r.rd(R_STATUS) & S_FEATURES_OK,
        0,
        "unoffered features are refused"
    );
    // DRIVER_OK without FEATURES_OK.
    r.wr(R_STATUS, S_ACKNOWLEDGE | S_DRIVER | S_DRIVER_OK);
    assert_ne!(r.rd(R_STATUS) & S_NEEDS_RESET, 0);
    r.wr(R_STATUS, 0);
    assert_eq!(r.rd(R_STATUS), 0, "reset clears NEEDS_RESET");
    r.bring_up();
}

#[test]
fn invalid_queues_need_reset() {
    for (reg, val) in [
        (R_QUEUE_NUM, 3),           // not a power of two
        (R_QUEUE_NUM, 128),         // above the maximum
        (R_QUEUE_DESC_LOW, 8),      // outside RAM and misaligned
        (R_QUEUE_DEVICE_LOW, 0),    // outside RAM
        (R_QUEUE_DRIVER_HIGH, 0x1), // far above RAM
    ] {
        let mut r = Rig::new();
        r.wr(R_STATUS, S_ACKNOWLEDGE | S_DRIVER);
        r.wr(R_DRIVER_FEATURES_SEL, 1);
        r.wr(R_DRIVER_FEATURES, 1);
        r.wr(R_STATUS, S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK);
        r.wr(R_QUEUE_NUM, 8);
        r.wr(R_QUEUE_DESC_LOW, r.drv.desc as u32);
        r.wr(R_QUEUE_DRIVER_LOW, r.drv.avail as u32);
        r.wr(R_QUEUE_DEVICE_LOW, r.drv.used as u32);
        r.wr(reg, val);
        r.wr(R_QUEUE_READY, 1);
        assert_eq!(r.rd(R_QUEUE_READY), 0, "{reg:#x}={val:#x}");
        assert_ne!(r.rd(R_STATUS) & S_NEEDS_RESET, 0, "{reg:#x}={val:#x}");
        assert_eq!(r.mem.refused.load(Ordering::SeqCst), 0);
    }
}

#[test]
fn a_corrupt_ring_needs_reset_and_the_device_recovers() {
    let mut r = Rig::new();
    r.bring_up();
    r.drv.set_desc(&r.mem, 0, DATA, 8, F_NEXT, 0); // a self loop
    r.drv.publish(&r.mem, 0);
    r.wr(R_QUEUE_NOTIFY, 0);
    assert_ne!(r.rd(R_STATUS) & S_NEEDS_RESET, 0);
    assert_eq!(r.rd(R_INTERRUPT_STATUS), INT_CONFIG);
    assert!(
        r.irq(),
        "the driver is told through a config-change interrupt"
    );
    // Further notifications are ignored until reset; the driver may not clear bits itself.
    r.drv.post(&r.mem, &[(DATA, 8, true)]);
    r.wr(R_QUEUE_NOTIFY, 0);
    assert_eq!(r.drv.used_idx(&r.mem), 0);
    r.wr(R_STATUS, 0);
    assert!(!r.irq());
    assert_eq!(r.rd(R_QUEUE_READY), 0, "reset forgets the queues");
    r.mem.put(r.drv.avail + 2, &0u16.to_le_bytes());
    r.drv = Driver::new(8);
    r.bring_up();
    r.drv.post(&r.mem, &[(DATA, 8, true)]);
    r.wr(R_QUEUE_NOTIFY, 0);
    assert_eq!(r.drv.used_idx(&r.mem), 1);
}

#[test]
fn reset_in_the_middle_of_io_drops_pending_chains() {
    let mut r = Rig::new();
    r.bring_up();
    r.drv.post(&r.mem, &[(DATA, 8, true)]);
    r.drv.post(&r.mem, &[(DATA + 8, 8, true)]);
    r.wr(R_STATUS, 0);
    r.wr(R_QUEUE_NOTIFY, 0);
    assert_eq!(r.drv.used_idx(&r.mem), 0, "a reset device serves nothing");
    assert!(r.mem.get(DATA, 16).iter().all(|&b| b == 0));
    // Queue registers written while the device runs are ignored.
    r.bring_up();
    r.wr(R_QUEUE_NUM, 2);
    r.wr(R_QUEUE_DESC_LOW, 0);
    r.wr(R_QUEUE_NOTIFY, 0);
    assert_eq!(r.rd(R_STATUS) & S_NEEDS_RESET, 0);
}

#[test]
fn odd_accesses_are_harmless() {
    let mut r = Rig::new();
    let mut b = [0xffu8; 2];
    r.t.read(R_MAGIC, &mut b);
    assert_eq!(b, [0, 0], "registers are 32-bit only");
    r.t.write(R_STATUS, &[1, 0]);
    assert_eq!(r.rd(R_STATUS), 0);
    r.wr(R_MAGIC + 2, 5);
    let mut c = [0xffu8; 8];
    r.t.read(CONFIG + 0xe00, &mut c);
    assert_eq!(c, [0; 8], "config space past its end reads as zero");
    r.bring_up();
    r.wr(R_STATUS, S_ACKNOWLEDGE);
    assert_ne!(r.rd(R_STATUS) & S_NEEDS_RESET, 0, "clearing status bits");
}

#[test]
fn kick_serves_a_queue_only_while_the_device_runs() {
    let mut r = Rig::new();
    r.drv.post(&r.mem, &[(DATA, 16, true)]);
    assert!(!r.t.kick(0), "not set up: the caller must stop waiting");
    assert_eq!(r.drv.used_idx(&r.mem), 0);
    r.bring_up();
    assert!(r.t.kick(0));
    assert_eq!(r.drv.used_idx(&r.mem), 1, "a kick serves like a notify");
    assert!(r.irq());
    assert!(!r.t.kick(5), "no such queue");
    r.drv.set_desc(&r.mem, 0, DATA, 8, F_NEXT, 0); // a self loop
    r.drv.publish(&r.mem, 0);
    assert!(!r.t.kick(0), "broken by the kick itself: stop waiting");
    assert_ne!(r.rd(R_STATUS) & S_NEEDS_RESET, 0);
}

#[test]
fn a_throttled_queue_is_served_by_the_refill_thread_through_kick() {
    use crate::virtio::block::Block;
    use crate::virtio::rate_limit::Limits;
    use std::sync::Mutex;
    use std::time::{Duration, Instant};
    let img = std::env::temp_dir().join(format!("vme-refill-test-{}.img", std::process::id()));
    std::fs::File::create(&img)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let mut blk = Block::open(&img, true, "").unwrap();
    // 10 requests/s with 100 ms of burst: one at once, the next up to 100 ms later.
    blk.set_limits(Limits {
        bytes: None,
        ops: Some(10),
        burst_ms: 100,
    });
    let timer = blk.refill_timer().unwrap();
    let mut rig = Rig::with(Box::new(blk));
    rig.bring_up();
    let (hdr, data, status) = (DATA, DATA + 0x1000, DATA + 0x2000);
    // Two requests of three descriptors fit the rig's 8-entry ring.
    for _ in 0..2 {
        rig.drv.post(
            &rig.mem,
            &[(hdr, 16, false), (data, 512, true), (status, 1, true)],
        );
    }
    let Rig { t, mem, drv, .. } = rig;
    let t = Arc::new(Mutex::new(t));
    let k = t.clone();
    let worker = timer
        .spawn("test", Box::new(move |q| k.lock().unwrap().kick(q)))
        .unwrap();
    t.lock().unwrap().write(R_QUEUE_NOTIFY, &0u32.to_le_bytes());
    let st = t.lock().unwrap().status();
    assert_eq!(
        drv.used_idx(&mem),
        1,
        "the notify serves only the budget ({st:#x})"
    );
    let due = timer.due(0).expect("the refused request armed the timer");
    let start = Instant::now();
    while drv.used_idx(&mem) < 2 {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "the refill thread never served the rest"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(Instant::now() >= due, "served before the tokens were back");
    assert_eq!(t.lock().unwrap().status() & S_NEEDS_RESET, 0);
    drop(worker);
    let _ = std::fs::remove_file(&img);
}

/// A transport for `device` on the rig's memory, given `state`.
fn restored(
    r: &Rig,
    device: Box<dyn VirtioDevice>,
    state: &MmioState,
) -> Result<(MmioTransport, Arc<Line>), crate::virtio::StateError> {
    let line = Arc::new(Line::default());
    let mut t = MmioTransport::new(device, r.mem.clone(), line.clone());
    t.restore(state)?;
    Ok((t, line))
}

#[test]
fn state_round_trips_and_the_restored_device_goes_on_serving() {
    let mut r = Rig::new();
    r.bring_up();
    r.drv.post(&r.mem, &[(DATA, 16, true)]);
    r.wr(R_QUEUE_NOTIFY, 0);
    let state = r.t.state();
    assert_eq!(state.interrupt_status, INT_USED);
    assert_eq!(
        (
            state.core.queues[0].next_avail,
            state.core.queues[0].next_used
        ),
        (1, 1)
    );
    let (mut t, line) = restored(&r, Box::new(Rng::new()), &state).unwrap();
    assert_eq!(t.state(), state);
    assert!(
        line.0.load(Ordering::SeqCst),
        "the pending interrupt holds the line"
    );
    // The guest goes on where it was: its next chain is served at the next ring slot.
    r.drv.post(&r.mem, &[(DATA + 64, 16, true)]);
    t.write(R_QUEUE_NOTIFY, &0u32.to_le_bytes());
    assert_eq!(r.drv.used_idx(&r.mem), 2);
    assert_eq!(r.drv.used_elem(&r.mem, 1).1, 16);
    // A chain made available before the snapshot and not served is served on restore.
    r.drv.post(&r.mem, &[(DATA + 128, 16, true)]);
    let (mut t, _) = restored(&r, Box::new(Rng::new()), &t.state()).unwrap();
    t.kick_ready_queues();
    assert_eq!(r.drv.used_idx(&r.mem), 3);
}

#[test]
fn states_that_cannot_be_reached_or_do_not_fit_are_refused() {
    let mut r = Rig::new();
    r.bring_up();
    let good = r.t.state();
    type Edit = Box<dyn Fn(&mut MmioState)>;
    let cases: Vec<(&str, Edit)> = vec![
        (
            "bits that do not exist",
            Box::new(|s| s.interrupt_status = 4),
        ),
        ("status 0x104", Box::new(|s| s.core.status = 0x104)),
        (
            "cannot be reached",
            Box::new(|s| s.core.status = S_DRIVER_OK),
        ),
        (
            "does not offer",
            Box::new(|s| s.core.driver_features |= 1 << 40),
        ),
        (
            "2 queues saved",
            Box::new(|s| s.core.queues.push(s.core.queues[0].clone())),
        ),
        (
            "queue 0: queue size 3",
            Box::new(|s| s.core.queues[0].size = 3),
        ),
        (
            "queue 0: descriptor table area",
            Box::new(|s| s.core.queues[0].desc_addr = 1 << 40),
        ),
        (
            "holds 9 chains",
            Box::new(|s| s.core.queues[0].next_avail = 9),
        ),
        (
            "not ready has ring positions",
            Box::new(|s| {
                s.core.queues[0].ready = false;
                s.core.queues[0].next_used = 1;
            }),
        ),
        (
            "not an rng's",
            Box::new(|s| {
                s.core.device =
                    crate::virtio::DeviceState::Vsock(crate::virtio::vsock::VsockState { cid: 3 })
            }),
        ),
    ];
    for (want, edit) in cases {
        let mut bad = good.clone();
        edit(&mut bad);
        let err = restored(&r, Box::new(Rng::new()), &bad)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains(want), "{want:?} not in {err:?}");
    }
    let balloon = crate::virtio::balloon::Balloon::new(1 << 20, false);
    let err = restored(&r, Box::new(balloon), &good)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("a virtio-rng device here, this VM a virtio-balloon"),
        "{err}"
    );
}

#[test]
fn a_restored_vsock_device_sends_the_guest_a_transport_reset() {
    use crate::virtio::vsock::{EVENT_QUEUE, EVENT_TRANSPORT_RESET, Vsock};
    let dir = std::env::temp_dir().join(format!("vme-vsock-restore-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let vsock = |name: &str| Box::new(Vsock::new(3, &dir.join(name)).unwrap());
    let mut r = Rig::with(vsock("a.sock"));
    // The driver's event queue (2) with one buffer posted.
    let mut ev = Driver::at(8, BASE + 0x8000);
    r.bring_up_with(&[(EVENT_QUEUE as u32, &ev)]);
    ev.post(&r.mem, &[(DATA, 8, true)]);
    r.wr(R_QUEUE_NOTIFY, EVENT_QUEUE as u32);
    assert_eq!(ev.used_idx(&r.mem), 0, "no event before a restore");
    let state = r.t.state();
    let (mut t, line) = restored(&r, vsock("b.sock"), &state).unwrap();
    t.kick_ready_queues();
    assert_eq!(ev.used_idx(&r.mem), 1);
    assert_eq!(ev.used_elem(&r.mem, 0).1, 4);
    assert_eq!(r.mem.get(DATA, 4), EVENT_TRANSPORT_RESET.to_le_bytes());
    assert!(line.0.load(Ordering::SeqCst));
    // Once only.
    ev.post(&r.mem, &[(DATA + 64, 8, true)]);
    t.write(R_QUEUE_NOTIFY, &(EVENT_QUEUE as u32).to_le_bytes());
    assert_eq!(ev.used_idx(&r.mem), 1);
    let _ = std::fs::remove_dir_all(&dir);
}

use super::*;
use crate::pci::msix::{CTRL_ENABLE, MsiMessage};
use crate::pci::test_sink::Sink;
use crate::virtio::rng::Rng;
use crate::virtio::testmem::{BASE, Driver, F_NEXT, TestMemory};
use crate::virtio::transport::{S_ACKNOWLEDGE, S_DRIVER, S_FEATURES_OK, S_NEEDS_RESET};
use std::sync::Mutex;
use std::sync::atomic::Ordering;

const BAR: u32 = 0xc000_0000;
const DATA: u64 = BASE + 0x10000;

#[derive(Default)]
struct Watch(Arc<Mutex<Vec<Option<u64>>>>);

impl BarWatcher for Watch {
    fn bar_moved(&mut self, _bar: usize, base: Option<u64>) {
        self.0.lock().unwrap().push(base);
    }
}

struct Rig {
    t: PciTransport,
    mem: Arc<TestMemory>,
    sink: Arc<Sink>,
    moves: Arc<Mutex<Vec<Option<u64>>>>,
    drv: Driver,
}

impl Rig {
    fn new() -> Rig {
        let mem = Arc::new(TestMemory::new());
        let sink = Arc::new(Sink::default());
        let mut t = PciTransport::new(Box::new(Rng::new()), mem.clone(), sink.clone(), BAR);
        let watch = Watch::default();
        let moves = watch.0.clone();
        t.set_watcher(Box::new(watch));
        Rig {
            t,
            mem,
            sink,
            moves,
            drv: Driver::new(8),
        }
    }
    fn rd(&mut self, off: u64, len: usize) -> u64 {
        let mut b = [0u8; 8];
        self.t.bar_read(0, off, &mut b[..len]);
        u64::from_le_bytes(b)
    }
    fn wr(&mut self, off: u64, len: usize, v: u64) {
        self.t.bar_write(0, off, &v.to_le_bytes()[..len]);
    }
    fn cfg(&mut self, off: usize, len: usize) -> u32 {
        let mut b = [0u8; 4];
        self.t.config_read(off, &mut b[..len]);
        u32::from_le_bytes(b)
    }
    fn status(&mut self) -> u32 {
        self.rd(C_DEVICE_STATUS, 1) as u32
    }
    fn signals(&self) -> Vec<u16> {
        self.sink.signals.lock().unwrap().clone()
    }

    /// MSI-X on, vector v routed to a valid message and unmasked.
    fn msix_on(&mut self, vectors: u16) {
        let ctrl = self.msix_cap() + 2;
        self.t.config_write(ctrl, &CTRL_ENABLE.to_le_bytes());
        for v in 0..u64::from(vectors) {
            let e = MSIX_TABLE + 16 * v;
            self.wr(e, 4, 0xfee0_0000);
            self.wr(e + 8, 4, 0x30 + v);
            self.wr(e + 12, 4, 0);
        }
    }

    fn msix_cap(&mut self) -> usize {
        let mut at = self.cfg(0x34, 1) as usize;
        while at != 0 {
            if self.cfg(at, 1) == 0x11 {
                return at;
            }
            at = self.cfg(at + 1, 1) as usize;
        }
        panic!("no MSI-X capability");
    }

    /// Linux's bring-up: features, queue 0 with vector 1, config vector 0, DRIVER_OK.
    fn bring_up(&mut self) {
        self.wr(C_DEVICE_STATUS, 1, 0);
        self.wr(C_DEVICE_STATUS, 1, u64::from(S_ACKNOWLEDGE | S_DRIVER));
        self.wr(C_DRIVER_FEATURE_SELECT, 4, 1);
        self.wr(C_DRIVER_FEATURE, 4, 1);
        self.wr(C_DRIVER_FEATURE_SELECT, 4, 0);
        self.wr(C_DRIVER_FEATURE, 4, 0);
        self.wr(
            C_DEVICE_STATUS,
            1,
            u64::from(S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK),
        );
        assert_ne!(self.status() & S_FEATURES_OK, 0);
        self.wr(C_MSIX_CONFIG, 2, 0);
        assert_eq!(self.rd(C_MSIX_CONFIG, 2), 0);
        self.wr(C_QUEUE_SELECT, 2, 0);
        self.wr(C_QUEUE_SIZE, 2, u64::from(self.drv.size));
        self.wr(C_QUEUE_MSIX_VECTOR, 2, 1);
        assert_eq!(self.rd(C_QUEUE_MSIX_VECTOR, 2), 1);
        // Two dword halves each, as Linux writes them.
        for (reg, addr) in [
            (C_QUEUE_DESC, self.drv.desc),
            (C_QUEUE_DRIVER, self.drv.avail),
            (C_QUEUE_DEVICE, self.drv.used),
        ] {
            self.wr(reg, 4, addr & 0xffff_ffff);
            self.wr(reg + 4, 4, addr >> 32);
        }
        self.wr(C_QUEUE_ENABLE, 2, 1);
        assert_eq!(self.rd(C_QUEUE_ENABLE, 2), 1);
        self.wr(
            C_DEVICE_STATUS,
            1,
            u64::from(S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK),
        );
        assert_eq!(self.status() & S_NEEDS_RESET, 0);
    }
}

#[test]
fn identity_capabilities_and_bar_sizing() {
    let mut r = Rig::new();
    assert_eq!(r.cfg(0, 4), 0x1044_1af4, "virtio-rng: 0x1040 + 4");
    assert_eq!(r.cfg(8, 1), 1, "revision 1: modern only");
    assert_eq!(r.cfg(0x3d, 1), 0, "no INTx pin");
    assert_eq!(r.cfg(0x10, 4), BAR);
    r.t.config_write(0x10, &u32::MAX.to_le_bytes());
    assert_eq!(r.cfg(0x10, 4), !(BAR_SIZE - 1));
    r.t.config_write(0x10, &BAR.to_le_bytes());
    // The vendor capabilities: common, ISR, device, notify with multiplier 4.
    let mut found = Vec::new();
    let mut at = r.cfg(0x34, 1) as usize;
    while at != 0 {
        if r.cfg(at, 1) == 0x09 {
            let kind = r.cfg(at + 3, 1);
            let offset = r.cfg(at + 8, 4);
            found.push((kind, r.cfg(at + 4, 1), offset));
            if kind == 2 {
                assert_eq!(r.cfg(at + 2, 1), 20);
                assert_eq!(r.cfg(at + 16, 4), 4);
            }
        }
        at = r.cfg(at + 1, 1) as usize;
    }
    found.sort();
    assert_eq!(
        found,
        vec![
            (1, 0, 0),
            (2, 0, 0x3000),
            (3, 0, 0x1000),
            (4, 0, 0x2000),
            (5, 0, 0)
        ]
    );
    // MSI-X: 2 vectors (config + one queue), table and PBA in BAR 0.
    let cap = r.msix_cap();
    assert_eq!(r.cfg(cap + 2, 2), 1);
    assert_eq!(r.cfg(cap + 4, 4), 0x4000);
    assert_eq!(r.cfg(cap + 8, 4), 0x6000);
    assert_eq!(r.rd(C_NUM_QUEUES, 2), 1);
}

#[test]
fn the_watcher_hears_where_bar0_decodes() {
    let mut r = Rig::new();
    assert_eq!(*r.moves.lock().unwrap(), vec![None], "decoding starts off");
    r.t.config_write(4, &2u16.to_le_bytes());
    r.t.config_write(0x10, &u32::MAX.to_le_bytes());
    r.t.config_write(0x10, &(BAR + 0x8000).to_le_bytes());
    r.t.config_write(4, &0u16.to_le_bytes());
    assert_eq!(
        *r.moves.lock().unwrap(),
        vec![
            None,
            Some(u64::from(BAR)),
            Some(u64::from(!(BAR_SIZE - 1))),
            Some(u64::from(BAR) + 0x8000),
            None
        ]
    );
    assert!(r.t.bar_ranges().is_empty());
}

#[test]
fn serves_a_queue_and_interrupts_through_its_msix_vector() {
    let mut r = Rig::new();
    r.msix_on(2);
    r.bring_up();
    r.drv.post(&r.mem, &[(DATA, 16, true)]);
    r.wr(notify_addr(0, 0), 2, 0);
    assert_eq!(r.drv.used_idx(&r.mem), 1);
    assert_eq!(r.signals(), vec![1]);
    // An empty access (only a hostile caller makes one) neither panics nor clears it.
    r.t.bar_read(0, ISR, &mut []);
    assert_eq!(r.rd(ISR, 1), 1, "ISR says a queue interrupted");
    assert_eq!(r.rd(ISR, 1), 0, "and reading cleared it");
    // A kick from a device thread takes the same path.
    r.drv.post(&r.mem, &[(DATA, 16, true)]);
    assert!(r.t.kick(0));
    assert_eq!(r.signals(), vec![1, 1]);
    // Notifications of queues that do not exist, misaligned, or past the area do nothing.
    for off in [notify_addr(0, 1), notify_addr(0, 7) + 2, NOTIFY + 1, 0x3ffe] {
        r.wr(off, 2, 0);
    }
    assert!(!r.t.kick(3));
    assert_eq!(r.status() & S_NEEDS_RESET, 0);
    assert_eq!(r.mem.refused.load(Ordering::SeqCst), 0);
}

#[test]
fn vectors_past_the_table_read_back_as_no_vector() {
    let mut r = Rig::new();
    r.wr(C_MSIX_CONFIG, 2, 2);
    assert_eq!(r.rd(C_MSIX_CONFIG, 2), u64::from(NO_VECTOR));
    r.wr(C_QUEUE_SELECT, 2, 0);
    r.wr(C_QUEUE_MSIX_VECTOR, 2, 0x7ff);
    assert_eq!(r.rd(C_QUEUE_MSIX_VECTOR, 2), u64::from(NO_VECTOR));
    // A queue that does not exist has no vector, size or notify offset.
    r.wr(C_QUEUE_SELECT, 2, 5);
    r.wr(C_QUEUE_MSIX_VECTOR, 2, 0);
    assert_eq!(r.rd(C_QUEUE_MSIX_VECTOR, 2), u64::from(NO_VECTOR));
    assert_eq!(r.rd(C_QUEUE_SIZE, 2), 0);
    r.wr(C_QUEUE_ENABLE, 2, 1);
    assert_eq!(r.rd(C_QUEUE_ENABLE, 2), 0);
}

#[test]
fn masked_or_garbage_vectors_never_reach_memory() {
    let mut r = Rig::new();
    r.msix_on(2);
    // Vector 1 gets a garbage address: the transport routes it (the machine's sink decides
    // what is an interrupt); the device itself never writes guest memory for an MSI.
    r.wr(MSIX_TABLE + 16, 8, 0xdead_beef_0000_0000);
    r.wr(MSIX_TABLE + 16 + 12, 4, 1); // masked
    r.bring_up();
    r.drv.post(&r.mem, &[(DATA, 16, true)]);
    r.wr(notify_addr(0, 0), 2, 0);
    assert!(r.signals().is_empty(), "masked: pending, not signalled");
    let mut pba = [0u8; 8];
    r.t.bar_read(0, MSIX_PBA, &mut pba);
    assert_eq!(pba[0], 0b10);
    r.wr(MSIX_TABLE + 16 + 12, 4, 0);
    assert_eq!(
        r.signals(),
        vec![1],
        "unmasking delivers the pending vector"
    );
    assert!(r.sink.routes.lock().unwrap().contains(&(
        1,
        Some(MsiMessage {
            address: 0xdead_beef_0000_0000,
            data: 0x31
        })
    )));
    assert_eq!(r.mem.refused.load(Ordering::SeqCst), 0);
}

#[test]
fn invalid_queue_setup_needs_reset() {
    for (reg, len, val) in [
        (C_QUEUE_SIZE, 2, 3),       // not a power of two
        (C_QUEUE_SIZE, 2, 0),       // empty
        (C_QUEUE_SIZE, 2, 0x8000),  // above the maximum
        (C_QUEUE_DESC, 4, 8),       // outside RAM and misaligned
        (C_QUEUE_DEVICE, 8, 0),     // outside RAM
        (C_QUEUE_DRIVER + 4, 4, 1), // far above RAM
    ] {
        let mut r = Rig::new();
        r.wr(C_DEVICE_STATUS, 1, u64::from(S_ACKNOWLEDGE | S_DRIVER));
        r.wr(C_DRIVER_FEATURE_SELECT, 4, 1);
        r.wr(C_DRIVER_FEATURE, 4, 1);
        r.wr(
            C_DEVICE_STATUS,
            1,
            u64::from(S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK),
        );
        r.wr(C_QUEUE_SIZE, 2, 8);
        r.wr(C_QUEUE_DESC, 8, r.drv.desc);
        r.wr(C_QUEUE_DRIVER, 8, r.drv.avail);
        r.wr(C_QUEUE_DEVICE, 8, r.drv.used);
        r.wr(reg, len, val);
        r.wr(C_QUEUE_ENABLE, 2, 1);
        assert_eq!(r.rd(C_QUEUE_ENABLE, 2), 0, "{reg:#x}={val:#x}");
        assert_ne!(r.status() & S_NEEDS_RESET, 0, "{reg:#x}={val:#x}");
        assert_eq!(r.mem.refused.load(Ordering::SeqCst), 0);
    }
}

#[test]
fn a_corrupt_ring_needs_reset_with_a_config_interrupt_and_reset_recovers() {
    let mut r = Rig::new();
    r.msix_on(2);
    r.bring_up();
    r.drv.set_desc(&r.mem, 0, DATA, 8, F_NEXT, 0); // a self loop
    r.drv.publish(&r.mem, 0);
    r.wr(notify_addr(0, 0), 2, 0);
    assert_ne!(r.status() & S_NEEDS_RESET, 0);
    assert_eq!(r.signals(), vec![0], "the config vector");
    assert_eq!(r.rd(ISR, 1), 2);
    // Reset in the middle: nothing served, vectors forgotten, then a clean bring-up works.
    r.drv.post(&r.mem, &[(DATA, 8, true)]);
    r.wr(C_DEVICE_STATUS, 1, 0);
    assert_eq!(r.status(), 0);
    assert_eq!(r.rd(C_MSIX_CONFIG, 2), u64::from(NO_VECTOR));
    r.wr(notify_addr(0, 0), 2, 0);
    r.mem.put(r.drv.avail + 2, &0u16.to_le_bytes());
    r.drv = Driver::new(8);
    r.bring_up();
    r.drv.post(&r.mem, &[(DATA, 8, true)]);
    r.wr(notify_addr(0, 0), 2, 0);
    assert_eq!(r.drv.used_idx(&r.mem), 1);
}

#[test]
fn odd_widths_and_offsets_are_harmless() {
    let mut r = Rig::new();
    // Every width at every offset of the BAR, including past the structures.
    for off in (0..0x60u64).chain([0x1001, 0x2fff, 0x4fff, 0x6007, 0x7ffc]) {
        for len in [1usize, 2, 4, 8] {
            let _ = r.rd(off, len);
            if !(C_DEVICE_STATUS..C_DEVICE_STATUS + 1).contains(&off) {
                r.wr(off, len, u64::MAX);
            }
        }
    }
    // Features were only touched through their whole-field registers.
    assert_eq!(r.status(), 0);
    assert_eq!(r.rd(C_NUM_QUEUES, 2), 1, "read-only");
    assert_eq!(r.rd(C_DEVICE_FEATURE_SELECT, 2), 0, "half a dword field");
    r.bring_up();
    // Queue registers are fixed once the device runs.
    r.wr(C_QUEUE_SIZE, 2, 2);
    r.wr(C_QUEUE_DESC, 8, 0);
    assert_eq!(r.rd(C_QUEUE_SIZE, 2), 8);
    assert_eq!(r.rd(C_QUEUE_DESC, 8), r.drv.desc);
    // Config space: every width, every offset, never a panic.
    for off in 0..300usize {
        for len in [1usize, 2, 4] {
            let mut b = [0u8; 4];
            r.t.config_read(off, &mut b[..len]);
            r.t.config_write(off, &[0xff; 4][..len]);
        }
    }
    assert_eq!(r.cfg(0, 4), 0x1044_1af4);
    assert_eq!(r.mem.refused.load(Ordering::SeqCst), 0);
}

#[test]
fn the_pci_cfg_capability_reaches_bar0_through_configuration_space() {
    let mut r = Rig::new();
    let mut at = r.cfg(0x34, 1) as usize;
    while r.cfg(at, 1) != 0x09 || r.cfg(at + 3, 1) != 5 {
        at = r.cfg(at + 1, 1) as usize;
        assert_ne!(at, 0, "no PCI_CFG capability");
    }
    // num_queues (2 bytes at 0x12) through the window, with BAR decoding off.
    r.t.config_write(at + 4, &[0]);
    r.t.config_write(at + 8, &0x12u32.to_le_bytes());
    r.t.config_write(at + 12, &2u32.to_le_bytes());
    assert_eq!(r.cfg(at + 16, 4), 1);
    // Status written through the window.
    r.t.config_write(at + 8, &(C_DEVICE_STATUS as u32).to_le_bytes());
    r.t.config_write(at + 12, &1u32.to_le_bytes());
    r.t.config_write(at + 16, &[S_ACKNOWLEDGE as u8]);
    assert_eq!(r.status(), S_ACKNOWLEDGE);
    // Bad selections (length 3, misaligned, past the BAR, another BAR) read the plain
    // register and write nothing.
    for (bar, off, len) in [(0u8, 0u32, 3u32), (0, 1, 2), (0, BAR_SIZE, 4), (1, 0, 4)] {
        r.t.config_write(at + 4, &[bar]);
        r.t.config_write(at + 8, &off.to_le_bytes());
        r.t.config_write(at + 12, &len.to_le_bytes());
        r.t.config_write(at + 16, &[0; 4]);
    }
    assert_eq!(r.status(), S_ACKNOWLEDGE);
}

#[test]
fn a_restored_function_keeps_its_routes_bar_and_queues() {
    let mut a = Rig::new();
    a.t.config_write(4, &2u16.to_le_bytes());
    a.msix_on(2);
    a.bring_up();
    a.drv.post(&a.mem, &[(DATA, 16, true)]);
    a.wr(notify_addr(0, 0), 2, 0);
    assert_eq!(a.drv.used_idx(&a.mem), 1);
    let saved = a.t.state();

    // A fresh function over the same RAM takes it.
    let sink = Arc::new(Sink::default());
    let mut t = PciTransport::new(Box::new(Rng::new()), a.mem.clone(), sink.clone(), BAR);
    let watch = Watch::default();
    let moves = watch.0.clone();
    t.set_watcher(Box::new(watch));
    t.restore(&saved).unwrap();
    assert_eq!(t.state(), saved);
    let msg = |v: u32| {
        Some(MsiMessage {
            address: 0xfee0_0000,
            data: 0x30 + v,
        })
    };
    assert_eq!(
        *sink.routes.lock().unwrap(),
        vec![(0, msg(0)), (1, msg(1))],
        "every deliverable vector is routed again"
    );
    assert_eq!(moves.lock().unwrap().last(), Some(&Some(u64::from(BAR))));
    assert_eq!(
        t.bar_ranges(),
        vec![(0, u64::from(BAR), u64::from(BAR_SIZE))]
    );
    let mut b = Rig {
        t,
        mem: a.mem.clone(),
        sink,
        moves,
        drv: a.drv,
    };
    b.drv.post(&b.mem, &[(DATA, 16, true)]);
    b.wr(notify_addr(0, 0), 2, 0);
    assert_eq!(b.drv.used_idx(&b.mem), 2, "the queue goes on where it was");
    assert_eq!(b.signals(), vec![1]);
}

#[test]
fn restoring_another_function_or_impossible_vectors_is_refused() {
    let mut a = Rig::new();
    a.msix_on(2);
    a.bring_up();
    let good = a.t.state();
    let fresh = || {
        let mem = Arc::new(TestMemory::new());
        PciTransport::new(Box::new(Rng::new()), mem, Arc::new(Sink::default()), BAR)
    };
    let mut bad = good.clone();
    bad.config[0] ^= 1;
    let e = fresh().restore(&bad).unwrap_err().to_string();
    assert!(e.contains("configuration byte 0x0"), "{e}");
    let mut bad = good.clone();
    bad.config.pop();
    assert!(fresh().restore(&bad).is_err());
    let mut bad = good.clone();
    bad.queue_vectors[0] = 7;
    let e = fresh().restore(&bad).unwrap_err().to_string();
    assert!(e.contains("MSI-X vector 7"), "{e}");
    let mut bad = good.clone();
    bad.queue_vectors.push(0);
    assert!(fresh().restore(&bad).is_err());
    let mut bad = good.clone();
    bad.msix.table.push([0; 4]);
    assert!(fresh().restore(&bad).is_err());
    let mut bad = good.clone();
    bad.isr = 4;
    assert!(fresh().restore(&bad).is_err());
}

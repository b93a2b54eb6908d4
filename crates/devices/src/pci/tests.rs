use super::config::{COMMAND, Ids};
use super::msix::{CTRL_ENABLE, CTRL_MASK};
use super::root::ECAM_BUS_SIZE;
use super::*;
use crate::bus::BusDevice;
use crate::pci::test_sink::Sink;
use std::sync::{Arc, Mutex};

/// A function with one 4 KiB memory BAR whose reads return the offset and whose writes are
/// recorded.
struct Dummy {
    config: ConfigSpace,
    writes: Vec<(u64, Vec<u8>)>,
}

impl Dummy {
    fn new(bar: u32) -> Self {
        let mut config = ConfigSpace::new(Ids {
            vendor: 0x1234,
            device: 0x5678,
            revision: 2,
            class: 0xff_00_00,
            subsystem_vendor: 0,
            subsystem: 0,
        });
        config.add_mem32_bar(0, 0x1000);
        config.set_bar(0, bar);
        Dummy {
            config,
            writes: Vec::new(),
        }
    }
}

impl PciFunction for Dummy {
    fn config_read(&mut self, offset: usize, data: &mut [u8]) {
        self.config.read(offset, data);
    }
    fn config_write(&mut self, offset: usize, data: &[u8]) {
        self.config.write(offset, data);
    }
    fn bar_ranges(&self) -> Vec<(usize, u64, u64)> {
        self.config.bar_ranges()
    }
    fn bar_read(&mut self, _bar: usize, offset: u64, data: &mut [u8]) {
        data.fill(offset as u8);
    }
    fn bar_write(&mut self, _bar: usize, offset: u64, data: &[u8]) {
        self.writes.push((offset, data.to_vec()));
    }
}

const WINDOW: u64 = 0xc000_0000;

struct Rig {
    io: ConfigIo,
    ecam: Ecam,
    window: BarWindow,
    a: Arc<Mutex<Dummy>>,
    b: Arc<Mutex<Dummy>>,
}

fn rig() -> Rig {
    let mut bus = PciBus::new();
    let a = Arc::new(Mutex::new(Dummy::new(WINDOW as u32)));
    let b = Arc::new(Mutex::new(Dummy::new(WINDOW as u32 + 0x1000)));
    assert_eq!(bus.add(a.clone()).unwrap(), 1);
    assert_eq!(bus.add(b.clone()).unwrap(), 2);
    let bus = Arc::new(bus);
    Rig {
        io: ConfigIo::new(bus.clone()),
        ecam: Ecam::new(bus.clone()),
        window: BarWindow::new(bus, WINDOW),
        a,
        b,
    }
}

fn addr(dev: u32, reg: u32) -> u32 {
    0x8000_0000 | (dev << 11) | reg
}

impl Rig {
    fn cfg_read(&mut self, dev: u32, reg: u32, len: usize) -> u32 {
        self.io.write(0, &addr(dev, reg & !3).to_le_bytes());
        let mut b = [0u8; 4];
        self.io.read(4 + u64::from(reg & 3), &mut b[..len]);
        u32::from_le_bytes(b)
    }
    fn cfg_write(&mut self, dev: u32, reg: u32, data: &[u8]) {
        self.io.write(0, &addr(dev, reg & !3).to_le_bytes());
        self.io.write(4 + u64::from(reg & 3), data);
    }
    fn ecam_read(&mut self, dev: u64, reg: u64, len: usize) -> u32 {
        let mut b = [0u8; 4];
        self.ecam.read((dev << 15) | reg, &mut b[..len]);
        u32::from_le_bytes(b)
    }
    fn win_read(&mut self, addr: u64) -> u32 {
        let mut b = [0u8; 4];
        self.window.read(addr - WINDOW, &mut b);
        u32::from_le_bytes(b)
    }
}

#[test]
fn type1_and_ecam_read_the_host_bridge_and_functions_at_every_width() {
    let mut r = rig();
    // Host bridge 8086:0d57, class 06/00.
    assert_eq!(r.cfg_read(0, 0, 4), 0x0d57_8086);
    assert_eq!(r.cfg_read(0, 0x8, 4) >> 8, 0x06_00_00);
    assert_eq!(r.cfg_read(1, 0, 4), 0x5678_1234);
    // Every byte offset of the data port, every width that fits.
    assert_eq!(r.cfg_read(1, 1, 1), 0x12);
    assert_eq!(r.cfg_read(1, 2, 2), 0x5678);
    assert_eq!(r.cfg_read(1, 3, 1), 0x56);
    assert_eq!(
        r.cfg_read(1, 1, 2),
        0x7812,
        "misaligned word inside the dword"
    );
    assert_eq!(r.ecam_read(1, 0, 4), 0x5678_1234);
    assert_eq!(r.ecam_read(1, 3, 1), 0x56);
    assert_eq!(r.ecam_read(2, 0x10, 4), WINDOW as u32 + 0x1000);
    // Absent devices, functions and buses read all-ones.
    assert_eq!(r.cfg_read(5, 0, 4), u32::MAX);
    r.io.write(0, &(addr(1, 0) | (1 << 8)).to_le_bytes());
    let mut b = [0u8; 4];
    r.io.read(4, &mut b);
    assert_eq!(u32::from_le_bytes(b), u32::MAX, "function 1");
    r.io.write(0, &(addr(1, 0) | (1 << 16)).to_le_bytes());
    r.io.read(4, &mut b);
    assert_eq!(u32::from_le_bytes(b), u32::MAX, "bus 1");
    assert_eq!(r.ecam_read(9, 0, 4), u32::MAX);
    // CONFIG_ADDRESS reads back (Linux's type-1 probe) and disabled access reads all-ones.
    r.io.write(0, &0x8000_0000u32.to_le_bytes());
    r.io.read(0, &mut b);
    assert_eq!(u32::from_le_bytes(b), 0x8000_0000);
    r.io.write(0, &addr(1, 0).wrapping_sub(0x8000_0000).to_le_bytes());
    r.io.read(4, &mut b);
    assert_eq!(u32::from_le_bytes(b), u32::MAX);
    // Odd ECAM accesses: 8 bytes, past the conventional space, straddling 4 KiB.
    let mut q = [0u8; 8];
    r.ecam.read(1 << 15, &mut q);
    assert_eq!(q, [0xff; 8]);
    assert_eq!(r.ecam_read(1, 0x800, 4), 0, "extended space reads zero");
    let mut w = [0u8; 2];
    r.ecam.read((1 << 15) | 0xfff, &mut w);
    assert_eq!(w, [0xff; 2]);
    r.ecam.read(ECAM_BUS_SIZE + 8, &mut b);
    assert_eq!(b, [0xff; 4]);
}

#[test]
fn bars_size_with_all_ones_and_move_only_where_their_size_aligns() {
    let mut r = rig();
    r.cfg_write(1, 0x10, &u32::MAX.to_le_bytes());
    assert_eq!(r.cfg_read(1, 0x10, 4), 0xffff_f000, "4 KiB, 32-bit memory");
    // Unimplemented BARs and the ROM BAR stay zero whatever is written.
    for reg in [0x14, 0x18, 0x1c, 0x20, 0x24, 0x30] {
        r.cfg_write(1, reg, &u32::MAX.to_le_bytes());
        assert_eq!(r.cfg_read(1, reg, 4), 0, "{reg:#x}");
    }
    // Garbage: the low bits are dropped.
    r.cfg_write(1, 0x10, &0xc000_2fffu32.to_le_bytes());
    assert_eq!(r.cfg_read(1, 0x10, 4), 0xc000_2000);
    // Byte writes to a BAR apply per byte.
    r.cfg_write(1, 0x11, &[0x30]);
    assert_eq!(r.cfg_read(1, 0x10, 4), 0xc000_3000);
    // Read-only identity and status bits stay.
    r.cfg_write(1, 0, &u32::MAX.to_le_bytes());
    r.cfg_write(1, 6, &[0xff, 0xff]);
    assert_eq!(r.cfg_read(1, 0, 4), 0x5678_1234);
    assert_eq!(r.cfg_read(1, 6, 2), 0);
    r.cfg_write(1, COMMAND as u32, &[0xff, 0xff]);
    assert_eq!(r.cfg_read(1, COMMAND as u32, 2), 0x0407);
}

#[test]
fn the_window_decodes_bars_only_while_memory_decoding_is_on() {
    let mut r = rig();
    let a_bar = WINDOW;
    assert_eq!(r.win_read(a_bar + 4), u32::MAX, "decoding off");
    r.cfg_write(1, COMMAND as u32, &2u16.to_le_bytes());
    r.cfg_write(2, COMMAND as u32, &2u16.to_le_bytes());
    assert_eq!(r.win_read(a_bar + 4), 0x0404_0404);
    assert_eq!(r.win_read(a_bar + 0x1004), 0x0404_0404);
    r.window.write(0x1010, &[1, 2]);
    assert_eq!(r.b.lock().unwrap().writes, vec![(0x10, vec![1, 2])]);
    // An access straddling a BAR's end reaches nobody.
    assert_eq!(r.win_read(a_bar + 0x2ffe), u32::MAX);
    // Moving B over A: the lower device number wins, nothing breaks, and moving it back
    // restores both.
    r.cfg_write(2, 0x10, &(WINDOW as u32).to_le_bytes());
    r.window.write(0x20, &[7]);
    assert_eq!(r.a.lock().unwrap().writes.len(), 1);
    assert_eq!(r.b.lock().unwrap().writes.len(), 1);
    r.cfg_write(2, 0x10, &(WINDOW as u32 + 0x1000).to_le_bytes());
    r.window.write(0x1020, &[7]);
    assert_eq!(r.b.lock().unwrap().writes.len(), 2);
    // A BAR moved over RAM or outside the window is simply not decoded here.
    r.cfg_write(1, 0x10, &0x0010_0000u32.to_le_bytes());
    assert_eq!(r.win_read(a_bar), u32::MAX);
}

fn dword(m: &mut Msix, offset: u64, v: u32) {
    m.table_write(offset, &v.to_le_bytes());
}

#[test]
fn msix_routes_deliverable_vectors_and_holds_masked_ones_pending() {
    let sink = Arc::new(Sink::default());
    let mut m = Msix::new(3, sink.clone());
    assert_eq!((m.table_size(), m.pba_size()), (48, 8));
    // Disabled: signals do nothing, pend nothing.
    m.signal(0);
    assert!(!m.pending(0));
    m.set_control(CTRL_ENABLE);
    // Vectors start masked: a signal pends.
    m.signal(1);
    assert!(m.pending(1));
    let mut pba = [0u8; 8];
    m.pba_read(0, &mut pba);
    assert_eq!(pba[0], 0b10);
    // The guest programs vector 1 while masked, then unmasks: one route, then the pending
    // interrupt fires.
    dword(&mut m, 16, 0xfee0_0000);
    dword(&mut m, 20, 0);
    dword(&mut m, 24, 0x41);
    assert!(sink.routes.lock().unwrap().is_empty());
    dword(&mut m, 28, 0);
    let msg = MsiMessage {
        address: 0xfee0_0000,
        data: 0x41,
    };
    assert_eq!(*sink.routes.lock().unwrap(), vec![(1, Some(msg))]);
    assert_eq!(*sink.signals.lock().unwrap(), vec![1]);
    assert!(!m.pending(1));
    m.signal(1);
    assert_eq!(sink.signals.lock().unwrap().len(), 2);
    // Function mask: routes withdrawn, signals pend, unmask delivers.
    m.set_control(CTRL_ENABLE | CTRL_MASK);
    assert_eq!(sink.routes.lock().unwrap().last(), Some(&(1, None)));
    m.signal(1);
    assert!(m.pending(1));
    m.set_control(CTRL_ENABLE);
    assert_eq!(sink.signals.lock().unwrap().len(), 3);
    // Reads: dword and qword; odd widths and offsets read zero; control keeps the mask bit.
    let mut q = [0u8; 8];
    m.table_read(16, &mut q);
    assert_eq!(u64::from_le_bytes(q), 0xfee0_0000);
    let mut b = [0xaau8; 2];
    m.table_read(16, &mut b);
    assert_eq!(b, [0, 0]);
    dword(&mut m, 28, 0xffff_fffe);
    let mut d = [0u8; 4];
    m.table_read(28, &mut d);
    assert_eq!(u32::from_le_bytes(d), 0);
}

#[test]
fn msix_ignores_vectors_past_the_table_and_odd_accesses() {
    let sink = Arc::new(Sink::default());
    let mut m = Msix::new(2, sink.clone());
    m.set_control(CTRL_ENABLE);
    for off in [32, 36, 44, 4096, u64::MAX - 3, !7] {
        dword(&mut m, off, 0);
        m.table_write(off, &[0u8; 8]);
    }
    m.table_write(3, &[1, 2, 3, 4]);
    m.table_write(0, &[1]);
    m.table_write(0, &[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16]);
    m.signal(2);
    m.signal(u16::MAX);
    assert!(sink.routes.lock().unwrap().is_empty());
    assert!(sink.signals.lock().unwrap().is_empty());
    let mut pba = [0xffu8; 16];
    m.pba_read(u64::MAX - 4, &mut pba);
    assert_eq!(pba, [0; 16]);
    let mut d = [0xffu8; 4];
    m.table_read(u64::MAX - 3, &mut d);
    assert_eq!(d, [0; 4]);
}

#[test]
fn bar_allocation_is_aligned_and_bounded() {
    let mut a = BarAllocator::new(0xc000_0100, 0x10000);
    assert_eq!(a.allocate(0x8000), Ok(0xc000_8000));
    assert_eq!(
        a.allocate(0x8000),
        Err(PciError::NoRoom { size: 0x8000 }),
        "only 0x100 bytes are left"
    );
    assert_eq!(a.allocate(0x100), Ok(0xc001_0000));
    assert!(a.allocate(1).is_err());
}

#[test]
fn the_bus_holds_31_functions() {
    let mut bus = PciBus::new();
    for i in 1..32u8 {
        assert_eq!(bus.add(Arc::new(Mutex::new(Dummy::new(0)))), Ok(i));
    }
    assert_eq!(
        bus.add(Arc::new(Mutex::new(Dummy::new(0)))),
        Err(PciError::Full)
    );
}

#[test]
fn the_host_bridge_state_keeps_guest_bits_and_refuses_fixed_ones() {
    let bus = Arc::new(PciBus::new());
    let mut saved = bus.bridge_state();
    // The command register is the guest's; the IDs are not.
    saved[COMMAND] = 6;
    bus.restore_bridge(&saved).unwrap();
    let mut io = ConfigIo::new(bus.clone());
    io.write(0, &0x8000_0004u32.to_le_bytes());
    let mut b = [0u8; 2];
    io.read(4, &mut b);
    assert_eq!(u16::from_le_bytes(b), 6);
    let mut other = saved.clone();
    other[2] ^= 0xff;
    let e = bus.restore_bridge(&other).unwrap_err();
    assert!(e.contains("configuration byte 0x2"), "{e}");
    assert!(bus.restore_bridge(&saved[..100]).is_err());
}

use super::*;
use crate::virtio::testmem::{BASE, Driver, F_NEXT, F_WRITE, SIZE, TestMemory};

const DATA: u64 = BASE + 0x10000;

fn refused(mem: &TestMemory) -> usize {
    mem.refused.load(std::sync::atomic::Ordering::SeqCst)
}

#[test]
fn pops_chains_in_order_and_publishes_used() {
    let mem = TestMemory::new();
    let mut drv = Driver::new(8);
    let mut q = drv.queue(256);
    q.validate(&mem).unwrap();
    assert_eq!(q.pop(&mem).unwrap(), None, "empty ring");
    let h1 = drv.post(
        &mem,
        &[
            (DATA, 16, false),
            (DATA + 16, 100, true),
            (DATA + 200, 1, true),
        ],
    );
    let h2 = drv.post(&mem, &[(DATA + 0x1000, 8, true)]);
    let c1 = q.pop(&mem).unwrap().unwrap();
    assert_eq!(c1.head, h1);
    assert_eq!(
        c1.readable,
        vec![Desc {
            addr: DATA,
            len: 16
        }]
    );
    assert_eq!(c1.writable_len(), 101);
    let c2 = q.pop(&mem).unwrap().unwrap();
    assert_eq!(c2.head, h2);
    assert_eq!(q.pop(&mem).unwrap(), None);
    q.add_used(&mem, c2.head, 8).unwrap();
    q.add_used(&mem, c1.head, 101).unwrap();
    assert_eq!(drv.used_idx(&mem), 2);
    assert_eq!(drv.used_elem(&mem, 0), (u32::from(h2), 8));
    assert_eq!(drv.used_elem(&mem, 1), (u32::from(h1), 101));
    assert!(q.wants_interrupt(&mem).unwrap());
    mem.put(drv.avail, &1u16.to_le_bytes());
    assert!(
        !q.wants_interrupt(&mem).unwrap(),
        "VIRTQ_AVAIL_F_NO_INTERRUPT"
    );
    assert_eq!(refused(&mem), 0);
}

#[test]
fn indices_wrap_around_u16() {
    let mem = TestMemory::new();
    let mut drv = Driver::new(4);
    let mut q = drv.queue(4);
    // Run the indices across 65535 -> 0 several times over a 4-entry ring.
    for round in 0..70_000u32 {
        let h = drv.post(&mem, &[(DATA, 4, true)]);
        let c = q.pop(&mem).unwrap().unwrap();
        assert_eq!(c.head, h);
        q.add_used(&mem, c.head, round).unwrap();
        assert_eq!(q.pop(&mem).unwrap(), None);
    }
    assert_eq!(drv.used_idx(&mem), (70_000u32 % 65536) as u16);
}

#[test]
fn refuses_bad_sizes_and_areas() {
    let mem = TestMemory::new();
    let drv = Driver::new(8);
    for size in [0, 3, 12, 512] {
        let mut q = drv.queue(256);
        q.size = size;
        assert!(
            matches!(q.validate(&mem), Err(QueueError::BadSize { .. })),
            "{size}"
        );
    }
    let mut q = drv.queue(256);
    q.desc_addr = BASE + 8;
    assert!(matches!(
        q.validate(&mem),
        Err(QueueError::Misaligned { .. })
    ));
    let mut q = drv.queue(256);
    q.used_addr = BASE + SIZE - 16; // straddles the end of RAM
    assert!(matches!(
        q.validate(&mem),
        Err(QueueError::AreaOutsideRam { .. })
    ));
    let mut q = drv.queue(256);
    q.avail_addr = u64::MAX - 1; // wraps
    assert!(matches!(
        q.validate(&mem),
        Err(QueueError::AreaOutsideRam { .. })
    ));
    let mut q = drv.queue(256);
    q.desc_addr = 0;
    assert!(matches!(
        q.validate(&mem),
        Err(QueueError::AreaOutsideRam { .. })
    ));
    let mut q = drv.queue(256);
    q.ready = false;
    assert_eq!(q.pop(&mem), Err(QueueError::NotReady));
    assert_eq!(refused(&mem), 0);
}

#[test]
fn refuses_descriptors_outside_ram() {
    for (addr, len) in [
        (0u64, 16u32),         // below RAM
        (BASE + SIZE - 8, 16), // straddles the end
        (BASE + SIZE, 1),      // just past the end
        (BASE, u32::MAX),      // a 4 GiB buffer
        (u64::MAX - 4, 16),    // wraps the address space
    ] {
        let mem = TestMemory::new();
        let mut drv = Driver::new(8);
        let mut q = drv.queue(8);
        drv.post(&mem, &[(DATA, 16, false), (addr, len, true)]);
        assert!(
            matches!(
                q.pop(&mem),
                Err(QueueError::BufferOutsideRam { index: 1, .. })
            ),
            "{addr:#x}+{len:#x}"
        );
        assert_eq!(refused(&mem), 0, "nothing outside RAM was touched");
    }
}

#[test]
fn zero_length_buffers_are_carried_but_empty() {
    let mem = TestMemory::new();
    let mut drv = Driver::new(8);
    let mut q = drv.queue(8);
    // A zero-length buffer at an address outside RAM is never touched, but refused all the
    // same: a well-behaved driver never posts one.
    drv.post(&mem, &[(DATA, 0, true), (DATA + 8, 4, true)]);
    let c = q.pop(&mem).unwrap().unwrap();
    let mut cur = Cursor::new(&c.writable);
    assert_eq!(cur.take(100), Some((DATA + 8, 4)));
    assert_eq!(cur.take(100), None);
    drv.post(&mem, &[(BASE + SIZE + 64, 0, true)]);
    assert!(matches!(
        q.pop(&mem),
        Err(QueueError::BufferOutsideRam { .. })
    ));
}

#[test]
fn refuses_loops_and_over_long_chains() {
    let mem = TestMemory::new();
    let mut drv = Driver::new(4);
    let mut q = drv.queue(4);
    // 0 -> 1 -> 0: a loop.
    drv.set_desc(&mem, 0, DATA, 8, F_NEXT, 1);
    drv.set_desc(&mem, 1, DATA, 8, F_NEXT, 0);
    drv.publish(&mem, 0);
    assert_eq!(
        q.pop(&mem),
        Err(QueueError::ChainTooLong { head: 0, size: 4 })
    );
    // A descriptor that names itself.
    let mem = TestMemory::new();
    let mut drv = Driver::new(4);
    let mut q = drv.queue(4);
    drv.set_desc(&mem, 2, DATA, 8, F_NEXT | F_WRITE, 2);
    drv.publish(&mem, 2);
    assert_eq!(
        q.pop(&mem),
        Err(QueueError::ChainTooLong { head: 2, size: 4 })
    );
    // next out of range, head out of range.
    let mut q = drv.queue(4);
    let mut drv2 = Driver::new(4);
    drv2.set_desc(&mem, 0, DATA, 8, F_NEXT, 4);
    drv2.publish(&mem, 0);
    assert_eq!(q.pop(&mem), Err(QueueError::BadIndex { index: 4, size: 4 }));
    drv2.publish(&mem, 0xffff);
    assert!(matches!(
        q.pop(&mem),
        Err(QueueError::BadIndex { index: 0xffff, .. })
    ));
    assert_eq!(refused(&mem), 0);
}

#[test]
fn refuses_indirect_and_read_after_write() {
    let mem = TestMemory::new();
    let mut drv = Driver::new(4);
    let mut q = drv.queue(4);
    drv.set_desc(&mem, 0, DATA, 16, 4, 0);
    drv.publish(&mem, 0);
    assert_eq!(q.pop(&mem), Err(QueueError::Indirect { index: 0 }));
    drv.set_desc(&mem, 1, DATA, 8, F_WRITE | F_NEXT, 2);
    drv.set_desc(&mem, 2, DATA, 8, 0, 0);
    drv.publish(&mem, 1);
    assert_eq!(q.pop(&mem), Err(QueueError::ReadAfterWrite { index: 2 }));
}

#[test]
fn available_index_games_are_detected() {
    let mem = TestMemory::new();
    let drv = Driver::new(8);
    let mut q = drv.queue(8);
    // The driver claims 9 new entries in an 8-entry ring.
    mem.put(drv.avail + 2, &9u16.to_le_bytes());
    assert!(matches!(q.pop(&mem), Err(QueueError::AvailJump { .. })));
    // Moving the index backwards is a jump of almost 65536.
    let mut q = drv.queue(8);
    mem.put(drv.avail + 2, &0xffffu16.to_le_bytes());
    assert!(matches!(q.pop(&mem), Err(QueueError::AvailJump { .. })));
    // The guest scribbling on the used index does not change what the device publishes.
    let mut drv = Driver::new(8);
    let mut q = drv.queue(8);
    let h = drv.post(&mem, &[(DATA, 8, true)]);
    mem.put(drv.used + 2, &0x1234u16.to_le_bytes());
    let c = q.pop(&mem).unwrap().unwrap();
    q.add_used(&mem, c.head, 8).unwrap();
    assert_eq!(drv.used_idx(&mem), 1);
    assert_eq!(drv.used_elem(&mem, 0), (u32::from(h), 8));
}

#[test]
fn cursor_splits_and_truncates() {
    let mem = TestMemory::new();
    let descs = [
        Desc { addr: DATA, len: 3 },
        Desc {
            addr: DATA + 100,
            len: 5,
        },
    ];
    mem.put(DATA, b"abc");
    mem.put(DATA + 100, b"defgh");
    let mut cur = Cursor::new(&descs);
    cur.truncate_end(1);
    assert_eq!(cur.remaining(), 7);
    let mut buf = [0u8; 16];
    assert_eq!(cur.read_to(&mem, &mut buf).unwrap(), 7);
    assert_eq!(&buf[..7], b"abcdefg");
    let mut cur = Cursor::new(&descs);
    assert_eq!(cur.write_from(&mem, b"0123456789").unwrap(), 8);
    assert_eq!(mem.get(DATA + 100, 5), b"34567");
}

//! A hostile guest driving one device through a transport (virtio-mmio, or virtio-pci with
//! its configuration space and MSI-X), from a byte string: the `cargo fuzz` targets in
//! `fuzz/` feed it libFuzzer's inputs, and unit tests feed it random ones. Whatever the bytes, nothing may panic and the device may never try
//! to touch memory outside guest RAM (the test memory counts such attempts).
//!
//! The input is a sequence of operations: register reads and writes, writes into guest
//! memory, descriptors and available-ring entries placed where the queues are, queue
//! notifications, and worker kicks. One operation sets the device up the way a correct
//! driver would, so the fuzzer reaches the queue handlers instead of spending its time on
//! the status handshake.

use super::mmio::MmioTransport;
use super::pci::{self as vpci, PciTransport};
use super::testmem::{BASE, SIZE, TestMemory};
use super::{GuestMemory, VirtioDevice};
use crate::IrqLine;
use crate::bus::BusDevice;
use crate::pci::PciFunction;
use crate::pci::msix::{self, MsiMessage, MsiSink};
use std::sync::Arc;
use std::sync::atomic::Ordering;

struct NoIrq;
impl IrqLine for NoIrq {
    fn set_level(&self, _high: bool) {}
}

struct NoMsi;
impl MsiSink for NoMsi {
    fn route(&self, _vector: u16, _msg: Option<MsiMessage>) {}
    fn signal(&self, _vector: u16) {}
}

/// The guest's side of a transport, as the harness drives it.
trait Driven {
    /// A register access; `sel` picks the register space and width where there is a choice.
    fn write(&mut self, sel: u8, off: u16, val: u32);
    fn read(&mut self, sel: u8, off: u16, width: u8);
    fn notify(&mut self, q: u32);
    /// The host side serving queue `q` (what a worker thread or ioeventfd does).
    fn kick(&mut self, q: u32);
    /// What a correct driver does: acknowledge, accept every offered feature, set up each
    /// queue with `size` entries at [`ring_base`], and start the device.
    fn set_up(&mut self, queues: u64, size: u32);
}

/// Where queue `q`'s rings live once set up: 32 KiB apart from the bottom of RAM.
fn ring_base(q: u64) -> u64 {
    BASE + q * 0x8000
}

struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn bytes(&mut self, n: usize) -> Option<&[u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }
    fn u8(&mut self) -> Option<u8> {
        self.bytes(1).map(|b| b[0])
    }
    fn u16(&mut self) -> Option<u16> {
        self.bytes(2).map(|b| u16::from_le_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Option<u32> {
        self.bytes(4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
}

/// Runs `input` against `device` on virtio-mmio; panics (the fuzzer's finding) if the device
/// reached for memory outside guest RAM.
pub fn run_mmio(device: Box<dyn VirtioDevice>, input: &[u8]) {
    let mem = Arc::new(TestMemory::new());
    let queues = device.queue_max_sizes().len() as u64;
    let t = MmioTransport::new(device, mem.clone(), Arc::new(NoIrq));
    run(t, &mem, queues, input);
}

/// Runs `input` against `device` on virtio-pci (configuration space, BAR 0, MSI-X).
pub fn run_pci(device: Box<dyn VirtioDevice>, input: &[u8]) {
    let mem = Arc::new(TestMemory::new());
    let queues = device.queue_max_sizes().len() as u64;
    let t = PciTransport::new(device, mem.clone(), Arc::new(NoMsi), PCI_BAR);
    run(t, &mem, queues, input);
}

fn run(mut t: impl Driven, mem: &TestMemory, queues: u64, input: &[u8]) {
    let mut input = Input(input);
    let mut avail_idx = vec![0u16; queues as usize];
    while let Some(op) = input.u8() {
        let done = match op % 8 {
            0 => (|| {
                let (sel, off, val) = (input.u8()?, input.u16()?, input.u32()?);
                t.write(sel, off, val);
                Some(())
            })(),
            1 => (|| {
                let (sel, off, width) = (input.u8()?, input.u16()?, input.u8()?);
                t.read(sel, off, width);
                Some(())
            })(),
            2 => (|| {
                let (addr, len) = (input.u32()?, input.u8()?);
                let data = input.bytes(usize::from(len))?;
                let at = BASE + u64::from(addr) % SIZE;
                let n = data.len().min((BASE + SIZE - at) as usize);
                mem.write(at, &data[..n]).ok()
            })(),
            3 => input
                .u8()
                .map(|q| t.notify(u32::from(q) % (queues as u32 + 1))),
            4 => input.u8().map(|size| t.set_up(queues, 1 << (size % 9))),
            5 => input
                .u8()
                .map(|q| t.kick(u32::from(q) % (queues as u32 + 1))),
            6 => (|| {
                let (q, head) = (u64::from(input.u8()?) % queues, input.u16()?);
                let idx = &mut avail_idx[q as usize];
                let avail = ring_base(q) + 0x4000;
                let slot = u64::from(*idx % 256);
                mem.write(avail + 4 + 2 * slot, &head.to_le_bytes()).ok()?;
                *idx = idx.wrapping_add(1);
                mem.write(avail + 2, &idx.to_le_bytes()).ok()
            })(),
            _ => (|| {
                let (q, index) = (u64::from(input.u8()?) % queues, input.u8()?);
                let (addr, len) = (input.u32()?, input.u32()?);
                let (flags, next) = (input.u16()?, input.u16()?);
                // Mostly inside RAM (above the rings), sometimes anywhere at all.
                let addr = if flags & 0x8000 != 0 {
                    u64::from(addr) << (flags & 0x1f)
                } else {
                    BASE + 0x40000 + u64::from(addr) % (SIZE - 0x40000)
                };
                let mut d = [0u8; 16];
                d[0..8].copy_from_slice(&addr.to_le_bytes());
                d[8..12].copy_from_slice(&(len % 0x2_0000).to_le_bytes());
                d[12..14].copy_from_slice(&(flags & 0x7).to_le_bytes());
                d[14..16].copy_from_slice(&next.to_le_bytes());
                mem.write(ring_base(q) + 16 * u64::from(index), &d).ok()
            })(),
        };
        if done.is_none() {
            break;
        }
    }
    assert_eq!(
        mem.refused.load(Ordering::SeqCst),
        0,
        "the device reached for memory outside guest RAM"
    );
}

fn write_reg(t: &mut MmioTransport, off: u64, val: u32) {
    BusDevice::write(t, off, &val.to_le_bytes());
}

impl Driven for MmioTransport {
    fn write(&mut self, _sel: u8, off: u16, val: u32) {
        write_reg(self, u64::from(off % 0x200), val);
    }
    fn read(&mut self, _sel: u8, off: u16, width: u8) {
        let mut buf = [0u8; 8];
        BusDevice::read(
            self,
            u64::from(off % 0x200),
            &mut buf[..usize::from(width % 9)],
        );
    }
    fn notify(&mut self, q: u32) {
        write_reg(self, 0x50, q);
    }
    fn kick(&mut self, q: u32) {
        MmioTransport::kick(self, q);
    }
    fn set_up(&mut self, queues: u64, size: u32) {
        let t = self;
        write_reg(t, 0x70, 0);
        write_reg(t, 0x70, 1 | 2);
        for sel in 0..2 {
            write_reg(t, 0x14, sel);
            let mut f = [0u8; 4];
            BusDevice::read(t, 0x10, &mut f);
            write_reg(t, 0x24, sel);
            write_reg(t, 0x20, u32::from_le_bytes(f));
        }
        write_reg(t, 0x70, 1 | 2 | 8);
        for q in 0..queues {
            let base = ring_base(q);
            write_reg(t, 0x30, q as u32);
            write_reg(t, 0x38, size);
            for (off, addr) in [(0x80, base), (0x90, base + 0x4000), (0xa0, base + 0x6000)] {
                write_reg(t, off, addr as u32);
                write_reg(t, off + 4, (addr >> 32) as u32);
            }
            write_reg(t, 0x44, 1);
        }
        write_reg(t, 0x70, 1 | 2 | 8 | 4);
    }
}

/// Where BAR 0 starts out (decoding is off until the guest enables it).
const PCI_BAR: u32 = 0xc000_0000;
/// Configuration space offsets the harness uses: command register, the MSI-X capability.
const PCI_COMMAND: usize = 0x04;

/// Access widths a PCI access may have: `sel` picks one (and config space or BAR 0).
fn pci_width(sel: u8) -> usize {
    [1, 2, 4, 8][usize::from(sel >> 1) % 4]
}

impl PciTransport {
    fn bar_wr(&mut self, off: u64, len: usize, val: u64) {
        self.bar_write(0, off, &val.to_le_bytes()[..len]);
    }

    fn cap_offset(&mut self, id: u8) -> Option<usize> {
        let mut b = [0u8; 2];
        self.config_read(0x34, &mut b[..1]);
        let mut at = usize::from(b[0]);
        // A capability list is at most 48 entries long in 256 bytes.
        for _ in 0..48 {
            if at == 0 {
                return None;
            }
            self.config_read(at, &mut b);
            if b[0] == id {
                return Some(at);
            }
            at = usize::from(b[1]);
        }
        None
    }
}

impl Driven for PciTransport {
    /// `sel` bit 0: configuration space (offset mod 256) or BAR 0 (mod its size).
    fn write(&mut self, sel: u8, off: u16, val: u32) {
        let len = pci_width(sel);
        let bytes = u64::from(val).wrapping_mul(0x1_0000_0001).to_le_bytes();
        if sel & 1 == 0 {
            self.config_write(usize::from(off % 256), &bytes[..len.min(4)]);
        } else {
            self.bar_write(0, u64::from(off) % u64::from(vpci::BAR_SIZE), &bytes[..len]);
        }
    }
    fn read(&mut self, sel: u8, off: u16, width: u8) {
        let mut buf = [0u8; 8];
        let len = usize::from(width % 9);
        if sel & 1 == 0 {
            self.config_read(usize::from(off % 256), &mut buf[..len.min(4)]);
        } else {
            self.bar_read(
                0,
                u64::from(off) % u64::from(vpci::BAR_SIZE),
                &mut buf[..len],
            );
        }
    }
    fn notify(&mut self, q: u32) {
        self.bar_wr(vpci::notify_addr(0, q), 2, u64::from(q));
    }
    fn kick(&mut self, q: u32) {
        PciTransport::kick(self, q);
    }
    fn set_up(&mut self, queues: u64, size: u32) {
        // Memory decoding and bus mastering on; MSI-X on with every vector routed.
        self.config_write(PCI_COMMAND, &6u16.to_le_bytes());
        if let Some(cap) = self.cap_offset(msix::CAP_ID) {
            self.config_write(cap + 2, &msix::CTRL_ENABLE.to_le_bytes());
        }
        for v in 0..=queues {
            let e = vpci::MSIX_TABLE + msix::ENTRY_SIZE * v;
            self.bar_wr(e, 4, 0xfee0_0000);
            self.bar_wr(e + 8, 4, 0x30 + v);
            self.bar_wr(e + 12, 4, 0);
        }
        // Common configuration (virtio 1.2 §4.1.4.3).
        self.bar_wr(0x14, 1, 0);
        self.bar_wr(0x14, 1, 1 | 2);
        for sel in 0..2 {
            self.bar_wr(0x00, 4, sel);
            let mut f = [0u8; 4];
            self.bar_read(0, 0x04, &mut f);
            self.bar_wr(0x08, 4, sel);
            self.bar_wr(0x0c, 4, u64::from(u32::from_le_bytes(f)));
        }
        self.bar_wr(0x14, 1, 1 | 2 | 8);
        self.bar_wr(0x10, 2, 0);
        for q in 0..queues {
            let base = ring_base(q);
            self.bar_wr(0x16, 2, q);
            self.bar_wr(0x18, 2, u64::from(size));
            self.bar_wr(0x1a, 2, q + 1);
            for (off, addr) in [(0x20, base), (0x28, base + 0x4000), (0x30, base + 0x6000)] {
                self.bar_wr(off, 8, addr);
            }
            self.bar_wr(0x1c, 2, 1);
        }
        self.bar_wr(0x14, 1, 1 | 2 | 8 | 4);
    }
}

/// A file (or socket path) of this thread's own, so parallel tests never share one.
fn scratch(what: &str) -> std::path::PathBuf {
    let id = format!("{:?}", std::thread::current().id());
    let id: String = id.chars().filter(char::is_ascii_digit).collect();
    std::env::temp_dir().join(format!("vme-fuzz-{}-{id}-{what}", std::process::id()))
}

/// A 1 MiB raw disk, or (the input's last byte odd) an overlay on a 1 MiB base.
fn block_device(input: &[u8]) -> Box<dyn VirtioDevice> {
    let path = scratch("disk");
    let file = std::fs::File::create(&path).expect("create the fuzz disk");
    file.set_len(1 << 20).expect("size the fuzz disk");
    let readonly = input.first().is_some_and(|b| b & 1 != 0);
    if input.last().is_none_or(|b| b & 1 == 0) {
        return Box::new(
            super::block::Block::open(&path, readonly, "fuzz").expect("open the fuzz disk"),
        );
    }
    let base = scratch("base");
    let data: Vec<u8> = (0..1u32 << 20).map(|i| (i / 512) as u8).collect();
    std::fs::write(&base, &data).expect("write the fuzz base");
    super::cow::new_overlay_file(&base, &path).expect("make the fuzz overlay");
    Box::new(
        super::block::Block::open_disk(&path, Some(&base), readonly, "fuzz")
            .expect("open the fuzz overlay"),
    )
}

pub fn block(input: &[u8]) {
    run_mmio(block_device(input), input);
}

/// One end of a datagram socket pair moves whole frames like a tap (the other end plays the
/// host's network); the offload flags the device sets are kept for tests to read.
pub(crate) struct Frames {
    pub sock: std::os::unix::net::UnixDatagram,
    pub offload: Arc<std::sync::atomic::AtomicU32>,
}

impl Frames {
    pub fn new(sock: std::os::unix::net::UnixDatagram) -> Frames {
        Frames {
            sock,
            offload: Arc::new(std::sync::atomic::AtomicU32::new(u32::MAX)),
        }
    }
}

impl std::os::fd::AsRawFd for Frames {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.sock.as_raw_fd()
    }
}

impl super::net::FrameIo for Frames {
    fn recv(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.sock.recv(buf)
    }
    fn send(&mut self, frame: &[u8]) -> std::io::Result<usize> {
        self.sock.send(frame)
    }
    fn set_offload(&mut self, flags: u32) -> std::io::Result<()> {
        self.offload.store(flags, Ordering::SeqCst);
        Ok(())
    }
}

fn net_device() -> Box<dyn VirtioDevice> {
    let (ours, peer) = std::os::unix::net::UnixDatagram::pair().expect("socket pair");
    ours.set_nonblocking(true).expect("non-blocking");
    peer.set_nonblocking(true).expect("non-blocking");
    // Frames waiting for the guest: a small one and a GSO-sized one.
    let _ = peer.send(&[0u8; 60]);
    let _ = peer.send(&vec![0x55u8; super::net::HDR_LEN + 65000]);
    Box::new(
        super::net::Net::new(Box::new(Frames::new(ours)), [0x52, 0x54, 0, 1, 2, 3])
            .expect("net device"),
    )
}

pub fn net(input: &[u8]) {
    run_mmio(net_device(), input);
}

pub fn rng(input: &[u8]) {
    run_mmio(Box::new(super::rng::Rng::new()), input);
}

fn vsock_device() -> Box<dyn VirtioDevice> {
    let path = scratch("vsock");
    let dev = super::vsock::Vsock::new(3, &path).expect("vsock device");
    // A host client waiting to reach guest port 1024, so the receive side has work.
    if let Ok(mut c) = std::os::unix::net::UnixStream::connect(&path) {
        use std::io::Write;
        let _ = c.write_all(b"CONNECT 1024\nhello");
        std::mem::forget(c);
    }
    Box::new(dev)
}

pub fn vsock(input: &[u8]) {
    run_mmio(vsock_device(), input);
}

pub fn balloon(input: &[u8]) {
    run_mmio(Box::new(super::balloon::Balloon::new(SIZE, true)), input);
}

/// The PCI transport with one of the devices, chosen by the first byte.
pub fn pci(input: &[u8]) {
    let Some((&which, rest)) = input.split_first() else {
        return;
    };
    let dev: Box<dyn VirtioDevice> = match which % 5 {
        0 => block_device(rest),
        1 => net_device(),
        2 => Box::new(super::rng::Rng::new()),
        3 => vsock_device(),
        _ => Box::new(super::balloon::Balloon::new(SIZE, true)),
    };
    run_pci(dev, rest);
}

#[cfg(test)]
mod tests {
    /// xorshift: reproducible random inputs without a dependency.
    fn inputs(seed: u64, n: usize) -> Vec<Vec<u8>> {
        let mut x = seed | 1;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        (0..n)
            .map(|_| {
                let len = (next() % 2048) as usize;
                // Start with a set-up most of the time, as a fuzzer soon learns to.
                let mut v: Vec<u8> = (0..len).map(|_| next() as u8).collect();
                if next() % 4 != 0 && v.len() > 2 {
                    v[0] = 4;
                    v[1] = 4 + (next() % 5) as u8;
                }
                v
            })
            .collect()
    }

    /// The harness's set-up must start the device on both transports, or the fuzzer would
    /// never reach the queue handlers.
    #[test]
    fn set_up_starts_the_device_on_both_transports() {
        use super::*;
        let mem = Arc::new(TestMemory::new());
        let mut pci = PciTransport::new(
            Box::new(super::super::rng::Rng::new()),
            mem.clone(),
            Arc::new(NoMsi),
            PCI_BAR,
        );
        pci.set_up(1, 8);
        assert_eq!(pci.status(), 1 | 2 | 4 | 8);
        let mut mmio = MmioTransport::new(
            Box::new(super::super::rng::Rng::new()),
            mem,
            Arc::new(NoIrq),
        );
        mmio.set_up(1, 8);
        let mut status = [0u8; 4];
        BusDevice::read(&mut mmio, 0x70, &mut status);
        assert_eq!(u32::from_le_bytes(status), 1 | 2 | 4 | 8);
    }

    #[test]
    fn random_guests_never_panic_or_leave_ram() {
        type Target = fn(&[u8]);
        let targets: [(&str, Target); 6] = [
            ("block", super::block),
            ("net", super::net),
            ("rng", super::rng),
            ("vsock", super::vsock),
            ("balloon", super::balloon),
            ("pci", super::pci),
        ];
        for (i, (name, target)) in targets.into_iter().enumerate() {
            for input in inputs(0x5eed + i as u64, 150) {
                let r = std::panic::catch_unwind(|| target(&input));
                assert!(r.is_ok(), "{name}: input {input:02x?}");
            }
        }
    }
}

use super::*;
use crate::virtio::testmem::{BASE, Driver, TestMemory};
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicUsize, Ordering};

const GUEST_CID: u64 = 42;
const RX_BUFS: u64 = BASE + 0x20000;
const TX_DATA: u64 = BASE + 0x80000;
const RX_BUF_LEN: u32 = 4096 + HDR_LEN as u32;

fn temp_path(what: &str) -> PathBuf {
    static N: AtomicUsize = AtomicUsize::new(0);
    let n = N.fetch_add(1, Ordering::SeqCst);
    let dir = std::env::temp_dir().join(format!("vme-vsock-{}-{n}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(what)
}

struct Rig {
    mem: TestMemory,
    rx: Driver,
    tx: Driver,
    rxq: Queue,
    txq: Queue,
    dev: Vsock,
    path: PathBuf,
    rx_seen: u16,
    rx_posted: u16,
    tx_off: u64,
}

impl Rig {
    fn new() -> Rig {
        let path = temp_path("v.sock");
        let mut dev = Vsock::new(GUEST_CID, &path).unwrap();
        dev.activate(crate::virtio::F_VERSION_1);
        let rx = Driver::at(64, BASE);
        let tx = Driver::at(64, BASE + 0x8000);
        let (rxq, txq) = (rx.queue(QUEUE_SIZE), tx.queue(QUEUE_SIZE));
        Rig {
            mem: TestMemory::new(),
            rx,
            tx,
            rxq,
            txq,
            dev,
            path,
            rx_seen: 0,
            rx_posted: 0,
            tx_off: 0,
        }
    }

    /// The guest sends one packet (header and payload in separate buffers, as Linux does).
    fn send(&mut self, h: Header, payload: &[u8]) -> Result<bool, QueueError> {
        let at = TX_DATA + self.tx_off;
        self.tx_off = (self.tx_off + 0x20000) % 0x60000;
        self.mem.put(at, &h.encode());
        self.mem.put(at + 0x100, payload);
        let mut bufs = vec![(at, HDR_LEN as u32, false)];
        if !payload.is_empty() {
            bufs.push((at + 0x100, payload.len() as u32, false));
        }
        self.tx.post(&self.mem, &bufs);
        self.dev.process(TX_QUEUE, &mut self.txq, &self.mem)
    }

    fn guest(&self, op: u16, src_port: u32, dst_port: u32) -> Header {
        Header {
            src_cid: GUEST_CID,
            dst_cid: HOST_CID,
            src_port,
            dst_port,
            kind: TYPE_STREAM,
            op,
            buf_alloc: 1 << 20,
            ..Header::default()
        }
    }

    /// Posts `n` receive buffers.
    fn post_rx(&mut self, n: u16) {
        for _ in 0..n {
            // 16 buffer areas, reused in turn: tests keep fewer outstanding.
            let at = RX_BUFS + u64::from(self.rx_posted % 16) * 0x1100;
            self.rx_posted += 1;
            self.rx.post(&self.mem, &[(at, RX_BUF_LEN, true)]);
        }
    }

    /// Kicks the receive queue (as the worker would) and returns the packets delivered.
    fn receive(&mut self) -> Vec<(Header, Vec<u8>)> {
        self.dev
            .process(RX_QUEUE, &mut self.rxq, &self.mem)
            .unwrap();
        let mut out = Vec::new();
        while self.rx_seen != self.rx.used_idx(&self.mem) {
            let (id, len) = self.rx.used_elem(&self.mem, self.rx_seen);
            self.rx_seen = self.rx_seen.wrapping_add(1);
            let addr = u64::from_le_bytes(
                self.mem
                    .get(self.rx.desc + 16 * u64::from(id), 8)
                    .try_into()
                    .unwrap(),
            );
            let bytes = self.mem.get(addr, len as usize);
            let h = Header::decode(bytes[..HDR_LEN].try_into().unwrap());
            assert_eq!(h.len as usize, len as usize - HDR_LEN);
            out.push((h, bytes[HDR_LEN..].to_vec()));
        }
        out
    }

    /// Receives until a packet arrives (host sockets are read as they become ready).
    fn receive_some(&mut self) -> Vec<(Header, Vec<u8>)> {
        for _ in 0..200 {
            let p = self.receive();
            if !p.is_empty() {
                return p;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        panic!("no packet reached the guest");
    }
}

fn host_listener(rig: &Rig, port: u32) -> UnixListener {
    UnixListener::bind(format!("{}_{port}", rig.path.display())).unwrap()
}

#[test]
fn config_space_holds_the_guest_cid() {
    let rig = Rig::new();
    let mut c = [0u8; 8];
    rig.dev.read_config(0, &mut c);
    assert_eq!(u64::from_le_bytes(c), GUEST_CID);
    let mut past = [0xffu8; 4];
    rig.dev.read_config(8, &mut past);
    assert_eq!(past, [0; 4]);
    assert!(
        Vsock::new(2, &temp_path("x")).is_err(),
        "CID 2 is the host's"
    );
    assert!(Vsock::new(u64::from(u32::MAX), &temp_path("x")).is_err());
}

#[test]
fn a_guest_connects_to_a_host_listener_and_data_flows_both_ways() {
    let mut rig = Rig::new();
    let listener = host_listener(&rig, 5000);
    rig.post_rx(8);
    rig.send(rig.guest(OP_REQUEST, 1234, 5000), &[]).unwrap();
    let (mut host, _) = listener.accept().unwrap();
    let got = rig.receive();
    assert_eq!(got.len(), 1);
    let h = got[0].0;
    assert_eq!(
        (h.op, h.src_cid, h.dst_cid),
        (OP_RESPONSE, HOST_CID, GUEST_CID)
    );
    assert_eq!((h.src_port, h.dst_port), (5000, 1234));
    assert_eq!(h.buf_alloc, conn::BUF_ALLOC);

    let mut rw = rig.guest(OP_RW, 1234, 5000);
    rw.len = 5;
    rig.send(rw, b"hello").unwrap();
    let mut buf = [0u8; 5];
    host.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"hello");

    host.write_all(b"world!").unwrap();
    let got = rig.receive_some();
    assert_eq!(got[0].0.op, OP_RW);
    assert_eq!(got[0].1, b"world!");
    assert_eq!(got[0].0.fwd_cnt, 5, "the guest hears what we forwarded");

    // The guest closes: the host sees EOF and the guest gets the reset that ends its close.
    rig.send(
        Header {
            flags: SHUTDOWN_RCV | SHUTDOWN_SEND,
            ..rig.guest(OP_SHUTDOWN, 1234, 5000)
        },
        &[],
    )
    .unwrap();
    assert_eq!(host.read(&mut buf).unwrap(), 0);
    let got = rig.receive();
    assert_eq!(got[0].0.op, OP_RST);
    assert_eq!(rig.dev.connections(), 0);
}

#[test]
fn a_guest_connecting_to_a_port_nobody_listens_on_is_reset() {
    let mut rig = Rig::new();
    rig.post_rx(4);
    rig.send(rig.guest(OP_REQUEST, 1, 7777), &[]).unwrap();
    let got = rig.receive();
    assert_eq!(got[0].0.op, OP_RST);
    assert_eq!((got[0].0.src_port, got[0].0.dst_port), (7777, 1));
    // Data for a connection that does not exist is answered with a reset too.
    let mut rw = rig.guest(OP_RW, 1, 7777);
    rw.len = 3;
    rig.send(rw, b"abc").unwrap();
    assert_eq!(rig.receive()[0].0.op, OP_RST);
}

#[test]
fn a_host_client_connects_with_the_firecracker_handshake() {
    let mut rig = Rig::new();
    rig.post_rx(8);
    let mut client = UnixStream::connect(&rig.path).unwrap();
    client.write_all(b"CONNECT 1024\nearly").unwrap();
    let got = rig.receive_some();
    let h = got[0].0;
    assert_eq!((h.op, h.dst_port, h.dst_cid), (OP_REQUEST, 1024, GUEST_CID));
    assert!(h.src_port >= FIRST_LOCAL_PORT);
    let host_port = h.src_port;
    rig.send(rig.guest(OP_RESPONSE, 1024, host_port), &[])
        .unwrap();
    let mut line = [0u8; 64];
    let n = client.read(&mut line).unwrap();
    assert_eq!(
        std::str::from_utf8(&line[..n]).unwrap(),
        format!("OK {host_port}\n")
    );
    // Bytes the client sent right after its CONNECT line reach the guest first.
    let got = rig.receive_some();
    assert_eq!((got[0].0.op, got[0].1.as_slice()), (OP_RW, &b"early"[..]));

    let mut rw = rig.guest(OP_RW, 1024, host_port);
    rw.len = 4;
    rig.send(rw, b"pong").unwrap();
    let mut buf = [0u8; 4];
    client.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"pong");

    // The client hangs up: the guest is told the host sends and receives no more.
    drop(client);
    let got = rig.receive_some();
    assert_eq!(got[0].0.op, OP_SHUTDOWN);
    assert_eq!(got[0].0.flags, SHUTDOWN_RCV | SHUTDOWN_SEND);
    rig.send(rig.guest(OP_RST, 1024, host_port), &[]).unwrap();
    assert_eq!(rig.dev.connections(), 0);
}

#[test]
fn a_malformed_connect_line_drops_the_client() {
    let mut rig = Rig::new();
    rig.post_rx(2);
    let mut client = UnixStream::connect(&rig.path).unwrap();
    client.write_all(b"CONNECT nonsense\n").unwrap();
    for _ in 0..50 {
        rig.receive();
        let mut b = [0u8; 1];
        client.set_nonblocking(true).unwrap();
        if let Ok(0) = client.read(&mut b) {
            assert_eq!(rig.dev.connections(), 0);
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    panic!("the client was not dropped");
}

#[test]
fn host_data_never_exceeds_the_guests_credit() {
    let mut rig = Rig::new();
    let listener = host_listener(&rig, 6000);
    rig.post_rx(16);
    let req = Header {
        buf_alloc: 100,
        ..rig.guest(OP_REQUEST, 9, 6000)
    };
    rig.send(req, &[]).unwrap();
    let (mut host, _) = listener.accept().unwrap();
    assert_eq!(rig.receive()[0].0.op, OP_RESPONSE);
    host.write_all(&[7u8; 1000]).unwrap();
    let got = rig.receive_some();
    let total: usize = got.iter().map(|(_, d)| d.len()).sum();
    assert_eq!(total, 100, "only the guest's 100-byte buffer is filled");
    std::thread::sleep(std::time::Duration::from_millis(20));
    assert!(rig.receive().is_empty(), "nothing more without credit");
    // The guest read it all and says so.
    let upd = Header {
        buf_alloc: 100,
        fwd_cnt: 100,
        ..rig.guest(OP_CREDIT_UPDATE, 9, 6000)
    };
    rig.send(upd, &[]).unwrap();
    let got = rig.receive_some();
    let total: usize = got.iter().map(|(_, d)| d.len()).sum();
    assert_eq!(total, 100);
}

#[test]
fn a_guest_sending_past_its_credit_is_reset() {
    let mut rig = Rig::new();
    let listener = host_listener(&rig, 6001);
    rig.post_rx(8);
    rig.send(rig.guest(OP_REQUEST, 9, 6001), &[]).unwrap();
    let (host, _) = listener.accept().unwrap();
    assert_eq!(rig.receive()[0].0.op, OP_RESPONSE);
    // The host does not read: once its socket buffer and our BUF_ALLOC are full, the
    // guest has no credit left, and sending on anyway breaks the protocol.
    let chunk = vec![1u8; MAX_PAYLOAD];
    for _ in 0..64 {
        let mut rw = rig.guest(OP_RW, 9, 6001);
        rw.len = chunk.len() as u32;
        rig.send(rw, &chunk).unwrap();
        if rig.dev.connections() == 0 {
            break;
        }
    }
    let got = rig.receive();
    assert!(got.iter().any(|(h, _)| h.op == OP_RST), "{got:?}");
    assert_eq!(rig.dev.connections(), 0);
    drop(host);
}

#[test]
fn spoofed_and_misaddressed_packets_do_not_reach_the_host() {
    let mut rig = Rig::new();
    let listener = host_listener(&rig, 6002);
    listener.set_nonblocking(true).unwrap();
    rig.post_rx(8);
    let spoofed = Header {
        src_cid: 3,
        ..rig.guest(OP_REQUEST, 9, 6002)
    };
    rig.send(spoofed, &[]).unwrap();
    assert!(rig.receive().is_empty(), "dropped without an answer");
    assert!(listener.accept().is_err(), "never connected");
    let elsewhere = Header {
        dst_cid: 7,
        ..rig.guest(OP_REQUEST, 9, 6002)
    };
    rig.send(elsewhere, &[]).unwrap();
    assert_eq!(rig.receive()[0].0.op, OP_RST);
    let seqpacket = Header {
        kind: 2,
        ..rig.guest(OP_REQUEST, 9, 6002)
    };
    rig.send(seqpacket, &[]).unwrap();
    assert_eq!(rig.receive()[0].0.op, OP_RST);
    assert!(listener.accept().is_err());
}

#[test]
fn malformed_chains_put_the_device_into_needs_reset() {
    let mut rig = Rig::new();
    // Payload longer than 64 KiB.
    let mut h = rig.guest(OP_RW, 1, 2);
    h.len = MAX_PAYLOAD as u32 + 1;
    assert!(matches!(
        rig.send(h, &[]),
        Err(QueueError::Malformed { .. })
    ));
    // A header claiming more payload than the chain holds.
    let mut rig = Rig::new();
    let mut h = rig.guest(OP_RW, 1, 2);
    h.len = 100;
    assert!(rig.send(h, b"short").is_err());
    // A chain shorter than a header.
    let mut rig = Rig::new();
    rig.tx.post(&rig.mem, &[(TX_DATA, 10, false)]);
    assert!(rig.dev.process(TX_QUEUE, &mut rig.txq, &rig.mem).is_err());
    // A transmit chain with a device-writable buffer.
    let mut rig = Rig::new();
    rig.tx.post(&rig.mem, &[(TX_DATA, 64, true)]);
    assert!(rig.dev.process(TX_QUEUE, &mut rig.txq, &rig.mem).is_err());
    // A receive buffer the device could not write a header into.
    let mut rig = Rig::new();
    rig.send(rig.guest(OP_REQUEST, 1, 7777), &[]).unwrap();
    rig.rx.post(&rig.mem, &[(RX_BUFS, 10, true)]);
    assert!(rig.dev.process(RX_QUEUE, &mut rig.rxq, &rig.mem).is_err());
    // A buffer outside guest RAM is refused by the ring walk, never touched.
    let mut rig = Rig::new();
    rig.tx.post(&rig.mem, &[(BASE - 0x1000, 64, false)]);
    assert!(rig.dev.process(TX_QUEUE, &mut rig.txq, &rig.mem).is_err());
    assert_eq!(rig.mem.refused.load(Ordering::SeqCst), 0);
}

#[test]
fn a_device_reset_closes_every_host_stream() {
    let mut rig = Rig::new();
    let listener = host_listener(&rig, 6003);
    rig.post_rx(4);
    rig.send(rig.guest(OP_REQUEST, 9, 6003), &[]).unwrap();
    let (mut host, _) = listener.accept().unwrap();
    assert_eq!(rig.dev.connections(), 1);
    rig.dev.reset();
    assert_eq!(rig.dev.connections(), 0);
    let mut b = [0u8; 1];
    assert_eq!(host.read(&mut b).unwrap(), 0);
}

#[test]
fn the_socket_file_is_removed_with_the_device_and_other_files_are_not_replaced() {
    let rig = Rig::new();
    let path = rig.path.clone();
    assert!(path.exists());
    drop(rig);
    assert!(!path.exists());
    let file = temp_path("plain");
    std::fs::write(&file, b"keep").unwrap();
    let err = Vsock::new(GUEST_CID, &file).err().unwrap();
    assert!(err.to_string().contains("not a socket"), "{err}");
    assert_eq!(std::fs::read(&file).unwrap(), b"keep");
}

/// A guest that behaves like Linux's driver: 4 KiB receive buffers, a 256 KiB receive
/// window, and a credit update only once less than 64 KiB of it looks free.
#[test]
fn megabytes_flow_to_a_linux_like_guest_under_credit() {
    const WINDOW: u32 = 256 << 10;
    const TOTAL: usize = 8 << 20;
    let mut rig = Rig::new();
    let listener = host_listener(&rig, 7000);
    rig.post_rx(16);
    let mut req = rig.guest(OP_REQUEST, 77, 7000);
    req.buf_alloc = WINDOW;
    rig.send(req, &[]).unwrap();
    let (mut host, _) = listener.accept().unwrap();
    let data: Vec<u8> = (0..TOTAL).map(|i| (i * 7 + i / 4096) as u8).collect();
    let sent = data.clone();
    let writer = std::thread::spawn(move || host.write_all(&sent).map(|_| host));

    let (mut got, mut fwd_cnt, mut told) = (Vec::new(), 0u32, 0u32);
    let mut idle = 0;
    while got.len() < TOTAL {
        let packets = rig.receive();
        rig.post_rx(packets.len() as u16);
        if packets.is_empty() {
            idle += 1;
            assert!(idle < 400, "stalled after {} bytes", got.len());
            std::thread::sleep(std::time::Duration::from_millis(5));
            continue;
        }
        idle = 0;
        for (h, payload) in packets {
            if h.op == OP_RW {
                got.extend_from_slice(&payload);
                fwd_cnt = fwd_cnt.wrapping_add(payload.len() as u32);
            }
        }
        if WINDOW - fwd_cnt.wrapping_sub(told) < 64 << 10 {
            let upd = Header {
                buf_alloc: WINDOW,
                fwd_cnt,
                ..rig.guest(OP_CREDIT_UPDATE, 77, 7000)
            };
            rig.send(upd, &[]).unwrap();
            told = fwd_cnt;
        }
    }
    assert!(got == data, "the bytes arrive intact and in order");
    drop(writer.join().unwrap().unwrap());
}

/// The same stream, but the receive side is served only when the device's own worker
/// thread kicks it (as in a VM), and the guest posts buffers and credit from another thread.
#[test]
fn the_receive_worker_keeps_a_stream_flowing() {
    use std::sync::Mutex;
    const WINDOW: u32 = 256 << 10;
    const TOTAL: usize = 4 << 20;
    let rig = Rig::new();
    let listener = host_listener(&rig, 7001);
    let rx_source = rig.dev.rx_source().unwrap();
    let rig = Arc::new(Mutex::new(rig));
    let r = rig.clone();
    let kick = move || {
        let mut g = r.lock().unwrap();
        let g = &mut *g;
        g.dev.process(RX_QUEUE, &mut g.rxq, &g.mem).unwrap();
        true
    };
    let worker = rx_source.spawn("vsock-test", Box::new(kick)).unwrap();
    {
        let mut g = rig.lock().unwrap();
        g.post_rx(16);
        let mut req = g.guest(OP_REQUEST, 78, 7001);
        req.buf_alloc = WINDOW;
        g.send(req, &[]).unwrap();
    }
    let (mut host, _) = listener.accept().unwrap();
    let writer = std::thread::spawn(move || {
        host.write_all(&vec![0xa5u8; TOTAL]).unwrap();
        host
    });
    let (mut got, mut fwd_cnt, mut told) = (0usize, 0u32, 0u32);
    let start = std::time::Instant::now();
    while got < TOTAL {
        assert!(
            start.elapsed() < std::time::Duration::from_secs(20),
            "stalled after {got} bytes"
        );
        let mut g = rig.lock().unwrap();
        // Only what the worker delivered: no kick from here.
        let mut n = 0;
        while g.rx_seen != g.rx.used_idx(&g.mem) {
            let (id, len) = g.rx.used_elem(&g.mem, g.rx_seen);
            g.rx_seen = g.rx_seen.wrapping_add(1);
            let addr = u64::from_le_bytes(
                g.mem
                    .get(g.rx.desc + 16 * u64::from(id), 8)
                    .try_into()
                    .unwrap(),
            );
            let h = Header::decode(g.mem.get(addr, HDR_LEN).as_slice().try_into().unwrap());
            assert_eq!(h.len as usize + HDR_LEN, len as usize);
            if h.op == OP_RW {
                got += h.len as usize;
                fwd_cnt = fwd_cnt.wrapping_add(h.len);
            }
            n += 1;
        }
        if n > 0 {
            // Linux refills and notifies the receive queue.
            g.post_rx(n);
            let g = &mut *g;
            g.dev.process(RX_QUEUE, &mut g.rxq, &g.mem).unwrap();
        }
        if WINDOW - fwd_cnt.wrapping_sub(told) < 64 << 10 {
            let upd = Header {
                buf_alloc: WINDOW,
                fwd_cnt,
                ..g.guest(OP_CREDIT_UPDATE, 78, 7001)
            };
            g.send(upd, &[]).unwrap();
            told = fwd_cnt;
        }
        drop(g);
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    drop(writer.join().unwrap());
    drop(worker);
}

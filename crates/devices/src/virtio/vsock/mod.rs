//! virtio-vsock (virtio 1.2 §5.10) with the host side as Unix sockets, in Firecracker's
//! convention:
//! - a host program connects to the device's socket `PATH` and writes `CONNECT <port>\n`;
//!   once the guest accepts, it reads `OK <host port>\n` and the stream is the connection;
//! - a guest connecting to the host (CID 2) on port P reaches the Unix socket `PATH_P`,
//!   if some host program listens there; otherwise the guest sees "connection reset".
//!
//! Only stream sockets are offered. Each connection is a host `UnixStream` plus the credit
//! accounting of §5.10.6.3: the guest may have at most [`conn::BUF_ALLOC`] bytes in flight
//! towards a host socket (what the socket has not taken waits here, so that bounds our
//! memory), and we send the guest only as much as its advertised buffer has room for.
//!
//! Transmit (guest → host) runs on the notifying thread. Everything towards the guest goes
//! through the receive queue, which an [`RxWorker`] thread kicks when the device's epoll
//! descriptor (host sockets, the listener, and a wake-up for packets the transmit side
//! queued) becomes ready; epoll interest follows what the device can do (a connection whose
//! guest has no credit left is not watched for input), so a ready socket nobody can serve
//! never makes the worker spin.
//!
//! Packets are untrusted: a chain that is not a header plus at most 64 KiB of payload puts
//! the device into DEVICE_NEEDS_RESET; a well-formed packet that breaks the protocol (wrong
//! source CID, unknown connection, data beyond its credit) is answered with a reset of that
//! one connection.

mod conn;
mod host;
pub mod packet;

use super::block::copy_config;
use super::net_worker::{RxSignal, RxSource};
use super::queue::{Chain, Cursor, Queue, QueueError};
use super::{DeviceState, GuestMemory, ID_VSOCK, StateError, VirtioDevice};
use conn::{BUF_ALLOC, Conn, State};
use packet::*;
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, VecDeque};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

pub const RX_QUEUE: usize = 0;
pub const TX_QUEUE: usize = 1;
pub const EVENT_QUEUE: usize = 2;
const QUEUE_SIZE: u16 = 256;
/// Largest payload per packet, in both directions (Linux's `VIRTIO_VSOCK_MAX_PKT_BUF_SIZE`).
const MAX_PAYLOAD: usize = 64 << 10;
/// Open connections per device; more are refused (host clients closed, guests reset).
pub const MAX_CONNS: usize = 1024;
/// Control packets waiting for receive buffers. Resets of unknown connections beyond this
/// are dropped (the guest times out instead), so a guest that posts no receive buffers
/// cannot make us queue without bound; the others are bounded by the connections.
const MAX_PENDING: usize = 4 * MAX_CONNS;
/// Packets delivered per receive kick, so busy host sockets cannot hold the device lock.
const RX_BATCH: usize = 64;
/// Host ports we give host-initiated connections (as Firecracker: from 2^30 up).
const FIRST_LOCAL_PORT: u32 = 1 << 30;

const TOKEN_LISTENER: u64 = 0;
const TOKEN_WAKE: u64 = 1;

/// `VIRTIO_VSOCK_EVENT_TRANSPORT_RESET` (virtio 1.2 §5.10.6.6).
pub const EVENT_TRANSPORT_RESET: u32 = 0;

/// vsock in a snapshot: the guest's CID then. Connections cannot survive a snapshot (their
/// host sockets belong to the old process): a restored device drops them all and tells
/// the guest with a transport reset event, as Firecracker does; the guest then resets its
/// connected sockets and reads its CID again (a restore may give it another).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VsockState {
    pub cid: u64,
}

/// A connection as both sides name it: (host port, guest port).
type Key = (u32, u32);

/// A packet without payload waiting for a receive buffer.
#[derive(Debug, Clone, Copy)]
struct Ctrl {
    key: Key,
    op: u16,
    flags: u32,
}

pub struct Vsock {
    cid: u64,
    path: PathBuf,
    listener: UnixListener,
    epoll: Epoll,
    /// Written when the transmit side queues a control packet, so the worker kicks the
    /// receive queue.
    wake: EventFd,
    signal: Arc<RxSignal>,
    conns: HashMap<Key, Conn>,
    tokens: HashMap<u64, Key>,
    next_token: u64,
    next_local_port: u32,
    pending: VecDeque<Ctrl>,
    readable: VecDeque<Key>,
    buf: Vec<u8>,
    spoof_warned: bool,
    /// A restored device owes the guest a transport reset event.
    transport_reset: bool,
}

/// The guest CIDs a device may have: 0–2 are reserved and `u32::MAX` means "any".
pub fn valid_cid(cid: u64) -> bool {
    (3..u64::from(u32::MAX)).contains(&cid)
}

impl Vsock {
    /// A device for guest `cid` whose host side listens on the Unix socket `path`. A stale
    /// socket file at `path` is replaced; any other file there is an error.
    pub fn new(cid: u64, path: &Path) -> io::Result<Vsock> {
        if !valid_cid(cid) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("vsock CID {cid} is reserved or too large: use 3 to 4294967294"),
            ));
        }
        if let Ok(meta) = std::fs::symlink_metadata(path) {
            if !meta.file_type().is_socket() {
                return Err(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    format!(
                        "{} exists and is not a socket: choose another vsock socket path",
                        path.display()
                    ),
                ));
            }
            std::fs::remove_file(path)?;
        }
        let listener = UnixListener::bind(path).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("cannot listen on vsock socket {}: {e}", path.display()),
            )
        })?;
        listener.set_nonblocking(true)?;
        let epoll = Epoll::new()?;
        let wake = EventFd::new(EFD_NONBLOCK)?;
        epoll.ctl(
            ControlOperation::Add,
            listener.as_raw_fd(),
            EpollEvent::new(EventSet::IN, TOKEN_LISTENER),
        )?;
        epoll.ctl(
            ControlOperation::Add,
            wake.as_raw_fd(),
            EpollEvent::new(EventSet::IN, TOKEN_WAKE),
        )?;
        Ok(Vsock {
            cid,
            path: path.to_path_buf(),
            listener,
            epoll,
            wake,
            signal: Arc::new(RxSignal::new()?),
            conns: HashMap::new(),
            tokens: HashMap::new(),
            next_token: 2,
            next_local_port: FIRST_LOCAL_PORT,
            pending: VecDeque::new(),
            readable: VecDeque::new(),
            buf: vec![0; MAX_PAYLOAD],
            spoof_warned: false,
            transport_reset: false,
        })
    }

    /// The handle the receive worker needs ([`RxSource::spawn`]); take it before the device
    /// moves into its transport.
    pub fn rx_source(&self) -> io::Result<RxSource> {
        RxSource::new(self.signal.clone(), self.epoll.as_raw_fd())
    }

    /// Open connections (for tests and status).
    pub fn connections(&self) -> usize {
        self.conns.len()
    }

    fn queue_ctrl(&mut self, key: Key, op: u16, flags: u32) {
        let droppable = op == OP_RST && !self.conns.contains_key(&key);
        if droppable && self.pending.len() >= MAX_PENDING {
            return;
        }
        if op == OP_CREDIT_UPDATE {
            match self.conns.get_mut(&key) {
                Some(c) if !c.credit_update_queued => c.credit_update_queued = true,
                _ => return,
            }
        }
        if self.pending.is_empty() {
            // Fails only when the counter saturates, and then the worker wakes anyway.
            let _ = self.wake.write(1);
        }
        self.pending.push_back(Ctrl { key, op, flags });
    }

    fn header(&mut self, key: Key, op: u16, flags: u32, len: u32) -> Header {
        let fwd_cnt = match self.conns.get_mut(&key) {
            Some(c) => {
                c.fwd_cnt_told = c.fwd_cnt;
                if op == OP_CREDIT_UPDATE {
                    c.credit_update_queued = false;
                }
                c.fwd_cnt
            }
            None => 0,
        };
        Header {
            src_cid: HOST_CID,
            dst_cid: self.cid,
            src_port: key.0,
            dst_port: key.1,
            len,
            kind: TYPE_STREAM,
            op,
            flags,
            buf_alloc: BUF_ALLOC,
            fwd_cnt,
        }
    }

    /// Takes a connection out of the table and out of epoll.
    fn remove(&mut self, key: Key) -> Option<Conn> {
        let mut conn = self.conns.remove(&key)?;
        if conn.interest != 0 {
            let _ = self.epoll.ctl(
                ControlOperation::Delete,
                conn.stream.as_raw_fd(),
                EpollEvent::default(),
            );
            conn.interest = 0;
        }
        self.tokens.remove(&conn.token);
        Some(conn)
    }

    /// Drops a connection and tells the guest.
    fn reset_conn(&mut self, key: Key) {
        if self.remove(key).is_some() {
            self.queue_ctrl(key, OP_RST, 0);
        }
    }

    /// Adds a connection under a fresh epoll token (tokens are never reused, so an event
    /// for a connection already gone cannot reach its successor on the same descriptor).
    fn insert(&mut self, key: Key, mut conn: Conn) {
        conn.token = self.next_token;
        self.next_token += 1;
        self.tokens.insert(conn.token, key);
        if let Some(old) = self.conns.insert(key, conn) {
            self.tokens.remove(&old.token);
            if old.interest != 0 {
                let _ = self.epoll.ctl(
                    ControlOperation::Delete,
                    old.stream.as_raw_fd(),
                    EpollEvent::default(),
                );
            }
        }
    }

    fn guest_packet(&mut self, h: &Header, data: &[u8]) {
        if h.src_cid != self.cid {
            if !self.spoof_warned {
                self.spoof_warned = true;
                log::warn!(
                    "virtio-vsock: the guest sent a packet from CID {} but its CID is {}; dropped",
                    h.src_cid,
                    self.cid
                );
            }
            return;
        }
        let key = (h.dst_port, h.src_port);
        if h.dst_cid != HOST_CID || h.kind != TYPE_STREAM {
            if h.op != OP_RST {
                self.queue_ctrl(key, OP_RST, 0);
            }
            return;
        }
        let Some(conn) = self.conns.get_mut(&key) else {
            match h.op {
                OP_REQUEST => self.guest_connect(h),
                OP_RST => {}
                _ => self.queue_ctrl(key, OP_RST, 0),
            }
            return;
        };
        conn.peer_buf_alloc = h.buf_alloc;
        conn.peer_fwd_cnt = h.fwd_cnt;
        match (h.op, conn.state) {
            (OP_RESPONSE, State::Connecting) => {
                conn.state = State::Established;
                if conn.reply_ok().is_err() {
                    self.reset_conn(key);
                    return;
                }
                if !conn.from_host.is_empty() {
                    self.readable.push_back(key);
                    let _ = self.wake.write(1);
                }
            }
            (OP_RW, State::Established) => {
                if conn.over_credit(data.len() as u32) {
                    log::warn!(
                        "virtio-vsock: the guest sent past its credit on port {}; resetting",
                        h.src_port
                    );
                    self.reset_conn(key);
                    return;
                }
                if conn.send_to_host(data).is_err() {
                    self.reset_conn(key);
                    return;
                }
                if conn.credit_update_due() {
                    self.queue_ctrl(key, OP_CREDIT_UPDATE, 0);
                }
            }
            (OP_CREDIT_UPDATE, _) => {}
            (OP_CREDIT_REQUEST, _) => self.queue_ctrl(key, OP_CREDIT_UPDATE, 0),
            (OP_SHUTDOWN, _) => {
                if h.flags & SHUTDOWN_SEND != 0 {
                    conn.guest_done_sending = true;
                    if conn.flush_to_host().is_err() {
                        self.reset_conn(key);
                        return;
                    }
                }
                if h.flags & (SHUTDOWN_RCV | SHUTDOWN_SEND) == SHUTDOWN_RCV | SHUTDOWN_SEND {
                    // The guest closed its socket and waits for our reset to finish.
                    self.reset_conn(key);
                    return;
                }
            }
            (OP_RST, _) => {
                self.remove(key);
                return;
            }
            _ => {
                self.reset_conn(key);
                return;
            }
        }
        self.update_interest(key);
    }

    fn process_tx(&mut self, queue: &mut Queue, mem: &dyn GuestMemory) -> Result<bool, QueueError> {
        let mut used = false;
        while let Some(chain) = queue.pop(mem)? {
            let malformed = |why| QueueError::Malformed {
                head: chain.head,
                why,
            };
            if !chain.writable.is_empty() {
                return Err(malformed("a transmit chain has device-writable buffers"));
            }
            let mut cur = Cursor::new(&chain.readable);
            let mut raw = [0u8; HDR_LEN];
            if cur.read_to(mem, &mut raw)? < HDR_LEN {
                return Err(malformed(
                    "a transmit chain is shorter than the 44-byte header",
                ));
            }
            let h = Header::decode(&raw);
            let len = h.len as usize;
            if len > MAX_PAYLOAD {
                return Err(malformed("a packet's payload is longer than 64 KiB"));
            }
            if (len as u64) > cur.remaining() {
                return Err(malformed("a packet is shorter than its header's length"));
            }
            if h.op == OP_RW {
                cur.read_to(mem, &mut self.buf[..len])?;
            }
            queue.add_used(mem, chain.head, 0)?;
            used = true;
            let payload = if h.op == OP_RW { len } else { 0 };
            let data = std::mem::take(&mut self.buf);
            self.guest_packet(&h, &data[..payload]);
            self.buf = data;
        }
        Ok(used)
    }

    fn check_rx_chain(chain: &Chain) -> Result<(), QueueError> {
        let malformed = |why| QueueError::Malformed {
            head: chain.head,
            why,
        };
        if !chain.readable.is_empty() {
            return Err(malformed("a receive chain has device-readable buffers"));
        }
        if chain.writable_len() < HDR_LEN as u64 {
            return Err(malformed(
                "a receive chain is shorter than the 44-byte header",
            ));
        }
        Ok(())
    }

    fn fill_rx(&mut self, queue: &mut Queue, mem: &dyn GuestMemory) -> Result<bool, QueueError> {
        self.poll_host();
        let mut used = false;
        let mut starved = false;
        for _ in 0..RX_BATCH {
            if let Some(&ctrl) = self.pending.front() {
                let Some(chain) = queue.pop(mem)? else {
                    starved = true;
                    break;
                };
                Self::check_rx_chain(&chain)?;
                let h = self.header(ctrl.key, ctrl.op, ctrl.flags, 0);
                Cursor::new(&chain.writable).write_from(mem, &h.encode())?;
                queue.add_used(mem, chain.head, HDR_LEN as u32)?;
                self.pending.pop_front();
                used = true;
                continue;
            }
            let Some(key) = self.readable.pop_front() else {
                break;
            };
            let Some(conn) = self.conns.get(&key) else {
                continue;
            };
            if !conn.wants_host_data() || conn.peer_credit() == 0 {
                self.update_interest(key);
                continue;
            }
            let Some(chain) = queue.pop(mem)? else {
                self.readable.push_front(key);
                starved = true;
                break;
            };
            Self::check_rx_chain(&chain)?;
            match self.deliver_host_data(key, &chain, mem)? {
                Some(n) => {
                    queue.add_used(mem, chain.head, (HDR_LEN + n) as u32)?;
                    used = true;
                    // Round robin: it may have more, after the others.
                    self.readable.push_back(key);
                }
                None => queue.undo_pop(1),
            }
        }
        if !self.pending.is_empty() && !starved {
            // More to deliver than one batch: come back.
            let _ = self.wake.write(1);
        }
        self.signal.set_watch(!starved);
        Ok(used)
    }

    /// Delivers the transport reset event a restore owes the guest, into one of the event
    /// buffers its driver keeps posted; without one it waits for the driver's next notify.
    fn send_events(
        &mut self,
        queue: &mut Queue,
        mem: &dyn GuestMemory,
    ) -> Result<bool, QueueError> {
        if !self.transport_reset {
            return Ok(false);
        }
        let Some(chain) = queue.pop(mem)? else {
            return Ok(false);
        };
        if chain.writable_len() < 4 {
            return Err(QueueError::Malformed {
                head: chain.head,
                why: "an event buffer is shorter than the 4-byte event",
            });
        }
        Cursor::new(&chain.writable).write_from(mem, &EVENT_TRANSPORT_RESET.to_le_bytes())?;
        queue.add_used(mem, chain.head, 4)?;
        self.transport_reset = false;
        Ok(true)
    }

    /// Moves host bytes of connection `key` into `chain` as one RW packet; `None` when no
    /// packet was written (nothing to read, EOF or an error, each handled here).
    fn deliver_host_data(
        &mut self,
        key: Key,
        chain: &Chain,
        mem: &dyn GuestMemory,
    ) -> Result<Option<usize>, QueueError> {
        let Some(conn) = self.conns.get_mut(&key) else {
            return Ok(None);
        };
        let room = (chain.writable_len() - HDR_LEN as u64)
            .min(MAX_PAYLOAD as u64)
            .min(u64::from(conn.peer_credit())) as usize;
        match conn.read_from_host(&mut self.buf[..room]) {
            Ok(0) => {
                conn.host_eof = true;
                let flags = if conn.host_hup {
                    SHUTDOWN_SEND | SHUTDOWN_RCV
                } else {
                    SHUTDOWN_SEND
                };
                self.queue_ctrl(key, OP_SHUTDOWN, flags);
                self.update_interest(key);
                Ok(None)
            }
            Ok(n) => {
                conn.tx_cnt = conn.tx_cnt.wrapping_add(n as u32);
                let h = self.header(key, OP_RW, 0, n as u32);
                let mut cur = Cursor::new(&chain.writable);
                cur.write_from(mem, &h.encode())?;
                cur.write_from(mem, &self.buf[..n])?;
                Ok(Some(n))
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                self.update_interest(key);
                Ok(None)
            }
            Err(_) => {
                self.reset_conn(key);
                Ok(None)
            }
        }
    }
}

impl Drop for Vsock {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

impl VirtioDevice for Vsock {
    fn device_id(&self) -> u32 {
        ID_VSOCK
    }

    fn features(&self) -> u64 {
        0
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE; 3]
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        copy_config(&self.cid.to_le_bytes(), offset, data);
    }

    fn activate(&mut self, _features: u64) {
        self.signal.set_watch(true);
    }

    fn process(
        &mut self,
        index: usize,
        queue: &mut Queue,
        mem: &dyn GuestMemory,
    ) -> Result<bool, QueueError> {
        match index {
            RX_QUEUE => self.fill_rx(queue, mem),
            TX_QUEUE => self.process_tx(queue, mem),
            // Event buffers stay posted until there is an event (a transport reset after
            // a restore).
            EVENT_QUEUE => self.send_events(queue, mem),
            _ => Ok(false),
        }
    }

    fn save_state(&self) -> DeviceState {
        DeviceState::Vsock(VsockState { cid: self.cid })
    }

    fn restore_state(&mut self, state: &DeviceState, _: &[u16]) -> Result<(), StateError> {
        let DeviceState::Vsock(_) = state else {
            return Err(StateError("the saved state is not a vsock device's".into()));
        };
        // A fresh device has no connections; the guest thinks it has some.
        self.transport_reset = true;
        Ok(())
    }

    fn reset(&mut self) {
        // The guest forgot every connection; host clients see their streams close.
        let keys: Vec<Key> = self.conns.keys().copied().collect();
        for key in keys {
            self.remove(key);
        }
        self.pending.clear();
        self.readable.clear();
        self.transport_reset = false;
        self.signal.set_watch(false);
    }
}

#[cfg(test)]
#[path = "tests.rs"]
mod tests;

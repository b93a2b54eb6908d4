//! virtio-net (virtio 1.2 §5.1) over a frame backend (a tap device): one receive and one
//! transmit queue, the 12-byte `virtio_net_hdr_v1` passed through unchanged in both
//! directions, so checksum and TSO offloads negotiated with the guest are done by the host
//! kernel (and the guest kernel), never by us.
//!
//! Transmit runs on the notifying vCPU thread: each chain is gathered into one frame and
//! written to the backend. Receive is driven by frames arriving, which happens when no vCPU
//! touches the device: an [`RxWorker`] thread polls the backend and kicks the receive queue
//! through the transport; the guest posting buffers (a notify on the receive queue) also
//! delivers frames that were waiting. With `VIRTIO_NET_F_MRG_RXBUF` a frame may span several
//! posted chains. A frame is never held back by blocking: while the guest has posted no
//! buffer, one frame waits in the device and the rest stay queued in the host kernel (which
//! drops beyond its queue length, as a full NIC ring would).
//!
//! Each direction may be rate-limited (bytes/s, frames/s; [`Net::set_limits`]): a refused
//! transmit chain stays in the ring, a refused received frame waits in the device with the
//! backend unwatched, and the device's refill thread serves the queue when tokens are back.
//!
//! Chains are untrusted: a transmit chain with device-writable buffers, a frame shorter than
//! the header or longer than 65550 bytes plus the header, a receive chain with
//! device-readable buffers or too short for the header are driver bugs and put the device into
//! DEVICE_NEEDS_RESET.

use super::block::copy_config;
use super::queue::{Chain, Cursor, Queue, QueueError};
use super::rate_limit::{LimitSet, Limits, RefillTimer, Throttle};
use super::{DeviceState, GuestMemory, ID_NET, StateError, VirtioDevice};
use serde::{Deserialize, Serialize};
use std::io;
use std::os::fd::AsRawFd;
use std::sync::Arc;

pub use super::net_worker::{RxSignal, RxSource, RxWorker};

/// Length of `virtio_net_hdr_v1` (`num_buffers` included, as VERSION_1 requires).
pub const HDR_LEN: usize = 12;
/// Largest frame after the header: a 64 KiB GSO packet plus Ethernet and VLAN headers.
pub const MAX_FRAME: usize = 65550;
pub const RX_QUEUE: usize = 0;
pub const TX_QUEUE: usize = 1;
const QUEUE_SIZE: u16 = 256;
/// Frames moved per receive kick, so a host flooding the tap cannot keep a vCPU (or the lock
/// on the device) forever; the worker comes back for the rest.
const RX_BATCH: usize = 64;

pub const F_CSUM: u64 = 1 << 0;
pub const F_GUEST_CSUM: u64 = 1 << 1;
pub const F_MAC: u64 = 1 << 5;
pub const F_GUEST_TSO4: u64 = 1 << 7;
pub const F_GUEST_TSO6: u64 = 1 << 8;
pub const F_GUEST_ECN: u64 = 1 << 9;
pub const F_HOST_TSO4: u64 = 1 << 11;
pub const F_HOST_TSO6: u64 = 1 << 12;
pub const F_HOST_ECN: u64 = 1 << 13;
pub const F_MRG_RXBUF: u64 = 1 << 15;
pub const F_STATUS: u64 = 1 << 16;

const OFFERED: u64 = F_CSUM
    | F_GUEST_CSUM
    | F_MAC
    | F_GUEST_TSO4
    | F_GUEST_TSO6
    | F_GUEST_ECN
    | F_HOST_TSO4
    | F_HOST_TSO6
    | F_HOST_ECN
    | F_MRG_RXBUF
    | F_STATUS;

const STATUS_LINK_UP: u16 = 1;

// Offload bits for TUNSETOFFLOAD (linux/if_tun.h), what the host may send the guest.
pub const TUN_F_CSUM: u32 = 0x01;
pub const TUN_F_TSO4: u32 = 0x02;
pub const TUN_F_TSO6: u32 = 0x04;
pub const TUN_F_TSO_ECN: u32 = 0x08;

/// Where frames go and come from: a tap device, or anything else that moves whole frames
/// (each prefixed with the 12-byte header) per call on a non-blocking descriptor.
pub trait FrameIo: Send + AsRawFd {
    /// Reads one frame; `WouldBlock` when none is waiting.
    fn recv(&mut self, buf: &mut [u8]) -> io::Result<usize>;
    /// Writes one frame.
    fn send(&mut self, frame: &[u8]) -> io::Result<usize>;
    /// Which offloaded frames (`TUN_F_*`) the backend may hand us.
    fn set_offload(&mut self, flags: u32) -> io::Result<()>;
}

impl FrameIo for crate::net::Tap {
    fn recv(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.read_frame(buf)
    }
    fn send(&mut self, frame: &[u8]) -> io::Result<usize> {
        self.write_frame(frame)
    }
    fn set_offload(&mut self, flags: u32) -> io::Result<()> {
        crate::net::Tap::set_offload(self, flags).map_err(io::Error::other)
    }
}

/// Frames and errors since the device was created (for diagnostics and tests).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct NetStats {
    pub rx_frames: u64,
    pub rx_bytes: u64,
    /// Frames the guest had no room for (a frame larger than a chain without MRG_RXBUF) or
    /// the backend returned malformed.
    pub rx_dropped: u64,
    pub tx_frames: u64,
    pub tx_bytes: u64,
    /// Frames the backend refused or had no room for.
    pub tx_dropped: u64,
}

/// A network device in a snapshot: the MAC address the guest knows. The negotiated
/// offloads are the transport's features (re-applied to the new backend on restore); a
/// received frame still waiting for guest buffers is dropped, as a NIC might drop it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetState {
    pub mac: [u8; 6],
}

/// What became of the waiting received frame.
enum Delivery {
    Done,
    /// Too large for one chain without MRG_RXBUF: dropped, the buffers stay posted.
    Dropped,
    /// Not enough posted buffers: the frame waits for the guest.
    NoBuffers,
}

pub struct Net {
    io: Box<dyn FrameIo>,
    config: [u8; 10],
    features: u64,
    signal: Arc<RxSignal>,
    /// One received frame (header included) waiting for buffers: `rx_buf[..len]`.
    pending: Option<usize>,
    rx_buf: Vec<u8>,
    tx_buf: Vec<u8>,
    chains: Vec<Chain>,
    stats: NetStats,
    /// The backend failed in a way retrying will not fix; logged once.
    rx_broken: bool,
    tx_warned: bool,
    rx_throttle: Option<Throttle>,
    tx_throttle: Option<Throttle>,
    /// Always there, so limits can be set while the VM runs; armed only when limited.
    timer: Arc<RefillTimer>,
}

impl Net {
    /// A device with MAC address `mac` on `io`.
    pub fn new(io: Box<dyn FrameIo>, mac: [u8; 6]) -> io::Result<Net> {
        let mut config = [0u8; 10];
        config[..6].copy_from_slice(&mac);
        config[6..8].copy_from_slice(&STATUS_LINK_UP.to_le_bytes());
        config[8..10].copy_from_slice(&1u16.to_le_bytes()); // max_virtqueue_pairs
        Ok(Net {
            io,
            config,
            features: 0,
            signal: Arc::new(RxSignal::new()?),
            pending: None,
            rx_buf: vec![0; HDR_LEN + MAX_FRAME],
            tx_buf: Vec::new(),
            chains: Vec::new(),
            stats: NetStats::default(),
            rx_broken: false,
            tx_warned: false,
            rx_throttle: None,
            tx_throttle: None,
            timer: RefillTimer::new(),
        })
    }

    /// Limits each direction (receive: host to guest; transmit: guest to host), also while
    /// the device runs ([`Throttle::update`]). The machine starts the
    /// [`refill_timer`](VirtioDevice::refill_timer)'s thread.
    pub fn set_limits(&mut self, rx: Limits, tx: Limits) {
        Throttle::update(&mut self.rx_throttle, rx, RX_QUEUE, &self.timer);
        Throttle::update(&mut self.tx_throttle, tx, TX_QUEUE, &self.timer);
    }

    #[cfg(test)]
    pub(crate) fn throttles_mut(&mut self) -> (Option<&mut Throttle>, Option<&mut Throttle>) {
        (self.rx_throttle.as_mut(), self.tx_throttle.as_mut())
    }

    pub fn stats(&self) -> NetStats {
        self.stats
    }

    /// The handle a receive worker needs ([`RxSource::spawn`]); take it before the device
    /// moves into its transport.
    pub fn rx_source(&self) -> io::Result<RxSource> {
        RxSource::new(self.signal.clone(), self.io.as_raw_fd())
    }

    fn offloads(features: u64) -> u32 {
        let mut f = 0;
        if features & F_GUEST_CSUM != 0 {
            f |= TUN_F_CSUM;
            if features & F_GUEST_TSO4 != 0 {
                f |= TUN_F_TSO4;
            }
            if features & F_GUEST_TSO6 != 0 {
                f |= TUN_F_TSO6;
            }
            if features & F_GUEST_ECN != 0 && f & (TUN_F_TSO4 | TUN_F_TSO6) != 0 {
                f |= TUN_F_TSO_ECN;
            }
        }
        f
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
            let len = chain.readable_len();
            if len < HDR_LEN as u64 {
                return Err(malformed(
                    "a transmit chain is shorter than the 12-byte header",
                ));
            }
            if len > (HDR_LEN + MAX_FRAME) as u64 {
                return Err(malformed(
                    "a transmit frame is longer than 65550 bytes plus the header",
                ));
            }
            if let Some(t) = &mut self.tx_throttle {
                if !t.admit(len - HDR_LEN as u64) {
                    // Left in the ring; the refill thread serves it when tokens are back.
                    queue.undo_pop(1);
                    break;
                }
            }
            self.tx_buf.resize(len as usize, 0);
            Cursor::new(&chain.readable).read_to(mem, &mut self.tx_buf)?;
            // num_buffers means nothing on transmit; the host expects it zero.
            self.tx_buf[10..12].fill(0);
            match self.io.send(&self.tx_buf) {
                Ok(_) => {
                    self.stats.tx_frames += 1;
                    self.stats.tx_bytes += len - HDR_LEN as u64;
                }
                Err(e) => {
                    // A lossy link, as for a real NIC: the guest's stack retransmits.
                    self.stats.tx_dropped += 1;
                    if !self.tx_warned && e.kind() != io::ErrorKind::WouldBlock {
                        self.tx_warned = true;
                        log::warn!("virtio-net: the backend refused a transmitted frame: {e}");
                    }
                }
            }
            queue.add_used(mem, chain.head, 0)?;
            used = true;
        }
        Ok(used)
    }

    fn process_rx(&mut self, queue: &mut Queue, mem: &dyn GuestMemory) -> Result<bool, QueueError> {
        let mut used = false;
        for _ in 0..RX_BATCH {
            let len = match self.pending {
                Some(len) => len,
                None => match self.io.recv(&mut self.rx_buf) {
                    Ok(len) if len < HDR_LEN => {
                        self.stats.rx_dropped += 1;
                        continue;
                    }
                    Ok(len) => len,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        self.signal.set_watch(true);
                        return Ok(used);
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        if !self.rx_broken {
                            self.rx_broken = true;
                            log::error!(
                                "virtio-net: reading from the backend failed: {e}; receiving stops until the guest resets the device"
                            );
                        }
                        self.signal.set_watch(false);
                        return Ok(used);
                    }
                },
            };
            self.pending = Some(len);
            let bytes = (len - HDR_LEN) as u64;
            if let Some(t) = &mut self.rx_throttle {
                if !t.check(bytes) {
                    // The frame waits here and the backend is not watched (the kernel queues
                    // or drops the rest); the refill thread kicks this queue.
                    self.signal.set_watch(false);
                    return Ok(used);
                }
            }
            match self.deliver(queue, mem, len)? {
                Delivery::Done => {
                    used = true;
                    if let Some(t) = &mut self.rx_throttle {
                        t.consume(bytes);
                    }
                }
                Delivery::Dropped => {}
                Delivery::NoBuffers => {
                    // Wait for the guest's notify rather than polling a readable backend.
                    self.signal.set_watch(false);
                    return Ok(used);
                }
            }
            self.pending = None;
        }
        // More may be waiting: the worker looks again.
        self.signal.set_watch(true);
        Ok(used)
    }

    /// Writes the frame `rx_buf[..len]` into posted chains.
    fn deliver(
        &mut self,
        queue: &mut Queue,
        mem: &dyn GuestMemory,
        len: usize,
    ) -> Result<Delivery, QueueError> {
        let mergeable = self.features & F_MRG_RXBUF != 0;
        self.chains.clear();
        let mut room = 0u64;
        while room < len as u64 {
            let Some(chain) = queue.pop(mem)? else {
                queue.undo_pop(self.chains.len() as u16);
                return Ok(Delivery::NoBuffers);
            };
            let malformed = |why| QueueError::Malformed {
                head: chain.head,
                why,
            };
            if !chain.readable.is_empty() {
                return Err(malformed("a receive chain has device-readable buffers"));
            }
            // Every receive buffer must hold at least the header (virtio 1.2 §5.1.6.3.1).
            if chain.writable_len() < HDR_LEN as u64 {
                return Err(malformed(
                    "a receive chain is shorter than the 12-byte header",
                ));
            }
            room += chain.writable_len();
            self.chains.push(chain);
            if !mergeable && room < len as u64 {
                // Without merging a frame must fit one chain: drop it, keep the buffers.
                queue.undo_pop(1);
                self.stats.rx_dropped += 1;
                return Ok(Delivery::Dropped);
            }
        }
        let count = self.chains.len() as u16;
        self.rx_buf[10..12].copy_from_slice(&count.to_le_bytes());
        let mut off = 0;
        for chain in &self.chains {
            let n = Cursor::new(&chain.writable).write_from(mem, &self.rx_buf[off..len])?;
            off += n;
            queue.add_used(mem, chain.head, n as u32)?;
        }
        self.stats.rx_frames += 1;
        self.stats.rx_bytes += (len - HDR_LEN) as u64;
        Ok(Delivery::Done)
    }
}

impl VirtioDevice for Net {
    fn device_id(&self) -> u32 {
        ID_NET
    }

    fn features(&self) -> u64 {
        OFFERED
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE]
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        copy_config(&self.config, offset, data);
    }

    fn refill_timer(&self) -> Option<Arc<RefillTimer>> {
        Some(self.timer.clone())
    }

    fn update_limits(&mut self, limits: &LimitSet) -> bool {
        match limits {
            LimitSet::Net { rx, tx } => {
                self.set_limits(*rx, *tx);
                true
            }
            LimitSet::Disk(_) => false,
        }
    }

    fn save_state(&self) -> DeviceState {
        let mut mac = [0u8; 6];
        mac.copy_from_slice(&self.config[..6]);
        DeviceState::Net(NetState { mac })
    }

    fn restore_state(&mut self, state: &DeviceState, _: &[u16]) -> Result<(), StateError> {
        let DeviceState::Net(s) = state else {
            return Err(StateError(
                "the saved state is not a network device's".into(),
            ));
        };
        if s.mac != self.config[..6] {
            let hex = |m: &[u8]| {
                m.iter()
                    .map(|b| format!("{b:02x}"))
                    .collect::<Vec<_>>()
                    .join(":")
            };
            return Err(StateError(format!(
                "the guest knows this device as MAC {}, not {}: leave mac= out to keep it",
                hex(&s.mac),
                hex(&self.config[..6])
            )));
        }
        Ok(())
    }

    fn activate(&mut self, features: u64) {
        self.features = features;
        if let Err(e) = self.io.set_offload(Self::offloads(features)) {
            log::warn!(
                "virtio-net: cannot enable the negotiated offloads on the backend: {e}; \
                 the host may send frames the guest must checksum itself"
            );
        }
        self.rx_broken = false;
        self.signal.set_watch(true);
    }

    fn process(
        &mut self,
        index: usize,
        queue: &mut Queue,
        mem: &dyn GuestMemory,
    ) -> Result<bool, QueueError> {
        match index {
            RX_QUEUE => self.process_rx(queue, mem),
            TX_QUEUE => self.process_tx(queue, mem),
            _ => Ok(false),
        }
    }

    fn reset(&mut self) {
        self.features = 0;
        self.pending = None;
        self.signal.set_watch(false);
        if let Err(e) = self.io.set_offload(0) {
            log::warn!("virtio-net: cannot turn the backend's offloads off on reset: {e}");
        }
    }
}

#[cfg(test)]
#[path = "net_tests.rs"]
mod tests;

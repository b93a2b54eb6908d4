//! virtio 1.2 devices, independent of the machine kind: split virtqueues ([`queue`]), the
//! transports (virtio-mmio [`mmio`] and virtio-pci [`pci`], sharing the state machine in
//! [`transport`]), virtio-blk ([`block`], over a raw file or a copy-on-write overlay:
//! [`disk`], [`cow`]), virtio-net ([`net`]), virtio-rng ([`rng`]),
//! virtio-vsock ([`vsock`]) and the token buckets that rate-limit disks and nets
//! ([`rate_limit`]). virtio-balloon ([`balloon`]) gives guest pages back to the host
//! ([`GuestMemory::discard`]).
//!
//! Every value a guest places in a ring or descriptor is untrusted. Devices reach guest
//! memory only through [`GuestMemory`], whose accessors bounds-check and return errors; a
//! structurally broken queue (a loop, an index out of range, a descriptor outside RAM) puts
//! the device into `DEVICE_NEEDS_RESET`, a well-formed request the device cannot serve
//! completes with an error status.
//!
//! # Why our own split ring rather than rust-vmm's `virtio-queue`
//! `virtio-queue` is built on `vm-memory`'s `GuestMemory`, which hands out host slices of
//! mmap'ed regions. The riscv64 machine's RAM is accessed only through host atomics (harts
//! race on it from other threads) and is not a `vm-memory` region, and the same devices must
//! serve the x86 machine over PCI. A small trait ([`GuestMemory`]: copy in, copy out,
//! aligned atomic 16-bit loads/stores) fits both and keeps the checked surface small, so the
//! split ring (≈300 lines, no indirect descriptors, no EVENT_IDX) is written here.

pub mod balloon;
pub mod block;
pub mod cow;
pub mod disk;
#[cfg(any(test, feature = "fuzzing"))]
pub mod fuzz;
pub mod mmio;
pub mod net;
mod net_worker;
pub mod pci;
pub mod queue;
pub mod rate_limit;
mod refill;
pub mod rng;
#[cfg(any(test, feature = "fuzzing"))]
pub mod testmem;
pub mod transport;
pub mod vsock;

pub use queue::{Chain, Queue, QueueError, QueueState};

use serde::{Deserialize, Serialize};

/// `VIRTIO_F_VERSION_1`: the modern interface (the only one we implement).
pub const F_VERSION_1: u64 = 1 << 32;

/// Device types (virtio 1.2 §5).
pub const ID_NET: u32 = 1;
pub const ID_BLOCK: u32 = 2;
pub const ID_RNG: u32 = 4;
pub const ID_BALLOON: u32 = 5;
pub const ID_VSOCK: u32 = 19;

/// A device's own state in a snapshot, beyond what its transport holds (features, status,
/// queues). Connections, frames and requests in flight are not part of it: a device is
/// saved between requests, and what cannot survive (vsock connections) is reset.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum DeviceState {
    Block(block::BlockState),
    Net(net::NetState),
    Rng,
    Balloon(balloon::BalloonState),
    Vsock(vsock::VsockState),
}

/// A saved state that cannot be restored into this device; says why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct StateError(pub String);

/// The name of device type `id` as people know it ("virtio-blk").
pub fn device_name(id: u32) -> String {
    match id {
        ID_NET => "virtio-net".into(),
        ID_BLOCK => "virtio-blk".into(),
        ID_RNG => "virtio-rng".into(),
        ID_BALLOON => "virtio-balloon".into(),
        ID_VSOCK => "virtio-vsock".into(),
        other => format!("virtio device type {other}"),
    }
}

/// A guest range a device tried to touch lies (partly) outside guest RAM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("guest range {addr:#x}+{len:#x} is outside guest RAM")]
pub struct MemError {
    pub addr: u64,
    pub len: u64,
}

/// Granule of [`GuestMemory::discard`]: the balloon's page size (`VIRTIO_BALLOON_PFN_SHIFT`),
/// which is also the host's page size on every host we run on.
pub const DISCARD_PAGE: u64 = 4096;

/// Why guest pages could not be given back to the host.
#[derive(Debug, thiserror::Error)]
pub enum DiscardError {
    #[error(transparent)]
    OutsideRam(#[from] MemError),
    #[error(
        "guest range {addr:#x}+{len:#x} is not made of whole 4 KiB pages: only whole pages can be discarded"
    )]
    Unaligned { addr: u64, len: u64 },
    #[error("this machine's guest memory cannot give pages back to the host")]
    Unsupported,
    #[error("the host refused to free guest range {addr:#x}+{len:#x} (madvise DONTNEED): {source}")]
    Host {
        addr: u64,
        len: u64,
        source: std::io::Error,
    },
}

impl DiscardError {
    /// Checks the arguments every implementation of [`GuestMemory::discard`] takes: whole
    /// pages, no wrap-around.
    pub fn check_pages(addr: u64, len: u64) -> Result<(), DiscardError> {
        if addr % DISCARD_PAGE != 0 || len % DISCARD_PAGE != 0 || addr.checked_add(len).is_none() {
            return Err(DiscardError::Unaligned { addr, len });
        }
        Ok(())
    }
}

/// Guest-physical memory as a device sees it. Implementations bounds-check every access and
/// never touch host memory outside the guest's RAM.
pub trait GuestMemory: Send + Sync {
    /// Ok if `[addr, addr+len)` lies entirely in RAM (no wrap-around).
    fn check(&self, addr: u64, len: u64) -> Result<(), MemError>;
    /// Copies guest memory at `addr` into `buf`.
    fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), MemError>;
    /// Copies `data` into guest memory at `addr`.
    fn write(&self, addr: u64, data: &[u8]) -> Result<(), MemError>;
    /// A naturally aligned 16-bit load that cannot tear (ring indices race with the guest).
    fn load_u16(&self, addr: u64) -> Result<u16, MemError>;
    /// A naturally aligned 16-bit store that cannot tear.
    fn store_u16(&self, addr: u64, val: u16) -> Result<(), MemError>;
    /// Gives the host pages behind `[addr, addr+len)` back to the host (whole
    /// [`DISCARD_PAGE`]s, entirely in RAM): afterwards they read as zero and are backed
    /// again when next touched. For memory the guest said it does not use (balloon).
    /// Machines whose memory cannot do this keep the default, which refuses.
    fn discard(&self, addr: u64, len: u64) -> Result<(), DiscardError> {
        DiscardError::check_pages(addr, len)?;
        self.check(addr, len)?;
        Err(DiscardError::Unsupported)
    }
}

/// A transport that can serve a queue on behalf of a device thread (net receive, rate-limit
/// refill, the machine's notification thread). Returns what [`transport::VirtioCore::kick`]
/// returns: false when the device cannot serve the queue now.
pub trait Kick: Send {
    fn kick(&mut self, index: u32) -> bool;
    /// The host changed the device's configuration: tell the driver.
    fn config_changed(&mut self);
    /// [`VirtioDevice::update_limits`] of the device on this transport.
    fn update_limits(&mut self, limits: &rate_limit::LimitSet) -> bool;
}

impl Kick for mmio::MmioTransport {
    fn kick(&mut self, index: u32) -> bool {
        mmio::MmioTransport::kick(self, index)
    }
    fn config_changed(&mut self) {
        mmio::MmioTransport::config_changed(self);
    }
    fn update_limits(&mut self, limits: &rate_limit::LimitSet) -> bool {
        mmio::MmioTransport::update_limits(self, limits)
    }
}

impl Kick for pci::PciTransport {
    fn kick(&mut self, index: u32) -> bool {
        pci::PciTransport::kick(self, index)
    }
    fn config_changed(&mut self) {
        pci::PciTransport::config_changed(self);
    }
    fn update_limits(&mut self, limits: &rate_limit::LimitSet) -> bool {
        pci::PciTransport::update_limits(self, limits)
    }
}

/// What a device does with the chains of one notified queue.
pub trait VirtioDevice: Send {
    /// Device type (virtio 1.2 §5).
    fn device_id(&self) -> u32;
    /// Feature bits the device offers (the transport adds `VIRTIO_F_VERSION_1`).
    fn features(&self) -> u64;
    /// Maximum size of each queue; the slice length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// Reads the device-specific configuration space; bytes past its end read as zero.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Guest writes to the configuration space; most devices have nothing writable.
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    /// The driver accepted `features` and set DRIVER_OK.
    fn activate(&mut self, _features: u64) {}
    /// Serves every available chain of queue `index`. Returns whether any chain was used.
    /// An error means the queue is broken: the transport enters DEVICE_NEEDS_RESET.
    fn process(
        &mut self,
        index: usize,
        queue: &mut Queue,
        mem: &dyn GuestMemory,
    ) -> Result<bool, QueueError>;
    /// Forgets everything negotiated (status written 0).
    fn reset(&mut self) {}
    /// The VM has ended (powered off, stopped): make durable what the device still holds
    /// (an overlay disk's newly written clusters). Called after the last request.
    fn shutdown(&mut self) {}
    /// The device's own state for a snapshot, taken between requests.
    fn save_state(&self) -> DeviceState;
    /// Takes a snapshot's state, after the transport restored its queues and, for a driver
    /// that was running, called [`Self::activate`] with the negotiated features.
    /// `queue_sizes` are the restored queues' sizes. A state of another device type, or
    /// one that does not fit this device's backend (another disk size), is refused.
    fn restore_state(&mut self, state: &DeviceState, queue_sizes: &[u16])
    -> Result<(), StateError>;
    /// The timer of a device that can be rate-limited (disks and nets, limited or not: limits
    /// can be set while the VM runs), whose thread the machine starts with a `kick` of the
    /// device's transport ([`rate_limit::RefillTimer::spawn`]); `None` for other devices.
    fn refill_timer(&self) -> Option<std::sync::Arc<rate_limit::RefillTimer>> {
        None
    }
    /// Replaces the device's rate limits while it runs, keeping the tokens its buckets hold.
    /// False (and nothing changed) when the device takes no limits of that kind.
    fn update_limits(&mut self, _limits: &rate_limit::LimitSet) -> bool {
        false
    }
}

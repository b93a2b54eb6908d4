//! The x86_64 machine's virtio devices on PCI bus 0, with KVM's fast paths: each MSI-X
//! vector is a GSI whose route follows the guest's MSI-X table and an irqfd the device
//! writes (no ioctl on the device's path), and each queue's notify address is an ioeventfd
//! served by one notification thread (no exit to user space for a notification).

use super::ram::Ram;
use crate::notify::{Notification, NotifyWorker};
use crate::virtio::{Slot, Workers};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use vme_arch::layout;
use vme_devices::bus::{Bus, SharedDevice};
use vme_devices::pci::msix::{MsiMessage, MsiSink};
use vme_devices::pci::root::{CONFIG_IO_LEN, CONFIG_IO_PORT, ECAM_BUS_SIZE};
use vme_devices::pci::{BarAllocator, BarWatcher, BarWindow, ConfigIo, Ecam, PciBus};
use vme_devices::virtio::pci::{self as virtio_pci, PciTransport};
use vme_hypervisor::{FIRST_MSI_GSI, MAX_GSI, MsiRoute, Vm};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

/// x86 MSI messages are writes to the local APIC range 0xfee0_0000..0xfeef_ffff; anything
/// else a guest programs is not an interrupt and is never routed.
fn is_x86_msi(msg: &MsiMessage) -> bool {
    msg.address >> 20 == 0xfee
}

/// One function's MSI-X vectors as KVM GSIs (`first_gsi + vector`), each with an irqfd that
/// is bound to its GSI when the vector is first routed (a driver that never enables MSI-X
/// leaves KVM without irqfds).
struct KvmMsi {
    vm: Arc<Vm>,
    first_gsi: u32,
    irqfds: Vec<EventFd>,
    /// Whether each vector's irqfd is bound to its GSI.
    bound: Vec<AtomicBool>,
    /// Whether each vector has a route (signalling an unrouted vector does nothing).
    routed: Vec<AtomicBool>,
}

impl MsiSink for KvmMsi {
    fn route(&self, vector: u16, msg: Option<MsiMessage>) {
        let v = usize::from(vector);
        let Some(flag) = self.routed.get(v) else {
            return;
        };
        let route = match msg {
            Some(m) if is_x86_msi(&m) => Some(MsiRoute {
                address: m.address,
                data: m.data,
            }),
            Some(m) => {
                log::warn!(
                    "PCI: MSI-X vector {vector} programmed with address {:#x}, which is not the \
                     local APIC range: its interrupts are dropped",
                    m.address
                );
                None
            }
            None => None,
        };
        let gsi = self.first_gsi + u32::from(vector);
        if route.is_some() && !self.bound[v].load(Ordering::SeqCst) {
            // Routes change on the vCPU thread that wrote the MSI-X table, under the
            // transport's lock: no two threads bind the same vector.
            if let Err(e) = self.vm.register_irqfd(&self.irqfds[v], gsi) {
                log::warn!("PCI: cannot bind MSI-X vector {vector} to GSI {gsi}: {e}");
                return;
            }
            self.bound[v].store(true, Ordering::SeqCst);
        }
        match self.vm.set_msi_route(gsi, route) {
            Ok(()) => flag.store(route.is_some(), Ordering::SeqCst),
            Err(e) => {
                log::warn!("PCI: cannot route MSI-X vector {vector} (GSI {gsi}): {e}");
                flag.store(false, Ordering::SeqCst);
            }
        }
    }

    fn signal(&self, vector: u16) {
        let v = usize::from(vector);
        if self.routed.get(v).is_some_and(|f| f.load(Ordering::SeqCst)) {
            // Fails only when the counter is saturated: the interrupt is pending anyway.
            let _ = self.irqfds[v].write(1);
        }
    }
}

/// Keeps a function's queue ioeventfds at its notify addresses wherever the guest puts
/// BAR 0 (inside the BAR window; elsewhere notifications fall back to exits, which the bus
/// does not decode either).
struct IoEvents {
    vm: Arc<Vm>,
    fds: Vec<Arc<EventFd>>,
    placed: Option<u64>,
}

impl IoEvents {
    fn unplace(&mut self) {
        if let Some(bar) = self.placed.take() {
            for (q, fd) in self.fds.iter().enumerate() {
                let addr = virtio_pci::notify_addr(bar, q as u32);
                if let Err(e) = self.vm.unregister_ioevent(fd, addr) {
                    log::warn!("PCI: cannot remove the ioeventfd at {addr:#x}: {e}");
                }
            }
        }
    }
}

impl BarWatcher for IoEvents {
    fn bar_moved(&mut self, _bar: usize, base: Option<u64>) {
        self.unplace();
        let window = layout::PCI_MMIO_BASE..layout::PCI_MMIO_BASE + layout::PCI_MMIO_SIZE;
        let Some(bar) = base.filter(|b| {
            window.contains(b) && window.contains(&(b + u64::from(virtio_pci::BAR_SIZE) - 1))
        }) else {
            return;
        };
        for (q, fd) in self.fds.iter().enumerate() {
            let addr = virtio_pci::notify_addr(bar, q as u32);
            if let Err(e) = self.vm.register_ioevent(fd, addr) {
                // Another function's BAR overlaps (the guest moved one over the other): this
                // function's notifications exit to the monitor instead.
                log::warn!("PCI: no ioeventfd at {addr:#x} ({e}); notifications there exit");
                for (q, fd) in self.fds.iter().enumerate().take(q) {
                    let _ = self
                        .vm
                        .unregister_ioevent(fd, virtio_pci::notify_addr(bar, q as u32));
                }
                return;
            }
        }
        self.placed = Some(bar);
    }
}

/// PCI bus 0 and its virtio functions in slot order, for snapshots.
pub struct PciDevices {
    pub bus: Arc<PciBus>,
    pub transports: Vec<Arc<Mutex<PciTransport>>>,
}

/// Puts the virtio devices on PCI bus 0 and the bus on the machine's port and MMIO buses.
pub fn attach(
    vm: &Arc<Vm>,
    ram: &Arc<Ram>,
    slots: Vec<Slot>,
    workers: &mut Workers,
    pio: &mut Bus,
    mmio: &mut Bus,
) -> Result<PciDevices, String> {
    let mut bus = PciBus::new();
    let mut bars = BarAllocator::new(layout::PCI_MMIO_BASE, layout::PCI_MMIO_SIZE);
    let mut next_gsi = FIRST_MSI_GSI;
    let mut notifications = Vec::new();
    let mut transports = Vec::new();
    for (i, slot) in slots.into_iter().enumerate() {
        let queues = slot.device.queue_max_sizes().len();
        let vectors = queues as u32 + 1;
        if next_gsi + vectors - 1 > MAX_GSI {
            return Err(format!(
                "virtio device {i} needs {vectors} interrupt vectors but KVM's GSIs are used up: \
                 use fewer devices"
            ));
        }
        let mut irqfds = Vec::new();
        for _ in 0..vectors {
            let fd = EventFd::new(EFD_NONBLOCK)
                .map_err(|e| format!("cannot create an irqfd for virtio device {i}: {e}"))?;
            irqfds.push(fd);
        }
        let sink = Arc::new(KvmMsi {
            vm: vm.clone(),
            first_gsi: next_gsi,
            bound: (0..vectors).map(|_| AtomicBool::new(false)).collect(),
            routed: (0..vectors).map(|_| AtomicBool::new(false)).collect(),
            irqfds,
        });
        next_gsi += vectors;
        let bar = bars
            .allocate(u64::from(virtio_pci::BAR_SIZE))
            .map_err(|e| e.to_string())?;
        let mem: Arc<dyn vme_devices::virtio::GuestMemory> = ram.clone();
        let transport = workers.wire(i, slot, |device| {
            PciTransport::new(device, mem, sink, bar as u32)
        })?;
        let fds = (0..queues)
            .map(|_| EventFd::new(EFD_NONBLOCK).map(Arc::new))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("cannot create an ioeventfd for virtio device {i}: {e}"))?;
        for (q, fd) in fds.iter().enumerate() {
            let t = transport.clone();
            notifications.push(Notification {
                fd: fd.clone(),
                kick: Box::new(move || {
                    t.lock().unwrap_or_else(|p| p.into_inner()).kick(q as u32);
                }),
            });
        }
        transport
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .set_watcher(Box::new(IoEvents {
                vm: vm.clone(),
                fds,
                placed: None,
            }));
        bus.add(transport.clone()).map_err(|e| e.to_string())?;
        transports.push(transport);
    }
    if !notifications.is_empty() {
        let worker = NotifyWorker::spawn(notifications)
            .map_err(|e| format!("cannot start the virtio notification thread: {e}"))?;
        workers.add_notify(worker);
    }
    let bus = Arc::new(bus);
    let layout_err = |e| format!("device layout: {e}");
    pio.insert(
        u64::from(CONFIG_IO_PORT),
        CONFIG_IO_LEN,
        Arc::new(Mutex::new(ConfigIo::new(bus.clone()))),
    )
    .map_err(layout_err)?;
    mmio.insert(
        layout::PCI_ECAM_BASE,
        ECAM_BUS_SIZE,
        Arc::new(Mutex::new(Ecam::new(bus.clone()))),
    )
    .map_err(layout_err)?;
    let window: SharedDevice = Arc::new(Mutex::new(BarWindow::new(
        bus.clone(),
        layout::PCI_MMIO_BASE,
    )));
    mmio.insert(layout::PCI_MMIO_BASE, layout::PCI_MMIO_SIZE, window)
        .map_err(layout_err)?;
    Ok(PciDevices { bus, transports })
}

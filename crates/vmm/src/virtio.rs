//! The virtio devices of a [`MachineSpec`], shared by both machine kinds (riscv64 places them
//! on virtio-mmio, x86_64 on virtio-pci), and the threads that serve them besides the vCPUs.

use crate::control::{BalloonControl, ControlHook, RunContext};
use crate::limits::{LimitTarget, device_limits};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use vme_api::MachineSpec;
use vme_api::control::{BalloonStatus, GuestMemoryStats, RunState};
use vme_api::limits::DeviceLimits;
use vme_devices::virtio::balloon::{Balloon, BalloonShared, PFN_SHIFT};
use vme_devices::virtio::block::Block;
use vme_devices::virtio::net::{self as virtio_net, Net, RxSignal, RxSource, RxWorker};
use vme_devices::virtio::rate_limit::{RefillTimer, RefillWorker};
use vme_devices::virtio::rng::Rng;
use vme_devices::virtio::vsock::{self, Vsock};
use vme_devices::virtio::{Kick, VirtioDevice};

/// One virtio slot's device (an mmio window or a PCI function), with the receive side of a
/// net or vsock device (which needs the transport before its thread can start: see
/// [`Workers::wire`]).
pub struct Slot {
    pub device: Box<dyn VirtioDevice>,
    pub rx: Option<(String, RxSource)>,
    /// The host side of a balloon device, linked to the control socket by [`Workers`].
    pub balloon: Option<Arc<BalloonShared>>,
    /// A disk's or network device's name and limits, for `status` and `set_limit`.
    pub limits: Option<Named>,
}

/// How the control socket names a device that takes rate limits.
pub struct Named {
    pub name: String,
    pub backend: String,
    pub limits: DeviceLimits,
}

/// The spec's virtio devices in slot order: disks first (vda, vdb, ...), then network
/// devices (eth0, ...), then the rng, the balloon and vsock. `machine` has `max_slots` slots.
pub fn devices(spec: &MachineSpec, max_slots: usize, machine: &str) -> Result<Vec<Slot>, String> {
    let optional: Vec<&str> = [
        (spec.rng, "the rng"),
        (spec.balloon, "the balloon"),
        (spec.vsock.is_some(), "vsock"),
    ]
    .into_iter()
    .filter_map(|(on, name)| on.then_some(name))
    .collect();
    let wanted = spec.disks.len() + spec.nets.len() + optional.len();
    if wanted > max_slots {
        return Err(format!(
            "{} disks, {} network devices{} need {wanted} virtio slots, but the {machine} \
             machine has {max_slots}: remove some{}",
            spec.disks.len(),
            spec.nets.len(),
            if optional.is_empty() {
                String::new()
            } else {
                format!(", {}", optional.join(", "))
            },
            if optional.is_empty() {
                ""
            } else {
                " or drop an optional device (--rng off, --balloon off, no --vsock)"
            }
        ));
    }
    let mut slots = Vec::new();
    for (i, disk) in spec.disks.iter().enumerate() {
        let serial = disk.serial.as_deref().unwrap_or("");
        let mut block = Block::open_disk(&disk.path, disk.base.as_deref(), disk.readonly, serial)
            .map_err(|e| e.to_string())?;
        block.set_limits(device_limits(disk.bw, disk.iops, disk.burst_ms));
        slots.push(Slot {
            device: Box::new(block),
            rx: None,
            balloon: None,
            limits: Some(Named {
                name: format!("disk{i}"),
                backend: disk.path.display().to_string(),
                limits: DeviceLimits::of_disk(disk),
            }),
        });
    }
    for (i, net) in spec.nets.iter().enumerate() {
        let tap = crate::taps::open(&net.tap).map_err(|e| e.to_string())?;
        // The CLI fills in a random MAC; a spec from elsewhere without one gets a fixed
        // locally administered one, distinct per device.
        let mac = net
            .mac
            .map_or([0x52, 0x54, 0, 0x12, 0x34, 0x56 + i as u8], |m| m.0);
        let mut dev = Net::new(Box::new(tap), mac)
            .map_err(|e| format!("cannot set up the network device on tap {}: {e}", net.tap))?;
        dev.set_limits(
            device_limits(net.rx_bw, net.rx_pps, net.burst_ms),
            device_limits(net.tx_bw, net.tx_pps, net.burst_ms),
        );
        let rx = dev
            .rx_source()
            .map_err(|e| format!("cannot set up the network device on tap {}: {e}", net.tap))?;
        slots.push(Slot {
            device: Box::new(dev),
            rx: Some((net.tap.clone(), rx)),
            balloon: None,
            limits: Some(Named {
                name: format!("net{i}"),
                backend: net.tap.clone(),
                limits: DeviceLimits::of_net(net),
            }),
        });
    }
    if spec.rng {
        slots.push(Slot {
            device: Box::new(Rng::new()),
            rx: None,
            balloon: None,
            limits: None,
        });
    }
    if spec.balloon {
        let balloon = Balloon::new(spec.memory.bytes(), spec.free_page_reporting());
        slots.push(Slot {
            balloon: Some(balloon.shared()),
            device: Box::new(balloon),
            rx: None,
            limits: None,
        });
    }
    if let Some(v) = &spec.vsock {
        let dev = Vsock::new(v.cid, &v.uds).map_err(|e| format!("cannot set up vsock: {e}"))?;
        let rx = dev
            .rx_source()
            .map_err(|e| format!("cannot set up vsock: {e}"))?;
        slots.push(Slot {
            device: Box::new(dev),
            rx: Some(("vsock".into(), rx)),
            balloon: None,
            limits: None,
        });
    }
    Ok(slots)
}

/// The queue a receive worker kicks: the same for net and vsock.
const RX_QUEUE: u32 = virtio_net::RX_QUEUE as u32;
const _: () = assert!(vsock::RX_QUEUE == virtio_net::RX_QUEUE);

/// The threads of a machine's virtio devices (net receive, rate-limit refill). Dropping it
/// stops and joins them: keep it until the vCPUs are done, before the devices go.
#[derive(Default)]
pub struct Workers {
    rx: Vec<RxWorker>,
    refill: Vec<RefillWorker>,
    balloon: Option<Arc<BalloonLink>>,
    notify: Vec<crate::notify::NotifyWorker>,
    limits: Vec<LimitTarget>,
}

impl Workers {
    /// Puts `slot`'s device on the transport `transport_for` builds and starts the device's
    /// threads, which need that transport to serve its queues. Returns the transport, for
    /// the machine to place on its bus.
    pub fn wire<T: Kick + 'static>(
        &mut self,
        index: usize,
        slot: Slot,
        transport_for: impl FnOnce(Box<dyn VirtioDevice>) -> T,
    ) -> Result<Arc<Mutex<T>>, String> {
        // Taken before the device moves into its transport.
        let timer = slot.device.refill_timer();
        let transport = Arc::new(Mutex::new(transport_for(slot.device)));
        if let Some((name, rx)) = slot.rx {
            let t = transport.clone();
            let kick = move || t.lock().unwrap_or_else(|p| p.into_inner()).kick(RX_QUEUE);
            let worker = rx
                .spawn(&name, Box::new(kick))
                .map_err(|e| format!("cannot start the receive thread of {name}: {e}"))?;
            self.rx.push(worker);
        }
        if let Some(shared) = slot.balloon {
            let (t, k) = (transport.clone(), transport.clone());
            self.balloon = Some(Arc::new(BalloonLink {
                shared,
                config_changed: Box::new(move || {
                    t.lock().unwrap_or_else(|p| p.into_inner()).config_changed()
                }),
                kick: Box::new(move |q| {
                    k.lock().unwrap_or_else(|p| p.into_inner()).kick(q);
                }),
            }));
        }
        if let Some(named) = slot.limits {
            // Weak: a set_limit racing with the machine's end must not keep its devices.
            let t = Arc::downgrade(&transport);
            self.limits.push(LimitTarget {
                name: named.name,
                backend: named.backend,
                limits: named.limits,
                apply: Arc::new(move |l| {
                    t.upgrade().is_some_and(|t| {
                        t.lock().unwrap_or_else(|p| p.into_inner()).update_limits(l)
                    })
                }),
            });
        }
        if let Some(timer) = timer {
            // Serves a throttled queue again when tokens are back.
            let name = format!("virtio{index}");
            let t = transport.clone();
            let kick = move |q| t.lock().unwrap_or_else(|p| p.into_inner()).kick(q);
            let worker = timer
                .spawn(&name, Box::new(kick))
                .map_err(|e| format!("cannot start the rate-limit thread of {name}: {e}"))?;
            self.refill.push(worker);
        }
        Ok(transport)
    }

    /// Adds the thread that serves queue notifications (ioeventfds) of the machine's devices.
    pub fn add_notify(&mut self, worker: crate::notify::NotifyWorker) {
        self.notify.push(worker);
    }

    /// Makes the threads follow the VM's run state from now on: nothing is delivered into
    /// or served for a paused guest, and the threads end with the VM. Also links the
    /// balloon (if any) and the devices that take limits to the control socket.
    pub fn follow_run_state(&self, ctx: &RunContext) {
        if let Some(b) = &self.balloon {
            ctx.control.set_balloon(b.clone());
        }
        ctx.control.limits.register(self.limits.clone());
        let threads: Vec<Arc<dyn Follows>> = self
            .rx
            .iter()
            .map(|w| w.signal().clone() as Arc<dyn Follows>)
            .chain(
                self.refill
                    .iter()
                    .map(|w| w.timer().clone() as Arc<dyn Follows>),
            )
            .chain(
                self.notify
                    .iter()
                    .map(|w| w.signal().clone() as Arc<dyn Follows>),
            )
            .collect();
        if threads.is_empty() {
            return;
        }
        let hook = Arc::new(Follow(threads));
        ctx.control.add_hook(hook.clone());
        // A pause that came before the hook existed.
        if ctx.control.state() == RunState::Paused {
            hook.state_changed(RunState::Paused);
        }
    }
}

/// What a device thread does when the VM's run state changes.
pub(crate) trait Follows: Send + Sync {
    fn set_paused(&self, paused: bool);
    fn stop(&self);
}

impl Follows for RxSignal {
    fn set_paused(&self, paused: bool) {
        RxSignal::set_paused(self, paused);
    }
    fn stop(&self) {
        RxSignal::stop(self);
    }
}

impl Follows for RefillTimer {
    fn set_paused(&self, paused: bool) {
        RefillTimer::set_paused(self, paused);
    }
    fn stop(&self) {
        RefillTimer::stop(self);
    }
}

struct Follow(Vec<Arc<dyn Follows>>);

impl ControlHook for Follow {
    fn state_changed(&self, state: RunState) {
        for t in &self.0 {
            match state {
                RunState::Paused => t.set_paused(true),
                RunState::Running => t.set_paused(false),
                RunState::Stopping => t.stop(),
            }
        }
    }
}

/// The balloon as the control socket drives it: the device's shared state, and its
/// transport for the interrupts (whatever transport the machine put it on).
struct BalloonLink {
    shared: Arc<BalloonShared>,
    config_changed: Box<dyn Fn() + Send + Sync>,
    kick: Box<dyn Fn(u32) + Send + Sync>,
}

impl BalloonControl for BalloonLink {
    fn set_target(&self, bytes: u64) -> Result<(), String> {
        self.shared
            .set_target(bytes >> PFN_SHIFT)
            .map_err(|e| e.to_string())?;
        (self.config_changed)();
        Ok(())
    }

    fn status(&self, wait: Option<Duration>) -> BalloonStatus {
        if let Some(wait) = wait {
            let (seq, queue) = self.shared.request_stats();
            if let Some(q) = queue {
                (self.kick)(q);
                // A guest that does not answer in time gets its older numbers shown, with
                // their age.
                self.shared.wait_stats_after(seq, wait);
            }
        }
        let s = self.shared.snapshot();
        let page = 1u64 << PFN_SHIFT;
        BalloonStatus {
            target_bytes: u64::from(s.target_pages) * page,
            actual_bytes: u64::from(s.actual_pages) * page,
            driver_ready: s.driver_ready,
            inflated_pages: s.counters.inflated_pages,
            deflated_pages: s.counters.deflated_pages,
            reported_bytes: s.counters.reported_bytes,
            refused_pages: s.counters.refused_pfns,
            stats: s.stats.map(|g| GuestMemoryStats {
                swap_in_bytes: g.swap_in,
                swap_out_bytes: g.swap_out,
                major_faults: g.major_faults,
                minor_faults: g.minor_faults,
                free_bytes: g.free_memory,
                total_bytes: g.total_memory,
                available_bytes: g.available_memory,
                disk_caches_bytes: g.disk_caches,
                hugetlb_allocations: g.hugetlb_allocations,
                hugetlb_failures: g.hugetlb_failures,
            }),
            stats_age_ms: s.stats_age.map(|a| a.as_millis() as u64),
            vmm_rss_bytes: None,
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A link whose transport does nothing (no driver running).
    pub(crate) fn link(shared: Arc<BalloonShared>) -> Arc<dyn BalloonControl> {
        Arc::new(BalloonLink {
            shared,
            config_changed: Box::new(|| {}),
            kick: Box::new(|_| {}),
        })
    }
}

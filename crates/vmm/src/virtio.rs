//! The virtio devices of a [`MachineSpec`], shared by both machine kinds (riscv64 places them
//! on virtio-mmio, x86_64 on virtio-pci), and the threads that serve them besides the vCPUs.

use crate::control::{ControlHook, RunContext};
use std::sync::{Arc, Mutex};
use vme_api::MachineSpec;
use vme_api::control::RunState;
use vme_devices::virtio::block::Block;
use vme_devices::virtio::net::{self as virtio_net, Net, RxSignal, RxSource, RxWorker};
use vme_devices::virtio::rate_limit::{Limits, RefillTimer, RefillWorker};
use vme_devices::virtio::rng::Rng;
use vme_devices::virtio::{Kick, VirtioDevice};

/// One virtio slot's device (an mmio window or a PCI function), with the receive side of a
/// net device (which needs the transport before its thread can start: see [`Workers::wire`]).
pub struct Slot {
    pub device: Box<dyn VirtioDevice>,
    pub rx: Option<(String, RxSource)>,
}

/// The spec's virtio devices in slot order: disks first (vda, vdb, ...), then network
/// devices (eth0, ...), then the rng. `machine` has `max_slots` slots.
pub fn devices(spec: &MachineSpec, max_slots: usize, machine: &str) -> Result<Vec<Slot>, String> {
    let wanted = spec.disks.len() + spec.nets.len() + usize::from(spec.rng);
    if wanted > max_slots {
        return Err(format!(
            "{} disks, {} network devices{} need {wanted} virtio slots, but the {machine} \
             machine has {max_slots}: remove some{}",
            spec.disks.len(),
            spec.nets.len(),
            if spec.rng { " and the rng" } else { "" },
            if spec.rng { " or use --rng off" } else { "" }
        ));
    }
    let mut slots = Vec::new();
    for disk in &spec.disks {
        let serial = disk.serial.as_deref().unwrap_or("");
        let mut block =
            Block::open(&disk.path, disk.readonly, serial).map_err(|e| e.to_string())?;
        block.set_limits(limits(disk.bw, disk.iops, disk.burst_ms));
        slots.push(Slot {
            device: Box::new(block),
            rx: None,
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
            limits(net.rx_bw, net.rx_pps, net.burst_ms),
            limits(net.tx_bw, net.tx_pps, net.burst_ms),
        );
        let rx = dev
            .rx_source()
            .map_err(|e| format!("cannot set up the network device on tap {}: {e}", net.tap))?;
        slots.push(Slot {
            device: Box::new(dev),
            rx: Some((net.tap.clone(), rx)),
        });
    }
    if spec.rng {
        slots.push(Slot {
            device: Box::new(Rng::new()),
            rx: None,
        });
    }
    Ok(slots)
}

/// A validated spec's limits as the devices take them (burst 0: the default).
fn limits(bytes: Option<vme_api::ByteSize>, ops: Option<u64>, burst_ms: Option<u64>) -> Limits {
    Limits {
        bytes: bytes.map(|b| b.bytes()),
        ops,
        burst_ms: burst_ms.unwrap_or(0),
    }
}

/// The threads of a machine's virtio devices (net receive, rate-limit refill). Dropping it
/// stops and joins them: keep it until the vCPUs are done, before the devices go.
#[derive(Default)]
pub struct Workers {
    rx: Vec<RxWorker>,
    refill: Vec<RefillWorker>,
    notify: Vec<crate::notify::NotifyWorker>,
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
        if let Some((tap, rx)) = slot.rx {
            let t = transport.clone();
            let kick = move || {
                t.lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .kick(virtio_net::RX_QUEUE as u32)
            };
            let worker = rx
                .spawn(&tap, Box::new(kick))
                .map_err(|e| format!("cannot start the receive thread for tap {tap}: {e}"))?;
            self.rx.push(worker);
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
    /// or served for a paused guest, and the threads end with the VM.
    pub fn follow_run_state(&self, ctx: &RunContext) {
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

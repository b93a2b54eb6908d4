//! The virtio devices of a [`MachineSpec`], shared by both machine kinds: both place them on
//! virtio-mmio transports, only where (and with which interrupt line) differs.

use crate::control::{ControlHook, RunContext};
use std::sync::{Arc, Mutex};
use vme_api::MachineSpec;
use vme_api::control::RunState;
use vme_devices::virtio::VirtioDevice;
use vme_devices::virtio::block::Block;
use vme_devices::virtio::mmio::MmioTransport;
use vme_devices::virtio::net::{self as virtio_net, Net, RxSignal, RxSource, RxWorker};
use vme_devices::virtio::rate_limit::{Limits, RefillTimer, RefillWorker};
use vme_devices::virtio::rng::Rng;

/// One virtio-mmio slot's device, with the receive side of a net device (which needs the
/// transport before its thread can start: see [`start_rx`]).
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

/// Starts the refill thread of a rate-limited device (`timer` from
/// [`VirtioDevice::refill_timer`], taken before the device moved into `transport`): it
/// serves a throttled queue again when tokens are back, and follows the VM's run state.
pub fn start_refill(
    ctx: &RunContext,
    name: &str,
    timer: Option<Arc<RefillTimer>>,
    transport: &Arc<Mutex<MmioTransport>>,
) -> Result<Option<RefillWorker>, String> {
    let Some(timer) = timer else { return Ok(None) };
    let t = transport.clone();
    let kick = move |q| t.lock().unwrap_or_else(|p| p.into_inner()).kick(q);
    let worker = timer
        .spawn(name, Box::new(kick))
        .map_err(|e| format!("cannot start the rate-limit thread of {name}: {e}"))?;
    if ctx.control.state() == RunState::Paused {
        timer.set_paused(true);
    }
    ctx.control.add_hook(Arc::new(RefillFollow(timer)));
    Ok(Some(worker))
}

/// No throttled queue is served in a paused guest; the thread ends with the VM.
struct RefillFollow(Arc<RefillTimer>);

impl ControlHook for RefillFollow {
    fn state_changed(&self, state: RunState) {
        match state {
            RunState::Paused => self.0.set_paused(true),
            RunState::Running => self.0.set_paused(false),
            RunState::Stopping => self.0.stop(),
        }
    }
}

/// Starts the receive thread of a net device now placed on `transport`: a frame from the tap
/// kicks the receive queue as a guest notification would.
pub fn start_rx(
    tap: &str,
    rx: RxSource,
    transport: Arc<Mutex<MmioTransport>>,
) -> Result<RxWorker, String> {
    let kick = move || {
        transport
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .kick(virtio_net::RX_QUEUE as u32)
    };
    rx.spawn(tap, Box::new(kick))
        .map_err(|e| format!("cannot start the receive thread for tap {tap}: {e}"))
}

/// Makes the receive threads follow the VM's run state from now on.
pub fn follow_run_state(ctx: &RunContext, workers: &[RxWorker]) {
    if workers.is_empty() {
        return;
    }
    let signals: Vec<_> = workers.iter().map(|w| w.signal().clone()).collect();
    if ctx.control.state() == RunState::Paused {
        signals.iter().for_each(|s| s.set_paused(true));
    }
    ctx.control.add_hook(Arc::new(NetFollow(signals)));
}

/// Keeps the net devices' receive threads in step with the VM: no frame is delivered into a
/// paused guest, and the threads end with the VM.
struct NetFollow(Vec<Arc<RxSignal>>);

impl ControlHook for NetFollow {
    fn state_changed(&self, state: RunState) {
        for s in &self.0 {
            match state {
                RunState::Paused => s.set_paused(true),
                RunState::Running => s.set_paused(false),
                RunState::Stopping => s.stop(),
            }
        }
    }
}

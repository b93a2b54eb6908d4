//! Rate limits of a running VM's disks and network devices: the names `status` lists them by
//! (`disk0`, ..., `net0`, ...) and `set_limit`, which changes a device's limits while the
//! guest runs. The devices keep the tokens their buckets hold across a change
//! (`vme_devices::virtio::rate_limit`). A change outlives a guest reboot with
//! `--on-reboot restart`: the rebuilt machine's devices get it again.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};
use vme_api::control::DeviceInfo;
use vme_api::limits::DeviceLimits;
use vme_devices::virtio::rate_limit::{LimitSet, Limits};

/// Applies limits to a device through its transport; false when the device is gone (its
/// machine ended) or refuses them.
pub type Apply = Arc<dyn Fn(&LimitSet) -> bool + Send + Sync>;

/// One device that takes limits, as the machine registers it.
#[derive(Clone)]
pub struct LimitTarget {
    pub name: String,
    pub backend: String,
    pub limits: DeviceLimits,
    pub apply: Apply,
}

#[derive(Default)]
struct Inner {
    targets: Vec<LimitTarget>,
    /// Limits set over the control socket, by device name, for a rebuilt machine.
    changed: BTreeMap<String, DeviceLimits>,
}

/// The VM's limit-taking devices, shared by the machine (which registers them) and the
/// control socket.
#[derive(Default)]
pub struct LimitRegistry {
    inner: Mutex<Inner>,
}

/// A validated spec's limits as the devices take them (burst 0: the default).
pub fn device_limits(
    bytes: Option<vme_api::ByteSize>,
    ops: Option<u64>,
    burst: Option<u64>,
) -> Limits {
    Limits {
        bytes: bytes.map(|b| b.bytes()),
        ops,
        burst_ms: burst.unwrap_or(0),
    }
}

/// What the devices take for `limits`.
pub fn limit_set(limits: &DeviceLimits) -> LimitSet {
    match *limits {
        DeviceLimits::Disk { bw, iops, burst_ms } => {
            LimitSet::Disk(device_limits(bw, iops, burst_ms))
        }
        DeviceLimits::Net {
            rx_bw,
            tx_bw,
            rx_pps,
            tx_pps,
            burst_ms,
        } => LimitSet::Net {
            rx: device_limits(rx_bw, rx_pps, burst_ms),
            tx: device_limits(tx_bw, tx_pps, burst_ms),
        },
    }
}

impl LimitRegistry {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Every critical section leaves the registry whole, so a panicked holder poisons nothing.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The devices of a (re)built machine. Limits changed before a restart are applied again.
    pub fn register(&self, targets: Vec<LimitTarget>) {
        let mut inner = self.lock();
        let mut targets = targets;
        for t in &mut targets {
            if let Some(l) = inner.changed.get(&t.name) {
                if (t.apply)(&limit_set(l)) {
                    t.limits = l.clone();
                } else {
                    log::warn!(
                        "{}: the limits set before the restart could not be applied",
                        t.name
                    );
                }
            }
        }
        inner.targets = targets;
    }

    /// Forgets the devices of a machine that ended (their changed limits are kept).
    pub fn clear(&self) {
        self.lock().targets.clear();
    }

    pub fn list(&self) -> Vec<DeviceInfo> {
        self.lock().targets.iter().map(info).collect()
    }

    /// Changes device `name`'s limits by `changes` (`--disk`/`--net` limit syntax). On any
    /// error nothing changes.
    pub fn set(&self, name: &str, changes: &str) -> Result<DeviceInfo, String> {
        let mut inner = self.lock();
        let Some(i) = inner.targets.iter().position(|t| t.name == name) else {
            let names: Vec<&str> = inner.targets.iter().map(|t| t.name.as_str()).collect();
            return Err(if names.is_empty() {
                format!("no device {name:?}: this VM has no disks or network devices to limit")
            } else {
                format!(
                    "no device {name:?}: this VM has {} (see status)",
                    names.join(", ")
                )
            });
        };
        let target = &inner.targets[i];
        let new = target
            .limits
            .updated(changes)
            .map_err(|e| format!("{name}: {e}; its limits are unchanged"))?;
        if !(target.apply)(&limit_set(&new)) {
            return Err(format!(
                "{name} is not running (the VM is stopping or restarting): try again once it runs"
            ));
        }
        log::info!("{name}: limits now {new:?}");
        inner.targets[i].limits = new.clone();
        inner.changed.insert(name.to_string(), new);
        Ok(info(&inner.targets[i]))
    }
}

fn info(t: &LimitTarget) -> DeviceInfo {
    DeviceInfo {
        name: t.name.clone(),
        backend: t.backend.clone(),
        limits: t.limits.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};

    fn target(name: &str, limits: DeviceLimits, seen: Arc<Mutex<Vec<LimitSet>>>) -> LimitTarget {
        LimitTarget {
            name: name.into(),
            backend: format!("/{name}.img"),
            limits,
            apply: Arc::new(move |l| {
                seen.lock().unwrap().push(*l);
                true
            }),
        }
    }

    #[test]
    fn set_validates_applies_and_survives_a_restart() {
        let reg = LimitRegistry::default();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let disk = DeviceLimits::of_disk(&"path=/a,bw=2M".parse().unwrap());
        reg.register(vec![target("disk0", disk.clone(), seen.clone())]);
        assert_eq!(reg.list()[0].limits, disk);

        let e = reg.set("disk1", "bw=1M").unwrap_err();
        assert!(e.contains("this VM has disk0"), "{e}");
        let e = reg.set("disk0", "bw=1").unwrap_err();
        assert!(
            e.contains("between 4K and 1T") && e.contains("unchanged"),
            "{e}"
        );
        assert!(
            seen.lock().unwrap().is_empty(),
            "a refused change reaches no device"
        );
        assert_eq!(reg.list()[0].limits, disk);

        let got = reg.set("disk0", "bw=8M,iops=100").unwrap();
        assert_eq!(
            *seen.lock().unwrap(),
            vec![LimitSet::Disk(Limits {
                bytes: Some(8 << 20),
                ops: Some(100),
                burst_ms: 0
            })]
        );
        assert_eq!(reg.list(), vec![got.clone()]);

        // A rebuilt machine's device starts from the spec and gets the change again.
        reg.clear();
        assert!(reg.list().is_empty());
        let again = Arc::new(Mutex::new(Vec::new()));
        reg.register(vec![target("disk0", disk, again.clone())]);
        assert_eq!(reg.list(), vec![got]);
        assert_eq!(again.lock().unwrap().len(), 1);
    }

    #[test]
    fn a_device_that_is_gone_changes_nothing() {
        let reg = LimitRegistry::default();
        let alive = Arc::new(AtomicBool::new(false));
        let a = alive.clone();
        let net = DeviceLimits::of_net(&"tap=t".parse().unwrap());
        reg.register(vec![LimitTarget {
            name: "net0".into(),
            backend: "t".into(),
            limits: net.clone(),
            apply: Arc::new(move |_| a.load(Ordering::SeqCst)),
        }]);
        let e = reg.set("net0", "rx_bw=1M").unwrap_err();
        assert!(e.contains("not running"), "{e}");
        assert_eq!(reg.list()[0].limits, net);
        alive.store(true, Ordering::SeqCst);
        assert!(reg.set("net0", "rx_bw=1M").is_ok());
        let e = LimitRegistry::default().set("disk0", "bw=1M").unwrap_err();
        assert!(e.contains("no disks or network devices"), "{e}");
    }
}

//! Capacity and admission: the host's CPUs and memory, times the configured overcommit
//! ratios, bound what the VMs may be given. A VM larger than that capacity is refused at
//! create; a start that would take the running VMs past it is refused at start. Each refusal
//! names the numbers. Pure arithmetic apart from [`Host::probe`], so it is tested here.

use vme_api::ByteSize;

/// What the host has.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Host {
    pub cpus: u32,
    pub memory: u64,
}

/// How far VMs may be promised more than the host has: vCPUs are time-shared, so some
/// overcommit is normal; guest memory is by default not overcommitted (a guest that touches
/// all of it would push the host into swap or the OOM killer).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Ratios {
    pub cpu: f64,
    pub memory: f64,
}

impl Default for Ratios {
    fn default() -> Self {
        Ratios {
            cpu: 4.0,
            memory: 1.0,
        }
    }
}

/// What some VMs are given, together.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Load {
    pub vcpus: u64,
    pub memory: u64,
}

impl Host {
    /// This host: the CPUs this process may run on, and MemTotal.
    pub fn probe() -> Host {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get() as u32);
        let memory = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|t| {
                let line = t.lines().find(|l| l.starts_with("MemTotal:"))?;
                let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
                Some(kib * 1024)
            })
            .unwrap_or(0);
        Host { cpus, memory }
    }

    fn capacity(&self, r: Ratios) -> Load {
        Load {
            vcpus: (f64::from(self.cpus) * r.cpu) as u64,
            memory: (self.memory as f64 * r.memory) as u64,
        }
    }

    /// Whether one VM of `vm`'s size could ever run here (checked at create).
    pub fn admits(&self, r: Ratios, vm: Load) -> Result<(), String> {
        let cap = self.capacity(r);
        if vm.vcpus > cap.vcpus {
            return Err(format!(
                "{} vCPUs is more than this host can give one VM: {} CPUs x overcommit {} = {} \
                 vCPUs; ask for fewer",
                vm.vcpus, self.cpus, r.cpu, cap.vcpus
            ));
        }
        if vm.memory > cap.memory {
            return Err(format!(
                "memory {} is more than this host can give one VM: {} x overcommit {} = {}; \
                 ask for less",
                ByteSize(vm.memory),
                ByteSize(self.memory),
                r.memory,
                ByteSize(cap.memory)
            ));
        }
        Ok(())
    }

    /// Whether `vm` can start next to the running VMs' `load` (checked at start).
    pub fn admits_next_to(&self, r: Ratios, load: Load, vm: Load) -> Result<(), String> {
        let cap = self.capacity(r);
        if load.vcpus + vm.vcpus > cap.vcpus {
            return Err(format!(
                "starting it would promise {} vCPUs: running VMs have {}, it asks {}, and this \
                 host gives {} ({} CPUs x overcommit {}); stop another VM first",
                load.vcpus + vm.vcpus,
                load.vcpus,
                vm.vcpus,
                cap.vcpus,
                self.cpus,
                r.cpu
            ));
        }
        if load.memory + vm.memory > cap.memory {
            return Err(format!(
                "starting it would promise {} of memory: running VMs have {}, it asks {}, and \
                 this host gives {} ({} x overcommit {}); stop another VM first",
                ByteSize(load.memory + vm.memory),
                ByteSize(load.memory),
                ByteSize(vm.memory),
                ByteSize(cap.memory),
                ByteSize(self.memory),
                r.memory
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vme_api::size::GIB;

    const HOST: Host = Host {
        cpus: 2,
        memory: 8 * GIB,
    };

    fn vm(vcpus: u64, gib: u64) -> Load {
        Load {
            vcpus,
            memory: gib * GIB,
        }
    }

    #[test]
    fn one_vm_up_to_capacity() {
        let r = Ratios::default();
        assert_eq!(HOST.admits(r, vm(8, 8)), Ok(()));
        let e = HOST.admits(r, vm(9, 1)).unwrap_err();
        assert!(
            e.contains("9 vCPUs") && e.contains("2 CPUs x overcommit 4 = 8"),
            "{e}"
        );
        let e = HOST.admits(r, vm(1, 9)).unwrap_err();
        assert!(
            e.contains("memory 9G") && e.contains("8G x overcommit 1 = 8G"),
            "{e}"
        );
        let r = Ratios {
            cpu: 1.0,
            memory: 1.5,
        };
        assert_eq!(HOST.admits(r, vm(2, 12)), Ok(()));
        assert!(HOST.admits(r, vm(3, 1)).is_err());
    }

    #[test]
    fn starts_count_what_runs() {
        let r = Ratios::default();
        assert_eq!(HOST.admits_next_to(r, vm(4, 6), vm(4, 2)), Ok(()));
        let e = HOST.admits_next_to(r, vm(4, 6), vm(1, 3)).unwrap_err();
        assert!(e.contains("9G") && e.contains("running VMs have 6G"), "{e}");
        let e = HOST.admits_next_to(r, vm(7, 1), vm(2, 1)).unwrap_err();
        assert!(
            e.contains("9 vCPUs") && e.contains("running VMs have 7"),
            "{e}"
        );
    }

    #[test]
    fn probe_sees_this_host() {
        let h = Host::probe();
        assert!(h.cpus >= 1 && h.memory > 0, "{h:?}");
    }
}

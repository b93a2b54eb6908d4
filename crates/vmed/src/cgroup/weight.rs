//! CPU weight under contention. Without it every VM's cgroup and the slice holding them
//! would keep the kernel's default weight, so on a host that runs other work all VMs
//! together would get the share of one process (measured: four riscv64 guests booted in
//! 2.3 s instead of 1.0 s while a build ran beside them). Instead a VM weighs as many
//! default-weight processes as it has vCPUs, and the slice the sum of its VMs: VMs compete
//! with the host's processes as their unconfined monitors would, and each stays capped by
//! its CPU allowance.
//!
//! | | v2 `cpu.weight` | v1 `cpu.shares` |
//! |---|---|---|
//! | default (one process) | 100 | 1024 |
//! | range | 1 to 10000 | 2 to 262144 |

use super::{Mounts, write};
use std::fs;
use std::path::Path;
use std::sync::Mutex;

/// A weight file, its default and its range.
#[derive(Clone, Copy)]
pub(super) struct Scale {
    pub(super) file: &'static str,
    unit: u64,
    min: u64,
    max: u64,
}

pub(super) const V2: Scale = Scale {
    file: "cpu.weight",
    unit: 100,
    min: 1,
    max: 10_000,
};

pub(super) const V1: Scale = Scale {
    file: "cpu.shares",
    unit: 1024,
    min: 2,
    max: 262_144,
};

impl Scale {
    /// The weight of `n` default-weight processes, within the file's range.
    pub(super) fn of(self, n: u64) -> u64 {
        self.unit.saturating_mul(n.max(1)).clamp(self.min, self.max)
    }
}

/// Sets `slice`'s weight to the sum of its VM cgroups' (`vm-*`), or the default when it
/// holds none. A slice without the weight file (its controller is elsewhere) is left alone;
/// a weight the kernel refuses is an error for the caller.
pub(super) fn rebalance(slice: &Path, scale: Scale) -> Result<(), String> {
    if !slice.join(scale.file).exists() {
        return Ok(());
    }
    let Ok(entries) = fs::read_dir(slice) else {
        return Ok(());
    };
    let sum: u64 = entries
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("vm-"))
        .filter_map(|e| fs::read_to_string(e.path().join(scale.file)).ok())
        .filter_map(|t| t.trim().parse::<u64>().ok())
        .fold(0, u64::saturating_add);
    let weight = if sum == 0 {
        scale.unit
    } else {
        sum.clamp(scale.min, scale.max)
    };
    write(slice, scale.file, &weight.to_string())
}

/// Rebalances the slices above VM cgroup `dir` (its v2 parent and its parent's mirror in the
/// v1 cpu hierarchy of `m`), after the VM's cgroup appeared or went.
pub fn rebalance_above(dir: &Path, m: &Mounts) -> Result<(), String> {
    let Some(slice) = dir.parent() else {
        return Ok(());
    };
    // Starts and exits run in parallel: one sum at a time, or an older sum could land last.
    static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    if m.v2.as_ref().is_some_and(|v2| slice.starts_with(v2)) {
        rebalance(slice, V2)?;
    }
    if let (Some(h), Some(rel)) = (m.v1_for("cpu"), m.relative(slice)) {
        rebalance(&h.path.join(rel), V1)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_vm_weighs_its_vcpus_within_the_range() {
        assert_eq!(V2.of(1), 100);
        assert_eq!(V2.of(0), 100);
        assert_eq!(V2.of(8), 800);
        assert_eq!(V2.of(1000), 10_000);
        assert_eq!(V1.of(2), 2048);
        assert_eq!(V1.of(u64::MAX), 262_144);
    }

    #[test]
    fn the_slice_weighs_the_sum_of_its_vms_or_the_default() {
        let slice = std::env::temp_dir().join(format!("vme-weight-{}", std::process::id()));
        let _ = fs::remove_dir_all(&slice);
        fs::create_dir_all(slice.join("vm-a")).unwrap();
        fs::create_dir_all(slice.join("vm-b")).unwrap();
        fs::create_dir_all(slice.join("other")).unwrap();
        fs::write(slice.join("cpu.weight"), "100").unwrap();
        fs::write(slice.join("vm-a/cpu.weight"), "200\n").unwrap();
        fs::write(slice.join("vm-b/cpu.weight"), "100\n").unwrap();
        fs::write(slice.join("other/cpu.weight"), "5000\n").unwrap();
        rebalance(&slice, V2).unwrap();
        assert_eq!(fs::read_to_string(slice.join("cpu.weight")).unwrap(), "300");
        fs::remove_dir_all(slice.join("vm-a")).unwrap();
        fs::remove_dir_all(slice.join("vm-b")).unwrap();
        rebalance(&slice, V2).unwrap();
        assert_eq!(fs::read_to_string(slice.join("cpu.weight")).unwrap(), "100");
        fs::remove_dir_all(&slice).unwrap();
    }
}

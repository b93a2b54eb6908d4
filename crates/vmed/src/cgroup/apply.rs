//! The limits written into a VM's cgroups: each controller in cgroup v2 where the VM's v2
//! cgroup has it, else in the v1 hierarchy that carries it, else skipped or refused.

use super::{CgroupConfig, Mounts, PERIOD_US, io_line, v1, weight, write};
use crate::limits::VmLimits;
use std::path::{Path, PathBuf};

/// What [`apply`] set up.
pub(super) struct Applied {
    /// The VM's v1 cgroups, for the monitor to join.
    pub(super) v1: Vec<PathBuf>,
    pub(super) placed: Vec<String>,
    pub(super) skipped: Vec<String>,
}

/// The CFS quota, µs per [`PERIOD_US`], of an allowance of `cpus` CPUs (at least the
/// kernel's smallest, 1 ms).
pub(super) fn cpu_quota(cpus: f64) -> u64 {
    (cpus * PERIOD_US as f64).round().max(1000.0) as u64
}

/// `cpu.max` for an allowance of `cpus` CPUs.
pub fn cpu_max(cpus: f64) -> String {
    format!("{} {PERIOD_US}", cpu_quota(cpus))
}

/// Writes the limits into the VM's cgroups, each controller in v2 where `v2_offered` has it,
/// else in its v1 hierarchy (created here, added to `made`); returns those v1 cgroups and the
/// limits skipped for a missing controller.
#[allow(clippy::too_many_arguments)]
pub(super) fn apply(
    cfg: &CgroupConfig,
    dir: &Path,
    rel: &Path,
    name: &str,
    m: &Mounts,
    v2_offered: &[String],
    (vcpus, guest_memory): (u32, u64),
    limits: &VmLimits,
    made: &mut Vec<PathBuf>,
) -> Result<Applied, String> {
    let mut a = Applied {
        v1: Vec::new(),
        placed: Vec::new(),
        skipped: Vec::new(),
    };
    let missing = |c: &str, what: &str| {
        format!(
            "the cgroup {} has no {c} controller and no cgroup v1 hierarchy of this host \
             carries it, so VM {name:?} cannot have {what}: hand the controller down in cgroup \
             v2 (a unified host: systemd.unified_cgroup_hierarchy=1) or mount a v1 hierarchy \
             with it, or drop that limit",
            dir.display()
        )
    };
    // The VM's cgroup in the v1 hierarchy carrying `c`, created on first use.
    let mut v1_of = |c: &str, a: &mut Applied| -> Result<Option<PathBuf>, String> {
        let Some(h) = m.v1_for(c) else {
            return Ok(None);
        };
        let d = h.path.join(rel).join(format!("vm-{name}"));
        if !a.v1.contains(&d) {
            if v1::create(&d)? {
                made.push(d.clone());
            }
            a.v1.push(d.clone());
        }
        Ok(Some(d))
    };
    let v2 = |c: &str| v2_offered.iter().any(|o| o == c);

    let cpus = limits.cpu_allowance.unwrap_or(f64::from(vcpus));
    if v2("cpu") {
        write(dir, "cpu.max", &cpu_max(cpus))?;
        let w = weight::V2.of(u64::from(vcpus));
        write(dir, weight::V2.file, &w.to_string())?;
        a.placed
            .push(format!("cpu.max {} cpu.weight {w} (v2)", cpu_max(cpus)));
    } else if let Some(d) = v1_of("cpu", &mut a)? {
        v1::set_cpu(&d, cpus)?;
        let w = weight::V1.of(u64::from(vcpus));
        write(&d, weight::V1.file, &w.to_string())?;
        a.placed.push(format!(
            "cpu.cfs_quota_us {} cpu.shares {w} (v1, {})",
            cpu_quota(cpus),
            d.display()
        ));
        // Its CPU time where there is no v2 cgroup to read it from.
        v1_of("cpuacct", &mut a)?;
    } else if limits.cpu_allowance.is_some() || cfg.require_controllers {
        return Err(missing("cpu", "the CPU allowance"));
    } else {
        a.skipped.push(format!("cpu.max {}", cpu_max(cpus)));
    }

    let memory = guest_memory.saturating_add(cfg.monitor_memory);
    if v2("memory") {
        write(dir, "memory.max", &memory.to_string())?;
        // The guest's memory must not be pushed to swap behind its back.
        if dir.join("memory.swap.max").exists() {
            write(dir, "memory.swap.max", "0")?;
        }
        a.placed.push(format!("memory.max {memory} (v2)"));
    } else if let Some(d) = v1_of("memory", &mut a)? {
        v1::set_memory(&d, memory)?;
        a.placed.push(format!(
            "memory.limit_in_bytes {memory} (v1, {})",
            d.display()
        ));
    } else if cfg.require_controllers {
        return Err(missing("memory", "the memory limit"));
    } else {
        a.skipped.push(format!("memory.max {memory}"));
    }

    if !limits.io_max.is_empty() {
        if v2("io") {
            for l in &limits.io_max {
                write(dir, "io.max", &io_line(l))?;
            }
            a.placed.push("io.max (v2)".into());
        } else if let Some(d) = v1_of("blkio", &mut a)? {
            v1::set_io(&d, &limits.io_max)?;
            a.placed
                .push(format!("blkio.throttle (v1, {})", d.display()));
        } else {
            return Err(missing("io", "io_max"));
        }
    }
    Ok(a)
}

//! `/1.0/metrics`: the daemon's view in Prometheus text format (VMs by state, each VM's
//! resources, the host's capacity). Usage accounting (CPU seconds, bytes) comes with cgroups.

use crate::admission::{Host, Ratios};
use crate::lifecycle::ALL_STATES;
use crate::store::VmRecord;
use std::fmt::Write;

/// Renders the metrics. VM names need no escaping in labels: validation allows only
/// letters, digits and '-'.
pub fn render(vms: &[VmRecord], host: Host, ratios: Ratios) -> String {
    let mut out = String::new();
    let mut metric = |name: &str, help: &str, rows: &[(String, f64)]| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
        for (labels, v) in rows {
            let _ = writeln!(out, "{name}{labels} {v}");
        }
    };
    let by_state: Vec<_> = ALL_STATES
        .iter()
        .map(|s| {
            let n = vms.iter().filter(|v| v.state == *s).count();
            (format!("{{state=\"{s}\"}}"), n as f64)
        })
        .collect();
    metric("vme_vms", "VMs by lifecycle state.", &by_state);
    let per_vm = |f: &dyn Fn(&VmRecord) -> f64| -> Vec<(String, f64)> {
        vms.iter()
            .map(|v| {
                let labels = format!("{{vm=\"{}\",arch=\"{}\"}}", v.name, v.spec.arch);
                (labels, f(v))
            })
            .collect()
    };
    metric(
        "vme_vm_vcpus",
        "vCPUs each VM is given.",
        &per_vm(&|v| f64::from(v.spec.vcpus)),
    );
    metric(
        "vme_vm_memory_bytes",
        "Guest memory each VM is given.",
        &per_vm(&|v| v.spec.memory.bytes() as f64),
    );
    metric(
        "vme_vm_active",
        "1 while a VM has a monitor (starting, running, paused, stopping).",
        &per_vm(&|v| f64::from(u8::from(v.state.has_monitor()))),
    );
    let one = |v: f64| [(String::new(), v)];
    metric(
        "vme_host_cpus",
        "The host's CPUs.",
        &one(f64::from(host.cpus)),
    );
    metric(
        "vme_host_memory_bytes",
        "The host's memory.",
        &one(host.memory as f64),
    );
    metric(
        "vme_overcommit_cpu_ratio",
        "vCPUs the VMs may be given per host CPU.",
        &one(ratios.cpu),
    );
    metric(
        "vme_overcommit_memory_ratio",
        "Guest memory the VMs may be given per byte of host memory.",
        &one(ratios.memory),
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lifecycle::{RestartPolicy, State};
    use vme_api::{ByteSize, MachineSpec};

    #[test]
    fn text_format() {
        let mut spec = MachineSpec::new("/k");
        spec.vcpus = 2;
        spec.memory = ByteSize(1 << 30);
        let vm = VmRecord {
            name: "web-1".into(),
            state: State::Running,
            reason: String::new(),
            spec,
            pid: 7,
            restart_policy: RestartPolicy::Never,
            created_at: 0,
            updated_at: 0,
        };
        let host = Host {
            cpus: 4,
            memory: 8 << 30,
        };
        let text = render(&[vm], host, Ratios::default());
        for line in [
            "# TYPE vme_vms gauge",
            "vme_vms{state=\"running\"} 1",
            "vme_vms{state=\"crashed\"} 0",
            "vme_vm_vcpus{vm=\"web-1\",arch=\"x86_64\"} 2",
            "vme_vm_memory_bytes{vm=\"web-1\",arch=\"x86_64\"} 1073741824",
            "vme_vm_active{vm=\"web-1\",arch=\"x86_64\"} 1",
            "vme_host_cpus 4",
            "vme_overcommit_cpu_ratio 4",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "{line} missing from:\n{text}"
            );
        }
        // Every sample line is NAME[{labels}] VALUE.
        for l in text.lines().filter(|l| !l.starts_with('#')) {
            let (_, v) = l.rsplit_once(' ').unwrap();
            v.parse::<f64>().unwrap();
        }
    }
}

//! `/1.0/metrics`: the daemon's view in Prometheus text format (VMs by state, each VM's
//! resources, the host's capacity), and each VM's usage from its newest accounting sample.

use crate::admission::{Host, Ratios};
use crate::lifecycle::ALL_STATES;
use crate::store::VmRecord;
use crate::usage::Sample;
use std::fmt::Write;

/// Each VM's usage, from its newest sample. The counters count since the VM's monitor
/// started (a new monitor starts them again, which Prometheus reads as a counter reset);
/// a VM with no monitor keeps its last run's counters and shows no memory in use.
pub fn render_usage(vms: &[VmRecord], latest: &[Sample]) -> String {
    let mut out = String::new();
    let rows: Vec<(&VmRecord, &Sample)> = vms
        .iter()
        .filter_map(|v| Some((v, latest.iter().find(|s| s.vm == v.key)?)))
        .collect();
    let mut metric = |name: &str, kind: &str, help: &str, f: &dyn Fn(&VmRecord, &Sample) -> f64| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for (v, s) in &rows {
            let _ = writeln!(
                out,
                "{name}{{vm=\"{}\",project=\"{}\"}} {}",
                v.name,
                v.project,
                f(v, s)
            );
        }
    };
    metric(
        "vme_vm_cpu_seconds_total",
        "counter",
        "CPU time the VM's monitor used (its guest's vCPUs and its devices).",
        &|_, s| s.cpu_usec as f64 / 1e6,
    );
    metric(
        "vme_vm_cpu_user_seconds_total",
        "counter",
        "CPU time the VM's monitor used in user mode.",
        &|_, s| s.cpu_user_usec as f64 / 1e6,
    );
    metric(
        "vme_vm_cpu_system_seconds_total",
        "counter",
        "CPU time the VM's monitor used in the kernel.",
        &|_, s| s.cpu_system_usec as f64 / 1e6,
    );
    metric(
        "vme_vm_memory_used_bytes",
        "gauge",
        "Memory the VM's monitor uses now (0 without a monitor).",
        &|v, s| {
            if v.state.has_monitor() {
                s.memory_bytes as f64
            } else {
                0.0
            }
        },
    );
    metric(
        "vme_vm_memory_peak_bytes",
        "gauge",
        "The most memory the VM's monitor used.",
        &|_, s| s.memory_peak_bytes as f64,
    );
    metric(
        "vme_vm_disk_read_bytes_total",
        "counter",
        "Bytes the VM's monitor read from storage.",
        &|_, s| s.disk_read_bytes as f64,
    );
    metric(
        "vme_vm_disk_written_bytes_total",
        "counter",
        "Bytes the VM's monitor wrote to storage.",
        &|_, s| s.disk_write_bytes as f64,
    );
    metric(
        "vme_vm_network_receive_bytes_total",
        "counter",
        "Bytes the guest received on its network devices.",
        &|_, s| s.net_rx_bytes as f64,
    );
    metric(
        "vme_vm_network_transmit_bytes_total",
        "counter",
        "Bytes the guest sent on its network devices.",
        &|_, s| s.net_tx_bytes as f64,
    );
    out
}

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
                let labels = format!(
                    "{{vm=\"{}\",project=\"{}\",arch=\"{}\"}}",
                    v.name, v.project, v.spec.arch
                );
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
            key: "acme_web-1".into(),
            name: "web-1".into(),
            state: State::Running,
            reason: String::new(),
            spec,
            pid: 7,
            restart_policy: RestartPolicy::Never,
            limits: Default::default(),
            created_at: 0,
            updated_at: 0,
            project: "acme".into(),
            label: "unclassified".into(),
        };
        let host = Host {
            cpus: 4,
            memory: 8 << 30,
        };
        let text = render(std::slice::from_ref(&vm), host, Ratios::default());
        for line in [
            "# TYPE vme_vms gauge",
            "vme_vms{state=\"running\"} 1",
            "vme_vms{state=\"crashed\"} 0",
            "vme_vm_vcpus{vm=\"web-1\",project=\"acme\",arch=\"x86_64\"} 2",
            "vme_vm_memory_bytes{vm=\"web-1\",project=\"acme\",arch=\"x86_64\"} 1073741824",
            "vme_vm_active{vm=\"web-1\",project=\"acme\",arch=\"x86_64\"} 1",
            "vme_host_cpus 4",
            "vme_overcommit_cpu_ratio 4",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "{line} missing from:\n{text}"
            );
        }
        // Samples are kept under the VM's key; the metrics show its name and project.
        let sample = Sample {
            vm: "acme_web-1".into(),
            cpu_usec: 2_500_000,
            memory_bytes: 1000,
            net_rx_bytes: 7,
            ..Sample::default()
        };
        let mut vm = vm;
        let usage = render_usage(std::slice::from_ref(&vm), std::slice::from_ref(&sample));
        for line in [
            "# TYPE vme_vm_cpu_seconds_total counter",
            "vme_vm_cpu_seconds_total{vm=\"web-1\",project=\"acme\"} 2.5",
            "vme_vm_memory_used_bytes{vm=\"web-1\",project=\"acme\"} 1000",
            "vme_vm_network_receive_bytes_total{vm=\"web-1\",project=\"acme\"} 7",
        ] {
            assert!(
                usage.lines().any(|l| l == line),
                "{line} missing from:\n{usage}"
            );
        }
        vm.state = State::Stopped;
        let usage = render_usage(&[vm], &[sample]);
        assert!(
            usage.contains("vme_vm_memory_used_bytes{vm=\"web-1\",project=\"acme\"} 0\n"),
            "{usage}"
        );
        assert!(
            usage.contains("vme_vm_cpu_seconds_total{vm=\"web-1\",project=\"acme\"} 2.5\n"),
            "{usage}"
        );
        // Every sample line is NAME[{labels}] VALUE.
        for l in text
            .lines()
            .chain(usage.lines())
            .filter(|l| !l.starts_with('#'))
        {
            let (_, v) = l.rsplit_once(' ').unwrap();
            v.parse::<f64>().unwrap();
        }
    }
}

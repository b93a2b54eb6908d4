//! Linux guests on the x86_64 machine: our minimal kernel (bzImage and PVH) and Debian's stock
//! cloud kernel, through the real binary, asserting on what the guest reports.
//!
//! On PVM hosts (no VMX; see shared/PVM.md) our minimal kernel's PVH boot takes about two
//! minutes and runs in every `make test` (the shared boot of `booted.rs`, and the strict
//! seccomp workload with a tap, which needs root); the other boots (bzImage, Debian's stock kernel,
//! 4 GiB, other endings) take longer and run only with `VME_SLOW_TESTS=1`, saying so otherwise.
//! On VT-x/AMD-V hosts they all take seconds. The monitor's own behaviour on KVM is covered
//! quickly by `x86_probe.rs`.

mod common;

use common::agent;
use common::booted;
use common::netns::{Netns, net_available};
use common::{Vm, image, kvm_available, on_pvm_host, random_bytes, sha256_hex, temp_dir};
use std::time::{Duration, Instant};
use vme_api::agent::AgentClient;

/// Generous for PVM hosts.
const BOOT: Duration = Duration::from_secs(40 * 60);

fn slow_tests_enabled(what: &str) -> bool {
    if std::env::var("VME_SLOW_TESTS").as_deref() == Ok("1") {
        return kvm_available();
    }
    eprintln!(
        "NOTE: not booting {what}: x86 Linux boots take many minutes on PVM hosts; set VME_SLOW_TESTS=1 to run it"
    );
    false
}

fn host_unix_time() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

struct Boot<'a> {
    image: &'a str,
    kernel: &'a str,
    vcpus: u32,
    memory_mib: u64,
    /// Also check the virtio devices on PCI: a read-only disk of known content, a writable
    /// disk and the rng (only our kernels have the virtio drivers built in).
    virtio: bool,
}

/// The host's SHA-256 of a file.
fn host_sha256(path: &std::path::Path) -> String {
    sha256_hex(&std::fs::read(path).expect("read the file to hash"))
}

/// Checks what a guest booted with [`common::BASIC_FACTS`] (and, given `vda_sha`,
/// [`common::VIRTIO_FACTS`]) printed; `line` returns the console line with a marker.
/// `read_at` is the host's time when that console was read (None: now, as it is read).
fn assert_facts(
    mut line: impl FnMut(&str) -> String,
    vcpus: u32,
    memory_mib: u64,
    vda_sha: Option<&str>,
    read_at: Option<u64>,
) {
    assert_eq!(line("NPROC=").trim(), format!("NPROC={vcpus}"));
    let total: u64 = line("MemTotal:")
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap();
    let want = memory_mib * 1024;
    assert!(
        total * 10 >= want * 9 && total <= want,
        "MemTotal {total} KiB vs {want} KiB"
    );
    let date: u64 = line("DATE=").trim()[5..].parse().unwrap();
    assert!(
        date.abs_diff(read_at.unwrap_or_else(host_unix_time)) < 120,
        "guest date {date} is not the host's"
    );
    let Some(vda_sha) = vda_sha else { return };
    let vda = line("VDA=");
    let got = vda.split_once("VDA=").unwrap().1.split_whitespace().next();
    assert_eq!(
        got,
        Some(vda_sha),
        "the guest reads the disk the host wrote: {vda}"
    );
    assert_eq!(line("VDA-RO=").trim(), "VDA-RO=yes");
    assert_eq!(line("RNG=").trim(), "RNG=virtio_rng.0");
    assert_eq!(line("HWRNG=").trim(), "HWRNG=64");
    // virtio (1af4) functions behind our host bridge (8086:0d57).
    assert_eq!(line("PCI=").trim(), "PCI=0x1af4 0x8086");
    // Two disks and the rng (one queue each) and vsock (three queues): a config vector per
    // device and one per queue.
    assert_eq!(
        line("MSI=").trim(),
        "MSI=10",
        "virtio interrupts that are MSI-X"
    );
}

impl Boot<'_> {
    fn start(&self, run: &str, extra: &[&str]) -> Vm {
        self.start_wrapped(&[], run, extra)
    }

    /// Starts the monitor under `wrapper` (e.g. `ip netns exec NAME`).
    fn start_wrapped(&self, wrapper: &[&str], run: &str, extra: &[&str]) -> Vm {
        self.spawn(wrapper, run, extra, false)
    }

    /// [`Boot::start_wrapped`] with the console's input on a pipe ([`Vm::type_line`]).
    fn start_wrapped_interactive(&self, wrapper: &[&str], run: &str, extra: &[&str]) -> Vm {
        self.spawn(wrapper, run, extra, true)
    }

    fn spawn(&self, wrapper: &[&str], run: &str, extra: &[&str], input: bool) -> Vm {
        let k = image(self.image, self.kernel);
        let i = image(self.image, "initramfs.cpio");
        let cmdline = format!("console=ttyS0 quiet panic=-1 {run}");
        let (vcpus, memory) = (self.vcpus.to_string(), format!("{}M", self.memory_mib));
        let mut args = vec![
            "--kernel",
            k.to_str().unwrap(),
            "--initrd",
            i.to_str().unwrap(),
            "--vcpus",
            &vcpus,
            "--memory",
            &memory,
            "--cmdline",
            &cmdline,
        ];
        args.extend_from_slice(extra);
        if input {
            Vm::start_wrapped_interactive(wrapper, &args)
        } else {
            Vm::start_wrapped(wrapper, &args)
        }
    }

    /// Boots, checks what the guest reports of its CPUs, memory and clock, and that
    /// `poweroff` ends the monitor with status 0.
    fn check(&self) {
        let dir = temp_dir("x86linux");
        let sock = dir.join("ctl.sock");
        let sock = sock.to_str().unwrap();
        let mut run = common::BASIC_FACTS.to_string();
        let mut extra = vec!["--control-socket".to_string(), sock.to_string()];
        let (vda, vdb) = (dir.join("vda.raw"), dir.join("vdb.raw"));
        let mut vda_sha = String::new();
        if self.virtio {
            std::fs::write(&vda, random_bytes(4 << 20)).unwrap();
            std::fs::write(&vdb, vec![0u8; 1 << 20]).unwrap();
            vda_sha = host_sha256(&vda);
            // Stays up until the host has talked to the agent (see agent_checks).
            run = format!(
                "{run}; {}; while [ ! -e /tmp/vme-done ]; do sleep 1; done",
                common::VIRTIO_FACTS
            );
            extra.extend([
                "--vsock".to_string(),
                format!("cid=3,uds={}", dir.join("v.sock").display()),
                "--disk".to_string(),
                format!("path={},readonly=on", vda.display()),
                "--disk".to_string(),
                format!("path={}", vdb.display()),
            ]);
        }
        let run = format!(r#"vme.run="{run}""#);
        let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
        let mut vm = self.start(&run, &extra);
        vm.wait_for("VME-GUEST-READY", BOOT);
        let vda_sha = self.virtio.then_some(vda_sha.as_str());
        assert_facts(
            |n| vm.wait_for(n, BOOT),
            self.vcpus,
            self.memory_mib,
            vda_sha,
            None,
        );
        if self.virtio {
            // Seen intermittently on PVM hosts only and not explained yet: vsock data that
            // arrives altered is reported there, an error everywhere else (see
            // SPECIFICATION.md, virtio-vsock).
            agent::checks(&dir.join("v.sock"), sock, BOOT, on_pvm_host());
        }
        // The guest is still up (it powers off after the command): ask the monitor what it
        // did. On PVM hosts the kernel's int3 self-test needs the monitor's emulator.
        let reply = std::process::Command::new(common::VMM)
            .args(["ctl", "--control-socket", sock, "status"])
            .output()
            .expect("run vme-vmm ctl");
        let text = String::from_utf8_lossy(&reply.stdout);
        eprintln!("status near the end of the boot: {text}");
        assert!(
            text.contains(&format!(r#""vcpus":{},"#, self.vcpus))
                && text.contains("emulated_instructions"),
            "{text}"
        );
        vm.wait_for("VME-RUN-EXIT status=0", BOOT);
        assert_eq!(
            vm.wait_exit(BOOT).code(),
            Some(0),
            "{}",
            vm.stderr.lock().unwrap()
        );
        if self.virtio {
            let back = std::fs::read(&vdb).unwrap();
            assert!(
                back.starts_with(b"VME-VDB-WRITTEN") && back.len() == 1 << 20,
                "the guest's write reached the host file: {:?}",
                String::from_utf8_lossy(&back[..32])
            );
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}

const MINIMAL_PVH: Boot = Boot {
    image: "tiny",
    kernel: "vmlinux",
    vcpus: 2,
    memory_mib: 256,
    virtio: true,
};

/// Runs on every host: guest user space on KVM through our minimal kernel's PVH entry, with
/// 2 vCPUs, two disks, the rng and vsock. The boot is this run's shared one
/// ([`booted::x86_tiny`]), checked here from its console; the agent and the disk are then
/// driven in a restore of it, which powers off at the end.
#[test]
fn minimal_kernel_via_pvh_two_vcpus() {
    if !kvm_available() {
        return;
    }
    let booted = booted::x86_tiny();
    let lines: Vec<&str> = booted.console.lines().collect();
    let line = |needle: &str| {
        let found = lines.iter().find(|l| l.contains(needle));
        found.map(|l| l.to_string()).unwrap_or_else(|| {
            panic!(
                "no console line with {needle:?} in the boot:\n{}",
                booted.console
            )
        })
    };
    assert!(
        booted.console.contains("VME-GUEST-READY"),
        "{}",
        booted.console
    );
    let (vcpus, mib) = (booted.vcpus, booted.memory_mib);
    assert_facts(
        line,
        vcpus,
        mib,
        Some(&booted.vda_sha),
        Some(booted.console_at),
    );
    let written = std::fs::read(&booted.disks[1].0).unwrap();
    assert!(
        written.starts_with(b"VME-VDB-WRITTEN") && written.len() == 1 << 20,
        "the guest's write reached the host file: {:?}",
        String::from_utf8_lossy(&written[..32])
    );

    let dir = temp_dir("x86pvh");
    let args = booted.restore_args(&dir);
    let mut vm = Vm::start(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let (ctl, uds) = (dir.join("ctl.sock"), dir.join("v.sock"));
    let mut agent = AgentClient::wait(&uds, BOOT)
        .unwrap_or_else(|e| vm.fail(&format!("the restored guest's agent does not answer: {e}")));
    agent.set_timeout(Some(BOOT)).unwrap();
    let out = agent
        .exec(
            &[
                "sh".into(),
                "-c".into(),
                "printf VME-VDB-AFTER > /dev/vdb; sync".into(),
            ],
            &[],
            BOOT,
        )
        .unwrap();
    assert_eq!(out.code, Some(0), "{out:?}");
    drop(agent);
    // On PVM hosts the kernel's int3 self-test needs the monitor's emulator: its count is
    // part of the status.
    let status = common::ctl(&ctl, "status");
    assert!(
        status.contains(&format!(r#""vcpus":{vcpus},"#))
            && status.contains("emulated_instructions"),
        "{status}"
    );
    // Seen intermittently on PVM hosts only and not explained yet: vsock data that arrives
    // altered is reported there, an error everywhere else (see SPECIFICATION.md,
    // virtio-vsock). The checks end with /tmp/vme-done: the guest powers off.
    agent::checks(&uds, ctl.to_str().unwrap(), BOOT, on_pvm_host());
    vm.wait_for("VME-RUN-EXIT status=0", BOOT);
    assert_eq!(
        vm.wait_exit(BOOT).code(),
        Some(0),
        "{}",
        vm.stderr.lock().unwrap()
    );
    let back = std::fs::read(dir.join("disk1.raw")).unwrap();
    assert!(
        back.starts_with(b"VME-VDB-AFTER") && back.len() == 1 << 20,
        "the restored guest's write reached the host file: {:?}",
        String::from_utf8_lossy(&back[..32])
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn minimal_kernel_via_bzimage() {
    if slow_tests_enabled("the minimal kernel (bzImage)") {
        Boot {
            image: "tiny",
            kernel: "bzImage",
            vcpus: 1,
            memory_mib: 128,
            virtio: true,
        }
        .check();
    }
}

#[test]
fn minimal_kernel_with_four_vcpus_and_4g_across_the_pci_hole() {
    if slow_tests_enabled("the minimal kernel with 4 vCPUs and 4G") {
        Boot {
            vcpus: 4,
            memory_mib: 4096,
            ..MINIMAL_PVH
        }
        .check();
    }
}

#[test]
fn reboot_exits_zero_and_an_exiting_init_is_a_named_panic() {
    if !slow_tests_enabled("the reboot and init-exit endings") {
        return;
    }
    let one = Boot {
        vcpus: 1,
        memory_mib: 128,
        ..MINIMAL_PVH
    };
    let mut vm = one.start(r#"vme.run="reboot -f""#, &[]);
    assert_eq!(vm.wait_exit(BOOT).code(), Some(0));
    let mut vm = one.start("vme.init_exit=1", &[]);
    assert_eq!(vm.wait_exit(BOOT).code(), Some(3));
    let stderr = vm.stderr.lock().unwrap().clone();
    assert!(
        stderr.contains("Attempted to kill init"),
        "the panic is named: {stderr}"
    );
}

/// Every task of the monitor runs under a seccomp filter (mode 2 in /proc).
fn assert_all_threads_filtered(vm: &Vm) {
    let tasks = std::fs::read_dir(format!("/proc/{}/task", vm.pid())).unwrap();
    for t in tasks {
        let status = std::fs::read_to_string(t.unwrap().path().join("status")).unwrap_or_default();
        assert!(
            status.is_empty() || status.contains("Seccomp:\t2"),
            "{status}"
        );
    }
}

/// Runs `cmd` in the guest through its agent; returns its stdout.
fn agent_sh(agent: &mut AgentClient, cmd: &str) -> String {
    let out = agent
        .exec(&["sh".into(), "-c".into(), cmd.into()], &[], BOOT)
        .unwrap();
    assert_eq!(out.code, Some(0), "{cmd}: {out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// virtio-net on x86_64, and the whole workload under the strict seccomp filters the daemon
/// uses (each KVM ioctl allowed by number): the guest pings the host end of its tap (in a
/// network namespace of its own; root needed, VME_SKIP_NET_TESTS=1 skips knowingly), writes
/// its disk, echoes console input, answers its vsock agent; the VM is snapshotted, stopped and restored (still
/// strict) in a new monitor, where network, disk and agent work on until it powers off.
/// A filter that lacked a call would end a monitor with status 159 and its line on stderr.
#[test]
fn a_linux_workload_on_a_tap_disk_and_agent_runs_and_restores_under_strict_filters() {
    if !kvm_available() || !net_available() {
        return;
    }
    let t0 = Instant::now();
    let ns = Netns::new("x86ping");
    let dir = temp_dir("x86strict");
    let (sock, uds, disk) = (dir.join("ctl.sock"), dir.join("v.sock"), dir.join("d.raw"));
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    let run = "vme.run=\"ip addr add 10.0.2.15/24 dev eth0; ip link set eth0 up; \
               ping -c 5 -s 1200 10.0.2.1 >/dev/null && echo PING=ok || echo PING=failed; \
               printf VME-STRICT-DISK > /dev/vda; sync; echo DISK=written; \
               while [ ! -e /tmp/vme-done ]; do sleep 1; done\"";
    let tap = "vmetap0";
    let net = format!("tap={tap},mac=52:54:00:12:34:57");
    let (disk_arg, vsock) = (
        format!("path={}", disk.display()),
        format!("cid=3,uds={}", uds.display()),
    );
    let one = Boot {
        virtio: false,
        ..MINIMAL_PVH
    };
    let strict = common::STRICT;
    let mut vm = one.start_wrapped_interactive(
        &ns.exec(),
        run,
        &[
            strict[0],
            strict[1],
            "--net",
            &net,
            "--disk",
            &disk_arg,
            "--vsock",
            &vsock,
            "--control-socket",
            sock.to_str().unwrap(),
        ],
    );
    ns.configure_tap(tap, &vm);
    assert_eq!(vm.wait_for("PING=", BOOT).trim(), "PING=ok");
    vm.wait_for("DISK=written", BOOT);
    // Console input (the stdin pump raises the serial interrupt): the guest's tty echoes
    // the typed line while its shell is busy with vme.run.
    vm.type_line("echo VME-TYPED");
    vm.wait_for("echo VME-TYPED", BOOT);
    eprintln!(
        "booted, pinged and wrote the disk under strict filters in {:?}",
        t0.elapsed()
    );
    assert_all_threads_filtered(&vm);
    let mut agent = AgentClient::wait(&uds, BOOT)
        .unwrap_or_else(|e| vm.fail(&format!("the guest's agent does not answer: {e}")));
    agent.set_timeout(Some(BOOT)).unwrap();
    assert_eq!(
        agent_sh(
            &mut agent,
            "head -c 15 /dev/vda; ping -c 3 10.0.2.1 >/dev/null && echo ok"
        ),
        "VME-STRICT-DISKok\n"
    );
    drop(agent);
    let snap = dir.join("snap");
    let reply = common::ctl_args(&sock, &["snapshot", snap.to_str().unwrap()]);
    assert!(reply.contains(r#""ok":true"#), "{reply}");
    assert!(common::ctl(&sock, "stop").contains("stopping"));
    assert_eq!(vm.wait_exit(BOOT).code(), Some(0));
    vm.assert_no_seccomp_violation();
    let written = std::fs::read(&disk).unwrap();
    assert!(written.starts_with(b"VME-STRICT-DISK"), "the guest's write");

    // Restored, still strict, in the same namespace (the tap went with the first monitor).
    let (sock2, uds2) = (dir.join("ctl2.sock"), dir.join("v2.sock"));
    let vsock2 = format!("cid=3,uds={}", uds2.display());
    let mut r = Vm::start_wrapped(
        &ns.exec(),
        &[
            strict[0],
            strict[1],
            "--restore",
            snap.to_str().unwrap(),
            "--disk",
            &disk_arg,
            "--vsock",
            &vsock2,
            "--control-socket",
            sock2.to_str().unwrap(),
        ],
    );
    ns.configure_tap(tap, &r);
    let mut agent = AgentClient::wait(&uds2, BOOT)
        .unwrap_or_else(|e| r.fail(&format!("the restored guest's agent does not answer: {e}")));
    agent.set_timeout(Some(BOOT)).unwrap();
    assert_all_threads_filtered(&r);
    assert_eq!(
        agent_sh(
            &mut agent,
            // A new tap, with a new host-side MAC: the guest's neighbour entry is stale.
            "ip neigh flush all >/dev/null; ping -c 3 -w 60 -s 1200 10.0.2.1 >/dev/null && echo ok; \
             printf VME-RESTORED > /dev/vda; sync; echo done"
        ),
        "ok\ndone\n"
    );
    agent.write_file("/tmp/vme-done", b"", None).unwrap();
    drop(agent);
    r.wait_for("VME-RUN-EXIT status=0", BOOT);
    assert_eq!(
        r.wait_exit(BOOT).code(),
        Some(0),
        "{}",
        r.stderr.lock().unwrap()
    );
    r.assert_no_seccomp_violation();
    let written = std::fs::read(&disk).unwrap();
    assert!(
        written.starts_with(b"VME-RESTORED"),
        "the restored guest's write"
    );
    eprintln!(
        "strict workload, snapshot and restore done in {:?}",
        t0.elapsed()
    );
    drop(ns);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn debian_stock_kernel_via_bzimage_and_pvh() {
    if slow_tests_enabled("Debian's stock cloud kernel") {
        for kernel in ["vmlinuz", "vmlinux"] {
            Boot {
                image: "tiny-stock",
                kernel,
                vcpus: 1,
                memory_mib: 256,
                virtio: false,
            }
            .check();
        }
    }
}

/// Seconds since the guest booted, through its agent.
fn guest_uptime(agent: &mut AgentClient) -> f64 {
    let out = agent
        .exec(&["cat".into(), "/proc/uptime".into()], &[], BOOT)
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .and_then(|v| v.parse().ok())
        .unwrap()
}

/// This run's booted guest ([`booted::x86_tiny`], snapshotted once its agent answered)
/// restored in a new monitor: the guest's file in tmpfs, its disk, its clock and its agent
/// work on (vsock connections are reset by the restore; the agent listens again). Prints how
/// long the restore took to a guest that answers.
#[test]
fn minimal_kernel_snapshot_restores_in_a_new_process() {
    if !kvm_available() {
        return;
    }
    let booted = booted::x86_tiny();
    let dir = temp_dir("x86linuxsnap");
    let args = booted.restore_args(&dir);
    let mut args: Vec<&str> = args.iter().map(String::as_str).collect();
    args.extend(["--log-level", "info"]);
    let (ctl, uds) = (dir.join("ctl.sock"), dir.join("v.sock"));
    let t0 = Instant::now();
    let mut b = Vm::start(&args);
    let mut agent = AgentClient::wait(&uds, BOOT)
        .unwrap_or_else(|e| b.fail(&format!("the restored guest's agent does not answer: {e}")));
    let answered = t0.elapsed();
    agent.set_timeout(Some(BOOT)).unwrap();
    let own = b.stderr.lock().unwrap().clone();
    let own = own
        .lines()
        .find(|l| l.contains("restored snapshot"))
        .unwrap_or("")
        .to_string();
    eprintln!("restore: process start to the agent answering {answered:?}; monitor: {own}");
    let sh = |agent: &mut AgentClient, cmd: &str| {
        let out = agent
            .exec(&["sh".into(), "-c".into(), cmd.into()], &[], BOOT)
            .unwrap();
        assert_eq!(out.code, Some(0), "{out:?}");
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    assert_eq!(
        sh(&mut agent, "sha256sum /tmp/before"),
        booted.tmpfs_sha,
        "the file in tmpfs"
    );
    // The boot read vda into the page cache, which the snapshot holds: drop it so the guest
    // reads the restored monitor's disk.
    let sum = sh(
        &mut agent,
        "echo 3 > /proc/sys/vm/drop_caches; head -c 65536 /dev/vda | sha256sum",
    );
    assert!(
        sum.starts_with(&booted.vda_head_sha),
        "the disk reads: {sum:?}"
    );
    eprintln!("checks after the restore done at {:?}", t0.elapsed());
    let up = guest_uptime(&mut agent);
    assert!(
        up > booted.uptime && up < booted.uptime + 120.0,
        "the guest's clock goes on: {} at the snapshot, {up} after the restore",
        booted.uptime
    );
    assert_eq!(sh(&mut agent, "echo $((6*7))"), "42\n");
    let status = common::ctl(&ctl, "status");
    assert!(status.contains(r#""vcpus":2"#), "{status}");
    agent.write_file("/tmp/vme-done", b"", None).unwrap();
    b.wait_for("VME-RUN-EXIT status=0", BOOT);
    assert_eq!(b.wait_exit(BOOT).code(), Some(0));
    eprintln!("powered off at {:?} after the restore", t0.elapsed());
    let _ = std::fs::remove_dir_all(&dir);
}

/// What the monitor reports of the VM's identity (`ctl status`), once its socket answers.
fn identity(sock: &std::path::Path) -> vme_api::control::IdentityStatus {
    use vme_api::control::{Request, call};
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match call(sock, &Request::Status, Duration::from_secs(30)) {
            Ok(r) if r.ok => return r.status.unwrap().identity.expect("the identity is shown"),
            // The control socket appears once the monitor has started.
            other if Instant::now() > deadline => panic!("ctl status: {other:?}"),
            _ => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

/// A clone of this run's booted guest ([`booted::x86_tiny`]): the guest's vmgenid driver is
/// bound to the DSDT's VM Generation ID device, and a `--clone` restore changes the ID and
/// notifies it, so the kernel reseeds its random generator by itself (it logs "crng
/// reseeded due to virtual machine fork"), besides the agent's reseed and the new vsock CID.
#[test]
fn a_linux_clone_is_told_its_new_generation_id_and_reseeds() {
    use vme_api::control::CloneGuestState;
    if !kvm_available() {
        return;
    }
    let booted = booted::x86_tiny();
    let dir = temp_dir("x86linuxclone");
    let uds = dir.join("v.sock");
    let mut args = booted.restore_args(&dir);
    // `uds=` alone: a clone draws its own CID.
    let at = args.iter().position(|a| a == "--vsock").unwrap() + 1;
    args[at] = format!("uds={}", uds.display());
    args.extend(["--clone".into(), "--log-level".into(), "info".into()]);
    let mut b = Vm::start(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let ctl = dir.join("ctl.sock");
    let deadline = Instant::now() + BOOT;
    let id = loop {
        let id = identity(&ctl);
        let c = id.clone.clone().expect("a clone says it is one");
        match c.guest {
            CloneGuestState::Applied => break id,
            CloneGuestState::Pending if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(200))
            }
            _ => b.fail(&format!("the clone's identity was not applied: {c:?}")),
        }
    };
    assert_ne!(id.vsock_cid, Some(3), "a clone gets a new CID");
    let mut agent = AgentClient::wait(&uds, BOOT).expect("the clone's agent answers");
    agent.set_timeout(Some(BOOT)).unwrap();
    let sh = |agent: &mut AgentClient, script: &str| {
        let out = agent
            .exec(&["sh".into(), "-c".into(), script.into()], &[], BOOT)
            .expect("the guest agent runs a command");
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    let bound = sh(&mut agent, "ls /sys/bus/acpi/drivers/vmgenid/");
    assert!(
        bound.contains("VMGENCTR"),
        "the vmgenid driver did not bind to the DSDT's device: {bound:?}"
    );
    let log = sh(&mut agent, "dmesg");
    assert!(
        log.contains("crng reseeded due to virtual machine fork"),
        "the guest was not told of its new generation ID:\n{log}"
    );
    drop(agent);
    assert!(common::ctl(&ctl, "stop").contains("stopping"));
    assert_eq!(b.wait_exit(BOOT).code(), Some(0));
    let _ = std::fs::remove_dir_all(&dir);
}

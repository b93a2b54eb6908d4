//! Linux guests on the x86_64 machine: our minimal kernel (bzImage and PVH) and Debian's stock
//! cloud kernel, through the real binary, asserting on what the guest reports.
//!
//! On PVM hosts (no VMX; see shared/PVM.md) our minimal kernel's PVH boot takes about two
//! minutes and runs in every `make test`; the other boots (bzImage, Debian's stock kernel,
//! 4 GiB, other endings) take longer and run only with `VME_SLOW_TESTS=1`, saying so otherwise.
//! On VT-x/AMD-V hosts they all take seconds. The monitor's own behaviour on KVM is covered
//! quickly by `x86_probe.rs`.

mod common;

use common::agent;
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

/// `len` bytes that differ per run (xorshift from the clock), so a stale read cannot match.
/// What the guest does with the virtio devices: hash the read-only vda, try to write it, write
/// a marker to vdb, name the hardware rng and read from it, list the PCI vendors and count
/// the virtio interrupts that are MSI(-X).
const VIRTIO_RUN: &str = "echo VDA=$(sha256sum /dev/vda); \
     (printf x > /dev/vda) 2>/dev/null && echo VDA-RO=no || echo VDA-RO=yes; \
     printf VME-VDB-WRITTEN > /dev/vdb; sync; \
     echo RNG=$(cat /sys/class/misc/hw_random/rng_current); \
     echo HWRNG=$(head -c 64 /dev/hwrng | wc -c); \
     echo PCI=$(sort -u /sys/bus/pci/devices/*/vendor); \
     echo MSI=$(grep -i msi /proc/interrupts | grep -c virtio)";

impl Boot<'_> {
    fn start(&self, run: &str, extra: &[&str]) -> Vm {
        self.start_wrapped(&[], run, extra)
    }

    /// Starts the monitor under `wrapper` (e.g. `ip netns exec NAME`).
    fn start_wrapped(&self, wrapper: &[&str], run: &str, extra: &[&str]) -> Vm {
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
        Vm::start_wrapped(wrapper, &args)
    }

    /// Boots, checks what the guest reports of its CPUs, memory and clock, and that
    /// `poweroff` ends the monitor with status 0.
    fn check(&self) {
        let dir = temp_dir("x86linux");
        let sock = dir.join("ctl.sock");
        let sock = sock.to_str().unwrap();
        let mut run =
            "echo NPROC=$(nproc); grep MemTotal /proc/meminfo; echo DATE=$(date +%s)".to_string();
        let mut extra = vec!["--control-socket".to_string(), sock.to_string()];
        let (vda, vdb) = (dir.join("vda.raw"), dir.join("vdb.raw"));
        let mut vda_sha = String::new();
        if self.virtio {
            std::fs::write(&vda, random_bytes(4 << 20)).unwrap();
            std::fs::write(&vdb, vec![0u8; 1 << 20]).unwrap();
            vda_sha = host_sha256(&vda);
            // Stays up until the host has talked to the agent (see agent_checks).
            run = format!("{run}; {VIRTIO_RUN}; while [ ! -e /tmp/vme-done ]; do sleep 1; done");
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
        assert_eq!(
            vm.wait_for("NPROC=", BOOT).trim(),
            format!("NPROC={}", self.vcpus)
        );
        let total: u64 = vm
            .wait_for("MemTotal:", BOOT)
            .split_whitespace()
            .nth(1)
            .and_then(|v| v.parse().ok())
            .unwrap();
        let want = self.memory_mib * 1024;
        assert!(
            total * 10 >= want * 9 && total <= want,
            "MemTotal {total} KiB vs {want} KiB"
        );
        let date: u64 = vm.wait_for("DATE=", BOOT).trim()[5..].parse().unwrap();
        assert!(
            date.abs_diff(host_unix_time()) < 120,
            "guest date {date} is not the host's"
        );
        if self.virtio {
            let line = vm.wait_for("VDA=", BOOT);
            let got = line.split_once("VDA=").unwrap().1.split_whitespace().next();
            assert_eq!(
                got,
                Some(vda_sha.as_str()),
                "the guest reads the disk the host wrote: {line}"
            );
            assert_eq!(vm.wait_for("VDA-RO=", BOOT).trim(), "VDA-RO=yes");
            assert_eq!(vm.wait_for("RNG=", BOOT).trim(), "RNG=virtio_rng.0");
            assert_eq!(vm.wait_for("HWRNG=", BOOT).trim(), "HWRNG=64");
            // virtio (1af4) functions behind our host bridge (8086:0d57).
            assert_eq!(vm.wait_for("PCI=", BOOT).trim(), "PCI=0x1af4 0x8086");
            // Two disks and the rng (one queue each) and vsock (three queues): a config vector
            // per device and one per queue.
            let msi = vm.wait_for("MSI=", BOOT);
            assert_eq!(msi.trim(), "MSI=10", "virtio interrupts that are MSI-X");
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

/// Runs on every host: guest user space on KVM, through our minimal kernel's PVH entry.
#[test]
fn minimal_kernel_via_pvh_two_vcpus() {
    if kvm_available() {
        MINIMAL_PVH.check();
    }
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

/// virtio-net on x86_64: the guest pings the host end of its tap, in a network namespace of
/// its own (root needed; VME_SKIP_NET_TESTS=1 skips knowingly).
#[test]
fn minimal_kernel_pings_the_host_over_a_tap() {
    if !slow_tests_enabled("the virtio-net ping") || !net_available() {
        return;
    }
    let ns = Netns::new("x86ping");
    let run = "vme.run=\"ip addr add 10.0.2.15/24 dev eth0; ip link set eth0 up; \
               ping -c 3 10.0.2.1 >/dev/null && echo PING=ok || echo PING=failed\"";
    let tap = "vmetap0";
    let net = format!("tap={tap},mac=52:54:00:12:34:57");
    let one = Boot {
        vcpus: 1,
        virtio: false,
        ..MINIMAL_PVH
    };
    let mut vm = one.start_wrapped(&ns.exec(), run, &["--net", &net]);
    ns.configure_tap(tap, &vm);
    assert_eq!(vm.wait_for("PING=", BOOT).trim(), "PING=ok");
    assert_eq!(vm.wait_exit(BOOT).code(), Some(0));
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

/// One boot of our minimal kernel with a disk and vsock, a snapshot of it once its agent
/// answers, and a new monitor restored from it: the guest's file in tmpfs, its disk, its
/// clock and its agent work on (vsock connections are reset by the restore; the agent
/// listens again). Prints the snapshot's size and time and how long the restore took to
/// a guest that answers.
#[test]
fn minimal_kernel_snapshot_restores_in_a_new_process() {
    if !kvm_available() {
        return;
    }
    let dir = temp_dir("x86linuxsnap");
    let (a_sock, b_sock) = (dir.join("a.sock"), dir.join("b.sock"));
    let uds = dir.join("v.sock");
    let vda = dir.join("vda.raw");
    let bytes = random_bytes(4 << 20);
    std::fs::write(&vda, &bytes).unwrap();
    let vda_sha = sha256_hex(&bytes[..65536]);
    let run = r#"vme.run="while [ ! -e /tmp/vme-done ]; do sleep 1; done""#;
    let vsock = format!("cid=3,uds={}", uds.display());
    let disk = format!("path={},readonly=on", vda.display());
    let boot = Boot {
        vcpus: 2,
        ..MINIMAL_PVH
    };
    let t0 = Instant::now();
    let mut a = boot.start(
        run,
        &[
            "--vsock",
            &vsock,
            "--disk",
            &disk,
            "--control-socket",
            a_sock.to_str().unwrap(),
        ],
    );
    let mut agent = AgentClient::wait(&uds, BOOT).expect("the guest agent answers");
    agent.set_timeout(Some(BOOT)).unwrap();
    eprintln!("booted to the agent in {:?}", t0.elapsed());
    // Made and hashed inside the guest: host-to-guest vsock data is not always intact on
    // PVM hosts with 2 vCPUs (see agent_checks), and this checks the snapshot, not that.
    let make = "head -c 65536 /dev/urandom > /tmp/before; sha256sum /tmp/before";
    let sha = |agent: &mut AgentClient, cmd: &str| {
        let out = agent
            .exec(&["sh".into(), "-c".into(), cmd.into()], &[], BOOT)
            .unwrap();
        assert_eq!(out.code, Some(0), "{out:?}");
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    let before = sha(&mut agent, make);
    let up1 = guest_uptime(&mut agent);

    let snap = dir.join("snap");
    let reply = common::ctl_args(&a_sock, &["snapshot", snap.to_str().unwrap()]);
    assert!(reply.contains(r#""state":"running""#), "{reply}");
    eprintln!("snapshot of the booted 256M guest: {reply}");
    drop(agent);
    assert!(common::ctl(&a_sock, "stop").contains("stopping"));
    assert_eq!(a.wait_exit(BOOT).code(), Some(0));

    let t0 = Instant::now();
    let mut b = Vm::start(&[
        "--restore",
        snap.to_str().unwrap(),
        "--control-socket",
        b_sock.to_str().unwrap(),
        "--log-level",
        "info",
    ]);
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
    assert_eq!(
        sha(&mut agent, "sha256sum /tmp/before"),
        before,
        "the file in tmpfs"
    );
    // Not cached before the snapshot: the guest reads it from the disk now.
    let sum = sha(&mut agent, "head -c 65536 /dev/vda | sha256sum");
    assert!(sum.starts_with(&vda_sha), "the disk reads: {sum:?}");
    eprintln!("checks after the restore done at {:?}", t0.elapsed());
    let up2 = guest_uptime(&mut agent);
    assert!(
        up2 > up1 && up2 < up1 + 120.0,
        "the guest's clock goes on: {up1} then {up2}"
    );
    let echo = agent
        .exec(
            &["sh".into(), "-c".into(), "echo $((6*7))".into()],
            &[],
            BOOT,
        )
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&echo.stdout), "42\n");
    let status = common::ctl(&b_sock, "status");
    assert!(status.contains(r#""vcpus":2"#), "{status}");
    agent.write_file("/tmp/vme-done", b"", None).unwrap();
    b.wait_for("VME-RUN-EXIT status=0", BOOT);
    assert_eq!(b.wait_exit(BOOT).code(), Some(0));
    eprintln!("powered off at {:?} after the restore", t0.elapsed());
    let _ = std::fs::remove_dir_all(&dir);
}

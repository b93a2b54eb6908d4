//! The Debian root disk (`images/build.sh debian`): our minimal x86_64 kernel boots Debian 12's
//! userland from virtio-blk, with no initramfs, through the image's `/sbin/vme-init`, and the
//! guest agent in the image answers. One PVH boot (1 vCPU, 256M), in every `make test`: on PVM
//! hosts it takes minutes, on VT-x/AMD-V hosts seconds.

mod common;

use common::{Vm, image, kvm_available, on_pvm_host, random_bytes, sha256_hex, temp_dir};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};
use vme_api::agent::AgentClient;

/// Generous for PVM hosts.
const BOOT: Duration = Duration::from_secs(40 * 60);

/// Where the guest writes the file that must reach the disk.
const PERSIST: &str = "/root/vme-persist";

#[test]
fn debian_root_disk_boots_with_the_minimal_kernel() {
    if !kvm_available() {
        return;
    }
    let dir = temp_dir("x86debian");
    // The guest writes to its root: give it a scratch copy (sparse, like the original).
    let disk = dir.join("rootfs.ext4");
    run(Command::new("cp")
        .arg("--sparse=always")
        .arg(image("debian", "rootfs.ext4"))
        .arg(&disk));
    let kernel = image("tiny", "vmlinux");
    let (ctl, uds) = (dir.join("ctl.sock"), dir.join("v.sock"));
    // The shared init runs vme.run with Debian's /bin/sh; this one keeps the guest up until
    // the host stops it.
    let cmdline = "console=ttyS0 quiet panic=-1 root=/dev/vda rw init=/sbin/vme-init \
                   vme.run=\"while :; do sleep 60; done\"";
    let disk_arg = format!("path={}", disk.display());
    let vsock_arg = format!("cid=3,uds={}", uds.display());
    let args = [
        "--kernel",
        kernel.to_str().unwrap(),
        "--vcpus",
        "1",
        "--memory",
        "256M",
        "--cmdline",
        cmdline,
        "--disk",
        &disk_arg,
        "--vsock",
        &vsock_arg,
        "--control-socket",
        ctl.to_str().unwrap(),
    ];
    let started = Instant::now();
    let mut vm = Vm::start(&args);
    let ready = vm.wait_for("VME-GUEST-READY", BOOT);
    eprintln!(
        "Debian root disk: {} after {:.1} s",
        ready.trim(),
        started.elapsed().as_secs_f64()
    );
    let mut agent = AgentClient::wait(&uds, BOOT).expect("the guest agent in the image answers");
    // Guest commands are slow on PVM hosts.
    agent.set_timeout(Some(BOOT)).unwrap();

    let version = agent.read_file("/etc/debian_version").unwrap();
    assert!(
        version.starts_with(b"12"),
        "the root is Debian 12: /etc/debian_version is {:?}",
        String::from_utf8_lossy(&version)
    );
    check_root_is_vda(&mut agent);

    // What `sync` has returned for must be on the disk: the host stops the VM right after it
    // (no unmount, no shutdown in the guest), then reads its copy of the disk.
    let data = random_bytes(64 << 10);
    agent.write_file(PERSIST, &data, None).unwrap();
    let sum = agent
        .exec(&["sha256sum".into(), PERSIST.into()], &[], BOOT)
        .unwrap();
    assert_eq!(sum.code, Some(0), "sha256sum in the guest: {sum:?}");
    let guest_sum = String::from_utf8_lossy(&sum.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string();
    let host_sum = sha256_hex(&data);
    if guest_sum != host_sum {
        let msg = format!(
            "the file changed on its way over vsock: guest SHA-256 {guest_sum:?}, host {host_sum}"
        );
        // The vsock issue x86_linux.rs reports on PVM hosts; the disk check below then
        // compares with what the guest wrote.
        assert!(on_pvm_host(), "{msg}");
        eprintln!("KNOWN ISSUE on PVM hosts: {msg}");
    }
    let synced = agent.exec(&["sync".into()], &[], BOOT).unwrap();
    assert_eq!(synced.code, Some(0), "sync in the guest: {synced:?}");

    let status = common::ctl(&ctl, "status");
    eprintln!("status before the stop: {status}");
    common::ctl(&ctl, "stop");
    assert_eq!(
        vm.wait_exit(BOOT).code(),
        Some(0),
        "{}",
        vm.stderr.lock().unwrap()
    );
    eprintln!(
        "boot, checks and stop took {:.1} s",
        started.elapsed().as_secs_f64()
    );

    check_disk(&disk, &guest_sum);
    let _ = std::fs::remove_dir_all(&dir);
}

/// The kernel mounted `/dev/vda` as the root, ext4, read-write. `/proc/mounts` names it
/// `/dev/root` (the kernel's name for the device it mounts itself), so the device is matched
/// by number against vda's.
fn check_root_is_vda(agent: &mut AgentClient) {
    let mounts = String::from_utf8(agent.read_file("/proc/mounts").unwrap()).unwrap();
    let root = mounts
        .lines()
        .rfind(|l| l.split_whitespace().nth(1) == Some("/"))
        .unwrap_or_else(|| panic!("no / in the guest's /proc/mounts:\n{mounts}"));
    let f: Vec<&str> = root.split_whitespace().collect();
    assert!(
        f[2] == "ext4" && f[3].split(',').any(|o| o == "rw"),
        "/ is ext4 and read-write: {root}"
    );
    let vda = String::from_utf8(agent.read_file("/sys/block/vda/dev").unwrap()).unwrap();
    let info = String::from_utf8(agent.read_file("/proc/self/mountinfo").unwrap()).unwrap();
    // mountinfo: ID PARENT MAJOR:MINOR ROOT MOUNTPOINT ...
    let dev = info
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .filter(|f| f.get(4) == Some(&"/"))
        .map(|f| f[2].to_string())
        .next_back();
    assert_eq!(
        dev.as_deref(),
        Some(vda.trim()),
        "/ is mounted from vda ({}):\n{info}",
        vda.trim()
    );
    eprintln!("guest root: {root} (device {})", vda.trim());
}

/// The host's copy after the stop: the journal replayed as the next mount would, the file system
/// without errors, and the file the guest synced in it.
fn check_disk(disk: &Path, guest_sum: &str) {
    let replay = Command::new("e2fsck")
        .args(["-f", "-p"])
        .arg(disk)
        .output()
        .expect("run e2fsck (apt-get install e2fsprogs)");
    // 0: clean; 1: the journal was replayed (or something fixed). More is damage.
    assert!(
        matches!(replay.status.code(), Some(0 | 1)),
        "e2fsck finds errors on the disk the guest left: {replay:?}"
    );
    run(Command::new("e2fsck").args(["-f", "-n"]).arg(disk));
    let out = Command::new("debugfs")
        .args(["-R", &format!("cat {PERSIST}")])
        .arg(disk)
        .output()
        .expect("run debugfs (apt-get install e2fsprogs)");
    assert!(out.status.success(), "debugfs: {out:?}");
    assert_eq!(
        sha256_hex(&out.stdout),
        guest_sum,
        "{PERSIST} on the host's copy of the disk ({} bytes) is what the guest synced; debugfs: {}",
        out.stdout.len(),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Runs a host command; fails the test with its output unless it succeeds.
fn run(cmd: &mut Command) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

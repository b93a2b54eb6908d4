//! virtio-balloon end to end on the riscv64 software machine: the real Linux driver, the real
//! `vme-vmm` binary and its control socket, and the monitor's resident memory as the host
//! sees it (/proc/PID/status). These run on every host (no KVM).
//!
//! The guest runs its interactive shell and the test types commands into its console (stdin
//! of the monitor), so the host can act between guest steps. Markers are printed with shell
//! arithmetic (`DONE-$((1+1))` prints `DONE-2`), so the echo of the typed line never matches.

mod common;

use common::{Vm, ctl_words as ctl, image, temp_dir};
use std::path::PathBuf;
use std::time::{Duration, Instant};
use vme_api::control::{BalloonStatus, Request, call};

const MIB: u64 = 1 << 20;
/// Generous for an interpreted guest on a loaded 2-core host.
const TIMEOUT: Duration = Duration::from_secs(300);

/// A monitor running the tiny riscv64 image's shell, with its console on our pipes.
struct Guest {
    vm: Vm,
    sock: PathBuf,
    dir: PathBuf,
}

impl Guest {
    fn start(tag: &str, extra: &[&str]) -> Guest {
        let dir = temp_dir(tag);
        let sock = dir.join("ctl.sock");
        let (k, i) = (
            image("tiny-riscv64", "Image"),
            image("tiny-riscv64", "initramfs.cpio"),
        );
        let (k, i, s) = (
            k.to_str().unwrap(),
            i.to_str().unwrap(),
            sock.to_str().unwrap(),
        );
        let mut args = vec![
            "--arch",
            "riscv64",
            "--memory",
            "256M",
            "--vcpus",
            "1",
            "--kernel",
            k,
            "--initrd",
            i,
            "--cmdline",
            "console=ttyS0 quiet panic=-1",
            "--control-socket",
            s,
            "--balloon",
            "on",
        ];
        args.extend_from_slice(extra);
        let mut g = Guest {
            vm: Vm::start_interactive(&args),
            sock,
            dir,
        };
        g.wait_for("VME-GUEST-READY");
        g
    }

    fn fail(&mut self, why: &str) -> ! {
        self.vm.fail(why)
    }

    fn wait_for(&mut self, needle: &str) {
        self.vm.wait_for(needle, TIMEOUT);
    }

    /// Types a command line into the guest's shell.
    fn type_line(&mut self, line: &str) {
        self.vm.type_line(line);
    }

    /// The monitor's resident memory.
    fn rss(&self) -> u64 {
        let s = std::fs::read_to_string(format!("/proc/{}/status", self.vm.pid()))
            .expect("read the monitor's /proc status");
        let kib: u64 = s
            .lines()
            .find(|l| l.starts_with("VmRSS:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .expect("VmRSS in /proc/PID/status");
        kib * 1024
    }

    fn request(&mut self, req: Request) -> BalloonStatus {
        match call(&self.sock, &req, Duration::from_secs(30)) {
            Ok(r) if r.ok && r.balloon.is_some() => r.balloon.unwrap(),
            other => self.fail(&format!("{req:?}: {other:?}")),
        }
    }

    /// Polls `balloon-stats` until `done` holds; returns the status and the time it took.
    fn until(
        &mut self,
        what: &str,
        done: impl Fn(&BalloonStatus) -> bool,
    ) -> (BalloonStatus, Duration) {
        let start = Instant::now();
        loop {
            let b = self.request(Request::BalloonStats);
            if done(&b) {
                return (b, start.elapsed());
            }
            if start.elapsed() > TIMEOUT {
                self.fail(&format!(
                    "{what} did not happen within {TIMEOUT:?}; last: {b:?}"
                ));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn stop(mut self) {
        let r = call(&self.sock, &Request::Stop, Duration::from_secs(10));
        assert!(r.is_ok_and(|r| r.ok));
        self.vm.wait_exit(Duration::from_secs(30));
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Makes the guest touch `mib` MiB in a tmpfs file and delete it again: free in the guest,
/// still resident in the host.
const FILL: &str = "mkdir -p /mnt && mount -t tmpfs -o size=230M t /mnt && \
                    dd if=/dev/zero of=/mnt/f bs=1M count=200 2>/dev/null && echo FILLED-$((1+1))";

#[test]
fn inflating_returns_guest_memory_to_the_host_and_deflating_gives_it_back() {
    // Without free page reporting, so only the balloon gives memory back.
    let mut g = Guest::start("balloon", &["--free-page-reporting", "off"]);
    let first = g.request(Request::BalloonStats);
    assert!(first.driver_ready, "{first:?}");
    let stats = first.stats.expect("the guest's first statistics");
    let total = stats.total_bytes.expect("total memory");
    assert!(total > 200 * MIB && total <= 256 * MIB, "{stats:?}");
    for v in [
        stats.free_bytes,
        stats.available_bytes,
        stats.disk_caches_bytes,
    ] {
        assert!(v.expect("guest statistic") <= total, "{stats:?}");
    }
    assert!(stats.free_bytes.unwrap() > 150 * MIB, "{stats:?}");

    g.type_line(FILL);
    g.wait_for("FILLED-2");
    let full = g.request(Request::BalloonStats);
    let free_full = full.stats.as_ref().and_then(|s| s.free_bytes).unwrap();
    assert!(free_full < 80 * MIB, "the file uses the memory: {full:?}");
    g.type_line("rm /mnt/f && echo REMOVED-$((2+2))");
    g.wait_for("REMOVED-4");
    let before = g.rss();
    assert!(
        before > 200 * MIB,
        "the guest touched its memory: RSS {before}"
    );

    let (ok, out) = ctl(&g.sock, &["balloon", "128"]);
    assert!(ok, "{out}");
    let (inflated, took) = g.until("inflating to 128 MiB", |b| b.actual_bytes == 128 * MIB);
    let after = g.rss();
    assert!(inflated.inflated_pages >= 128 * MIB / 4096, "{inflated:?}");
    assert_eq!(inflated.refused_pages, 0);
    assert!(
        before.saturating_sub(after) >= 128 * MIB / 3,
        "RSS {} MiB before, {} MiB after inflating 128 MiB",
        before / MIB,
        after / MIB
    );
    let free_inflated = inflated.stats.as_ref().and_then(|s| s.free_bytes).unwrap();
    assert!(
        free_inflated < 150 * MIB,
        "the balloon holds guest memory: {inflated:?}"
    );
    eprintln!(
        "riscv64 balloon: RSS {} MiB -> {} MiB after inflating 128 MiB in {:.2} s (vmm_rss_bytes {} MiB)",
        before / MIB,
        after / MIB,
        took.as_secs_f64(),
        inflated.vmm_rss_bytes.unwrap_or(0) / MIB
    );

    // Over the guest's size: refused, and the target stays.
    let (ok, out) = ctl(&g.sock, &["balloon", "300"]);
    assert!(!ok && out.contains("at most 256"), "{out}");

    let (ok, out) = ctl(&g.sock, &["balloon", "0"]);
    assert!(ok, "{out}");
    let (deflated, took) = g.until("deflating", |b| b.actual_bytes == 0);
    assert!(deflated.deflated_pages >= 128 * MIB / 4096, "{deflated:?}");
    eprintln!(
        "riscv64 balloon: deflated 128 MiB in {:.2} s",
        took.as_secs_f64()
    );
    // The guest can use all of it again.
    g.type_line("dd if=/dev/zero of=/mnt/f bs=1M count=200 2>/dev/null && echo REFILLED-$((3+3))");
    g.wait_for("REFILLED-6");
    let refilled = g.rss();
    assert!(
        refilled > after + 64 * MIB,
        "RSS {} MiB after refilling",
        refilled / MIB
    );
    g.stop();
}

#[test]
fn free_page_reporting_returns_freed_memory_without_a_target() {
    let mut g = Guest::start("balloon-fpr", &[]);
    g.type_line(FILL);
    g.wait_for("FILLED-2");
    let peak = g.rss();
    assert!(peak > 200 * MIB, "RSS {peak}");
    g.type_line("rm /mnt/f && echo REMOVED-$((2+2))");
    g.wait_for("REMOVED-4");
    let start = Instant::now();
    let (b, _) = g.until("free page reporting", |b| b.reported_bytes >= 128 * MIB);
    // Reporting runs a few seconds after pages are freed; give the last block time to land.
    let deadline = Instant::now() + Duration::from_secs(60);
    while g.rss() > peak - 128 * MIB && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
    }
    let after = g.rss();
    eprintln!(
        "riscv64 free page reporting: RSS {} MiB -> {} MiB within {:.1} s of freeing 200 MiB, {} MiB reported",
        peak / MIB,
        after / MIB,
        start.elapsed().as_secs_f64(),
        b.reported_bytes / MIB
    );
    assert!(
        after + 128 * MIB <= peak,
        "RSS {} MiB -> {} MiB",
        peak / MIB,
        after / MIB
    );
    assert_eq!((b.target_bytes, b.actual_bytes), (0, 0));
    g.stop();
}

#[test]
fn balloon_commands_without_a_balloon_say_how_to_get_one() {
    let dir = temp_dir("no-balloon");
    let sock = dir.join("ctl.sock");
    let (k, i) = (
        image("tiny-riscv64", "Image"),
        image("tiny-riscv64", "initramfs.cpio"),
    );
    let mut vm = common::Vm::start(&[
        "--arch",
        "riscv64",
        "--kernel",
        k.to_str().unwrap(),
        "--initrd",
        i.to_str().unwrap(),
        "--memory",
        "128M",
        "--control-socket",
        sock.to_str().unwrap(),
        "--cmdline",
        "console=ttyS0 quiet panic=-1 vme.run=\"sleep 600\"",
    ]);
    vm.wait_for("VME-GUEST-READY", TIMEOUT);
    let (ok, out) = ctl(&sock, &["balloon", "64"]);
    assert!(!ok && out.contains("--balloon on"), "{out}");
    let (ok, out) = ctl(&sock, &["balloon-stats"]);
    assert!(!ok && out.contains("--balloon on"), "{out}");
    let (ok, _) = ctl(&sock, &["stop"]);
    assert!(ok);
    vm.wait_exit(Duration::from_secs(30));
    let _ = std::fs::remove_dir_all(&dir);
}

//! Rate limits end to end on the riscv64 software machine: the guest reads a disk limited to
//! 2 MiB/s and must not see more, while the same read unlimited is faster. Times are the
//! guest's own (/proc/uptime), so a loaded host can only make the limited run look slower,
//! never faster: the bound checked cannot flake the wrong way.

mod common;

use common::{Vm, riscv_tiny_args, temp_dir};
use std::time::Duration;

const TIMEOUT: Duration = Duration::from_secs(120);
const MIB: u64 = 1 << 20;
/// Bytes the guest reads.
const READ: u64 = 6 * MIB;
const LIMIT: u64 = 2 * MIB;

/// Seconds of guest uptime printed as a `TAG=<uptime>` line.
fn seconds(vm: &mut Vm, tag: &str) -> f64 {
    let line = vm.wait_for(&format!("{tag}="), TIMEOUT);
    let rest = line.split_once(&format!("{tag}=")).unwrap().1;
    rest.split_whitespace().next().unwrap().parse().unwrap()
}

/// Boots a guest with `disk` that reads READ bytes of it; returns the guest's seconds.
fn timed_read(disk: &str) -> f64 {
    let run = "echo T0=$(cut -d' ' -f1 /proc/uptime); \
               dd if=/dev/vda of=/dev/null bs=64k count=96 2>/dev/null; echo RC=$?; \
               echo T1=$(cut -d' ' -f1 /proc/uptime)";
    let mut args = riscv_tiny_args("1", "128M", &format!("vme.run=\"{run}\""));
    args.extend(["--disk".to_string(), disk.to_string()]);
    let mut vm = Vm::start(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let t0 = seconds(&mut vm, "T0");
    assert!(vm.wait_for("RC=", TIMEOUT).contains("RC=0"), "dd failed");
    let t1 = seconds(&mut vm, "T1");
    vm.wait_for("VME-RUN-EXIT status=0", TIMEOUT);
    assert_eq!(vm.wait_exit(TIMEOUT).code(), Some(0));
    t1 - t0
}

#[test]
fn a_disk_limited_to_2_mib_per_second_reads_no_faster() {
    let dir = temp_dir("limits");
    let img = dir.join("d.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(16 * MIB)
        .unwrap();
    let path = img.to_str().unwrap();
    let free = timed_read(&format!("path={path},readonly=on"));
    let limited = timed_read(&format!("path={path},readonly=on,bw=2M"));
    let rate = |s: f64| READ as f64 / s.max(0.01) / MIB as f64;
    eprintln!(
        "riscv64 virtio-blk read of 6 MiB: unlimited {free:.2} s ({:.1} MiB/s), bw=2M {limited:.2} s ({:.2} MiB/s)",
        rate(free),
        rate(limited)
    );
    // 100 ms of burst and readahead allow a little above 2 MiB/s; without a limiter the read
    // runs at the unlimited rate.
    assert!(
        rate(limited) < 2.5,
        "the limited disk read at {:.2} MiB/s, above its 2 MiB/s limit",
        rate(limited)
    );
    assert!(
        limited > 2.5,
        "6 MiB at 2 MiB/s took {limited:.2} s, less than 2.5 s"
    );
    // Shows the test can tell the difference on this host (a very slow host could not).
    if rate(free) < 2.0 * LIMIT as f64 / MIB as f64 {
        eprintln!("note: unlimited reads here are too slow for the comparison to mean much");
    } else {
        assert!(
            free < limited,
            "unlimited {free:.2} s vs limited {limited:.2} s"
        );
    }
}

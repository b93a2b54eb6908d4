//! Rate limits end to end on the riscv64 software machine: the guest reads a disk limited to
//! 2 MiB/s and must not see more, while the same read unlimited is faster. Times are the
//! guest's own (/proc/uptime), so a loaded host can only make the limited run look slower,
//! never faster: the bound checked cannot flake the wrong way. A limit changed with `set-limit`
//! while the guest reads takes effect in the same boot.

mod common;

use common::{Vm, ctl_words, riscv_tiny_args, temp_dir};
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

#[test]
fn set_limit_raises_a_disk_limit_while_the_guest_reads_and_refuses_bad_input() {
    let dir = temp_dir("set-limit");
    let data = dir.join("d.img");
    std::fs::File::create(&data)
        .unwrap()
        .set_len(16 * MIB)
        .unwrap();
    // The guest waits for "GO" in the first bytes of this second disk: the host writes it
    // once the new limit is in force, so the test does not depend on timing.
    let go = dir.join("go.img");
    std::fs::write(&go, vec![0u8; 4096]).unwrap();
    let sock = dir.join("ctl.sock");
    // 2 MiB at 1 MiB/s, then (after GO) the next 2 MiB; reads bypass the guest's cache.
    let run = "echo P1T0=$(cut -d' ' -f1 /proc/uptime); \
               dd if=/dev/vda of=/dev/null bs=64k count=32 iflag=direct 2>/dev/null; \
               echo P1T1=$(cut -d' ' -f1 /proc/uptime); \
               until [ x$(dd if=/dev/vdb bs=512 count=1 iflag=direct 2>/dev/null | head -c 2) = xGO ]; \
               do sleep 0.1; done; \
               echo P2T0=$(cut -d' ' -f1 /proc/uptime); \
               dd if=/dev/vda of=/dev/null bs=64k count=32 skip=32 iflag=direct 2>/dev/null; \
               echo P2T1=$(cut -d' ' -f1 /proc/uptime)";
    let mut args = riscv_tiny_args("1", "128M", &format!("vme.run=\"{run}\""));
    args.extend([
        "--disk".into(),
        format!("path={},readonly=on,bw=1M", data.display()),
        "--disk".into(),
        format!("path={},readonly=on", go.display()),
        "--control-socket".into(),
        sock.to_str().unwrap().into(),
    ]);
    let mut vm = Vm::start(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let p1 = seconds(&mut vm, "P1T0");

    // While the guest reads at 1 MiB/s: status names the devices; bad input is refused with
    // a message that says what to do, and changes nothing.
    let (ok, out) = ctl_words(&sock, &["status"]);
    assert!(ok, "{out}");
    assert!(
        out.contains(r#"{"name":"disk0","backend":"#)
            && out.contains(r#""limits":{"kind":"disk","bw":"1M"}"#),
        "{out}"
    );
    assert!(out.contains(r#"{"name":"disk1""#), "{out}");
    for (words, why) in [
        (&["set-limit", "disk0", "bw=1"][..], "between 4K and 1T"),
        (&["set-limit", "disk0", "rx_bw=8M"], "not a limit of a disk"),
        (&["set-limit", "disk0", "bw=8M,iops=0"], "between 1 and"),
        (&["set-limit", "disk0", "fast"], "write KEY=VALUE"),
        (&["set-limit", "disk7", "bw=8M"], "this VM has disk0, disk1"),
        (&["set-limit", "disk0"], "set-limit disk0 bw=20M"),
    ] {
        let (ok, out) = ctl_words(&sock, words);
        assert!(!ok, "{words:?} was accepted: {out}");
        assert!(out.contains(why), "{words:?}: {out}");
    }
    let (_, out) = ctl_words(&sock, &["status"]);
    assert!(
        out.contains(r#""limits":{"kind":"disk","bw":"1M"}"#),
        "{out}"
    );

    let slow = seconds(&mut vm, "P1T1") - p1;
    let (ok, out) = ctl_words(&sock, &["set-limit", "disk0", "bw=64M"]);
    assert!(ok, "{out}");
    assert!(
        out.contains(r#""device":{"name":"disk0""#) && out.contains(r#""bw":"64M""#),
        "{out}"
    );
    let mut f = std::fs::OpenOptions::new().write(true).open(&go).unwrap();
    std::io::Write::write_all(&mut f, b"GO").unwrap();
    f.sync_all().unwrap();
    let p2 = seconds(&mut vm, "P2T0");
    let fast = seconds(&mut vm, "P2T1") - p2;
    vm.wait_for("VME-RUN-EXIT status=0", TIMEOUT);
    assert_eq!(vm.wait_exit(TIMEOUT).code(), Some(0));

    let rate = |s: f64| 2.0 / s.max(0.01);
    eprintln!(
        "riscv64 virtio-blk, 2 MiB at bw=1M: {slow:.2} s ({:.2} MiB/s); after set-limit bw=64M: \
         {fast:.2} s ({:.2} MiB/s)",
        rate(slow),
        rate(fast)
    );
    // Guest times: a loaded host only slows the fast phase, it cannot speed up the slow one.
    assert!(
        rate(slow) < 1.25,
        "the 1 MiB/s disk read at {:.2} MiB/s",
        rate(slow)
    );
    // At the old limit the second 2 MiB would take as long as the first.
    assert!(
        rate(fast) > 1.25,
        "after raising the limit to 64 MiB/s the read ran at {:.2} MiB/s, no faster than the \
         old 1 MiB/s",
        rate(fast)
    );
    let _ = std::fs::remove_dir_all(&dir);
}

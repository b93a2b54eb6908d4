//! Thin clones end to end on the riscv64 software machine (no KVM): ten overlays of one
//! 1 GiB base made by `vme_api::overlay::thin_clone` cost almost no host disk; real guests
//! boot with them (`--disk path=OVL,base=BASE`), a write in one is invisible to another and
//! to the base, survives a `kill -9` of its monitor once the guest flushed, and is lost —
//! the base shows again — when the guest did not flush.

mod common;

use common::{Vm, riscv_tiny_args, temp_dir};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use vme_api::overlay::{CloneKind, thin_clone};

const TIMEOUT: Duration = Duration::from_secs(300);
const GIB: u64 = 1 << 30;
const MIB: u64 = 1 << 20;
/// Where guest A writes its flushed marker (inside a cluster: copy-on-write of the rest).
const MARK_AT: u64 = 300 * MIB + 100;
/// Where guest A writes a sector with O_DIRECT and no flush.
const LOST_AT: u64 = 400 * MIB;

/// A 1 GiB base whose every MiB starts with 4 KiB of `BASE-MIB-NNNN;` (the rest sparse).
fn make_base(path: &Path) {
    let f = std::fs::File::create(path).unwrap();
    f.set_len(GIB).unwrap();
    for mib in 0..GIB / MIB {
        let text = format!("BASE-MIB-{mib:04};").repeat(4096 / 14 + 1);
        f.write_all_at(&text.as_bytes()[..4096], mib * MIB).unwrap();
    }
    f.sync_all().unwrap();
}

fn base_bytes(path: &Path, off: u64, len: usize) -> String {
    let mut v = vec![0u8; len];
    std::fs::File::open(path)
        .unwrap()
        .read_exact_at(&mut v, off)
        .unwrap();
    String::from_utf8(v).unwrap()
}

fn allocated_bytes(paths: &[PathBuf]) -> u64 {
    paths
        .iter()
        .map(|p| std::fs::metadata(p).unwrap().blocks() * 512)
        .sum()
}

fn boot(ovl: &Path, base: &Path, run: &str) -> Vm {
    let mut args = riscv_tiny_args("1", "128M", &format!("vme.run=\"{run}\""));
    args.extend([
        "--disk".to_string(),
        format!("path={},base={}", ovl.display(), base.display()),
    ]);
    Vm::start(&args.iter().map(String::as_str).collect::<Vec<_>>())
}

/// The value the guest printed as `TAG=value`.
fn value(vm: &mut Vm, tag: &str) -> String {
    let line = vm.wait_for(&format!("{tag}="), TIMEOUT);
    line.split_once(&format!("{tag}="))
        .unwrap()
        .1
        .trim()
        .to_string()
}

#[test]
fn ten_thin_clones_of_a_gib_stay_small_and_apart() {
    let dir = temp_dir("overlay");
    let base = dir.join("base.raw");
    make_base(&base);

    let started = Instant::now();
    let ovls: Vec<PathBuf> = (0..10).map(|i| dir.join(format!("vm{i}.ovl"))).collect();
    for o in &ovls {
        let kind = thin_clone(&base, o, [0; 32]).unwrap();
        assert_eq!(
            kind,
            CloneKind::Overlay,
            "this test's files are on ext4 or tmpfs"
        );
    }
    let took = started.elapsed();
    let extra = allocated_bytes(&ovls);
    eprintln!(
        "10 thin clones of a 1 GiB base: {:.1} ms, {} KiB of host disk",
        took.as_secs_f64() * 1e3,
        extra / 1024
    );
    assert!(extra < 100 * MIB, "10 clones use {extra} bytes");

    // VM A: sees the base through its overlay, writes a marker and flushes (fsync of a block
    // device sends FLUSH; sync(1) alone does not), then writes a sector with O_DIRECT and
    // does not flush; its monitor is then killed (-9).
    let mut a = boot(
        &ovls[0],
        &base,
        &format!(
            "echo SIZE=$(cat /sys/block/vda/size); \
             echo BASE=$(dd if=/dev/vda bs=1M skip=700 count=1 2>/dev/null | head -c 14); \
             printf VME-MARK-A | dd of=/dev/vda bs=1 seek={MARK_AT} conv=notrunc,fsync \
             2>/dev/null; echo FLUSHED=$?; \
             printf VME-LOST | dd of=/dev/vda bs=512 seek={} count=1 conv=sync,notrunc \
             oflag=direct 2>/dev/null; echo DIRECT=$?; sleep 600",
            LOST_AT / 512
        ),
    );
    assert_eq!(value(&mut a, "SIZE"), (GIB / 512).to_string());
    assert_eq!(value(&mut a, "BASE"), "BASE-MIB-0700;");
    assert_eq!(value(&mut a, "FLUSHED"), "0");
    assert_eq!(value(&mut a, "DIRECT"), "0");
    drop(a); // SIGKILL: no clean end, nothing recorded after the last FLUSH

    // The base never changes; A's overlay holds a few clusters.
    let base_mark = base_bytes(&base, MARK_AT, 10);
    assert_eq!(base_mark, "SE-MIB-030");
    let a_used = allocated_bytes(&ovls[..1]);
    assert!(a_used < 4 * MIB, "A's overlay uses {a_used} bytes");

    // A again, and B (another overlay of the same base) at the same time.
    let read = format!(
        "echo MARK=$(dd if=/dev/vda bs=1 skip={MARK_AT} count=10 2>/dev/null); \
         echo LOST=$(dd if=/dev/vda bs=512 skip={} count=1 2>/dev/null | head -c 14)",
        LOST_AT / 512
    );
    let mut a = boot(&ovls[0], &base, &read);
    let mut b = boot(&ovls[1], &base, &read);
    assert_eq!(
        value(&mut a, "MARK"),
        "VME-MARK-A",
        "flushed: kept across kill -9"
    );
    assert_eq!(
        value(&mut a, "LOST"),
        "BASE-MIB-0400;",
        "not flushed: the cluster reads from the base again"
    );
    assert_eq!(value(&mut b, "MARK"), base_mark, "B does not see A's write");
    assert_eq!(value(&mut b, "LOST"), "BASE-MIB-0400;");
    for vm in [&mut a, &mut b] {
        vm.wait_for("VME-RUN-EXIT status=0", TIMEOUT);
        let status = vm.wait_exit(TIMEOUT);
        assert_eq!(status.code(), Some(0), "{}", vm.stderr.lock().unwrap());
    }
    assert_eq!(base_bytes(&base, MARK_AT, 10), base_mark);

    // A clean power-off records what the guest wrote even without a FLUSH.
    let mut a = boot(
        &ovls[0],
        &base,
        &format!(
            "printf VME-CLEAN | dd of=/dev/vda bs=512 seek={} count=1 conv=sync,notrunc \
             oflag=direct 2>/dev/null; echo DIRECT=$?",
            LOST_AT / 512
        ),
    );
    assert_eq!(value(&mut a, "DIRECT"), "0");
    a.wait_for("VME-RUN-EXIT status=0", TIMEOUT);
    assert_eq!(a.wait_exit(TIMEOUT).code(), Some(0));
    let mut a = boot(&ovls[0], &base, &read);
    assert_eq!(value(&mut a, "MARK"), "VME-MARK-A");
    assert_eq!(value(&mut a, "LOST"), "VME-CLEAN");
    a.wait_for("VME-RUN-EXIT status=0", TIMEOUT);
    assert_eq!(a.wait_exit(TIMEOUT).code(), Some(0));

    let extra = allocated_bytes(&ovls);
    eprintln!(
        "after the writes: {} KiB of host disk for the 10 overlays",
        extra / 1024
    );
    assert!(extra < 100 * MIB);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_wrong_base_is_refused_before_the_guest_runs() {
    let dir = temp_dir("overlay-wrong");
    let base = dir.join("base.raw");
    std::fs::write(&base, vec![0x11u8; 4 * MIB as usize]).unwrap();
    let ovl = dir.join("vm.ovl");
    thin_clone(&base, &ovl, [0; 32]).unwrap();
    let other = dir.join("other.raw");
    std::fs::write(&other, vec![0x22u8; 4 * MIB as usize]).unwrap();
    let args = riscv_tiny_args("1", "64M", "");
    let disk = format!("path={},base={}", ovl.display(), other.display());
    let mut all: Vec<&str> = args.iter().map(String::as_str).collect();
    all.extend(["--disk", &disk]);
    let (status, stderr) = common::run_to_end(&all);
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("is not the one overlay") && stderr.contains("contents differ"),
        "{stderr}"
    );
    // A raw image given as an overlay.
    let disk = format!("path={},base={}", base.display(), other.display());
    let mut all: Vec<&str> = args.iter().map(String::as_str).collect();
    all.extend(["--disk", &disk]);
    let (status, stderr) = common::run_to_end(&all);
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("not a usable vme overlay"), "{stderr}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_snapshot_records_unflushed_overlay_writes() {
    let dir = temp_dir("overlay-snap");
    let base = dir.join("base.raw");
    let data: Vec<u8> = b"BASE-SECTOR;".repeat(16 * MIB as usize / 12);
    std::fs::write(&base, &data).unwrap();
    let ovl = dir.join("vm.ovl");
    thin_clone(&base, &ovl, [0; 32]).unwrap();
    let sock = dir.join("ctl.sock");
    let snap = dir.join("snap");
    // The guest writes with O_DIRECT and never flushes; it reads the sector back (O_DIRECT:
    // from the device) after the snapshot was taken and this monitor killed, in the
    // restored one.
    let mut args = riscv_tiny_args(
        "1",
        "128M",
        "vme.run=\"printf VME-SNAP | dd of=/dev/vda bs=512 seek=2049 count=1 \
         conv=sync,notrunc oflag=direct 2>/dev/null; echo DIRECT=$?; sleep 10; \
         echo AFTER=$(dd if=/dev/vda bs=512 skip=2049 count=1 iflag=direct 2>/dev/null \
         | head -c 8)\"",
    );
    let disk = format!("path={},base={}", ovl.display(), base.display());
    args.extend(["--disk".into(), disk, "--control-socket".into()]);
    args.push(sock.display().to_string());
    let mut a = Vm::start(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(value(&mut a, "DIRECT"), "0");
    common::ctl_args(&sock, &["snapshot", snap.to_str().unwrap()]);
    drop(a); // kill -9: only the snapshot recorded the write
    let mut b = Vm::start(&["--restore", snap.to_str().unwrap()]);
    assert_eq!(
        value(&mut b, "AFTER"),
        "VME-SNAP",
        "{}",
        b.stderr.lock().unwrap()
    );
    b.wait_for("VME-RUN-EXIT status=0", TIMEOUT);
    assert_eq!(b.wait_exit(TIMEOUT).code(), Some(0));
    assert_eq!(std::fs::read(&base).unwrap(), data, "the base is unchanged");
    let _ = std::fs::remove_dir_all(&dir);
}

/// `mkfs.ext4 -d`: a 1 GiB ext4 image holding `hello.txt` and 4 MiB of random bytes.
fn make_ext4_base(dir: &Path) -> (PathBuf, String) {
    let src = dir.join("root");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("hello.txt"), "from-the-base\n").unwrap();
    let blob = common::random_bytes(4 * MIB as usize);
    std::fs::write(src.join("blob"), &blob).unwrap();
    let base = dir.join("base.ext4");
    let out = std::process::Command::new("mkfs.ext4")
        .args(["-q", "-F", "-d"])
        .arg(&src)
        .arg(&base)
        .arg("1G")
        .output()
        .expect("run mkfs.ext4 (e2fsprogs)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    (base, common::sha256_hex(&blob))
}

#[test]
fn an_ext4_base_mounts_through_overlays() {
    let dir = temp_dir("overlay-ext4");
    let (base, blob_sha) = make_ext4_base(&dir);
    let base_before = std::fs::read(&base).unwrap();
    let ovls: Vec<PathBuf> = (0..2).map(|i| dir.join(format!("vm{i}.ovl"))).collect();
    for o in &ovls {
        thin_clone(&base, o, [0; 32]).unwrap();
    }
    let look = "mkdir -p /mnt && mount -t ext4 /dev/vda /mnt && echo HELLO=$(cat /mnt/hello.txt) && \
                echo BLOB=$(sha256sum /mnt/blob | cut -c1-64) && \
                echo MARKER=$(cat /mnt/marker 2>/dev/null || echo none)";
    // A writes a file on the mounted file system; umount flushes it (ext4 sends FLUSH).
    let mut a = boot(
        &ovls[0],
        &base,
        &format!("{look} && echo vm-a > /mnt/marker && umount /mnt && echo UMOUNT=$?"),
    );
    assert_eq!(value(&mut a, "HELLO"), "from-the-base");
    assert_eq!(value(&mut a, "BLOB"), blob_sha);
    assert_eq!(value(&mut a, "MARKER"), "none");
    assert_eq!(value(&mut a, "UMOUNT"), "0");
    drop(a); // kill -9 after the umount
    let mut a = boot(&ovls[0], &base, look);
    let mut b = boot(&ovls[1], &base, look);
    assert_eq!(value(&mut a, "MARKER"), "vm-a", "A's file survived kill -9");
    assert_eq!(value(&mut b, "HELLO"), "from-the-base");
    assert_eq!(value(&mut b, "MARKER"), "none", "B does not see A's file");
    for vm in [&mut a, &mut b] {
        vm.wait_for("VME-RUN-EXIT status=0", TIMEOUT);
        assert_eq!(vm.wait_exit(TIMEOUT).code(), Some(0));
    }
    assert!(
        std::fs::read(&base).unwrap() == base_before,
        "the base is unchanged"
    );
    let used = allocated_bytes(&ovls);
    eprintln!(
        "ext4 base, 2 overlays after mounts and a write: {} KiB",
        used / 1024
    );
    assert!(used < 64 * MIB, "{used}");

    // A's volume flattened into a raw image: a clean ext4 holding A's file.
    let flat = dir.join("flat.ext4");
    vme_api::overlay::flatten(&ovls[0], &base, &flat).unwrap();
    let run = |cmd: &[&str]| {
        let out = std::process::Command::new(cmd[0])
            .args(&cmd[1..])
            .arg(&flat)
            .output()
            .expect("run e2fsprogs");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    let (code, fsck) = run(&["e2fsck", "-fn"]);
    assert_eq!(code, Some(0), "{fsck}");
    assert_eq!(run(&["debugfs", "-R", "cat /marker"]).1, "vm-a\n");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_guest_reboot_keeps_what_it_wrote_to_its_overlay() {
    let dir = temp_dir("overlay-reboot");
    let base = dir.join("base.raw");
    std::fs::write(&base, b"BASE-SECTOR;".repeat(MIB as usize / 12)).unwrap();
    let ovl = dir.join("vm.ovl");
    thin_clone(&base, &ovl, [0; 32]).unwrap();
    // First boot: writes without a flush and reboots; the restarted VM (a new device on the
    // same files, in the same monitor) finds the sector.
    let run = "M=$(dd if=/dev/vda bs=512 skip=8 count=1 iflag=direct 2>/dev/null | head -c 7); \
               case $M in VME-RBT) echo SEEN=$M;; *) echo FIRST=$M; \
               printf VME-RBT | dd of=/dev/vda bs=512 seek=8 count=1 conv=sync,notrunc \
               oflag=direct 2>/dev/null; reboot -f;; esac";
    let mut args = riscv_tiny_args("1", "128M", &format!("vme.run=\"{run}\""));
    let disk = format!("path={},base={}", ovl.display(), base.display());
    args.extend([
        "--disk".into(),
        disk,
        "--on-reboot".into(),
        "restart".into(),
    ]);
    let mut vm = Vm::start(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(value(&mut vm, "FIRST"), "-SECTOR", "byte 4096 of the base");
    assert_eq!(value(&mut vm, "SEEN"), "VME-RBT");
    vm.wait_for("VME-RUN-EXIT status=0", TIMEOUT);
    assert_eq!(vm.wait_exit(TIMEOUT).code(), Some(0));
    let _ = std::fs::remove_dir_all(&dir);
}

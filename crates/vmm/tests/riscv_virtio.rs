//! virtio-blk and virtio-rng end to end on the riscv64 software machine: real Linux drivers
//! over virtio-mmio, through the real `vme-vmm` binary. These run on every host (no KVM).

mod common;

use common::{Vm, image, riscv_tiny_args, temp_dir};
use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

/// Generous: hashing 64 MiB in the interpreted guest takes about a minute on its own.
const TIMEOUT: Duration = Duration::from_secs(600);

fn start(disks: &[String], run: &str) -> Vm {
    let mut args = riscv_tiny_args("1", "256M", &format!("vme.run=\"{run}\""));
    for d in disks {
        let d = if d.starts_with("path=") {
            d.clone()
        } else {
            format!("path={d}")
        };
        args.extend(["--disk".to_string(), d]);
    }
    Vm::start(&args.iter().map(String::as_str).collect::<Vec<_>>())
}

/// Runs the guest command to its end and checks the monitor exited cleanly.
fn finish(vm: &mut Vm) {
    vm.wait_for("VME-RUN-EXIT status=0", TIMEOUT);
    let status = vm.wait_exit(TIMEOUT);
    assert_eq!(status.code(), Some(0), "{}", vm.stderr.lock().unwrap());
}

/// An image of `size` bytes (sparse).
fn disk(dir: &Path, name: &str, size: u64) -> String {
    let p = dir.join(name);
    std::fs::File::create(&p).unwrap().set_len(size).unwrap();
    p.to_str().unwrap().to_string()
}

/// SHA-256 of the first `len` bytes of a file, by the host's sha256sum.
fn host_sha256(path: &str, len: usize) -> String {
    let data = std::fs::read(path).unwrap();
    let mut child = Command::new("sha256sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("run the host's sha256sum (coreutils)");
    child.stdin.take().unwrap().write_all(&data[..len]).unwrap();
    let out = child.wait_with_output().unwrap();
    String::from_utf8(out.stdout)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

/// The guest's `sha256sum` line for `-` (standard input), as printed on the console.
fn guest_sha256(vm: &mut Vm, tag: &str) -> String {
    let line = vm.wait_for(&format!("{tag}="), TIMEOUT);
    let rest = line.split_once(&format!("{tag}=")).unwrap().1;
    rest.split_whitespace().next().unwrap().to_string()
}

/// Seconds of guest uptime printed as `TAG=<uptime>` lines.
fn uptime(vm: &mut Vm, tag: &str) -> f64 {
    let line = vm.wait_for(&format!("{tag}="), TIMEOUT);
    let rest = line.split_once(&format!("{tag}=")).unwrap().1;
    rest.split_whitespace().next().unwrap().parse().unwrap()
}

#[test]
fn sixty_four_mib_written_in_one_vm_read_back_in_another() {
    let dir = temp_dir("virtio-64m");
    let img = disk(&dir, "data.img", 128 << 20);

    // VM A writes 64 MiB of guest randomness to the disk and powers off.
    let mut a = start(
        std::slice::from_ref(&img),
        "dd if=/dev/urandom of=/tmp/r bs=1M count=64 2>/dev/null; \
         echo T0=$(cut -d. -f1-2 /proc/uptime); \
         dd if=/tmp/r of=/dev/vda bs=1M 2>/dev/null; sync; \
         echo T1=$(cut -d. -f1-2 /proc/uptime)",
    );
    let t0 = uptime(&mut a, "T0");
    let t1 = uptime(&mut a, "T1");
    finish(&mut a);
    let want = host_sha256(&img, 64 << 20);
    assert_ne!(
        want,
        host_sha256(&disk(&dir, "zero.img", 64 << 20), 64 << 20),
        "VM A wrote nothing"
    );

    // VM B, a new process on the same file, reads it back.
    let mut b = start(
        std::slice::from_ref(&img),
        "echo T2=$(cut -d. -f1-2 /proc/uptime); \
         dd if=/dev/vda of=/dev/null bs=1M count=64 2>/dev/null; \
         echo T3=$(cut -d. -f1-2 /proc/uptime); \
         echo 3 > /proc/sys/vm/drop_caches; \
         echo SHA=$(dd if=/dev/vda bs=1M count=64 2>/dev/null | sha256sum)",
    );
    let t2 = uptime(&mut b, "T2");
    let t3 = uptime(&mut b, "T3");
    let got = guest_sha256(&mut b, "SHA");
    finish(&mut b);
    assert_eq!(got, want, "the guest read back what VM A wrote");
    eprintln!(
        "riscv64 virtio-blk, 64 MiB: guest write+sync {:.1} MB/s, guest read {:.1} MB/s (guest uptime clock)",
        64.0 * 1.048_576 / (t1 - t0).max(0.01),
        64.0 * 1.048_576 / (t3 - t2).max(0.01)
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn sizes_serials_read_only_disks_and_hwrng() {
    let dir = temp_dir("virtio-props");
    let big = disk(&dir, "big.img", 1 << 30);
    let ro = disk(&dir, "ro.img", 8 << 20);
    std::fs::write(&ro, vec![0xa5u8; 8 << 20]).unwrap();
    let mut vm = start(
        &[
            big.clone(),
            format!("path={ro},readonly=on,serial=ro-disk-1"),
        ],
        "echo SIZE=$(cat /sys/block/vda/size) RO=$(cat /sys/block/vdb/ro) \
         SERIAL=$(cat /sys/block/vdb/serial); \
         dd if=/dev/zero of=/dev/vdb bs=4k count=1 conv=fsync 2>/dev/null; echo WRITE=$?; \
         echo RNG=$(head -c 16 /dev/hwrng | hexdump | head -n 1); \
         dd if=/dev/zero of=/dev/vda bs=512 seek=2097151 count=1 2>/dev/null; echo LAST=$?; \
         dd if=/dev/zero of=/dev/vda bs=512 seek=2097152 count=1 2>/dev/null; echo PAST=$?",
    );
    let line = vm.wait_for("SIZE=", TIMEOUT);
    assert!(
        line.contains("SIZE=2097152 "),
        "a 1 GiB disk is 2097152 sectors: {line}"
    );
    assert!(line.contains("RO=1 "), "{line}");
    assert!(line.contains("SERIAL=ro-disk-1"), "{line}");
    let line = vm.wait_for("WRITE=", TIMEOUT);
    assert!(
        !line.contains("WRITE=0"),
        "a read-only disk refused the write: {line}"
    );
    // hexdump prints the offset and eight 16-bit words.
    let line = vm.wait_for("RNG=", TIMEOUT);
    let words: Vec<&str> = line
        .split_once("RNG=")
        .unwrap()
        .1
        .split_whitespace()
        .collect();
    assert_eq!(words.len(), 9, "16 bytes from /dev/hwrng: {line}");
    assert!(words[1..].iter().any(|w| *w != "0000"), "{line}");
    assert!(
        vm.wait_for("LAST=", TIMEOUT).ends_with("LAST=0"),
        "the last sector is writable"
    );
    let line = vm.wait_for("PAST=", TIMEOUT);
    assert!(
        !line.ends_with("PAST=0"),
        "a write past the last sector fails: {line}"
    );
    finish(&mut vm);
    assert!(
        std::fs::read(&ro).unwrap().iter().all(|&b| b == 0xa5),
        "the read-only image is unchanged"
    );
    assert_eq!(
        std::fs::metadata(&big).unwrap().len(),
        1 << 30,
        "the disk did not grow"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn two_vms_do_io_on_their_own_disks_at_once() {
    let dir = temp_dir("virtio-two");
    let imgs = [disk(&dir, "a.img", 32 << 20), disk(&dir, "b.img", 32 << 20)];
    let mut vms: Vec<Vm> = imgs
        .iter()
        .enumerate()
        .map(|(n, img)| {
            // Each guest writes 8 MiB of its own byte and reads the whole disk back.
            start(
                std::slice::from_ref(img),
                &format!(
                    "dd if=/dev/zero bs=1M count=8 2>/dev/null | tr '\\000' '\\{:03o}' \
                     > /tmp/p; dd if=/tmp/p of=/dev/vda bs=1M 2>/dev/null; sync; \
                     echo 3 > /proc/sys/vm/drop_caches; \
                     echo SHA=$(head -c 8388608 /dev/vda | sha256sum)",
                    0x41 + n
                ),
            )
        })
        .collect();
    // A second monitor cannot open a disk the first one is using.
    vms[0].wait_for("VME-GUEST-READY", TIMEOUT);
    let (status, stderr) = common::run_to_end(&[
        "--arch",
        "riscv64",
        "--kernel",
        image("tiny-riscv64", "Image").to_str().unwrap(),
        "--disk",
        &format!("path={}", imgs[0]),
    ]);
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("in use by another process"), "{stderr}");

    for (n, vm) in vms.iter_mut().enumerate() {
        let got = guest_sha256(vm, "SHA");
        finish(vm);
        let want = host_sha256(&imgs[n], 8 << 20);
        assert_eq!(got, want, "VM {n} read back its own data");
        let bytes = std::fs::read(&imgs[n]).unwrap();
        assert!(
            bytes[..8 << 20].iter().all(|&b| b == 0x41 + n as u8),
            "VM {n}'s disk"
        );
        assert!(
            bytes[8 << 20..].iter().all(|&b| b == 0),
            "VM {n}'s disk beyond 8 MiB"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

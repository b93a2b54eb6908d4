//! `vme image ...` and `vme launch --image` against the real daemon: import from files and
//! from an archive, list, sign with a key made by keygen, export, verify, alias, rm, prune,
//! and a riscv64 VM launched from an image (one boot).

use serde_json::Value;
use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

const VME: &str = env!("CARGO_BIN_EXE_vme");

#[path = "../../vmed/tests/support/mod.rs"]
mod support;
use support::{Vmed, image};

fn vme(socket: &Path, args: &[&str]) -> Output {
    Command::new(VME)
        .env("VME_SOCKET", socket)
        .args(args)
        .output()
        .unwrap()
}

fn ok(out: Output) -> String {
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

fn fails(out: Output) -> String {
    assert!(!out.status.success());
    String::from_utf8_lossy(&out.stderr).to_string()
}

#[test]
fn the_image_verbs_and_launch_from_an_image() {
    let d = Vmed::start("cli-images", false, &[]);
    let s = d.socket.as_path();
    let (k, i) = (image("Image"), image("initramfs.cpio"));
    let (k, i) = (k.to_str().unwrap(), i.to_str().unwrap());
    let disk = d.dir.join("disk.raw");
    std::fs::write(&disk, vec![0x5a; 1 << 20]).unwrap();
    let disk = disk.to_str().unwrap();
    let out = ok(vme(
        s,
        &[
            "image",
            "import",
            "tiny",
            "--kernel",
            k,
            "--initrd",
            i,
            "--disk",
            disk,
            "--arch",
            "riscv64",
            "--cmdline",
            "console=ttyS0 panic=-1",
            "--memory",
            "128M",
            "--label",
            "tier=test",
        ],
    ));
    assert!(
        out.contains("tiny: imported") && out.contains("3 blobs stored"),
        "{out}"
    );
    let table = ok(vme(s, &["image", "list"]));
    assert!(
        table.contains("NAME") && table.contains("tiny") && table.contains("unsigned"),
        "{table}"
    );
    let list: Value =
        serde_json::from_str(&ok(vme(s, &["image", "list", "--format", "json"]))).unwrap();
    assert_eq!(list[0]["manifest"]["labels"]["tier"], "test");
    assert!(ok(vme(s, &["image", "list", "--format", "yaml"])).contains("name: tiny"));

    // Keygen, sign: the daemon stores the signature and names the key.
    let key = d.dir.join("publisher.key");
    let public = ok(vme(s, &["image", "keygen", key.to_str().unwrap()]));
    assert!(public.starts_with("ed25519:"), "{public}");
    assert!(
        fails(vme(s, &["image", "keygen", key.to_str().unwrap()])).contains("never overwritten")
    );
    let out = ok(vme(
        s,
        &["image", "sign", "tiny", "--key", key.to_str().unwrap()],
    ));
    assert!(out.contains("signed by key"), "{out}");
    let info: Value = serde_json::from_str(&ok(vme(s, &["image", "info", "tiny"]))).unwrap();
    assert!(info["signed_by"].is_string(), "{info}");

    // Export, import the archive under another name (its blobs are already there), alias.
    let tar = d.dir.join("tiny.tar");
    ok(vme(s, &["image", "export", "tiny", tar.to_str().unwrap()]));
    let out = ok(vme(
        s,
        &["image", "import", tar.to_str().unwrap(), "--name", "copy"],
    ));
    assert!(out.contains("3 already present"), "{out}");
    let info: Value = serde_json::from_str(&ok(vme(s, &["image", "info", "copy"]))).unwrap();
    assert!(
        info["signed_by"].is_string(),
        "the signature travels in the archive: {info}"
    );
    ok(vme(s, &["image", "alias", "stable", "copy"]));
    assert!(ok(vme(s, &["image", "verify", "stable"])).contains("ok"));

    // Launch from the image (by its alias): the guest boots the image's kernel and initrd.
    let out = ok(vme(
        s,
        &[
            "launch",
            "v1",
            "--image",
            "stable",
            "--cmdline",
            "console=ttyS0 panic=-1 vme.run=\"echo disk ro=$(cat /sys/block/vda/ro) \
           sectors=$(cat /sys/block/vda/size); printf MARK | dd of=/dev/vda conv=fsync \
           2>/dev/null; echo from-image-$((6*7))\"",
        ],
    ));
    assert!(out.contains("v1: running"), "{out}");
    let console = wait_console(s, "v1", "VME-RUN-EXIT");
    assert!(console.contains("from-image-42"), "{console}");
    // Its own volume: writable, a thin clone of the image's disk.
    assert!(console.contains("disk ro=0 sectors=2048"), "{console}");
    let volume = d.dir.join("state/vms/v1/root.ovl");
    let used = std::os::unix::fs::MetadataExt::blocks(&std::fs::metadata(&volume).unwrap()) * 512;
    assert!(used < 1 << 20, "v1's volume takes {used} bytes on the host");
    // What v1 wrote is v1's: a second VM from the image reads the image's bytes, and the
    // image still verifies.
    ok(vme(
        s,
        &[
            "launch",
            "v2",
            "--image",
            "stable",
            "--cmdline",
            "console=ttyS0 panic=-1 vme.run=\"echo head=$(head -c 4 /dev/vda)\"",
        ],
    ));
    let console = wait_console(s, "v2", "VME-RUN-EXIT");
    assert!(console.contains("head=ZZZZ"), "{console}");
    assert!(ok(vme(s, &["image", "verify", "stable"])).contains("ok"));
    // Its root is no ext4 file system: it cannot be scrubbed, so it is not published.
    let _ = vme(s, &["stop", "--force", "v1"]);
    let err = fails(vme(s, &["publish", "v1", "v1-image"]));
    assert!(err.contains("ext2/3/4") && err.contains("v1"), "{err}");
    let _ = vme(s, &["stop", "--force", "v2"]);
    ok(vme(s, &["delete", "v2"]));
    assert!(fails(vme(s, &["launch", "v2", "--image", "nope"])).contains("no image or alias"));
    assert!(fails(vme(s, &["launch", "v2"])).contains("--kernel"));

    // Deleting the images leaves the blobs the VM uses; prune frees them once it is gone.
    ok(vme(s, &["image", "rm", "tiny"]));
    ok(vme(s, &["image", "rm", "stable"]));
    assert!(ok(vme(s, &["image", "list"])).lines().count() <= 1);
    // The guest powers off after its command: stop only if it has not.
    let _ = vme(s, &["stop", "--force", "v1"]);
    ok(vme(s, &["delete", "v1"]));
    let out = ok(vme(s, &["image", "prune"]));
    assert!(out.contains("removed 3 blobs"), "{out}");
}

/// The console log of `vm` once it contains `want` (60 s at most).
fn wait_console(s: &Path, vm: &str, want: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let log = ok(vme(s, &["console", vm, "--show-log"]));
        if log.contains(want) {
            return log;
        }
        assert!(
            Instant::now() < deadline,
            "{vm}'s console never showed {want:?}: {log}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A VM made from an image with an ext4 root writes to it, is published, and a VM made
/// from the new image finds what was written but none of the first machine's secrets.
#[test]
fn publish_scrubs_the_root_and_makes_a_bootable_image() {
    let d = Vmed::start("cli-publish", false, &[]);
    let s = d.socket.as_path();
    let (k, i) = (image("Image"), image("initramfs.cpio"));
    let root = d.dir.join("root");
    for (path, content) in [
        ("etc/machine-id", "0123456789abcdef0123456789abcdef\n"),
        ("etc/ssh/ssh_host_ed25519_key", "PRIVATE"),
        ("etc/os-release", "ID=vme-test\n"),
        ("var/log/messages", "old log\n"),
    ] {
        let p = root.join(path);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, content).unwrap();
    }
    std::fs::create_dir_all(root.join("root")).unwrap();
    let disk = d.dir.join("root.ext4");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    let made = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-d"])
        .arg(&root)
        .arg(&disk)
        .status()
        .unwrap();
    assert!(made.success());
    ok(vme(
        s,
        &[
            "image",
            "import",
            "base",
            "--kernel",
            k.to_str().unwrap(),
            "--initrd",
            i.to_str().unwrap(),
            "--disk",
            disk.to_str().unwrap(),
            "--arch",
            "riscv64",
            "--cmdline",
            "console=ttyS0 panic=-1",
            "--memory",
            "128M",
        ],
    ));
    // The first machine works on its root, leaving a history behind.
    ok(vme(
        s,
        &[
            "launch",
            "p1",
            "--image",
            "base",
            "--cmdline",
            "console=ttyS0 panic=-1 vme.run=\"mkdir -p /mnt && mount /dev/vda /mnt && \
             echo kept > /mnt/data && echo 'cat /etc/shadow' > /mnt/root/.ash_history && \
             umount /mnt && echo written\"",
        ],
    ));
    let console = wait_console(s, "p1", "VME-RUN-EXIT");
    assert!(console.contains("written"), "{console}");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !ok(vme(s, &["list"])).contains("stopped") {
        assert!(Instant::now() < deadline, "p1 did not power off");
        std::thread::sleep(Duration::from_millis(100));
    }
    let report = ok(vme(s, &["publish", "p1", "golden"]));
    for line in [
        "/etc/machine-id",
        "/etc/ssh/ssh_host_ed25519_key",
        "/root/.ash_history",
        "/var/log/messages",
    ] {
        assert!(
            report.contains(line),
            "{line} missing from the report: {report}"
        );
    }
    assert!(
        report.contains("removed") && report.contains("emptied"),
        "{report}"
    );
    let info: Value = serde_json::from_str(&ok(vme(s, &["image", "info", "golden"]))).unwrap();
    assert_eq!(info["manifest"]["labels"]["published-from"], "p1", "{info}");
    // A taken name is refused.
    assert!(fails(vme(s, &["publish", "p1", "golden"])).contains("already exists"));

    // The next machine: the data is there, the secrets are not.
    ok(vme(
        s,
        &[
            "launch",
            "p2",
            "--image",
            "golden",
            "--cmdline",
            "console=ttyS0 panic=-1 vme.run=\"mkdir -p /mnt && mount /dev/vda /mnt && \
             echo data=$(cat /mnt/data) id=$(wc -c < /mnt/etc/machine-id) \
             os=$(cat /mnt/etc/os-release) keys=$(ls /mnt/etc/ssh | wc -l) \
             history=$(ls -a /mnt/root | grep -c history)\"",
        ],
    ));
    let console = wait_console(s, "p2", "VME-RUN-EXIT");
    assert!(
        console.contains("data=kept id=0 os=ID=vme-test keys=0 history=0"),
        "{console}"
    );
    // A VM that runs is not published.
    ok(vme(s, &["launch", "p3", "--image", "golden"]));
    let err = fails(vme(s, &["publish", "p3", "other"]));
    assert!(err.contains("stop it first"), "{err}");
    ok(vme(s, &["stop", "--force", "p3"]));
}

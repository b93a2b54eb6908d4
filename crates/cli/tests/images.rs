//! `vme image ...` and `vme launch --image` against the real daemon: import from files and
//! from an archive, list, sign with a key made by keygen, export, verify, alias, rm, prune,
//! and a riscv64 VM launched from an image (one boot).

use serde_json::Value;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

mod cli_support;
use cli_support::{fails, ok, vme};

#[path = "../../vmed/tests/support/mod.rs"]
mod support;
use support::{Vmed, image};

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

fn qemu_img(args: &[&str]) {
    let out = Command::new("qemu-img")
        .args(args)
        .output()
        .expect("qemu-img is needed (qemu-utils: scripts/setup.sh installs it)");
    assert!(
        out.status.success(),
        "qemu-img {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A compressed qcow2 disk (what cloud images are) imported through the CLI: the daemon
/// stores the raw disk qemu-img would make, the manifest records both digests, the archive
/// round trip keeps them, a riscv64 VM reads the disk's bytes, and refusals are clear.
#[test]
fn a_qcow2_disk_is_converted_on_import_and_booted() {
    let d = Vmed::start("cli-images-qcow2", false, &[]);
    let s = d.socket.as_path();
    let (k, i) = (image("Image"), image("initramfs.cpio"));
    let (k, i) = (k.to_str().unwrap(), i.to_str().unwrap());
    let p = |n: &str| d.dir.join(n).to_str().unwrap().to_string();
    // 4 MiB: markers at 0 and 3 MiB, a varied MiB at 1 MiB, zeros elsewhere.
    let mut raw = vec![0u8; 4 << 20];
    raw[..10].copy_from_slice(b"QCOW2-HEAD");
    for (n, x) in raw[1 << 20..2 << 20].iter_mut().enumerate() {
        *x = (n * 7 % 251) as u8;
    }
    raw[3 << 20..(3 << 20) + 10].copy_from_slice(b"QCOW2-TAIL");
    std::fs::write(p("disk.raw"), &raw).unwrap();
    qemu_img(&[
        "convert",
        "-c",
        "-O",
        "qcow2",
        &p("disk.raw"),
        &p("disk.qcow2"),
    ]);
    qemu_img(&["convert", "-O", "raw", &p("disk.qcow2"), &p("ref.raw")]);
    let reference = std::fs::read(p("ref.raw")).unwrap();
    let qcow2 = std::fs::read(p("disk.qcow2")).unwrap();
    let import = |name: &str, extra: &[&str]| {
        let mut args = vec![
            "image", "import", name, "--kernel", k, "--initrd", i, "--arch", "riscv64", "--memory",
            "128M",
        ];
        args.extend(extra);
        vme(s, &args)
    };
    let disk = p("disk.qcow2");
    let out = ok(import("q", &["--disk", &disk]));
    assert!(out.contains("q: imported"), "{out}");

    // Both digests in `image info`; the stored blob is qemu-img's raw, byte for byte.
    let info: Value = serde_json::from_str(&ok(vme(s, &["image", "info", "q"]))).unwrap();
    let m = &info["manifest"];
    assert_eq!(m["schema_version"], 2, "{info}");
    let blob = &m["blobs"][2];
    let raw_digest = vme_image::Digest::of(&reference).to_string();
    assert_eq!(blob["role"], "disk", "{info}");
    assert_eq!(blob["sha256"], raw_digest.as_str(), "{info}");
    assert_eq!(blob["size"], reference.len(), "{info}");
    let src = &blob["source"];
    assert_eq!(src["format"], "qcow2", "{info}");
    assert_eq!(
        src["sha256"],
        vme_image::Digest::of(&qcow2).to_string(),
        "{info}"
    );
    assert_eq!(src["size"], qcow2.len(), "{info}");
    let blobs = d.dir.join("state/images/blobs/sha256");
    let stored = blobs.join(&raw_digest);
    assert!(std::fs::read(&stored).unwrap() == reference);
    let used = std::os::unix::fs::MetadataExt::blocks(&std::fs::metadata(&stored).unwrap()) * 512;
    assert!(
        used < 2 << 20,
        "the 4 MiB disk with 1 MiB of data takes {used} bytes"
    );
    assert_eq!(
        std::fs::read_dir(d.dir.join("state/images/tmp"))
            .unwrap()
            .count(),
        0
    );
    assert_eq!(
        std::fs::read_dir(&blobs).unwrap().count(),
        3,
        "no qcow2 kept"
    );

    // Export carries the raw disk; the archive imports elsewhere with the source recorded.
    ok(vme(s, &["image", "export", "q", &p("q.tar")]));
    ok(vme(s, &["image", "rm", "q"]));
    ok(vme(s, &["image", "prune"]));
    ok(vme(s, &["image", "import", &p("q.tar"), "--name", "q2"]));
    let info2: Value = serde_json::from_str(&ok(vme(s, &["image", "info", "q2"]))).unwrap();
    assert_eq!(info2["manifest"], *m, "{info2}");
    assert!(std::fs::read(&stored).unwrap() == reference);

    // A VM from it reads the disk's bytes (riscv64: no KVM boot lock needed).
    ok(vme(
        s,
        &[
            "launch",
            "vq",
            "--image",
            "q2",
            "--cmdline",
            "console=ttyS0 panic=-1 vme.run=\"echo head=$(head -c 10 /dev/vda) \
             tail=$(dd if=/dev/vda bs=1M skip=3 count=1 2>/dev/null | head -c 10)\"",
        ],
    ));
    let console = wait_console(s, "vq", "VME-RUN-EXIT");
    assert!(
        console.contains("head=QCOW2-HEAD tail=QCOW2-TAIL"),
        "{console}"
    );
    let _ = vme(s, &["stop", "--force", "vq"]);
    ok(vme(s, &["delete", "vq"]));

    // --disk-format: raw keeps a qcow2 file as it is; qcow2 refuses a raw file.
    ok(import("as-is", &["--disk", &disk, "--disk-format", "raw"]));
    let info: Value = serde_json::from_str(&ok(vme(s, &["image", "info", "as-is"]))).unwrap();
    let blob = &info["manifest"]["blobs"][2];
    assert_eq!(blob["sha256"], vme_image::Digest::of(&qcow2).to_string());
    assert!(
        blob["source"].is_null() && info["manifest"]["schema_version"] == 1,
        "{info}"
    );
    let err = fails(import(
        "no",
        &["--disk", &p("disk.raw"), "--disk-format", "qcow2"],
    ));
    assert!(err.contains("not a qcow2 file"), "{err}");
    // An image that is not self-contained is refused before anything is sent.
    qemu_img(&[
        "create",
        "-f",
        "qcow2",
        "-b",
        &disk,
        "-F",
        "qcow2",
        &p("over.qcow2"),
    ]);
    let err = fails(import("no", &["--disk", &p("over.qcow2")]));
    assert!(
        err.contains("backing file") && err.contains("disk.qcow2") && err.contains("qemu-img"),
        "{err}"
    );
    assert!(fails(vme(s, &["image", "info", "no"])).contains("no image"));
}

/// Names per project from the CLI: projects acme and globex each import an image `base` and
/// create a VM `web` with `--project`; `vme image set --public`; an ambiguous name is refused
/// with the projects listed, and `--project` picks one.
#[test]
fn names_per_project_and_image_set() {
    let d = Vmed::start("cli-names", false, &[]);
    let s = d.socket.as_path();
    let (k, i) = (image("Image"), image("initramfs.cpio"));
    let (k, i) = (k.to_str().unwrap(), i.to_str().unwrap());
    for p in ["acme", "globex"] {
        ok(vme(s, &["project", "create", p]));
        let out = ok(vme(
            s,
            &[
                "--project",
                p,
                "image",
                "import",
                "base",
                "--kernel",
                k,
                "--initrd",
                i,
                "--arch",
                "riscv64",
                "--memory",
                "64M",
            ],
        ));
        assert!(out.contains("base: imported"), "{out}");
        let out = ok(vme(
            s,
            &["--project", p, "create", "web", "--image", "base"],
        ));
        assert!(out.contains("web: defined"), "{out}");
    }
    let list = ok(vme(s, &["list"]));
    for p in ["acme", "globex"] {
        assert!(
            list.lines()
                .any(|l| l.split_whitespace().take(3).eq(["web", p, "defined"])),
            "{list}"
        );
    }
    let err = fails(vme(s, &["info", "web"]));
    assert!(
        err.contains("acme, globex") && err.contains("--project"),
        "{err}"
    );
    let info = ok(vme(
        s,
        &["--project", "globex", "info", "web", "--format", "json"],
    ));
    let v: Value = serde_json::from_str(&info).unwrap();
    assert_eq!(
        (v["name"].as_str(), v["project"].as_str()),
        (Some("web"), Some("globex"))
    );

    let out = ok(vme(
        s,
        &[
            "--project",
            "acme",
            "image",
            "set",
            "base",
            "--public",
            "true",
        ],
    ));
    assert_eq!(out, "image base: public (project acme)\n");
    let table = ok(vme(s, &["image", "list"]));
    assert!(
        table.contains("PROJECT") && table.contains("acme (public)"),
        "{table}"
    );
    let out = ok(vme(
        s,
        &[
            "--project",
            "acme",
            "image",
            "set",
            "base",
            "--public",
            "false",
        ],
    ));
    assert_eq!(out, "image base: private (project acme)\n");
    assert!(fails(vme(s, &["image", "set", "base", "--public", "maybe"])).contains("maybe"));

    ok(vme(s, &["--project", "acme", "rm", "web"]));
    let v: Value = serde_json::from_str(&ok(vme(s, &["info", "web", "--format", "json"]))).unwrap();
    assert_eq!(
        v["project"], "globex",
        "the one left is found without --project"
    );
}

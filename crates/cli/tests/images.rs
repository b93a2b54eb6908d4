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
           sectors=$(cat /sys/block/vda/size); echo from-image-$((6*7))\"",
        ],
    ));
    assert!(out.contains("v1: running"), "{out}");
    let deadline = Instant::now() + Duration::from_secs(60);
    while !ok(vme(s, &["console", "v1", "--show-log"])).contains("from-image-42") {
        assert!(
            Instant::now() < deadline,
            "the guest did not boot from the image"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
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

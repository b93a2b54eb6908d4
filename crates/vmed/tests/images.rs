//! The image repository against the real daemon: import (archive over HTTP), dedupe, launch
//! of a real riscv64 VM from an image, a flipped byte caught before boot and by verify,
//! the require_signed policy, kill -9 mid-import, and hostile archives refused with nothing
//! stored. One VM boots in all.

use serde_json::{Value, json};
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use vme_image::{BlobRef, Digest, Role, sign};

mod support;
#[path = "support/tenants.rs"]
mod tenants;
use support::{Vmed, http};
use tenants::{tar, tiny};

/// POSTs a binary body; None when the daemon hung up without a reply (it died).
fn post_bytes(socket: &Path, path: &str, body: &[u8]) -> Option<(u16, Value)> {
    let mut s = UnixStream::connect(socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: vme\r\nConnection: close\r\n\
         Content-Type: application/x-tar\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    let _ = s
        .write_all(head.as_bytes())
        .and_then(|()| s.write_all(body));
    let mut reply = String::new();
    let _ = s.read_to_string(&mut reply);
    let (head, body) = reply.split_once("\r\n\r\n")?;
    let code = head.split(' ').nth(1)?.parse().ok()?;
    Some((code, serde_json::from_str(body).unwrap()))
}

/// A GET whose reply is binary (and chunked): its body.
fn get_bytes(socket: &Path, path: &str) -> Vec<u8> {
    let mut s = UnixStream::connect(socket).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: vme\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut reply = Vec::new();
    s.read_to_end(&mut reply).unwrap();
    let end = reply.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
    let head = String::from_utf8_lossy(&reply[..end]).to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert!(head.contains("transfer-encoding: chunked"), "{head}");
    let mut rest = &reply[end + 4..];
    let mut body = Vec::new();
    loop {
        let eol = rest.windows(2).position(|w| w == b"\r\n").unwrap();
        let size = usize::from_str_radix(std::str::from_utf8(&rest[..eol]).unwrap(), 16).unwrap();
        if size == 0 {
            return body;
        }
        body.extend_from_slice(&rest[eol + 2..eol + 2 + size]);
        rest = &rest[eol + 4 + size..];
    }
}

fn blobs_dir(d: &Vmed) -> PathBuf {
    d.dir.join("state/images/blobs/sha256")
}

fn count(dir: &Path) -> usize {
    std::fs::read_dir(dir).map(|r| r.count()).unwrap_or(0)
}

fn images(d: &Vmed) -> Value {
    let (code, v) = http(&d.socket, "GET", "/1.0/images", "");
    assert_eq!(code, 200, "{v}");
    v["metadata"].clone()
}

fn flip_a_byte(p: &Path) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o600)).unwrap();
    let mut b = std::fs::read(p).unwrap();
    b[4096] ^= 0x20;
    std::fs::write(p, b).unwrap();
}

#[test]
fn import_dedupe_launch_and_a_flipped_byte() {
    let d = Vmed::start("images", false, &[]);
    let (m, files) = tiny("tiny");
    let a = tar(&m, &files, None);
    let (code, v) = post_bytes(&d.socket, "/1.0/images", &a).unwrap();
    assert_eq!(code, 201, "{v}");
    assert_eq!(v["metadata"]["blobs_stored"], 2);
    // The same blobs under another name: stored once.
    let (code, v) = post_bytes(&d.socket, "/1.0/images?name=tiny-again", &a).unwrap();
    assert_eq!(code, 201, "{v}");
    assert_eq!(v["metadata"]["blobs_deduplicated"], 2);
    assert_eq!(count(&blobs_dir(&d)), 2, "each blob stored once");
    assert_eq!(images(&d).as_array().unwrap().len(), 2);
    let (code, v) = post_bytes(&d.socket, "/1.0/images", &a).unwrap();
    assert_eq!(code, 409, "{v}");

    // Launch from the image: the guest boots the image's kernel and initrd.
    let create = json!({"name": "v1", "image": "tiny",
        "cmdline": "console=ttyS0 panic=-1 vme.run=\"echo image-booted-$((6*7))\""});
    let (code, v) = http(&d.socket, "POST", "/1.0/vms", &create.to_string());
    assert_eq!(code, 201, "{v}");
    let spec = &v["metadata"]["spec"];
    let kernel = blobs_dir(&d).join(m.blob(Role::Kernel).unwrap().sha256.as_str());
    assert_eq!(spec["kernel"], json!(kernel), "{spec}");
    assert_eq!(
        (spec["arch"].as_str(), spec["memory"].as_str()),
        (Some("riscv64"), Some("128M"))
    );
    let start = json!({"action": "start"}).to_string();
    let (code, v) = http(&d.socket, "PUT", "/1.0/vms/v1/state", &start);
    assert_eq!(code, 200, "{v}");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (_, v) = http(&d.socket, "GET", "/1.0/vms/v1/console", "");
        if v["metadata"]["log"]
            .as_str()
            .unwrap_or("")
            .contains("image-booted-42")
        {
            break;
        }
        assert!(Instant::now() < deadline, "the guest did not boot: {v}");
        std::thread::sleep(Duration::from_millis(100));
    }
    // Below the image's minimum: refused.
    let small = json!({"name": "v2", "image": "tiny", "memory": "32M"}).to_string();
    let (code, v) = http(&d.socket, "POST", "/1.0/vms", &small);
    assert_eq!(code, 400, "{v}");
    assert!(v["error"].as_str().unwrap().contains("at least"), "{v}");

    // A flipped byte in the stored initrd: verify names the blob, the image is unusable,
    // a create and a (re)start from it fail naming the blob.
    let initrd = m.blob(Role::Initrd).unwrap().sha256.clone();
    flip_a_byte(&blobs_dir(&d).join(initrd.as_str()));
    let (code, v) = http(&d.socket, "POST", "/1.0/images/tiny/verify", "");
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["metadata"]["status"], "corrupted");
    let bad: Vec<_> = v["metadata"]["blobs"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|b| b["ok"] == false)
        .collect();
    assert_eq!(bad.len(), 1);
    assert!(
        bad[0]["error"].as_str().unwrap().contains(initrd.as_str()),
        "{v}"
    );
    let (code, v) = http(
        &d.socket,
        "POST",
        "/1.0/vms",
        &json!({"name": "v3", "image": "tiny-again"}).to_string(),
    );
    assert_eq!(code, 409, "{v}");
    let e = v["error"].as_str().unwrap();
    assert!(
        e.contains("image corrupted") && e.contains(initrd.as_str()),
        "{e}"
    );
    let tiny_again = &images(&d)[1];
    assert_eq!(tiny_again["status"], "corrupted", "{tiny_again}");
    let stop = json!({"action": "stop", "force": true}).to_string();
    let (code, v) = http(&d.socket, "PUT", "/1.0/vms/v1/state", &stop);
    assert!(code == 200 || code == 409, "{v}");
    let (code, v) = http(&d.socket, "PUT", "/1.0/vms/v1/state", &start);
    assert_eq!(code, 500, "{v}");
    let e = v["error"].as_str().unwrap();
    assert!(
        e.contains("image corrupted") && e.contains(initrd.as_str()),
        "{e}"
    );
    assert!(
        d.monitors_of("v1").is_empty(),
        "a corrupted image was booted"
    );

    // Re-importing the image repairs the blob; verify makes the image usable again.
    let (code, v) = post_bytes(&d.socket, "/1.0/images?name=tiny-fixed", &a).unwrap();
    assert_eq!(code, 201, "{v}");
    let (_, v) = http(&d.socket, "POST", "/1.0/images/tiny/verify", "");
    assert_eq!(v["metadata"]["status"], "ok", "{v}");

    // Export gives back the archive byte for byte.
    let exported = get_bytes(&d.socket, "/1.0/images/tiny/export");
    assert!(
        exported == a,
        "the export differs from the imported archive"
    );

    // Deleting the images keeps the blobs the VM uses; once it is gone, prune frees them.
    for n in ["tiny", "tiny-again", "tiny-fixed"] {
        let (code, v) = http(&d.socket, "DELETE", &format!("/1.0/images/{n}"), "");
        assert_eq!(code, 200, "{v}");
    }
    assert_eq!(count(&blobs_dir(&d)), 2, "VM v1 still uses them");
    let (code, v) = http(&d.socket, "DELETE", "/1.0/vms/v1", "");
    assert_eq!(code, 200, "{v}");
    let (_, v) = http(&d.socket, "POST", "/1.0/images/prune", "");
    assert_eq!(v["metadata"]["blobs_removed"], 2, "{v}");
    assert_eq!(count(&blobs_dir(&d)), 0);
}

#[test]
fn require_signed_refuses_unsigned_and_untrusted_keys() {
    let dir = std::env::temp_dir().join(format!("vme-img-keys-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let trusted = sign::keygen(&dir.join("trusted")).unwrap();
    let other = sign::keygen(&dir.join("other")).unwrap();
    let key = |n: &str| sign::SecretKey::load(&dir.join(n)).unwrap();
    let trusted_arg = trusted.to_string();
    let d = Vmed::start(
        "images-signed",
        false,
        &["--require-signed", "true", "--trusted-key", &trusted_arg],
    );
    let (m, files) = tiny("tiny");
    let (code, v) = post_bytes(&d.socket, "/1.0/images", &tar(&m, &files, None)).unwrap();
    assert_eq!(code, 201, "{v}");
    let create = |n: &str| {
        let body = json!({"name": n, "image": "tiny"}).to_string();
        http(&d.socket, "POST", "/1.0/vms", &body)
    };
    let (code, v) = create("a");
    assert_eq!(code, 403, "{v}");
    assert!(v["error"].as_str().unwrap().contains("unsigned"), "{v}");

    // The exact manifest bytes, signed client-side.
    let (code, manifest) = support::request(&d.socket, "GET", "/1.0/images/tiny/manifest", "");
    assert_eq!(code, 200);
    assert_eq!(manifest.as_bytes(), m.to_bytes());
    let put = |sig: &sign::Signature| {
        let body = String::from_utf8(sig.to_bytes()).unwrap();
        http(&d.socket, "PUT", "/1.0/images/tiny/signature", &body)
    };
    // A signature of other bytes is refused outright.
    let (code, v) = put(&key("trusted").sign(b"something else"));
    assert_eq!(code, 400, "{v}");

    let (code, v) = put(&key("other").sign(manifest.as_bytes()));
    assert_eq!(code, 200, "{v}");
    let (code, v) = create("a");
    assert_eq!(code, 403, "{v}");
    let e = v["error"].as_str().unwrap();
    assert!(
        e.contains(&other.fingerprint()) && e.contains("not trust"),
        "{e}"
    );

    let (code, v) = put(&key("trusted").sign(manifest.as_bytes()));
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["metadata"]["signed_by"], trusted.fingerprint());
    let (code, v) = create("a");
    assert_eq!(code, 201, "{v}");

    // A signed archive carries its signature through export and import.
    let signed = tar(&m, &files, Some(&key("trusted").sign(&m.to_bytes())));
    let (code, v) = post_bytes(&d.socket, "/1.0/images?name=tiny-signed", &signed).unwrap();
    assert_eq!(code, 201, "{v}");
    assert_eq!(v["metadata"]["image"]["signed_by"], trusted.fingerprint());
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn kill9_mid_import_leaves_no_image_and_prune_leaves_no_orphan() {
    let mut d = Vmed::start("images-crash", false, &[]);
    let (m, files) = tiny("tiny");
    let a = tar(&m, &files, None);
    for point in ["image-import:mid-blob", "image-import:before-commit"] {
        d.child.kill().unwrap();
        d.launch(Some(point));
        assert!(
            post_bytes(&d.socket, "/1.0/images", &a).is_none(),
            "{point}: vmed answered"
        );
        d.launch(None);
        assert_eq!(images(&d), json!([]), "{point}: a partial image is listed");
        let (code, v) = http(&d.socket, "POST", "/1.0/images/prune", "");
        assert_eq!(code, 200, "{v}");
        let leftovers = v["metadata"]["blobs_removed"].as_u64().unwrap()
            + v["metadata"]["temp_files_removed"].as_u64().unwrap();
        assert!(
            leftovers > 0,
            "{point}: the crash left nothing to prune? {v}"
        );
        assert_eq!(count(&blobs_dir(&d)), 0, "{point}: an orphan blob remains");
        assert_eq!(count(&d.dir.join("state/images/tmp")), 0, "{point}");
    }
    // And the daemon imports fine afterwards.
    let (code, v) = post_bytes(&d.socket, "/1.0/images", &a).unwrap();
    assert_eq!(code, 201, "{v}");
}

/// One raw ustar entry.
fn entry(name: &str, kind: u8, size: u64, data: &[u8]) -> Vec<u8> {
    let mut h = [0u8; 512];
    h[..name.len()].copy_from_slice(name.as_bytes());
    h[100..107].copy_from_slice(b"0000644");
    h[124..135].copy_from_slice(format!("{size:011o}").as_bytes());
    h[156] = kind;
    h[257..263].copy_from_slice(b"ustar\0");
    h[148..156].copy_from_slice(b"        ");
    let sum: u32 = h.iter().map(|&b| u32::from(b)).sum();
    h[148..155].copy_from_slice(format!("{sum:06o}\0").as_bytes());
    let mut v = h.to_vec();
    v.extend_from_slice(data);
    v.resize(v.len().div_ceil(512) * 512, 0);
    v
}

#[test]
fn hostile_archives_and_manifests_are_refused_with_nothing_stored() {
    let d = Vmed::start("images-hostile", false, &["--image-max-size", "3M"]);
    let (big, files) = tiny("tiny");
    // A manifest within the 3M limit: a small stand-in kernel.
    let mut m = big.clone();
    m.blobs[0] = BlobRef {
        role: Role::Kernel,
        sha256: Digest::of(b"kernel"),
        size: 6,
        source: None,
    };
    let mb = m.to_bytes();
    let big_mb = big.to_bytes();
    let kernel = m.blob(Role::Kernel).unwrap();
    let initrd_bytes = std::fs::read(&files[1]).unwrap();
    let initrd = m.blob(Role::Initrd).unwrap();
    let manifest = entry("manifest.json", b'0', mb.len() as u64, &mb);
    let with_initrd_first = |extra: Vec<u8>| {
        [
            manifest.clone(),
            entry(
                &format!("blobs/{}", initrd.sha256),
                b'0',
                initrd.size,
                &initrd_bytes,
            ),
            extra,
        ]
        .concat()
    };
    let mut bad_manifest = serde_json::to_value(&m).unwrap();
    bad_manifest["surprise"] = json!(true);
    let bad_manifest = bad_manifest.to_string();
    let mut flipped = initrd_bytes.clone();
    flipped[100] ^= 1;
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "dot-dot",
            with_initrd_first(entry("../../etc/x", b'0', 1, b"x")),
            "'..'",
        ),
        (
            "absolute",
            entry("/manifest.json", b'0', mb.len() as u64, &mb),
            "absolute",
        ),
        (
            "symlink",
            with_initrd_first(entry(&format!("blobs/{}", kernel.sha256), b'2', 0, b"")),
            "symbolic link",
        ),
        (
            "hardlink",
            with_initrd_first(entry(&format!("blobs/{}", kernel.sha256), b'1', 0, b"")),
            "hard link",
        ),
        // The kernel (4 MiB) is larger than this daemon's 3M limit.
        (
            "too large",
            entry("manifest.json", b'0', big_mb.len() as u64, &big_mb),
            "more than the 3145728 allowed",
        ),
        (
            "absurd header size",
            [
                manifest.clone(),
                entry(
                    &format!("blobs/{}", initrd.sha256),
                    b'0',
                    (1 << 33) - 1,
                    b"",
                ),
            ]
            .concat(),
            "manifest declares",
        ),
        (
            "digest mismatch",
            [
                manifest.clone(),
                entry(
                    &format!("blobs/{}", initrd.sha256),
                    b'0',
                    initrd.size,
                    &flipped,
                ),
            ]
            .concat(),
            "corrupted",
        ),
        ("missing blob", with_initrd_first(vec![]), "missing"),
        (
            "unknown field",
            entry(
                "manifest.json",
                b'0',
                bad_manifest.len() as u64,
                bad_manifest.as_bytes(),
            ),
            "unknown field `surprise`",
        ),
        (
            "not json",
            entry("manifest.json", b'0', 3, b"{{{"),
            "invalid image manifest",
        ),
        ("garbage", vec![0x42; 2048], "checksum"),
    ];
    for (what, body, want) in cases {
        let (code, v) = post_bytes(&d.socket, "/1.0/images", &body).unwrap();
        assert_eq!(code, 400, "{what}: {v}");
        let e = v["error"].as_str().unwrap();
        assert!(e.contains(want), "{what}: wanted {want:?} in {e:?}");
        assert_eq!(images(&d), json!([]), "{what}");
        assert_eq!(count(&blobs_dir(&d)), 0, "{what}: a blob was stored");
        assert_eq!(
            count(&d.dir.join("state/images/tmp")),
            0,
            "{what}: a temp file was left"
        );
    }
}

#[test]
fn a_disk_blob_is_stored_verified_and_cloned_for_each_vm() {
    let d = Vmed::start("images-disk", false, &[]);
    let (mut m, mut files) = tiny("tiny-disk");
    let disk = d.dir.join("disk.raw");
    std::fs::write(&disk, vec![0x5a; 3 << 20]).unwrap();
    let (sha256, size) = vme_image::hash_reader(std::fs::File::open(&disk).unwrap()).unwrap();
    m.blobs.push(BlobRef {
        role: Role::Disk,
        sha256: sha256.clone(),
        size,
        source: None,
    });
    files.push(disk);
    let (code, v) = post_bytes(&d.socket, "/1.0/images", &tar(&m, &files, None)).unwrap();
    assert_eq!(code, 201, "{v}");
    assert_eq!(count(&blobs_dir(&d)), 3);
    let body = json!({"name": "v", "image": "tiny-disk"}).to_string();
    let (code, v) = http(&d.socket, "POST", "/1.0/vms", &body);
    assert_eq!(code, 201, "{v}");
    // The VM's own volume: a thin clone (here an overlay) on the blob, writable.
    let disk = &v["metadata"]["spec"]["disks"][0];
    let volume = d.dir.join("state/vms/v/root.ovl");
    assert_eq!(disk["path"], json!(volume), "{v}");
    assert_eq!(
        disk["base"],
        json!(blobs_dir(&d).join(sha256.as_str())),
        "{v}"
    );
    assert_eq!(disk["readonly"], false, "{v}");
    let used = std::os::unix::fs::MetadataExt::blocks(&std::fs::metadata(&volume).unwrap()) * 512;
    assert!(
        used < 256 << 10,
        "the clone of a 3 MiB disk takes {used} bytes"
    );
    // A flipped byte in the disk blob is caught like one in a kernel.
    flip_a_byte(&blobs_dir(&d).join(sha256.as_str()));
    let (code, v) = http(&d.socket, "POST", "/1.0/images/tiny-disk/verify", "");
    assert_eq!(
        (code, v["metadata"]["status"].as_str()),
        (200, Some("corrupted")),
        "{v}"
    );
    let start = json!({"action": "start"}).to_string();
    let (code, v) = http(&d.socket, "PUT", "/1.0/vms/v/state", &start);
    assert_eq!(code, 500, "{v}");
    assert!(
        v["error"].as_str().unwrap().contains(sha256.as_str()),
        "{v}"
    );
}

#[test]
fn a_slow_import_blocks_no_other_and_prune_spares_its_blobs() {
    let d = Vmed::start("images-slow", false, &[]);
    let (m, files) = tiny("slow");
    let a = tar(&m, &files, None);
    // The archive's first 3 MiB (the manifest and part of the kernel), then a pause.
    let mut slow = UnixStream::connect(&d.socket).unwrap();
    write!(
        slow,
        "POST /1.0/images HTTP/1.1\r\nHost: vme\r\nConnection: close\r\n\
         Content-Type: application/x-tar\r\nContent-Length: {}\r\n\r\n",
        a.len()
    )
    .unwrap();
    slow.write_all(&a[..3 << 20]).unwrap();
    let tmp = d.dir.join("state/images/tmp");
    let deadline = Instant::now() + Duration::from_secs(10);
    while count(&tmp) == 0 {
        assert!(Instant::now() < deadline, "the import wrote no temp file");
        std::thread::sleep(Duration::from_millis(10));
    }
    // Meanwhile prune spares the half-written blob, and another import goes through.
    let (code, v) = http(&d.socket, "POST", "/1.0/images/prune", "");
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["metadata"]["temp_files_removed"], 0, "{v}");
    assert_eq!(count(&tmp), 1);
    let (mut small, mut small_files) = (m.clone(), Vec::new());
    small.name = "small".into();
    for (b, content) in small.blobs.iter_mut().zip([&b"kernel"[..], b"initrd"]) {
        let f = d.dir.join(b.role.as_str());
        std::fs::write(&f, content).unwrap();
        (b.sha256, b.size) = (Digest::of(content), content.len() as u64);
        small_files.push(f);
    }
    let (code, v) = post_bytes(&d.socket, "/1.0/images", &tar(&small, &small_files, None)).unwrap();
    assert_eq!(code, 201, "{v}");
    // The slow one ends well.
    slow.write_all(&a[3 << 20..]).unwrap();
    let mut reply = String::new();
    slow.read_to_string(&mut reply).unwrap();
    assert!(reply.starts_with("HTTP/1.1 201"), "{reply}");
    assert_eq!(images(&d).as_array().unwrap().len(), 2);
    assert_eq!(count(&blobs_dir(&d)), 4);
    assert_eq!(count(&tmp), 0);
}

/// A project may ask for signed images where the daemon does not: its launches refuse an
/// unsigned image, naming the project, while another project's accept it; a trusted
/// signature satisfies both.
#[test]
fn a_project_may_require_signed_images_the_daemon_does_not() {
    let dir = std::env::temp_dir().join(format!("vme-img-project-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let trusted = sign::keygen(&dir.join("trusted")).unwrap();
    let trusted_arg = trusted.to_string();
    let d = Vmed::start("images-project", false, &["--trusted-key", &trusted_arg]);
    let (m, files) = tiny("tiny");
    let (code, v) =
        post_bytes(&d.socket, "/1.0/images?public=true", &tar(&m, &files, None)).unwrap();
    assert_eq!(code, 201, "{v}");
    let body = json!({"name": "strict", "require_signed": true}).to_string();
    let (code, v) = http(&d.socket, "POST", "/1.0/projects", &body);
    assert_eq!(code, 201, "{v}");
    assert_eq!(v["metadata"]["require_signed"], true, "{v}");
    let create = |project: &str, n: &str| {
        let body = json!({"name": n, "image": "tiny"}).to_string();
        http(
            &d.socket,
            "POST",
            &format!("/1.0/vms?project={project}"),
            &body,
        )
    };
    let (code, v) = create("default", "open-1");
    assert_eq!(code, 201, "{v}");
    let (code, v) = create("strict", "strict-1");
    assert_eq!(code, 403, "{v}");
    let e = v["error"].as_str().unwrap();
    assert!(
        e.contains("unsigned") && e.contains("project \"strict\""),
        "{e}"
    );

    let key = sign::SecretKey::load(&dir.join("trusted")).unwrap();
    let body = String::from_utf8(key.sign(&m.to_bytes()).to_bytes()).unwrap();
    let (code, v) = http(&d.socket, "PUT", "/1.0/images/tiny/signature", &body);
    assert_eq!(code, 200, "{v}");
    let (code, v) = create("strict", "strict-1");
    assert_eq!(code, 201, "{v}");

    // The policy can be turned off again, and a change with nothing in it is refused.
    let (code, v) = http(
        &d.socket,
        "PUT",
        "/1.0/projects/strict",
        r#"{"require_signed": false}"#,
    );
    assert_eq!(
        (code, &v["metadata"]["require_signed"]),
        (200, &json!(false)),
        "{v}"
    );
    let (code, v) = http(&d.socket, "PUT", "/1.0/projects/strict", "{}");
    assert_eq!(code, 400, "{v}");
    std::fs::remove_dir_all(dir).unwrap();
}

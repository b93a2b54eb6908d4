//! Tenants for the daemon's tests: raw HTTP with a bearer token, users with a role in a
//! project, and the riscv64 tiny image as an archive to import. Shared by the access, names
//! and images tests (included by path).
#![allow(dead_code)]

use super::support::{Vmed, image};
use serde_json::{Value, json};
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;
use vme_api::{Arch, ByteSize};
use vme_image::manifest::{Amount, Boot, Resources};
use vme_image::{BlobRef, Manifest, Role, archive, sign};

/// One request with an optional bearer token; the status and the body as text. With
/// `head_only`, the body is not read (streams).
pub fn raw(
    socket: &Path,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: &[u8],
    head_only: bool,
) -> (u16, String) {
    let mut s = UnixStream::connect(socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let ctype = if path.starts_with("/1.0/images?") || path == "/1.0/images" {
        "application/x-tar"
    } else {
        "application/json"
    };
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: vme\r\nConnection: close\r\n{auth}\
         Content-Type: {ctype}\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).unwrap();
    // The daemon may refuse (401, 404) before it has read a body and close the connection:
    // a broken pipe here is not a failure, the reply below is what the test checks.
    let _ = s.write_all(body);
    let mut reply = Vec::new();
    if head_only {
        let mut b = [0u8; 1];
        while !reply.ends_with(b"\r\n\r\n") && s.read(&mut b).unwrap_or(0) == 1 {
            reply.push(b[0]);
        }
    } else {
        let _ = s.read_to_end(&mut reply);
    }
    let reply = String::from_utf8_lossy(&reply).into_owned();
    let (head, body) = reply.split_once("\r\n\r\n").unwrap_or((&reply, ""));
    let code = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (code, body.to_string())
}

/// A JSON request as `token`'s user (None: the test's own uid, root).
pub fn api(d: &Vmed, token: Option<&str>, method: &str, path: &str, body: Value) -> (u16, Value) {
    let body = if body.is_null() {
        String::new()
    } else {
        body.to_string()
    };
    let (code, text) = raw(&d.socket, method, path, token, body.as_bytes(), false);
    let v = serde_json::from_str(&text).unwrap_or(Value::String(text));
    (code, v)
}

/// The tiny riscv64 image's manifest (named `name`) and its blobs' files.
pub fn tiny(name: &str) -> (Manifest, Vec<PathBuf>) {
    let files = vec![image("Image"), image("initramfs.cpio")];
    let blobs = [Role::Kernel, Role::Initrd]
        .into_iter()
        .zip(&files)
        .map(|(role, f)| {
            let (sha256, size) = vme_image::hash_reader(std::fs::File::open(f).unwrap()).unwrap();
            BlobRef {
                role,
                sha256,
                size,
                source: None,
            }
        })
        .collect();
    let m = Manifest {
        schema_version: 1,
        name: name.into(),
        os: "tiny".into(),
        version: "1".into(),
        architecture: Arch::Riscv64,
        boot: Boot::Direct {
            cmdline: "console=ttyS0 panic=-1".into(),
        },
        resources: Resources {
            default: Amount {
                vcpus: 1,
                memory: ByteSize(128 << 20),
            },
            minimum: Amount {
                vcpus: 1,
                memory: ByteSize(64 << 20),
            },
        },
        labels: Default::default(),
        blobs,
    };
    (m, files)
}

/// An archive of `m` with the files' bytes (as they are now) and an optional signature.
pub fn tar(m: &Manifest, files: &[PathBuf], sig: Option<&sign::Signature>) -> Vec<u8> {
    let bytes = m.to_bytes();
    let parts = m
        .blobs
        .iter()
        .zip(files)
        .map(|(b, f)| {
            let r: Box<dyn Read + Send> = Box::new(std::fs::File::open(f).unwrap());
            (b.sha256.clone(), b.size, r)
        })
        .collect();
    let (len, mut r) = archive::stream(&bytes, sig, parts).unwrap();
    let mut out = Vec::new();
    r.read_to_end(&mut out).unwrap();
    assert_eq!(out.len() as u64, len);
    out
}

/// The tiny riscv64 image as an archive named `name`, 64 MiB by default (the quota tests
/// count on it).
pub fn tiny_archive(name: &str) -> Vec<u8> {
    let (mut m, files) = tiny(name);
    m.resources.default.memory = ByteSize(64 << 20);
    tar(&m, &files, None)
}

pub fn import(d: &Vmed, token: Option<&str>, name: &str, query: &str) -> (u16, String) {
    raw(
        &d.socket,
        "POST",
        &format!("/1.0/images?name={name}{query}"),
        token,
        &tiny_archive(name),
        false,
    )
}

/// Root makes a project, a user with a role in it (and clearance), and a token for them.
pub fn user(d: &Vmed, name: &str, project: &str, role: &str, clearance: &str) -> String {
    let (c, _) = api(d, None, "POST", "/1.0/projects", json!({ "name": project }));
    assert!(c == 201 || c == 409, "{c}");
    let (c, v) = api(
        d,
        None,
        "POST",
        "/1.0/users",
        json!({"name": name, "project": project, "role": role, "clearance": clearance}),
    );
    assert_eq!(c, 201, "{v}");
    let (c, v) = api(d, None, "POST", "/1.0/tokens", json!({ "user": name }));
    assert_eq!(c, 201, "{v}");
    v["metadata"]["token"].as_str().unwrap().to_string()
}

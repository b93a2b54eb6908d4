//! Checks on what users send: VM names and create requests. Everything here runs before
//! anything is stored, so a refused request leaves no trace.

use crate::lifecycle::RestartPolicy;
use crate::limits::{CpuAllowance, IoMaxRequest, VmLimits};
use serde::Deserialize;
use std::path::{Path, PathBuf};
use vme_api::size::{GIB, MIB};
use vme_api::{Arch, ByteSize, MachineSpec};

/// Longest VM name: a DNS label, so a name can become a hostname.
pub const MAX_NAME_LEN: usize = 63;
/// More vCPUs than any host here has; larger requests are mistakes, not plans.
pub const MAX_VCPUS: u32 = 256;
/// Smallest and largest guest memory the daemon accepts.
pub const MIN_MEMORY: u64 = 16 * MIB;
pub const MAX_MEMORY: u64 = 4096 * GIB;

/// Checks a VM name: 1 to 63 letters, digits and `-`, starting with a letter or digit. The
/// name becomes a directory and a socket path under the state dir, so `/` and `..` must
/// never get through.
/// Checks a VM's internal key (see `store::VmId`): a name, or `PROJECT_NAME`. The API's
/// routes reach the daemon with keys (the access-control middleware resolves names).
pub fn key(k: &str) -> Result<(), String> {
    match k.split_once('_') {
        Some((project, n)) => name(project).and_then(|()| name(n)),
        None => name(k),
    }
}

pub fn name(n: &str) -> Result<(), String> {
    if n.is_empty() {
        return Err("VM name is empty: give a name like web-1".into());
    }
    if n.len() > MAX_NAME_LEN {
        return Err(format!(
            "VM name is {} characters long; the limit is {MAX_NAME_LEN}: use a shorter name",
            n.len()
        ));
    }
    if n.contains('/') || n.contains("..") {
        return Err(format!(
            "VM name {n:?} contains '/' or '..': use only letters, digits and '-'"
        ));
    }
    if let Some(c) = n.chars().find(|c| !c.is_ascii_alphanumeric() && *c != '-') {
        return Err(format!(
            "VM name {n:?} contains {c:?}: use only letters, digits and '-'"
        ));
    }
    if n.starts_with('-') {
        return Err(format!(
            "VM name {n:?} starts with '-': start it with a letter or digit"
        ));
    }
    Ok(())
}

/// The body of `POST /1.0/vms`. Unknown fields are refused: a misspelt `memroy` must not
/// silently become the default.
#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"name": "web-1", "arch": "riscv64", "kernel": "/var/lib/vme/Image",
                           "memory": "256M", "vcpus": 1}))]
pub struct CreateVm {
    /// 1 to 63 letters, digits and '-', starting with a letter or digit.
    pub name: String,
    /// `x86_64` (default) or `riscv64`.
    #[serde(default)]
    #[schema(value_type = Option<String>)]
    pub arch: Option<Arch>,
    /// An image from the repository (name or alias): it gives the kernel, initrd, cmdline,
    /// architecture and default resources. Give either this or `kernel`.
    #[serde(default)]
    pub image: Option<String>,
    /// The kernel image: an absolute path on the daemon's host.
    #[serde(default)]
    #[schema(value_type = Option<String>)]
    pub kernel: Option<PathBuf>,
    /// An initramfs: an absolute path on the daemon's host.
    #[serde(default)]
    #[schema(value_type = Option<String>)]
    pub initrd: Option<PathBuf>,
    /// The kernel command line.
    #[serde(default)]
    pub cmdline: Option<String>,
    #[serde(default)]
    pub vcpus: Option<u32>,
    /// `"256M"`, `"2G"` or a number of bytes.
    #[serde(default)]
    #[schema(value_type = Option<String>)]
    pub memory: Option<ByteSize>,
    /// `never` (default), `on-failure` or `always`.
    #[serde(default)]
    pub restart_policy: RestartPolicy,
    /// CPUs the VM may use in all: `"50%"` of one CPU, or a count like `"1.5"`. Default: its
    /// vCPU count.
    #[serde(default)]
    #[schema(value_type = Option<String>)]
    pub cpu_allowance: Option<CpuAllowance>,
    /// `io.max` limits: `[{"device": "/dev/sda" | "/path/on/the/disk" | "8:0", "rbps": "10M",
    /// "wbps": ..., "riops": N, "wiops": N}]`.
    #[serde(default)]
    pub io_max: Vec<IoMaxRequest>,
    /// virtio disks, in the order the guest sees them (vda, vdb, ...).
    #[serde(default)]
    pub disks: Vec<crate::devices::DiskReq>,
    /// virtio NICs on host taps (eth0, eth1, ...).
    #[serde(default)]
    pub nics: Vec<crate::devices::NicReq>,
    /// A vsock device for the guest agent (`vme exec`); on unless false.
    #[serde(default)]
    pub vsock: Option<bool>,
    /// Its security label, like `secret` or `secret:nato` (default: the lowest level). It
    /// must be within the creator's clearance, and dominate the image's.
    #[serde(default)]
    pub label: Option<String>,
    /// The project it goes to: set by the daemon from the request (`?project=`), never
    /// from the body.
    #[serde(skip)]
    pub project: Option<String>,
}

impl CreateVm {
    /// The project the VM goes to: the request's, else `default` (requests that did not
    /// pass access control carry none).
    pub fn project_or_default(&self) -> &str {
        self.project.as_deref().unwrap_or("default")
    }
}

/// Checks a create request's cgroup limits (after [`create`] checked its spec).
pub fn limits(req: &CreateVm, spec: &MachineSpec) -> Result<VmLimits, String> {
    crate::limits::check(req.cpu_allowance.as_ref(), &req.io_max, spec.vcpus)
}

/// Checks a create request and turns it into the machine spec the daemon stores, for the VM
/// keyed `key` (which names its default taps). The daemon fills in the host-specific parts
/// (control socket, console) at start.
pub fn create(req: &CreateVm, key: &str) -> Result<MachineSpec, String> {
    name(&req.name)?;
    let kernel = req.kernel.clone().ok_or(
        "the request names no kernel: give kernel (an absolute path on the daemon's host) or \
         image (a name from `vme image list`)",
    )?;
    let mut spec = MachineSpec::new(kernel);
    spec.arch = req.arch.unwrap_or_default();
    spec.initrd = req.initrd.clone();
    if let Some(c) = &req.cmdline {
        spec.cmdline = c.clone();
    }
    if let Some(v) = req.vcpus {
        spec.vcpus = v;
    }
    if let Some(m) = req.memory {
        spec.memory = m;
    }
    if spec.memory.bytes() < MIN_MEMORY || spec.memory.bytes() > MAX_MEMORY {
        return Err(format!(
            "memory {} is outside {}..{}: choose a size in that range, like 256M",
            spec.memory,
            ByteSize(MIN_MEMORY),
            ByteSize(MAX_MEMORY)
        ));
    }
    crate::devices::add(&mut spec, key, &req.disks, &req.nics)?;
    spec.validate(MAX_VCPUS).map_err(|e| e.to_string())?;
    file("kernel", &spec.kernel)?;
    if let Some(i) = &spec.initrd {
        file("initrd", i)?;
    }
    Ok(spec)
}

/// The daemon runs in another working directory than the client, so paths must be
/// absolute; and a missing file is better reported now than as a crash at start.
fn file(what: &str, p: &Path) -> Result<(), String> {
    if !p.is_absolute() {
        return Err(format!(
            "{what} path {} is relative: give an absolute path (the daemon does not share \
             your working directory)",
            p.display()
        ));
    }
    if !p.is_file() {
        return Err(format!(
            "{what} {} is not a readable file on the daemon's host: check the path",
            p.display()
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys() {
        assert!(key("web").is_ok() && key("acme_web").is_ok());
        for bad in ["acme_", "_web", "a_b_c", "../x", "a/b"] {
            assert!(key(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn good_names() {
        for n in ["a", "web-1", "VM2", &"x".repeat(63)] {
            assert_eq!(name(n), Ok(()), "{n}");
        }
    }

    #[test]
    fn bad_names() {
        for (n, why) in [
            ("", "empty"),
            ("a/b", "'/'"),
            ("..", "'..'"),
            ("a..b", "'..'"),
            (&"x".repeat(64), "limit is 63"),
            (&"x".repeat(300), "300 characters"),
            ("-a", "starts with '-'"),
            ("a b", "' '"),
            ("a.b", "'.'"),
            ("é", "'é'"),
        ] {
            let e = name(n).unwrap_err();
            assert!(e.contains(why), "{n:?}: {e}");
        }
    }

    fn req(json: &str) -> Result<CreateVm, serde_json::Error> {
        serde_json::from_str(json)
    }

    /// A file that surely exists, to stand in for a kernel.
    fn existing() -> String {
        std::env::current_exe().unwrap().display().to_string()
    }

    #[test]
    fn create_fills_defaults() {
        let k = existing();
        let spec = create(
            &req(&format!(r#"{{"name":"a","kernel":"{k}"}}"#)).unwrap(),
            "a",
        )
        .unwrap();
        assert_eq!(spec.vcpus, 1);
        assert_eq!(spec.memory.bytes(), 256 * MIB);
        let spec = create(
            &req(&format!(
                r#"{{"name":"a","kernel":"{k}","arch":"riscv64","vcpus":2,"memory":"512M"}}"#
            ))
            .unwrap(),
            "a",
        )
        .unwrap();
        assert_eq!((spec.arch, spec.vcpus), (Arch::Riscv64, 2));
        assert_eq!(spec.memory.bytes(), 512 * MIB);
    }

    #[test]
    fn unknown_fields_and_bad_types_are_refused() {
        assert!(req(r#"{"name":"a","kernel":"/k","memroy":"1G"}"#).is_err());
        assert!(req(r#"{"name":"a","kernel":"/k","vcpus":-1}"#).is_err());
        assert!(req(r#"{"name":"a","kernel":"/k","arch":"sparc"}"#).is_err());
        // No kernel and no image: parsed (either may come), refused by the check.
        let none = create(&req(r#"{"name":"a"}"#).unwrap(), "a").unwrap_err();
        assert!(none.contains("names no kernel"), "{none}");
    }

    #[test]
    fn absurd_sizes_are_refused() {
        let k = existing();
        for (extra, why) in [
            (r#""memory":"1P""#, ""),
            (r#""memory":"5000G""#, "outside"),
            (r#""memory":"1M""#, "outside"),
            (r#""vcpus":0"#, "at least 1"),
            (r#""vcpus":100000"#, "at most 256"),
        ] {
            let json = format!(r#"{{"name":"a","kernel":"{k}",{extra}}}"#);
            match req(&json) {
                Err(_) => assert!(why.is_empty(), "{json} should parse"),
                Ok(r) => {
                    let e = create(&r, "a").unwrap_err();
                    assert!(e.contains(why), "{json}: {e}");
                }
            }
        }
    }

    #[test]
    fn paths_must_be_absolute_existing_files() {
        let e = create(&req(r#"{"name":"a","kernel":"Image"}"#).unwrap(), "a").unwrap_err();
        assert!(e.contains("relative"), "{e}");
        let e = create(
            &req(r#"{"name":"a","kernel":"/nonexistent/Image"}"#).unwrap(),
            "a",
        )
        .unwrap_err();
        assert!(e.contains("not a readable file"), "{e}");
        let k = existing();
        let e = create(
            &req(&format!(
                r#"{{"name":"a","kernel":"{k}","initrd":"/no/initrd"}}"#
            ))
            .unwrap(),
            "a",
        )
        .unwrap_err();
        assert!(e.contains("initrd"), "{e}");
    }
}

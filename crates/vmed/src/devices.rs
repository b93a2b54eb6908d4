//! A VM's devices as users ask for them in a create request (`disks`, `nics`, `vsock`), and
//! what the daemon fills in: default tap names, stable MACs, the vsock CID and socket.

use crate::store::VmRecord;
use serde::Deserialize;
use std::io::Read;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use vme_api::spec::{DiskSpec, Mac, NetSpec};
use vme_api::vsock::{MAX_UDS_PATH_LEN, VsockSpec};
use vme_api::{Arch, MachineSpec};

/// More disks or NICs than this is a mistake, not a plan (and costs host threads).
pub const MAX_DISKS: usize = 16;
pub const MAX_NICS: usize = 8;
/// The riscv64 machine's virtio-mmio slots (vme-riscv's `MAX_VIRTIO_SLOTS`): disks, NICs,
/// the rng and vsock share them.
const RISCV_VIRTIO_SLOTS: usize = 8;

/// One entry of `disks`.
#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DiskReq {
    /// An absolute path to a raw image file or a block device.
    #[schema(value_type = String)]
    pub path: PathBuf,
    #[serde(default)]
    pub readonly: bool,
    #[serde(default)]
    pub serial: Option<String>,
}

/// One entry of `nics`.
#[derive(Debug, Clone, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NicReq {
    /// Default: derived from the VM's key (`vme-KEY-N`, the key being the VM's name in the
    /// `default` project and `PROJECT_NAME` elsewhere, or a hash of the key when that is
    /// too long for an interface name). Admin only. The daemon makes the tap, in the
    /// project's network (its bridge, its namespace), and removes it with the VM.
    #[serde(default)]
    pub tap: Option<String>,
    /// Default: a random locally administered address, drawn once and stored.
    #[serde(default)]
    #[schema(value_type = Option<String>, example = "52:54:00:12:34:56")]
    pub mac: Option<Mac>,
}

/// Adds the requested disks and NICs to `spec`, checking them; nothing touches the host.
pub fn add(
    spec: &mut MachineSpec,
    name: &str,
    disks: &[DiskReq],
    nics: &[NicReq],
) -> Result<(), String> {
    if disks.len() > MAX_DISKS {
        return Err(format!(
            "{} disks requested; the limit is {MAX_DISKS}: attach fewer",
            disks.len()
        ));
    }
    if nics.len() > MAX_NICS {
        return Err(format!(
            "{} NICs requested; the limit is {MAX_NICS}: attach fewer",
            nics.len()
        ));
    }
    for (i, d) in disks.iter().enumerate() {
        disk_file(i, &d.path)?;
        spec.disks.push(DiskSpec {
            path: d.path.clone(),
            readonly: d.readonly,
            serial: d.serial.clone(),
            ..DiskSpec::default()
        });
    }
    for (i, n) in nics.iter().enumerate() {
        spec.nets.push(NetSpec {
            tap: n.tap.clone().unwrap_or_else(|| default_tap(name, i)),
            mac: Some(n.mac.unwrap_or_else(random_mac)),
            ..NetSpec::default()
        });
    }
    Ok(())
}

/// Gives the VM a vsock device with a CID no other VM of this daemon has (the lowest free
/// one from 3), its socket in the VM's directory; and checks that no other VM uses one of
/// its taps. Runs under the store's lock, so two creates cannot take the same CID.
pub fn assign(
    spec: &mut MachineSpec,
    vsock: bool,
    uds: PathBuf,
    others: &[VmRecord],
) -> Result<(), String> {
    for net in &spec.nets {
        if let Some(vm) = others
            .iter()
            .find(|v| v.spec.nets.iter().any(|n| n.tap == net.tap))
        {
            return Err(format!(
                "tap {:?} is already VM {:?}'s: give this VM another with tap=NAME",
                net.tap, vm.name
            ));
        }
    }
    if vsock {
        if uds.as_os_str().len() > MAX_UDS_PATH_LEN {
            return Err(format!(
                "the VM's vsock socket {} would be longer than {MAX_UDS_PATH_LEN} bytes: use a \
                 shorter VM name or state dir, or create it with vsock: false",
                uds.display()
            ));
        }
        let used: Vec<u64> = others
            .iter()
            .filter_map(|v| v.spec.vsock.as_ref().map(|s| s.cid))
            .collect();
        let cid = (3..).find(|c| !used.contains(c)).unwrap_or(3);
        spec.vsock = Some(VsockSpec { cid, uds });
    }
    if spec.arch == Arch::Riscv64 {
        let wanted = spec.disks.len()
            + spec.nets.len()
            + usize::from(spec.rng)
            + usize::from(spec.balloon)
            + usize::from(spec.vsock.is_some());
        if wanted > RISCV_VIRTIO_SLOTS {
            return Err(format!(
                "{} disks and {} NICs with the rng{} need {wanted} virtio slots; a riscv64 \
                 machine has {RISCV_VIRTIO_SLOTS}: attach fewer",
                spec.disks.len(),
                spec.nets.len(),
                if spec.vsock.is_some() {
                    " and vsock"
                } else {
                    ""
                }
            ));
        }
    }
    Ok(())
}

/// A disk must be there now: a typo is better refused at create than found as a crash at
/// start. A regular file or a block device, named by an absolute path (the daemon does not
/// share the client's working directory).
fn disk_file(i: usize, p: &Path) -> Result<(), String> {
    if !p.is_absolute() {
        return Err(format!(
            "disk {i} path {} is relative: give an absolute path (the daemon does not share \
             your working directory)",
            p.display()
        ));
    }
    let kind = std::fs::metadata(p)
        .map_err(|e| format!("disk {i} {}: {e}: check the path", p.display()))?
        .file_type();
    if !(kind.is_file() || kind.is_block_device()) {
        return Err(format!(
            "disk {i} {} is neither a regular file nor a block device: give a disk image",
            p.display()
        ));
    }
    Ok(())
}

/// `vme-NAME-N` when it fits an interface name (15 bytes), else `vmeHASH-N`: stable for a
/// name, and unlike another VM's in practice (a clash is refused at create).
pub fn default_tap(name: &str, i: usize) -> String {
    let plain = format!("vme-{name}-{i}");
    if plain.len() <= vme_api::spec::MAX_TAP_NAME_LEN {
        return plain;
    }
    // FNV-1a: tiny, stable across releases (std's hasher is not).
    let hash = name.bytes().fold(0x811c_9dc5u32, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    });
    format!("vme{hash:08x}-{i}")
}

/// A random locally administered unicast MAC, so the guest sees the same one at every start.
fn random_mac() -> Mac {
    let mut bytes = [0u8; 6];
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        let _ = f.read_exact(&mut bytes);
    }
    if bytes == [0; 6] {
        // No urandom (a strange host): the clock's nanoseconds still differ per call.
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(1);
        bytes.copy_from_slice(&t.to_le_bytes()[..6]);
    }
    Mac::from_random(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_taps_fit_and_are_stable() {
        assert_eq!(default_tap("web", 0), "vme-web-0");
        let long = default_tap("a-rather-long-vm-name", 3);
        assert!(long.len() <= 15 && long.ends_with("-3"), "{long}");
        assert_eq!(long, default_tap("a-rather-long-vm-name", 3));
        assert_ne!(long, default_tap("a-rather-long-vm-namf", 3));
        let spec = NetSpec {
            tap: long,
            ..NetSpec::default()
        };
        assert!(spec.validate().is_ok());
    }

    #[test]
    fn disks_must_be_absolute_existing_files() {
        let mut spec = MachineSpec::new("/k");
        let d = |p: &str| DiskReq {
            path: p.into(),
            readonly: false,
            serial: None,
        };
        for (p, why) in [
            ("disk.img", "relative"),
            ("/nonexistent/disk.img", "No such file"),
            ("/tmp", "neither a regular file"),
        ] {
            let e = add(&mut spec, "a", &[d(p)], &[]).unwrap_err();
            assert!(e.contains(why), "{p}: {e}");
        }
        let many = vec![d("/x"); MAX_DISKS + 1];
        assert!(
            add(&mut spec, "a", &many, &[])
                .unwrap_err()
                .contains("limit")
        );
        let exe = std::env::current_exe().unwrap();
        add(
            &mut spec,
            "a",
            &[d(exe.to_str().unwrap())],
            &[NicReq::default()],
        )
        .unwrap();
        assert_eq!(spec.nets[0].tap, "vme-a-0");
        assert!(spec.nets[0].mac.is_some_and(|m| m.0[0] & 3 == 2));
    }
}

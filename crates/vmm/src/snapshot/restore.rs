//! `vme-vmm --restore DIR`: the machine comes from the snapshot; only what ties the VM to
//! this host may be given again. Device backends are matched by position: the first
//! `--disk` replaces the snapshot's first disk, and so on; a device not given keeps the
//! snapshot's backend.

use super::format::StateFile;
use super::{Restore, STATE_FILE, clone};
use crate::cli::{self, RunArgs};
use std::path::Path;
use std::time::Instant;
use vme_api::MachineSpec;

/// The spec of the snapshot in `dir` with the flags' overrides, checked, and the snapshot.
pub fn restore_spec(dir: &Path, args: &RunArgs) -> Result<(MachineSpec, Restore), String> {
    let started = Instant::now();
    refuse_machine_flags(args)?;
    let file = StateFile::read(&dir.join(STATE_FILE)).map_err(|e| e.to_string())?;
    let (spec, clone) = spec_of(&file, dir, args)?;
    let restore = Restore {
        dir: dir.to_path_buf(),
        file,
        started,
        memory: None,
        gate: Default::default(),
        clone,
    };
    Ok((spec, restore))
}

/// The spec a checked state file holds (`from` names where it came from, for messages),
/// with the flags' overrides, checked against this host. Shared by `--restore` and
/// `--migrate-listen`.
pub fn spec_of(
    file: &StateFile,
    from: &Path,
    args: &RunArgs,
) -> Result<(MachineSpec, Option<clone::CloneIdentity>), String> {
    let dir = from;
    let text: String = file.section("config").map_err(|e| e.to_string())?;
    let mut spec =
        MachineSpec::from_toml(&text).map_err(|e| file.invalid("config", e).to_string())?;
    if file.header.arch != spec.arch.to_string() {
        return Err(file
            .invalid(
                "config",
                format!(
                    "the machine is {} but the header says {}",
                    spec.arch, file.header.arch
                ),
            )
            .to_string());
    }
    log::info!(
        "restoring {} (a {} snapshot written by vme-vmm {})",
        dir.display(),
        file.header.arch,
        file.writer
    );
    if file.header.memory_bytes != spec.memory.bytes() {
        return Err(file
            .invalid(
                "config",
                format!(
                    "the machine has {} bytes of memory but the header says {}",
                    spec.memory.bytes(),
                    file.header.memory_bytes
                ),
            )
            .to_string());
    }
    let saved = spec.clone();
    if args.disks.len() > spec.disks.len() {
        return Err(format!(
            "{} --disk given, but the snapshot's VM has {} disks: give at most one per disk, in \
             order",
            args.disks.len(),
            spec.disks.len()
        ));
    }
    for (saved, new) in spec.disks.iter_mut().zip(&args.disks) {
        let serial = saved.serial.take();
        *saved = new.clone();
        // The guest has read the serial; keep it unless one is given.
        saved.serial = saved.serial.take().or(serial);
    }
    if args.nets.len() > spec.nets.len() {
        return Err(format!(
            "{} --net given, but the snapshot's VM has {} network devices: give at most one per \
             device, in order",
            args.nets.len(),
            spec.nets.len()
        ));
    }
    for (saved, new) in spec.nets.iter_mut().zip(&args.nets) {
        let mac = saved.mac;
        *saved = new.clone();
        // The guest knows its MAC; keep it unless one is given (then it must be the same).
        saved.mac = saved.mac.or(mac);
    }
    if let Some(v) = &args.vsock {
        if spec.vsock.is_none() {
            return Err("--vsock given, but the snapshot's VM has no vsock device: drop it".into());
        }
        let mut v = v.clone();
        // `--vsock uds=PATH` alone moves the socket and keeps the guest's CID.
        if v.cid == vme_api::vsock::CID_UNSET {
            v.cid = saved.vsock.as_ref().map_or(v.cid, |s| s.cid);
        }
        spec.vsock = Some(v);
    }
    let clone = match args.clone {
        true => Some(clone::new_identity(dir, &mut spec, &saved, args)?),
        false => None,
    };
    // The host side of this process, not of the VM: from the flags, as for a new VM.
    spec.control_socket = args.control_socket.clone();
    spec.serial = args.serial.clone().unwrap_or_default();
    if let Some(v) = args.on_reboot {
        spec.on_reboot = v;
    }
    spec.validate(cli::MAX_VCPUS)
        .map_err(|e| format!("the snapshot's machine with the flags given: {e}"))?;
    for disk in &spec.disks {
        cli::check_disk(disk)?;
    }
    cli::check_host_memory(spec.memory)?;
    Ok((spec, clone))
}

/// Flags that describe the machine itself cannot go with `--restore` (or
/// `--migrate-listen`: the sender fixes the machine as a snapshot does).
pub fn refuse_machine_flags(a: &RunArgs) -> Result<(), String> {
    let given: Vec<&str> = [
        (a.config.is_some(), "--config"),
        (a.print_config, "--print-config"),
        (a.arch.is_some(), "--arch"),
        (a.kernel.is_some(), "--kernel"),
        (a.initrd.is_some(), "--initrd"),
        (a.cmdline.is_some(), "--cmdline"),
        (a.vcpus.is_some(), "--vcpus"),
        (a.memory.is_some(), "--memory"),
        (a.cpu_template.is_some(), "--cpu-template"),
        (a.rng.is_some(), "--rng"),
        (a.balloon.is_some(), "--balloon"),
        (a.free_page_reporting.is_some(), "--free-page-reporting"),
    ]
    .into_iter()
    .filter_map(|(on, flag)| on.then_some(flag))
    .collect();
    if given.is_empty() {
        return Ok(());
    }
    Err(format!(
        "{} cannot go with --restore or --migrate-listen: the snapshot (or the sender) fixes \
         the machine; only --disk, --net, --vsock (device backends, by position), --clone (with \
         --restore), --control-socket, --serial and --on-reboot may be given",
        given.join(", ")
    ))
}

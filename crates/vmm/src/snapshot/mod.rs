//! Snapshots: a VM's whole state in a directory, restored by a new monitor
//! (`vme-vmm --restore DIR`) that continues exactly where the VM was.
//!
//! A snapshot directory holds two files:
//! - `state`: the format version, the monitor version, the architecture and CPU model, then
//!   one section per part of the VM (`config`: the machine file; `machine`, `hart.N`,
//!   `clint`, `plic` on riscv64; `machine`, `vm`, `vcpu.N`, `rtc`, `acpi`, `pci` on
//!   x86_64; `serial`; `virtio.N` per virtio slot), each with its length and CRC-32C
//!   ([`format`]);
//! - `memory`: guest RAM as a sparse file ([`memory`]), mapped privately on restore so pages
//!   load on first touch and restoring takes the same time for any memory size.
//!
//! Both are written to temporary names and renamed into place, the old `state` removed
//! first: an interrupted snapshot leaves a directory without `state`, never a state file
//! beside another snapshot's memory. A VM restored from a directory may snapshot into it
//! again (its memory stays mapped from the replaced file, which lives on until unmapped).
//!
//! On restore both files are untrusted: the state file is checked whole (checksums,
//! lengths, counts) before any section is decoded, and each part checks its own state (a
//! hart's CSRs against its WARL masks, a queue's rings against the restored RAM). What a
//! snapshot does not hold: disk contents (keep each image as it was at the snapshot, e.g.
//! stop the VM or copy the image beside the snapshot), host connections (vsock connections
//! are reset, the guest is told), a frame received but not yet given to the guest.
//!
//! Diff snapshots (`snapshot DIR --diff`) hold only the pages written since the VM's
//! previous snapshot and name it as their parent ([`lineage`], [`diff`]); a restore maps
//! the chain's memory files over each other, still lazily.
//!
//! Each machine kind writes and reads its own sections ([`riscv`], [`x86`]); the container,
//! the memory file and the virtio core's state are shared.

pub mod clone;
pub mod crc32c;
pub mod diff;
pub mod format;
pub mod lineage;
pub mod memory;
pub mod restore;
pub mod riscv;
pub mod x86;

use format::{StateFile, StateWriter};
use std::path::{Path, PathBuf};
use std::time::Instant;
use vme_api::MachineSpec;
use vme_api::control::SnapshotInfo;

pub const STATE_FILE: &str = "state";
pub const MEMORY_FILE: &str = "memory";

/// What a restored machine must pass before its vCPUs run: an incoming migration's
/// handshake (ready, then the sender's commit). It says whether the VM starts paused (it
/// was paused at the sender).
pub type Gate = Box<dyn FnOnce() -> Result<bool, String> + Send>;

/// A snapshot being restored: its checked state file, and when restoring began.
pub struct Restore {
    pub dir: PathBuf,
    pub file: StateFile,
    pub started: Instant,
    /// Guest RAM received by a migration (in memory), instead of the directory's file.
    pub memory: Option<std::fs::File>,
    /// Run once, just before the machine starts; the machine does not run if it fails.
    pub gate: std::sync::Mutex<Option<Gate>>,
    /// Set for `--clone`: the VM's new identity.
    pub clone: Option<clone::CloneIdentity>,
}

impl Restore {
    /// Passes the gate, if there is one (only the first call runs it); whether the VM
    /// starts paused.
    pub fn pass_gate(&self) -> Result<bool, String> {
        let gate = self.gate.lock().unwrap_or_else(|p| p.into_inner()).take();
        gate.map_or(Ok(false), |g| g())
    }

    /// Opens the memory file for mapping.
    pub fn memory_file(&self) -> Result<std::fs::File, String> {
        if let Some(f) = &self.memory {
            return f
                .try_clone()
                .map_err(|e| format!("cannot reopen the received guest memory: {e}"));
        }
        let path = self.dir.join(MEMORY_FILE);
        std::fs::File::open(&path).map_err(|e| {
            format!(
                "cannot open the snapshot's memory file {}: {e}; a snapshot directory holds \
                 both `state` and `memory`",
                path.display()
            )
        })
    }
}

/// Refuses a snapshot of another architecture or CPU model than `arch`/`cpu`, saying why.
pub fn check_machine(file: &StateFile, arch: &str, cpu: &str) -> Result<(), String> {
    let h = &file.header;
    if h.arch != arch {
        return Err(format!(
            "snapshot {} is of an {} VM; this monitor restores {arch} snapshots only so far",
            file.path.display(),
            h.arch
        ));
    }
    if h.cpu != cpu {
        return Err(format!(
            "snapshot {} was taken on CPUs implementing {}, but this monitor's {arch} CPUs \
             implement {cpu}: restore it with the vme-vmm that took it",
            file.path.display(),
            h.cpu
        ));
    }
    Ok(())
}

/// What each virtio slot of `spec` is, in slot order (as `virtio::devices` places them),
/// for messages.
pub fn slot_names(spec: &MachineSpec) -> Vec<String> {
    let mut names: Vec<String> = spec
        .disks
        .iter()
        .enumerate()
        .map(|(i, d)| format!("disk {i} ({})", d.path.display()))
        .collect();
    names.extend(
        spec.nets
            .iter()
            .enumerate()
            .map(|(i, n)| format!("network device {i} (tap {})", n.tap)),
    );
    for (on, name) in [
        (spec.rng, "the rng"),
        (spec.balloon, "the balloon"),
        (spec.vsock.is_some(), "vsock"),
    ] {
        if on {
            names.push(name.into());
        }
    }
    names
}

/// The saved state of every virtio slot of `spec` (`virtio.N`, a transport's state each);
/// a snapshot with more or fewer is refused.
pub fn virtio_states<T: serde::de::DeserializeOwned + clone::SlotState>(
    r: &Restore,
    spec: &MachineSpec,
) -> Result<Vec<T>, String> {
    let f: &StateFile = &r.file;
    let n = slot_names(spec).len();
    if f.has_section(&format!("virtio.{n}")) {
        return Err(f
            .invalid(
                &format!("virtio.{n}"),
                format!("the machine file has {n} virtio devices, the snapshot more"),
            )
            .to_string());
    }
    let mut states = (0..n)
        .map(|i| f.section(&format!("virtio.{i}")).map_err(|e| e.to_string()))
        .collect::<Result<Vec<T>, _>>()?;
    if r.clone.is_some() {
        clone::adopt_macs(&mut states, spec);
    }
    Ok(states)
}

/// `spec` with the paths a later restore needs made absolute (it may run elsewhere).
pub fn absolute_spec(spec: &MachineSpec) -> MachineSpec {
    let abs = |p: &Path| std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf());
    let mut s = spec.clone();
    s.kernel = abs(&s.kernel);
    s.initrd = s.initrd.as_deref().map(abs);
    for d in &mut s.disks {
        d.path = abs(&d.path);
        d.base = d.base.as_deref().map(abs);
    }
    if let Some(v) = &mut s.vsock {
        v.uds = abs(&v.uds);
    }
    s.control_socket = None;
    // Where a restored VM is confined is its restorer's choice (--jail), not the sender's.
    s.jail = None;
    s
}

/// Writes a snapshot into `dir` (created if missing): the memory file from `read`, which
/// copies `size` bytes of RAM from an offset, then the state file.
pub fn write_dir(
    dir: &Path,
    state: &StateWriter,
    size: u64,
    read: impl FnMut(u64, &mut [u8]) -> Result<(), String>,
    started: Instant,
) -> Result<SnapshotInfo, String> {
    write_dir_with(dir, state, size, |p| memory::write(p, size, read), started)
}

/// [`write_dir`] with the memory file written by `write_memory(path)` (a diff's pages).
pub fn write_dir_with(
    dir: &Path,
    state: &StateWriter,
    size: u64,
    write_memory: impl FnOnce(&Path) -> Result<memory::MemoryFileStats, String>,
    started: Instant,
) -> Result<SnapshotInfo, String> {
    std::fs::create_dir_all(dir).map_err(|e| {
        format!(
            "cannot create snapshot directory {}: {e}; check the path and its permissions",
            dir.display()
        )
    })?;
    let (mem_tmp, state_tmp) = (dir.join(".memory.tmp"), dir.join(".state.tmp"));
    let mem = write_memory(&mem_tmp)?;
    let bytes = state.encode().map_err(|e| e.to_string())?;
    let io =
        |what: &str, p: &Path, e: std::io::Error| format!("cannot {what} {}: {e}", p.display());
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&state_tmp).map_err(|e| io("create", &state_tmp, e))?;
        f.write_all(&bytes)
            .map_err(|e| io("write", &state_tmp, e))?;
        f.sync_all().map_err(|e| io("sync", &state_tmp, e))?;
    }
    let state_path = dir.join(STATE_FILE);
    match std::fs::remove_file(&state_path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(io("replace", &state_path, e));
        }
        _ => {}
    }
    let mem_path = dir.join(MEMORY_FILE);
    std::fs::rename(&mem_tmp, &mem_path).map_err(|e| io("rename into", &mem_path, e))?;
    std::fs::rename(&state_tmp, &state_path).map_err(|e| io("rename into", &state_path, e))?;
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io("sync", dir, e))?;
    Ok(SnapshotInfo {
        dir: dir.display().to_string(),
        state_bytes: bytes.len() as u64,
        memory_bytes: size,
        memory_data_bytes: mem.data_bytes,
        memory_disk_bytes: mem.disk_bytes,
        took_ms: started.elapsed().as_millis() as u64,
        id: None,
        parent: None,
    })
}

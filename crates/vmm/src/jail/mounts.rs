//! The jail's file system (step 3 of [`super`]): what is visible inside it, and how it
//! becomes the root.

use super::check;
use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use vme_api::{MachineSpec, SerialSpec};

/// What the jail shows of the host, each at its host path.
#[derive(Debug, Default)]
pub struct Layout {
    /// Read only: kernel, initrd, overlay bases, read-only disks, the snapshot restored.
    read_only: Vec<PathBuf>,
    /// Written in place: the VM's volumes.
    read_write: Vec<PathBuf>,
    /// Directories the monitor creates files in: those of its sockets and console log.
    dirs: Vec<PathBuf>,
    /// x86_64: /dev/kvm, and the host's PVM marker (the CPU template depends on it).
    kvm: bool,
}

/// The host's PVM marker (see vme_hypervisor::Kvm::is_pvm).
const PVM_MODULE: &str = "/sys/module/kvm_pvm";

impl Layout {
    /// The layout of `spec` (paths already absolute); `restore`: a snapshot directory.
    pub fn of(spec: &MachineSpec, restore: Option<&Path>) -> Layout {
        let mut l = Layout {
            kvm: super::uses_kvm(spec),
            ..Layout::default()
        };
        l.read_only.push(spec.kernel.clone());
        l.read_only.extend(spec.initrd.clone());
        l.read_only.extend(restore.map(Path::to_path_buf));
        for d in &spec.disks {
            match d.readonly {
                true => l.read_only.push(d.path.clone()),
                false => l.read_write.push(d.path.clone()),
            }
            l.read_only.extend(d.base.clone());
        }
        let mut parent = |p: &Path| {
            if let Some(d) = p.parent() {
                l.dirs.push(d.to_path_buf());
            }
        };
        if let Some(c) = &spec.control_socket {
            parent(c);
        }
        match &spec.serial {
            SerialSpec::File(p) => parent(p),
            SerialSpec::Socket { path, log, .. } => {
                parent(path);
                if let Some(log) = log {
                    parent(log);
                }
            }
            SerialSpec::Stdio | SerialSpec::None => {}
        }
        if let Some(v) = &spec.vsock {
            // Its guest-initiated connections go to sockets beside it (`<uds>_<port>`).
            parent(&v.uds);
        }
        for v in [&mut l.read_only, &mut l.read_write, &mut l.dirs] {
            v.sort();
            v.dedup();
        }
        l
    }
}

/// Builds the jail in `dir` and makes it the root (see the module doc of [`super`]).
pub fn build(dir: &Path, layout: &Layout, uid: u32, gid: u32) -> Result<(), String> {
    // Nothing we mount may leak back to the host, nor the host's later mounts in.
    mount(
        None,
        Path::new("/"),
        None,
        libc::MS_REC | libc::MS_PRIVATE,
        None,
    )?;
    // pivot_root needs the new root to be a mount point.
    mount(Some(dir), dir, None, libc::MS_BIND, None)?;
    let mut binds: Vec<(&Path, bool)> = Vec::new();
    binds.extend(layout.dirs.iter().map(|p| (p.as_path(), true)));
    binds.extend(layout.read_write.iter().map(|p| (p.as_path(), true)));
    binds.extend(layout.read_only.iter().map(|p| (p.as_path(), false)));
    // Shortest first: a directory's bind must not hide a file bound below it.
    binds.sort_by_key(|(p, _)| p.components().count());
    for (path, writable) in binds {
        bind(dir, path, writable)?;
    }
    if layout.kvm && Path::new(PVM_MODULE).exists() {
        bind(dir, Path::new(PVM_MODULE), false)?;
    }
    devices(dir, layout, uid, gid)?;
    proc(dir)?;
    pivot(dir)
}

/// Binds host `path` at the same path inside `dir`; read-only unless `writable`. Nothing
/// inside may be executed, be a device, or raise privileges.
fn bind(dir: &Path, path: &Path, writable: bool) -> Result<(), String> {
    let meta = std::fs::metadata(path)
        .map_err(|e| format!("{}: {e}: the VM needs it inside its jail", path.display()))?;
    let target = inside(dir, path);
    if meta.is_dir() {
        std::fs::create_dir_all(&target)
    } else {
        let made = match target.parent() {
            Some(p) => std::fs::create_dir_all(p),
            None => Ok(()),
        };
        // An empty file as the mount point; an existing one (the same file, through a
        // directory bound before) is left alone.
        made.and_then(|()| match target.symlink_metadata() {
            Ok(_) => Ok(()),
            Err(_) => std::fs::File::create(&target).map(|_| ()),
        })
    }
    .map_err(|e| format!("cannot make the mount point {}: {e}", target.display()))?;
    mount(Some(path), &target, None, libc::MS_BIND, None)?;
    let mut flags =
        libc::MS_BIND | libc::MS_REMOUNT | libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
    if !writable {
        flags |= libc::MS_RDONLY;
    }
    mount(None, &target, None, flags, None)
}

/// `path` (absolute) under `dir`.
fn inside(dir: &Path, path: &Path) -> PathBuf {
    dir.join(path.strip_prefix("/").unwrap_or(path))
}

/// A private /dev holding only the nodes the monitor opens: /dev/urandom (read only) and,
/// for KVM, /dev/kvm owned by the jail's uid (so it needs no group of the host's).
fn devices(dir: &Path, layout: &Layout, uid: u32, gid: u32) -> Result<(), String> {
    let dev = dir.join("dev");
    std::fs::create_dir_all(&dev).map_err(|e| format!("{}: {e}", dev.display()))?;
    mount(
        Some(Path::new("tmpfs")),
        &dev,
        Some("tmpfs"),
        libc::MS_NOSUID | libc::MS_NOEXEC,
        Some("mode=755,size=64k"),
    )?;
    node("/dev/urandom", &dev.join("urandom"), 0o444, None)?;
    if layout.kvm {
        node("/dev/kvm", &dev.join("kvm"), 0o600, Some((uid, gid)))?;
    }
    Ok(())
}

/// A character device like the host's `host` (same numbers) at `at`.
fn node(host: &str, at: &Path, mode: u32, owner: Option<(u32, u32)>) -> Result<(), String> {
    let meta = std::fs::metadata(host).map_err(|e| format!("{host}: {e}"))?;
    if !meta.file_type().is_char_device() {
        return Err(format!("{host} is not a character device"));
    }
    let c = cstr(at)?;
    check(
        // SAFETY: mknod(2) reads a NUL-terminated path that outlives the call.
        unsafe { libc::mknod(c.as_ptr(), libc::S_IFCHR | mode, meta.rdev()) },
        &format!("mknod {}", at.display()),
    )?;
    if let Some((uid, gid)) = owner {
        check(
            // SAFETY: chown(2) on the NUL-terminated path we just made.
            unsafe { libc::chown(c.as_ptr(), uid, gid) },
            &format!("chown {}", at.display()),
        )?;
    }
    Ok(())
}

/// A /proc of the jail's PID namespace showing only process directories (`subset=pid`) of
/// the same uid (`hidepid`): the monitor reads its own status there (memory use), nothing of
/// the host's. Kernels without `subset=` get none: the monitor then reports no RSS.
fn proc(dir: &Path) -> Result<(), String> {
    let p = dir.join("proc");
    std::fs::create_dir_all(&p).map_err(|e| format!("{}: {e}", p.display()))?;
    let flags = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
    if let Err(e) = mount(
        Some(Path::new("proc")),
        &p,
        Some("proc"),
        flags,
        Some("subset=pid,hidepid=invisible"),
    ) {
        log::warn!("jail: no /proc inside ({e})");
    }
    Ok(())
}

/// `pivot_root` into `dir` with the old root stacked on it, then detached; the new root is
/// made read-only (only the binds above are writable).
fn pivot(dir: &Path) -> Result<(), String> {
    std::env::set_current_dir(dir).map_err(|e| format!("chdir {}: {e}", dir.display()))?;
    let dot = cstr(Path::new("."))?;
    check(
        // SAFETY: pivot_root(2) reads two NUL-terminated paths that outlive the call.
        unsafe { libc::syscall(libc::SYS_pivot_root, dot.as_ptr(), dot.as_ptr()) as i32 },
        "pivot_root",
    )?;
    check(
        // SAFETY: umount2(2) reads a NUL-terminated path; the old root, stacked on ".".
        unsafe { libc::umount2(dot.as_ptr(), libc::MNT_DETACH) },
        "detaching the old root",
    )?;
    std::env::set_current_dir("/").map_err(|e| format!("chdir /: {e}"))?;
    mount(
        None,
        Path::new("/"),
        None,
        libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV,
        None,
    )
}

fn cstr(p: &Path) -> Result<CString, String> {
    CString::new(p.as_os_str().as_bytes())
        .map_err(|_| format!("path {} contains a NUL byte", p.display()))
}

fn mount(
    src: Option<&Path>,
    target: &Path,
    fstype: Option<&str>,
    flags: libc::c_ulong,
    data: Option<&str>,
) -> Result<(), String> {
    let src_c = src.map(cstr).transpose()?;
    let target_c = cstr(target)?;
    let fstype_c = fstype.map(|f| CString::new(f).unwrap_or_default());
    let data_c = data.map(|d| CString::new(d).unwrap_or_default());
    let ptr = |c: &Option<CString>| c.as_ref().map_or(std::ptr::null(), |c| c.as_ptr());
    // SAFETY: mount(2) reads NUL-terminated strings (or nulls where allowed) that outlive
    // the call.
    let rc = unsafe {
        libc::mount(
            ptr(&src_c),
            target_c.as_ptr(),
            ptr(&fstype_c),
            flags,
            ptr(&data_c).cast(),
        )
    };
    check(
        rc,
        &format!(
            "mount {} on {}",
            src.map_or("-".into(), |s| s.display().to_string()),
            target.display()
        ),
    )
}

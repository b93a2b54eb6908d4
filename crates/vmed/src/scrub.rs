//! Removes machine-specific secrets from an ext2/3/4 root volume before it is published as
//! an image, so VMs made from the image do not share one identity, host keys or logs.
//!
//! The volume was written by a guest, so its filesystem is hostile input. It is never
//! mounted (that would hand the host kernel's ext4 code a crafted image); `debugfs`, in user
//! space, edits it instead, running as `nobody` with no way to reach any file but the
//! volume, which it gets as an inherited descriptor.

use serde::Serialize;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};

/// Files emptied (kept, so what reads them finds an empty file and makes a new identity).
const EMPTIED: &[&str] = &["/etc/machine-id"];
/// Single files removed.
const REMOVED: &[&str] = &[
    "/var/lib/dbus/machine-id",
    "/var/lib/systemd/random-seed",
    "/var/lib/urandom/random-seed",
];
/// Directories whose matching entries are removed: (dir, name prefix).
const REMOVED_IN: &[(&str, &str)] = &[("/etc/ssh", "ssh_host_"), ("/var/lib/dhcp", "dhclient")];
/// Histories removed from /root and each home directory.
const HISTORIES: &[&str] = &[
    ".bash_history",
    ".ash_history",
    ".sh_history",
    ".zsh_history",
    ".python_history",
    ".lesshst",
    ".viminfo",
];
/// Trees whose regular files are emptied: the files stay with their owners and modes
/// (btmp is root:utmp 0660), as do the directories, for the services that log into them.
const EMPTIED_TREES: &[&str] = &["/var/log"];
/// Trees whose regular files are removed: the journal's files are named by the old
/// machine-id and are not valid empty; the agent's state belongs to the old VM.
const REMOVED_TREES: &[&str] = &["/var/log/journal", "/var/lib/vme-agent"];
/// `nobody`: debugfs runs as it.
const NOBODY: u32 = 65534;
/// Directories deeper than this under a tree are left alone (a hostile image may nest
/// without end).
const MAX_DEPTH: usize = 16;
/// Entries listed at most, in all (the same).
const MAX_ENTRIES: usize = 100_000;

/// What scrubbing did to one path.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct Scrubbed {
    pub path: String,
    /// `emptied`, `removed`, or `absent` (it was not there: nothing to do).
    pub action: &'static str,
}

#[derive(Debug, thiserror::Error)]
pub enum ScrubError {
    #[error(
        "the volume is not an ext2/3/4 filesystem (no ext superblock at its start): only ext4 \
         roots can be scrubbed; publish a VM whose root disk is an unpartitioned ext4 volume"
    )]
    NotExt,
    #[error("cannot read the volume {0}: {1}")]
    Io(String, std::io::Error),
    #[error("debugfs {0}; install e2fsprogs (apt-get install e2fsprogs)")]
    Debugfs(String),
    #[error("e2fsck found the scrubbed volume damaged ({0}); the image was not published")]
    Damaged(String),
}

/// Scrubs `volume` (an ext2/3/4 image file, not in use) in place; returns what it did,
/// item by item.
pub fn scrub_ext4(volume: &Path) -> Result<Vec<Scrubbed>, ScrubError> {
    let io = |e| ScrubError::Io(volume.display().to_string(), e);
    let mut file = File::options()
        .read(true)
        .write(true)
        .open(volume)
        .map_err(io)?;
    check_superblock(&mut file).map_err(|e| match e {
        None => ScrubError::NotExt,
        Some(e) => io(e),
    })?;
    // The volume is made nobody's while debugfs works on it, then given back.
    let meta = file.metadata().map_err(io)?;
    let restore = (meta.permissions().mode(), meta.uid(), meta.gid());
    std::os::unix::fs::fchown(&file, Some(NOBODY), Some(NOBODY)).map_err(io)?;
    let result = scrub_file(&file).and_then(|done| fsck(&file).map(|()| done));
    let back = std::os::unix::fs::fchown(&file, Some(restore.1), Some(restore.2))
        .and_then(|()| file.set_permissions(std::fs::Permissions::from_mode(restore.0)));
    let done = result?;
    back.map_err(io)?;
    Ok(done)
}

/// Ok when `file` starts with an ext2/3/4 superblock; Err(None) when it does not.
fn check_superblock(file: &mut File) -> Result<(), Option<std::io::Error>> {
    let mut magic = [0u8; 2];
    file.seek(SeekFrom::Start(1024 + 56)).map_err(Some)?;
    match file.read_exact(&mut magic) {
        Ok(()) if u16::from_le_bytes(magic) == 0xEF53 => Ok(()),
        Ok(()) => Err(None),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Err(None),
        Err(e) => Err(Some(e)),
    }
}

fn scrub_file(file: &File) -> Result<Vec<Scrubbed>, ScrubError> {
    let mut done = Vec::new();
    let mut commands = String::new();
    let mut budget = MAX_ENTRIES;
    let mut act = |path: String, action: &'static str, done: &mut Vec<Scrubbed>| {
        match action {
            // Blocks freed, size 0: the inode (owner, mode) stays.
            "emptied" => commands.push_str(&format!("punch {path} 0\nsif {path} size 0\n")),
            _ => commands.push_str(&format!("rm {path}\n")),
        }
        done.push(Scrubbed { path, action });
    };
    for path in EMPTIED {
        if exists(file, path)? {
            act(path.to_string(), "emptied", &mut done);
        } else {
            done.push(item(path, "absent"));
        }
    }
    let mut remove = |path: String, done: &mut Vec<Scrubbed>| act(path, "removed", done);
    for path in REMOVED {
        if exists(file, path)? {
            remove(path.to_string(), &mut done);
        } else {
            done.push(item(path, "absent"));
        }
    }
    let homes = list(file, "/home", &mut budget)?
        .into_iter()
        .filter(|e| e.dir)
        .map(|e| format!("/home/{}", e.name));
    let mut any_history = false;
    for home in std::iter::once("/root".to_string()).chain(homes) {
        for e in list(file, &home, &mut budget)? {
            if !e.dir && HISTORIES.contains(&e.name.as_str()) {
                remove(format!("{home}/{}", e.name), &mut done);
                any_history = true;
            }
        }
    }
    if !any_history {
        done.push(item("shell histories", "absent"));
    }
    for (dir, prefix) in REMOVED_IN {
        let mut any = false;
        for e in list(file, dir, &mut budget)? {
            if !e.dir && e.name.starts_with(prefix) {
                remove(format!("{dir}/{}", e.name), &mut done);
                any = true;
            }
        }
        if !any {
            done.push(Scrubbed {
                path: format!("{dir}/{prefix}*"),
                action: "absent",
            });
        }
    }
    let trees = REMOVED_TREES
        .iter()
        .map(|t| (t, "removed"))
        .chain(EMPTIED_TREES.iter().map(|t| (t, "emptied")));
    for (tree, action) in trees {
        let mut files = Vec::new();
        // Each file once: a tree to remove inside one to empty is walked first and skipped.
        let skip: Vec<&str> = match action {
            "emptied" => REMOVED_TREES.to_vec(),
            _ => Vec::new(),
        };
        walk(file, tree, 0, &mut budget, &skip, &mut files)?;
        if files.is_empty() {
            done.push(Scrubbed {
                path: format!("{tree}/*"),
                action: "absent",
            });
        }
        for (path, size) in files {
            if action == "removed" || size > 0 {
                act(path, action, &mut done);
            }
        }
    }
    if !commands.is_empty() {
        let err = debugfs(file, &["-w", "-f", "-"], &commands)?.1;
        // debugfs goes on after a failed request and reports it on stderr only.
        let failures: Vec<&str> = err
            .lines()
            .filter(|l| !l.starts_with("debugfs ") && !l.trim().is_empty())
            .collect();
        if !failures.is_empty() {
            return Err(ScrubError::Debugfs(format!(
                "could not scrub everything: {}",
                failures.join("; ")
            )));
        }
    }
    Ok(done)
}

fn item(path: &str, action: &'static str) -> Scrubbed {
    Scrubbed {
        path: path.to_string(),
        action,
    }
}

/// One directory entry (from `ls -p`).
struct Entry {
    name: String,
    dir: bool,
    /// A regular file (not a link, device, fifo or socket).
    regular: bool,
    size: u64,
}

/// `dir`'s entries but `.` and `..`; none when it does not exist or is no directory.
fn list(file: &File, dir: &str, budget: &mut usize) -> Result<Vec<Entry>, ScrubError> {
    let (out, _) = debugfs(file, &["-R", &format!("ls -p {dir}")], "")?;
    let mut entries = Vec::new();
    // `/INODE/MODE/UID/GID/NAME/SIZE/`; a name with a newline or slash cannot be one of
    // ours and is skipped with its malformed line.
    for line in out.lines() {
        let fields: Vec<&str> = line.split('/').collect();
        let [_, _, mode, _, _, name, size, _] = fields[..] else {
            continue;
        };
        if name == "." || name == ".." || name.is_empty() || !safe_name(name) {
            continue;
        }
        if *budget == 0 {
            return Err(ScrubError::Debugfs(format!(
                "listing stopped at {MAX_ENTRIES} entries in {dir}: the volume holds too many \
                 files to scrub"
            )));
        }
        *budget -= 1;
        entries.push(Entry {
            name: name.to_string(),
            dir: mode.starts_with("04"),
            regular: mode.starts_with("10"),
            size: size.parse().unwrap_or(0),
        });
    }
    Ok(entries)
}

/// Names debugfs's request parser takes as one word.
fn safe_name(name: &str) -> bool {
    name.bytes()
        .all(|b| b.is_ascii_graphic() && b != b'"' && b != b'\\')
}

/// The regular files under `dir` (but not under `skip`), with their sizes.
fn walk(
    file: &File,
    dir: &str,
    depth: usize,
    budget: &mut usize,
    skip: &[&str],
    files: &mut Vec<(String, u64)>,
) -> Result<(), ScrubError> {
    for e in list(file, dir, budget)? {
        let path = format!("{dir}/{}", e.name);
        if e.regular {
            files.push((path, e.size));
        } else if e.dir && depth < MAX_DEPTH && !skip.contains(&path.as_str()) {
            walk(file, &path, depth + 1, budget, skip, files)?;
        }
    }
    Ok(())
}

fn exists(file: &File, path: &str) -> Result<bool, ScrubError> {
    let (_, err) = debugfs(file, &["-R", &format!("stat {path}")], "")?;
    Ok(!err.contains("File not found"))
}

/// Runs debugfs on the volume (its fd 3) as nobody with `requests` on stdin: (stdout,
/// stderr).
fn debugfs(file: &File, args: &[&str], requests: &str) -> Result<(String, String), ScrubError> {
    let mut cmd = confined("debugfs", file);
    cmd.args(args)
        .arg("/proc/self/fd/3")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .map_err(|e| ScrubError::Debugfs(format!("cannot be run: {e}")))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(requests.as_bytes())
            .map_err(|e| ScrubError::Debugfs(format!("did not take its requests: {e}")))?;
    }
    let out = child
        .wait_with_output()
        .map_err(|e| ScrubError::Debugfs(format!("failed: {e}")))?;
    if !out.status.success() {
        return Err(ScrubError::Debugfs(format!(
            "failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok((
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

/// `program` as nobody, with no environment, and the volume as its descriptor 3 (the only
/// way it has to the volume: it cannot open the state dir).
fn confined(program: &str, volume: &File) -> Command {
    let fd = volume.as_raw_fd();
    let mut cmd = Command::new(program);
    cmd.env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .uid(NOBODY)
        .gid(NOBODY);
    // SAFETY: between fork and exec only dup2(2) and fcntl(2), both async-signal-safe, on
    // a descriptor this process holds open for the call.
    unsafe {
        cmd.pre_exec(move || {
            let ok = if fd == 3 {
                // dup2 onto itself would keep close-on-exec.
                libc::fcntl(3, libc::F_SETFD, 0)
            } else {
                libc::dup2(fd, 3)
            };
            if ok < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd
}

/// Checks the scrubbed filesystem, fixing only what is safe to fix unattended (the free
/// counts debugfs leaves to fsck).
fn fsck(file: &File) -> Result<(), ScrubError> {
    let mut cmd = confined("e2fsck", file);
    cmd.args(["-f", "-p", "/proc/self/fd/3"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let out = cmd
        .output()
        .map_err(|e| ScrubError::Debugfs(format!("cannot run e2fsck: {e}")))?;
    // 0: clean; 1: errors corrected.
    match out.status.code() {
        Some(0 | 1) => Ok(()),
        _ => Err(ScrubError::Damaged(format!(
            "e2fsck {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stdout).trim()
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    /// A fresh ext4 volume made by mkfs.ext4 from `files` (path, content).
    fn volume(test: &str, files: &[(&str, &str)]) -> (PathBuf, PathBuf) {
        let dir = std::env::temp_dir().join(format!("vmed-scrub-{test}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let root = dir.join("root");
        for (path, content) in files {
            let p = root.join(path.trim_start_matches('/'));
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(&p, content).unwrap();
        }
        std::fs::create_dir_all(root.join("var/log")).unwrap();
        let img = dir.join("root.ext4");
        File::create(&img).unwrap().set_len(32 << 20).unwrap();
        let ok = Command::new("mkfs.ext4")
            .args(["-q", "-F", "-d"])
            .arg(&root)
            .arg(&img)
            .status()
            .unwrap()
            .success();
        assert!(ok, "mkfs.ext4 failed");
        (dir, img)
    }

    fn read(img: &Path, path: &str) -> Option<String> {
        let out = Command::new("debugfs")
            .args(["-R", &format!("cat {path}")])
            .arg(img)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        (!err.contains("File not found")).then(|| String::from_utf8_lossy(&out.stdout).into())
    }

    #[test]
    fn secrets_go_and_everything_else_stays() {
        let (dir, img) = volume(
            "secrets",
            &[
                ("/etc/machine-id", "0123456789abcdef0123456789abcdef\n"),
                ("/etc/ssh/ssh_host_ed25519_key", "PRIVATE"),
                ("/etc/ssh/ssh_host_ed25519_key.pub", "public"),
                ("/etc/ssh/sshd_config", "PermitRootLogin no\n"),
                ("/root/.bash_history", "secret command\n"),
                ("/home/ann/.ash_history", "more\n"),
                ("/home/ann/notes.txt", "keep me\n"),
                ("/var/log/apt/history.log", "apt\n"),
                ("/var/log/syslog", "log\n"),
                ("/var/log/journal/0123/system.journal", "journal"),
                ("/var/lib/systemd/random-seed", "seed"),
                ("/usr/bin/app", "binary"),
            ],
        );
        let done = scrub_ext4(&img).unwrap();
        let action = |p: &str| done.iter().find(|d| d.path == p).map(|d| d.action);
        assert_eq!(action("/etc/machine-id"), Some("emptied"), "{done:?}");
        for p in [
            "/etc/ssh/ssh_host_ed25519_key",
            "/etc/ssh/ssh_host_ed25519_key.pub",
            "/root/.bash_history",
            "/home/ann/.ash_history",
            "/var/log/journal/0123/system.journal",
            "/var/lib/systemd/random-seed",
        ] {
            assert_eq!(action(p), Some("removed"), "{p}: {done:?}");
            assert_eq!(read(&img, p), None, "{p} is still there");
        }
        for p in ["/var/log/apt/history.log", "/var/log/syslog"] {
            assert_eq!(action(p), Some("emptied"), "{p}: {done:?}");
            assert_eq!(read(&img, p).as_deref(), Some(""), "{p}");
        }
        assert_eq!(action("/var/lib/dbus/machine-id"), Some("absent"));
        assert_eq!(read(&img, "/etc/machine-id").as_deref(), Some(""));
        assert_eq!(
            read(&img, "/etc/ssh/sshd_config").as_deref(),
            Some("PermitRootLogin no\n")
        );
        assert_eq!(
            read(&img, "/home/ann/notes.txt").as_deref(),
            Some("keep me\n")
        );
        assert_eq!(read(&img, "/usr/bin/app").as_deref(), Some("binary"));
        // The filesystem is consistent afterwards (read-only check) and the file is ours again.
        let fsck = Command::new("e2fsck")
            .args(["-f", "-n"])
            .arg(&img)
            .output()
            .unwrap();
        assert!(
            fsck.status.success(),
            "{}",
            String::from_utf8_lossy(&fsck.stdout)
        );
        assert_eq!(std::fs::metadata(&img).unwrap().uid(), 0);
        // Scrubbing again finds nothing left.
        let again = scrub_ext4(&img).unwrap();
        assert!(again.iter().all(|d| d.action != "removed"), "{again:?}");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_volume_that_is_not_ext_is_refused_untouched() {
        let dir = std::env::temp_dir().join(format!("vmed-scrub-raw-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let img = dir.join("raw.img");
        std::fs::write(&img, vec![7u8; 8192]).unwrap();
        assert!(matches!(scrub_ext4(&img), Err(ScrubError::NotExt)));
        assert_eq!(std::fs::read(&img).unwrap(), vec![7u8; 8192]);
        std::fs::remove_dir_all(dir).unwrap();
    }
}

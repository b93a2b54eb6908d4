//! A bounded console log in two segments: the monitor appends to `FILE` until it holds half
//! the cap, then renames it to `FILE.1` (dropping the older segment) and starts a new
//! `FILE`. Both stay plain text (`tail -f FILE` works between rotations), the log never
//! holds more than the cap, and it always holds at least the last half of it.
//!
//! Both segments are opened up front and a rotation swaps their names (`RENAME_EXCHANGE`)
//! and empties the new current one: the threads that write guest output (vCPUs) then need
//! no `open` in their seccomp filter. A file system without the exchange gets the plain
//! rename and a new file.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// The smallest and largest cap a console log may have.
pub const MIN_LOG_SIZE: u64 = 4 << 10;
pub const MAX_LOG_SIZE: u64 = 1 << 30;
/// The cap when none is given.
pub const DEFAULT_LOG_SIZE: u64 = 1 << 20;

/// The older segment of the log at `path`.
pub fn older(path: &Path) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(".1");
    PathBuf::from(p)
}

/// The writing side, owned by the monitor.
pub struct ConsoleLog {
    path: PathBuf,
    file: File,
    /// The older segment (`FILE.1`), the next current one.
    spare: Option<File>,
    /// Bytes in the current segment.
    len: u64,
    /// A segment's cap: half the log's.
    half: u64,
}

impl ConsoleLog {
    /// Opens (appending to) the log at `path`, capped at `cap` bytes in all.
    pub fn open(path: &Path, cap: u64) -> io::Result<ConsoleLog> {
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        let len = file.metadata()?.len();
        let spare = OpenOptions::new()
            .create(true)
            .append(true)
            .open(older(path))?;
        Ok(ConsoleLog {
            path: path.to_path_buf(),
            file,
            spare: Some(spare),
            len,
            half: (cap / 2).max(1),
        })
    }

    /// Appends `buf`, rotating first when it would not fit in the current segment.
    pub fn write(&mut self, mut buf: &[u8]) -> io::Result<()> {
        if buf.len() as u64 > self.half {
            buf = &buf[buf.len() - self.half as usize..];
        }
        if self.len + buf.len() as u64 > self.half && self.len > 0 {
            self.rotate()?;
        }
        self.file.write_all(buf)?;
        self.len += buf.len() as u64;
        Ok(())
    }

    fn rotate(&mut self) -> io::Result<()> {
        self.len = 0;
        if let Some(spare) = self.spare.take() {
            if exchange(&self.path, &older(&self.path)).is_ok() {
                // The older segment's file now has the current name: it starts empty.
                let old = std::mem::replace(&mut self.file, spare);
                self.spare = Some(old);
                return self.file.set_len(0);
            }
        }
        std::fs::rename(&self.path, older(&self.path))?;
        self.file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)?;
        Ok(())
    }
}

/// Swaps the names of `a` and `b` atomically (renameat2 RENAME_EXCHANGE).
fn exchange(a: &Path, b: &Path) -> io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let c = |p: &Path| {
        std::ffi::CString::new(p.as_os_str().as_bytes())
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))
    };
    let (a, b) = (c(a)?, c(b)?);
    // SAFETY: renameat2(2) reads two NUL-terminated paths that outlive the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_renameat2,
            libc::AT_FDCWD,
            a.as_ptr(),
            libc::AT_FDCWD,
            b.as_ptr(),
            libc::RENAME_EXCHANGE,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The last `max` bytes of the log at `path`, oldest first; empty when there is no log.
/// Also reads a plain (unsegmented) log file. The current segment is opened first: if it is
/// rotated meanwhile, `FILE.1` is then the same file and is read only once.
pub fn read_tail(path: &Path, max: u64) -> io::Result<Vec<u8>> {
    let open = |p: &Path| match File::open(p) {
        Ok(f) => Ok(Some(f)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    };
    let current = open(path)?;
    let mut old = open(&older(path))?;
    if let (Some(c), Some(o)) = (&current, &old) {
        let (c, o) = (c.metadata()?, o.metadata()?);
        if (c.dev(), c.ino()) == (o.dev(), o.ino()) {
            old = None;
        }
    }
    let mut out = match current {
        Some(f) => tail_of(f, max)?,
        None => Vec::new(),
    };
    let left = max.saturating_sub(out.len() as u64);
    if let (Some(f), true) = (old, left > 0) {
        let mut before = tail_of(f, left)?;
        before.append(&mut out);
        out = before;
    }
    Ok(out)
}

fn tail_of(mut f: File, max: u64) -> io::Result<Vec<u8>> {
    let len = f.metadata()?.len();
    f.seek(SeekFrom::Start(len.saturating_sub(max)))?;
    let mut buf = Vec::new();
    f.take(max).read_to_end(&mut buf)?;
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("vme-console-log-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn keeps_the_newest_output_in_order_within_the_cap() {
        let d = dir("ring");
        let path = d.join("console.log");
        let mut log = ConsoleLog::open(&path, 100).unwrap();
        let text: Vec<u8> = (0..1000u32).map(|i| b'a' + (i % 26) as u8).collect();
        for b in &text {
            log.write(std::slice::from_ref(b)).unwrap();
        }
        let on_disk = std::fs::metadata(&path).unwrap().len()
            + std::fs::metadata(older(&path)).unwrap().len();
        assert!(on_disk <= 100, "{on_disk} bytes on disk");
        let all = read_tail(&path, 1000).unwrap();
        assert!(all.len() >= 50, "at least half the cap is kept");
        assert!(text.ends_with(&all), "the newest bytes, in order");
        assert_eq!(read_tail(&path, 10).unwrap(), &text[990..]);
        // A write larger than a segment keeps its end.
        log.write(&[b'x'; 500]).unwrap();
        assert_eq!(read_tail(&path, 1000).unwrap().len() as u64, 50 + 50);
        // Reopening continues the current segment.
        let mut log = ConsoleLog::open(&path, 100).unwrap();
        log.write(b"yz").unwrap();
        assert!(read_tail(&path, 1000).unwrap().ends_with(b"xxyz"));
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn no_log_is_empty_and_a_plain_file_reads() {
        let d = dir("plain");
        let path = d.join("console.log");
        assert!(read_tail(&path, 10).unwrap().is_empty());
        std::fs::write(&path, b"hello world").unwrap();
        assert_eq!(read_tail(&path, 5).unwrap(), b"world");
        let _ = std::fs::remove_dir_all(&d);
    }
}

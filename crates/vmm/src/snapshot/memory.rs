//! The memory file: guest RAM byte for byte, as a sparse file. Pages that are all zero
//! (never touched, or given back through the balloon) are holes, so an idle guest's file
//! takes the space of the memory it uses, not of the memory it has. A restore maps it
//! privately (`vme_riscv::GuestRam::from_file`, `crate::x86::ram::from_file`): pages load
//! when first touched.

use std::fs::File;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;

/// Guest page size, the granule of holes.
const PAGE: usize = 4096;
/// RAM is read this much at a time.
const CHUNK: usize = 1 << 20;

/// What a memory file holds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MemoryFileStats {
    /// Bytes of RAM that are not zero pages, written to the file.
    pub data_bytes: u64,
    /// Space the file takes on disk.
    pub disk_bytes: u64,
}

pub fn zero(page: &[u8]) -> bool {
    // OR-folding fixed blocks vectorizes; an early exit per byte would not.
    page.chunks_exact(64)
        .all(|c| c.iter().fold(0u8, |a, &b| a | b) == 0)
}

/// Writes `size` bytes of RAM, which `read(offset, buf)` copies out, to a new file `path`
/// (synced to disk before it returns).
pub fn write(
    path: &Path,
    size: u64,
    mut read: impl FnMut(u64, &mut [u8]) -> Result<(), String>,
) -> Result<MemoryFileStats, String> {
    let io = |what: &str, e: std::io::Error| format!("cannot {what} {}: {e}", path.display());
    let file = File::create(path).map_err(|e| io("create", e))?;
    let mut buf = vec![0u8; CHUNK];
    let mut data_bytes = 0u64;
    let mut off = 0u64;
    while off < size {
        let n = (size - off).min(CHUNK as u64) as usize;
        let chunk = &mut buf[..n];
        read(off, chunk)?;
        // Runs of non-zero pages go out in one write each.
        let mut p = 0;
        while p < n {
            if zero(&chunk[p..(p + PAGE).min(n)]) {
                p += PAGE;
                continue;
            }
            let start = p;
            while p < n && !zero(&chunk[p..(p + PAGE).min(n)]) {
                p += PAGE;
            }
            let end = p.min(n);
            file.write_all_at(&chunk[start..end], off + start as u64)
                .map_err(|e| io("write", e))?;
            data_bytes += (end - start) as u64;
        }
        off += n as u64;
    }
    // Trailing zero pages are a hole too.
    file.set_len(size).map_err(|e| io("size", e))?;
    file.sync_all().map_err(|e| io("sync", e))?;
    let disk_bytes = file.metadata().map_err(|e| io("stat", e))?.blocks() * 512;
    Ok(MemoryFileStats {
        data_bytes,
        disk_bytes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_pages_become_holes_and_data_lands_in_place() {
        let dir = std::env::temp_dir().join(format!("vme-memfile-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("memory");
        let size = 8u64 << 20;
        let mut ram = vec![0u8; size as usize];
        ram[5] = 1;
        ram[3 * PAGE + 7] = 2;
        ram[4 * PAGE] = 3;
        let last = size as usize - 1;
        ram[last] = 4;
        let stats = write(&path, size, |off, buf| {
            buf.copy_from_slice(&ram[off as usize..off as usize + buf.len()]);
            Ok(())
        })
        .unwrap();
        assert_eq!(
            stats.data_bytes,
            4 * PAGE as u64,
            "pages 0, 3, 4 and the last"
        );
        assert!(
            stats.disk_bytes < 1 << 20,
            "sparse: {} bytes on disk",
            stats.disk_bytes
        );
        assert_eq!(std::fs::read(&path).unwrap(), ram);
        let err = write(&path, size, |_, _| Err("no RAM".into())).unwrap_err();
        assert_eq!(err, "no RAM");
        let _ = std::fs::remove_dir_all(&dir);
    }
}

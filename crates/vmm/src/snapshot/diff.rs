//! Diff snapshots' memory: only the pages written since the parent, at their RAM offsets in
//! a sparse file of RAM's length (holes elsewhere), and `snapshot-merge`, which flattens a
//! chain into one full snapshot.
//!
//! A listed page that is all zero stays a hole too: the `diff_pages` section, not the file,
//! says which pages a diff holds, so a hole inside a run reads as the zero page it became
//! (a balloon discard) and a hole outside one means "as in the parent".

use super::format::StateWriter;
use super::lineage::{self, DIFF_PAGES, LINEAGE, Layer, Lineage};
use super::memory::{MemoryFileStats, zero};
use super::{MEMORY_FILE, STATE_FILE, format::StateFile, write_dir};
use std::fs::File;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;
use std::time::Instant;
use vme_api::control::SnapshotInfo;

const PAGE: u64 = 4096;
/// RAM is read this much at a time.
const CHUNK: u64 = 1 << 20;

/// The runs to write for a diff: `dirty` runs, with the smallest gaps between them filled
/// (their pages written too, unchanged, which is harmless) until at most `max` remain.
pub fn coalesce(mut dirty: Vec<(u64, u64)>, max: usize) -> Vec<(u64, u64)> {
    if dirty.len() <= max.max(1) {
        return dirty;
    }
    let mut gaps: Vec<u64> = dirty
        .windows(2)
        .map(|w| w[1].0 - (w[0].0 + w[0].1))
        .collect();
    gaps.sort_unstable();
    // Filling every gap up to the k-th smallest leaves at most `max` runs.
    let limit = gaps[dirty.len() - max.max(1) - 1];
    let mut out: Vec<(u64, u64)> = Vec::with_capacity(max);
    for (first, n) in dirty.drain(..) {
        match out.last_mut() {
            Some((f, m)) if first - (*f + *m) <= limit => *m = first + n - *f,
            _ => out.push((first, n)),
        }
    }
    out
}

/// Writes one snapshot of a VM into `dir`: the state `w` (with the VM paused and its
/// devices held) plus a new lineage, and either all of RAM (`size` bytes, copied out by
/// `read`) or, for a diff on `parent`, the pages of `dirty` (runs written since the
/// previous snapshot). Records it in `history` when it is on disk; on error the caller
/// puts `dirty` back into its log.
#[allow(clippy::too_many_arguments)]
pub fn write_member(
    dir: &Path,
    mut w: StateWriter,
    size: u64,
    dirty: Vec<(u64, u64)>,
    parent: Option<lineage::Member>,
    history: &mut lineage::History,
    read: impl FnMut(u64, &mut [u8]) -> Result<(), String>,
    started: Instant,
) -> Result<SnapshotInfo, String> {
    let e = |e: super::format::FormatError| e.to_string();
    let id = lineage::new_id()?;
    let me = Lineage {
        id: id.clone(),
        parent: parent.as_ref().map(|p| lineage::ParentRef {
            dir: p.dir.display().to_string(),
            id: p.id.clone(),
        }),
    };
    w.add(LINEAGE, &me).map_err(e)?;
    let mut info = match &parent {
        None => write_dir(dir, &w, size, read, started)?,
        Some(_) => {
            let runs = coalesce(dirty, lineage::MAX_RUNS);
            w.add(DIFF_PAGES, &runs).map_err(e)?;
            w.diff_format();
            super::write_dir_with(
                dir,
                &w,
                size,
                |p| write_pages(p, size, &runs, read),
                started,
            )?
        }
    };
    history.record(dir, &id, parent.is_some());
    info.id = Some(id);
    info.parent = parent.map(|p| p.dir.display().to_string());
    Ok(info)
}

/// Writes the pages of `runs` (RAM of `size` bytes, copied out by `read(offset, buf)`) at
/// their offsets into a new sparse file `path`, synced before it returns.
pub fn write_pages(
    path: &Path,
    size: u64,
    runs: &[(u64, u64)],
    mut read: impl FnMut(u64, &mut [u8]) -> Result<(), String>,
) -> Result<MemoryFileStats, String> {
    let io = |what: &str, e: std::io::Error| format!("cannot {what} {}: {e}", path.display());
    let file = File::create(path).map_err(|e| io("create", e))?;
    let mut buf = vec![0u8; CHUNK as usize];
    let mut data_bytes = 0u64;
    for &(first, n) in runs {
        let (mut off, end) = (first * PAGE, (first + n) * PAGE);
        if end > size {
            return Err(format!(
                "page run {first}+{n} lies outside RAM (interpreter bug)"
            ));
        }
        while off < end {
            let len = (end - off).min(CHUNK) as usize;
            let chunk = &mut buf[..len];
            read(off, chunk)?;
            for (i, page) in chunk.chunks(PAGE as usize).enumerate() {
                if !zero(page) {
                    file.write_all_at(page, off + i as u64 * PAGE)
                        .map_err(|e| io("write", e))?;
                    data_bytes += page.len() as u64;
                }
            }
            off += len as u64;
        }
    }
    file.set_len(size).map_err(|e| io("size", e))?;
    file.sync_all().map_err(|e| io("sync", e))?;
    let disk_bytes = file.metadata().map_err(|e| io("stat", e))?.blocks() * 512;
    Ok(MemoryFileStats {
        data_bytes,
        disk_bytes,
    })
}

/// Opens the memory file in `dir`, which must be `size` bytes long.
pub fn open_memory(dir: &Path, size: u64) -> Result<File, String> {
    let path = dir.join(MEMORY_FILE);
    let f = File::open(&path).map_err(|e| {
        format!(
            "cannot open the snapshot's memory file {}: {e}; a snapshot directory holds both \
             `state` and `memory`",
            path.display()
        )
    })?;
    let len = f
        .metadata()
        .map_err(|e| format!("cannot read the size of {}: {e}", path.display()))?
        .len();
    if len != size {
        return Err(format!(
            "memory file {} is {len} bytes long, but the snapshot's VM has {size} bytes of RAM: \
             the file is truncated or belongs to another snapshot",
            path.display()
        ));
    }
    Ok(f)
}

/// Copies RAM offset `off` of a chain into `buf`: the base's bytes, then each diff's pages
/// over them, oldest first.
fn read_through(
    base: &File,
    diffs: &[(File, &Layer)],
    off: u64,
    buf: &mut [u8],
) -> Result<(), String> {
    base.read_exact_at(buf, off)
        .map_err(|e| format!("cannot read the base memory file: {e}"))?;
    let (first, end) = (off / PAGE, (off + buf.len() as u64).div_ceil(PAGE));
    for (file, layer) in diffs {
        let runs = &layer.runs;
        let mut i = runs.partition_point(|&(f, n)| f + n <= first);
        while let Some(&(f, n)) = runs.get(i).filter(|r| r.0 < end) {
            let (a, b) = (
                (f * PAGE).max(off),
                ((f + n) * PAGE).min(off + buf.len() as u64),
            );
            let dst = &mut buf[(a - off) as usize..(b - off) as usize];
            file.read_exact_at(dst, a).map_err(|e| {
                format!(
                    "cannot read the memory file of {}: {e}",
                    layer.dir.display()
                )
            })?;
            i += 1;
        }
    }
    Ok(())
}

/// `vme-vmm snapshot-merge FROM TO`: the snapshot in `from` (a diff and its parents, or a
/// full snapshot) as one full snapshot in `to`, with the same ID (it holds the same memory,
/// so diffs taken on top of `from` may point at it). `to` may be `from` itself, flattening
/// it in place; not one of its parents, which other snapshots may still need.
pub fn merge(from: &Path, to: &Path) -> Result<SnapshotInfo, String> {
    let started = Instant::now();
    let file = StateFile::read(&from.join(STATE_FILE)).map_err(|e| e.to_string())?;
    let chain = lineage::read_chain(from, &file)?;
    let size = file.header.memory_bytes;
    // What a machine can have (whole pages, at most 1 TiB): the header is untrusted, and
    // merging copies every byte of RAM.
    if size == 0 || size % PAGE != 0 || size > 1 << 40 {
        return Err(format!(
            "snapshot state file {}: its header says {size} bytes of RAM, which no VM can \
             have: the file is damaged or not one of ours",
            file.path.display()
        ));
    }
    let top = std::path::absolute(from).map_err(|e| format!("{}: {e}", from.display()))?;
    let parents = std::iter::once(&chain.base)
        .chain(chain.diffs.iter().map(|l| &l.dir))
        .filter(|d| **d != top);
    for p in parents {
        if let (Ok(a), Ok(b)) = (std::fs::canonicalize(p), std::fs::canonicalize(to))
            && a == b
        {
            return Err(format!(
                "{} is a parent of {}: merging into it would replace a snapshot other diffs \
                 may need; give another directory (or {} itself to flatten it in place)",
                to.display(),
                from.display(),
                from.display()
            ));
        }
    }
    let base = open_memory(&chain.base, size)?;
    let diffs = chain
        .diffs
        .iter()
        .map(|l| Ok((open_memory(&l.dir, size)?, l)))
        .collect::<Result<Vec<_>, String>>()?;
    let id = match file.section::<Lineage>(LINEAGE) {
        Ok(l) => l.id,
        Err(_) => lineage::new_id()?,
    };
    let h = &file.header;
    let mut w = StateWriter::new(&h.arch, &h.cpu, size);
    let e = |e: super::format::FormatError| e.to_string();
    for (name, data) in file.sections() {
        if name != LINEAGE && name != DIFF_PAGES {
            w.add_encoded(name, data).map_err(e)?;
        }
    }
    w.add(
        LINEAGE,
        &Lineage {
            id: id.clone(),
            parent: None,
        },
    )
    .map_err(e)?;
    let mut info = write_dir(
        to,
        &w,
        size,
        |off, buf| read_through(&base, &diffs, off, buf),
        started,
    )?;
    info.id = Some(id);
    Ok(info)
}

#[cfg(test)]
#[path = "diff_tests.rs"]
mod tests;

//! Which snapshot a snapshot is, and what it depends on. Every snapshot this monitor writes
//! has a random ID (section `lineage`). A diff snapshot also names its parent — the
//! directory as it was written, and the parent's ID — and lists the pages its memory file
//! holds (section `diff_pages`). Restoring a diff follows the parents down to the full
//! snapshot at the bottom, checking each one's ID, so a parent that was removed or replaced
//! (a later snapshot written into its directory) is refused by name instead of restoring a
//! guest with the wrong memory.
//!
//! All of it is untrusted input: chains are at most [`MAX_DEPTH`] diffs deep, a diff holds
//! at most [`MAX_RUNS`] runs of pages, each inside RAM, ascending and disjoint, and every
//! member must be of the same machine (architecture, CPU, memory size).

use super::format::{DIFF_FORMAT_VERSION, StateFile};
use super::{STATE_FILE, format::FormatError};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

pub const LINEAGE: &str = "lineage";
pub const DIFF_PAGES: &str = "diff_pages";
/// Most diffs in a chain. A restore maps each diff's pages over the ones below, and each
/// link is a file to keep; a VM this deep must take a full snapshot (or merge its chain).
pub const MAX_DEPTH: usize = 16;
/// Most runs of pages in one diff: each becomes one host mapping on restore, and the host
/// allows ~65000 per process. Writers fill the smallest gaps to stay under it.
pub const MAX_RUNS: usize = 2048;
const PAGE: u64 = 4096;

/// The `lineage` section.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lineage {
    /// 32 hex digits, random: names this snapshot's memory.
    pub id: String,
    /// Diff snapshots only.
    pub parent: Option<ParentRef>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ParentRef {
    /// The parent's directory as it was written (absolute; a relative one is taken from the
    /// diff's directory).
    pub dir: String,
    pub id: String,
}

/// A fresh snapshot ID: 128 random bits from the kernel, in hex.
pub fn new_id() -> Result<String, String> {
    use std::io::Read;
    let mut b = [0u8; 16];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .map_err(|e| format!("cannot read /dev/urandom for a snapshot ID: {e}"))?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

/// One snapshot of a chain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Member {
    pub dir: PathBuf,
    pub id: String,
}

/// What a running VM knows of its snapshots: the chain its memory now differs from, full
/// snapshot first, the parent of the next diff last. Empty before the first snapshot, and
/// after a restore from a snapshot without an ID (then `unknown` says why).
#[derive(Clone, Debug, Default)]
pub struct History {
    pub chain: Vec<Member>,
    pub unknown: Option<String>,
}

/// Whether two directories are the same (through symlinks when both exist).
fn same_dir(a: &Path, b: &Path) -> bool {
    match (std::fs::canonicalize(a), std::fs::canonicalize(b)) {
        (Ok(x), Ok(y)) => x == y,
        _ => std::path::absolute(a).ok() == std::path::absolute(b).ok(),
    }
}

impl History {
    /// The parent of a diff snapshot to be written into `dir`, or why there can be none.
    pub fn diff_parent(&self, dir: &Path) -> Result<Member, String> {
        let Some(parent) = self.chain.last() else {
            return Err(self.unknown.clone().unwrap_or_else(|| {
                "this VM has no snapshot to diff against yet: take a full snapshot first \
                 (snapshot DIR without --diff)"
                    .into()
            }));
        };
        if self.chain.len() > MAX_DEPTH {
            return Err(format!(
                "this VM's snapshot chain already has {MAX_DEPTH} diffs, the most a restore \
                 follows: take a full snapshot (snapshot DIR without --diff)"
            ));
        }
        if let Some(m) = self.chain.iter().find(|m| same_dir(&m.dir, dir)) {
            return Err(format!(
                "{} holds snapshot {} of this diff's chain: writing the diff there would \
                 replace a snapshot it needs; choose another directory",
                m.dir.display(),
                m.id
            ));
        }
        // A diff on a parent that is gone could never be restored: say so now.
        let found = StateFile::read(&parent.dir.join(STATE_FILE))
            .map_err(|e| e.to_string())
            .and_then(|f| optional::<Lineage>(&f, LINEAGE));
        match found {
            Ok(Some(l)) if l.id == parent.id => Ok(parent.clone()),
            other => Err(format!(
                "the parent of this diff, snapshot {} in {}, is no longer there ({}): a diff \
                 on top of it could not be restored; take a full snapshot",
                parent.id,
                parent.dir.display(),
                match other {
                    Ok(Some(l)) => format!("the directory now holds snapshot {}", l.id),
                    Ok(None) => "the directory now holds a snapshot without an ID".into(),
                    Err(e) => e,
                }
            )),
        }
    }

    /// Records a snapshot just written: a full one starts a new chain.
    pub fn record(&mut self, dir: &Path, id: &str, diff: bool) {
        if !diff {
            self.chain.clear();
        }
        self.chain.push(Member {
            dir: std::path::absolute(dir).unwrap_or_else(|_| dir.to_path_buf()),
            id: id.into(),
        });
        self.unknown = None;
    }
}

/// A diff of a chain: where its memory file is and which pages it holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Layer {
    pub dir: PathBuf,
    /// `(first page, pages)`, ascending and disjoint, inside RAM.
    pub runs: Vec<(u64, u64)>,
}

/// A snapshot's chain, read and checked.
#[derive(Debug)]
pub struct Chain {
    /// The full snapshot at the bottom (the snapshot itself when it is not a diff).
    pub base: PathBuf,
    /// The diffs, oldest first; the snapshot itself last.
    pub diffs: Vec<Layer>,
    /// The history of a VM restored from it.
    pub history: History,
}

/// Reads section `name` if present.
fn optional<T: serde::de::DeserializeOwned>(
    f: &StateFile,
    name: &str,
) -> Result<Option<T>, String> {
    match f.section(name) {
        Ok(v) => Ok(Some(v)),
        Err(FormatError::Missing { .. }) => Ok(None),
        Err(e) => Err(e.to_string()),
    }
}

/// Checks a diff's page runs against RAM of `memory_bytes`.
pub fn check_runs(f: &StateFile, runs: &[(u64, u64)]) -> Result<(), String> {
    let pages = f.header.memory_bytes / PAGE;
    if runs.len() > MAX_RUNS {
        return Err(f
            .invalid(
                DIFF_PAGES,
                format!("{} runs of pages, more than {MAX_RUNS}", runs.len()),
            )
            .to_string());
    }
    let mut next = 0u64;
    for &(first, n) in runs {
        let end = first
            .checked_add(n)
            .filter(|&e| n > 0 && e <= pages && first >= next);
        let Some(end) = end else {
            return Err(f
                .invalid(
                    DIFF_PAGES,
                    format!(
                        "page run {first}+{n} is empty, out of order, overlaps another or \
                         lies outside the {pages} pages of RAM"
                    ),
                )
                .to_string());
        };
        next = end;
    }
    Ok(())
}

/// Follows the parents of the snapshot in `dir` (its state file already read as `top`)
/// down to its full snapshot, checking every link.
pub fn read_chain(dir: &Path, top: &StateFile) -> Result<Chain, String> {
    let top_dir = std::path::absolute(dir).unwrap_or_else(|_| dir.to_path_buf());
    let h = &top.header;
    let mut members: Vec<Member> = Vec::new();
    let mut diffs: Vec<Layer> = Vec::new();
    let mut owned: Option<StateFile> = None;
    let mut cur_dir = top_dir.clone();
    let base = loop {
        let cur = owned.as_ref().unwrap_or(top);
        let lineage: Option<Lineage> = optional(cur, LINEAGE)?;
        if cur.version != DIFF_FORMAT_VERSION {
            if lineage.as_ref().is_some_and(|l| l.parent.is_some())
                || optional::<Vec<(u64, u64)>>(cur, DIFF_PAGES)?.is_some()
            {
                return Err(cur
                    .invalid(
                        LINEAGE,
                        "a full snapshot (format version 1) with diff sections",
                    )
                    .to_string());
            }
            if let Some(l) = lineage {
                members.push(Member {
                    dir: cur_dir.clone(),
                    id: l.id,
                });
            }
            break cur_dir;
        }
        let lineage: Lineage = cur.section(LINEAGE).map_err(|e| e.to_string())?;
        let Some(parent) = lineage.parent else {
            return Err(cur
                .invalid(LINEAGE, "a diff snapshot without a parent")
                .to_string());
        };
        let runs: Vec<(u64, u64)> = cur.section(DIFF_PAGES).map_err(|e| e.to_string())?;
        check_runs(cur, &runs)?;
        if diffs.len() == MAX_DEPTH {
            return Err(format!(
                "snapshot {} is more than {MAX_DEPTH} diffs above a full snapshot, deeper than \
                 vme-vmm writes: it is not one of ours",
                top_dir.display()
            ));
        }
        if parent.id == lineage.id || members.iter().any(|m| m.id == parent.id) {
            return Err(cur
                .invalid(
                    LINEAGE,
                    format!("the chain loops back to snapshot {}", parent.id),
                )
                .to_string());
        }
        members.push(Member {
            dir: cur_dir.clone(),
            id: lineage.id,
        });
        diffs.push(Layer {
            dir: cur_dir.clone(),
            runs,
        });
        let parent_dir = match Path::new(&parent.dir) {
            p if p.is_absolute() => p.to_path_buf(),
            p => std::fs::canonicalize(cur_dir.join(p)).unwrap_or_else(|_| cur_dir.join(p)),
        };
        let next = StateFile::read(&parent_dir.join(STATE_FILE)).map_err(|e| {
            format!(
                "diff snapshot {} needs its parent snapshot {} in {}: {e}; put the parent \
                 back where it was, or restore a full snapshot",
                cur_dir.display(),
                parent.id,
                parent_dir.display()
            )
        })?;
        match optional::<Lineage>(&next, LINEAGE)? {
            Some(l) if l.id == parent.id => {}
            found => {
                return Err(format!(
                    "diff snapshot {} was taken on top of snapshot {} in {}, but that \
                     directory now holds {}: the parent was replaced by a later snapshot, and \
                     the diff cannot be restored without it",
                    cur_dir.display(),
                    parent.id,
                    parent_dir.display(),
                    found.map_or("a snapshot without an ID".into(), |l| format!(
                        "snapshot {}",
                        l.id
                    ))
                ));
            }
        }
        let n = &next.header;
        if (&n.arch, &n.cpu, n.memory_bytes) != (&h.arch, &h.cpu, h.memory_bytes) {
            return Err(format!(
                "diff snapshot {} is of a {} VM with {} bytes of memory ({}), but its parent {} \
                 is of a {} VM with {} ({}): they cannot be one chain",
                top_dir.display(),
                h.arch,
                h.memory_bytes,
                h.cpu,
                parent_dir.display(),
                n.arch,
                n.memory_bytes,
                n.cpu
            ));
        }
        owned = Some(next);
        cur_dir = parent_dir;
    };
    diffs.reverse();
    members.reverse();
    let history = if members.last().is_some_and(|m| m.dir == top_dir) {
        History {
            chain: members,
            unknown: None,
        }
    } else {
        History {
            chain: Vec::new(),
            unknown: Some(format!(
                "this VM was restored from {}, a snapshot without an ID (written by an older \
                 vme-vmm), so there is nothing to diff against: take a full snapshot first",
                top_dir.display()
            )),
        }
    };
    Ok(Chain {
        base,
        diffs,
        history,
    })
}

#[cfg(test)]
#[path = "lineage_tests.rs"]
pub(super) mod tests;

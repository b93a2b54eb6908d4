//! The content-addressed blob store: each blob is the file `ROOT/blobs/sha256/<hex>`, named by
//! the SHA-256 of its bytes, so the same kernel imported by ten images is stored once.
//!
//! A blob is written to `ROOT/tmp/` first, hashed as it streams in, checked against the digest
//! and size the manifest declared, fsynced, renamed into place and its directory fsynced: a
//! blob under its name is always whole and correct as written. What happens to it later (a
//! bad disk, a hand edit) is caught by [`BlobStore::verify`], which the daemon runs before
//! every use. Leftover temp files (a crash mid-write) are removed by [`BlobStore::clean_tmp`].

use crate::manifest::Source;
use crate::qcow2::{self, Qcow2Error};
use crate::{Digest, Hasher};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

const BUF: usize = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum BlobError {
    #[error("blob {digest}: {what}: {err}")]
    Io {
        digest: String,
        what: &'static str,
        err: io::Error,
    },
    #[error(
        "blob {expected} is corrupted: its bytes hash to {actual} ({size} bytes, {declared} \
         declared)"
    )]
    Corrupted {
        expected: Digest,
        actual: Digest,
        size: u64,
        declared: u64,
    },
    #[error("blob {digest}: its qcow2 source: {err}")]
    Qcow2 { digest: Digest, err: Qcow2Error },
    #[error("blob {0} is missing from the blob store")]
    Missing(Digest),
    #[error("blob {digest}: the stream ended after {got} of its {declared} bytes")]
    Short {
        digest: Digest,
        got: u64,
        declared: u64,
    },
}

impl BlobError {
    fn io(digest: &Digest, what: &'static str) -> impl FnOnce(io::Error) -> BlobError {
        let digest = digest.to_string();
        move |err| BlobError::Io { digest, what, err }
    }
}

/// The store rooted at a directory (the daemon's `STATE/images`).
#[derive(Debug, Clone)]
pub struct BlobStore {
    root: PathBuf,
}

/// What [`BlobStore::ingest`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ingested {
    /// A new blob was written.
    Stored,
    /// The blob was already stored; the stream was checked and dropped.
    Deduplicated,
    /// A stored copy that no longer verified was replaced by the new, good one.
    Repaired,
}

impl BlobStore {
    pub fn open(root: &Path) -> io::Result<BlobStore> {
        let s = BlobStore {
            root: root.to_path_buf(),
        };
        fs::create_dir_all(s.dir())?;
        fs::create_dir_all(s.tmp())?;
        Ok(s)
    }

    fn dir(&self) -> PathBuf {
        self.root.join("blobs/sha256")
    }

    fn tmp(&self) -> PathBuf {
        self.root.join("tmp")
    }

    /// Where blob `d` lives.
    pub fn path(&self, d: &Digest) -> PathBuf {
        self.dir().join(d.as_str())
    }

    /// Whether `p` is a blob's path in this store; its digest if so.
    pub fn digest_of_path(&self, p: &Path) -> Option<Digest> {
        if p.parent()? != self.dir() {
            return None;
        }
        Digest::parse(p.file_name()?.to_str()?).ok()
    }

    pub fn contains(&self, d: &Digest) -> bool {
        self.path(d).is_file()
    }

    /// Reads exactly `size` bytes of blob `d` from `r`, checks their digest, and stores them
    /// unless the blob is already stored. `progress` is told of each chunk's length.
    pub fn ingest(
        &self,
        r: &mut dyn Read,
        d: &Digest,
        size: u64,
        progress: &mut dyn FnMut(u64),
    ) -> Result<Ingested, BlobError> {
        // A stored copy that no longer verifies is replaced: re-importing repairs it.
        let existed = self.contains(d);
        if existed && self.verify(d, size).is_ok() {
            copy_hashed(r, None, d, size, progress)?;
            return Ok(Ingested::Deduplicated);
        }
        let tmp = self.tmp_path(d, "");
        let result = (|| {
            let mut f = create_tmp(&tmp, d)?;
            copy_hashed(r, Some(&mut f), d, size, progress)?;
            self.commit(f, &tmp, d)
        })();
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result.map(|()| {
            if existed {
                Ingested::Repaired
            } else {
                Ingested::Stored
            }
        })
    }

    /// Like [`Self::ingest`] for a disk converted on import: reads exactly `src.size` bytes
    /// of a qcow2 file from `r`, checks them against `src.sha256`, converts them to raw
    /// (sparse) and stores that as blob `d` of `size` bytes, checking its digest too. The
    /// qcow2 bytes are not kept. `max_virtual` caps the disk's virtual size.
    pub fn ingest_qcow2(
        &self,
        r: &mut dyn Read,
        d: &Digest,
        size: u64,
        src: &Source,
        max_virtual: u64,
        progress: &mut dyn FnMut(u64),
    ) -> Result<Ingested, BlobError> {
        let existed = self.contains(d);
        if existed && self.verify(d, size).is_ok() {
            copy_hashed(r, None, &src.sha256, src.size, progress)?;
            return Ok(Ingested::Deduplicated);
        }
        // Both temp files are named after the raw blob, which the import has claimed.
        let (qtmp, tmp) = (self.tmp_path(d, ".qcow2"), self.tmp_path(d, ""));
        let result = (|| {
            let mut q = create_tmp(&qtmp, d)?;
            copy_hashed(r, Some(&mut q), &src.sha256, src.size, progress)?;
            let f = create_tmp(&tmp, d)?;
            let qcow2_err = |err| BlobError::Qcow2 {
                digest: d.clone(),
                err,
            };
            let (actual, got) =
                qcow2::convert(&q, Some(&f), max_virtual.min(size)).map_err(qcow2_err)?;
            if actual != *d || got != size {
                return Err(qcow2_err(qcow2::Qcow2Error::Invalid(format!(
                    "it converts to {got} raw bytes with digest {actual}, not the {size} \
                     bytes with digest {d} the manifest declares"
                ))));
            }
            drop(q);
            self.commit(f, &tmp, d)
        })();
        let _ = fs::remove_file(&qtmp);
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result.map(|()| {
            if existed {
                Ingested::Repaired
            } else {
                Ingested::Stored
            }
        })
    }

    /// A fresh temp file's path for blob `d`: its name starts with the digest (see
    /// [`Self::clean_tmp`]).
    fn tmp_path(&self, d: &Digest, suffix: &str) -> PathBuf {
        static N: AtomicU64 = AtomicU64::new(0);
        self.tmp().join(format!(
            "{}.{}.{}{suffix}",
            d.as_str(),
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ))
    }

    /// Makes the complete temp file `tmp` blob `d`: fsync, read-only, rename, fsync the
    /// directory.
    fn commit(&self, f: File, tmp: &Path, d: &Digest) -> Result<(), BlobError> {
        f.sync_all().map_err(BlobError::io(d, "cannot fsync it"))?;
        drop(f);
        // Read-only: the monitor gets these files as kernels and read-only disks.
        fs::set_permissions(tmp, std::os::unix::fs::PermissionsExt::from_mode(0o400))
            .map_err(BlobError::io(d, "cannot set its mode"))?;
        fs::rename(tmp, self.path(d)).map_err(BlobError::io(d, "cannot move it in place"))?;
        sync_dir(&self.dir()).map_err(BlobError::io(d, "cannot fsync the blob directory"))
    }

    /// Re-hashes blob `d` and checks it against its name and `size`.
    pub fn verify(&self, d: &Digest, size: u64) -> Result<(), BlobError> {
        let f = File::open(self.path(d)).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => BlobError::Missing(d.clone()),
            _ => BlobError::io(d, "cannot open it")(e),
        })?;
        let (actual, got) = crate::hash_reader(f).map_err(BlobError::io(d, "cannot read it"))?;
        if actual != *d || got != size {
            return Err(BlobError::Corrupted {
                expected: d.clone(),
                actual,
                size: got,
                declared: size,
            });
        }
        Ok(())
    }

    /// Every stored blob.
    pub fn list(&self) -> io::Result<Vec<Digest>> {
        let mut v = Vec::new();
        for e in fs::read_dir(self.dir())? {
            if let Some(d) = e?.file_name().to_str().and_then(|n| Digest::parse(n).ok()) {
                v.push(d);
            }
        }
        v.sort();
        Ok(v)
    }

    /// Removes blob `d`; its size in bytes (0 if it was not there).
    pub fn remove(&self, d: &Digest) -> io::Result<u64> {
        let p = self.path(d);
        let size = fs::metadata(&p).map(|m| m.len()).unwrap_or(0);
        match fs::remove_file(&p) {
            Ok(()) => Ok(size),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(0),
            Err(e) => Err(e),
        }
    }

    /// Removes the temp files of blobs not `in_use` (by an import running now); their
    /// count. A temp file's name starts with its blob's digest.
    pub fn clean_tmp(&self, in_use: &dyn Fn(&Digest) -> bool) -> io::Result<usize> {
        let mut n = 0;
        for e in fs::read_dir(self.tmp())? {
            let e = e?;
            let name = e.file_name();
            let busy = name
                .to_str()
                .and_then(|n| n.get(..64))
                .and_then(|h| Digest::parse(h).ok())
                .is_some_and(|d| in_use(&d));
            if !busy {
                fs::remove_file(e.path())?;
                n += 1;
            }
        }
        Ok(n)
    }
}

fn create_tmp(p: &Path, d: &Digest) -> Result<File, BlobError> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(p)
        .map_err(BlobError::io(d, "cannot create its temp file"))
}

/// Copies exactly `size` bytes from `r` into `out` (if any) while hashing them, then checks
/// the digest.
fn copy_hashed(
    r: &mut dyn Read,
    mut out: Option<&mut File>,
    d: &Digest,
    size: u64,
    progress: &mut dyn FnMut(u64),
) -> Result<(), BlobError> {
    let mut h = Hasher::default();
    let mut buf = vec![0u8; BUF];
    let mut got = 0u64;
    while got < size {
        let want = (size - got).min(BUF as u64) as usize;
        let n = match r.read(&mut buf[..want]) {
            Ok(0) => {
                return Err(BlobError::Short {
                    digest: d.clone(),
                    got,
                    declared: size,
                });
            }
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(BlobError::io(d, "cannot read its stream")(e)),
        };
        h.update(&buf[..n]);
        if let Some(f) = out.as_deref_mut() {
            f.write_all(&buf[..n])
                .map_err(BlobError::io(d, "cannot write it"))?;
        }
        got += n as u64;
        progress(n as u64);
    }
    let actual = h.finish();
    if actual != *d {
        return Err(BlobError::Corrupted {
            expected: d.clone(),
            actual,
            size,
            declared: size,
        });
    }
    Ok(())
}

/// fsync(2) on a directory, so a rename in it survives a power loss.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub fn temp_dir(tag: &str) -> PathBuf {
        static N: AtomicU64 = AtomicU64::new(0);
        let d = std::env::temp_dir().join(format!(
            "vme-image-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn ingest_dedupes_verifies_and_refuses_bad_bytes() {
        let dir = temp_dir("blobs");
        let s = BlobStore::open(&dir).unwrap();
        let data = vec![7u8; 3 * BUF + 5];
        let d = Digest::of(&data);
        let mut seen = 0;
        let r = s.ingest(&mut &data[..], &d, data.len() as u64, &mut |n| seen += n);
        assert_eq!(r.unwrap(), Ingested::Stored);
        assert_eq!(seen, data.len() as u64);
        assert_eq!(fs::read(s.path(&d)).unwrap(), data);
        let again = s.ingest(&mut &data[..], &d, data.len() as u64, &mut |_| ());
        assert_eq!(again.unwrap(), Ingested::Deduplicated);
        assert_eq!(s.list().unwrap(), std::slice::from_ref(&d));
        s.verify(&d, data.len() as u64).unwrap();
        assert_eq!(s.digest_of_path(&s.path(&d)), Some(d.clone()));

        // Wrong bytes under a declared digest: refused, nothing stored, no temp file left.
        let other = Digest::of(b"other");
        let e = s.ingest(&mut &b"not other"[..], &other, 9, &mut |_| ());
        assert!(matches!(e, Err(BlobError::Corrupted { .. })), "{e:?}");
        let e = s.ingest(&mut &b"shor"[..], &other, 9, &mut |_| ());
        assert!(matches!(e, Err(BlobError::Short { .. })), "{e:?}");
        assert!(!s.contains(&other));
        assert_eq!(fs::read_dir(dir.join("tmp")).unwrap().count(), 0);

        // A flipped byte is found and named.
        let p = s.path(&d);
        fs::set_permissions(&p, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
        let mut bytes = fs::read(&p).unwrap();
        bytes[100] ^= 1;
        fs::write(&p, bytes).unwrap();
        let e = s.verify(&d, data.len() as u64).unwrap_err().to_string();
        assert!(e.contains(d.as_str()) && e.contains("corrupted"), "{e}");
        // Importing the blob again repairs it.
        let r = s.ingest(&mut &data[..], &d, data.len() as u64, &mut |_| ());
        assert_eq!(r.unwrap(), Ingested::Repaired);
        s.verify(&d, data.len() as u64).unwrap();
        assert_eq!(s.remove(&d).unwrap(), data.len() as u64);
        assert!(matches!(s.verify(&d, 1), Err(BlobError::Missing(_))));
        fs::write(dir.join("tmp/leftover"), b"x").unwrap();
        fs::write(dir.join(format!("tmp/{d}.1.2")), b"x").unwrap();
        // A qcow2 conversion's two temp files are named after the raw blob too.
        fs::write(dir.join(format!("tmp/{d}.1.3.qcow2")), b"x").unwrap();
        assert_eq!(s.clean_tmp(&|x| *x == d).unwrap(), 1, "the busy ones stay");
        assert_eq!(s.clean_tmp(&|_| false).unwrap(), 2);
        fs::remove_dir_all(dir).unwrap();
    }
}

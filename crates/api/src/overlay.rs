//! Thin clones of disk images: [`thin_clone`] gives a VM its own volume made from a
//! read-only base image in O(1) time and space — a reflink where the file system shares
//! extents (btrfs, XFS), otherwise a copy-on-write overlay file in the format described
//! here and in `docs/overlay.md`. Never a full copy.
//!
//! The overlay format (version 1): a 4 KiB [`Header`], an allocation bitmap (one bit per
//! cluster, in whole 4 KiB pages), then a sparse data area in which cluster `i` of the
//! virtual disk lives at `data_offset + i * cluster_size`. A clear bit means "read the base";
//! a set bit means "the cluster's data in the overlay is durable". The monitor
//! (`vme-devices`' virtio-blk) reads and writes it; this module only knows the layout, so
//! the daemon can create and inspect overlays without the monitor's code.
//!
//! The header is never rewritten after creation; only bitmap pages and data change.
//! [`flatten`] merges an overlay and its base into a new raw image.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

pub const MAGIC: [u8; 8] = *b"VMEOVRLY";
pub const VERSION: u32 = 1;
/// Bytes of the header, and the granule of the bitmap (it is written in whole pages).
pub const HEADER_SIZE: u64 = 4096;
pub const BITMAP_PAGE: u64 = 4096;
/// Cluster size [`thin_clone`] uses: big enough that the bitmap is tiny (2 KiB per GiB),
/// small enough that a copy-on-write of a partial cluster is cheap.
pub const DEFAULT_CLUSTER_BITS: u32 = 16;
/// Cluster sizes a header may name: 4 KiB to 2 MiB.
pub const MIN_CLUSTER_BITS: u32 = 12;
pub const MAX_CLUSTER_BITS: u32 = 21;
/// Most clusters an overlay may have: the bitmap (kept in memory) is then 32 MiB at most.
pub const MAX_CLUSTERS: u64 = 1 << 28;
const SECTOR: u64 = 512;
/// Samples of the base that identify it cheaply ([`base_sample`]).
const SAMPLES: u64 = 16;
const SAMPLE_LEN: u64 = 4096;

/// `FICLONE` = `_IOW(0x94, 9, int)`: make the destination share the source's extents.
const FICLONE: libc::c_ulong = 0x4004_9409;

#[derive(Debug, thiserror::Error)]
pub enum OverlayError {
    #[error("{path}: {what}: {source}")]
    Io {
        path: PathBuf,
        what: &'static str,
        source: io::Error,
    },
    #[error("{path} is not a vme overlay or is damaged: {why}")]
    Malformed { path: PathBuf, why: String },
    #[error("base image {path} cannot be thin-cloned: {why}")]
    BadBase { path: PathBuf, why: String },
    #[error("{0} already exists: choose another name or remove it first")]
    Exists(PathBuf),
}

/// What [`thin_clone`] made.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CloneKind {
    /// A raw image sharing the base's extents: use it as an ordinary raw disk
    /// (`path=DEST`); the base is no longer needed by it.
    Reflink,
    /// An overlay: give the monitor both files (`path=DEST,base=BASE`).
    Overlay,
}

/// The overlay header, as decoded and checked by [`Header::decode`]. All integers are
/// little-endian on disk; offsets are in bytes from the start of the overlay file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    /// log2 of the cluster size.
    pub cluster_bits: u32,
    /// Size of the disk the guest sees (whole sectors).
    pub virtual_size: u64,
    /// Size of the base when the overlay was made; the monitor refuses any other size.
    pub base_size: u64,
    pub bitmap_offset: u64,
    /// Bytes of bitmap on disk (whole [`BITMAP_PAGE`]s).
    pub bitmap_len: u64,
    /// Where cluster 0's data is (cluster-aligned).
    pub data_offset: u64,
    /// The base's SHA-256 as the creator knew it (all zero: unknown). Not checked by the
    /// monitor, which cannot afford to hash the base at every start; the daemon compares
    /// it with the digest it verified the image blob against.
    pub base_digest: [u8; 32],
    /// [`base_sample`] of the base: a cheap check, at every open, that the base file is
    /// the one the overlay was made from (it catches a wrong or replaced file, not a
    /// deliberately forged one).
    pub base_sample: u64,
}

// Field offsets in the header.
const O_VERSION: usize = 8;
const O_HEADER_SIZE: usize = 12;
const O_CLUSTER_BITS: usize = 16;
const O_FLAGS: usize = 20;
const O_VIRTUAL: usize = 24;
const O_BASE_SIZE: usize = 32;
const O_BITMAP_OFF: usize = 40;
const O_BITMAP_LEN: usize = 48;
const O_DATA_OFF: usize = 56;
const O_DIGEST: usize = 64;
const O_SAMPLE: usize = 96;
const O_CHECKSUM: usize = 104;
const O_END: usize = 112;

impl Header {
    /// The layout of a new overlay of `base_size` bytes (rounded down to whole sectors).
    pub fn new(base_size: u64, base_digest: [u8; 32], base_sample: u64) -> Header {
        let cluster_bits = DEFAULT_CLUSTER_BITS;
        let virtual_size = base_size / SECTOR * SECTOR;
        let clusters = virtual_size.div_ceil(1 << cluster_bits);
        let bitmap_len = clusters.div_ceil(8).div_ceil(BITMAP_PAGE).max(1) * BITMAP_PAGE;
        let data_offset = (HEADER_SIZE + bitmap_len).next_multiple_of(1 << cluster_bits);
        Header {
            cluster_bits,
            virtual_size,
            base_size,
            bitmap_offset: HEADER_SIZE,
            bitmap_len,
            data_offset,
            base_digest,
            base_sample,
        }
    }

    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// Clusters of the virtual disk (the last may be partial).
    pub fn clusters(&self) -> u64 {
        self.virtual_size.div_ceil(self.cluster_size())
    }

    pub fn encode(&self) -> [u8; HEADER_SIZE as usize] {
        let mut h = [0u8; HEADER_SIZE as usize];
        h[..8].copy_from_slice(&MAGIC);
        put32(&mut h, O_VERSION, VERSION);
        put32(&mut h, O_HEADER_SIZE, HEADER_SIZE as u32);
        put32(&mut h, O_CLUSTER_BITS, self.cluster_bits);
        put32(&mut h, O_FLAGS, 0);
        put64(&mut h, O_VIRTUAL, self.virtual_size);
        put64(&mut h, O_BASE_SIZE, self.base_size);
        put64(&mut h, O_BITMAP_OFF, self.bitmap_offset);
        put64(&mut h, O_BITMAP_LEN, self.bitmap_len);
        put64(&mut h, O_DATA_OFF, self.data_offset);
        h[O_DIGEST..O_DIGEST + 32].copy_from_slice(&self.base_digest);
        put64(&mut h, O_SAMPLE, self.base_sample);
        let sum = fnv1a(FNV_INIT, &h);
        put64(&mut h, O_CHECKSUM, sum);
        h
    }

    /// Decodes and checks a header read from a file of `file_len` bytes. Everything is
    /// checked before use: a hostile file yields an error saying what is wrong, never a
    /// layout whose offsets overflow, overlap or reach outside what the monitor can map.
    pub fn decode(h: &[u8], file_len: u64) -> Result<Header, String> {
        if h.len() < HEADER_SIZE as usize {
            return Err(format!(
                "the file is {} bytes, shorter than the {HEADER_SIZE}-byte header",
                h.len()
            ));
        }
        let h = &h[..HEADER_SIZE as usize];
        if h[..8] != MAGIC {
            return Err("it does not start with the overlay magic \"VMEOVRLY\"".into());
        }
        let version = get32(h, O_VERSION);
        if version != VERSION {
            return Err(format!(
                "format version {version}; this vme reads version {VERSION} only: use the vme \
                 that made it"
            ));
        }
        let mut zeroed = [0u8; HEADER_SIZE as usize];
        zeroed.copy_from_slice(h);
        zeroed[O_CHECKSUM..O_CHECKSUM + 8].fill(0);
        if fnv1a(FNV_INIT, &zeroed) != get64(h, O_CHECKSUM) {
            return Err("the header checksum does not match (the header is corrupted)".into());
        }
        if get32(h, O_HEADER_SIZE) != HEADER_SIZE as u32 {
            return Err(format!(
                "header size {} is not 4096",
                get32(h, O_HEADER_SIZE)
            ));
        }
        if get32(h, O_FLAGS) != 0 || h[O_END..].iter().any(|&b| b != 0) {
            return Err("it uses flags or fields this vme does not know".into());
        }
        let mut digest = [0u8; 32];
        digest.copy_from_slice(&h[O_DIGEST..O_DIGEST + 32]);
        let hdr = Header {
            cluster_bits: get32(h, O_CLUSTER_BITS),
            virtual_size: get64(h, O_VIRTUAL),
            base_size: get64(h, O_BASE_SIZE),
            bitmap_offset: get64(h, O_BITMAP_OFF),
            bitmap_len: get64(h, O_BITMAP_LEN),
            data_offset: get64(h, O_DATA_OFF),
            base_digest: digest,
            base_sample: get64(h, O_SAMPLE),
        };
        hdr.check(file_len)?;
        Ok(hdr)
    }

    fn check(&self, file_len: u64) -> Result<(), String> {
        if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&self.cluster_bits) {
            return Err(format!(
                "cluster size 2^{} is outside 4 KiB..2 MiB",
                self.cluster_bits
            ));
        }
        if self.virtual_size == 0 || self.virtual_size % SECTOR != 0 {
            return Err(format!(
                "virtual size {} is not a positive number of 512-byte sectors",
                self.virtual_size
            ));
        }
        if self.clusters() > MAX_CLUSTERS {
            return Err(format!(
                "virtual size {} needs more than {MAX_CLUSTERS} clusters",
                self.virtual_size
            ));
        }
        let need = self.clusters().div_ceil(8);
        if self.bitmap_len < need || self.bitmap_len % BITMAP_PAGE != 0 {
            return Err(format!(
                "the bitmap is {} bytes; {} clusters need {} rounded up to whole 4 KiB pages",
                self.bitmap_len,
                self.clusters(),
                need
            ));
        }
        if self.bitmap_len > MAX_CLUSTERS / 8 + BITMAP_PAGE {
            return Err(format!("the bitmap is {} bytes: too long", self.bitmap_len));
        }
        if self.bitmap_offset < HEADER_SIZE || self.bitmap_offset % BITMAP_PAGE != 0 {
            return Err(format!(
                "bitmap offset {} overlaps the header or is not page-aligned",
                self.bitmap_offset
            ));
        }
        let bitmap_end = self
            .bitmap_offset
            .checked_add(self.bitmap_len)
            .ok_or("the bitmap's end overflows")?;
        if self.data_offset < bitmap_end || self.data_offset % self.cluster_size() != 0 {
            return Err(format!(
                "data offset {} overlaps the bitmap or is not cluster-aligned",
                self.data_offset
            ));
        }
        // Every offset the monitor computes (data_offset + a guest offset) must fit an off_t.
        let data_end = self
            .clusters()
            .checked_mul(self.cluster_size())
            .and_then(|n| n.checked_add(self.data_offset));
        if data_end.is_none_or(|end| end > i64::MAX as u64) {
            return Err("the data area's end is beyond the largest file offset".into());
        }
        if file_len < bitmap_end {
            return Err(format!(
                "the file is {file_len} bytes but its bitmap ends at {bitmap_end} (truncated)"
            ));
        }
        Ok(())
    }
}

fn put32(h: &mut [u8], at: usize, v: u32) {
    h[at..at + 4].copy_from_slice(&v.to_le_bytes());
}
fn put64(h: &mut [u8], at: usize, v: u64) {
    h[at..at + 8].copy_from_slice(&v.to_le_bytes());
}
fn get32(h: &[u8], at: usize) -> u32 {
    let mut b = [0u8; 4];
    b.copy_from_slice(&h[at..at + 4]);
    u32::from_le_bytes(b)
}
fn get64(h: &[u8], at: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&h[at..at + 8]);
    u64::from_le_bytes(b)
}

const FNV_INIT: u64 = 0xcbf2_9ce4_8422_2325;

/// FNV-1a, 64-bit: a checksum against corruption, not an authenticator.
fn fnv1a(mut h: u64, data: &[u8]) -> u64 {
    for &b in data {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// A cheap identity of a base of `size` bytes, read through `read_at`: FNV-1a over its
/// size and 16 evenly spaced 4 KiB samples (the first includes an ext4 superblock and its
/// UUID), plus its last 4 KiB. 68 KiB read, whatever the size.
pub fn base_sample(
    size: u64,
    mut read_at: impl FnMut(&mut [u8], u64) -> io::Result<()>,
) -> io::Result<u64> {
    let mut h = fnv1a(FNV_INIT, &size.to_le_bytes());
    let mut buf = [0u8; SAMPLE_LEN as usize];
    let step = (size / SAMPLES) / SAMPLE_LEN * SAMPLE_LEN;
    let offsets = (0..SAMPLES)
        .map(|i| i * step)
        .chain([size.saturating_sub(SAMPLE_LEN)]);
    for off in offsets {
        let n = SAMPLE_LEN.min(size - off.min(size)) as usize;
        read_at(&mut buf[..n], off)?;
        h = fnv1a(h, &buf[..n]);
    }
    Ok(h)
}

/// Reads and checks the header of the overlay at `path` (for the daemon: compare
/// [`Header::base_digest`] with the image's verified digest before a launch).
pub fn inspect(path: &Path) -> Result<Header, OverlayError> {
    let io = |what| {
        move |source| OverlayError::Io {
            path: path.into(),
            what,
            source,
        }
    };
    let f = File::open(path).map_err(io("cannot open the overlay"))?;
    let len = f.metadata().map_err(io("cannot stat the overlay"))?.len();
    let mut h = vec![0u8; HEADER_SIZE.min(len) as usize];
    f.read_exact_at(&mut h, 0)
        .map_err(io("cannot read the overlay header"))?;
    Header::decode(&h, len).map_err(|why| OverlayError::Malformed {
        path: path.into(),
        why,
    })
}

/// Makes `dest` a thin clone of the read-only image `base`: a reflink if the file system
/// supports it, else an overlay on `base` recording `base_digest` (its SHA-256, zeros when
/// unknown). O(1) in time and space either way. Atomic: `dest` appears complete or not at
/// all (a temporary file beside it, fsync, link into place, fsync of the directory); an
/// existing `dest` is never replaced. `dest` is created mode 0600.
pub fn thin_clone(
    base: &Path,
    dest: &Path,
    base_digest: [u8; 32],
) -> Result<CloneKind, OverlayError> {
    let src = File::open(base).map_err(|source| OverlayError::Io {
        path: base.into(),
        what: "cannot open the base image",
        source,
    })?;
    let meta = src.metadata().map_err(|source| OverlayError::Io {
        path: base.into(),
        what: "cannot stat the base image",
        source,
    })?;
    let bad = |why: String| OverlayError::BadBase {
        path: base.into(),
        why,
    };
    if !meta.is_file() {
        return Err(bad("it is not a regular file (give an image file)".into()));
    }
    if meta.len() < SECTOR {
        return Err(bad(format!(
            "it is {} bytes long, less than one 512-byte sector",
            meta.len()
        )));
    }
    let (tmp, dir) = beside(dest)?;
    let result = make_clone(&src, meta.len(), &tmp, base_digest, base)
        .and_then(|kind| publish(&tmp, dest, &dir).map(|()| kind));
    let _ = std::fs::remove_file(&tmp);
    result
}

/// A temporary name beside `dest` (`.NAME.vme-tmp-PID-NANOS`) and `dest`'s directory;
/// refuses an existing `dest` early (the link in [`publish`] is what guarantees it).
fn beside(dest: &Path) -> Result<(PathBuf, PathBuf), OverlayError> {
    if dest.exists() {
        return Err(OverlayError::Exists(dest.into()));
    }
    let dir = match dest.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = dest
        .file_name()
        .map_or("clone".into(), |n| n.to_string_lossy());
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let tmp = dir.join(format!(".{name}.vme-tmp-{}-{nanos}", std::process::id()));
    Ok((tmp, dir))
}

fn make_clone(
    src: &File,
    size: u64,
    tmp: &Path,
    digest: [u8; 32],
    base: &Path,
) -> Result<CloneKind, OverlayError> {
    let io = |what| {
        move |source| OverlayError::Io {
            path: tmp.into(),
            what,
            source,
        }
    };
    let out = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(tmp)
        .map_err(io("cannot create the clone"))?;
    // SAFETY: FICLONE takes the source descriptor as its argument and touches no memory
    // of ours; both descriptors are open for the duration of the call.
    let rc = unsafe { libc::ioctl(out.as_raw_fd(), FICLONE as _, src.as_raw_fd()) };
    let kind = if rc == 0 {
        CloneKind::Reflink
    } else {
        let err = io::Error::last_os_error();
        let unsupported = [
            libc::EOPNOTSUPP,
            libc::EXDEV,
            libc::EINVAL,
            libc::ENOTTY,
            libc::ENOSYS,
        ];
        if !err.raw_os_error().is_some_and(|e| unsupported.contains(&e)) {
            return Err(io("cannot reflink the base image into the clone")(err));
        }
        let sample =
            base_sample(size, |buf, off| src.read_exact_at(buf, off)).map_err(|source| {
                OverlayError::Io {
                    path: base.into(),
                    what: "cannot read the base image",
                    source,
                }
            })?;
        let h = Header::new(size, digest, sample);
        // A base too big for the format (over 16 TiB) is refused here, not at the VM's start.
        h.check(u64::MAX).map_err(|why| OverlayError::BadBase {
            path: base.into(),
            why,
        })?;
        out.write_all_at(&h.encode(), 0)
            .map_err(io("cannot write the overlay header"))?;
        // The bitmap's pages exist (all clear); the data area stays a hole until written.
        out.set_len(h.data_offset)
            .map_err(io("cannot size the overlay"))?;
        CloneKind::Overlay
    };
    out.sync_all().map_err(io("cannot sync the clone"))?;
    Ok(kind)
}

/// Links the finished `tmp` to `dest` (failing if `dest` exists: never replaced) and makes
/// the new name durable.
fn publish(tmp: &Path, dest: &Path, dir: &Path) -> Result<(), OverlayError> {
    std::fs::hard_link(tmp, dest).map_err(|source| {
        if source.kind() == io::ErrorKind::AlreadyExists {
            OverlayError::Exists(dest.into())
        } else {
            OverlayError::Io {
                path: dest.into(),
                what: "cannot put the clone in place",
                source,
            }
        }
    })?;
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|source| OverlayError::Io {
            path: dir.into(),
            what: "cannot sync the directory of the clone",
            source,
        })
}

#[path = "overlay_flatten.rs"]
mod flatten;
pub use flatten::flatten;

#[cfg(test)]
#[path = "overlay_tests.rs"]
mod tests;

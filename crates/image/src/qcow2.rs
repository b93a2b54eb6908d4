//! Our own qcow2 reader, just enough to convert an image to raw on import: versions 2 and 3,
//! the active L1/L2 tables, standard, all-zero and unallocated clusters, and zlib-compressed
//! clusters. Everything else is refused with what to run instead: a backing file (an image
//! must be self-contained), encryption, an external data file, extended L2 entries, zstd
//! compression, and any incompatible feature bit we do not know.
//!
//! The file is hostile. Every header field is checked before use (cluster size, virtual
//! size against a cap, table offsets aligned and inside the file, entries' reserved bits,
//! every sum and product checked for overflow), and memory is bounded whatever the header
//! says: one L2 table (at most 2 MiB), one run of data, one chunk of the L1 table. No input
//! makes it panic: see the mutation test in `qcow2_tests.rs`.
//!
//! Refcounts and internal snapshots are not read: converting reads the active layer only,
//! as `qemu-img convert` does.

use miniz_oxide::inflate::TINFLStatus;
use miniz_oxide::inflate::core::{DecompressorOxide, decompress, inflate_flags};
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

/// The first four bytes of every qcow2 file. Detection is by this magic, never by name.
pub const MAGIC: [u8; 4] = *b"QFI\xfb";
/// The virtual size a converted disk may have unless the caller says otherwise.
pub const DEFAULT_MAX_VIRTUAL_SIZE: u64 = 2 << 40;
/// qemu's own bounds: 512-byte to 2 MiB clusters, an L1 table of at most 32 MiB.
const MIN_CLUSTER_BITS: u32 = 9;
const MAX_CLUSTER_BITS: u32 = 21;
const MAX_L1_BYTES: u64 = 32 << 20;
/// Data clusters contiguous in the file are read together, up to this much at once.
const RUN: usize = 4 << 20;
/// L1 entries read at once.
const L1_CHUNK: u64 = 8192;

/// Offsets in L1 and L2 entries: bits 9 to 55.
const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
const L1_RESERVED: u64 = 0x7f00_0000_0000_01ff;
const L2_RESERVED: u64 = 0x3f00_0000_0000_01fe;
const L2_COMPRESSED: u64 = 1 << 62;
const L2_ZERO: u64 = 1;

/// Incompatible feature bits (version 3).
const INCOMPAT_DIRTY: u64 = 1 << 0;
const INCOMPAT_CORRUPT: u64 = 1 << 1;
const INCOMPAT_DATA_FILE: u64 = 1 << 2;
const INCOMPAT_COMPRESSION: u64 = 1 << 3;
const INCOMPAT_EXTL2: u64 = 1 << 4;

mod raw;
pub use raw::convert;

const HOW_TO_FLATTEN: &str = "qemu-img convert -O qcow2 IN OUT";

#[derive(Debug, thiserror::Error)]
pub enum Qcow2Error {
    #[error("invalid qcow2 image: {0}")]
    Invalid(String),
    #[error("unsupported qcow2 image: {0}")]
    Unsupported(String),
    #[error("cannot read the qcow2 image: {0}")]
    Read(io::Error),
    #[error("cannot write the raw disk: {0}")]
    Write(io::Error),
}

fn invalid<T>(m: String) -> Result<T, Qcow2Error> {
    Err(Qcow2Error::Invalid(m))
}

/// Whether `f` starts with the qcow2 magic.
pub fn is_qcow2(f: &File) -> io::Result<bool> {
    let mut m = [0u8; 4];
    match f.read_exact_at(&mut m, 0) {
        Ok(()) => Ok(m == MAGIC),
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(false),
        Err(e) => Err(e),
    }
}

/// A checked header: only what reading needs.
#[derive(Debug, Clone, PartialEq)]
pub struct Header {
    pub version: u32,
    pub cluster_bits: u32,
    pub virtual_size: u64,
    l1_size: u64,
    l1_offset: u64,
    /// 0 zlib, 1 zstd.
    compression_type: u8,
}

impl Header {
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }
}

fn be32(b: &[u8], at: usize) -> u32 {
    let mut x = [0u8; 4];
    x.copy_from_slice(&b[at..at + 4]);
    u32::from_be_bytes(x)
}

fn be64(b: &[u8], at: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(x)
}

/// An open qcow2 image.
pub struct Image<'a> {
    f: &'a File,
    len: u64,
    h: Header,
}

impl<'a> Image<'a> {
    /// Reads and checks the header of `f`; refuses a virtual size above `max_virtual_size`.
    pub fn open(f: &'a File, max_virtual_size: u64) -> Result<Image<'a>, Qcow2Error> {
        let len = f.metadata().map_err(Qcow2Error::Read)?.len();
        let mut b = [0u8; 112];
        let n = (len.min(b.len() as u64)) as usize;
        f.read_exact_at(&mut b[..n], 0).map_err(Qcow2Error::Read)?;
        if n < 72 || b[..4] != MAGIC {
            return invalid(format!(
                "it is {len} bytes and does not start with a qcow2 header (magic QFI\\xfb): \
                 give a qcow2 file, or --disk-format raw for a raw disk"
            ));
        }
        let version = be32(&b, 4);
        if version != 2 && version != 3 {
            return Err(Qcow2Error::Unsupported(format!(
                "version {version}: vme reads qcow2 versions 2 and 3; rewrite it with \
                 `qemu-img convert -O qcow2 -o compat=1.1 IN OUT`"
            )));
        }
        let cluster_bits = be32(&b, 20);
        if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cluster_bits) {
            return invalid(format!(
                "cluster_bits {cluster_bits} is outside {MIN_CLUSTER_BITS} to \
                 {MAX_CLUSTER_BITS} (512 bytes to 2 MiB clusters)"
            ));
        }
        let cs = 1u64 << cluster_bits;
        let backing_offset = be64(&b, 8);
        if backing_offset != 0 {
            let name = backing_name(f, len, cs, backing_offset, be32(&b, 16));
            return Err(Qcow2Error::Unsupported(format!(
                "it has a backing file {name}: an image must be self-contained; flatten it \
                 with `{HOW_TO_FLATTEN}` (which reads through the backing chain)"
            )));
        }
        let virtual_size = be64(&b, 24);
        if virtual_size > max_virtual_size {
            return invalid(format!(
                "its virtual size {virtual_size} bytes is above the {max_virtual_size} bytes \
                 allowed"
            ));
        }
        if virtual_size % 512 != 0 {
            // qemu counts 512-byte sectors and would silently drop the tail.
            return invalid(format!(
                "its virtual size {virtual_size} bytes is not a multiple of 512"
            ));
        }
        if be32(&b, 32) != 0 {
            return Err(Qcow2Error::Unsupported(format!(
                "it is encrypted (method {}): decrypt it first with `qemu-img convert \
                 --object secret,... --image-opts ... -O qcow2 OUT`",
                be32(&b, 32)
            )));
        }
        let mut compression_type = 0;
        if version == 3 {
            if n < 104 {
                return invalid(format!(
                    "a version 3 header needs 104 bytes; the file has {len}"
                ));
            }
            let header_length = be32(&b, 100);
            if header_length < 104 || u64::from(header_length) > cs || header_length % 8 != 0 {
                return invalid(format!(
                    "header_length {header_length} must be a multiple of 8 from 104 to the \
                     cluster size {cs}"
                ));
            }
            if header_length > 104 {
                compression_type = b[104];
            }
            let incompat = be64(&b, 72);
            let refuse = |m: &str| Err(Qcow2Error::Unsupported(m.to_string()));
            if incompat & INCOMPAT_CORRUPT != 0 {
                return refuse(
                    "it is marked corrupt: repair it with `qemu-img check -r all FILE` first",
                );
            }
            if incompat & INCOMPAT_DATA_FILE != 0 {
                return refuse(&format!(
                    "its data is in an external data file: an image must be self-contained; \
                     merge it with `{HOW_TO_FLATTEN}`"
                ));
            }
            if incompat & INCOMPAT_EXTL2 != 0 {
                return refuse(&format!(
                    "it uses extended L2 entries (subclusters): rewrite it without them with \
                     `{HOW_TO_FLATTEN}`"
                ));
            }
            let known = INCOMPAT_DIRTY | INCOMPAT_COMPRESSION;
            if incompat & !known != 0 {
                return refuse(&format!(
                    "it sets incompatible feature bits {:#x} that vme does not know: rewrite \
                     it with `{HOW_TO_FLATTEN}`",
                    incompat & !known
                ));
            }
            if (incompat & INCOMPAT_COMPRESSION != 0) != (compression_type != 0) {
                return invalid(format!(
                    "compression type {compression_type} disagrees with the compression \
                     feature bit"
                ));
            }
            if compression_type > 1 {
                return invalid(format!("unknown compression type {compression_type}"));
            }
        }
        let ext_start = if version == 3 { be32(&b, 100) } else { 72 };
        check_extensions(f, len, cs, u64::from(ext_start))?;
        let l1_size = u64::from(be32(&b, 36));
        let l1_offset = be64(&b, 40);
        let h = Header {
            version,
            cluster_bits,
            virtual_size,
            l1_size,
            l1_offset,
            compression_type,
        };
        let needed = virtual_size.div_ceil(h.l1_span());
        if l1_size < needed {
            return invalid(format!(
                "its L1 table has {l1_size} entries but a virtual size of {virtual_size} \
                 bytes needs {needed}"
            ));
        }
        let l1_bytes = l1_size * 8;
        if l1_bytes > MAX_L1_BYTES {
            return invalid(format!(
                "its L1 table is {l1_bytes} bytes, more than the {MAX_L1_BYTES} allowed"
            ));
        }
        if needed > 0 {
            check_table(l1_offset, needed * 8, cs, len, "the L1 table")?;
        }
        Ok(Image { f, len, h })
    }

    pub fn header(&self) -> &Header {
        &self.h
    }

    /// Streams the guest's disk in order into `out`: data, and runs of zeros (zero and
    /// unallocated clusters) that a sparse writer can skip.
    pub fn convert(&self, out: &mut dyn Sink) -> Result<(), Qcow2Error> {
        let h = &self.h;
        let cs = h.cluster_size();
        let span = h.l1_span();
        let needed = h.virtual_size.div_ceil(span);
        let mut l1 = Vec::new();
        let mut l2 = vec![0u8; cs as usize];
        let mut run = Run::new(self);
        let mut inflated = Vec::new();
        let mut compressed = Vec::new();
        let mut dec = Box::<DecompressorOxide>::default();
        for i in 0..needed {
            if i % L1_CHUNK == 0 {
                let k = (needed - i).min(L1_CHUNK);
                l1.resize(k as usize * 8, 0);
                // In bounds: checked at open.
                self.read(&mut l1, h.l1_offset + i * 8, "the L1 table")?;
            }
            let e = be64(&l1, (i % L1_CHUNK) as usize * 8);
            let base = i * span;
            let len = span.min(h.virtual_size - base);
            if e & L1_RESERVED != 0 {
                return invalid(format!(
                    "L1 entry {i} ({e:#x}) sets reserved bits: the image is damaged"
                ));
            }
            let l2_offset = e & OFFSET_MASK;
            if l2_offset == 0 {
                run.flush(out)?;
                out.zeros(len).map_err(Qcow2Error::Write)?;
                continue;
            }
            check_table(
                l2_offset,
                cs,
                cs,
                self.len,
                &format!("L1 entry {i}'s L2 table"),
            )?;
            self.read(&mut l2, l2_offset, "an L2 table")?;
            for j in 0..len.div_ceil(cs) {
                let e = be64(&l2, j as usize * 8);
                let guest = base + j * cs;
                let glen = cs.min(h.virtual_size - guest);
                let at = || format!("the L2 entry for guest offset {guest} ({e:#x})");
                if e & L2_COMPRESSED != 0 {
                    run.flush(out)?;
                    self.inflate(e, &mut dec, &mut compressed, &mut inflated, &at)?;
                    out.data(&inflated[..glen as usize])
                        .map_err(Qcow2Error::Write)?;
                    continue;
                }
                if e & L2_RESERVED != 0 {
                    return invalid(format!("{} sets reserved bits", at()));
                }
                let host = e & OFFSET_MASK;
                if e & L2_ZERO != 0 {
                    if h.version < 3 {
                        return invalid(format!(
                            "{} is a zero cluster, which version 2 does not have",
                            at()
                        ));
                    }
                    run.flush(out)?;
                    out.zeros(glen).map_err(Qcow2Error::Write)?;
                } else if host == 0 {
                    // Unallocated: no backing file, so it reads as zeros.
                    run.flush(out)?;
                    out.zeros(glen).map_err(Qcow2Error::Write)?;
                } else {
                    if host % cs != 0 {
                        return invalid(format!(
                            "{} points at {host}, not a cluster boundary",
                            at()
                        ));
                    }
                    if host.checked_add(glen).is_none_or(|end| end > self.len) {
                        return invalid(format!(
                            "{} points at {host}, beyond the end of the {}-byte file (is it \
                             truncated?)",
                            at(),
                            self.len
                        ));
                    }
                    run.add(host, glen, out)?;
                }
            }
        }
        run.flush(out)
    }

    /// Decompresses the cluster of compressed L2 entry `e` into `out` (a whole cluster).
    fn inflate(
        &self,
        e: u64,
        dec: &mut DecompressorOxide,
        buf: &mut Vec<u8>,
        out: &mut Vec<u8>,
        at: &dyn Fn() -> String,
    ) -> Result<(), Qcow2Error> {
        let h = &self.h;
        if h.compression_type != 0 {
            return Err(Qcow2Error::Unsupported(format!(
                "it has zstd-compressed clusters, which vme does not read: rewrite it \
                 uncompressed with `{HOW_TO_FLATTEN}` (without -c)"
            )));
        }
        // Bits 0..x-1: the host offset; bits x..61: the extra 512-byte sectors.
        let x = 62 - (h.cluster_bits - 8);
        let host = e & ((1u64 << x) - 1);
        let sectors = (e >> x) & ((1u64 << (h.cluster_bits - 8)) - 1);
        // At most 2 clusters: bounded by the field's width.
        let size = (sectors + 1) * 512 - (host & 511);
        if host >= self.len {
            return invalid(format!(
                "{} points at {host}, beyond the end of the {}-byte file",
                at(),
                self.len
            ));
        }
        // qemu may write the last compressed cluster's sectors past the end of the file.
        let size = size.min(self.len - host) as usize;
        buf.resize(size, 0);
        self.read(buf, host, "a compressed cluster")?;
        out.resize(h.cluster_size() as usize, 0);
        dec.init();
        // A whole cluster must come out; the stream may end there or be cut at it (as qemu).
        let flags = inflate_flags::TINFL_FLAG_USING_NON_WRAPPING_OUTPUT_BUF;
        let (status, _, n) = decompress(dec, buf, out, 0, flags);
        match status {
            TINFLStatus::Done | TINFLStatus::HasMoreOutput if n == out.len() => Ok(()),
            _ => invalid(format!(
                "{}: its compressed data does not inflate to a {}-byte cluster ({status:?} \
                 after {n} bytes)",
                at(),
                out.len()
            )),
        }
    }

    fn read(&self, buf: &mut [u8], at: u64, what: &str) -> Result<(), Qcow2Error> {
        self.f.read_exact_at(buf, at).map_err(|e| {
            if e.kind() == io::ErrorKind::UnexpectedEof {
                Qcow2Error::Invalid(format!("{what} at {at} runs past the end of the file"))
            } else {
                Qcow2Error::Read(e)
            }
        })
    }
}

impl Header {
    /// Guest bytes one L1 entry covers: a cluster of L2 entries, each a cluster.
    fn l1_span(&self) -> u64 {
        1u64 << (2 * self.cluster_bits - 3)
    }
}

/// Checks a table of `size` bytes at `offset`: cluster-aligned and inside the file.
fn check_table(offset: u64, size: u64, cs: u64, len: u64, what: &str) -> Result<(), Qcow2Error> {
    if offset % cs != 0 {
        return invalid(format!("{what} is at {offset}, not a cluster boundary"));
    }
    if offset.checked_add(size).is_none_or(|end| end > len) {
        return invalid(format!(
            "{what} ({size} bytes at {offset}) runs past the end of the {len}-byte file (is it \
             truncated?)"
        ));
    }
    Ok(())
}

/// Walks the header extensions (type, length, data padded to 8 bytes, up to an end marker):
/// they must lie inside the first cluster. Their contents are not needed: what matters
/// (backing file, external data file) is refused from the header's own fields and bits.
fn check_extensions(f: &File, len: u64, cs: u64, mut at: u64) -> Result<(), Qcow2Error> {
    let end = cs.min(len);
    while at + 8 <= end {
        let mut h = [0u8; 8];
        f.read_exact_at(&mut h, at).map_err(Qcow2Error::Read)?;
        let (kind, size) = (be32(&h, 0), u64::from(be32(&h, 4)));
        // Checked before the end marker's type, as qemu does.
        if at + 8 + size > end {
            return invalid(format!(
                "header extension {kind:#x} ({size} bytes at {at}) runs past the first cluster"
            ));
        }
        if kind == 0 {
            return Ok(());
        }
        at += 8 + size.div_ceil(8) * 8;
    }
    // No end marker before the first cluster's end: qemu reads none past it either.
    Ok(())
}

/// The backing file's name for a message, quoted, or a note that it cannot be read.
fn backing_name(f: &File, len: u64, cs: u64, offset: u64, size: u32) -> String {
    // The spec bounds the name to 1023 bytes inside the first cluster.
    let size = u64::from(size);
    if size == 0 || size > 1023 || offset.checked_add(size).is_none_or(|e| e > len.min(cs)) {
        return "(its name is out of bounds)".into();
    }
    let mut b = vec![0u8; size as usize];
    match f.read_exact_at(&mut b, offset) {
        Ok(()) => format!("{:?}", String::from_utf8_lossy(&b)),
        Err(_) => "(its name cannot be read)".into(),
    }
}

/// Where converted bytes go, in guest order.
pub trait Sink {
    /// The next `b.len()` bytes of the disk.
    fn data(&mut self, b: &[u8]) -> io::Result<()>;
    /// The next `len` bytes of the disk are zeros.
    fn zeros(&mut self, len: u64) -> io::Result<()>;
}

/// Data clusters contiguous in the file, read with one pread.
struct Run<'i, 'a> {
    img: &'i Image<'a>,
    start: u64,
    len: usize,
    buf: Vec<u8>,
}

impl<'i, 'a> Run<'i, 'a> {
    fn new(img: &'i Image<'a>) -> Self {
        Run {
            img,
            start: 0,
            len: 0,
            buf: Vec::new(),
        }
    }

    fn add(&mut self, host: u64, len: u64, out: &mut dyn Sink) -> Result<(), Qcow2Error> {
        let len = len as usize; // At most one cluster.
        if self.len > 0 && (self.start + self.len as u64 != host || self.len + len > RUN) {
            self.flush(out)?;
        }
        if self.len == 0 {
            self.start = host;
        }
        self.len += len;
        Ok(())
    }

    fn flush(&mut self, out: &mut dyn Sink) -> Result<(), Qcow2Error> {
        if self.len == 0 {
            return Ok(());
        }
        self.buf.resize(self.len, 0);
        self.img.read(&mut self.buf, self.start, "a data cluster")?;
        self.len = 0;
        out.data(&self.buf).map_err(Qcow2Error::Write)
    }
}

#[cfg(test)]
#[path = "qcow2_tests.rs"]
mod tests;

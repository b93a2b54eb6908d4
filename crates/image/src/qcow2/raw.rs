//! The raw side of a conversion: a [`Sink`] that hashes the disk in order and writes it
//! with pwrite, skipping zeros so the file is sparse.

use super::{Image, Qcow2Error, Sink, invalid};
use crate::{Digest, Hasher};
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

/// Converts qcow2 file `src` to raw: written sparsely into `dst` (a new, empty file) if
/// given, and hashed. The raw disk's digest and size.
pub fn convert(
    src: &File,
    dst: Option<&File>,
    max_virtual_size: u64,
) -> Result<(Digest, u64), Qcow2Error> {
    let img = Image::open(src, max_virtual_size)?;
    let mut out = RawOut {
        file: dst,
        pos: 0,
        hash: Hasher::default(),
    };
    img.convert(&mut out)?;
    if out.pos != img.h.virtual_size {
        return invalid(format!(
            "it converted to {} bytes, not its virtual size {}",
            out.pos, img.h.virtual_size
        ));
    }
    if let Some(f) = dst {
        // The holes at the end, if any.
        f.set_len(out.pos).map_err(Qcow2Error::Write)?;
    }
    Ok((out.hash.finish(), out.pos))
}

/// Zero blocks are not written, so the raw file is sparse where the disk is zero.
const BLOCK: usize = 4096;
static ZEROS: [u8; 1 << 16] = [0; 1 << 16];

/// A raw disk being written: hashed in order, written with pwrite, zeros skipped.
struct RawOut<'f> {
    file: Option<&'f File>,
    pos: u64,
    hash: Hasher,
}

fn is_zero(b: &[u8]) -> bool {
    // OR-folding fixed chunks vectorises; `iter().all` would go byte by byte.
    let mut chunks = b.chunks_exact(64);
    chunks.all(|c| c.iter().fold(0u8, |a, &x| a | x) == 0)
        && chunks.remainder().iter().all(|&x| x == 0)
}

impl Sink for RawOut<'_> {
    fn data(&mut self, b: &[u8]) -> io::Result<()> {
        self.hash.update(b);
        if let Some(f) = self.file {
            // Runs of non-zero blocks, each written at once.
            let mut start = None;
            for (i, blk) in b.chunks(BLOCK).enumerate() {
                match (is_zero(blk), start) {
                    (false, None) => start = Some(i * BLOCK),
                    (true, Some(s)) => {
                        f.write_all_at(&b[s..i * BLOCK], self.pos + s as u64)?;
                        start = None;
                    }
                    _ => {}
                }
            }
            if let Some(s) = start {
                f.write_all_at(&b[s..], self.pos + s as u64)?;
            }
        }
        self.pos += b.len() as u64;
        Ok(())
    }

    fn zeros(&mut self, len: u64) -> io::Result<()> {
        let mut left = len;
        while left > 0 {
            let k = left.min(ZEROS.len() as u64) as usize;
            self.hash.update(&ZEROS[..k]);
            left -= k as u64;
        }
        self.pos += len;
        Ok(())
    }
}

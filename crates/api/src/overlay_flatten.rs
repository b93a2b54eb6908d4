//! [`flatten`]: an overlay and its base merged into a new raw image (for publishing a
//! stopped VM's volume as an image). Reads what the overlay file records — the monitor
//! records every write at a clean end — and never writes the overlay or the base.

use super::{Header, OverlayError, base_sample, beside, publish};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;

/// Writes `dest` (mode 0600, atomically, never replacing a file): the disk the guest of
/// `overlay` on `base` saw, as a raw image of the overlay's virtual size, sparse where it
/// is zero. The base must be the one the overlay was made from (size and sample, as the
/// monitor checks). Returns the bytes of data written (the rest are holes).
pub fn flatten(overlay: &Path, base: &Path, dest: &Path) -> Result<u64, OverlayError> {
    let io = |path: &Path, what: &'static str| {
        let path = path.to_path_buf();
        move |source| OverlayError::Io { path, what, source }
    };
    let h = super::inspect(overlay)?;
    let ovl = File::open(overlay).map_err(io(overlay, "cannot open the overlay"))?;
    let src = File::open(base).map_err(io(base, "cannot open the base image"))?;
    let size = src
        .metadata()
        .map_err(io(base, "cannot stat the base image"))?
        .len();
    let sample = base_sample(size, |buf, off| src.read_exact_at(buf, off))
        .map_err(io(base, "cannot read the base image"))?;
    if size != h.base_size || sample != h.base_sample {
        return Err(OverlayError::BadBase {
            path: base.into(),
            why: format!(
                "it is not the image overlay {} was made from (its size or contents differ)",
                overlay.display()
            ),
        });
    }
    let mut bitmap = vec![0u8; h.bitmap_len as usize];
    ovl.read_exact_at(&mut bitmap, h.bitmap_offset)
        .map_err(io(overlay, "cannot read the overlay's bitmap"))?;
    let (tmp, dir) = beside(dest)?;
    let result = copy_out(&h, &bitmap, &ovl, &src, &tmp)
        .map_err(io(&tmp, "cannot write the flattened image"))
        .and_then(|n| publish(&tmp, dest, &dir).map(|()| n));
    let _ = std::fs::remove_file(&tmp);
    result
}

fn copy_out(h: &Header, bitmap: &[u8], ovl: &File, base: &File, tmp: &Path) -> io::Result<u64> {
    let out = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(tmp)?;
    out.set_len(h.virtual_size)?;
    let cs = h.cluster_size();
    let mut buf = vec![0u8; cs as usize];
    let mut written = 0;
    for c in 0..h.clusters() {
        let start = c * cs;
        let len = cs.min(h.virtual_size - start) as usize;
        let piece = &mut buf[..len];
        if bitmap[(c / 8) as usize] & (1 << (c % 8)) != 0 {
            ovl.read_exact_at(piece, h.data_offset + start)?;
        } else {
            let n = h.base_size.saturating_sub(start).min(len as u64) as usize;
            base.read_exact_at(&mut piece[..n], start)?;
            piece[n..].fill(0);
        }
        if piece.iter().any(|&b| b != 0) {
            out.write_all_at(piece, start)?;
            written += len as u64;
        }
    }
    out.sync_all()?;
    Ok(written)
}

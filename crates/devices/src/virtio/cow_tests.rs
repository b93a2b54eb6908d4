use super::*;
use crate::virtio::block::Block;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};

const CS: usize = 64 << 10;
/// Not a whole number of clusters: the last one is short.
const BASE: usize = 5 * CS + 4096 + 512;

struct Dir(PathBuf);

impl Dir {
    fn new() -> Dir {
        static N: AtomicUsize = AtomicUsize::new(0);
        let p = std::env::temp_dir().join(format!(
            "vme-cow-test-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        std::fs::create_dir_all(&p).unwrap();
        Dir(p)
    }
    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i / 512) as u8 ^ (i as u8).wrapping_mul(3) ^ seed)
        .collect()
}

/// A base with a pattern and an empty overlay on it (made as `thin_clone` makes one when
/// the file system has no reflinks, whatever this one has).
fn setup(d: &Dir) -> (PathBuf, PathBuf, Vec<u8>) {
    let base = d.path("base.raw");
    let data = pattern(BASE, 0x5a);
    std::fs::write(&base, &data).unwrap();
    let ovl = d.path("vm.ovl");
    make_overlay(&base, &ovl, &data);
    (base, ovl, data)
}

fn make_overlay(base: &Path, ovl: &Path, _data: &[u8]) {
    new_overlay_file(base, ovl).unwrap();
}

fn read_all(o: &mut Overlay) -> Vec<u8> {
    let mut v = vec![0u8; o.capacity() as usize];
    o.read_at(&mut v, 0).unwrap();
    v
}

/// What the file system would hold after a crash now: a copy of the overlay file.
fn crash_copy(d: &Dir, ovl: &Path) -> PathBuf {
    let p = d.path(&format!(
        "crash-{}.ovl",
        std::time::Instant::now().elapsed().as_nanos()
    ));
    std::fs::copy(ovl, &p).unwrap();
    p
}

#[test]
fn partial_cluster_writes_copy_the_rest_from_the_base() {
    let d = Dir::new();
    let (base, ovl, data) = setup(&d);
    let mut o = Overlay::open(&ovl, &base, false).unwrap();
    assert_eq!(o.capacity(), BASE as u64);
    let mut model = data.clone();
    assert_eq!(
        read_all(&mut o),
        model,
        "an empty overlay reads as its base"
    );

    // Across the boundary of clusters 0 and 1, both partial.
    let w = pattern(1024, 0x11);
    o.write_at(&w, CS as u64 - 512).unwrap();
    model[CS - 512..CS + 512].copy_from_slice(&w);
    // Cluster 3 whole and the start of cluster 4.
    let w = pattern(CS + 4096, 0x22);
    o.write_at(&w, 3 * CS as u64).unwrap();
    model[3 * CS..4 * CS + 4096].copy_from_slice(&w);
    // The short last cluster, its last sector.
    o.write_at(&[0xee; 512], BASE as u64 - 512).unwrap();
    model[BASE - 512..].fill(0xee);
    // A rewrite inside an allocated cluster.
    o.write_at(&[0x77; 100], 10).unwrap();
    model[10..110].fill(0x77);

    let alloc: Vec<bool> = (0..6).map(|c| o.allocated(c)).collect();
    assert_eq!(alloc, [true, true, false, true, true, true]);
    assert_eq!(read_all(&mut o), model);
    // Reads that start and end in the middle of runs of either kind.
    for (off, len) in [
        (100, 3 * CS),
        (CS + 7, CS),
        (2 * CS - 1, CS + 2),
        (BASE - 513, 513),
    ] {
        let mut v = vec![0u8; len];
        o.read_at(&mut v, off as u64).unwrap();
        assert_eq!(v, model[off..off + len], "{off}+{len}");
    }
    // Outside the disk: refused, nothing moves.
    let mut v = vec![0u8; 1024];
    assert!(o.read_at(&mut v, BASE as u64 - 512).is_err());
    assert!(o.write_at(&v, BASE as u64 - 512).is_err());
    assert!(o.write_at(&v, u64::MAX - 10).is_err());
    assert!(o.zero(u64::MAX - 10, 1024, false).is_err());
    o.flush().unwrap();
    drop(o);
    assert_eq!(
        std::fs::read(&base).unwrap(),
        data,
        "the base is never written"
    );
    let mut again = Overlay::open(&ovl, &base, true).unwrap();
    assert_eq!(read_all(&mut again), model);
}

#[test]
fn the_bitmap_reaches_the_file_only_on_flush() {
    let d = Dir::new();
    let (base, ovl, data) = setup(&d);
    let mut o = Overlay::open(&ovl, &base, false).unwrap();
    o.write_at(&[0xab; 4096], 4096).unwrap();
    o.write_at(&pattern(2 * CS, 9), 2 * CS as u64).unwrap();
    // A crash now: the data may be in the file, but nothing claims it.
    let crashed = crash_copy(&d, &ovl);
    let bitmap_at = o.h.bitmap_offset as usize;
    assert_eq!(std::fs::read(&crashed).unwrap()[bitmap_at], 0);
    let mut c = Overlay::open(&crashed, &base, true).unwrap();
    assert_eq!(
        read_all(&mut c),
        data,
        "unflushed writes are lost, the base shows"
    );
    drop(c);

    o.flush().unwrap();
    let crashed = crash_copy(&d, &ovl);
    assert_eq!(
        std::fs::read(&crashed).unwrap()[bitmap_at],
        0b1101,
        "clusters 0, 2 and 3"
    );
    let mut c = Overlay::open(&crashed, &base, true).unwrap();
    let got = read_all(&mut c);
    assert_eq!(got[4096..8192], [0xab; 4096]);
    assert_eq!(got[2 * CS..4 * CS], pattern(2 * CS, 9)[..]);
    assert_eq!(got[..4096], data[..4096]);

    // A clean end (the device dropped) records bits without a FLUSH.
    o.write_at(&[0xcd; 512], 5 * CS as u64).unwrap();
    drop(o);
    let mut c = Overlay::open(&ovl, &base, true).unwrap();
    assert_eq!(read_all(&mut c)[5 * CS..5 * CS + 512], [0xcd; 512]);
}

#[test]
fn write_zeroes_and_discard() {
    let d = Dir::new();
    let (base, ovl, data) = setup(&d);
    let mut o = Overlay::open(&ovl, &base, false).unwrap();
    let blocks_before = std::fs::metadata(&ovl).unwrap().blocks();
    // Zeroes from the middle of cluster 0 to the middle of cluster 4: 0 and 4 by
    // copy-on-write, 1..=3 as holes.
    let (from, to) = (CS / 2, 4 * CS + 100 * 512);
    o.zero(from as u64, (to - from) as u64, false).unwrap();
    let mut model = data.clone();
    model[from..to].fill(0);
    assert_eq!(read_all(&mut o), model);
    assert!((0..5).all(|c| o.allocated(c)));
    let grew = (std::fs::metadata(&ovl).unwrap().blocks() - blocks_before) * 512;
    assert!(
        grew <= 2 * CS as u64 + 8192,
        "only the edges use space: {grew}"
    );
    o.flush().unwrap();

    // Discard of allocated clusters frees their space; of others it is a no-op.
    o.write_at(&pattern(CS, 3), 0).unwrap();
    o.zero(0, BASE as u64, true).unwrap();
    let got = read_all(&mut o);
    assert_eq!(got[5 * CS..], data[5 * CS..], "unallocated: still the base");
    drop(o);
    assert_eq!(std::fs::read(&base).unwrap(), data);
    let mut c = Overlay::open(&ovl, &base, true).unwrap();
    assert_eq!(read_all(&mut c)[CS..4 * CS], vec![0u8; 3 * CS][..]);
}

#[test]
fn a_wrong_base_or_a_damaged_overlay_is_refused() {
    let d = Dir::new();
    let (base, ovl, data) = setup(&d);
    let msg = |p: &Path, b: &Path| match Block::open_disk(p, Some(b), false, "") {
        Ok(_) => panic!("{} on {} opened", p.display(), b.display()),
        Err(e) => e.to_string(),
    };
    // Same size, other contents (another image's superblock).
    let other = d.path("other.raw");
    let mut o = data.clone();
    o[1024 + 104] ^= 0xff;
    std::fs::write(&other, &o).unwrap();
    assert!(msg(&ovl, &other).contains("contents differ"));
    std::fs::write(&other, &data[..BASE - 512]).unwrap();
    assert!(msg(&ovl, &other).contains("bytes"));
    // A raw image given as the overlay.
    assert!(msg(&other, &base).contains("overlay magic"));
    // A header whose checksum does not match.
    let mut bytes = std::fs::read(&ovl).unwrap();
    bytes[40] ^= 1;
    let bad = d.path("bad.ovl");
    std::fs::write(&bad, &bytes).unwrap();
    assert!(msg(&bad, &base).contains("checksum"));
    // Empty and truncated files.
    std::fs::write(&bad, b"").unwrap();
    assert!(msg(&bad, &base).contains("shorter than"));
    std::fs::write(&bad, &std::fs::read(&ovl).unwrap()[..4096]).unwrap();
    assert!(msg(&bad, &base).contains("truncated"));
    // The base is in use by a writer: refused, and the other way round.
    let writer = Block::open(&other, false, "").unwrap();
    assert!(msg(&ovl, &other).contains("in use"));
    drop(writer);
    let _overlay = Block::open_disk(&ovl, Some(&base), false, "").unwrap();
    assert!(Block::open(&base, false, "").is_err());
    // Two overlays of one base may run at once; one overlay cannot be opened twice.
    let ovl2 = d.path("vm2.ovl");
    make_overlay(&base, &ovl2, &data);
    assert!(Block::open_disk(&ovl2, Some(&base), false, "").is_ok());
    assert!(msg(&ovl, &base).contains("in use"));
}

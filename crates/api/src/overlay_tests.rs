use super::*;
use std::os::unix::fs::MetadataExt;
use std::sync::atomic::{AtomicUsize, Ordering};

fn temp_dir(tag: &str) -> PathBuf {
    static N: AtomicUsize = AtomicUsize::new(0);
    let d = std::env::temp_dir().join(format!(
        "vme-ovl-{tag}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    ));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Recomputes the checksum of an edited header, so a test reaches the field checks.
fn reseal(h: &mut [u8]) {
    h[O_CHECKSUM..O_CHECKSUM + 8].fill(0);
    let sum = fnv1a(FNV_INIT, &h[..HEADER_SIZE as usize]);
    put64(h, O_CHECKSUM, sum);
}

#[test]
fn a_header_round_trips_and_lays_out_a_gib() {
    let h = Header::new(1 << 30, [7; 32], 42);
    assert_eq!(h.cluster_size(), 64 << 10);
    assert_eq!(h.clusters(), 16384);
    assert_eq!(h.bitmap_len, 4096);
    assert_eq!(h.data_offset, 64 << 10);
    let bytes = h.encode();
    assert_eq!(Header::decode(&bytes, h.data_offset).unwrap(), h);
    // Odd sizes: whole sectors only, a partial last cluster.
    let h = Header::new((1 << 20) + 1000, [0; 32], 0);
    assert_eq!(h.virtual_size, (1 << 20) + 512);
    assert_eq!(h.clusters(), 17);
    assert_eq!(Header::decode(&h.encode(), 1 << 20).unwrap(), h);
}

#[test]
fn hostile_headers_are_refused_with_a_reason() {
    let good = Header::new(1 << 30, [0; 32], 1).encode();
    let len = 1 << 16;
    // (what the error names, the edit, whether to recompute the checksum after it)
    type Case = (&'static str, Box<dyn Fn(&mut [u8])>, bool);
    let cases: Vec<Case> = vec![
        ("magic", Box::new(|h| h[0] = b'X'), false),
        ("version", Box::new(|h| put32(h, O_VERSION, 2)), true),
        ("checksum", Box::new(|h| h[200] = 1), false),
        (
            "header size",
            Box::new(|h| put32(h, O_HEADER_SIZE, 512)),
            true,
        ),
        ("flags", Box::new(|h| put32(h, O_FLAGS, 1)), true),
        ("does not know", Box::new(|h| h[300] = 1), true),
        (
            "cluster size",
            Box::new(|h| put32(h, O_CLUSTER_BITS, 63)),
            true,
        ),
        (
            "cluster size",
            Box::new(|h| put32(h, O_CLUSTER_BITS, 9)),
            true,
        ),
        ("virtual size", Box::new(|h| put64(h, O_VIRTUAL, 0)), true),
        (
            "virtual size",
            Box::new(|h| put64(h, O_VIRTUAL, 1000)),
            true,
        ),
        (
            "clusters",
            Box::new(|h| put64(h, O_VIRTUAL, u64::MAX / 512 * 512)),
            true,
        ),
        ("bitmap is", Box::new(|h| put64(h, O_BITMAP_LEN, 0)), true),
        (
            "bitmap is",
            Box::new(|h| put64(h, O_BITMAP_LEN, 4095)),
            true,
        ),
        (
            "too long",
            Box::new(|h| put64(h, O_BITMAP_LEN, 1 << 40)),
            true,
        ),
        (
            "bitmap offset",
            Box::new(|h| put64(h, O_BITMAP_OFF, 0)),
            true,
        ),
        (
            "overflows",
            Box::new(|h| put64(h, O_BITMAP_OFF, u64::MAX - 4095)),
            true,
        ),
        (
            "data offset",
            Box::new(|h| put64(h, O_DATA_OFF, 4096)),
            true,
        ),
        (
            "data offset",
            Box::new(|h| put64(h, O_DATA_OFF, 65537)),
            true,
        ),
        (
            "largest file offset",
            Box::new(|h| put64(h, O_DATA_OFF, 1 << 63)),
            true,
        ),
    ];
    for (want, edit, seal) in cases {
        let mut h = good;
        edit(&mut h);
        if seal {
            reseal(&mut h);
        }
        let e = Header::decode(&h, len).unwrap_err();
        assert!(e.contains(want), "{want}: {e}");
    }
    let e = Header::decode(&good[..100], 100).unwrap_err();
    assert!(e.contains("shorter than"), "{e}");
    let e = Header::decode(&good, 4096).unwrap_err();
    assert!(e.contains("truncated"), "{e}");
}

#[test]
fn the_base_sample_sees_a_changed_base() {
    let data: Vec<u8> = (0..1u32 << 20).map(|i| (i % 251) as u8).collect();
    let sample = |d: &[u8]| {
        base_sample(d.len() as u64, |buf, off| {
            buf.copy_from_slice(&d[off as usize..off as usize + buf.len()]);
            Ok(())
        })
        .unwrap()
    };
    let s = sample(&data);
    assert_eq!(s, sample(&data));
    let mut other = data.clone();
    other[1024 + 100] ^= 1; // where an ext4 superblock (and its UUID) is
    assert_ne!(s, sample(&other));
    assert_ne!(s, sample(&data[..data.len() - 512]));
    // Tiny bases work too.
    assert_ne!(sample(&[1u8; 512]), sample(&[2u8; 512]));
}

#[test]
fn thin_clone_of_a_gib_is_o1_and_never_replaces() {
    let dir = temp_dir("clone");
    let base = dir.join("base.raw");
    let f = File::create(&base).unwrap();
    f.set_len(1 << 30).unwrap();
    f.write_all_at(b"hello base", 1 << 29).unwrap();
    drop(f);
    let dest = dir.join("vm.ovl");
    let kind = thin_clone(&base, &dest, [9; 32]).unwrap();
    let meta = std::fs::metadata(&dest).unwrap();
    assert!(meta.blocks() * 512 < 1 << 20, "{} blocks", meta.blocks());
    assert_eq!(meta.mode() & 0o777, 0o600);
    match kind {
        CloneKind::Overlay => {
            let h = inspect(&dest).unwrap();
            assert_eq!(h.virtual_size, 1 << 30);
            assert_eq!(h.base_size, 1 << 30);
            assert_eq!(h.base_digest, [9; 32]);
        }
        CloneKind::Reflink => {
            assert_eq!(meta.len(), 1 << 30);
        }
    }
    // No temporary file is left behind, and an existing destination is kept.
    let names: Vec<_> = std::fs::read_dir(&dir).unwrap().collect();
    assert_eq!(names.len(), 2);
    std::fs::write(&dest, b"mine").unwrap();
    let e = thin_clone(&base, &dest, [0; 32]).unwrap_err();
    assert!(matches!(e, OverlayError::Exists(_)), "{e}");
    assert_eq!(std::fs::read(&dest).unwrap(), b"mine");
    let e = thin_clone(&dir, &dir.join("x"), [0; 32]).unwrap_err();
    assert!(e.to_string().contains("not a regular file"), "{e}");
    std::fs::write(dir.join("tiny"), b"x").unwrap();
    let e = thin_clone(&dir.join("tiny"), &dir.join("x"), [0; 32]).unwrap_err();
    assert!(
        e.to_string().contains("less than one 512-byte sector"),
        "{e}"
    );
    let e = thin_clone(&dir.join("missing"), &dir.join("x"), [0; 32]).unwrap_err();
    assert!(e.to_string().contains("cannot open the base"), "{e}");
    assert!(!dir.join("x").exists());
    let e = inspect(&base).unwrap_err();
    assert!(e.to_string().contains("overlay magic"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn flatten_merges_what_the_overlay_records_with_its_base() {
    let dir = temp_dir("flatten");
    let cs = 64 << 10;
    let size = 5 * cs + 512;
    let data: Vec<u8> = (0..size).map(|i| (i / 512) as u8 | 1).collect();
    let base = dir.join("base.raw");
    std::fs::write(&base, &data).unwrap();
    let ovl = dir.join("vm.ovl");
    let f = File::create(&ovl).unwrap();
    let sample = base_sample(size as u64, |buf, off| {
        buf.copy_from_slice(&data[off as usize..off as usize + buf.len()]);
        Ok(())
    })
    .unwrap();
    let h = Header::new(size as u64, [0; 32], sample);
    f.write_all_at(&h.encode(), 0).unwrap();
    // Clusters 1 (a pattern) and 3 (zeroes: a hole in the result) are recorded; cluster 4
    // has data but no bit (an unflushed write before a crash): it reads from the base.
    f.write_all_at(&[0b1010], h.bitmap_offset).unwrap();
    f.write_all_at(&vec![0xee; cs], h.data_offset + cs as u64)
        .unwrap();
    f.write_all_at(&vec![0; cs], h.data_offset + 3 * cs as u64)
        .unwrap();
    f.write_all_at(&vec![0x77; cs], h.data_offset + 4 * cs as u64)
        .unwrap();
    drop(f);
    let mut want = data.clone();
    want[cs..2 * cs].fill(0xee);
    want[3 * cs..4 * cs].fill(0);

    let out = dir.join("flat.raw");
    let written = flatten(&ovl, &base, &out).unwrap();
    assert_eq!(std::fs::read(&out).unwrap(), want);
    assert_eq!(written, (size - cs) as u64, "the zero cluster is a hole");
    assert_eq!(std::fs::read(&base).unwrap(), data, "the base is untouched");
    let e = flatten(&ovl, &base, &out).unwrap_err();
    assert!(matches!(e, OverlayError::Exists(_)), "{e}");
    let other = dir.join("other.raw");
    std::fs::write(&other, vec![2u8; size]).unwrap();
    let e = flatten(&ovl, &other, &dir.join("x")).unwrap_err();
    assert!(e.to_string().contains("not the image overlay"), "{e}");
    assert!(!dir.join("x").exists());
    let _ = std::fs::remove_dir_all(&dir);
}

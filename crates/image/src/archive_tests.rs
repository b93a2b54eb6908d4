use super::*;
use crate::blobs::tests::temp_dir;
use crate::manifest::tests::sample;
use crate::{BlobRef, Role};

/// A manifest for two blobs and their bytes.
fn image(kernel: &[u8], initrd: &[u8]) -> (Manifest, Vec<u8>) {
    let mut m = sample();
    m.blobs = vec![
        BlobRef {
            role: Role::Kernel,
            sha256: Digest::of(kernel),
            size: kernel.len() as u64,
        },
        BlobRef {
            role: Role::Initrd,
            sha256: Digest::of(initrd),
            size: initrd.len() as u64,
        },
    ];
    let bytes = m.to_bytes();
    (m, bytes)
}

fn archive(m: &Manifest, mb: &[u8], blobs: &[&[u8]], sig: Option<&sign::Signature>) -> Vec<u8> {
    let blobs: Vec<Vec<u8>> = blobs.iter().map(|b| b.to_vec()).collect();
    let mut out = Vec::new();
    write(&mut out, mb, m, sig, &mut |d| {
        let b = blobs.iter().find(|b| Digest::of(b) == *d).unwrap().clone();
        Ok(Box::new(io::Cursor::new(b)))
    })
    .unwrap();
    out
}

/// A raw ustar entry, for archives our writer would never make.
fn entry(name: &str, kind: u8, data: &[u8]) -> Vec<u8> {
    let mut h = header(name, data.len() as u64).unwrap();
    h[156] = kind;
    h[148..156].copy_from_slice(b"        ");
    let sum: u32 = h.iter().map(|&b| u32::from(b)).sum();
    h[148..155].copy_from_slice(format!("{sum:06o}\0").as_bytes());
    let mut v = h.to_vec();
    v.extend_from_slice(data);
    v.resize(v.len().div_ceil(BLOCK) * BLOCK, 0);
    v
}

fn import_bytes(store: &BlobStore, bytes: &[u8]) -> Result<Imported, ArchiveError> {
    import(&mut &bytes[..], store, 1 << 20, &mut |_| ())
}

#[test]
fn round_trip_and_dedupe() {
    let dir = temp_dir("archive");
    let store = BlobStore::open(&dir).unwrap();
    let (m, mb) = image(&[1u8; 1000], &[2u8; 513]);
    let key = sign::SecretKey::generate().unwrap();
    let sig = key.sign(&mb);
    let a = archive(&m, &mb, &[&[1u8; 1000], &[2u8; 513]], Some(&sig));
    let i = import_bytes(&store, &a).unwrap();
    assert_eq!(i.manifest, m);
    assert_eq!(i.manifest_bytes, mb);
    assert_eq!(i.signature.as_ref(), Some(&sig));
    assert_eq!((i.stored.len(), i.deduplicated.len()), (2, 0));
    let again = import_bytes(&store, &a).unwrap();
    assert_eq!((again.stored.len(), again.deduplicated.len()), (0, 2));
    assert_eq!(store.list().unwrap().len(), 2);
    // Export of the stored blobs gives the same bytes.
    let mut out = Vec::new();
    write(&mut out, &mb, &m, Some(&sig), &mut |d| {
        Ok(Box::new(std::fs::File::open(store.path(d))?))
    })
    .unwrap();
    assert_eq!(out, a);
    // The lazy stream is the same archive, and knows its length.
    let parts: Vec<(Digest, u64, Box<dyn Read + Send>)> = vec![
        (
            Digest::of(&[1u8; 1000]),
            1000,
            Box::new(io::Cursor::new(vec![1u8; 1000])),
        ),
        (
            Digest::of(&[2u8; 513]),
            513,
            Box::new(io::Cursor::new(vec![2u8; 513])),
        ),
    ];
    let (len, mut r) = stream(&mb, Some(&sig), parts).unwrap();
    let mut streamed = Vec::new();
    r.read_to_end(&mut streamed).unwrap();
    assert_eq!((len, &streamed), (a.len() as u64, &a));
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn bad_archives_are_refused_and_store_nothing() {
    let dir = temp_dir("archive-bad");
    let store = BlobStore::open(&dir).unwrap();
    let (k, i) = (vec![1u8; 700], vec![2u8; 300]);
    let (m, mb) = image(&k, &i);
    let good = archive(&m, &mb, &[&k, &i], None);
    let mf = entry("manifest.json", b'0', &mb);
    let kernel = entry(&format!("blobs/{}", Digest::of(&k)), b'0', &k);
    let initrd = entry(&format!("blobs/{}", Digest::of(&i)), b'0', &i);
    let cat = |parts: &[&[u8]]| parts.concat();
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (cat(&[&entry("../manifest.json", b'0', &mb)]), "'..'"),
        (cat(&[&entry("/manifest.json", b'0', &mb)]), "absolute"),
        (cat(&[&mf, &entry("blobs/x", b'2', b"")]), "symbolic link"),
        (cat(&[&mf, &entry("blobs/x", b'1', b"")]), "hard link"),
        (cat(&[&mf, &entry("dev", b'3', b"")]), "device"),
        (cat(&[&mf, &entry("pax", b'x', b"")]), "pax"),
        (
            cat(&[&entry("blobs/a", b'0', b"")]),
            "must start with manifest.json",
        ),
        (cat(&[&mf, &kernel]), "missing"),
        (
            cat(&[&mf, &kernel, &initrd, &entry("extra", b'0', b"x")]),
            "unexpected entry",
        ),
        (cat(&[&mf, &kernel, &kernel]), "appears twice"),
        (
            cat(&[
                &mf,
                &kernel,
                &entry(&format!("blobs/{}", Digest::of(&i)), b'0', &k),
            ]),
            "manifest declares 300",
        ),
        (
            cat(&[
                &mf,
                &kernel,
                &entry(&format!("blobs/{}", Digest::of(&i)), b'0', &[3u8; 300]),
            ]),
            "corrupted",
        ),
        (good[..good.len() - 1500].to_vec(), "ended"),
        (
            cat(&[&entry("manifest.json", b'0', b"{}")]),
            "invalid image manifest",
        ),
    ];
    for (bytes, want) in cases {
        let e = import_bytes(&store, &bytes).unwrap_err().to_string();
        assert!(e.contains(want), "wanted {want:?} in {e:?}");
        assert!(store.list().unwrap().is_empty(), "{want}: a blob was left");
        assert_eq!(std::fs::read_dir(dir.join("tmp")).unwrap().count(), 0);
    }
    // A damaged header checksum.
    let mut bad = good.clone();
    bad[0] ^= 1;
    let e = import_bytes(&store, &bad).unwrap_err().to_string();
    assert!(e.contains("checksum"), "{e}");
    // Absurd sizes: beyond the configured maximum, declared in the manifest.
    let e = import(&mut &good[..], &store, 500, &mut |_| ())
        .unwrap_err()
        .to_string();
    assert!(e.contains("more than the 500 allowed"), "{e}");
    assert!(store.list().unwrap().is_empty());
    import_bytes(&store, &good).unwrap();
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn base256_sizes() {
    let h = header("blobs/big", 1 << 36).unwrap();
    assert_eq!(size_field(&h[124..136]), Some(1 << 36));
    assert_eq!(size_field(b"00000001000\0"), Some(512));
}

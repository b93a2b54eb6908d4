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
            source: None,
        },
        BlobRef {
            role: Role::Initrd,
            sha256: Digest::of(initrd),
            size: initrd.len() as u64,
            source: None,
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

/// A manifest whose disk is converted from qcow2: kernel, then the disk with its source.
fn with_qcow2_disk(k: &[u8], raw: &[u8], q: &[u8]) -> (Manifest, Vec<u8>) {
    let mut m = sample();
    m.blobs = vec![
        BlobRef {
            role: Role::Kernel,
            sha256: Digest::of(k),
            size: k.len() as u64,
            source: None,
        },
        BlobRef {
            role: Role::Disk,
            sha256: Digest::of(raw),
            size: raw.len() as u64,
            source: Some(crate::Source {
                format: crate::DiskFormat::Qcow2,
                sha256: Digest::of(q),
                size: q.len() as u64,
            }),
        },
    ];
    m.schema_version = Manifest::schema_for(&m.blobs);
    let mb = m.to_bytes();
    (m, mb)
}

#[test]
fn a_qcow2_disk_is_converted_stored_raw_and_exported_raw() {
    let dir = temp_dir("archive-qcow2");
    let store = BlobStore::open(&dir.join("store")).unwrap();
    // 256 KiB: data, a zero hole, data; made into qcow2 by qemu-img.
    let mut raw = vec![0u8; 256 << 10];
    raw[..64 << 10].fill(0x11);
    raw[192 << 10..].fill(0x22);
    let (rp, qp) = (dir.join("d.raw"), dir.join("d.qcow2"));
    std::fs::write(&rp, &raw).unwrap();
    let st = std::process::Command::new("qemu-img")
        .args(["convert", "-O", "qcow2", "-o", "cluster_size=4096"])
        .args([&rp, &qp])
        .status()
        .expect("qemu-img (qemu-utils) is needed");
    assert!(st.success());
    let q = std::fs::read(&qp).unwrap();
    let k = vec![9u8; 100];
    let (m, mb) = with_qcow2_disk(&k, &raw, &q);
    let import = |bytes: &[u8]| import(&mut &bytes[..], &store, 1 << 30, &mut |_| ());
    let tmp_empty = || std::fs::read_dir(dir.join("store/tmp")).unwrap().count() == 0;

    // The qcow2 travels as its source entry and is stored raw; nothing else is left.
    let sent = [
        entry("manifest.json", b'0', &mb),
        entry(&format!("blobs/{}", Digest::of(&k)), b'0', &k),
        entry(&format!("blobs/{}", Digest::of(&q)), b'0', &q),
    ]
    .concat();
    let i = import(&sent).unwrap();
    assert_eq!((i.manifest, i.stored.len()), (m.clone(), 2));
    assert_eq!(std::fs::read(store.path(&Digest::of(&raw))).unwrap(), raw);
    assert!(!store.contains(&Digest::of(&q)) && tmp_empty());

    // Export writes the raw blob; that archive imports again (deduplicated).
    let mut out = Vec::new();
    write(&mut out, &mb, &m, None, &mut |d| {
        Ok(Box::new(std::fs::File::open(store.path(d))?))
    })
    .unwrap();
    let again = import(&out).unwrap();
    assert_eq!((again.stored.len(), again.deduplicated.len()), (0, 2));
    // Sent as qcow2 again: deduplicated too.
    assert_eq!(import(&sent).unwrap().deduplicated.len(), 2);

    // A manifest whose raw digest is not what the qcow2 converts to: refused, nothing kept.
    let empty = BlobStore::open(&dir.join("other")).unwrap();
    let mut wrong = raw.clone();
    wrong[0] ^= 1;
    let (_, wmb) = with_qcow2_disk(&k, &wrong, &q);
    let bad = [
        entry("manifest.json", b'0', &wmb),
        entry(&format!("blobs/{}", Digest::of(&q)), b'0', &q),
    ]
    .concat();
    let e = super::import(&mut &bad[..], &empty, 1 << 30, &mut |_| ())
        .unwrap_err()
        .to_string();
    assert!(e.contains("converts to") && e.contains("qcow2"), "{e}");
    assert!(empty.list().unwrap().is_empty());
    assert_eq!(std::fs::read_dir(dir.join("other/tmp")).unwrap().count(), 0);
    // A damaged qcow2: refused naming the problem, nothing kept.
    let mut broken = q.clone();
    broken[20..24].copy_from_slice(&40u32.to_be_bytes());
    let (_, bmb) = with_qcow2_disk(&k, &raw, &broken);
    let bad = [
        entry("manifest.json", b'0', &bmb),
        entry(&format!("blobs/{}", Digest::of(&broken)), b'0', &broken),
    ]
    .concat();
    let e = super::import(&mut &bad[..], &empty, 1 << 30, &mut |_| ())
        .unwrap_err()
        .to_string();
    assert!(e.contains("cluster_bits 40"), "{e}");
    assert!(empty.list().unwrap().is_empty());
    assert_eq!(std::fs::read_dir(dir.join("other/tmp")).unwrap().count(), 0);
    std::fs::remove_dir_all(dir).unwrap();
}

//! The reader against images qemu-img and qemu-io make (the raw it writes must equal
//! `qemu-img convert -O raw`'s, byte for byte), its refusals, and hostile inputs: mutated
//! and truncated images and random bytes each end in an error or a whole disk, never a
//! panic, and a sample of the mutants we accept are read the same by qemu-img.

use super::*;
use crate::Digest;
use crate::blobs::tests::temp_dir;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Runs a qemu tool; panics with its output if it fails (qemu-utils: see scripts/setup.sh).
fn qemu(tool: &str, args: &[&str]) {
    let out = Command::new(tool)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {tool} ({e}): install qemu-utils"));
    assert!(
        out.status.success(),
        "{tool} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A small deterministic generator (xorshift64*): the tests need no crate for randomness.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// 8 MiB + 1.5 KiB (the last cluster is partial): random blocks, zero blocks (every
/// seventh, and all of 2 to 3 MiB), and a constant run.
fn raw_disk(dir: &Path) -> PathBuf {
    let size = (8 << 20) + 1536;
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut b = vec![0u8; size];
    for (i, blk) in b.chunks_mut(4096).enumerate() {
        let zero = i % 7 == 3 || (512..768).contains(&i);
        if !zero {
            for x in blk.iter_mut() {
                *x = rng.next() as u8;
            }
        }
    }
    b[5 << 20..(5 << 20) + 100_000].fill(0xee);
    let p = dir.join("disk.raw");
    std::fs::write(&p, b).unwrap();
    p
}

/// Converts `q` with our reader into `dir/ours.raw` and with qemu-img into `dir/ref.raw`,
/// and checks they are the same bytes and that the digest is theirs.
fn same_as_qemu(dir: &Path, q: &Path) -> u64 {
    let (ours, theirs) = (dir.join("ours.raw"), dir.join("ref.raw"));
    let _ = std::fs::remove_file(&ours);
    qemu(
        "qemu-img",
        &["convert", "-f", "qcow2", "-O", "raw", s(q), s(&theirs)],
    );
    let src = File::open(q).unwrap();
    let dst = std::fs::OpenOptions::new()
        .create_new(true)
        .write(true)
        .open(&ours)
        .unwrap();
    let (d, n) = convert(&src, Some(&dst), DEFAULT_MAX_VIRTUAL_SIZE).unwrap();
    let (a, b) = (
        std::fs::read(&ours).unwrap(),
        std::fs::read(&theirs).unwrap(),
    );
    assert!(a == b, "{}: our raw differs from qemu-img's", q.display());
    assert_eq!((d, n), (Digest::of(&b), b.len() as u64));
    // The hash-only pass (what the CLI runs) agrees.
    assert_eq!(
        convert(&src, None, DEFAULT_MAX_VIRTUAL_SIZE).unwrap().0,
        Digest::of(&b)
    );
    std::os::unix::fs::MetadataExt::blocks(&std::fs::metadata(&ours).unwrap()) * 512
}

#[test]
fn converts_like_qemu_img_v2_v3_clusters_zeros_holes_compressed() {
    let dir = temp_dir("qcow2");
    let raw = raw_disk(&dir);
    let q = dir.join("d.qcow2");
    for compat in ["0.10", "1.1"] {
        for cluster in ["512", "4096", "65536"] {
            for compress in [false, true] {
                let _ = std::fs::remove_file(&q);
                let opts = format!("compat={compat},cluster_size={cluster}");
                let mut args = vec!["convert", "-f", "raw", "-O", "qcow2", "-o", &opts];
                if compress {
                    args.push("-c");
                }
                args.extend([s(&raw), s(&q)]);
                qemu("qemu-img", &args);
                let h = Image::open(&File::open(&q).unwrap(), u64::MAX)
                    .unwrap()
                    .header()
                    .clone();
                assert_eq!(h.version, if compat == "1.1" { 3 } else { 2 });
                assert_eq!(h.cluster_size().to_string(), cluster);
                // Zero clusters (v3: the zero flag, some over allocated clusters whose stale
                // bytes must not show), a rewrite, and data past a long unwritten gap.
                qemu(
                    "qemu-io",
                    &[
                        "-f",
                        "qcow2",
                        "-c",
                        "write -z 4M 256k",
                        "-c",
                        "write -P 0x5a 6M 64k",
                        "-c",
                        "write -z 1M 4k",
                        s(&q),
                    ],
                );
                same_as_qemu(&dir, &q);
            }
        }
    }
    // Mostly unallocated: whole L2 tables absent (L1 entries 0), and the raw is sparse.
    for cluster in ["4096", "65536"] {
        let _ = std::fs::remove_file(&q);
        let opts = format!("cluster_size={cluster}");
        qemu(
            "qemu-img",
            &["create", "-f", "qcow2", "-o", &opts, s(&q), "64M"],
        );
        qemu(
            "qemu-io",
            &[
                "-f",
                "qcow2",
                "-c",
                "write -P 7 40M 8k",
                "-c",
                "write -P 9 63M 1M",
                s(&q),
            ],
        );
        let used = same_as_qemu(&dir, &q);
        assert!(
            used < 4 << 20,
            "a 64 MiB disk with 1 MiB of data takes {used} bytes"
        );
    }
    std::fs::remove_dir_all(dir).unwrap();
}

/// The error converting `q` (hash only).
fn error(q: &Path) -> String {
    let f = File::open(q).unwrap();
    convert(&f, None, DEFAULT_MAX_VIRTUAL_SIZE)
        .unwrap_err()
        .to_string()
}

fn patch(p: &Path, at: u64, bytes: &[u8]) {
    let f = std::fs::OpenOptions::new().write(true).open(p).unwrap();
    f.write_all_at(bytes, at).unwrap();
}

#[test]
fn refusals_name_the_problem_and_the_fix() {
    let dir = temp_dir("qcow2-refuse");
    let p = |n: &str| dir.join(n);
    let base = p("base.qcow2");
    qemu("qemu-img", &["create", "-f", "qcow2", s(&base), "1M"]);
    let over = p("over.qcow2");
    qemu(
        "qemu-img",
        &[
            "create",
            "-f",
            "qcow2",
            "-b",
            s(&base),
            "-F",
            "qcow2",
            s(&over),
        ],
    );
    let e = error(&over);
    assert!(
        e.contains("backing file") && e.contains("base.qcow2") && e.contains("self-contained"),
        "{e}"
    );

    let enc = p("enc.qcow2");
    qemu(
        "qemu-img",
        &[
            "create",
            "-f",
            "qcow2",
            "--object",
            "secret,id=sec0,data=abc123",
            "-o",
            "encrypt.format=luks,encrypt.key-secret=sec0",
            s(&enc),
            "1M",
        ],
    );
    assert!(error(&enc).contains("encrypted"), "{}", error(&enc));

    let ext = p("ext.qcow2");
    let data = p("ext.data");
    let opt = format!("data_file={}", s(&data));
    qemu(
        "qemu-img",
        &["create", "-f", "qcow2", "-o", &opt, s(&ext), "1M"],
    );
    assert!(
        error(&ext).contains("external data file"),
        "{}",
        error(&ext)
    );

    let sub = p("sub.qcow2");
    qemu(
        "qemu-img",
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            "extended_l2=on",
            s(&sub),
            "1M",
        ],
    );
    assert!(error(&sub).contains("subclusters"), "{}", error(&sub));

    // zstd-compressed clusters: refused when met, naming the fix.
    let raw = raw_disk(&dir);
    let z = p("z.qcow2");
    qemu(
        "qemu-img",
        &[
            "convert",
            "-c",
            "-O",
            "qcow2",
            "-o",
            "compression_type=zstd",
            s(&raw),
            s(&z),
        ],
    );
    let e = error(&z);
    assert!(e.contains("zstd") && e.contains("without -c"), "{e}");

    // A good image, then damaged in each way.
    let good = p("good.qcow2");
    qemu(
        "qemu-img",
        &[
            "convert",
            "-O",
            "qcow2",
            "-o",
            "cluster_size=4096",
            s(&raw),
            s(&good),
        ],
    );
    let f = File::open(&good).unwrap();
    let img = Image::open(&f, u64::MAX).unwrap();
    let h = img.header().clone();
    let mut l1 = [0u8; 8];
    f.read_exact_at(&mut l1, h.l1_offset).unwrap();
    let l2 = u64::from_be_bytes(l1) & OFFSET_MASK;
    let mut first = [0u8; 8];
    f.read_exact_at(&mut first, l2).unwrap();
    let len = f.metadata().unwrap().len();
    let copy = |n: &str| {
        let q = p(n);
        std::fs::copy(&good, &q).unwrap();
        q
    };

    // Truncated inside an L2 table.
    let t = copy("trunc-l2.qcow2");
    std::fs::OpenOptions::new()
        .write(true)
        .open(&t)
        .unwrap()
        .set_len(l2 + 100)
        .unwrap();
    let e = error(&t);
    assert!(e.contains("L2 table") && e.contains("truncated"), "{e}");

    // Truncated: data clusters gone.
    let t = copy("trunc-data.qcow2");
    std::fs::OpenOptions::new()
        .write(true)
        .open(&t)
        .unwrap()
        .set_len(len - 3 * 4096)
        .unwrap();
    assert!(error(&t).contains("beyond the end"), "{}", error(&t));

    // An L2 entry pointing past the end of the file.
    let t = copy("beyond.qcow2");
    let far = (1u64 << 63) | ((len + (1 << 30)) & OFFSET_MASK);
    patch(&t, l2, &far.to_be_bytes());
    let e = error(&t);
    assert!(
        e.contains("beyond the end") && e.contains("guest offset 0"),
        "{e}"
    );

    // Misaligned L2 entry, reserved bits, L1 beyond the file, corrupt and unknown bits,
    // an absurd virtual size and cluster size, a zero flag in version 2.
    let t = copy("misaligned.qcow2");
    patch(&t, l2, &(u64::from_be_bytes(first) + 512).to_be_bytes());
    assert!(
        error(&t).contains("not a cluster boundary"),
        "{}",
        error(&t)
    );
    let t = copy("reserved.qcow2");
    patch(&t, l2, &(u64::from_be_bytes(first) | 2).to_be_bytes());
    assert!(error(&t).contains("reserved bits"), "{}", error(&t));
    let t = copy("l1.qcow2");
    patch(&t, 40, &(len + 4096 * 10).to_be_bytes());
    assert!(error(&t).contains("L1 table"), "{}", error(&t));
    let t = copy("corrupt.qcow2");
    patch(&t, 72 + 7, &[2]);
    assert!(error(&t).contains("qemu-img check -r all"), "{}", error(&t));
    let t = copy("unknown.qcow2");
    patch(&t, 72, &[0x80]);
    assert!(error(&t).contains("0x8000000000000000"), "{}", error(&t));
    let t = copy("huge.qcow2");
    patch(&t, 24, &(3u64 << 40).to_be_bytes());
    assert!(error(&t).contains("above the"), "{}", error(&t));
    let t = copy("odd.qcow2");
    patch(&t, 24, &((1u64 << 20) + 1).to_be_bytes());
    assert!(error(&t).contains("multiple of 512"), "{}", error(&t));
    let t = copy("ext.qcow2");
    let mut hl = [0u8; 4];
    f.read_exact_at(&mut hl, 100).unwrap();
    patch(
        &t,
        u64::from(u32::from_be_bytes(hl)) + 4,
        &u32::MAX.to_be_bytes(),
    );
    assert!(error(&t).contains("header extension"), "{}", error(&t));
    let t = copy("cluster.qcow2");
    patch(&t, 20, &30u32.to_be_bytes());
    assert!(error(&t).contains("cluster_bits 30"), "{}", error(&t));
    let t = copy("v4.qcow2");
    patch(&t, 4, &4u32.to_be_bytes());
    assert!(error(&t).contains("version 4"), "{}", error(&t));
    let t = copy("v2zero.qcow2");
    patch(&t, 4, &2u32.to_be_bytes());
    patch(&t, l2, &1u64.to_be_bytes());
    assert!(error(&t).contains("version 2"), "{}", error(&t));
    // Bad compressed data.
    let t = copy("badz.qcow2");
    let bogus = (1u64 << 62) | (u64::from_be_bytes(first) & OFFSET_MASK);
    patch(&t, l2, &bogus.to_be_bytes());
    assert!(error(&t).contains("inflate"), "{}", error(&t));
    // Not qcow2 at all.
    assert!(error(&raw).contains("magic"), "{}", error(&raw));
    assert!(!is_qcow2(&File::open(&raw).unwrap()).unwrap());
    assert!(is_qcow2(&f).unwrap());
    std::fs::remove_dir_all(dir).unwrap();
}

/// Converts `bytes` as a file, hash only, under a small cap; must not panic.
fn survive(path: &Path, bytes: &[u8]) -> Result<(Digest, u64), Qcow2Error> {
    std::fs::write(path, bytes).unwrap();
    convert(&File::open(path).unwrap(), None, 16 << 20)
}

#[test]
fn mutated_truncated_and_random_images_never_panic() {
    let dir = temp_dir("qcow2-fuzz");
    let seeds: Vec<(Vec<u8>, Digest)> = [
        ("512", "1.1", false),
        ("4096", "1.1", true),
        ("4096", "0.10", false),
        ("65536", "1.1", false),
    ]
    .iter()
    .map(|(cluster, compat, compress)| {
        let raw = dir.join("small.raw");
        let mut b = vec![0u8; 300 << 10];
        let mut rng = Rng(7);
        for (i, x) in b.iter_mut().enumerate() {
            if !(100 << 10..200 << 10).contains(&i) {
                *x = (rng.next() % 4) as u8;
            }
        }
        std::fs::write(&raw, &b).unwrap();
        let q = dir.join("small.qcow2");
        let _ = std::fs::remove_file(&q);
        let opts = format!("compat={compat},cluster_size={cluster}");
        let mut args = vec!["convert", "-O", "qcow2", "-o", &opts];
        if *compress {
            args.push("-c");
        }
        args.extend([s(&raw), s(&q)]);
        qemu("qemu-img", &args);
        (std::fs::read(&q).unwrap(), Digest::of(&b))
    })
    .collect();
    let path = dir.join("m.qcow2");
    let mut rng = Rng(0x5eed);
    let (mut ok, mut err, mut compared) = (0, 0, 0);
    for i in 0..4000 {
        let (seed, want) = &seeds[i % seeds.len()];
        let mut b = seed.clone();
        // Mutations aimed where the metadata is: the header, then the tables.
        let hot = (b.len() as u64).min(3 * 65536);
        match rng.below(5) {
            0 => {
                for _ in 0..1 + rng.below(4) {
                    let at = rng.below(hot) as usize;
                    b[at] ^= 1 << rng.below(8);
                }
            }
            1 => {
                let at = rng.below(hot.saturating_sub(8)) as usize;
                b[at..at + 8].copy_from_slice(&rng.next().to_be_bytes());
            }
            2 => {
                // A header field set to an extreme.
                let at = [4, 8, 20, 24, 32, 36, 40, 72, 96, 100][rng.below(10) as usize];
                let v = [0u64, 1, u64::MAX, 1 << 63, 0x7fff_ffff][rng.below(5) as usize];
                b[at..at + 8].copy_from_slice(&v.to_be_bytes());
            }
            3 => b.truncate(rng.below(b.len() as u64) as usize),
            _ => {
                let n = rng.below(200_000) as usize;
                b = (0..n).map(|_| rng.next() as u8).collect();
                if n > 8 && rng.below(2) == 0 {
                    b[..4].copy_from_slice(&MAGIC);
                    b[4..8].copy_from_slice(&(2 + rng.below(2) as u32).to_be_bytes());
                }
            }
        }
        let r = std::panic::catch_unwind(|| survive(&path, &b))
            .unwrap_or_else(|_| panic!("iteration {i} panicked"));
        match r {
            // A whole disk of the declared size; unchanged metadata gives the seed's disk.
            Ok((d, n)) => {
                ok += 1;
                if b == *seed {
                    assert_eq!(&d, want);
                }
                assert!(n <= 16 << 20);
                // Differential: what we accept, qemu-img accepts and reads the same (a
                // bounded sample, qemu-img costs ~30 ms a run).
                if ok % 3 == 0 && compared < 300 {
                    compared += 1;
                    let r = dir.join("diff.raw");
                    let _ = std::fs::remove_file(&r);
                    let o = Command::new("qemu-img")
                        .args(["convert", "-f", "qcow2", "-O", "raw", s(&path), s(&r)])
                        .output()
                        .unwrap();
                    assert!(
                        o.status.success(),
                        "iteration {i}: we convert what qemu-img refuses: {}",
                        String::from_utf8_lossy(&o.stderr)
                    );
                    assert_eq!(
                        Digest::of(&std::fs::read(&r).unwrap()),
                        d,
                        "iteration {i}: our raw differs from qemu-img's"
                    );
                }
            }
            Err(e) => {
                err += 1;
                assert!(!e.to_string().is_empty());
            }
        }
    }
    // Untouched seeds still convert to their disk.
    for (seed, want) in &seeds {
        assert_eq!(survive(&path, seed).unwrap().0, *want);
    }
    assert!(ok > 100 && err > 100, "{ok} converted, {err} refused");
    assert!(compared > 100, "only {compared} compared with qemu-img");
    std::fs::remove_dir_all(dir).unwrap();
}

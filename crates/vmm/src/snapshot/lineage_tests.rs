use super::*;
use crate::snapshot::MEMORY_FILE;
use crate::snapshot::format::StateWriter;
use std::os::unix::fs::FileExt;

pub(in crate::snapshot) const MEM: u64 = 2 << 20;

/// A scratch directory for one test.
pub(in crate::snapshot) fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("vme-lineage-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Writes a snapshot into `dir`: ID `id`, a diff of `parent` holding `runs` when given,
/// its memory file with page `p` filled with byte `b` for each `(p, b)` of `pages`.
pub(in crate::snapshot) fn write_snap(
    dir: &Path,
    id: &str,
    parent: Option<(&Path, &str)>,
    runs: &[(u64, u64)],
    pages: &[(u64, u8)],
) {
    std::fs::create_dir_all(dir).unwrap();
    let mut w = StateWriter::new("riscv64", "rv64test", MEM);
    w.add("config", &"vcpus = 1".to_string()).unwrap();
    let lineage = Lineage {
        id: id.into(),
        parent: parent.map(|(d, id)| ParentRef {
            dir: d.display().to_string(),
            id: id.into(),
        }),
    };
    w.add(LINEAGE, &lineage).unwrap();
    if parent.is_some() {
        w.add(DIFF_PAGES, &runs.to_vec()).unwrap();
        w.diff_format();
    }
    std::fs::write(dir.join(STATE_FILE), w.encode().unwrap()).unwrap();
    let f = std::fs::File::create(dir.join(MEMORY_FILE)).unwrap();
    f.set_len(MEM).unwrap();
    for &(p, b) in pages {
        f.write_all_at(&[b; PAGE as usize], p * PAGE).unwrap();
    }
}

fn chain_of(dir: &Path) -> Result<Chain, String> {
    let f = StateFile::read(&dir.join(STATE_FILE)).map_err(|e| e.to_string())?;
    read_chain(dir, &f)
}

#[test]
fn a_chain_is_followed_to_its_full_snapshot() {
    let d = scratch("follow");
    let (a, b, c) = (d.join("a"), d.join("b"), d.join("c"));
    write_snap(&a, "aa", None, &[], &[(0, 1)]);
    write_snap(&b, "bb", Some((&a, "aa")), &[(1, 2)], &[(1, 2)]);
    // A relative parent is taken from the diff's directory.
    write_snap(&c, "cc", Some((Path::new("../b"), "bb")), &[(5, 1)], &[]);
    let chain = chain_of(&c).unwrap();
    assert_eq!(chain.base, a);
    assert_eq!(
        chain.diffs,
        [
            Layer {
                dir: b.clone(),
                runs: vec![(1, 2)]
            },
            Layer {
                dir: c.clone(),
                runs: vec![(5, 1)]
            }
        ]
    );
    let ids: Vec<_> = chain.history.chain.iter().map(|m| m.id.as_str()).collect();
    assert_eq!(ids, ["aa", "bb", "cc"]);
    // The restored VM's next diff has c as parent, and may not be written into the chain.
    let h = chain.history;
    assert_eq!(h.diff_parent(&d.join("d")).unwrap().id, "cc");
    let err = h.diff_parent(&b).unwrap_err();
    assert!(err.contains("holds snapshot bb"), "{err}");
    // A full snapshot is its own chain.
    let full = chain_of(&a).unwrap();
    assert!(full.diffs.is_empty());
    assert_eq!(full.history.chain.len(), 1);
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn a_missing_or_replaced_parent_is_refused_by_name() {
    let d = scratch("parents");
    let (a, b) = (d.join("a"), d.join("b"));
    write_snap(&a, "aa", None, &[], &[]);
    write_snap(&b, "bb", Some((&a, "aa")), &[(1, 1)], &[]);
    write_snap(&a, "a2", None, &[], &[]);
    let err = chain_of(&b).unwrap_err();
    assert!(
        err.contains("taken on top of snapshot aa")
            && err.contains(&a.display().to_string())
            && err.contains("now holds snapshot a2"),
        "{err}"
    );
    std::fs::remove_dir_all(&a).unwrap();
    let err = chain_of(&b).unwrap_err();
    assert!(
        err.contains("needs its parent snapshot aa") && err.contains("put the parent back"),
        "{err}"
    );
    // A parent of another machine.
    let mut w = StateWriter::new("riscv64", "rv64test", MEM * 2);
    w.add(
        LINEAGE,
        &Lineage {
            id: "aa".into(),
            parent: None,
        },
    )
    .unwrap();
    std::fs::create_dir_all(&a).unwrap();
    std::fs::write(a.join(STATE_FILE), w.encode().unwrap()).unwrap();
    let err = chain_of(&b).unwrap_err();
    assert!(err.contains("cannot be one chain"), "{err}");
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn hostile_chains_are_refused() {
    let d = scratch("hostile");
    let (a, b) = (d.join("a"), d.join("b"));
    write_snap(&a, "aa", None, &[], &[]);
    for (runs, why) in [
        (&[(0, 0)][..], "is empty"),
        (&[(2, 1), (1, 1)], "out of order"),
        (&[(1, 2), (2, 1)], "overlaps"),
        (&[(511, 2)], "outside the 512 pages"),
        (&[(u64::MAX, 2)], "outside"),
    ] {
        write_snap(&b, "bb", Some((&a, "aa")), runs, &[]);
        let err = chain_of(&b).unwrap_err();
        assert!(
            err.contains("section diff_pages") && err.contains(why),
            "{runs:?}: {err}"
        );
    }
    let many: Vec<(u64, u64)> = (0..MAX_RUNS as u64 + 1).map(|i| (i * 2, 1)).collect();
    let mut w = StateWriter::new("riscv64", "rv64test", 64 << 20);
    w.add(DIFF_PAGES, &many).unwrap();
    let f = StateFile::decode(Path::new("/x/state"), &w.encode().unwrap()).unwrap();
    assert!(
        check_runs(&f, &many)
            .unwrap_err()
            .contains("more than 2048")
    );
    // A diff that is its own parent, and two that point at each other.
    write_snap(&b, "bb", Some((&b, "bb")), &[(1, 1)], &[]);
    assert!(chain_of(&b).unwrap_err().contains("loops back"));
    write_snap(&a, "aa", Some((&b, "bb")), &[(1, 1)], &[]);
    write_snap(&b, "bb", Some((&a, "aa")), &[(1, 1)], &[]);
    assert!(chain_of(&b).unwrap_err().contains("loops back"));
    // A chain deeper than any vme-vmm writes.
    write_snap(&d.join("s0"), "id0", None, &[], &[]);
    for i in 1..=MAX_DEPTH + 1 {
        let parent = d.join(format!("s{}", i - 1));
        let pid = format!("id{}", i - 1);
        write_snap(
            &d.join(format!("s{i}")),
            &format!("id{i}"),
            Some((&parent, &pid)),
            &[(1, 1)],
            &[],
        );
    }
    chain_of(&d.join(format!("s{MAX_DEPTH}"))).unwrap();
    let err = chain_of(&d.join(format!("s{}", MAX_DEPTH + 1))).unwrap_err();
    assert!(err.contains("more than 16 diffs"), "{err}");
    // A diff's sections in a version 1 file, a version 2 file without them.
    let mut w = StateWriter::new("riscv64", "rv64test", MEM);
    w.add(
        LINEAGE,
        &Lineage {
            id: "x".into(),
            parent: Some(ParentRef {
                dir: "/a".into(),
                id: "aa".into(),
            }),
        },
    )
    .unwrap();
    std::fs::write(b.join(STATE_FILE), w.encode().unwrap()).unwrap();
    assert!(
        chain_of(&b)
            .unwrap_err()
            .contains("a full snapshot (format version 1) with diff")
    );
    let mut w = StateWriter::new("riscv64", "rv64test", MEM);
    w.diff_format();
    std::fs::write(b.join(STATE_FILE), w.encode().unwrap()).unwrap();
    assert!(chain_of(&b).unwrap_err().contains("no section \"lineage\""));
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn history_says_why_there_is_no_parent() {
    let d = scratch("history");
    let h = History::default();
    let err = h.diff_parent(&d.join("x")).unwrap_err();
    assert!(err.contains("take a full snapshot first"), "{err}");
    let mut h = History {
        chain: Vec::new(),
        unknown: Some("restored from an old one".into()),
    };
    assert_eq!(
        h.diff_parent(&d.join("x")).unwrap_err(),
        "restored from an old one"
    );
    write_snap(&d.join("full"), "f", None, &[], &[]);
    h.record(&d.join("full"), "f", false);
    for i in 0..MAX_DEPTH {
        let dir = d.join(format!("d{i}"));
        let parent = h.diff_parent(&dir).unwrap();
        write_snap(
            &dir,
            &format!("d{i}"),
            Some((&parent.dir, &parent.id)),
            &[],
            &[],
        );
        h.record(&dir, &format!("d{i}"), true);
    }
    let err = h.diff_parent(&d.join("next")).unwrap_err();
    assert!(err.contains("already has 16 diffs"), "{err}");
    write_snap(&d.join("full2"), "g", None, &[], &[]);
    h.record(&d.join("full2"), "g", false);
    assert_eq!(h.diff_parent(&d.join("next")).unwrap().id, "g");
    // A parent replaced or removed since: refused now rather than at restore.
    write_snap(&d.join("full2"), "other", None, &[], &[]);
    let err = h.diff_parent(&d.join("next")).unwrap_err();
    assert!(err.contains("now holds snapshot other"), "{err}");
    std::fs::remove_dir_all(d.join("full2")).unwrap();
    let err = h.diff_parent(&d.join("next")).unwrap_err();
    assert!(
        err.contains("is no longer there") && err.contains("full2"),
        "{err}"
    );
    assert_eq!(new_id().unwrap().len(), 32);
    assert_ne!(new_id().unwrap(), new_id().unwrap());
    let _ = std::fs::remove_dir_all(&d);
}

use super::*;
use crate::snapshot::lineage::tests::{MEM, scratch, write_snap};

#[test]
fn coalescing_fills_the_smallest_gaps_first() {
    let runs = vec![(0, 1), (2, 1), (10, 2), (13, 1), (100, 1)];
    assert_eq!(
        coalesce(runs.clone(), 5),
        runs,
        "under the limit: unchanged"
    );
    assert_eq!(
        coalesce(runs.clone(), 4),
        [(0, 3), (10, 4), (100, 1)],
        "gaps of 1 page, the smallest, are filled first (both: equal gaps go together)"
    );
    assert_eq!(coalesce(runs.clone(), 3), [(0, 3), (10, 4), (100, 1)]);
    assert_eq!(coalesce(runs.clone(), 2), [(0, 14), (100, 1)]);
    assert_eq!(coalesce(runs.clone(), 1), [(0, 101)]);
    assert!(coalesce(Vec::new(), 1).is_empty());
}

#[test]
fn listed_pages_land_at_their_offsets_and_zero_ones_stay_holes() {
    let d = scratch("pages");
    let path = d.join("memory");
    let ram: Vec<u8> = (0..MEM).map(|i| (i / PAGE) as u8 | 1).collect();
    let mut ram = ram;
    ram[4 * 4096..5 * 4096].fill(0);
    let runs = [(1, 1), (3, 3), (511, 1)];
    let stats = write_pages(&path, MEM, &runs, |off, buf| {
        buf.copy_from_slice(&ram[off as usize..off as usize + buf.len()]);
        Ok(())
    })
    .unwrap();
    assert_eq!(
        stats.data_bytes,
        4 * PAGE,
        "pages 1, 3, 5, 511; page 4 is zero"
    );
    let file = std::fs::read(&path).unwrap();
    assert_eq!(file.len() as u64, MEM);
    for p in 0..512usize {
        let want = if [1, 3, 5, 511].contains(&p) {
            p as u8 | 1
        } else {
            0
        };
        assert!(
            file[p * 4096..(p + 1) * 4096].iter().all(|&b| b == want),
            "page {p}"
        );
    }
    let err = write_pages(&path, MEM, &[(511, 2)], |_, _| Ok(())).unwrap_err();
    assert!(err.contains("outside RAM"), "{err}");
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn a_merged_chain_is_one_full_snapshot_with_the_newest_pages() {
    let d = scratch("merge");
    let (a, b, c, m) = (d.join("a"), d.join("b"), d.join("c"), d.join("m"));
    write_snap(&a, "aa", None, &[], &[(0, 1), (1, 1), (2, 1), (500, 1)]);
    // b rewrites page 1, zeroes page 2 (listed, a hole) and adds page 3.
    write_snap(&b, "bb", Some((&a, "aa")), &[(1, 3)], &[(1, 2), (3, 2)]);
    write_snap(
        &c,
        "cc",
        Some((&b, "bb")),
        &[(3, 1), (400, 1)],
        &[(3, 3), (400, 3)],
    );
    let info = merge(&c, &m).unwrap();
    assert_eq!(
        info.id.as_deref(),
        Some("cc"),
        "the same memory keeps its ID"
    );
    assert_eq!(info.memory_data_bytes, 5 * PAGE);
    let file = std::fs::read(m.join(MEMORY_FILE)).unwrap();
    let page = |p: usize| file[p * 4096];
    assert_eq!(
        [0, 1, 2, 3, 4, 400, 500].map(page),
        [1, 2, 0, 3, 0, 3, 1],
        "newest pages win"
    );
    let merged = StateFile::read(&m.join(STATE_FILE)).unwrap();
    assert_eq!(merged.version, 1);
    assert_eq!(merged.section::<String>("config").unwrap(), "vcpus = 1");
    assert!(merged.section::<Vec<(u64, u64)>>(DIFF_PAGES).is_err());
    let chain = lineage::read_chain(&m, &merged).unwrap();
    assert!(chain.diffs.is_empty());
    // It stands alone: the parents may go.
    std::fs::remove_dir_all(&a).unwrap();
    assert!(merge(&c, &d.join("m2")).is_err(), "c still needs a");
    merge(&m, &d.join("m3")).unwrap();
    // Not into a parent; in place is fine.
    write_snap(&a, "aa", None, &[], &[(0, 1)]);
    let err = merge(&c, &b).unwrap_err();
    assert!(err.contains("is a parent of"), "{err}");
    merge(&c, &c).unwrap();
    let flat = StateFile::read(&c.join(STATE_FILE)).unwrap();
    assert!(lineage::read_chain(&c, &flat).unwrap().diffs.is_empty());
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn a_merge_of_a_header_with_an_impossible_ram_size_is_refused() {
    let d = scratch("merge-size");
    for size in [0, 4097, 1 << 50] {
        let w = StateWriter::new("riscv64", "rv64test", size);
        std::fs::write(d.join(STATE_FILE), w.encode().unwrap()).unwrap();
        let err = merge(&d, &d.join("out")).unwrap_err();
        assert!(err.contains("which no VM can have"), "{size}: {err}");
    }
    let _ = std::fs::remove_dir_all(&d);
}

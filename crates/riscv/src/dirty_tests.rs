use super::*;
use crate::csr::{MSTATUS_FS, SATP_MODE_SV39};
use crate::hart::tests_support::hart;
use crate::hart::{Hart, PRV_S};
use crate::memory::{GuestRam, PAGE_SIZE, RAM_BASE};
use crate::shared::REQ_DROP_WRITES;
use crate::{ExitReason, Machine, MachineConfig};
use std::time::Instant;

fn page_of(pa: u64) -> u64 {
    (pa - RAM_BASE) / PAGE_SIZE
}

/// The pages marked since the last call, clearing them (what a harvest does to the bitmap,
/// without the TLB part, which the tests do by hand where it matters).
fn take(h: &Hart) -> Vec<u64> {
    let b = h.shared.ram.dirty.take().expect("the log is on");
    (0..b.ram_pages()).filter(|&p| b.contains(p)).collect()
}

/// Instructions tested, each alone on code page 1 + its index.
const CODE: [u32; 5] = [
    0x00b5_3023, // sd a1, 0(a0)
    0x00b5_362f, // amoadd.d a2, a1, (a0)
    0x1005_362f, // lr.d a2, (a0)
    0x18b5_36af, // sc.d a3, a1, (a0)
    0x0015_3027, // fsd f1, 0(a0)
];

/// Runs `CODE[i]` once (placed by the caller before the log was cleared).
fn exec_one(h: &mut Hart, i: usize) {
    let pc = RAM_BASE + (1 + i as u64) * PAGE_SIZE;
    h.pc = pc;
    h.execute_slice(1);
    assert_eq!(h.pc, pc + 4, "instruction {:#010x} trapped", CODE[i]);
}

const A0: usize = 10;
const A1: usize = 11;

#[test]
fn the_log_is_off_until_enabled_and_then_sees_every_writer() {
    let mut h = hart();
    // Off: nothing is kept, nothing to harvest.
    h.store(RAM_BASE + 0x70_0000, 8, 1).unwrap();
    assert!(!h.shared.ram.dirty.enabled());
    assert!(h.shared.ram.dirty.take().is_none());
    h.shared.ram.dirty.enable();
    h.csr.mstatus |= MSTATUS_FS;
    // Code goes in first; its own writes are not what is tested.
    for (i, &insn) in CODE.iter().enumerate() {
        let pc = RAM_BASE + (1 + i as u64) * PAGE_SIZE;
        assert!(h.shared.ram.write(pc, 4, u64::from(insn)));
    }
    take(&h);

    // A plain store: marked when the write TLB entry is filled.
    let data = RAM_BASE + 0x2_0000;
    h.x[A0] = data;
    h.x[A1] = 7;
    exec_one(&mut h, 0);
    assert_eq!(h.shared.ram.read(data, 8), Some(7));
    assert_eq!(take(&h), [page_of(data)], "sd");

    // AMO, LR/SC and an FPU store, each on its own page.
    let amo = RAM_BASE + 0x3_0000;
    h.x[A0] = amo;
    exec_one(&mut h, 1);
    assert_eq!(h.shared.ram.read(amo, 8), Some(7));
    assert_eq!(take(&h), [page_of(amo)], "amoadd.d");
    let sc = RAM_BASE + 0x4_0000;
    h.x[A0] = sc;
    exec_one(&mut h, 2);
    assert!(take(&h).is_empty(), "a load writes nothing");
    exec_one(&mut h, 3);
    assert_eq!(h.x[13], 0, "sc.d succeeded");
    assert_eq!(h.shared.ram.read(sc, 8), Some(7));
    assert_eq!(take(&h), [page_of(sc)], "sc.d");
    let fp = RAM_BASE + 0x5_0000;
    h.x[A0] = fp;
    h.f[1] = 0x4000_0000_0000_0000;
    exec_one(&mut h, 4);
    assert_eq!(h.shared.ram.read(fp, 8), Some(0x4000_0000_0000_0000));
    assert_eq!(take(&h), [page_of(fp)], "fsd");

    // Writers outside the harts: device DMA, the sized writes of the SBI console, and a
    // balloon discard, which is a write of zero pages.
    let ram = &h.shared.ram;
    ram.write_bytes(RAM_BASE + 0x6_0ff8, &[1; 16]).unwrap();
    assert!(ram.write(RAM_BASE + 0x8_0000, 1, 9));
    ram.discard(RAM_BASE + 0x9_0000, 2 * PAGE_SIZE).unwrap();
    let want: Vec<u64> = [0x6_0000, 0x6_1000, 0x8_0000, 0x9_0000, 0x9_1000]
        .map(|o| o / PAGE_SIZE)
        .into();
    assert_eq!(take(&h), want);
    // Refused writes mark nothing.
    let end = RAM_BASE + ram.size();
    assert!(ram.write_bytes(end - 4, &[0; 8]).is_err());
    assert!(!ram.write(end, 1, 0));
    assert!(take(&h).is_empty());
}

#[test]
fn a_store_after_a_harvest_marks_again_once_write_entries_are_dropped() {
    let mut h = hart();
    h.shared.ram.dirty.enable();
    let pa = RAM_BASE + 0x7_0000;
    h.store(pa, 8, 1).unwrap();
    assert_eq!(take(&h), [page_of(pa)]);
    // The write entry is cached: without a drop the next store would go unseen, which is
    // why a harvest drops them all.
    h.store(pa + 8, 8, 2).unwrap();
    assert!(
        take(&h).is_empty(),
        "a TLB hit does not mark (the cheap path)"
    );
    h.shared.links[0]
        .requests
        .fetch_or(REQ_DROP_WRITES, Ordering::SeqCst);
    let req = h.shared.links[0].requests.swap(0, Ordering::SeqCst);
    h.apply_requests(req);
    h.store(pa + 16, 8, 3).unwrap();
    assert_eq!(take(&h), [page_of(pa)], "refilled, marked again");
    // Loads fill read entries only.
    h.load(RAM_BASE + 0xa_0000, 8).unwrap();
    assert!(take(&h).is_empty());
}

#[test]
fn the_page_walker_marks_the_pages_whose_ptes_it_updates() {
    let mut h = hart();
    h.shared.ram.dirty.enable();
    // One Sv39 gigapage mapping RAM onto itself, without A and D: root at +1 MiB.
    let root = RAM_BASE + 0x10_0000;
    let pte = root + ((RAM_BASE >> 30) & 0x1ff) * 8;
    assert!(h.shared.ram.write(pte, 8, ((RAM_BASE >> 12) << 10) | 0xf));
    h.csr.satp = (SATP_MODE_SV39 << 60) | (root >> 12);
    h.flush_tlb();
    h.set_prv(PRV_S);
    take(&h);
    h.load(RAM_BASE + 0xb_0000, 8).unwrap();
    assert_eq!(take(&h), [page_of(root)], "A set by a load");
    let pa = RAM_BASE + 0xc_0000;
    h.store(pa, 8, 5).unwrap();
    assert_eq!(
        h.shared.ram.read(pte, 8).unwrap() & 0xc0,
        0xc0,
        "A and D set"
    );
    assert_eq!(take(&h), [page_of(pa), page_of(root)], "D set by a store");
}

fn words(ws: &[u32]) -> Vec<u8> {
    ws.iter().flat_map(|w| w.to_le_bytes()).collect()
}

/// Each hart counts and stores its count at RAM_BASE + 0x1000 + 8 * hartid.
const COUNTERS: [u32; 6] = [
    0x0000_1597,
    0x0035_1293,
    0x0055_85b3,
    0x0016_0613,
    0x00c5_b023,
    0xff9f_f06f,
];

/// Stops the machine when a failed assertion unwinds out of the scope that runs it, so
/// the test fails instead of waiting forever for the run to end.
struct StopOnDrop(MachineHandle);
impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.stop();
    }
}

#[test]
fn harvests_of_a_running_machine_return_exactly_the_pages_written() {
    let mut m = Machine::new(MachineConfig {
        harts: 2,
        memory_bytes: 4 << 20,
        ..MachineConfig::default()
    })
    .unwrap();
    m.load_program(&words(&COUNTERS)).unwrap();
    let h = m.handle();
    assert!(h.harvest_dirty().is_none(), "off until enabled");
    let count = |m: &Machine, i: u64| m.ram().read(RAM_BASE + 0x1000 + 8 * i, 8).unwrap();
    std::thread::scope(|s| {
        let run = s.spawn(|| m.run());
        let _stop = StopOnDrop(h.clone());
        let wait = |what: &str, done: &dyn Fn() -> bool| {
            let deadline = Instant::now() + Duration::from_secs(20);
            while !done() {
                assert!(Instant::now() < deadline, "timed out waiting for {what}");
                std::thread::sleep(Duration::from_millis(1));
            }
        };
        wait("both harts to count", &|| {
            count(&m, 0) > 0 && count(&m, 1) > 0
        });
        // Enabled while the harts run with write entries cached: they are dropped, so the
        // counters' page is marked again by the next stores.
        h.enable_dirty_log();
        for round in 0..5 {
            let before = [count(&m, 0), count(&m, 1)];
            wait("both harts to store again", &|| {
                count(&m, 0) > before[0] && count(&m, 1) > before[1]
            });
            let b = h.harvest_dirty().expect("the log is on");
            assert_eq!(b.runs(), [(1, 1)], "round {round}: only the counters' page");
        }
        // Paused: nothing is written, a harvest returns at once and finds nothing; a
        // harvest put back is found again.
        h.pause();
        h.harvest_dirty();
        let empty = h.harvest_dirty().unwrap();
        assert_eq!(empty.count(), 0);
        m.ram().write_bytes(RAM_BASE + 0x3000, &[1]).unwrap();
        let b = h.harvest_dirty().unwrap();
        assert_eq!(b.runs(), [(3, 1)]);
        h.remark_dirty(&b);
        assert_eq!(h.harvest_dirty().unwrap(), b);
        h.resume();
        let before = count(&m, 0);
        wait("hart 0 to store after the resume", &|| {
            count(&m, 0) > before
        });
        assert!(h.harvest_dirty().unwrap().contains(1));
        h.stop();
        assert_eq!(run.join().unwrap().unwrap(), ExitReason::Stopped);
    });
}

#[test]
fn runs_group_consecutive_pages() {
    let log = DirtyLog::new(200);
    log.enable();
    for p in [0, 1, 2, 63, 64, 65, 130, 199, 250] {
        log.mark(p);
    }
    let b = log.take().unwrap();
    assert_eq!(b.runs(), [(0, 3), (63, 3), (130, 1), (199, 1)]);
    assert_eq!(b.count(), 8, "a page past RAM is ignored");
    assert!(log.take().unwrap().runs().is_empty());
}

#[test]
fn file_pages_map_over_ram_lazily_and_are_checked() {
    let dir = std::env::temp_dir().join(format!("vme-file-pages-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let size = 2u64 << 20;
    let file = |name: &str, fill: u8, pages: &[u64]| {
        use std::os::unix::fs::FileExt;
        let p = dir.join(name);
        let f = std::fs::File::create(&p).unwrap();
        f.set_len(size).unwrap();
        for &pg in pages {
            f.write_all_at(&[fill; PAGE_SIZE as usize], pg * PAGE_SIZE)
                .unwrap();
        }
        std::fs::File::open(&p).unwrap()
    };
    let base = file("base", 0xaa, &(0..512).collect::<Vec<_>>());
    let diff = file("diff", 0xbb, &[3, 4, 10]);
    let ram = GuestRam::from_file(&base, size).unwrap();
    // Page 11 is listed but a hole in the diff: a page that became zero.
    let ram = ram.with_file_pages(&diff, &[(3, 2), (10, 2)]).unwrap();
    let at = |ram: &GuestRam, page: u64| ram.read(RAM_BASE + page * PAGE_SIZE + 8, 1).unwrap();
    assert_eq!(
        [2, 3, 4, 5, 10, 11, 12].map(|p| at(&ram, p)),
        [0xaa, 0xbb, 0xbb, 0xaa, 0xbb, 0, 0xaa]
    );
    // Writes stay private; a discard of an overlaid page reads zero, not the file.
    assert!(ram.write(RAM_BASE + 3 * PAGE_SIZE + 8, 1, 1));
    ram.discard(RAM_BASE + 4 * PAGE_SIZE, PAGE_SIZE).unwrap();
    assert_eq!([at(&ram, 3), at(&ram, 4)], [1, 0]);
    drop(ram);
    assert_eq!(std::fs::read(dir.join("diff")).unwrap()[3 * 4096 + 8], 0xbb);
    // Runs that are empty, overlap, are out of order or pass the end of RAM are refused,
    // and so is a file of another length.
    for bad in [
        &[(1, 0)][..],
        &[(1, 3), (2, 1)],
        &[(5, 1), (1, 1)],
        &[(510, 3)],
        &[(u64::MAX, 2)],
    ] {
        let ram = GuestRam::from_file(&base, size).unwrap();
        let err = ram.with_file_pages(&diff, bad).err().unwrap().to_string();
        assert!(err.contains("outside the 512 pages"), "{bad:?}: {err}");
    }
    let short = file("short", 0, &[]);
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(dir.join("short"))
        .unwrap();
    f.set_len(size / 2).unwrap();
    let ram = GuestRam::from_file(&base, size).unwrap();
    let err = ram.with_file_pages(&short, &[]).err().unwrap().to_string();
    assert!(err.contains("truncated"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Stores one word per page across 8 MiB, over and over: 2048 pages against a 256-entry
/// TLB, so every store misses and refills, which is where the log marks (its worst case).
/// auipc a1, 0x100; lui t1, 0x800; lui t2, 1; outer: li t0, 0;
/// loop: add t3, a1, t0; sd t0, 0(t3); add t0, t0, t2; bltu t0, t1, loop; j outer
const STRIDE: [u32; 9] = [
    0x0010_0597,
    0x0080_0337,
    0x0000_13b7,
    0x0000_0293,
    0x0055_8e33,
    0x005e_3023,
    0x0072_82b3,
    0xfe62_eae3,
    0xfedf_f06f,
];

/// Nanoseconds the threads named `hart0` of this process have run on a CPU (schedstat):
/// speeds per CPU second are far steadier than per wall second on a loaded host.
fn hart0_cpu_ns() -> u64 {
    let mut ns = 0;
    for t in std::fs::read_dir("/proc/self/task")
        .into_iter()
        .flatten()
        .flatten()
    {
        let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
        if comm.trim() == "hart0" {
            let stat = std::fs::read_to_string(t.path().join("schedstat")).unwrap_or_default();
            ns += stat
                .split(' ')
                .next()
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0);
        }
    }
    ns
}

/// Measures, not asserts: two machines run `STRIDE`, one with the log off and one with it
/// on (harvested every 10 ms in a last phase), taking turns so that host load hits both
/// alike; prints their speeds (per CPU second of the hart) and how long a harvest of the
/// running machine takes.
#[test]
fn what_the_log_costs_in_its_worst_case_is_printed() {
    let machine = || {
        let mut m = Machine::new(MachineConfig {
            memory_bytes: 16 << 20,
            ..MachineConfig::default()
        })
        .unwrap();
        m.load_program(&words(&STRIDE)).unwrap();
        m
    };
    let (a, b) = (machine(), machine());
    let (ha, hb) = (a.handle(), b.handle());
    ha.pause();
    hb.pause();
    hb.enable_dirty_log();
    let turn = Duration::from_millis(150);
    // MIPS of `h` running alone for one turn, harvesting every 10 ms when `harvest`.
    let run_turn = |h: &MachineHandle, harvest: bool, us: &mut Vec<f64>| {
        h.resume();
        let (t0, r0, c0) = (Instant::now(), h.stats().retired[0], hart0_cpu_ns());
        while t0.elapsed() < turn {
            std::thread::sleep(Duration::from_millis(10));
            if harvest {
                let t = Instant::now();
                h.harvest_dirty();
                us.push(t.elapsed().as_secs_f64() * 1e6);
            }
        }
        h.pause();
        // The other machine's hart0 is parked meanwhile: the CPU time is this one's.
        (h.stats().retired[0] - r0) as f64 / (hart0_cpu_ns() - c0).max(1) as f64 * 1e3
    };
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    std::thread::scope(|s| {
        let runs = [s.spawn(|| a.run()), s.spawn(|| b.run())];
        let _stop = (StopOnDrop(ha.clone()), StopOnDrop(hb.clone()));
        let (mut off, mut on, mut harvested, mut us) = (vec![], vec![], vec![], vec![]);
        for _ in 0..5 {
            off.push(run_turn(&ha, false, &mut us));
            on.push(run_turn(&hb, false, &mut us));
        }
        for _ in 0..5 {
            off.push(run_turn(&ha, false, &mut us));
            harvested.push(run_turn(&hb, true, &mut us));
        }
        let mean = us.iter().sum::<f64>() / us.len().max(1) as f64;
        eprintln!(
            "dirty log, every store a TLB miss (median MIPS per CPU second, alternating turns): {:.1} off, \
             {:.1} on, {:.1} on with a harvest every 10 ms (2048 pages dirty each); a harvest \
             of the running machine takes {mean:.0} us on average, {:.0} us at the median",
            median(off),
            median(on),
            median(harvested),
            median(us.clone()),
        );
        ha.stop();
        hb.stop();
        for r in runs {
            assert_eq!(r.join().unwrap().unwrap(), ExitReason::Stopped);
        }
    });
}

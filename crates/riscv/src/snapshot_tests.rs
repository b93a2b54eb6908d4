use super::*;
use crate::memory::{GuestRam, RAM_BASE};
use crate::{ExitReason, MachineConfig};
use std::io::Write;

fn words(ws: &[u32]) -> Vec<u8> {
    ws.iter().flat_map(|w| w.to_le_bytes()).collect()
}

/// Each hart counts in a2 and stores it at RAM_BASE + 0x1000 + 8 * hartid:
/// auipc a1, 1; slli t0, a0, 3; add a1, a1, t0; loop: addi a2, a2, 1; sd a2, 0(a1); j loop
const COUNTERS: [u32; 6] = [
    0x0000_1597,
    0x0035_1293,
    0x0055_85b3,
    0x0016_0613,
    0x00c5_b023,
    0xff9f_f06f,
];
const MEM: u64 = 4 << 20;

fn cfg() -> MachineConfig {
    MachineConfig {
        harts: 2,
        memory_bytes: MEM,
        ..MachineConfig::default()
    }
}

fn counter(ram: &GuestRam, h: u64) -> u64 {
    ram.read(RAM_BASE + 0x1000 + 8 * h, 8).unwrap()
}

fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Runs the counters, pauses, saves; returns the state and a file holding RAM.
fn save_running_machine(path: &std::path::Path) -> (MachineState, [u64; 2]) {
    let mut m = Machine::new(cfg()).unwrap();
    m.load_program(&words(&COUNTERS)).unwrap();
    let h = m.handle();
    std::thread::scope(|s| {
        let run = s.spawn(|| m.run());
        wait_until("both harts to count", || {
            counter(m.ram(), 0) > 1000 && counter(m.ram(), 1) > 1000
        });
        h.pause();
        let state = h.save_state(Duration::from_secs(5)).unwrap();
        let t = m.shared.clock.ticks();
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(m.shared.clock.ticks(), t, "a paused clock stands still");
        assert_eq!(state.clint.mtime, t);
        let counts = [counter(m.ram(), 0), counter(m.ram(), 1)];
        let mut buf = vec![0u8; MEM as usize];
        m.ram().read_bytes(RAM_BASE, &mut buf).unwrap();
        std::fs::File::create(path)
            .unwrap()
            .write_all(&buf)
            .unwrap();
        h.stop();
        assert_eq!(run.join().unwrap().unwrap(), ExitReason::Stopped);
        (state, counts)
    })
}

#[test]
fn a_restored_machine_continues_where_it_was_saved() {
    let path = std::env::temp_dir().join(format!("vme-riscv-snap-{}", std::process::id()));
    let (state, counts) = save_running_machine(&path);
    for (h, hs) in state.harts.iter().enumerate() {
        // Paused between the increment and the store, or after both.
        let a2 = hs.x[12];
        assert!(a2 == counts[h] || a2 == counts[h] + 1, "hart {h}: a2 {a2}");
        assert_eq!(hs.csr.mhartid, h as u64);
        assert_eq!(hs.prv, PRV_M);
    }
    let file = std::fs::File::open(&path).unwrap();
    let mut m = Machine::with_ram(cfg(), GuestRam::from_file(&file, MEM).unwrap()).unwrap();
    m.restore_state(&state).unwrap();
    // What was saved is what the harts now hold.
    for h in 0..2 {
        assert_eq!(m.with_hart(h, |hart| hart.save()).unwrap(), state.harts[h]);
    }
    let now = m.shared.clock.ticks();
    assert!(
        now >= state.clint.mtime && now < state.clint.mtime + 10_000_000,
        "the clock continues from the snapshot: saved {}, now {now}",
        state.clint.mtime
    );
    let h = m.handle();
    std::thread::scope(|s| {
        let run = s.spawn(|| m.run());
        wait_until("the restored harts to count on", || {
            counter(m.ram(), 0) > counts[0] + 1000 && counter(m.ram(), 1) > counts[1] + 1000
        });
        h.stop();
        assert_eq!(run.join().unwrap().unwrap(), ExitReason::Stopped);
    });
    std::fs::remove_file(&path).unwrap();
}

#[test]
fn saving_needs_a_paused_running_machine() {
    let mut m = Machine::new(cfg()).unwrap();
    m.load_program(&words(&COUNTERS)).unwrap();
    let err = m.handle().save_state(Duration::ZERO).unwrap_err();
    assert!(err.to_string().contains("pause"), "{err}");
    m.handle().pause();
    let err = m.handle().save_state(Duration::ZERO).unwrap_err();
    assert!(err.to_string().contains("0 of 2 harts"), "{err}");
}

#[test]
fn states_that_do_not_fit_or_cannot_exist_are_refused() {
    let path = std::env::temp_dir().join(format!("vme-riscv-snap2-{}", std::process::id()));
    let (good, _) = save_running_machine(&path);
    std::fs::remove_file(&path).unwrap();
    type Edit = Box<dyn Fn(&mut MachineState)>;
    let cases: Vec<(&str, Edit)> = vec![
        ("implementing rv32", Box::new(|s| s.isa = "rv32i".into())),
        ("3 harts", Box::new(|s| s.harts.push(s.harts[0].clone()))),
        ("timebase", Box::new(|s| s.timebase_hz += 1)),
        ("x0 is not zero", Box::new(|s| s.harts[1].x[0] = 1)),
        ("31 x registers", Box::new(|s| s.harts[0].x.truncate(31))),
        ("privilege mode 2", Box::new(|s| s.harts[0].prv = 2)),
        ("pc 0x80000001", Box::new(|s| s.harts[0].pc = RAM_BASE + 1)),
        ("HSM state 7", Box::new(|s| s.harts[0].hsm = 7)),
        (
            "hart 1: mstatus",
            Box::new(|s| s.harts[1].csr.mstatus |= 1 << 40),
        ),
        ("hart 0: satp", Box::new(|s| s.harts[0].csr.satp = 5 << 60)),
        ("hart 0: mhartid", Box::new(|s| s.harts[0].csr.mhartid = 1)),
        (
            "7 pmpcfg",
            Box::new(|s| s.harts[0].csr.pmpcfg.pop().map(drop).unwrap_or(())),
        ),
        ("PLIC: a priority", Box::new(|s| s.plic.priority[3] = 8)),
        ("PLIC: interrupt bits", Box::new(|s| s.plic.pending |= 1)),
        (
            "PLIC: 3 thresholds",
            Box::new(|s| s.plic.threshold.pop().map(drop).unwrap_or(())),
        ),
    ];
    for (want, edit) in cases {
        let mut bad = good.clone();
        edit(&mut bad);
        let mut m = Machine::new(cfg()).unwrap();
        let err = m.restore_state(&bad).unwrap_err().to_string();
        assert!(err.contains(want), "{want:?} not in {err:?}");
    }
    let mut m = Machine::new(cfg()).unwrap();
    m.restore_state(&good).unwrap();
}

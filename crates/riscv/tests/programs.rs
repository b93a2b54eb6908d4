//! Self-checking bare-metal programs (tests/programs/*.S), assembled with Debian's
//! riscv64-linux-gnu binutils, loaded at 0x8000_0000 and run in M-mode. Each reports through
//! the test finisher: pass = power off, fail = `Fault("guest reported failure code N")` with
//! N the number of the failing TEST block in the program.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use vme_riscv::{ExitReason, Machine, MachineConfig};

fn tool(name: &str) -> String {
    let t = format!("riscv64-linux-gnu-{name}");
    match Command::new(&t).arg("--version").output() {
        Ok(o) if o.status.success() => t,
        _ => panic!(
            "{t} is missing: these tests assemble their programs with it. Install Debian's \
             binutils-riscv64-linux-gnu (apt-get install binutils-riscv64-linux-gnu)"
        ),
    }
}

fn run_tool(cmd: &mut Command) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Assembles and links `name`.S into a flat binary at 0x8000_0000.
fn build(name: &str) -> Vec<u8> {
    let src_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/programs");
    let out = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("riscv-programs");
    std::fs::create_dir_all(&out).expect("creating the program output directory");
    let obj = out.join(format!("{name}.o"));
    let elf = out.join(format!("{name}.elf"));
    let bin = out.join(format!("{name}.bin"));
    run_tool(
        Command::new(tool("as"))
            .args(["-march=rv64gc", "-mabi=lp64d", "-I"])
            .arg(&src_dir)
            .arg("-o")
            .arg(&obj)
            .arg(src_dir.join(format!("{name}.S"))),
    );
    run_tool(
        Command::new(tool("ld"))
            .args(["-nostdlib", "--no-relax", "-Ttext=0x80000000", "-o"])
            .arg(&elf)
            .arg(&obj),
    );
    run_tool(
        Command::new(tool("objcopy"))
            .args(["-O", "binary"])
            .arg(&elf)
            .arg(&bin),
    );
    std::fs::read(&bin).expect("reading the assembled program")
}

/// Runs a program on `harts` harts with 8 MiB of RAM; `setup` may drive interrupt lines.
fn run(name: &str, harts: usize, setup: impl FnOnce(&Machine)) -> ExitReason {
    let program = build(name);
    let mut m = Machine::new(MachineConfig {
        harts,
        memory_bytes: 8 << 20,
        ..MachineConfig::default()
    })
    .expect("creating the machine");
    m.load_program(&program).expect("loading the program");
    setup(&m);
    let handle = m.handle();
    let watchdog = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(10));
        handle.stop();
    });
    let why = m.run().expect("running the machine");
    drop(watchdog);
    if why != ExitReason::PowerOff {
        for h in 0..harts {
            m.with_hart(h, |h| eprintln!("hart {}: pc {:#x} prv {} gp(test) {} mcause {:#x} mepc {:#x} mtval {:#x} x9 {:#x} sp {:#x}", h.hartid, h.pc, h.prv, h.x[3], h.csr.mcause, h.csr.mepc, h.csr.mtval, h.x[9], h.x[2]));
        }
    }
    why
}

fn expect_pass(name: &str, harts: usize, setup: impl FnOnce(&Machine)) {
    let why = run(name, harts, setup);
    assert_eq!(why, ExitReason::PowerOff, "program {name} did not pass");
}

#[test]
fn rv64i_and_rv64c() {
    expect_pass("rv64i", 1, |_| {});
}

#[test]
fn rv64m() {
    expect_pass("rv64m", 1, |_| {});
}

#[test]
fn rv64a() {
    expect_pass("rv64a", 1, |_| {});
}

#[test]
fn rv64fd() {
    expect_pass("fd", 1, |_| {});
}

#[test]
fn exceptions_and_delegation() {
    expect_pass("traps", 1, |_| {});
}

#[test]
fn sv39_sv48_paging() {
    expect_pass("paging", 1, |_| {});
}

#[test]
fn interrupts_clint_plic_delegation() {
    expect_pass("interrupts", 1, |m| {
        m.irq_line(5).expect("irq 5").set_level(true)
    });
}

#[test]
fn smp_atomics_and_ipi() {
    expect_pass("smp", 2, |_| {});
}

#[test]
fn failure_is_reported_with_the_test_number() {
    // A program that fails on purpose must not look like a pass.
    let why = run("selftest_fail", 1, |_| {});
    assert_eq!(
        why,
        ExitReason::Fault("guest reported failure code 3".into())
    );
}

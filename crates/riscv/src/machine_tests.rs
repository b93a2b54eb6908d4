use super::*;
use std::time::Duration;

fn words(ws: &[u32]) -> Vec<u8> {
    ws.iter().flat_map(|w| w.to_le_bytes()).collect()
}

/// auipc a0, 1; loop: addi a1, a1, 1; sd a1, 0(a0); j loop
const COUNTER_LOOP: [u32; 4] = [0x0000_1517, 0x0015_8593, 0x00b5_3023, 0xff9f_f06f];

#[test]
fn pause_blocks_and_resume_continues() {
    let mut m = Machine::new(MachineConfig {
        memory_bytes: 4 << 20,
        ..MachineConfig::default()
    })
    .unwrap();
    m.load_program(&words(&COUNTER_LOOP)).unwrap();
    let h = m.handle();
    let counter = || m.ram().read(RAM_BASE + 0x1000, 8).unwrap();
    std::thread::scope(|s| {
        let run = s.spawn(|| m.run());
        while counter() < 1000 {
            std::thread::sleep(Duration::from_millis(1));
        }
        h.pause();
        assert!(h.is_paused());
        let (c1, r1) = (counter(), h.stats().retired[0]);
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(counter(), c1, "a paused hart executed instructions");
        assert_eq!(h.stats().retired[0], r1);
        h.resume();
        while counter() == c1 {
            std::thread::sleep(Duration::from_millis(1));
        }
        h.stop();
        assert_eq!(run.join().unwrap().unwrap(), ExitReason::Stopped);
    });
    // The machine can be inspected after the run.
    assert!(m.with_hart(0, |h| h.pc).unwrap() >= RAM_BASE);
}

#[test]
fn wfi_sleeps_instead_of_spinning() {
    // loop: wfi; j loop  (no interrupt is enabled, so the hart sleeps until stopped)
    let mut m = Machine::new(MachineConfig {
        memory_bytes: 4 << 20,
        ..MachineConfig::default()
    })
    .unwrap();
    m.load_program(&words(&[0x1050_0073, 0xffdf_f06f])).unwrap();
    let h = m.handle();
    std::thread::scope(|s| {
        let run = s.spawn(|| m.run());
        std::thread::sleep(Duration::from_millis(100));
        h.stop();
        assert_eq!(run.join().unwrap().unwrap(), ExitReason::Stopped);
    });
    assert!(
        h.stats().retired[0] < 100,
        "WFI spun: {} instructions",
        h.stats().retired[0]
    );
}

#[test]
fn a_stop_before_the_run_is_kept_and_the_machine_runs_again_after_it() {
    // A monitor may be told to stop while it is still setting up, before `run`: that stop
    // used to be lost (the run cleared it), leaving the monitor running a guest nobody wanted.
    let mut m = Machine::new(MachineConfig {
        memory_bytes: 4 << 20,
        ..MachineConfig::default()
    })
    .unwrap();
    m.load_program(&words(&COUNTER_LOOP)).unwrap();
    let h = m.handle();
    h.stop();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::scope(|s| {
        s.spawn(|| tx.send(m.run()).unwrap());
        let ended = rx.recv_timeout(Duration::from_secs(10));
        if ended.is_err() {
            h.stop(); // lets the scope end, so the failure is reported
        }
        assert_eq!(
            ended
                .expect("a stop requested before run was lost")
                .unwrap(),
            ExitReason::Stopped
        );
    });
    // The stop belonged to that run: the next one runs until stopped again.
    let counter = || m.ram().read(RAM_BASE + 0x1000, 8).unwrap();
    std::thread::scope(|s| {
        let run = s.spawn(|| m.run());
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while counter() < 1000 && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        h.stop();
        assert_eq!(run.join().unwrap().unwrap(), ExitReason::Stopped);
    });
    assert!(
        counter() >= 1000,
        "the second run did not execute the program"
    );
}

#[test]
fn config_and_loader_errors_are_reported() {
    assert!(
        Machine::new(MachineConfig {
            harts: 0,
            ..MachineConfig::default()
        })
        .is_err()
    );
    assert!(
        Machine::new(MachineConfig {
            harts: 33,
            ..MachineConfig::default()
        })
        .is_err()
    );
    assert!(
        Machine::new(MachineConfig {
            virtio_mmio_slots: 9,
            ..MachineConfig::default()
        })
        .is_err()
    );
    let mut m = Machine::new(MachineConfig {
        memory_bytes: 4 << 20,
        ..MachineConfig::default()
    })
    .unwrap();
    assert!(matches!(m.load_kernel(&[0u8; 16]), Err(Error::Kernel(_))));
    assert!(matches!(m.load_kernel(&[0u8; 128]), Err(Error::Kernel(_))));
    let mut img = vec![0u8; 128];
    img[0x38..0x3c].copy_from_slice(b"RSC\x05");
    img[16..24].copy_from_slice(&(64u64 << 20).to_le_bytes());
    assert!(
        matches!(m.load_kernel(&img), Err(Error::Kernel(_))),
        "image larger than RAM"
    );
    assert!(matches!(
        m.load_initrd(&vec![0u8; 8 << 20]),
        Err(Error::Initrd(_))
    ));
    assert!(m.irq_line(0).is_err());
    assert!(m.irq_line(64).is_err());
    struct Nop;
    impl MmioDevice for Nop {
        fn read(&self, _: u64, d: &mut [u8]) {
            d.fill(0)
        }
        fn write(&self, _: u64, _: &[u8]) {}
    }
    assert!(
        m.add_mmio_device(CLINT_BASE, 0x10, Arc::new(Nop)).is_err(),
        "overlaps the CLINT"
    );
    assert!(m.add_mmio_device(0x1000_0000, 0x100, Arc::new(Nop)).is_ok());
}

#[test]
fn kernel_boot_state_follows_the_sbi_convention() {
    let mut m = Machine::new(MachineConfig {
        harts: 2,
        memory_bytes: 8 << 20,
        ..MachineConfig::default()
    })
    .unwrap();
    let mut img = vec![0u8; 4096];
    img[0x38..0x3c].copy_from_slice(b"RSC\x05");
    m.load_kernel(&img).unwrap();
    m.with_hart(0, |h| {
        assert_eq!(
            (h.pc, h.prv, h.x[10]),
            (RAM_BASE + DEFAULT_TEXT_OFFSET, PRV_S, 0)
        );
    });
    assert_eq!(m.shared.links[1].hsm.load(Ordering::SeqCst), HSM_STOPPED);
    let dtb = m.device_tree().unwrap();
    assert_eq!(&dtb[..4], &[0xd0, 0x0d, 0xfe, 0xed]);
}

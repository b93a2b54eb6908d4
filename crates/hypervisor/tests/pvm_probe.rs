//! PVM user-space probe: does this host's KVM deliver `syscall`, `int 0x80` and exceptions
//! from guest ring 3 to the guest kernel, the way Linux user space needs?
//!
//! The guest (`pvm_probe_guest.S`, bytes below) runs with long mode set up by us: ring-0 code
//! writes LSTAR, `iretq`s to ring 3, and ring-3 code executes `syscall`, `int 0x80`, `ud2`,
//! `int3` and `hlt`. Every handler reports through port I/O, and each report exit records
//! RIP and CS as KVM sees them, so the test shows where each transition really lands.
//! To change the guest: edit the .S file, then `as --64 -o g.o pvm_probe_guest.S &&
//! ld -Ttext=0x10000 --oformat binary -o g.bin g.o` and paste the routines' bytes here.

use kvm_bindings::{Msrs, kvm_msr_entry, kvm_segment};
use kvm_ioctls::{Kvm, VcpuExit};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

/// Each routine of `pvm_probe_guest.S` with its guest-physical address.
const GUEST_CODE: &[(u64, &[u8])] = &[
    // kernel entry: reports, writes LSTAR (and PVM MSRs if asked), iretq to ring 3
    (
        0x10000,
        &[
            0xc6, 0x04, 0x25, 0x10, 0x00, 0x00, 0x10, 0x01, 0x66, 0x8c, 0xc8, 0x66, 0x89, 0x04,
            0x25, 0x12, 0x00, 0x00, 0x10, 0xb9, 0x82, 0x00, 0x00, 0xc0, 0x8b, 0x04, 0x25, 0x10,
            0x50, 0x00, 0x00, 0x31, 0xd2, 0x0f, 0x30, 0xc6, 0x04, 0x25, 0x10, 0x00, 0x00, 0x10,
            0x11, 0x48, 0x8b, 0x04, 0x25, 0x00, 0x50, 0x00, 0x00, 0x48, 0x85, 0xc0, 0x74, 0x1d,
            0xb9, 0xf4, 0x4d, 0x56, 0x4b, 0x31, 0xd2, 0x0f, 0x30, 0xb9, 0xf2, 0x4d, 0x56, 0x4b,
            0xb8, 0x00, 0x80, 0x03, 0x00, 0x0f, 0x30, 0xc6, 0x04, 0x25, 0x10, 0x00, 0x00, 0x10,
            0x12, 0x6a, 0x2b, 0x68, 0x00, 0x00, 0x04, 0x00, 0x6a, 0x02, 0x6a, 0x33, 0x68, 0x00,
            0x10, 0x01, 0x00, 0x48, 0xcf, 0xc6, 0x04, 0x25, 0x10, 0x00, 0x00, 0x10, 0xe1, 0xf4,
        ],
    ),
    // LSTAR handler: report, sysretq
    (
        0x10100,
        &[
            0xc6, 0x04, 0x25, 0x10, 0x00, 0x00, 0x10, 0x03, 0x66, 0x8c, 0xc8, 0x66, 0x89, 0x04,
            0x25, 0x12, 0x00, 0x00, 0x10, 0x48, 0x0f, 0x07,
        ],
    ),
    // int 0x80 handler (gate DPL 3)
    (
        0x10200,
        &[
            0xc6, 0x04, 0x25, 0x10, 0x00, 0x00, 0x10, 0x05, 0x66, 0x8c, 0xc8, 0x66, 0x89, 0x04,
            0x25, 0x12, 0x00, 0x00, 0x10, 0x48, 0x8b, 0x44, 0x24, 0x08, 0x66, 0x89, 0x04, 0x25,
            0x14, 0x00, 0x00, 0x10, 0x48, 0x8b, 0x04, 0x24, 0x89, 0x04, 0x25, 0x15, 0x00, 0x00,
            0x10, 0x48, 0xcf,
        ],
    ),
    // #UD handler: report, skip ud2
    (
        0x10300,
        &[
            0xc6, 0x04, 0x25, 0x11, 0x00, 0x00, 0x10, 0x06, 0x66, 0x8c, 0xc8, 0x66, 0x89, 0x04,
            0x25, 0x12, 0x00, 0x00, 0x10, 0x48, 0x8b, 0x44, 0x24, 0x08, 0x66, 0x89, 0x04, 0x25,
            0x14, 0x00, 0x00, 0x10, 0x48, 0x8b, 0x04, 0x24, 0x89, 0x04, 0x25, 0x15, 0x00, 0x00,
            0x10, 0x48, 0x83, 0x04, 0x24, 0x02, 0x48, 0xcf,
        ],
    ),
    // #BP handler (gate DPL 3)
    (
        0x10380,
        &[
            0xc6, 0x04, 0x25, 0x11, 0x00, 0x00, 0x10, 0x03, 0x66, 0x8c, 0xc8, 0x66, 0x89, 0x04,
            0x25, 0x12, 0x00, 0x00, 0x10, 0x48, 0x8b, 0x44, 0x24, 0x08, 0x66, 0x89, 0x04, 0x25,
            0x14, 0x00, 0x00, 0x10, 0x48, 0x8b, 0x04, 0x24, 0x89, 0x04, 0x25, 0x15, 0x00, 0x00,
            0x10, 0x48, 0xcf,
        ],
    ),
    // #GP handler: report, skip a hlt, else stop
    (
        0x10400,
        &[
            0xc6, 0x04, 0x25, 0x11, 0x00, 0x00, 0x10, 0x0d, 0x66, 0x8c, 0xc8, 0x66, 0x89, 0x04,
            0x25, 0x12, 0x00, 0x00, 0x10, 0x48, 0x8b, 0x44, 0x24, 0x10, 0x66, 0x89, 0x04, 0x25,
            0x14, 0x00, 0x00, 0x10, 0x48, 0x8b, 0x44, 0x24, 0x08, 0x89, 0x04, 0x25, 0x15, 0x00,
            0x00, 0x10, 0x48, 0x8b, 0x44, 0x24, 0x08, 0x80, 0x38, 0xf4, 0x75, 0x0c, 0x48, 0x83,
            0x44, 0x24, 0x08, 0x01, 0x48, 0x83, 0xc4, 0x08, 0x48, 0xcf, 0xc6, 0x04, 0x25, 0x10,
            0x00, 0x00, 0x10, 0xed, 0xf4,
        ],
    ),
    // #PF handler: report frame, error code, CR2; stop
    (
        0x10480,
        &[
            0xc6, 0x04, 0x25, 0x11, 0x00, 0x00, 0x10, 0x0e, 0x48, 0x8b, 0x44, 0x24, 0x10, 0x66,
            0x89, 0x04, 0x25, 0x14, 0x00, 0x00, 0x10, 0x48, 0x8b, 0x44, 0x24, 0x08, 0x89, 0x04,
            0x25, 0x15, 0x00, 0x00, 0x10, 0x48, 0x8b, 0x04, 0x24, 0x89, 0x04, 0x25, 0x16, 0x00,
            0x00, 0x10, 0x0f, 0x20, 0xd0, 0x89, 0x04, 0x25, 0x17, 0x00, 0x00, 0x10, 0xc6, 0x04,
            0x25, 0x10, 0x00, 0x00, 0x10, 0xee, 0xf4,
        ],
    ),
    // every other vector: report, stop
    (
        0x10500,
        &[0xc6, 0x04, 0x25, 0x13, 0x00, 0x00, 0x10, 0xff, 0xf4],
    ),
    // PVM event entry (user event)
    (
        0x10600,
        &[
            0xc6, 0x04, 0x25, 0x10, 0x00, 0x00, 0x10, 0x21, 0x66, 0x8c, 0xc8, 0x66, 0x89, 0x04,
            0x25, 0x12, 0x00, 0x00, 0x10, 0xf4,
        ],
    ),
    // PVM event entry + 256 (syscall)
    (
        0x10700,
        &[
            0xc6, 0x04, 0x25, 0x10, 0x00, 0x00, 0x10, 0x22, 0x66, 0x8c, 0xc8, 0x66, 0x89, 0x04,
            0x25, 0x12, 0x00, 0x00, 0x10, 0xf4,
        ],
    ),
    // PVM event entry + 512 (supervisor event)
    (
        0x10800,
        &[
            0xc6, 0x04, 0x25, 0x10, 0x00, 0x00, 0x10, 0x23, 0x66, 0x8c, 0xc8, 0x66, 0x89, 0x04,
            0x25, 0x12, 0x00, 0x00, 0x10, 0xf4,
        ],
    ),
    // user code (ring 3): runs one step: syscall, int 0x80, ud2, int3 or hlt
    (
        0x11000,
        &[
            0xc6, 0x04, 0x25, 0x10, 0x00, 0x00, 0x10, 0x02, 0x66, 0x8c, 0xc8, 0x66, 0x89, 0x04,
            0x25, 0x12, 0x00, 0x00, 0x10, 0x48, 0x8b, 0x04, 0x25, 0x08, 0x50, 0x00, 0x00, 0x48,
            0x83, 0xf8, 0x01, 0x74, 0x1b, 0x48, 0x83, 0xf8, 0x02, 0x74, 0x19, 0x48, 0x83, 0xf8,
            0x03, 0x74, 0x17, 0x48, 0x83, 0xf8, 0x04, 0x74, 0x14, 0xb8, 0x2a, 0x00, 0x00, 0x00,
            0x0f, 0x05, 0xeb, 0x0c, 0xcd, 0x80, 0xeb, 0x08, 0x0f, 0x0b, 0xeb, 0x04, 0xcc, 0xeb,
            0x01, 0xf4, 0xc6, 0x04, 0x25, 0x10, 0x00, 0x00, 0x10, 0x04, 0x66, 0x8c, 0xc8, 0x66,
            0x89, 0x04, 0x25, 0x12, 0x00, 0x00, 0x10, 0xc6, 0x04, 0x25, 0x10, 0x00, 0x00, 0x10,
            0xff, 0xeb, 0xfe,
        ],
    ),
];

const MEM_SIZE: usize = 4 << 20;
const GDT: u64 = 0x1000;
const IDT: u64 = 0x2000;
const TSS: u64 = 0x3000;
const PML4: u64 = 0x9000;
const KERNEL_STACK: u64 = 0x38000;
/// Guest-physical 2 MiB..4 MiB is mapped supervisor-only (like a Linux kernel's text).
const SUPERVISOR_PAGE: u64 = 0x20_0000;

/// Reports are stores to unbacked guest-physical addresses (MMIO exits): see the .S file.
const MMIO: u64 = 0x1000_0000;
const PROGRESS: u64 = MMIO + 0x10;
const VECTOR: u64 = MMIO + 0x11;
const GUEST_CS: u64 = MMIO + 0x12;
const UNEXPECTED: u64 = MMIO + 0x13;
const FRAME_CS: u64 = MMIO + 0x14;
const FRAME_RIP: u64 = MMIO + 0x15;
const PF_ERROR: u64 = MMIO + 0x16;
const PF_CR2: u64 = MMIO + 0x17;
/// Slots the guest reads its parameters from.
const PVM_EVENT_ENTRY_SLOT: u64 = 0x5000;
const STEP_SLOT: u64 = 0x5008;
const LSTAR_SLOT: u64 = 0x5010;

const KERNEL_CS: u16 = 0x10;
const KERNEL_DS: u16 = 0x18;
const USER_CS: u16 = 0x33;
const TSS_SEL: u16 = 0x40;

const LSTAR_HANDLER: u64 = 0x10100;
const PVM_EVENT_ENTRY: u64 = 0x10600;
// Addresses of the step instructions in the user code (see the .S listing).
const USER_SYSCALL_NEXT: u64 = 0x1103a;
const USER_INT80: u64 = 0x1103c;
const USER_UD2: u64 = 0x11040;
const USER_INT3_NEXT: u64 = 0x11045;
const USER_HLT: u64 = 0x11047;
const LSTAR_SYSRETQ: u64 = 0x10113;

/// What the ring-3 code does after reporting that it runs.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Step {
    Syscall = 0,
    Int80 = 1,
    Ud2 = 2,
    Int3 = 3,
    Hlt = 4,
}

/// One probe run's parameters.
#[derive(Debug, Clone, Copy)]
struct Probe {
    step: Step,
    /// Written by the guest to MSR_PVM_EVENT_ENTRY when non-zero.
    pvm_event_entry: u64,
    lstar: u64,
    efer_sce: bool,
}

impl Probe {
    fn new(step: Step) -> Self {
        Self {
            step,
            pvm_event_entry: 0,
            lstar: LSTAR_HANDLER,
            efer_sce: true,
        }
    }
}

/// One report the guest made, with where KVM says the vCPU was when it made it.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Report {
    addr: u64,
    value: u32,
    /// CS selector and DPL as KVM_GET_SREGS reports them at the report's exit.
    cs: u16,
    cs_dpl: u8,
    /// RCX and R11 at the report's exit (what `syscall` saved).
    rcx: u64,
    r11: u64,
}

/// How the probe run ended.
#[derive(Debug)]
enum End {
    /// The user code reported 0xff: it got through its step and back.
    Done,
    Hlt,
    Other(String),
}

impl std::fmt::Display for End {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            End::Done => f.write_str("done"),
            End::Hlt => f.write_str("hlt"),
            End::Other(why) => f.write_str(why),
        }
    }
}

struct Outcome {
    reports: Vec<Report>,
    end: End,
}

impl Outcome {
    /// The value of the first report to `addr` made after the report `after` (addr, value).
    fn value_after(&self, after: (u64, u32), addr: u64) -> Option<Report> {
        let start = self
            .reports
            .iter()
            .position(|r| (r.addr, r.value) == after)?;
        self.reports[start + 1..]
            .iter()
            .find(|r| r.addr == addr)
            .copied()
    }

    fn has(&self, addr: u64, value: u32) -> bool {
        self.reports
            .iter()
            .any(|r| r.addr == addr && r.value == value)
    }
}

fn gdt_entries() -> [u64; 10] {
    let tss_low = 0x67u64
        | ((TSS & 0xff_ffff) << 16)
        | (0x89u64 << 40) // present, DPL 0, 64-bit TSS (available)
        | (((TSS >> 24) & 0xff) << 56);
    [
        0,
        0,
        0x00af_9b00_0000_ffff, // 0x10 kernel code, 64-bit
        0x00cf_9300_0000_ffff, // 0x18 kernel data
        0x00cf_fb00_0000_ffff, // 0x20 user code, 32-bit (STAR base for sysret)
        0x00cf_f300_0000_ffff, // 0x28 user data
        0x00af_fb00_0000_ffff, // 0x30 user code, 64-bit
        0,
        tss_low, // 0x40 TSS
        TSS >> 32,
    ]
}

fn idt_gate(handler: u64, dpl: u64) -> [u64; 2] {
    let low = (handler & 0xffff)
        | (u64::from(KERNEL_CS) << 16)
        | (0xeu64 << 40) // 64-bit interrupt gate
        | (dpl << 45)
        | (1u64 << 47)
        | (((handler >> 16) & 0xffff) << 48);
    [low, handler >> 32]
}

fn put<T: vm_memory::ByteValued>(mem: &GuestMemoryMmap, addr: u64, val: T) {
    mem.write_obj(val, GuestAddress(addr))
        .expect("probe layout fits in guest memory");
}

fn build_memory(probe: &Probe) -> GuestMemoryMmap {
    let mem =
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).expect("mmap guest memory");
    for (addr, code) in GUEST_CODE {
        mem.write_slice(code, GuestAddress(*addr))
            .expect("guest code fits");
    }
    // Identity map 1 GiB with 2 MiB pages: user-accessible except SUPERVISOR_PAGE.
    put(&mem, PML4, 0xa000u64 | 0x7);
    put(&mem, 0xa000, 0xb000u64 | 0x7);
    for i in 0..512u64 {
        let flags = if i << 21 == SUPERVISOR_PAGE {
            0x83
        } else {
            0x87
        };
        put(&mem, 0xb000 + i * 8, (i << 21) | flags);
    }
    for (i, e) in gdt_entries().iter().enumerate() {
        put(&mem, GDT + i as u64 * 8, *e);
    }
    for v in 0..256u64 {
        let (handler, dpl) = match v {
            3 => (0x10380, 3),
            6 => (0x10300, 0),
            13 => (0x10400, 0),
            14 => (0x10480, 0),
            0x80 => (0x10200, 3),
            _ => (0x10500, 0),
        };
        let gate = idt_gate(handler, dpl);
        put(&mem, IDT + v * 16, gate[0]);
        put(&mem, IDT + v * 16 + 8, gate[1]);
    }
    put(&mem, PVM_EVENT_ENTRY_SLOT, probe.pvm_event_entry);
    put(&mem, STEP_SLOT, probe.step as u64);
    put(&mem, LSTAR_SLOT, probe.lstar);
    // TSS: RSP0 for ring-3 → ring-0 transitions; I/O bitmap offset past the limit.
    put(&mem, TSS + 4, KERNEL_STACK);
    put(&mem, TSS + 0x66, 0x68u16);
    mem
}

fn seg(selector: u16, type_: u8, l: u8, db: u8) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        dpl: 0,
        db,
        s: 1,
        l,
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

fn run_probe(probe: Probe) -> Outcome {
    let kvm = Kvm::new().expect("open /dev/kvm (set VME_SKIP_KVM_TESTS=1 to skip KVM tests)");
    let vm = kvm.create_vm().expect("KVM_CREATE_VM");
    let mem = build_memory(&probe);
    let host = mem.get_host_address(GuestAddress(0)).expect("host address");
    let region = kvm_bindings::kvm_userspace_memory_region {
        slot: 0,
        flags: 0,
        guest_phys_addr: 0,
        memory_size: MEM_SIZE as u64,
        userspace_addr: host as u64,
    };
    // SAFETY: the region is a live mmap owned by `mem`, which outlives the VM in this function.
    unsafe { vm.set_user_memory_region(region) }.expect("KVM_SET_USER_MEMORY_REGION");
    let mut vcpu = vm.create_vcpu(0).expect("KVM_CREATE_VCPU");
    let cpuid = kvm
        .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
        .expect("KVM_GET_SUPPORTED_CPUID");
    vcpu.set_cpuid2(&cpuid).expect("KVM_SET_CPUID2");

    let mut sregs = vcpu.get_sregs().expect("KVM_GET_SREGS");
    sregs.cs = seg(KERNEL_CS, 0xb, 1, 0);
    let ds = seg(KERNEL_DS, 0x3, 0, 1);
    (sregs.ds, sregs.es, sregs.ss, sregs.fs, sregs.gs) = (ds, ds, ds, ds, ds);
    sregs.tr = kvm_segment {
        base: TSS,
        limit: 0x67,
        selector: TSS_SEL,
        type_: 0xb,
        present: 1,
        ..Default::default()
    };
    sregs.gdt.base = GDT;
    sregs.gdt.limit = (gdt_entries().len() * 8 - 1) as u16;
    sregs.idt.base = IDT;
    sregs.idt.limit = 0xfff;
    sregs.cr3 = PML4;
    sregs.cr4 = 0x20; // PAE
    sregs.cr0 = 0x8005_0033; // PG, WP, NE, ET, MP, PE
    sregs.efer = if probe.efer_sce { 0x501 } else { 0x500 }; // LMA, LME (, SCE)
    vcpu.set_sregs(&sregs).expect("KVM_SET_SREGS");

    let msrs = Msrs::from_entries(&[
        kvm_msr_entry {
            index: 0xc000_0081, // STAR: syscall CS 0x10, sysret base 0x20
            data: (0x20u64 << 48) | (0x10u64 << 32),
            ..Default::default()
        },
        kvm_msr_entry {
            index: 0xc000_0084, // SFMASK: clear TF, IF, DF on syscall
            data: 0x700,
            ..Default::default()
        },
    ])
    .expect("MSR list");
    assert_eq!(
        vcpu.set_msrs(&msrs).expect("KVM_SET_MSRS"),
        2,
        "STAR/SFMASK not accepted"
    );

    let mut regs = vcpu.get_regs().expect("KVM_GET_REGS");
    regs.rip = 0x10000;
    regs.rsp = KERNEL_STACK;
    regs.rflags = 0x2;
    vcpu.set_regs(&regs).expect("KVM_SET_REGS");

    let mut reports = Vec::new();
    // Every step needs fewer than 40 reports; the bound stops a guest that loops.
    for _ in 0..200 {
        let (addr, value) = match vcpu.run() {
            Ok(VcpuExit::MmioWrite(addr, data)) if data.len() <= 4 => {
                let mut v = [0u8; 4];
                v[..data.len()].copy_from_slice(data);
                (addr, u32::from_le_bytes(v))
            }
            Ok(VcpuExit::Hlt) => {
                return Outcome {
                    reports,
                    end: End::Hlt,
                };
            }
            Ok(other) => {
                let end = End::Other(format!("{other:?}"));
                return Outcome { reports, end };
            }
            Err(e) => {
                let end = End::Other(format!("KVM_RUN failed: {e}"));
                return Outcome { reports, end };
            }
        };
        let regs = vcpu.get_regs().expect("KVM_GET_REGS");
        let sregs = vcpu.get_sregs().expect("KVM_GET_SREGS");
        let report = Report {
            addr,
            value,
            cs: sregs.cs.selector,
            cs_dpl: sregs.cs.dpl,
            rcx: regs.rcx,
            r11: regs.r11,
        };
        eprintln!("{report:x?}");
        reports.push(report);
        if (addr == PROGRESS && value == 0xff) || addr == UNEXPECTED {
            let end = if addr == UNEXPECTED {
                End::Other("unexpected vector".into())
            } else {
                End::Done
            };
            return Outcome { reports, end };
        }
    }
    Outcome {
        reports,
        end: End::Other("more than 200 exits".into()),
    }
}

fn kvm_tests_skipped() -> bool {
    std::env::var_os("VME_SKIP_KVM_TESTS").is_some_and(|v| v == "1")
}

/// Runs a probe whose ring-3 step raises `vector`; checks the handler ran in ring 0 with the
/// right frame and that `iretq` got back to ring 3.
fn assert_exception_round_trip(step: Step, vector: u32, frame_rip: u64) {
    let out = run_probe(Probe::new(step));
    assert!(
        matches!(out.end, End::Done),
        "{step:?}: ended {:?}",
        out.end
    );
    let vec_report = out
        .reports
        .iter()
        .find(|r| r.addr == VECTOR)
        .expect("a vector report");
    assert_eq!(vec_report.value, vector, "{step:?} raised the wrong vector");
    assert_eq!(
        (vec_report.cs, vec_report.cs_dpl),
        (KERNEL_CS, 0),
        "handler not in ring 0"
    );
    let cs = out
        .value_after((VECTOR, vector), FRAME_CS)
        .expect("frame CS report");
    assert_eq!(cs.value, u32::from(USER_CS), "frame CS is not the user's");
    let rip = out
        .value_after((VECTOR, vector), FRAME_RIP)
        .expect("frame RIP report");
    assert_eq!(u64::from(rip.value), frame_rip, "frame RIP");
    let back = out
        .value_after((PROGRESS, 2), PROGRESS)
        .expect("report after the step");
    assert_eq!(
        (back.value, back.cs, back.cs_dpl),
        (4, USER_CS, 3),
        "not back in ring 3"
    );
}

#[test]
fn exceptions_from_ring3_reach_the_guest_kernel_and_return() {
    if kvm_tests_skipped() {
        return;
    }
    assert_exception_round_trip(Step::Ud2, 6, USER_UD2);
    assert_exception_round_trip(Step::Int3, 3, USER_INT3_NEXT);
    assert_exception_round_trip(Step::Hlt, 13, USER_HLT);
}

#[test]
fn int80_from_ring3_arrives_as_invalid_opcode() {
    if kvm_tests_skipped() {
        return;
    }
    // PVM turns a DPL-3 software interrupt into #UD at the `int` instruction.
    assert_exception_round_trip(Step::Int80, 6, USER_INT80);
    let out = run_probe(Probe::new(Step::Int80));
    assert!(
        !out.has(PROGRESS, 5),
        "the int 0x80 gate ran: PVM now delivers it, update PVM.md"
    );
}

#[test]
fn syscall_from_ring3_stays_in_user_mode() {
    if kvm_tests_skipped() {
        return;
    }
    let out = run_probe(Probe::new(Step::Syscall));
    let entry = out
        .reports
        .iter()
        .find(|r| r.addr == PROGRESS && r.value == 3);
    let entry = entry.expect("syscall did not reach the LSTAR handler");
    // The finding this test guards: RIP = LSTAR, but the CPU stays in user mode.
    assert_eq!(
        (entry.cs, entry.cs_dpl),
        (USER_CS, 3),
        "syscall entered kernel mode: update PVM.md"
    );
    // The rest of syscall's work is done: RCX = return address, R11 = RFLAGS.
    assert_eq!(entry.rcx, USER_SYSCALL_NEXT, "RCX after syscall");
    assert_eq!(entry.r11 & 0x2, 0x2, "R11 holds RFLAGS");
    // So the handler's sysretq is privileged there and faults.
    let rip = out
        .value_after((VECTOR, 13), FRAME_RIP)
        .expect("#GP on sysretq");
    assert_eq!(u64::from(rip.value), LSTAR_SYSRETQ);
    assert!(!out.has(PROGRESS, 4), "user code resumed after syscall");
}

#[test]
fn syscall_to_supervisor_page_faults_in_user_mode() {
    if kvm_tests_skipped() {
        return;
    }
    // Like Linux: entry_SYSCALL_64 sits on a supervisor-only page.
    let target = SUPERVISOR_PAGE + 0x100;
    let out = run_probe(Probe {
        lstar: target,
        ..Probe::new(Step::Syscall)
    });
    let pf = out
        .reports
        .iter()
        .find(|r| r.addr == VECTOR)
        .expect("an exception");
    assert_eq!(pf.value, 14, "expected #PF");
    let cr2 = out.value_after((VECTOR, 14), PF_CR2).expect("CR2 report");
    assert_eq!(u64::from(cr2.value), target, "CR2 is the LSTAR target");
    let err = out
        .value_after((VECTOR, 14), PF_ERROR)
        .expect("error code report");
    // present | user (no fetch bit: EFER.NX is off in the probe)
    assert_eq!(err.value & 0x5, 0x5, "error code {:#x}", err.value);
    let cs = out.value_after((VECTOR, 14), FRAME_CS).expect("frame CS");
    assert_eq!(cs.value, u32::from(USER_CS));
}

#[test]
fn syscall_ignores_efer_sce() {
    if kvm_tests_skipped() {
        return;
    }
    // On hardware, syscall with EFER.SCE clear is #UD; PVM still jumps to LSTAR in user mode,
    // so a guest cannot turn syscall into a trapping instruction this way.
    let out = run_probe(Probe {
        efer_sce: false,
        ..Probe::new(Step::Syscall)
    });
    let entry = out
        .reports
        .iter()
        .find(|r| r.addr == PROGRESS && r.value == 3);
    let entry = entry.expect("syscall did not reach the LSTAR handler");
    assert_eq!((entry.cs, entry.cs_dpl), (USER_CS, 3));
    assert!(
        !out.has(VECTOR, 6),
        "syscall raised #UD: PVM now honours EFER.SCE"
    );
}

#[test]
fn guest_cannot_write_pvm_event_entry_msr() {
    if kvm_tests_skipped() {
        return;
    }
    let out = run_probe(Probe {
        pvm_event_entry: PVM_EVENT_ENTRY,
        ..Probe::new(Step::Ud2)
    });
    let v = out
        .reports
        .iter()
        .find(|r| r.addr == VECTOR)
        .expect("an exception");
    assert_eq!(
        (v.value, v.cs),
        (13, KERNEL_CS),
        "wrmsr(MSR_PVM_EVENT_ENTRY) did not #GP"
    );
    let _ = GUEST_CS;
    assert!(matches!(out.end, End::Hlt), "ended {}", out.end);
}

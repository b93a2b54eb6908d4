//! Control and status registers: storage, WARL masks and privilege checks.

use crate::hart::{Hart, PRV_M, PRV_S, PRV_U, Trap};

pub const MSTATUS_SIE: u64 = 1 << 1;
pub const MSTATUS_MIE: u64 = 1 << 3;
pub const MSTATUS_SPIE: u64 = 1 << 5;
pub const MSTATUS_MPIE: u64 = 1 << 7;
pub const MSTATUS_SPP: u64 = 1 << 8;
pub const MSTATUS_MPP: u64 = 3 << 11;
pub const MSTATUS_FS: u64 = 3 << 13;
pub const MSTATUS_MPRV: u64 = 1 << 17;
pub const MSTATUS_SUM: u64 = 1 << 18;
pub const MSTATUS_MXR: u64 = 1 << 19;
pub const MSTATUS_TVM: u64 = 1 << 20;
pub const MSTATUS_TW: u64 = 1 << 21;
pub const MSTATUS_TSR: u64 = 1 << 22;
/// UXL = SXL = 2 (64-bit), read-only.
pub const MSTATUS_XL: u64 = (2 << 32) | (2 << 34);
pub const MSTATUS_SD: u64 = 1 << 63;
const MSTATUS_WMASK: u64 = MSTATUS_SIE
    | MSTATUS_MIE
    | MSTATUS_SPIE
    | MSTATUS_MPIE
    | MSTATUS_SPP
    | MSTATUS_MPP
    | MSTATUS_FS
    | MSTATUS_MPRV
    | MSTATUS_SUM
    | MSTATUS_MXR
    | MSTATUS_TVM
    | MSTATUS_TW
    | MSTATUS_TSR;
const SSTATUS_MASK: u64 =
    MSTATUS_SIE | MSTATUS_SPIE | MSTATUS_SPP | MSTATUS_FS | MSTATUS_SUM | MSTATUS_MXR;

pub const MIP_SSIP: u64 = 1 << 1;
pub const MIP_MSIP: u64 = 1 << 3;
pub const MIP_STIP: u64 = 1 << 5;
pub const MIP_MTIP: u64 = 1 << 7;
pub const MIP_SEIP: u64 = 1 << 9;
pub const MIP_MEIP: u64 = 1 << 11;
const S_INTS: u64 = MIP_SSIP | MIP_STIP | MIP_SEIP;
const ALL_INTS: u64 = S_INTS | MIP_MSIP | MIP_MTIP | MIP_MEIP;

pub const MENVCFG_STCE: u64 = 1 << 63;

/// misa: RV64 with A, C, D, F, I, M, S, U.
pub const MISA_VALUE: u64 =
    (2 << 62) | 1 | (1 << 2) | (1 << 3) | (1 << 5) | (1 << 8) | (1 << 12) | (1 << 18) | (1 << 20);

/// Exceptions that may be delegated (all but ecall-from-M and reserved codes).
const MEDELEG_MASK: u64 = 0xb3ff;

pub const SATP_MODE_BARE: u64 = 0;
pub const SATP_MODE_SV39: u64 = 8;
pub const SATP_MODE_SV48: u64 = 9;

/// CSR storage of one hart.
#[derive(Clone, Debug)]
pub struct Csrs {
    pub mstatus: u64,
    pub medeleg: u64,
    pub mideleg: u64,
    pub mie: u64,
    /// Software-writable mip bits; device and timer bits are merged in by `Hart::mip`.
    pub mip: u64,
    pub mtvec: u64,
    pub mcounteren: u64,
    pub menvcfg: u64,
    pub mcountinhibit: u64,
    pub mscratch: u64,
    pub mepc: u64,
    pub mcause: u64,
    pub mtval: u64,
    pub stvec: u64,
    pub scounteren: u64,
    pub senvcfg: u64,
    pub sscratch: u64,
    pub sepc: u64,
    pub scause: u64,
    pub stval: u64,
    pub satp: u64,
    pub stimecmp: u64,
    /// frm (bits 7:5) and fflags (4:0).
    pub fcsr: u64,
    pub pmpcfg: [u64; 8],
    pub pmpaddr: [u64; 64],
    /// minstret/mcycle = instret + offset.
    pub instret_offset: u64,
    pub mhartid: u64,
}

impl Csrs {
    pub fn new(hartid: usize) -> Self {
        Self {
            mstatus: MSTATUS_XL,
            medeleg: 0,
            mideleg: 0,
            mie: 0,
            mip: 0,
            mtvec: 0,
            mcounteren: 0,
            menvcfg: 0,
            mcountinhibit: 0,
            mscratch: 0,
            mepc: 0,
            mcause: 0,
            mtval: 0,
            stvec: 0,
            scounteren: 0,
            senvcfg: 0,
            sscratch: 0,
            sepc: 0,
            scause: 0,
            stval: 0,
            satp: 0,
            stimecmp: u64::MAX,
            fcsr: 0,
            pmpcfg: [0; 8],
            pmpaddr: [0; 64],
            instret_offset: 0,
            mhartid: hartid as u64,
        }
    }
}

/// Checks CSR values from outside (a snapshot) against what the guest could have written
/// through the WARL masks: anything else is refused, so the interpreter only ever runs with
/// values it can produce itself. Names the first register that is wrong.
pub(crate) fn check(c: &Csrs, hartid: usize) -> Result<(), String> {
    let mpp = (c.mstatus & MSTATUS_MPP) >> 11;
    let checks: [(&str, bool); 18] = [
        (
            "mstatus",
            c.mstatus & !(MSTATUS_WMASK | MSTATUS_XL) == 0
                && c.mstatus & MSTATUS_XL == MSTATUS_XL
                && mpp != 2,
        ),
        ("medeleg", c.medeleg & !MEDELEG_MASK == 0),
        ("mideleg", c.mideleg & !S_INTS == 0),
        ("mie", c.mie & !ALL_INTS == 0),
        ("mip", c.mip & !S_INTS == 0),
        ("mtvec", c.mtvec & 2 == 0),
        ("stvec", c.stvec & 2 == 0),
        ("mcounteren", c.mcounteren >> 32 == 0),
        ("scounteren", c.scounteren >> 32 == 0),
        ("menvcfg", c.menvcfg & !(MENVCFG_STCE | 1) == 0),
        ("senvcfg", c.senvcfg & !1 == 0),
        ("mcountinhibit", c.mcountinhibit & !0xffff_fffd == 0),
        ("mepc", c.mepc & 1 == 0),
        ("sepc", c.sepc & 1 == 0),
        (
            "satp",
            matches!(
                c.satp >> 60,
                SATP_MODE_BARE | SATP_MODE_SV39 | SATP_MODE_SV48
            ),
        ),
        ("fcsr", c.fcsr >> 8 == 0),
        ("pmpaddr", c.pmpaddr.iter().all(|a| a >> 54 == 0)),
        ("mhartid", c.mhartid == hartid as u64),
    ];
    match checks.iter().find(|(_, ok)| !ok) {
        Some((name, _)) => Err(format!("{name} holds a value the hart cannot have")),
        None => Ok(()),
    }
}

/// CSR numbers.
pub mod num {
    pub const FFLAGS: u16 = 0x001;
    pub const FRM: u16 = 0x002;
    pub const FCSR: u16 = 0x003;
    pub const CYCLE: u16 = 0xc00;
    pub const TIME: u16 = 0xc01;
    pub const INSTRET: u16 = 0xc02;
    pub const SSTATUS: u16 = 0x100;
    pub const SIE: u16 = 0x104;
    pub const STVEC: u16 = 0x105;
    pub const SCOUNTEREN: u16 = 0x106;
    pub const SENVCFG: u16 = 0x10a;
    pub const SSCRATCH: u16 = 0x140;
    pub const SEPC: u16 = 0x141;
    pub const SCAUSE: u16 = 0x142;
    pub const STVAL: u16 = 0x143;
    pub const SIP: u16 = 0x144;
    pub const STIMECMP: u16 = 0x14d;
    pub const SATP: u16 = 0x180;
    pub const MVENDORID: u16 = 0xf11;
    pub const MARCHID: u16 = 0xf12;
    pub const MIMPID: u16 = 0xf13;
    pub const MHARTID: u16 = 0xf14;
    pub const MCONFIGPTR: u16 = 0xf15;
    pub const MSTATUS: u16 = 0x300;
    pub const MISA: u16 = 0x301;
    pub const MEDELEG: u16 = 0x302;
    pub const MIDELEG: u16 = 0x303;
    pub const MIE: u16 = 0x304;
    pub const MTVEC: u16 = 0x305;
    pub const MCOUNTEREN: u16 = 0x306;
    pub const MENVCFG: u16 = 0x30a;
    pub const MCOUNTINHIBIT: u16 = 0x320;
    pub const MSCRATCH: u16 = 0x340;
    pub const MEPC: u16 = 0x341;
    pub const MCAUSE: u16 = 0x342;
    pub const MTVAL: u16 = 0x343;
    pub const MIP: u16 = 0x344;
    pub const MCYCLE: u16 = 0xb00;
    pub const MINSTRET: u16 = 0xb02;
}

impl Hart {
    fn fs_enabled(&self) -> bool {
        self.csr.mstatus & MSTATUS_FS != 0
    }

    /// Marks the FPU state dirty (FS = 3), as every instruction writing f-regs or fflags must.
    #[inline(always)]
    pub(crate) fn fs_dirty(&mut self) {
        self.csr.mstatus |= MSTATUS_FS;
    }

    fn counter_allowed(&self, bit: u64) -> bool {
        match self.prv {
            PRV_M => true,
            PRV_S => self.csr.mcounteren >> bit & 1 != 0,
            _ => self.csr.mcounteren >> bit & 1 != 0 && self.csr.scounteren >> bit & 1 != 0,
        }
    }

    fn mstatus_read(&self) -> u64 {
        let s = self.csr.mstatus | MSTATUS_XL;
        if s & MSTATUS_FS == MSTATUS_FS {
            s | MSTATUS_SD
        } else {
            s
        }
    }

    /// Reads a CSR; `Err` is the illegal-instruction trap (tval filled by the caller).
    pub(crate) fn csr_read(&self, csr: u16) -> Result<u64, ()> {
        use num::*;
        if (csr >> 8) as u8 & 3 > self.prv {
            return Err(());
        }
        Ok(match csr {
            FFLAGS | FRM | FCSR if !self.fs_enabled() => return Err(()),
            FFLAGS => self.csr.fcsr & 0x1f,
            FRM => (self.csr.fcsr >> 5) & 7,
            FCSR => self.csr.fcsr & 0xff,
            CYCLE | INSTRET if self.counter_allowed((csr & 0x1f) as u64) => {
                self.instret.wrapping_add(self.csr.instret_offset)
            }
            TIME if self.counter_allowed(1) => self.shared.clock.ticks(),
            0xc03..=0xc1f if self.counter_allowed((csr & 0x1f) as u64) => 0,
            SSTATUS => self.mstatus_read() & (SSTATUS_MASK | MSTATUS_XL | MSTATUS_SD),
            SIE => self.csr.mie & self.csr.mideleg,
            STVEC => self.csr.stvec,
            SCOUNTEREN => self.csr.scounteren,
            SENVCFG => self.csr.senvcfg,
            SSCRATCH => self.csr.sscratch,
            SEPC => self.csr.sepc,
            SCAUSE => self.csr.scause,
            STVAL => self.csr.stval,
            SIP => self.mip() & self.csr.mideleg,
            STIMECMP => {
                if !self.stimecmp_allowed() {
                    return Err(());
                }
                self.csr.stimecmp
            }
            SATP => {
                if self.prv == PRV_S && self.csr.mstatus & MSTATUS_TVM != 0 {
                    return Err(());
                }
                self.csr.satp
            }
            MVENDORID | MARCHID | MIMPID | MCONFIGPTR => 0u64,
            MHARTID => self.csr.mhartid,
            MSTATUS => self.mstatus_read(),
            num::MISA => MISA_VALUE,
            MEDELEG => self.csr.medeleg,
            MIDELEG => self.csr.mideleg,
            MIE => self.csr.mie,
            MTVEC => self.csr.mtvec,
            MCOUNTEREN => self.csr.mcounteren,
            MENVCFG => self.csr.menvcfg,
            MCOUNTINHIBIT => self.csr.mcountinhibit,
            MSCRATCH => self.csr.mscratch,
            MEPC => self.csr.mepc,
            MCAUSE => self.csr.mcause,
            MTVAL => self.csr.mtval,
            MIP => self.mip(),
            MCYCLE | MINSTRET => self.instret.wrapping_add(self.csr.instret_offset),
            0xb03..=0xb1f | 0x323..=0x33f => 0,
            0x3a0..=0x3af if csr & 1 == 0 => self.csr.pmpcfg[((csr - 0x3a0) / 2) as usize],
            0x3b0..=0x3ef => self.csr.pmpaddr[(csr - 0x3b0) as usize],
            _ => return Err(()),
        })
    }

    fn stimecmp_allowed(&self) -> bool {
        match self.prv {
            PRV_M => true,
            PRV_S => self.csr.menvcfg & MENVCFG_STCE != 0 && self.csr.mcounteren & 2 != 0,
            _ => false,
        }
    }

    /// Writes a CSR (after `csr_read` succeeded for the same number, so privilege is checked).
    pub(crate) fn csr_write(&mut self, csr: u16, v: u64) -> Result<(), ()> {
        use num::*;
        if csr >> 10 == 3 {
            return Err(()); // read-only space
        }
        match csr {
            FFLAGS => {
                self.csr.fcsr = (self.csr.fcsr & !0x1f) | (v & 0x1f);
                self.fs_dirty();
            }
            FRM => {
                self.csr.fcsr = (self.csr.fcsr & 0x1f) | ((v & 7) << 5);
                self.fs_dirty();
            }
            FCSR => {
                self.csr.fcsr = v & 0xff;
                self.fs_dirty();
            }
            SSTATUS => {
                let m = (self.csr.mstatus & !SSTATUS_MASK) | (v & SSTATUS_MASK);
                self.set_mstatus(m);
            }
            SIE => {
                let d = self.csr.mideleg;
                self.csr.mie = (self.csr.mie & !d) | (v & d);
                self.break_slice = true;
            }
            STVEC => self.csr.stvec = v & !2,
            SCOUNTEREN => self.csr.scounteren = v & 0xffff_ffff,
            SENVCFG => self.csr.senvcfg = v & 1,
            SSCRATCH => self.csr.sscratch = v,
            SEPC => self.csr.sepc = v & !1,
            SCAUSE => self.csr.scause = v,
            STVAL => self.csr.stval = v,
            SIP => {
                let m = self.csr.mideleg & MIP_SSIP;
                self.csr.mip = (self.csr.mip & !m) | (v & m);
                self.break_slice = true;
            }
            STIMECMP => {
                self.csr.stimecmp = v;
                self.break_slice = true;
            }
            SATP => {
                let mode = v >> 60;
                if mode == SATP_MODE_BARE || mode == SATP_MODE_SV39 || mode == SATP_MODE_SV48 {
                    // ASIDs are not tagged in the TLB: every satp write flushes it.
                    self.csr.satp = v;
                    self.counters.bump(crate::counters::Ev::SatpWrites);
                    self.flush_tlb();
                }
            }
            MSTATUS => self.set_mstatus(v),
            num::MISA => {}
            MEDELEG => self.csr.medeleg = v & MEDELEG_MASK,
            MIDELEG => {
                self.csr.mideleg = v & S_INTS;
                self.break_slice = true;
            }
            MIE => {
                self.csr.mie = v & ALL_INTS;
                self.break_slice = true;
            }
            MTVEC => self.csr.mtvec = v & !2,
            MCOUNTEREN => self.csr.mcounteren = v & 0xffff_ffff,
            MENVCFG => {
                self.csr.menvcfg = v & (MENVCFG_STCE | 1);
                self.break_slice = true;
            }
            MCOUNTINHIBIT => self.csr.mcountinhibit = v & 0xffff_fffd,
            MSCRATCH => self.csr.mscratch = v,
            MEPC => self.csr.mepc = v & !1,
            MCAUSE => self.csr.mcause = v,
            MTVAL => self.csr.mtval = v,
            MIP => {
                // With Sstc, STIP reflects stimecmp and is not writable.
                let mut m = S_INTS;
                if self.csr.menvcfg & MENVCFG_STCE != 0 {
                    m &= !MIP_STIP;
                }
                self.csr.mip = (self.csr.mip & !m) | (v & m);
                self.break_slice = true;
            }
            MCYCLE | MINSTRET => self.csr.instret_offset = v.wrapping_sub(self.instret),
            0xb03..=0xb1f | 0x323..=0x33f => {}
            // PMP is accepted but not enforced (documented in the crate docs).
            0x3a0..=0x3af => self.csr.pmpcfg[((csr - 0x3a0) / 2) as usize] = v,
            0x3b0..=0x3ef => self.csr.pmpaddr[(csr - 0x3b0) as usize] = v & ((1 << 54) - 1),
            _ => return Err(()),
        }
        Ok(())
    }

    fn set_mstatus(&mut self, v: u64) {
        let old = self.csr.mstatus;
        let mut n = (old & !MSTATUS_WMASK) | (v & MSTATUS_WMASK);
        // MPP is WARL: the reserved value 2 keeps the previous mode.
        if n & MSTATUS_MPP == 2 << 11 {
            n = (n & !MSTATUS_MPP) | (old & MSTATUS_MPP);
        }
        self.csr.mstatus = n | MSTATUS_XL;
        let changed = old ^ n;
        if changed & MSTATUS_MXR != 0 {
            self.flush_tlb();
        } else if changed & (MSTATUS_SUM | MSTATUS_MPRV | MSTATUS_MPP) != 0 {
            self.update_data_ctx();
        }
        if changed & (MSTATUS_MIE | MSTATUS_SIE) != 0 {
            self.break_slice = true;
        }
    }

    /// mret: return to MPP with MIE = MPIE.
    pub(crate) fn mret(&mut self) -> Result<(), Trap> {
        let s = self.csr.mstatus;
        let mpp = ((s >> 11) & 3) as u8;
        let mut n = s & !(MSTATUS_MIE | MSTATUS_MPP);
        n |= ((s >> 7) & 1) << 3;
        n |= MSTATUS_MPIE;
        if mpp != PRV_M {
            n &= !MSTATUS_MPRV;
        }
        self.csr.mstatus = n;
        self.pc = self.csr.mepc;
        self.set_prv(mpp);
        self.break_slice = true;
        Ok(())
    }

    /// sret: return to SPP with SIE = SPIE.
    pub(crate) fn sret(&mut self, bits: u64) -> Result<(), Trap> {
        if self.prv == PRV_U || (self.prv == PRV_S && self.csr.mstatus & MSTATUS_TSR != 0) {
            return Err(Trap::illegal(bits));
        }
        let s = self.csr.mstatus;
        let spp = if s & MSTATUS_SPP != 0 { PRV_S } else { PRV_U };
        let mut n = s & !(MSTATUS_SIE | MSTATUS_SPP);
        n |= ((s >> 5) & 1) << 1;
        n |= MSTATUS_SPIE;
        n &= !MSTATUS_MPRV;
        self.csr.mstatus = n;
        self.pc = self.csr.sepc;
        self.set_prv(spp);
        self.break_slice = true;
        Ok(())
    }
}

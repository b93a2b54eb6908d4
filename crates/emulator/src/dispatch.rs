//! The completion pipeline: fetch the instruction bytes (through the guest's page tables, or
//! KVM's copy), decode them with iced-x86, run the handler, and turn the outcome into a
//! [`Completion`] or an [`EmulationError`].

use iced_x86::{Decoder, DecoderError, DecoderOptions, FastFormatter, Instruction, Mnemonic};

use crate::access::{Ctx, is_canonical};
use crate::cpu::{CpuState, Mode, Seg, bitness, bits, mode};
use crate::error::{Completion, EmulationError, Exception, Stop};
use crate::insn::random::Source;
use crate::insn::{Outcome, atomic, bits as bitops, control, random};
use crate::mem::GuestPhysMemory;
use crate::paging::{AccessKind, PAGE_SIZE, Paging};
use crate::stats::Stats;

/// The longest legal x86 instruction; longer ones raise #GP(0).
pub(crate) const MAX_INSN_LEN: usize = 15;

/// Bytes fetched at RIP: `len` valid bytes, and the fault that stopped the fetch early, if any
/// (reported only if the decoder needed the missing bytes, as on hardware).
struct Fetched {
    bytes: [u8; MAX_INSN_LEN],
    len: usize,
    fault: Option<Stop>,
}

/// The linear address of RIP and how many instruction bytes the code segment allows there
/// (#GP(0) for a non-canonical RIP or one beyond the CS limit).
fn code_window(ctx: &Ctx<'_>, rip: u64) -> Result<(u64, usize), Stop> {
    if ctx.mode == Mode::Long64 {
        let la57 = ctx.paging.cr4 & bits::CR4_LA57 != 0;
        if !is_canonical(rip, la57) {
            return Err(Exception::gp0().into());
        }
        return Ok((rip, MAX_INSN_LEN));
    }
    let cs = ctx.cpu.segment(Seg::Cs);
    let eip = rip & 0xffff_ffff;
    if eip > u64::from(cs.limit) {
        return Err(Exception::gp0().into());
    }
    let room = u64::from(cs.limit) - eip + 1;
    let avail = usize::try_from(room.min(MAX_INSN_LEN as u64)).unwrap_or(MAX_INSN_LEN);
    Ok((cs.base.wrapping_add(eip) & 0xffff_ffff, avail))
}

fn fetch(ctx: &mut Ctx<'_>, linear: u64, mut avail: usize) -> Result<Fetched, Stop> {
    let mut f = Fetched {
        bytes: [0; MAX_INSN_LEN],
        len: 0,
        fault: None,
    };
    while avail > 0 {
        let at = linear.wrapping_add(f.len as u64);
        let in_page = (PAGE_SIZE - (at & (PAGE_SIZE - 1))) as usize;
        let n = in_page.min(avail);
        let mut chunk = [0u8; MAX_INSN_LEN];
        match ctx
            .paging
            .read(ctx.mem, at, &mut chunk[..n], AccessKind::Fetch)
        {
            Ok(()) => {
                f.bytes[f.len..f.len + n].copy_from_slice(&chunk[..n]);
                f.len += n;
                avail -= n;
            }
            Err(e) if f.len == 0 => return Err(e),
            Err(e) => {
                f.fault = Some(e);
                break;
            }
        }
    }
    Ok(f)
}

/// Decodes `bytes`; `Ok(None)` if more bytes are needed.
fn decode(bits: u32, rip: u64, bytes: &[u8]) -> Result<Option<Instruction>, Exception> {
    let mut d = Decoder::with_ip(bits, bytes, rip, DecoderOptions::NONE);
    let insn = d.decode();
    if !insn.is_invalid() {
        return Ok(Some(insn));
    }
    match d.last_error() {
        DecoderError::NoMoreBytes if bytes.len() < MAX_INSN_LEN => Ok(None),
        // Fifteen bytes without a complete instruction: too long, #GP(0).
        DecoderError::NoMoreBytes => Err(Exception::gp0()),
        _ => Err(Exception::ud()),
    }
}

type Handler = fn(&mut Ctx<'_>, &Instruction) -> Result<Outcome, Stop>;

/// The handler and statistics name for an instruction, or `None` if unsupported.
fn handler_for(insn: &Instruction) -> Option<(&'static str, Handler)> {
    Some(match insn.mnemonic() {
        Mnemonic::Int3 => ("int3", |_, _| control::int3()),
        Mnemonic::Ud0 => ("ud0", |_, _| control::ud2()),
        Mnemonic::Ud1 => ("ud1", |_, _| control::ud2()),
        Mnemonic::Ud2 => ("ud2", |_, _| control::ud2()),
        Mnemonic::Mfence => ("mfence", |_, _| control::mfence()),
        Mnemonic::Lfence => ("lfence", |_, _| control::lfence()),
        Mnemonic::Sfence => ("sfence", |_, _| control::sfence()),
        Mnemonic::Wait => ("fwait", |c, _| control::fwait(c)),
        Mnemonic::Pause => ("pause", |_, _| control::pause()),
        Mnemonic::Nop | Mnemonic::Reservednop => ("nop", |_, _| control::nop()),
        Mnemonic::Endbr32 => ("endbr32", |_, _| control::nop()),
        Mnemonic::Endbr64 => ("endbr64", |_, _| control::nop()),
        Mnemonic::Prefetch
        | Mnemonic::Prefetchw
        | Mnemonic::Prefetchwt1
        | Mnemonic::Prefetchnta
        | Mnemonic::Prefetcht0
        | Mnemonic::Prefetcht1
        | Mnemonic::Prefetcht2
        | Mnemonic::Prefetchit0
        | Mnemonic::Prefetchit1 => ("prefetch", |_, _| control::nop()),
        Mnemonic::Clflush => ("clflush", control::cache_flush),
        Mnemonic::Clflushopt => ("clflushopt", control::cache_flush),
        Mnemonic::Clwb => ("clwb", control::cache_flush),
        Mnemonic::Popcnt => ("popcnt", bitops::popcnt),
        Mnemonic::Lzcnt => ("lzcnt", bitops::lzcnt),
        Mnemonic::Tzcnt => ("tzcnt", bitops::tzcnt),
        Mnemonic::Movbe => ("movbe", bitops::movbe),
        Mnemonic::Crc32 => ("crc32", bitops::crc32),
        Mnemonic::Cmpxchg8b => ("cmpxchg8b", atomic::cmpxchg8b),
        Mnemonic::Cmpxchg16b => ("cmpxchg16b", atomic::cmpxchg16b),
        Mnemonic::Rdrand => ("rdrand", |c, i| random::rdrand(c, i, Source::Rdrand)),
        Mnemonic::Rdseed => ("rdseed", |c, i| random::rdrand(c, i, Source::Rdseed)),
        _ => return None,
    })
}

fn inject(e: Exception) -> Completion {
    Completion::Inject {
        vector: e.vector,
        error_code: e.error_code,
        cr2: e.cr2,
    }
}

/// Completes the instruction at the vCPU's RIP; see the crate documentation.
pub(crate) fn run(
    cpu: &mut dyn CpuState,
    mem: &mut dyn GuestPhysMemory,
    hint: Option<&[u8]>,
    stats: &mut Stats,
) -> Result<Completion, EmulationError> {
    let vcpu = cpu.vcpu_index();
    let rip = cpu.rip();
    let m = mode(cpu);
    let bits = bitness(cpu, m);
    let paging = Paging::capture(cpu);
    let mut ctx = Ctx {
        cpu,
        mem,
        mode: m,
        paging,
    };
    let fail = |stats: &mut Stats, stop: Stop| match stop {
        Stop::Exception(e) => {
            stats.record_exception();
            Ok(inject(e))
        }
        Stop::NotRam {
            what,
            gpa,
            len,
            source,
        } => {
            stats.record_failure();
            Err(EmulationError::NotRam {
                vcpu,
                rip,
                what,
                gpa,
                len,
                source,
            })
        }
    };

    let (linear, avail) = match code_window(&ctx, rip) {
        Ok(w) => w,
        Err(stop) => return fail(stats, stop),
    };
    // KVM's copy of the bytes, when it gave one that decodes completely within the code
    // segment, saves the walk.
    let from_hint = hint
        .filter(|h| !h.is_empty())
        .and_then(|h| decode(bits, rip, &h[..h.len().min(avail)]).ok().flatten())
        .map(|insn| {
            let mut b = [0u8; MAX_INSN_LEN];
            let n = insn.len().min(MAX_INSN_LEN);
            if let Some(h) = hint {
                b[..n].copy_from_slice(&h[..n]);
            }
            (insn, b, n)
        });
    let (insn, bytes, len) = match from_hint {
        Some(x) => x,
        None => {
            let f = match fetch(&mut ctx, linear, avail) {
                Ok(f) => f,
                Err(stop) => return fail(stats, stop),
            };
            match decode(bits, rip, &f.bytes[..f.len]) {
                Ok(Some(insn)) => (insn, f.bytes, f.len),
                Ok(None) => {
                    let stop = f.fault.unwrap_or_else(|| Exception::gp0().into());
                    return fail(stats, stop);
                }
                Err(e) => return fail(stats, e.into()),
            }
        }
    };

    let Some((name, handler)) = handler_for(&insn) else {
        stats.record_failure();
        let mut text = String::new();
        FastFormatter::new().format(&insn, &mut text);
        return Err(EmulationError::Unsupported {
            vcpu,
            rip,
            bytes,
            len: u8::try_from(insn.len().min(len)).unwrap_or(MAX_INSN_LEN as u8),
            mnemonic: text,
        });
    };
    stats.record(name);

    let next = match bits {
        64 => rip.wrapping_add(insn.len() as u64),
        32 => rip.wrapping_add(insn.len() as u64) & 0xffff_ffff,
        _ => rip.wrapping_add(insn.len() as u64) & 0xffff,
    };
    let finish = |ctx: &mut Ctx<'_>| {
        ctx.cpu.set_rip(next);
        // A completed instruction clears RF (it only suppresses one instruction breakpoint).
        let f = ctx.cpu.rflags();
        ctx.cpu.set_rflags(f & !bits::RFLAGS_RF);
    };
    match handler(&mut ctx, &insn) {
        Ok(Outcome::Done) => {
            finish(&mut ctx);
            Ok(Completion::Done)
        }
        Ok(Outcome::Trap(e)) => {
            finish(&mut ctx);
            stats.record_exception();
            Ok(inject(e))
        }
        Err(stop) => fail(stats, stop),
    }
}

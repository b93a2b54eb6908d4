//! Instructions with no data effect on guest state: `int3`, `ud2`, the fences, `fwait`,
//! `pause`, the NOP family (including `endbr32/64` and prefetch hints) and cache-line flushes.

use iced_x86::Instruction;

use super::Outcome;
use crate::access::Ctx;
use crate::cpu::bits;
use crate::error::{Exception, Stop, vector};
use crate::paging::AccessKind;

/// `int3`: a trap; the guest's #BP handler sees the address after the instruction, which is
/// what Linux's live patching (`text_poke_bp`) and its int3 self-test rely on.
pub(crate) fn int3() -> Result<Outcome, Stop> {
    Ok(Outcome::Trap(Exception {
        vector: vector::BP,
        error_code: None,
        cr2: None,
    }))
}

/// `ud2`: always #UD, a fault (RIP stays); Linux's `BUG()` and `WARN()` use it.
pub(crate) fn ud2() -> Result<Outcome, Stop> {
    Err(Exception::ud().into())
}

/// The guest's barrier must order its memory accesses against other vCPUs. The exit to the
/// monitor already serialises this vCPU; the host fence of the same kind completes the
/// guarantee for anything the monitor itself wrote (e.g. an emulated store just before).
pub(crate) fn mfence() -> Result<Outcome, Stop> {
    host_fence(Fence::M);
    Ok(Outcome::Done)
}

pub(crate) fn lfence() -> Result<Outcome, Stop> {
    host_fence(Fence::L);
    Ok(Outcome::Done)
}

pub(crate) fn sfence() -> Result<Outcome, Stop> {
    host_fence(Fence::S);
    Ok(Outcome::Done)
}

enum Fence {
    M,
    L,
    S,
}

fn host_fence(kind: Fence) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_mm_lfence, _mm_mfence, _mm_sfence};
        match kind {
            // SAFETY: SSE and SSE2 are part of the x86_64 baseline, so every CPU this code
            // runs on has these instructions; they only order memory accesses.
            Fence::M => unsafe { _mm_mfence() },
            // SAFETY: as above (SSE2 baseline).
            Fence::L => unsafe { _mm_lfence() },
            // SAFETY: as above (SSE baseline).
            Fence::S => unsafe { _mm_sfence() },
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = kind;
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
    }
}

/// `wait`/`fwait`: #NM when CR0.MP and CR0.TS are both set (lazy FPU switching); otherwise it
/// would raise a pending unmasked x87 exception (#MF). The completer cannot see the x87 status
/// word (KVM keeps it in the FPU state, not the registers we get), so it treats that case as
/// absent: modern kernels keep x87 exceptions masked, making `fwait` a no-op.
pub(crate) fn fwait(ctx: &Ctx<'_>) -> Result<Outcome, Stop> {
    let cr0 = ctx.paging.cr0;
    if cr0 & bits::CR0_MP != 0 && cr0 & bits::CR0_TS != 0 {
        return Err(Exception::nm().into());
    }
    Ok(Outcome::Done)
}

/// `pause`: a spin-loop hint; give the host core the same hint.
pub(crate) fn pause() -> Result<Outcome, Stop> {
    std::hint::spin_loop();
    Ok(Outcome::Done)
}

/// NOPs, `endbr32/64` (a NOP without CET enforcement, which KVM does not expose here), and
/// prefetch hints (which never fault, even on a bad address).
pub(crate) fn nop() -> Result<Outcome, Stop> {
    Ok(Outcome::Done)
}

/// `clflush`/`clflushopt`/`clwb`: guest RAM is ordinary coherent host memory, so there is
/// nothing to flush, but the instruction faults like a one-byte load, which we check.
pub(crate) fn cache_flush(ctx: &mut Ctx<'_>, insn: &Instruction) -> Result<Outcome, Stop> {
    let lin = ctx.linear(insn, 1, AccessKind::Read)?;
    ctx.paging.translate(ctx.mem, lin, AccessKind::Read)?;
    Ok(Outcome::Done)
}

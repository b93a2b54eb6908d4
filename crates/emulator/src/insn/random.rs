//! `rdrand` and `rdseed`, answered from the host's own instruction.
//!
//! On success: destination = random value, CF = 1. When the host has no value ready (or lacks
//! the instruction), the architectural "try again" answer: destination = 0, CF = 0; guests loop
//! on CF. OF, SF, ZF, AF, PF are cleared either way.

use iced_x86::Instruction;

use super::Outcome;
use crate::access::Ctx;
use crate::cpu::bits::{RFLAGS_CF, RFLAGS_STATUS};
use crate::error::Stop;

/// How many host attempts per guest instruction: each guest retry costs an exit, far more than
/// a host retry.
const HOST_ATTEMPTS: usize = 8;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Source {
    Rdrand,
    Rdseed,
}

pub(crate) fn rdrand(
    ctx: &mut Ctx<'_>,
    insn: &Instruction,
    source: Source,
) -> Result<Outcome, Stop> {
    let value = (0..HOST_ATTEMPTS).find_map(|_| host_random(source));
    let dest = insn.op_register(0);
    ctx.write_reg(dest, value.unwrap_or(0));
    let cf = if value.is_some() { RFLAGS_CF } else { 0 };
    ctx.set_status_flags(RFLAGS_STATUS, cf);
    Ok(Outcome::Done)
}

#[cfg(target_arch = "x86_64")]
fn host_random(source: Source) -> Option<u64> {
    match source {
        Source::Rdrand if std::arch::is_x86_feature_detected!("rdrand") => {
            // SAFETY: the CPU supports RDRAND (checked just above), which is all the
            // target-feature function requires; it only writes its local out-parameter.
            unsafe { rdrand64() }
        }
        Source::Rdseed if std::arch::is_x86_feature_detected!("rdseed") => {
            // SAFETY: the CPU supports RDSEED (checked just above).
            unsafe { rdseed64() }
        }
        _ => None,
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn host_random(_source: Source) -> Option<u64> {
    None
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "rdrand")]
fn rdrand64() -> Option<u64> {
    let mut v = 0u64;
    (std::arch::x86_64::_rdrand64_step(&mut v) == 1).then_some(v)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "rdseed")]
fn rdseed64() -> Option<u64> {
    let mut v = 0u64;
    (std::arch::x86_64::_rdseed64_step(&mut v) == 1).then_some(v)
}

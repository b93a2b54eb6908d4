//! Instruction families the completer performs, one module each. Every handler returns what
//! happens next: finish (advance RIP), or trap after advancing; faults come back as
//! [`Stop::Exception`](crate::error::Stop) with RIP untouched.

pub(crate) mod atomic;
pub(crate) mod bits;
pub(crate) mod control;
pub(crate) mod random;

use crate::error::Exception;

/// What a handler asks the dispatcher to do after the instruction ran.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// Advance RIP past the instruction.
    Done,
    /// Advance RIP past the instruction, then deliver this exception (trap class, e.g. #BP).
    Trap(Exception),
}

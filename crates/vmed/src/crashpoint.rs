//! Named points where a test can make the daemon die as if killed -9, to prove that every
//! half-done operation is settled by the next daemon (see [`crate::reconcile`]). Armed only
//! by the environment variable `VMED_TEST_CRASH_AT=POINT` (one point name); unset, each point
//! costs one comparison.

use std::sync::OnceLock;

/// Every point, so a test can name them all and a typo in one is refused at startup.
pub const POINTS: &[&str] = &[
    "create:after-insert",
    "start:after-transition",
    "start:after-spawn",
    "start:before-running",
    "stop:after-transition",
    "stop:after-request",
    "stop:after-exit",
    "delete:after-remove-files",
    "image-import:mid-blob",
    "image-import:before-commit",
];

const VAR: &str = "VMED_TEST_CRASH_AT";

fn armed() -> Option<&'static str> {
    static ARMED: OnceLock<Option<String>> = OnceLock::new();
    ARMED
        .get_or_init(|| std::env::var(VAR).ok().filter(|p| !p.is_empty()))
        .as_deref()
}

/// Checks the variable at startup: a point that does not exist would never fire and make a
/// crash test pass for the wrong reason.
pub fn check() -> Result<(), String> {
    match armed() {
        Some(p) if !POINTS.contains(&p) => Err(format!(
            "{VAR}={p} names no crash point; use one of: {}",
            POINTS.join(", ")
        )),
        _ => Ok(()),
    }
}

/// Dies with SIGKILL here when this point is armed: no destructor, no flush, like kill -9.
pub fn hit(point: &'static str) {
    debug_assert!(POINTS.contains(&point), "unlisted crash point {point}");
    if armed() == Some(point) {
        eprintln!("vmed: {VAR}={point}: dying here");
        // SAFETY: kill(2) on our own pid with plain integers; it touches no memory.
        unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
    }
}

//! Taps stay open for the life of the monitor. A tap the monitor created disappears with its
//! last descriptor, and with it its host-side setup (addresses, bridge membership); a guest
//! reboot with `--on-reboot restart` rebuilds the devices, so the monitor keeps one handle
//! of each tap here and gives the rebuilt device another handle on the same tap.

use std::sync::Mutex;
use vme_devices::net::{Tap, TapError};

static OPEN: Mutex<Vec<Tap>> = Mutex::new(Vec::new());

/// A handle on tap `name`: the one opened before in this process, or a newly opened one.
pub fn open(name: &str) -> Result<Tap, TapError> {
    let mut open = OPEN.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(kept) = open.iter().find(|t| t.name() == name) {
        // Forget what the previous guest negotiated; the new driver sets its own offloads.
        let tap = kept.try_clone()?;
        tap.set_offload(0)?;
        return Ok(tap);
    }
    let tap = Tap::open(name)?;
    open.push(tap.try_clone()?);
    Ok(tap)
}

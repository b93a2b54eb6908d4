//! The virtio-vsock device of a machine: its guest CID and the host Unix socket its
//! connections go through (Firecracker's convention; see the monitor's devices).

use crate::spec::SpecError;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::str::FromStr;

/// `cid` when `--vsock` gave only a socket path (0 is reserved: no VM has it).
pub const CID_UNSET: u64 = 0;

/// Longest socket path we accept: the monitor also binds `PATH_<port>` names (up to 11 more
/// bytes) and `sun_path` holds 107.
pub const MAX_UDS_PATH_LEN: usize = 96;

/// `cid=N,uds=PATH` on the command line; a `[vsock]` table in a machine file. With
/// `--restore`, `uds=PATH` alone keeps the snapshot's CID (or, with `--clone`, draws a new
/// one): the parser then leaves `cid` at [`CID_UNSET`], which [`VsockSpec::validate`]
/// refuses, so a VM never runs with it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VsockSpec {
    /// The guest's context ID, 3 to 4294967294 (0–2 are reserved, 2 is the host).
    pub cid: u64,
    /// Host programs connect here and write `CONNECT <port>\n`; guest connections to host
    /// port P go to `<uds>_P`.
    pub uds: PathBuf,
}

impl VsockSpec {
    pub fn validate(&self) -> Result<(), SpecError> {
        if self.cid == CID_UNSET {
            return Err(SpecError(
                "the vsock device has no cid: give cid=N (3 to 4294967294); only a restore \
                 may leave it out"
                    .into(),
            ));
        }
        if !(3..u64::from(u32::MAX)).contains(&self.cid) {
            return Err(SpecError(format!(
                "vsock cid {} is reserved or too large: use 3 to 4294967294",
                self.cid
            )));
        }
        let len = self.uds.as_os_str().len();
        if len == 0 {
            return Err(SpecError("vsock uds path is empty: give uds=PATH".into()));
        }
        if len > MAX_UDS_PATH_LEN {
            return Err(SpecError(format!(
                "vsock uds path {} is {len} bytes; at most {MAX_UDS_PATH_LEN} fit a Unix \
                 socket address: use a shorter path",
                self.uds.display()
            )));
        }
        Ok(())
    }
}

impl FromStr for VsockSpec {
    type Err = SpecError;
    fn from_str(s: &str) -> Result<Self, SpecError> {
        let mut spec = VsockSpec::default();
        let mut uds = false;
        for item in s.split(',') {
            match item.split_once('=') {
                Some(("cid", v)) => {
                    spec.cid = v.parse().map_err(|_| {
                        SpecError(format!("vsock cid {v:?} is not a number: use e.g. cid=3"))
                    })?;
                    if spec.cid == CID_UNSET {
                        return Err(SpecError(
                            "vsock cid 0 is reserved: use 3 to 4294967294".into(),
                        ));
                    }
                }
                Some(("uds", v)) => {
                    spec.uds = PathBuf::from(v);
                    uds = true;
                }
                _ => {
                    return Err(SpecError(format!(
                        "invalid vsock option {item:?} in {s:?}: use cid=N,uds=PATH"
                    )));
                }
            }
        }
        if !uds {
            return Err(SpecError(format!("vsock {s:?} needs uds=PATH")));
        }
        // Without a cid, only the path is checked here; the machine's validation refuses
        // the missing cid unless a restore fills it in.
        let check = VsockSpec {
            cid: if spec.cid == CID_UNSET { 3 } else { spec.cid },
            uds: spec.uds.clone(),
        };
        check.validate()?;
        Ok(spec)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_validates() {
        let v: VsockSpec = "cid=3,uds=/run/v.sock".parse().unwrap();
        assert_eq!((v.cid, v.uds.to_str().unwrap()), (3, "/run/v.sock"));
        for bad in [
            "cid=2,uds=/a",
            "cid=4294967295,uds=/a",
            "cid=x,uds=/a",
            "cid=3",
            "cid=0,uds=/a",
            "cid=3,uds=",
            "cid=3,uds=/a,extra=1",
        ] {
            assert!(bad.parse::<VsockSpec>().is_err(), "{bad} accepted");
        }
        let bare: VsockSpec = "uds=/a".parse().unwrap();
        assert_eq!(bare.cid, CID_UNSET, "a restore fills the cid in");
        let err = bare.validate().unwrap_err().to_string();
        assert!(err.contains("give cid=N"), "{err}");
        let long = format!("cid=3,uds=/{}", "a".repeat(MAX_UDS_PATH_LEN));
        let err = long.parse::<VsockSpec>().unwrap_err().to_string();
        assert!(err.contains("shorter path"), "{err}");
    }
}

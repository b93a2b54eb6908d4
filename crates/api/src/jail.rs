//! The monitor's jail (`[jail]` in a machine file, `vme-vmm --jail DIR`): where it confines
//! itself before the guest runs, and as whom. See docs/threat-model.md.

use crate::spec::SpecError;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// The uid and gid a jailed monitor runs as when none is given: `nobody`. The daemon always
/// gives each VM its own.
pub const DEFAULT_ID: u32 = 65534;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JailSpec {
    /// The jail's root: an absolute directory (created if missing) that the monitor
    /// `pivot_root`s into; the VM's files appear inside it at their host paths.
    pub dir: PathBuf,
    #[serde(default = "default_id")]
    pub uid: u32,
    #[serde(default = "default_id")]
    pub gid: u32,
    /// A network namespace to join (e.g. /run/netns/NAME); default: the host's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub netns: Option<PathBuf>,
}

fn default_id() -> u32 {
    DEFAULT_ID
}

impl JailSpec {
    pub fn new(dir: impl Into<PathBuf>) -> JailSpec {
        JailSpec {
            dir: dir.into(),
            uid: DEFAULT_ID,
            gid: DEFAULT_ID,
            netns: None,
        }
    }

    pub fn validate(&self) -> Result<(), SpecError> {
        if !self.dir.is_absolute() || self.dir.parent().is_none() {
            return Err(SpecError(format!(
                "jail directory {:?} must be an absolute path below / (e.g. /srv/vme/jail/vm1)",
                self.dir
            )));
        }
        if self.uid == 0 || self.gid == 0 {
            return Err(SpecError(
                "a jailed monitor may not run as uid or gid 0: give --jail-uid and --jail-gid \
                 of an unprivileged user"
                    .into(),
            ));
        }
        if self.uid == u32::MAX || self.gid == u32::MAX {
            return Err(SpecError(
                "uid/gid 4294967295 means \"none\" to the kernel: pick another".into(),
            ));
        }
        if self.netns.as_ref().is_some_and(|n| !n.is_absolute()) {
            return Err(SpecError(
                "the jail's network namespace must be an absolute path (e.g. /run/netns/NAME)"
                    .into(),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_jail_needs_an_absolute_dir_and_no_root_ids() {
        assert!(JailSpec::new("/srv/j").validate().is_ok());
        assert!(JailSpec::new("j").validate().is_err());
        assert!(JailSpec::new("/").validate().is_err());
        let mut j = JailSpec::new("/srv/j");
        j.uid = 0;
        assert!(j.validate().unwrap_err().0.contains("uid or gid 0"));
    }
}

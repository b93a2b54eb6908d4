//! Rate limits of disks and network devices as the spec states them, and their checks.
//!
//! A limit is a token bucket: a rate (bytes per second with the size suffixes of
//! [`ByteSize`], or operations per second) and a burst, the milliseconds of traffic at the
//! full rate that may go at once after a quiet time (default 100). A single request larger
//! than the burst still goes (when the bucket is full); the average rate holds.
//!
//! [`DeviceLimits`] are one device's limits as `status` shows them and `set-limit` changes
//! them while the VM runs, in the syntax of `--disk`/`--net` (`bw=20M,iops=off`).

use crate::size::{ByteSize, KIB, TIB};
use crate::spec::{DiskSpec, NetSpec, SpecError};
use serde::{Deserialize, Serialize};

/// Lowest byte rate: below this even one 4 KiB page takes more than a second.
pub const MIN_BYTES_PER_SEC: u64 = 4 * KIB;
/// Highest byte rate (far above any device we emulate; larger is "unlimited": omit it).
pub const MAX_BYTES_PER_SEC: u64 = TIB;
/// Highest operations (requests or frames) per second.
pub const MAX_OPS_PER_SEC: u64 = 100_000_000;
/// Burst bounds in milliseconds.
pub const MIN_BURST_MS: u64 = 1;
pub const MAX_BURST_MS: u64 = 60_000;
pub const DEFAULT_BURST_MS: u64 = 100;

/// Checks a bytes-per-second limit named `what` (e.g. "disk bw").
pub fn check_bytes_rate(what: &str, rate: Option<ByteSize>) -> Result<(), SpecError> {
    let Some(r) = rate else { return Ok(()) };
    if !(MIN_BYTES_PER_SEC..=MAX_BYTES_PER_SEC).contains(&r.bytes()) {
        return Err(SpecError(format!(
            "{what} {} bytes/s is out of range: give between 4K and 1T bytes per second \
             (like 10M), or leave it out for no limit",
            r.bytes()
        )));
    }
    Ok(())
}

/// Checks an operations-per-second limit named `what` (e.g. "disk iops").
pub fn check_ops_rate(what: &str, rate: Option<u64>) -> Result<(), SpecError> {
    let Some(r) = rate else { return Ok(()) };
    if !(1..=MAX_OPS_PER_SEC).contains(&r) {
        return Err(SpecError(format!(
            "{what} {r} per second is out of range: give between 1 and {MAX_OPS_PER_SEC}, \
             or leave it out for no limit"
        )));
    }
    Ok(())
}

/// Checks a burst named `what`; a burst without any rate means nothing and is refused.
pub fn check_burst(what: &str, burst_ms: Option<u64>, any_rate: bool) -> Result<(), SpecError> {
    let Some(b) = burst_ms else { return Ok(()) };
    if !(MIN_BURST_MS..=MAX_BURST_MS).contains(&b) {
        return Err(SpecError(format!(
            "{what} {b} ms is out of range: give between {MIN_BURST_MS} and {MAX_BURST_MS} \
             milliseconds (default {DEFAULT_BURST_MS})"
        )));
    }
    if !any_rate {
        return Err(SpecError(format!(
            "{what} is given without a rate to burst above: add a rate limit or remove it"
        )));
    }
    Ok(())
}

/// Parses a `--disk`/`--net` option value `value` of key `key` as a byte rate.
pub fn parse_bytes_rate(key: &str, value: &str) -> Result<ByteSize, SpecError> {
    value
        .parse()
        .map_err(|e| SpecError(format!("{key}: {e} (bytes per second)")))
}

/// Parses a whole number (operations per second, milliseconds) of option `key`.
pub fn parse_count(key: &str, value: &str) -> Result<u64, SpecError> {
    value.parse().map_err(|_| {
        SpecError(format!(
            "{key}={value:?} is not a whole number: write digits only, like {key}=500"
        ))
    })
}

/// The rate limits of one device: what the spec gave, or what `set-limit` made of it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum DeviceLimits {
    /// A disk's reads and writes together.
    Disk {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        bw: Option<ByteSize>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        iops: Option<u64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        burst_ms: Option<u64>,
    },
    /// A network device, per direction: rx is host to guest, tx guest to host.
    Net {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        rx_bw: Option<ByteSize>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        tx_bw: Option<ByteSize>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        rx_pps: Option<u64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        tx_pps: Option<u64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        burst_ms: Option<u64>,
    },
}

impl DeviceLimits {
    pub fn of_disk(d: &DiskSpec) -> DeviceLimits {
        DeviceLimits::Disk {
            bw: d.bw,
            iops: d.iops,
            burst_ms: d.burst_ms,
        }
    }

    pub fn of_net(n: &NetSpec) -> DeviceLimits {
        DeviceLimits::Net {
            rx_bw: n.rx_bw,
            tx_bw: n.tx_bw,
            rx_pps: n.rx_pps,
            tx_pps: n.tx_pps,
            burst_ms: n.burst_ms,
        }
    }

    fn kind(&self) -> &'static str {
        match self {
            DeviceLimits::Disk { .. } => "disk",
            DeviceLimits::Net { .. } => "net",
        }
    }

    /// Whether any rate is limited.
    pub fn any_rate(&self) -> bool {
        match self {
            DeviceLimits::Disk { bw, iops, .. } => bw.is_some() || iops.is_some(),
            DeviceLimits::Net {
                rx_bw,
                tx_bw,
                rx_pps,
                tx_pps,
                ..
            } => rx_bw.or(*tx_bw).is_some() || rx_pps.or(*tx_pps).is_some(),
        }
    }

    /// The same checks as the spec's (`--disk`, `--net`, machine files).
    pub fn validate(&self) -> Result<(), SpecError> {
        let kind = self.kind();
        match self {
            DeviceLimits::Disk { bw, iops, .. } => {
                check_bytes_rate("disk bw", *bw)?;
                check_ops_rate("disk iops", *iops)?;
            }
            DeviceLimits::Net {
                rx_bw,
                tx_bw,
                rx_pps,
                tx_pps,
                ..
            } => {
                check_bytes_rate("net rx_bw", *rx_bw)?;
                check_bytes_rate("net tx_bw", *tx_bw)?;
                check_ops_rate("net rx_pps", *rx_pps)?;
                check_ops_rate("net tx_pps", *tx_pps)?;
            }
        }
        let (DeviceLimits::Disk { burst_ms, .. } | DeviceLimits::Net { burst_ms, .. }) = self;
        check_burst(&format!("{kind} burst_ms"), *burst_ms, self.any_rate())
    }

    /// These limits changed by `changes`, in the syntax of the `--disk`/`--net` limit
    /// options (`bw=20M,iops=500,burst_ms=50`; `KEY=off` removes a limit). Keys not named keep
    /// their value; removing every rate removes the burst too. Validated like the spec; on
    /// error `self` is what stays in force.
    pub fn updated(&self, changes: &str) -> Result<DeviceLimits, SpecError> {
        let kind = self.kind();
        let keys = match self {
            DeviceLimits::Disk { .. } => "bw, iops and burst_ms",
            DeviceLimits::Net { .. } => "rx_bw, tx_bw, rx_pps, tx_pps and burst_ms",
        };
        if changes.trim().is_empty() {
            return Err(SpecError(format!(
                "no limits given: write KEY=VALUE pairs separated by commas, like bw=20M,iops=500 \
                 (a {kind} takes {keys}; VALUE off removes a limit)"
            )));
        }
        let mut new = self.clone();
        let mut burst_given = false;
        for item in changes.split(',') {
            let Some((key, value)) = item.split_once('=') else {
                return Err(SpecError(format!(
                    "invalid limit {item:?}: write KEY=VALUE, like bw=20M (a {kind} takes {keys}; \
                     VALUE off removes a limit)"
                )));
            };
            let off = value == "off";
            let bytes = |v: &mut Option<ByteSize>| -> Result<(), SpecError> {
                *v = if off {
                    None
                } else {
                    Some(parse_bytes_rate(key, value)?)
                };
                Ok(())
            };
            let count = |v: &mut Option<u64>| -> Result<(), SpecError> {
                *v = if off {
                    None
                } else {
                    Some(parse_count(key, value)?)
                };
                Ok(())
            };
            match (&mut new, key) {
                (DeviceLimits::Disk { bw, .. }, "bw") => bytes(bw)?,
                (DeviceLimits::Disk { iops, .. }, "iops") => count(iops)?,
                (DeviceLimits::Net { rx_bw, .. }, "rx_bw") => bytes(rx_bw)?,
                (DeviceLimits::Net { tx_bw, .. }, "tx_bw") => bytes(tx_bw)?,
                (DeviceLimits::Net { rx_pps, .. }, "rx_pps") => count(rx_pps)?,
                (DeviceLimits::Net { tx_pps, .. }, "tx_pps") => count(tx_pps)?,
                (
                    DeviceLimits::Disk { burst_ms, .. } | DeviceLimits::Net { burst_ms, .. },
                    "burst_ms",
                ) => {
                    burst_given = !off;
                    count(burst_ms)?;
                }
                _ => {
                    return Err(SpecError(format!(
                        "{key:?} is not a limit of a {kind}: a {kind} takes {keys}"
                    )));
                }
            }
        }
        if !new.any_rate() && !burst_given {
            // Nothing left to burst above; a burst asked for in the same breath is an error.
            let (DeviceLimits::Disk { burst_ms, .. } | DeviceLimits::Net { burst_ms, .. }) =
                &mut new;
            *burst_ms = None;
        }
        new.validate()?;
        Ok(new)
    }
}

#[cfg(test)]
mod tests {
    use crate::size::MIB;
    use crate::spec::{DiskSpec, MachineSpec, NetSpec};

    #[test]
    fn disk_limits_parse_from_flags_and_toml() {
        let d: DiskSpec = "path=/x,bw=10M,iops=500,burst_ms=250".parse().unwrap();
        assert_eq!(d.bw.unwrap().bytes(), 10 * MIB);
        assert_eq!((d.iops, d.burst_ms), (Some(500), Some(250)));
        let d: DiskSpec = "path=/x".parse().unwrap();
        assert!(d.bw.is_none() && d.iops.is_none() && d.burst_ms.is_none());
        for (bad, why) in [
            ("path=/x,bw=0", "between 4K and 1T"),
            ("path=/x,bw=2T", "between 4K and 1T"),
            ("path=/x,bw=fast", "bytes per second"),
            ("path=/x,iops=0", "between 1 and"),
            ("path=/x,iops=-1", "whole number"),
            ("path=/x,iops=1000000000", "between 1 and"),
            ("path=/x,bw=1M,burst_ms=0", "between 1 and 60000"),
            ("path=/x,bw=1M,burst_ms=60001", "between 1 and 60000"),
            ("path=/x,burst_ms=10", "without a rate"),
            ("path=/x,rate=1", "bw, iops and burst_ms"),
        ] {
            let e = bad.parse::<DiskSpec>().unwrap_err();
            assert!(e.0.contains(why), "{bad}: {e}");
        }
        let text = "kernel = \"/k\"\n[[disks]]\npath = \"/a\"\nbw = \"2M\"\niops = 100\n";
        let spec = MachineSpec::from_toml(text).unwrap();
        assert_eq!(spec.disks[0].bw.unwrap().bytes(), 2 * MIB);
        assert_eq!(MachineSpec::from_toml(&spec.to_toml()).unwrap(), spec);
        let spec = MachineSpec::from_toml("kernel = \"/k\"\n[[disks]]\npath = \"/a\"\niops = 0\n");
        let e = spec.unwrap().validate(8).unwrap_err();
        assert!(e.0.contains("disk iops"), "{e}");
    }

    #[test]
    fn net_limits_parse_per_direction() {
        let n: NetSpec = "tap=t,rx_bw=1M,tx_bw=2M,rx_pps=100,tx_pps=200,burst_ms=50"
            .parse()
            .unwrap();
        assert_eq!(n.rx_bw.unwrap().bytes(), MIB);
        assert_eq!(n.tx_bw.unwrap().bytes(), 2 * MIB);
        assert_eq!(
            (n.rx_pps, n.tx_pps, n.burst_ms),
            (Some(100), Some(200), Some(50))
        );
        for (bad, why) in [
            ("tap=t,rx_bw=1", "between 4K and 1T"),
            ("tap=t,tx_pps=0", "between 1 and"),
            ("tap=t,burst_ms=5", "without a rate"),
            ("tap=t,bw=1M", "rx_bw"),
        ] {
            let e = bad.parse::<NetSpec>().unwrap_err();
            assert!(e.0.contains(why), "{bad}: {e}");
        }
        let text = "kernel = \"/k\"\n[[nets]]\ntap = \"a\"\ntx_bw = \"64K\"\n";
        let spec = MachineSpec::from_toml(text).unwrap();
        assert_eq!(spec.nets[0].tx_bw.unwrap().bytes(), 64 << 10);
        assert_eq!(MachineSpec::from_toml(&spec.to_toml()).unwrap(), spec);
    }

    #[test]
    fn limits_change_in_the_flag_syntax_and_bad_changes_change_nothing() {
        use super::DeviceLimits;
        let d: DiskSpec = "path=/x,bw=2M".parse().unwrap();
        let disk = DeviceLimits::of_disk(&d);
        let up = disk.updated("bw=20M,iops=500").unwrap();
        assert_eq!(
            up,
            DeviceLimits::Disk {
                bw: Some(crate::ByteSize(20 * MIB)),
                iops: Some(500),
                burst_ms: None
            }
        );
        // Unnamed keys stay; off removes one; a burst goes with the last rate.
        let up = up
            .updated("burst_ms=50")
            .unwrap()
            .updated("bw=off")
            .unwrap();
        assert_eq!(
            up,
            DeviceLimits::Disk {
                bw: None,
                iops: Some(500),
                burst_ms: Some(50)
            }
        );
        let none = up.updated("iops=off").unwrap();
        assert!(!none.any_rate());
        assert_eq!(none, DeviceLimits::of_disk(&"path=/x".parse().unwrap()));
        for (bad, why) in [
            ("", "no limits given"),
            ("bw", "write KEY=VALUE"),
            ("bw=1", "between 4K and 1T"),
            ("bw=fast", "bytes per second"),
            ("iops=0", "between 1 and"),
            ("iops=-3", "whole number"),
            (
                "rx_bw=1M",
                "not a limit of a disk: a disk takes bw, iops and burst_ms",
            ),
            ("burst_ms=0", "between 1 and 60000"),
            ("bw=off,burst_ms=20", "without a rate"),
        ] {
            let e = disk.updated(bad).unwrap_err();
            assert!(e.0.contains(why), "{bad:?}: {e}");
        }
        let n: NetSpec = "tap=t,tx_pps=100".parse().unwrap();
        let net = DeviceLimits::of_net(&n);
        let up = net.updated("rx_bw=1M,tx_pps=off,tx_bw=64K").unwrap();
        assert_eq!(
            up,
            DeviceLimits::of_net(&"tap=t,rx_bw=1M,tx_bw=64K".parse().unwrap())
        );
        let e = net.updated("bw=1M").unwrap_err();
        assert!(e.0.contains("a net takes rx_bw, tx_bw"), "{e}");
        // The wire form names the kind and only the limits in force.
        assert_eq!(
            serde_json::to_string(&up).unwrap(),
            r#"{"kind":"net","rx_bw":"1M","tx_bw":"64K"}"#
        );
    }
}

//! Rate limits of disks and network devices as the spec states them, and their checks.
//!
//! A limit is a token bucket: a rate (bytes per second with the size suffixes of
//! [`ByteSize`], or operations per second) and a burst, the milliseconds of traffic at the
//! full rate that may go at once after a quiet time (default 100). A single request larger
//! than the burst still goes (when the bucket is full); the average rate holds.

use crate::size::{ByteSize, KIB, TIB};
use crate::spec::SpecError;

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
}

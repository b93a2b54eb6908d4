//! A VM's resource limits beyond its machine spec, enforced through its cgroup
//! ([`crate::cgroup`]): a CPU allowance and `io.max` limits. Checked at create, stored with
//! the VM.

use serde::{Deserialize, Deserializer, Serialize};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;
use vme_api::ByteSize;

/// The limits stored with a VM.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct VmLimits {
    /// CPUs the VM's monitor may use in all (0.5: half of one CPU); None: its vCPU count.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_allowance: Option<f64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub io_max: Vec<IoMax>,
}

/// One `io.max` entry, on a whole block device.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct IoMax {
    /// `MAJ:MIN` of the whole disk.
    pub device: String,
    /// What the request named (a path or `MAJ:MIN`).
    #[serde(default)]
    pub requested: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rbps: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wbps: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub riops: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wiops: Option<u64>,
}

/// `cpu_allowance` as sent: `"50%"` (percent of one CPU), `"1.5"` or `1.5` (CPUs).
#[derive(Debug, Clone, PartialEq)]
pub struct CpuAllowance(pub f64);

impl<'de> Deserialize<'de> for CpuAllowance {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            N(f64),
            S(String),
        }
        let v = match Raw::deserialize(d)? {
            Raw::N(n) => n,
            Raw::S(s) => parse_allowance(&s).map_err(serde::de::Error::custom)?,
        };
        Ok(CpuAllowance(v))
    }
}

/// `"50%"` → 0.5 CPUs; `"1.5"` → 1.5 CPUs.
pub fn parse_allowance(s: &str) -> Result<f64, String> {
    let s = s.trim();
    let bad = || {
        format!(
            "cpu_allowance {s:?} is not understood: give a percent of one CPU like \"50%\", \
             or a number of CPUs like \"1.5\""
        )
    };
    match s.strip_suffix('%') {
        Some(p) => p
            .trim()
            .parse::<f64>()
            .map(|p| p / 100.0)
            .map_err(|_| bad()),
        None => s.parse::<f64>().map_err(|_| bad()),
    }
}

/// One `io_max` entry as sent.
#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct IoMaxRequest {
    /// A block device (`/dev/sda`), a file or directory (the disk its filesystem is on), or
    /// `MAJ:MIN`.
    pub device: String,
    /// Bytes per second: `"10M"` or a number.
    #[serde(default)]
    #[schema(value_type = Option<String>)]
    pub rbps: Option<ByteSize>,
    #[serde(default)]
    #[schema(value_type = Option<String>)]
    pub wbps: Option<ByteSize>,
    #[serde(default)]
    pub riops: Option<u64>,
    #[serde(default)]
    pub wiops: Option<u64>,
}

/// Checks the limits of a create request against the VM's `vcpus`.
pub fn check(
    cpu: Option<&CpuAllowance>,
    io: &[IoMaxRequest],
    vcpus: u32,
) -> Result<VmLimits, String> {
    let cpu_allowance = match cpu {
        None => None,
        Some(CpuAllowance(c)) => {
            if !(c.is_finite() && *c >= 0.01 && *c <= f64::from(vcpus)) {
                return Err(format!(
                    "cpu_allowance {c} CPUs is out of range: give at least 1% of one CPU and at \
                     most the VM's {vcpus} vCPU(s), like \"50%\" or \"1.5\""
                ));
            }
            Some(*c)
        }
    };
    if io.len() > 16 {
        return Err(format!(
            "io_max has {} entries: give at most 16 devices",
            io.len()
        ));
    }
    let mut io_max: Vec<IoMax> = Vec::new();
    for r in io {
        let device = whole_disk(&r.device)?;
        if io_max.iter().any(|l| l.device == device) {
            return Err(format!(
                "io_max names device {device} twice ({}): give one entry per device",
                r.device
            ));
        }
        let bps = |what: &str, b: Option<ByteSize>| -> Result<Option<u64>, String> {
            match b.map(ByteSize::bytes) {
                Some(n) if !(4096..=1 << 40).contains(&n) => Err(format!(
                    "io_max {what} {n} for {} is out of range: give 4K to 1T bytes per second",
                    r.device
                )),
                n => Ok(n),
            }
        };
        let iops = |what: &str, n: Option<u64>| -> Result<Option<u64>, String> {
            match n {
                Some(n) if !(1..=10_000_000).contains(&n) => Err(format!(
                    "io_max {what} {n} for {} is out of range: give 1 to 10000000 operations \
                     per second",
                    r.device
                )),
                n => Ok(n),
            }
        };
        let l = IoMax {
            device,
            requested: r.device.clone(),
            rbps: bps("rbps", r.rbps)?,
            wbps: bps("wbps", r.wbps)?,
            riops: iops("riops", r.riops)?,
            wiops: iops("wiops", r.wiops)?,
        };
        if l.rbps.is_none() && l.wbps.is_none() && l.riops.is_none() && l.wiops.is_none() {
            return Err(format!(
                "io_max for {} sets no limit: give rbps, wbps, riops or wiops",
                r.device
            ));
        }
        io_max.push(l);
    }
    Ok(VmLimits {
        cpu_allowance,
        io_max,
    })
}

/// The whole disk (`MAJ:MIN`) behind `device`: itself if it is a disk, the disk holding it if
/// it is a partition, the disk of the filesystem a file lives on. `io.max` takes whole disks
/// only.
pub fn whole_disk(device: &str) -> Result<String, String> {
    let (major, minor) = if let Some((a, b)) = device.split_once(':') {
        let n = |x: &str| x.parse::<u32>().ok();
        match (n(a), n(b)) {
            (Some(a), Some(b)) => (a, b),
            _ => {
                return Err(format!(
                    "io_max device {device:?} is neither MAJ:MIN nor an absolute path"
                ));
            }
        }
    } else {
        let p = Path::new(device);
        if !p.is_absolute() {
            return Err(format!(
                "io_max device {device:?} is not an absolute path: give /dev/NAME, a file on \
                 the disk to limit, or MAJ:MIN"
            ));
        }
        let m = std::fs::metadata(p)
            .map_err(|e| format!("io_max device {device}: {e}; check the path"))?;
        let dev = if m.file_type().is_block_device() {
            m.rdev()
        } else {
            m.dev()
        };
        (libc::major(dev), libc::minor(dev))
    };
    let sys = Path::new("/sys/dev/block").join(format!("{major}:{minor}"));
    if !sys.exists() {
        return Err(format!(
            "io_max device {device} ({major}:{minor}) is not a block device (a tmpfs, \
             overlay or network filesystem has none): name the disk that holds the VM's files"
        ));
    }
    if sys.join("partition").exists() {
        let parent = std::fs::read_to_string(sys.join("../dev"))
            .map_err(|e| format!("cannot find the disk of partition {major}:{minor}: {e}"))?;
        return Ok(parent.trim().to_string());
    }
    Ok(format!("{major}:{minor}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allowances() {
        assert_eq!(parse_allowance("50%"), Ok(0.5));
        assert_eq!(parse_allowance("1.5"), Ok(1.5));
        assert_eq!(parse_allowance(" 20 % "), Ok(0.2));
        assert!(parse_allowance("half").unwrap_err().contains("\"50%\""));
        let a: CpuAllowance = serde_json::from_str("2").unwrap();
        assert_eq!(a, CpuAllowance(2.0));
        let a: CpuAllowance = serde_json::from_str("\"25%\"").unwrap();
        assert_eq!(a, CpuAllowance(0.25));
        assert!(serde_json::from_str::<CpuAllowance>("\"lots\"").is_err());
        for (c, vcpus, ok) in [
            (0.5, 1, true),
            (2.0, 2, true),
            (2.5, 2, false),
            (0.001, 1, false),
            (f64::NAN, 1, false),
            (-1.0, 4, false),
        ] {
            let r = check(Some(&CpuAllowance(c)), &[], vcpus);
            assert_eq!(r.is_ok(), ok, "{c} of {vcpus}: {r:?}");
        }
    }

    fn io(json: &str) -> Result<VmLimits, String> {
        let reqs: Vec<IoMaxRequest> = serde_json::from_str(json).map_err(|e| e.to_string())?;
        check(None, &reqs, 1)
    }

    #[test]
    fn io_limits() {
        // Some block device of this host, by MAJ:MIN.
        let disk = std::fs::read_dir("/sys/block")
            .unwrap()
            .filter_map(|e| std::fs::read_to_string(e.ok()?.path().join("dev")).ok())
            .map(|d| d.trim().to_string())
            .next()
            .expect("this host has no block device");
        let l = io(&format!(
            r#"[{{"device":"{disk}","rbps":"10M","wiops":50}}]"#
        ))
        .unwrap();
        assert_eq!(l.io_max[0].device, disk);
        assert_eq!(
            (l.io_max[0].rbps, l.io_max[0].wiops),
            (Some(10 << 20), Some(50))
        );
        for (json, why) in [
            (r#"[{"device":"1:2:3","rbps":"1M"}]"#.to_string(), "MAJ:MIN"),
            (r#"[{"device":"dev/sda","rbps":"1M"}]"#.into(), "absolute"),
            (
                r#"[{"device":"/nonexistent","rbps":"1M"}]"#.into(),
                "check the path",
            ),
            (
                r#"[{"device":"/proc/self","rbps":"1M"}]"#.into(),
                "not a block device",
            ),
            (format!(r#"[{{"device":"{disk}"}}]"#), "sets no limit"),
            (
                format!(r#"[{{"device":"{disk}","rbps":"1"}}]"#),
                "out of range",
            ),
            (
                format!(r#"[{{"device":"{disk}","riops":0}}]"#),
                "out of range",
            ),
            (
                format!(r#"[{{"device":"{disk}","riops":5}},{{"device":"{disk}","wiops":5}}]"#),
                "twice",
            ),
            (r#"[{"device":"8:0","rbsp":"1M"}]"#.into(), "unknown field"),
        ] {
            let e = io(&json).unwrap_err();
            assert!(e.contains(why), "{json}: {e}");
        }
    }
}

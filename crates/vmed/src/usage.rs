//! Accounting: what each VM's monitor uses, sampled every `sample_interval` into the store.
//! A sample holds counters since the monitor started: CPU time (the cgroup's: v2 `cpu.stat`,
//! or v1 `cpuacct.usage*`; `/proc/PID/stat` without cgroups), memory (the cgroup's: v2
//! `memory.current`/`memory.peak`, or v1 `memory.usage_in_bytes`/`memory.max_usage_in_bytes`;
//! without a memory controller the monitor's RSS and its high-water mark), disk
//! bytes (`/proc/PID/io`: what the monitor read from and wrote to storage; reads served from
//! the host's page cache are not counted) and network bytes as the guest sees them (its taps'
//! counters, with rx and tx swapped: what the tap sends, the guest receives).
//!
//! Totals over a window add up the counters' increases between samples; a counter that went
//! down, or a new monitor pid, is a restart and counts from zero.

use serde::Serialize;
use std::fs;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Sample {
    pub vm: String,
    /// Unix milliseconds.
    pub at_ms: i64,
    /// The monitor's pid: a new pid means the counters started again.
    pub pid: u32,
    pub cpu_usec: u64,
    pub cpu_user_usec: u64,
    pub cpu_system_usec: u64,
    pub memory_bytes: u64,
    pub memory_peak_bytes: u64,
    pub disk_read_bytes: u64,
    pub disk_write_bytes: u64,
    pub net_rx_bytes: u64,
    pub net_tx_bytes: u64,
}

pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// `KEY VALUE` lines (cpu.stat, /proc/PID/io with its colons) → the value of `key`.
fn field(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let mut w = l.split_whitespace();
        (w.next()?.trim_end_matches(':') == key).then(|| w.next()?.parse().ok())?
    })
}

fn read(p: impl AsRef<Path>) -> Option<String> {
    fs::read_to_string(p).ok()
}

/// Clock ticks per second, for /proc/PID/stat.
fn ticks() -> u64 {
    // SAFETY: sysconf takes an integer and touches no memory.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as u64 } else { 100 }
}

/// Samples one monitor. `None` when it is gone (nothing could be read).
pub fn collect(
    vm: &str,
    pid: u32,
    cgroup: Option<&Path>,
    taps: &[String],
    prev: Option<&Sample>,
) -> Option<Sample> {
    let mut s = Sample {
        vm: vm.to_string(),
        at_ms: now_ms(),
        pid,
        ..Sample::default()
    };
    // A jailed monitor's counters are its child's, which runs the VM.
    let proc_dir = format!("/proc/{}", crate::jail::vm_process(pid));
    let mut got = false;
    if let Some((total, user, system)) = cgroup.and_then(crate::cgroup::cpu_usage) {
        s.cpu_usec = total;
        s.cpu_user_usec = user;
        s.cpu_system_usec = system;
        got = true;
    } else if let Some(stat) = read(format!("{proc_dir}/stat")) {
        // Fields after the command (which may hold spaces): utime is the 14th, stime 15th.
        let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
        let f: Vec<u64> = rest
            .split_whitespace()
            .map(|x| x.parse().unwrap_or(0))
            .collect();
        let usec = |t: u64| t * 1_000_000 / ticks();
        s.cpu_user_usec = usec(f.get(11).copied().unwrap_or(0));
        s.cpu_system_usec = usec(f.get(12).copied().unwrap_or(0));
        s.cpu_usec = s.cpu_user_usec + s.cpu_system_usec;
        got = true;
    }
    if let Some((now, peak)) = cgroup.and_then(crate::cgroup::memory_usage) {
        (s.memory_bytes, s.memory_peak_bytes) = (now, peak);
    } else if let Some(status) = read(format!("{proc_dir}/status")) {
        s.memory_bytes = field(&status, "VmRSS").unwrap_or(0) * 1024;
        s.memory_peak_bytes = field(&status, "VmHWM").unwrap_or(0) * 1024;
        got = true;
    } else if let Some(p) = prev {
        // The monitor is gone (a last sample at its exit): its last known memory.
        (s.memory_bytes, s.memory_peak_bytes) = (p.memory_bytes, p.memory_peak_bytes);
    }
    if let Some(io) = read(format!("{proc_dir}/io")) {
        s.disk_read_bytes = field(&io, "read_bytes").unwrap_or(0);
        s.disk_write_bytes = field(&io, "write_bytes").unwrap_or(0);
    } else if let Some(p) = prev {
        (s.disk_read_bytes, s.disk_write_bytes) = (p.disk_read_bytes, p.disk_write_bytes);
    }
    // The taps' counters as the VM's own network namespace sees them (its project's, see
    // crate::network): the daemon's /sys shows only its own namespace's interfaces.
    let dev = read(format!("{proc_dir}/net/dev")).unwrap_or_default();
    for tap in taps {
        match tap_bytes(&dev, tap) {
            (Some(tx), Some(rx)) => {
                s.net_rx_bytes += tx;
                s.net_tx_bytes += rx;
            }
            _ => {
                if let Some(p) = prev {
                    (s.net_rx_bytes, s.net_tx_bytes) = (p.net_rx_bytes, p.net_tx_bytes);
                }
            }
        }
    }
    got.then_some(s)
}

/// Interface `tap`'s (tx, rx) bytes from a /proc/PID/net/dev text: after `NAME:`, the
/// received bytes are the first field and the sent bytes the ninth.
fn tap_bytes(dev: &str, tap: &str) -> (Option<u64>, Option<u64>) {
    let Some(fields) = dev.lines().find_map(|l| {
        let (name, rest) = l.split_once(':')?;
        (name.trim() == tap).then_some(rest)
    }) else {
        return (None, None);
    };
    let f: Vec<&str> = fields.split_whitespace().collect();
    let num = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok());
    (num(8), num(0))
}

/// What a VM used over a window of samples.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Totals {
    pub cpu_seconds: f64,
    pub cpu_user_seconds: f64,
    pub cpu_system_seconds: f64,
    /// The highest memory peak seen in the window.
    pub memory_peak_bytes: u64,
    pub disk_read_bytes: u64,
    pub disk_write_bytes: u64,
    pub net_rx_bytes: u64,
    pub net_tx_bytes: u64,
    pub samples: usize,
    /// Milliseconds from the first sample to the last.
    pub span_ms: i64,
}

/// A counter's increase from `a` to `b`; `restart` (or a drop) means it began again at 0.
fn inc(a: u64, b: u64, restart: bool) -> u64 {
    if restart || b < a { b } else { b - a }
}

pub fn totals(samples: &[Sample]) -> Totals {
    let mut t = Totals {
        samples: samples.len(),
        memory_peak_bytes: samples
            .iter()
            .map(|s| s.memory_peak_bytes)
            .max()
            .unwrap_or(0),
        ..Totals::default()
    };
    let (mut cpu, mut user, mut sys) = (0u64, 0u64, 0u64);
    for w in samples.windows(2) {
        let (a, b) = (&w[0], &w[1]);
        let new = a.pid != b.pid;
        cpu += inc(a.cpu_usec, b.cpu_usec, new);
        user += inc(a.cpu_user_usec, b.cpu_user_usec, new);
        sys += inc(a.cpu_system_usec, b.cpu_system_usec, new);
        t.disk_read_bytes += inc(a.disk_read_bytes, b.disk_read_bytes, new);
        t.disk_write_bytes += inc(a.disk_write_bytes, b.disk_write_bytes, new);
        // Taps can outlive a monitor: only a drop restarts their counters.
        t.net_rx_bytes += inc(a.net_rx_bytes, b.net_rx_bytes, false);
        t.net_tx_bytes += inc(a.net_tx_bytes, b.net_tx_bytes, false);
    }
    t.cpu_seconds = cpu as f64 / 1e6;
    t.cpu_user_seconds = user as f64 / 1e6;
    t.cpu_system_seconds = sys as f64 / 1e6;
    if let (Some(f), Some(l)) = (samples.first(), samples.last()) {
        t.span_ms = l.at_ms - f.at_ms;
    }
    t
}

/// Rates between the last two samples of the same monitor.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Rates {
    /// Of one CPU: 150 is one and a half CPUs busy.
    pub cpu_percent: f64,
    pub disk_read_bytes_per_second: f64,
    pub disk_write_bytes_per_second: f64,
    pub net_rx_bytes_per_second: f64,
    pub net_tx_bytes_per_second: f64,
}

pub fn rates(samples: &[Sample]) -> Option<Rates> {
    let [.., a, b] = samples else { return None };
    let secs = (b.at_ms - a.at_ms) as f64 / 1000.0;
    if a.pid != b.pid || secs <= 0.0 {
        return None;
    }
    let per_s = |x: u64, y: u64| inc(x, y, false) as f64 / secs;
    Some(Rates {
        cpu_percent: per_s(a.cpu_usec, b.cpu_usec) / 1e4,
        disk_read_bytes_per_second: per_s(a.disk_read_bytes, b.disk_read_bytes),
        disk_write_bytes_per_second: per_s(a.disk_write_bytes, b.disk_write_bytes),
        net_rx_bytes_per_second: per_s(a.net_rx_bytes, b.net_rx_bytes),
        net_tx_bytes_per_second: per_s(a.net_tx_bytes, b.net_tx_bytes),
    })
}

/// `since` as sent: Unix seconds, or an RFC 3339 time (`2026-12-02T15:00:00Z`,
/// `2026-12-02T16:00:00.5+01:00`). Returns Unix milliseconds.
pub fn parse_since(s: &str) -> Result<i64, String> {
    let bad = || {
        format!(
            "since={s:?} is not a time: give Unix seconds (like 1764687600) or RFC 3339 (like \
             2026-12-02T15:00:00Z)"
        )
    };
    if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
        let secs: i64 = s.parse().map_err(|_| bad())?;
        return secs.checked_mul(1000).ok_or_else(bad);
    }
    let b = s.as_bytes();
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || !matches!(b[10], b'T' | b't' | b' ') {
        return Err(bad());
    }
    if b[13] != b':' || b[16] != b':' {
        return Err(bad());
    }
    let num = |r: std::ops::Range<usize>| -> Result<i64, String> {
        let t = s.get(r).ok_or_else(bad)?;
        if !t.bytes().all(|c| c.is_ascii_digit()) {
            return Err(bad());
        }
        t.parse().map_err(|_| bad())
    };
    let (y, mo, d, h, mi, sec) = (
        num(0..4)?,
        num(5..7)?,
        num(8..10)?,
        num(11..13)?,
        num(14..16)?,
        num(17..19)?,
    );
    let mut rest = &s[19..];
    let mut ms = 0;
    if let Some(f) = rest.strip_prefix('.') {
        let n = f.bytes().take_while(u8::is_ascii_digit).count();
        if n == 0 {
            return Err(bad());
        }
        let digits = &f[..n.min(3)];
        ms = digits.parse::<i64>().map_err(|_| bad())? * 10i64.pow(3 - digits.len() as u32);
        rest = &f[n..];
    }
    let offset_s = match rest {
        "Z" | "z" => 0,
        _ if rest.is_ascii()
            && rest.len() == 6
            && matches!(&rest[..1], "+" | "-")
            && &rest[3..4] == ":" =>
        {
            let two = |t: &str| -> Result<i64, String> {
                if t.bytes().all(|c| c.is_ascii_digit()) {
                    t.parse().map_err(|_| bad())
                } else {
                    Err(bad())
                }
            };
            let (oh, om) = (two(&rest[1..3])?, two(&rest[4..6])?);
            if oh > 23 || om > 59 {
                return Err(bad());
            }
            let o = oh * 3600 + om * 60;
            if rest.starts_with('-') { -o } else { o }
        }
        _ => return Err(bad()),
    };
    let leap = |y: i64| (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
    let days_in = [
        31,
        if leap(y) { 29 } else { 28 },
        31,
        30,
        31,
        30,
        31,
        31,
        30,
        31,
        30,
        31,
    ];
    if !(1..=12).contains(&mo) || d < 1 || d > days_in[(mo - 1) as usize] {
        return Err(bad());
    }
    if h > 23 || mi > 59 || sec > 60 {
        return Err(bad());
    }
    let days = days_from_civil(y, mo, d);
    Ok(((days * 86400 + h * 3600 + mi * 60 + sec - offset_s) * 1000) + ms)
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tap_counters_from_net_dev() {
        let dev = "Inter-|   Receive                                                |  Transmit
 face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed
    lo:       0       0    0    0    0     0          0         0        0       0    0    0    0     0       0          0
vme-a-0:    1234      10    0    0    0     0          0         0     5678      20    0    0    0     0       0          0
";
        assert_eq!(tap_bytes(dev, "vme-a-0"), (Some(5678), Some(1234)));
        assert_eq!(tap_bytes(dev, "vme-a"), (None, None));
    }

    #[test]
    fn since_formats() {
        assert_eq!(parse_since("0"), Ok(0));
        assert_eq!(parse_since("1764687600"), Ok(1_764_687_600_000));
        assert_eq!(parse_since("1970-01-01T00:00:00Z"), Ok(0));
        assert_eq!(parse_since("2026-12-02T15:00:00Z"), Ok(1_796_223_600_000));
        assert_eq!(
            parse_since("2026-12-02T16:00:00.5+01:00"),
            Ok(1_796_223_600_500)
        );
        assert_eq!(
            parse_since("2000-02-29T00:00:00-00:30"),
            Ok(951_784_200_000)
        );
        for bad in [
            "",
            "yesterday",
            "-5",
            "2026-13-01T00:00:00Z",
            "2026-02-30T00:00:00Z",
            "2026-12-02T25:00:00Z",
            "2026-12-02T15:00:00",
            "2026-12-02T15:00:00+1",
            "2026-12-02T15:00:00.Z",
            "99999999999999999999",
            "2026-12-02T15:00:00+é:0",
            "2026-12-02T15:00:00+01é",
        ] {
            let e = parse_since(bad).unwrap_err();
            assert!(e.contains("RFC 3339"), "{bad}: {e}");
        }
    }

    fn s(at_ms: i64, pid: u32, cpu_usec: u64, net: u64) -> Sample {
        Sample {
            vm: "a".into(),
            at_ms,
            pid,
            cpu_usec,
            net_rx_bytes: net,
            memory_peak_bytes: cpu_usec,
            ..Sample::default()
        }
    }

    #[test]
    fn totals_count_restarts_from_zero() {
        let v = [
            s(0, 1, 100, 10),
            s(1000, 1, 600_100, 20),
            // A new monitor: its counter started again.
            s(2000, 2, 300_000, 25),
            s(3000, 2, 1_300_000, 5),
        ];
        let t = totals(&v);
        assert_eq!(t.cpu_seconds, 0.6 + 0.3 + 1.0);
        assert_eq!(t.net_rx_bytes, 10 + 5 + 5);
        assert_eq!(
            (t.samples, t.span_ms, t.memory_peak_bytes),
            (4, 3000, 1_300_000)
        );
        let r = rates(&v).unwrap();
        assert_eq!(r.cpu_percent, 100.0);
        assert!(rates(&v[1..3]).is_none(), "no rate across a restart");
        assert_eq!(totals(&[]), Totals::default());
    }

    #[test]
    fn collects_this_process() {
        let me = std::process::id();
        let x = collect("a", me, None, &[], None).unwrap();
        assert!(
            x.memory_bytes > 0 && x.memory_peak_bytes >= x.memory_bytes,
            "{x:?}"
        );
        assert!(collect("a", u32::MAX - 1, None, &[], None).is_none());
    }
}

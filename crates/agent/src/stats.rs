//! What the guest reports about itself, from /proc.

use vme_api::agent::GuestStats;

pub fn collect() -> Result<GuestStats, String> {
    let read = |p: &str| std::fs::read_to_string(p).map_err(|e| format!("cannot read {p}: {e}"));
    let first_f64 = |s: &str| s.split_whitespace().next().and_then(|v| v.parse().ok());
    let uptime = read("/proc/uptime")?;
    let load = read("/proc/loadavg")?;
    let meminfo = read("/proc/meminfo")?;
    let kib = |key: &str| {
        meminfo
            .lines()
            .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    };
    let processes = std::fs::read_dir("/proc")
        .map_err(|e| format!("cannot list /proc: {e}"))?
        .filter_map(Result::ok)
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .bytes()
                .all(|b| b.is_ascii_digit())
        })
        .count() as u64;
    Ok(GuestStats {
        uptime_s: first_f64(&uptime).unwrap_or(0.0),
        load_1m: first_f64(&load).unwrap_or(0.0),
        mem_total_kib: kib("MemTotal"),
        mem_free_kib: kib("MemFree"),
        mem_available_kib: kib("MemAvailable"),
        processes,
        kernel: read("/proc/sys/kernel/osrelease")?.trim().to_string(),
    })
}

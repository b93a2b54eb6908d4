//! The source side: pre-copy rounds while the guest runs, then the stop-and-copy and the
//! commit (see the module above for the protocol and its promises).

use super::wire::{Conn, Kind, MAX_PAGES, PAGE, Side};
use super::{PEER_TIMEOUT, endpoint};
use crate::snapshot::riscv::{ARCH, PARK_WAIT, RiscvSnapshotter};
use std::net::TcpStream;
use std::path::PathBuf;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};
use vme_api::control::MigrationInfo;
use vme_riscv::{DirtyBitmap, GuestRam, RAM_BASE};

/// Copy rounds at most while the guest runs (the first copies all of RAM).
const MAX_ROUNDS: u32 = 30;
/// Rounds in a row whose dirty set did not shrink before we stop waiting for it to.
const NOT_SHRINKING: u32 = 3;
/// How long connecting to the destination may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// What `migrate-send` asked for.
#[derive(Clone, Debug)]
pub struct Params {
    pub to: String,
    /// The longest pause to aim for.
    pub downtime: Duration,
    /// Bytes per second at most.
    pub bandwidth: Option<u64>,
    pub key: Option<PathBuf>,
    /// The VM was paused when asked: it starts paused at the destination.
    pub paused: bool,
}

/// A failed migration: why, and whether the guest may run here again (false once commit
/// may have reached the destination).
#[derive(Debug)]
pub struct Failure {
    pub error: String,
    pub resume: bool,
}

impl Failure {
    pub fn before_commit(error: impl Into<String>) -> Failure {
        Failure {
            error: error.into(),
            resume: true,
        }
    }
}

impl From<String> for Failure {
    fn from(error: String) -> Failure {
        Failure::before_commit(error)
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Counts what went out, for the reply and the rate estimate.
#[derive(Default)]
struct Sent {
    pages: u64,
    busy: Duration,
}

/// Sends the pages of `runs` (first page, count): non-zero pages as `Pages` frames, zero
/// pages as `Zeros` frames, or not at all with `skip_zero` (the destination's RAM starts
/// zeroed, so the first full copy needs none of them).
fn send_runs(
    conn: &mut Conn<TcpStream>,
    ram: &GuestRam,
    runs: &[(u64, u64)],
    skip_zero: bool,
    sent: &mut Sent,
) -> Result<(), String> {
    let t = Instant::now();
    let mut buf = vec![0u8; MAX_PAGES * PAGE];
    for &(first, count) in runs {
        let mut page = first;
        let end = first + count;
        while page < end {
            let n = (end - page).min(MAX_PAGES as u64);
            let chunk = &mut buf[..n as usize * PAGE];
            ram.read_bytes(RAM_BASE + page * PAGE as u64, chunk)
                .map_err(|e| format!("cannot read guest memory: {e}"))?;
            // Split the chunk into runs of zero and of non-zero pages.
            let mut i = 0usize;
            while i < n as usize {
                let zero = crate::snapshot::memory::zero(&chunk[i * PAGE..(i + 1) * PAGE]);
                let mut j = i + 1;
                while j < n as usize
                    && crate::snapshot::memory::zero(&chunk[j * PAGE..(j + 1) * PAGE]) == zero
                {
                    j += 1;
                }
                let at = (page + i as u64).to_le_bytes();
                match zero {
                    true if skip_zero => {}
                    true => {
                        conn.send_parts(Kind::Zeros, &[&at, &((j - i) as u64).to_le_bytes()])?
                    }
                    false => conn.send_parts(Kind::Pages, &[&at, &chunk[i * PAGE..j * PAGE]])?,
                }
                if !(zero && skip_zero) {
                    sent.pages += (j - i) as u64;
                }
                i = j;
            }
            page += n;
        }
    }
    sent.busy += t.elapsed();
    Ok(())
}

/// Migrates the riscv64 machine of `s` (see the module documentation of `crate::migrate`).
pub fn riscv(
    s: &RiscvSnapshotter,
    p: &Params,
    pause: &dyn Fn() -> Result<(), String>,
) -> Result<MigrationInfo, Failure> {
    let started = Instant::now();
    let machine = s.machine.upgrade().ok_or_else(|| {
        Failure::before_commit("the machine has stopped: there is nothing to migrate")
    })?;
    let (addr, key) = endpoint(&p.to, p.key.as_deref())?;
    let stream = TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT).map_err(|e| {
        format!(
            "cannot connect to the destination {}: {e}; is `vme-vmm --migrate-listen {}` \
             waiting there?",
            p.to, p.to
        )
    })?;
    let setup = |e: std::io::Error| format!("cannot set up the connection to {}: {e}", p.to);
    stream.set_nodelay(true).map_err(setup)?;
    stream.set_read_timeout(Some(PEER_TIMEOUT)).map_err(setup)?;
    stream
        .set_write_timeout(Some(PEER_TIMEOUT))
        .map_err(setup)?;
    let mut conn = Conn::handshake(stream, Side::Source, key.as_deref())
        .map_err(|e| format!("handshake with {}: {e}", p.to))?;
    if let Some(b) = p.bandwidth {
        conn.limit_rate(b);
    }
    // Pages harvested from the log: given back if the migration fails, so that the VM's
    // next diff snapshot still holds every page written since its previous snapshot.
    let mut harvested: Vec<DirtyBitmap> = Vec::new();
    let result = precopy_and_commit(s, &machine, p, pause, &mut conn, &mut harvested, started);
    if let Err(f) = &result {
        if f.resume {
            for b in &harvested {
                s.handle.remark_dirty(b);
            }
            // Tell the destination, if it still listens, so that it exits promptly.
            let _ = conn.send(Kind::Error, f.error.as_bytes());
        }
    }
    result
}

fn harvest(s: &RiscvSnapshotter, kept: &mut Vec<DirtyBitmap>) -> Result<DirtyBitmap, String> {
    let d = s
        .handle
        .harvest_dirty()
        .ok_or("the dirty-page log is off after enabling it (interpreter bug)")?;
    kept.push(d.clone());
    Ok(d)
}

fn precopy_and_commit(
    s: &RiscvSnapshotter,
    machine: &vme_riscv::Machine,
    p: &Params,
    pause: &dyn Fn() -> Result<(), String>,
    conn: &mut Conn<TcpStream>,
    harvested: &mut Vec<DirtyBitmap>,
    started: Instant,
) -> Result<MigrationInfo, Failure> {
    let ram = machine.ram();
    let size = ram.size();
    conn.send_parts(Kind::Begin, &[&size.to_le_bytes(), ARCH.as_bytes()])?;
    // From here every page written is logged; the full copy below reads each page after
    // this, so what it misses is in the first round.
    s.handle.enable_dirty_log();
    harvest(s, harvested)?;
    let mut sent = Sent::default();
    let pages = size / PAGE as u64;
    send_runs(conn, ram, &[(0, pages)], true, &mut sent)?;
    let mut rounds = 1u32;
    let (mut last, mut flat) = (u64::MAX, 0u32);
    let pending = loop {
        let d = harvest(s, harvested)?;
        let n = d.count();
        // The rate so far (all rounds), in bytes per second of sending.
        let rate = conn.bytes_sent as f64 / sent.busy.as_secs_f64().max(1e-6);
        let would_take = Duration::from_secs_f64((n * PAGE as u64) as f64 / rate.max(1.0));
        flat = if n >= last { flat + 1 } else { 0 };
        last = n;
        if would_take <= p.downtime || rounds >= MAX_ROUNDS || flat >= NOT_SHRINKING {
            log::info!(
                "migration: {n} dirty pages left after {rounds} rounds (about {} ms to send); \
                 pausing for the final copy",
                would_take.as_millis()
            );
            break d;
        }
        send_runs(conn, ram, &d.runs(), false, &mut sent)?;
        rounds += 1;
    };
    pause()?;
    let paused = Instant::now();
    let st = s
        .handle
        .save_state(PARK_WAIT)
        .map_err(|e| format!("cannot save the machine's state: {e}"))?;
    let before = sent.pages;
    let state = {
        // Devices held until the last pages are out, as a snapshot holds them (a device
        // thread that woke before the pause cannot write RAM behind our back).
        let serial = lock(&s.serial);
        let transports: Vec<_> = s.transports.iter().map(|t| lock(t)).collect();
        let w = s.sections(&st, &serial, &transports)?;
        let last = harvest(s, harvested)?;
        send_runs(conn, ram, &pending.runs(), false, &mut sent)?;
        send_runs(conn, ram, &last.runs(), false, &mut sent)?;
        w.encode().map_err(|e| e.to_string())?
    };
    let final_pages = sent.pages - before;
    for piece in state.chunks(MAX_PAGES * PAGE) {
        conn.send(Kind::State, piece)?;
    }
    conn.send(Kind::StateEnd, &[])?;
    conn.expect(Kind::Ready)
        .map_err(|e| format!("the destination did not get ready: {e}"))?;
    // Past this point the destination may run the guest: ours must never run again.
    let committed = conn.send(Kind::Commit, &[p.paused as u8]);
    let confirmed = committed.and_then(|()| conn.expect(Kind::Started));
    if let Err(e) = confirmed {
        return Err(Failure {
            error: format!(
                "commit was sent but the destination did not confirm that the guest runs \
                 there ({e}); the VM stays paused here so that it never runs twice: check the \
                 destination, and resume here only if it does not run the guest"
            ),
            resume: false,
        });
    }
    let info = MigrationInfo {
        to: p.to.clone(),
        total_ms: started.elapsed().as_millis() as u64,
        downtime_ms: paused.elapsed().as_millis() as u64,
        rounds,
        bytes_sent: conn.bytes_sent,
        final_pages,
        authenticated: conn.authenticated(),
    };
    log::info!("migrated to {}: {info:?}", p.to);
    Ok(info)
}

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
    src: &dyn Source,
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
            src.read(page * PAGE as u64, chunk)?;
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

/// Sends page runs `(first page, pages)` to the destination.
pub type SendPages<'a> = dyn FnMut(&[(u64, u64)]) -> Result<(), String> + 'a;

/// What a machine kind gives a migration: its RAM (as the memory file lays it out), its
/// dirty-page log, and its state with the guest paused.
pub trait Source {
    /// `riscv64` or `x86_64`, as the destination checks it.
    fn arch(&self) -> &'static str;
    fn ram_bytes(&self) -> u64;
    /// Copies RAM at memory-file offset `off` into `buf`.
    fn read(&self, off: u64, buf: &mut [u8]) -> Result<(), String>;
    /// The pages written since the previous call, as `(first page, pages)` runs; the first
    /// call switches the log on (if a snapshot has not) and returns what it held.
    fn harvest(&self) -> Result<Vec<(u64, u64)>, String>;
    /// Puts every page harvested so far back into the log: the migration failed, and the
    /// VM's next diff snapshot must still hold them.
    fn give_back(&self);
    /// With the guest paused: holds the devices (so nothing writes RAM), passes the pages
    /// written since the last harvest to `last_pages` (which sends them), and returns the
    /// state file a full snapshot would write, without its lineage.
    fn stop_and_copy(&self, last_pages: &mut SendPages<'_>) -> Result<Vec<u8>, String>;
}

/// Migrates the machine behind `src` (see the module documentation of `crate::migrate`).
pub fn migrate(
    src: &dyn Source,
    p: &Params,
    pause: &dyn Fn() -> Result<(), String>,
) -> Result<MigrationInfo, Failure> {
    let started = Instant::now();
    if crate::seccomp::is_strict() {
        // Control threads may not open internet sockets under strict filters (the escape
        // drills rely on it): refuse here rather than let the filter end the VM.
        return Err(Failure::from(
            "migrate-send needs a TCP connection, which the strict seccomp filter of the \
             control thread refuses: run the source monitor with --seccomp audit or off to \
             migrate it (the destination may run strict)"
                .to_string(),
        ));
    }
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
    let result = precopy_and_commit(src, p, pause, &mut conn, started);
    if let Err(f) = &result {
        if f.resume {
            src.give_back();
            // Tell the destination, if it still listens, so that it exits promptly.
            let _ = conn.send(Kind::Error, f.error.as_bytes());
        }
    }
    result
}

/// The riscv64 machine of a snapshotter, for [`migrate`].
pub struct RiscvSource<'a> {
    s: &'a RiscvSnapshotter,
    machine: std::sync::Arc<vme_riscv::Machine>,
    /// Every bitmap harvested, for [`Source::give_back`].
    kept: Mutex<Vec<DirtyBitmap>>,
}

impl<'a> RiscvSource<'a> {
    pub fn new(s: &'a RiscvSnapshotter) -> Result<RiscvSource<'a>, String> {
        let machine = s
            .machine
            .upgrade()
            .ok_or("the machine has stopped: there is nothing to migrate")?;
        Ok(RiscvSource {
            s,
            machine,
            kept: Mutex::new(Vec::new()),
        })
    }

    fn take(&self) -> Result<DirtyBitmap, String> {
        let d = self
            .s
            .handle
            .harvest_dirty()
            .ok_or("the dirty-page log is off after enabling it (interpreter bug)")?;
        lock(&self.kept).push(d.clone());
        Ok(d)
    }
}

impl Source for RiscvSource<'_> {
    fn arch(&self) -> &'static str {
        ARCH
    }

    fn ram_bytes(&self) -> u64 {
        self.machine.ram().size()
    }

    fn read(&self, off: u64, buf: &mut [u8]) -> Result<(), String> {
        let ram: &GuestRam = self.machine.ram();
        ram.read_bytes(RAM_BASE + off, buf)
            .map_err(|e| format!("cannot read guest memory: {e}"))
    }

    fn harvest(&self) -> Result<Vec<(u64, u64)>, String> {
        // From the first call on every page written is logged; the full copy reads each
        // page after it, so what that copy misses is in the next harvest.
        self.s.handle.enable_dirty_log();
        Ok(self.take()?.runs())
    }

    fn give_back(&self) {
        for b in lock(&self.kept).iter() {
            self.s.handle.remark_dirty(b);
        }
    }

    fn stop_and_copy(&self, last_pages: &mut SendPages<'_>) -> Result<Vec<u8>, String> {
        let st = self
            .s
            .handle
            .save_state(PARK_WAIT)
            .map_err(|e| format!("cannot save the machine's state: {e}"))?;
        // Devices held until the last pages are out, as a snapshot holds them (a device
        // thread that woke before the pause cannot write RAM behind our back).
        let serial = lock(&self.s.serial);
        let transports: Vec<_> = self.s.transports.iter().map(|t| lock(t)).collect();
        let w = self.s.sections(&st, &serial, &transports)?;
        last_pages(&self.take()?.runs())?;
        w.encode().map_err(|e| e.to_string())
    }
}

fn precopy_and_commit(
    src: &dyn Source,
    p: &Params,
    pause: &dyn Fn() -> Result<(), String>,
    conn: &mut Conn<TcpStream>,
    started: Instant,
) -> Result<MigrationInfo, Failure> {
    let size = src.ram_bytes();
    conn.send_parts(Kind::Begin, &[&size.to_le_bytes(), src.arch().as_bytes()])?;
    src.harvest()?;
    let mut sent = Sent::default();
    let pages = size / PAGE as u64;
    send_runs(conn, src, &[(0, pages)], true, &mut sent)?;
    let mut rounds = 1u32;
    let (mut last, mut flat) = (u64::MAX, 0u32);
    let pending = loop {
        let d = src.harvest()?;
        let n: u64 = d.iter().map(|r| r.1).sum();
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
        send_runs(conn, src, &d, false, &mut sent)?;
        rounds += 1;
    };
    pause()?;
    let paused = Instant::now();
    let before = sent.pages;
    let state = src.stop_and_copy(&mut |last| {
        send_runs(conn, src, &pending, false, &mut sent)?;
        send_runs(conn, src, last, false, &mut sent)
    })?;
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

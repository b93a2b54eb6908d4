//! What every part of a running VM shares: its run state (running, paused, stopping), why it
//! ended, and its counters. The control socket, signals and devices change the state; vCPU
//! threads (or the software machine) follow it.

use crate::console::{ConsoleOut, spawn_stdin_pump};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use vme_api::SerialSpec;
use vme_api::control::RunState;
use vme_devices::VmEvents;

/// Why a VM ended. The monitor's exit status follows from it (see [`ExitReason::exit_code`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ExitReason {
    /// The guest powered off.
    PowerOff,
    /// The guest rebooted (and `on_reboot` is `exit`, or the machine is being rebuilt).
    Reboot,
    /// `stop` on the control socket, SIGTERM or SIGINT.
    Stopped,
    /// The guest kernel panicked; the line it printed.
    Panic(String),
    /// The VM cannot continue: triple fault, failed entry, an instruction nobody can complete.
    Crash(String),
}

impl ExitReason {
    pub fn exit_code(&self) -> i32 {
        match self {
            ExitReason::PowerOff | ExitReason::Reboot | ExitReason::Stopped => 0,
            ExitReason::Crash(_) => 2,
            ExitReason::Panic(_) => 3,
        }
    }
}

/// Something that makes the VM's execution threads notice a state change promptly: x86 kicks
/// vCPUs out of `KVM_RUN`; the software machine parks or stops its harts.
pub trait ControlHook: Send + Sync {
    fn state_changed(&self, state: RunState);
}

/// The host side of the VM's balloon device, for the control socket.
pub trait BalloonControl: Send + Sync {
    /// Sets the target (bytes the guest should give back) and tells the guest.
    fn set_target(&self, bytes: u64) -> Result<(), String>;
    /// The balloon now. With `wait`, first asks the guest for fresh statistics and waits
    /// up to that long for them.
    fn status(&self, wait: Option<Duration>) -> vme_api::control::BalloonStatus;
}

/// Writes a snapshot of a paused VM (the machine kind's part of `snapshot`).
pub trait Snapshotter: Send + Sync {
    fn snapshot(&self, dir: &std::path::Path) -> Result<vme_api::control::SnapshotInfo, String>;
    /// A snapshot of the pages written since the previous one (see `snapshot::lineage`).
    fn snapshot_diff(
        &self,
        _dir: &std::path::Path,
    ) -> Result<vme_api::control::SnapshotInfo, String> {
        Err("this machine kind has no diff snapshots yet: take a full snapshot".into())
    }
    /// Live-migrates the VM (see `crate::migrate`); `pause` stops it for the final copy.
    fn migrate(
        &self,
        _p: &crate::migrate::send::Params,
        _pause: &dyn Fn() -> Result<(), String>,
    ) -> Result<vme_api::control::MigrationInfo, crate::migrate::send::Failure> {
        Err(crate::migrate::send::Failure::before_commit(
            "this machine kind has no live migration: move the VM with snapshot DIR and \
             --restore DIR on the other host",
        ))
    }
}

struct Inner {
    state: RunState,
    exit: Option<ExitReason>,
    /// Threads currently parked in [`VmControl::wait_while_paused`].
    parked: usize,
    /// A snapshot is being written: only it may pause or resume the VM meanwhile.
    snapshotting: bool,
}

pub struct VmControl {
    inner: Mutex<Inner>,
    changed: Condvar,
    // Fast-path copies of `inner.state` for vCPU loops, which check them on every exit.
    pause_requested: AtomicBool,
    stopping: AtomicBool,
    /// Threads that park themselves on pause (x86 vCPU threads); pause waits for all of them.
    parkers: AtomicU64,
    hooks: Mutex<Vec<Arc<dyn ControlHook>>>,
    power_button: Mutex<Option<Box<dyn Fn() + Send + Sync>>>,
    instructions: Mutex<Option<Box<dyn Fn() -> u64 + Send + Sync>>>,
    panic_line: Mutex<Option<String>>,
    balloon: Mutex<Option<Arc<dyn BalloonControl>>>,
    snapshotter: Mutex<Option<Arc<dyn Snapshotter>>>,
    /// Held by a snapshot, so snapshots go one at a time.
    snapshots: Mutex<()>,
    /// Disks and nets, for `status` and `set_limit`.
    pub limits: crate::limits::LimitRegistry,
    started: Instant,
    pub exits: AtomicU64,
    pub emulated_instructions: AtomicU64,
}

fn relock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every critical section leaves the state whole, so a panicked holder poisons nothing.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

const SNAPSHOT_BUSY: &str = "a snapshot is being written: pause or resume again when it is done";

/// How long `pause` waits for every vCPU to park before reporting failure.
const PAUSE_TIMEOUT: Duration = Duration::from_secs(10);

impl Default for VmControl {
    fn default() -> Self {
        Self::new()
    }
}

impl VmControl {
    pub fn new() -> Self {
        VmControl {
            inner: Mutex::new(Inner {
                state: RunState::Running,
                exit: None,
                parked: 0,
                snapshotting: false,
            }),
            changed: Condvar::new(),
            pause_requested: AtomicBool::new(false),
            stopping: AtomicBool::new(false),
            parkers: AtomicU64::new(0),
            hooks: Mutex::new(Vec::new()),
            power_button: Mutex::new(None),
            instructions: Mutex::new(None),
            panic_line: Mutex::new(None),
            balloon: Mutex::new(None),
            snapshotter: Mutex::new(None),
            snapshots: Mutex::new(()),
            limits: Default::default(),
            started: Instant::now(),
            exits: AtomicU64::new(0),
            emulated_instructions: AtomicU64::new(0),
        }
    }

    pub fn add_hook(&self, hook: Arc<dyn ControlHook>) {
        relock(&self.hooks).push(hook);
    }

    /// Declares how many threads park themselves when paused.
    pub fn set_parkers(&self, n: u64) {
        self.parkers.store(n, Ordering::SeqCst);
    }

    pub fn set_power_button(&self, press: Box<dyn Fn() + Send + Sync>) {
        *relock(&self.power_button) = Some(press);
    }

    pub fn set_instruction_counter(&self, count: Box<dyn Fn() -> u64 + Send + Sync>) {
        *relock(&self.instructions) = Some(count);
    }

    /// Registers the machine's balloon device (dropped by [`Self::reset_for_restart`]).
    pub fn set_balloon(&self, balloon: Arc<dyn BalloonControl>) {
        *relock(&self.balloon) = Some(balloon);
    }

    pub fn balloon(&self) -> Option<Arc<dyn BalloonControl>> {
        relock(&self.balloon).clone()
    }

    /// Registers the machine's snapshot writer (dropped by [`Self::reset_for_restart`]).
    pub fn set_snapshotter(&self, s: Arc<dyn Snapshotter>) {
        *relock(&self.snapshotter) = Some(s);
    }

    /// Writes a snapshot into `dir`: a running VM is paused for it and resumed after (also
    /// when the snapshot fails), a paused VM stays paused. Returns the state after.
    pub fn snapshot(
        &self,
        dir: &std::path::Path,
    ) -> Result<(RunState, vme_api::control::SnapshotInfo), String> {
        self.snapshot_as(dir, false)
    }

    /// [`Self::snapshot`] of only the pages written since the previous snapshot.
    pub fn snapshot_diff(
        &self,
        dir: &std::path::Path,
    ) -> Result<(RunState, vme_api::control::SnapshotInfo), String> {
        self.snapshot_as(dir, true)
    }

    fn snapshot_as(
        &self,
        dir: &std::path::Path,
        diff: bool,
    ) -> Result<(RunState, vme_api::control::SnapshotInfo), String> {
        let _one = relock(&self.snapshots);
        let Some(writer) = relock(&self.snapshotter).clone() else {
            return Err(
                "this VM cannot be snapshotted yet: its machine is still starting; try again \
                 in a moment"
                    .into(),
            );
        };
        let was = {
            let mut inner = relock(&self.inner);
            if inner.state == RunState::Stopping {
                return Err("the VM is stopping; it cannot be snapshotted".into());
            }
            inner.snapshotting = true;
            inner.state
        };
        let write = || match diff {
            true => writer.snapshot_diff(dir),
            false => writer.snapshot(dir),
        };
        let result = if was == RunState::Running {
            self.pause_as(true)
                .map_err(|e| format!("cannot pause the VM for the snapshot: {e}"))
                .and_then(|_| write())
        } else {
            write()
        };
        let resumed = if was == RunState::Running {
            self.resume_as(true).map(drop)
        } else {
            Ok(())
        };
        relock(&self.inner).snapshotting = false;
        resumed?;
        result.map(|info| (self.state(), info))
    }

    /// Live-migrates the VM. Nobody else may pause, resume or snapshot it meanwhile. On
    /// success the VM stays paused here for good (it runs at the destination; the caller
    /// ends this monitor); on a failure before commit a running VM is resumed.
    pub fn migrate(
        &self,
        p: &crate::migrate::send::Params,
    ) -> Result<vme_api::control::MigrationInfo, String> {
        let _one = relock(&self.snapshots);
        let Some(writer) = relock(&self.snapshotter).clone() else {
            return Err(
                "this VM cannot be migrated yet: its machine is still starting; try again in a \
                 moment"
                    .into(),
            );
        };
        let was = {
            let mut inner = relock(&self.inner);
            if inner.state == RunState::Stopping {
                return Err("the VM is stopping; it cannot be migrated".into());
            }
            inner.snapshotting = true;
            inner.state
        };
        let pause = || match was {
            RunState::Running => self
                .pause_as(true)
                .map(drop)
                .map_err(|e| format!("cannot pause the VM for the final copy: {e}")),
            _ => Ok(()),
        };
        let p = crate::migrate::send::Params {
            paused: was == RunState::Paused,
            ..p.clone()
        };
        let result = writer.migrate(&p, &pause);
        if let Err(f) = &result {
            if f.resume && was == RunState::Running {
                // The destination never got commit: the guest is still only ours.
                let _ = self.resume_as(true);
            }
            relock(&self.inner).snapshotting = false;
        }
        result.map_err(|f| f.error)
    }

    pub fn instructions_retired(&self) -> Option<u64> {
        relock(&self.instructions).as_ref().map(|f| f())
    }

    pub fn uptime(&self) -> Duration {
        self.started.elapsed()
    }

    fn notify(&self, state: RunState) {
        // Hooks are cloned out so none runs under our lock (a hook may block on its machine).
        let hooks: Vec<_> = relock(&self.hooks).clone();
        for h in hooks {
            h.state_changed(state);
        }
    }

    pub fn state(&self) -> RunState {
        relock(&self.inner).state
    }

    #[inline]
    pub fn should_stop(&self) -> bool {
        self.stopping.load(Ordering::Acquire)
    }

    #[inline]
    pub fn pause_requested(&self) -> bool {
        self.pause_requested.load(Ordering::Acquire)
    }

    /// Ends the VM. The first reason wins: a crash reported while stopping stays a stop.
    pub fn request_exit(&self, reason: ExitReason) {
        {
            let mut inner = relock(&self.inner);
            if inner.exit.is_some() {
                return;
            }
            log::debug!("VM exit requested: {reason:?}");
            inner.exit = Some(reason);
            inner.state = RunState::Stopping;
            self.stopping.store(true, Ordering::Release);
            self.pause_requested.store(false, Ordering::Release);
        }
        self.changed.notify_all();
        self.notify(RunState::Stopping);
    }

    /// Blocks until the VM has an exit reason.
    pub fn wait_for_exit(&self) -> ExitReason {
        let mut inner = relock(&self.inner);
        loop {
            if let Some(r) = &inner.exit {
                return r.clone();
            }
            inner = self.changed.wait(inner).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Pauses every vCPU and returns once all have stopped running guest code.
    pub fn pause(&self) -> Result<RunState, String> {
        self.pause_as(false)
    }

    /// `pause`, by a snapshot or by anyone else (who must wait for the snapshot).
    fn pause_as(&self, snapshot: bool) -> Result<RunState, String> {
        {
            let mut inner = relock(&self.inner);
            if inner.snapshotting && !snapshot {
                return Err(SNAPSHOT_BUSY.into());
            }
            match inner.state {
                RunState::Stopping => return Err("the VM is stopping; it cannot be paused".into()),
                RunState::Paused => return Ok(RunState::Paused),
                RunState::Running => {}
            }
            inner.state = RunState::Paused;
            self.pause_requested.store(true, Ordering::Release);
        }
        self.notify(RunState::Paused);
        let deadline = Instant::now() + PAUSE_TIMEOUT;
        let mut inner = relock(&self.inner);
        let want = self.parkers.load(Ordering::SeqCst) as usize;
        while inner.parked < want && inner.state == RunState::Paused {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(format!(
                    "only {} of {want} vCPUs stopped within {PAUSE_TIMEOUT:?}; the VM stays marked paused, send resume to undo",
                    inner.parked
                ));
            }
            inner = self
                .changed
                .wait_timeout(inner, left)
                .map(|(g, _)| g)
                .unwrap_or_else(|p| {
                    let (g, _) = p.into_inner();
                    g
                });
        }
        Ok(inner.state)
    }

    pub fn resume(&self) -> Result<RunState, String> {
        self.resume_as(false)
    }

    fn resume_as(&self, snapshot: bool) -> Result<RunState, String> {
        {
            let mut inner = relock(&self.inner);
            if inner.snapshotting && !snapshot {
                return Err(SNAPSHOT_BUSY.into());
            }
            match inner.state {
                RunState::Stopping => return Err("the VM is stopping; it cannot be resumed".into()),
                RunState::Running => return Ok(RunState::Running),
                RunState::Paused => {}
            }
            inner.state = RunState::Running;
            self.pause_requested.store(false, Ordering::Release);
        }
        self.changed.notify_all();
        self.notify(RunState::Running);
        Ok(RunState::Running)
    }

    /// Called by a vCPU thread that saw [`Self::pause_requested`]: blocks (using no CPU) until
    /// the VM is resumed or stopping.
    pub fn wait_while_paused(&self) {
        let mut inner = relock(&self.inner);
        if inner.state != RunState::Paused {
            return;
        }
        inner.parked += 1;
        self.changed.notify_all();
        while inner.state == RunState::Paused {
            inner = self.changed.wait(inner).unwrap_or_else(|p| p.into_inner());
        }
        inner.parked -= 1;
    }

    /// Asks the guest to power off (ACPI power button on x86).
    pub fn press_power_button(&self) -> Result<(), String> {
        if self.state() == RunState::Paused {
            return Err("the VM is paused: resume it first, or use stop".into());
        }
        match relock(&self.power_button).as_ref() {
            Some(press) => {
                press();
                Ok(())
            }
            None => Err("this machine has no power button: use stop to end it".into()),
        }
    }

    /// Remembers a kernel panic line seen on the console, so a reboot that follows it is
    /// reported as the panic it is.
    pub fn saw_panic(&self, line: String) {
        relock(&self.panic_line).get_or_insert(line);
    }
}

impl VmControl {
    /// Makes the control ready for a rebuilt machine after a guest reboot: the old machine's
    /// hooks and counters go, the exit reason is cleared.
    pub fn reset_for_restart(&self) {
        relock(&self.hooks).clear();
        *relock(&self.power_button) = None;
        *relock(&self.instructions) = None;
        *relock(&self.panic_line) = None;
        *relock(&self.balloon) = None;
        *relock(&self.snapshotter) = None;
        self.limits.clear();
        self.parkers.store(0, Ordering::SeqCst);
        let mut inner = relock(&self.inner);
        inner.exit = None;
        inner.state = RunState::Running;
        inner.parked = 0;
        inner.snapshotting = false;
        self.stopping.store(false, Ordering::Release);
        self.pause_requested.store(false, Ordering::Release);
    }
}

/// What a machine kind's `run` gets besides the spec: the shared control, and the console.
pub struct RunContext {
    pub control: Arc<VmControl>,
    pub serial: SerialSpec,
    /// The socket console, made once per monitor so it outlives guest reboots.
    pub console: Option<Arc<crate::console_socket::ConsoleHub>>,
}

impl RunContext {
    /// The serial device's output sink (stdout, a file or nowhere; watched for panics).
    pub fn console_output(&self) -> std::io::Result<Box<dyn std::io::Write + Send>> {
        Ok(Box::new(ConsoleOut::open(
            &self.serial,
            self.console.as_ref(),
            self.control.clone(),
        )?))
    }

    /// Feeds the host's stdin (console on stdio) or the socket console's client to the
    /// guest's UART.
    pub fn attach_console_input(&self, serial: Arc<Mutex<vme_devices::serial::Serial>>) {
        if let Some(hub) = &self.console {
            hub.set_serial(serial);
        } else if self.serial == SerialSpec::Stdio {
            spawn_stdin_pump(serial, self.control.clone());
        }
    }
}

impl VmEvents for VmControl {
    fn power_off(&self) {
        self.request_exit(ExitReason::PowerOff);
    }

    fn reboot(&self) {
        let panic = relock(&self.panic_line).clone();
        self.request_exit(match panic {
            Some(line) => ExitReason::Panic(line),
            None => ExitReason::Reboot,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::thread;

    #[test]
    fn pause_waits_for_parkers_and_resume_releases_them() {
        let ctl = Arc::new(VmControl::new());
        ctl.set_parkers(2);
        let spins = Arc::new(AtomicU64::new(0));
        let workers: Vec<_> = (0..2)
            .map(|_| {
                let (ctl, spins) = (ctl.clone(), spins.clone());
                thread::spawn(move || {
                    while !ctl.should_stop() {
                        if ctl.pause_requested() {
                            ctl.wait_while_paused();
                        }
                        spins.fetch_add(1, Ordering::Relaxed);
                        thread::yield_now();
                    }
                })
            })
            .collect();
        assert_eq!(ctl.pause(), Ok(RunState::Paused));
        let frozen = spins.load(Ordering::SeqCst);
        thread::sleep(Duration::from_millis(50));
        assert_eq!(
            spins.load(Ordering::SeqCst),
            frozen,
            "paused threads do no work"
        );
        assert_eq!(ctl.resume(), Ok(RunState::Running));
        thread::sleep(Duration::from_millis(20));
        assert!(spins.load(Ordering::SeqCst) > frozen);
        ctl.request_exit(ExitReason::Stopped);
        for w in workers {
            w.join().unwrap();
        }
        assert_eq!(ctl.wait_for_exit(), ExitReason::Stopped);
        assert!(ctl.pause().is_err());
    }

    /// Records the VM's state while it writes, and what a resume then gets.
    struct Probe(std::sync::Weak<VmControl>, Mutex<Vec<String>>);

    impl Snapshotter for Probe {
        fn snapshot(&self, _: &std::path::Path) -> Result<vme_api::control::SnapshotInfo, String> {
            let ctl = self.0.upgrade().unwrap();
            let mut seen = self.1.lock().unwrap();
            seen.push(format!("{:?}", ctl.state()));
            seen.push(ctl.resume().unwrap_err());
            Ok(Default::default())
        }
    }

    #[test]
    fn a_snapshot_pauses_a_running_vm_and_leaves_a_paused_one_paused() {
        let ctl = Arc::new(VmControl::new());
        let dir = std::path::Path::new("/nowhere");
        assert!(
            ctl.snapshot(dir)
                .unwrap_err()
                .contains("cannot be snapshotted")
        );
        let probe = Arc::new(Probe(Arc::downgrade(&ctl), Mutex::new(Vec::new())));
        ctl.set_snapshotter(probe.clone());
        assert_eq!(ctl.snapshot(dir).unwrap().0, RunState::Running);
        assert_eq!(ctl.pause(), Ok(RunState::Paused));
        assert_eq!(ctl.snapshot(dir).unwrap().0, RunState::Paused);
        let seen = probe.1.lock().unwrap().clone();
        assert_eq!(seen[0], "Paused", "written while paused");
        assert!(seen[1].contains("snapshot is being written"), "{}", seen[1]);
        assert_eq!(seen[2], "Paused");
        assert_eq!(ctl.resume(), Ok(RunState::Running), "free again after");
    }

    #[test]
    fn first_exit_reason_wins_and_panics_are_named() {
        let ctl = VmControl::new();
        ctl.saw_panic("Kernel panic - not syncing: Attempted to kill init!".into());
        ctl.reboot();
        ctl.power_off();
        let r = ctl.wait_for_exit();
        assert!(matches!(&r, ExitReason::Panic(l) if l.contains("kill init")));
        assert_eq!(r.exit_code(), 3);
    }

    #[test]
    fn resume_ends_a_pause_that_is_still_waiting_for_vcpus() {
        let ctl = Arc::new(VmControl::new());
        ctl.set_parkers(1);
        let c2 = ctl.clone();
        let t = thread::spawn(move || {
            thread::sleep(Duration::from_millis(50));
            c2.resume().unwrap();
        });
        // Resume ends the wait early with the state it left.
        assert_eq!(ctl.pause(), Ok(RunState::Running));
        t.join().unwrap();
    }
}

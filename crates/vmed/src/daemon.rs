//! The daemon's operations on VMs: create, start, stop, pause, resume, restart, delete, and
//! the supervision of each VM's `vme-vmm` process. Every operation checks the lifecycle
//! first, records the transient state before acting (so the store always says what was being
//! done), and talks to a monitor only through its control socket.
//!
//! Blocking by design (process waits, control-socket calls): the HTTP layer runs these on
//! tokio's blocking pool.

use crate::admission::{Host, Load, Ratios};
use crate::lifecycle::{self, Action, Illegal, State};
use crate::store::{Store, StoreError, VmRecord};
use crate::validate;
use std::collections::{HashMap, HashSet};
use std::fs;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use vme_api::SerialSpec;
use vme_api::control::{self, Request};

/// How much of a console log the API returns.
const CONSOLE_TAIL: u64 = 64 * 1024;
/// How long a control-socket request may take before the monitor counts as unresponsive.
const CONTROL_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a new monitor has to answer its control socket.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// After `stop` (or a kill), how long the monitor has to exit.
const FORCE_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum OpError {
    #[error("{0}")]
    BadRequest(String),
    #[error(transparent)]
    Illegal(#[from] Illegal),
    #[error("an operation on VM {0:?} is already in progress: wait for it to finish and retry")]
    Busy(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The host cannot take it (admission); names the numbers.
    #[error("{0}")]
    Capacity(String),
    #[error("{0}")]
    Failed(String),
    /// The VM is not in a state that allows it (409, with the state).
    #[error("{msg}")]
    NotRunning { msg: String, state: State },
    /// The guest (its agent, its console) does not answer (503).
    #[error("{0}")]
    Unavailable(String),
}

/// Options of the daemon that shape supervision.
#[derive(Debug, Clone)]
pub struct Config {
    pub state_dir: PathBuf,
    /// The `vme-vmm` binary.
    pub vmm: PathBuf,
    /// How long a guest has to power off after the ACPI power button before it is stopped.
    pub stop_timeout: Duration,
    /// What VMs may be given in all (see [`crate::admission`]).
    pub host: Host,
    pub ratios: Ratios,
    /// The cap of each VM's console log, in bytes.
    pub console_log_size: u64,
}

/// One live monitor process.
pub(crate) struct Monitor {
    pid: u32,
    control: PathBuf,
    /// When the daemon started (or adopted) it.
    since: Instant,
}

/// A VM that ran this long before its monitor exited starts its restart backoff afresh.
const STABLE: Duration = Duration::from_secs(60);

pub struct Daemon {
    cfg: Config,
    store: Mutex<Box<dyn Store>>,
    /// Live monitors by VM name; a waiter thread removes its entry when the process exits
    /// and signals `exited`.
    monitors: Mutex<HashMap<String, Monitor>>,
    exited: Condvar,
    /// VMs with an operation in progress: one at a time per VM, so two starts cannot race.
    busy: Mutex<HashSet<String>>,
    /// Automatic restarts in a row, per VM (for the backoff).
    restarts: Mutex<HashMap<String, u32>>,
}

/// Marks a VM busy for the length of an operation.
struct BusyGuard<'a> {
    daemon: &'a Daemon,
    name: String,
}

impl Drop for BusyGuard<'_> {
    fn drop(&mut self) {
        lock(&self.daemon.busy).remove(&self.name);
    }
}

/// Locks a mutex even if a thread panicked holding it: the data are simple records whose
/// every update is a single assignment, so they stay consistent.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Daemon {
    /// Takes over the store and reconciles it with the monitors that still run (see
    /// [`crate::reconcile`]): a daemon's restart takes down no VM.
    pub fn new(cfg: Config, store: Box<dyn Store>) -> Result<Arc<Daemon>, StoreError> {
        let daemon = Arc::new(Daemon {
            cfg,
            store: Mutex::new(store),
            monitors: Mutex::new(HashMap::new()),
            exited: Condvar::new(),
            busy: Mutex::new(HashSet::new()),
            restarts: Mutex::new(HashMap::new()),
        });
        crate::reconcile::run(&daemon)?;
        Ok(daemon)
    }

    pub(crate) fn config(&self) -> &Config {
        &self.cfg
    }

    pub(crate) fn store(&self) -> MutexGuard<'_, Box<dyn Store>> {
        lock(&self.store)
    }

    /// Lists a live monitor, whose exit the caller's thread will report with [`Self::exited`].
    pub(crate) fn watch(&self, name: &str, pid: u32) {
        let control = control_path(&self.cfg.state_dir, name);
        lock(&self.monitors).insert(
            name.to_string(),
            Monitor {
                pid,
                control,
                since: Instant::now(),
            },
        );
    }

    fn begin(&self, name: &str) -> Result<BusyGuard<'_>, OpError> {
        if !lock(&self.busy).insert(name.to_string()) {
            return Err(OpError::Busy(name.into()));
        }
        Ok(BusyGuard {
            daemon: self,
            name: name.into(),
        })
    }

    pub fn list(&self) -> Result<Vec<VmRecord>, OpError> {
        Ok(lock(&self.store).list()?)
    }

    pub fn metrics(&self) -> Result<String, OpError> {
        let vms = self.list()?;
        Ok(crate::metrics::render(&vms, self.cfg.host, self.cfg.ratios))
    }

    pub fn get(&self, name: &str) -> Result<VmRecord, OpError> {
        validate::name(name).map_err(OpError::BadRequest)?;
        Ok(lock(&self.store).get(name)?)
    }

    /// The last [`CONSOLE_TAIL`] bytes the VM's serial console printed (empty before its
    /// first start).
    pub fn console_log(&self, name: &str) -> Result<String, OpError> {
        self.get(name)?;
        let path = vm_dir(&self.cfg.state_dir, name).join("console.log");
        match vme_api::console_log::read_tail(&path, CONSOLE_TAIL) {
            Ok(t) => Ok(String::from_utf8_lossy(&t).into_owned()),
            Err(e) => Err(OpError::Failed(format!(
                "cannot read {}: {e}",
                path.display()
            ))),
        }
    }

    pub fn create(&self, req: &validate::CreateVm) -> Result<VmRecord, OpError> {
        let mut spec = validate::create(req).map_err(OpError::BadRequest)?;
        self.cfg
            .host
            .admits(self.cfg.ratios, load(&spec))
            .map_err(OpError::BadRequest)?;
        let mut store = lock(&self.store);
        let others = store.list()?;
        if !others.iter().any(|v| v.name == req.name) {
            let uds = crate::guest::vsock_socket(&self.cfg.state_dir, &req.name);
            crate::devices::assign(&mut spec, req.vsock.unwrap_or(true), uds, &others)
                .map_err(OpError::BadRequest)?;
        }
        Ok(store.create(&req.name, &spec, req.restart_policy)?)
    }

    /// Checks `action` against the VM's state and, if allowed, records the state it begins in.
    fn transition(&self, name: &str, action: Action) -> Result<VmRecord, OpError> {
        let mut store = lock(&self.store);
        let vm = store.get(name)?;
        lifecycle::check(vm.state, action)?;
        if action == Action::Start {
            // Under the store's lock, so two starts cannot both take the last capacity.
            let running = store.list()?.iter().filter(|v| v.state.has_monitor()).fold(
                Load::default(),
                |sum, v| {
                    let l = load(&v.spec);
                    Load {
                        vcpus: sum.vcpus + l.vcpus,
                        memory: sum.memory + l.memory,
                    }
                },
            );
            self.cfg
                .host
                .admits_next_to(self.cfg.ratios, running, load(&vm.spec))
                .map_err(|e| OpError::Capacity(format!("cannot start VM {name:?}: {e}")))?;
        }
        if let Some(next) = lifecycle::begins(action) {
            store.set_state(name, next, "")?;
        }
        Ok(vm)
    }

    fn set_state(&self, name: &str, state: State, reason: &str) -> Result<(), OpError> {
        Ok(lock(&self.store).set_state(name, state, reason)?)
    }

    /// Moves the VM back from `now` to `back` after a failed pause or resume, unless its
    /// monitor's exit has been recorded meanwhile (that record must stay).
    fn revert(&self, name: &str, now: State, back: State) -> Result<(), OpError> {
        let mut store = lock(&self.store);
        if store.get(name)?.state == now {
            store.set_state(name, back, "")?;
        }
        Ok(())
    }

    /// Carries out a state action (`PUT /1.0/vms/NAME/state`) and returns the VM after it.
    pub fn act(
        self: &Arc<Self>,
        name: &str,
        action: Action,
        force: bool,
    ) -> Result<VmRecord, OpError> {
        validate::name(name).map_err(OpError::BadRequest)?;
        let _busy = self.begin(name)?;
        match action {
            Action::Start => self.start(name)?,
            Action::Stop => self.stop(name, force)?,
            Action::Pause => self.control_action(name, action, Request::Pause, State::Running)?,
            Action::Resume => self.control_action(name, action, Request::Resume, State::Paused)?,
            Action::Restart => {
                // Checked as a restart: stop alone allows more (a VM still starting).
                lifecycle::check(lock(&self.store).get(name)?.state, Action::Restart)?;
                self.stop(name, force)?;
                self.start(name)?;
            }
            Action::Delete => {
                return Err(OpError::BadRequest(
                    "delete is not a state action: send DELETE /1.0/vms/NAME".into(),
                ));
            }
        }
        self.get(name)
    }

    pub fn delete(&self, name: &str) -> Result<(), OpError> {
        validate::name(name).map_err(OpError::BadRequest)?;
        let _busy = self.begin(name)?;
        self.transition(name, Action::Delete)?;
        let dir = vm_dir(&self.cfg.state_dir, name);
        if let Err(e) = fs::remove_dir_all(&dir) {
            if e.kind() != std::io::ErrorKind::NotFound {
                return Err(OpError::Failed(format!(
                    "cannot remove {}: {e}; fix its permissions and delete again",
                    dir.display()
                )));
            }
        }
        Ok(lock(&self.store).delete(name)?)
    }

    /// Pause or resume: one control request, then the state it leads to. On failure the VM
    /// goes back to `from`, the state the monitor is still in.
    fn control_action(
        &self,
        name: &str,
        action: Action,
        req: Request,
        from: State,
    ) -> Result<(), OpError> {
        self.transition(name, action)?;
        let to = lifecycle::begins(action).unwrap_or(from);
        let Some(path) = lock(&self.monitors).get(name).map(|m| m.control.clone()) else {
            return Err(OpError::Failed(format!("VM {name:?} has no monitor")));
        };
        match control::call(&path, &req, CONTROL_TIMEOUT) {
            Ok(r) if r.ok => Ok(()),
            Ok(r) => {
                self.revert(name, to, from)?;
                Err(OpError::Failed(format!(
                    "the monitor refused to {action}: {}",
                    r.error.unwrap_or_default()
                )))
            }
            Err(e) => {
                self.revert(name, to, from)?;
                Err(OpError::Failed(format!("cannot {action} VM {name:?}: {e}")))
            }
        }
    }

    /// Spawns the VM's monitor from its spec and waits until its control socket answers.
    fn start(self: &Arc<Self>, name: &str) -> Result<(), OpError> {
        let vm = self.transition(name, Action::Start)?;
        let fail = |msg: String| -> OpError {
            let _ = self.set_state(name, State::Crashed, &msg);
            OpError::Failed(msg)
        };
        let dir = vm_dir(&self.cfg.state_dir, name);
        let control_sock = control_path(&self.cfg.state_dir, name);
        let mut spec = vm.spec.clone();
        spec.control_socket = Some(control_sock.clone());
        // The console belongs to the monitor, so it survives a restart of this daemon.
        spec.serial = SerialSpec::Socket {
            path: crate::guest::console_socket(&self.cfg.state_dir, name),
            log: Some(dir.join("console.log")),
            log_size: self.cfg.console_log_size,
        };
        let machine = machine_file(&self.cfg.state_dir, name);
        let log = monitor_log(&self.cfg.state_dir, name);
        let prepared = fs::create_dir_all(&dir)
            .and_then(|()| match fs::remove_file(&control_sock) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
                _ => Ok(()),
            })
            .and_then(|()| fs::write(&machine, spec.to_toml()))
            .and_then(|()| fs::File::create(&log));
        let log_file = prepared.map_err(|e| {
            fail(format!(
                "cannot prepare {}: {e}; check the state dir's permissions and free space",
                dir.display()
            ))
        })?;
        let child = Command::new(&self.cfg.vmm)
            .arg("--config")
            .arg(&machine)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file)
            // Its own process group: a Ctrl-C meant for the daemon must not reach the VMs.
            .process_group(0)
            .spawn()
            .map_err(|e| {
                fail(format!(
                    "cannot run the monitor {}: {e}; install vme-vmm next to vmed or pass --vmm PATH",
                    self.cfg.vmm.display()
                ))
            })?;
        let pid = child.id();
        // Recorded so a restarted daemon can find the monitor again (a failure here only
        // costs that, so it does not fail the start); before the waiter starts, so that an
        // immediate exit's pid 0 is the last word.
        let _ = lock(&self.store).set_pid(name, pid);
        self.watch(name, pid);
        let me = Arc::clone(self);
        let n = name.to_string();
        std::thread::spawn(move || me.supervise(n, child, log));

        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if !lock(&self.monitors).contains_key(name) {
                let reason = lock(&self.store)
                    .get(name)
                    .map(|v| v.reason)
                    .unwrap_or_default();
                return Err(OpError::Failed(format!(
                    "VM {name:?} failed to start: {reason}"
                )));
            }
            if let Ok(r) = control::call(&control_sock, &Request::Status, CONTROL_TIMEOUT) {
                if r.ok {
                    break;
                }
            }
            if Instant::now() > deadline {
                kill(pid);
                self.wait_exit(name, FORCE_TIMEOUT);
                return Err(fail(format!(
                    "the monitor of VM {name:?} did not answer its control socket within {}s; \
                     it was killed: see {}",
                    START_TIMEOUT.as_secs(),
                    dir.join("monitor.log").display()
                )));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let mut store = lock(&self.store);
        // The monitor may have exited between its answer and now; the waiter recorded that.
        if store.get(name)?.state == State::Starting {
            store.set_state(name, State::Running, "")?;
        }
        Ok(())
    }

    /// Stops the VM: the ACPI power button, then (after the stop timeout, or at once with
    /// `force`) the monitor's `stop`, then SIGKILL. Returns when the monitor has exited.
    fn stop(&self, name: &str, force: bool) -> Result<(), OpError> {
        let was = self.transition(name, Action::Stop)?.state;
        // A paused guest cannot see the power button: asking it would only wait out the
        // timeout. A starting one may not have its ACPI driver yet: same.
        let force = force || was != State::Running;
        let Some((pid, path)) = lock(&self.monitors)
            .get(name)
            .map(|m| (m.pid, m.control.clone()))
        else {
            // Nothing to stop (the monitor exited a moment ago).
            self.set_state(name, State::Stopped, "")?;
            return Ok(());
        };
        if !force {
            // A guest without ACPI support ignores the button; the timeout then applies.
            let _ = control::call(&path, &Request::Shutdown, CONTROL_TIMEOUT);
            if self.wait_exit(name, self.cfg.stop_timeout) {
                return Ok(());
            }
        }
        let _ = control::call(&path, &Request::Stop, CONTROL_TIMEOUT);
        if self.wait_exit(name, FORCE_TIMEOUT) {
            return Ok(());
        }
        kill(pid);
        if self.wait_exit(name, FORCE_TIMEOUT) {
            return Ok(());
        }
        Err(OpError::Failed(format!(
            "the monitor of VM {name:?} (pid {pid}) survived SIGKILL; check the host (it may be \
             stuck in the kernel)"
        )))
    }

    /// Waits up to `timeout` for the VM's monitor to exit; true when it has.
    fn wait_exit(&self, name: &str, timeout: Duration) -> bool {
        let monitors = lock(&self.monitors);
        let (m, _) = self
            .exited
            .wait_timeout_while(monitors, timeout, |m| m.contains_key(name))
            .unwrap_or_else(|e| e.into_inner());
        !m.contains_key(name)
    }

    /// Runs on its own thread for each monitor: waits for the process to exit and records
    /// what its exit means for the VM.
    fn supervise(self: Arc<Self>, name: String, mut child: Child, log: PathBuf) {
        let status = child.wait();
        let (clean, how) = match &status {
            Ok(s) if s.success() => (true, String::new()),
            Ok(s) => (false, describe(s)),
            Err(e) => (false, format!("could not be waited for: {e}")),
        };
        self.exited(&name, clean, &how, &log);
    }

    /// Records a monitor's exit: the state it leaves the VM in (with the log's tail as the
    /// reason of a crash), no pid, and no live monitor; wakes whoever waits for it.
    pub(crate) fn exited(self: &Arc<Self>, name: &str, clean: bool, how: &str, log: &Path) {
        let mut restart = false;
        {
            let mut store = lock(&self.store);
            if let Ok(vm) = store.get(name) {
                let next = lifecycle::after_exit(vm.state, clean);
                restart = vm
                    .restart_policy
                    .restarts(vm.state == State::Stopping, next);
                let reason = if next == State::Crashed {
                    format!("the monitor {how}: {}", tail(log))
                } else {
                    String::new()
                };
                let _ = store.set_state(name, next, &reason);
                let _ = store.set_pid(name, 0);
            }
        }
        let started = lock(&self.monitors).remove(name).map(|m| m.since);
        self.exited.notify_all();
        if restart {
            self.restart_later(name, started);
        }
    }

    /// Starts a VM again after its restart policy's backoff. Restarts in a row (the VM ran
    /// less than [`STABLE`] each time) wait longer and longer; a user's action in between
    /// wins (the start is then refused by the lifecycle and dropped).
    fn restart_later(self: &Arc<Self>, name: &str, started: Option<Instant>) {
        let attempt = {
            let mut tries = lock(&self.restarts);
            let n = tries.entry(name.to_string()).or_insert(0);
            if started.is_some_and(|t| t.elapsed() >= STABLE) {
                *n = 0;
            }
            *n += 1;
            *n - 1
        };
        let (me, name) = (Arc::clone(self), name.to_string());
        std::thread::spawn(move || {
            std::thread::sleep(lifecycle::backoff(attempt));
            let _ = me.act(&name, Action::Start, false);
        });
    }
}

fn load(spec: &vme_api::MachineSpec) -> Load {
    Load {
        vcpus: u64::from(spec.vcpus),
        memory: spec.memory.bytes(),
    }
}

fn describe(s: &std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (s.code(), s.signal()) {
        (Some(c), _) => format!("exited with status {c}"),
        (None, Some(sig)) => format!("was killed by signal {sig}"),
        _ => "exited".into(),
    }
}

/// The last `max` bytes of a file, as text.
fn read_tail(path: &Path, max: u64) -> std::io::Result<String> {
    let mut f = fs::File::open(path)?;
    let len = f.metadata()?.len();
    f.seek(SeekFrom::Start(len.saturating_sub(max)))?;
    let mut buf = Vec::new();
    f.read_to_end(&mut buf)?;
    Ok(String::from_utf8_lossy(&buf).into_owned())
}

/// The last lines of a monitor's log, for a crash reason.
pub(crate) fn tail(path: &Path) -> String {
    let text = read_tail(path, 1024).unwrap_or_default().trim().to_string();
    if text.is_empty() {
        format!("(nothing in {})", path.display())
    } else {
        text
    }
}

fn kill(pid: u32) {
    // SAFETY: kill(2) takes plain integers and touches no memory of ours. The pid is a
    // monitor's; callers only kill monitors still listed as live, so it exited at most a
    // moment before (its waiter removes the entry right after) and pids are not reused that
    // fast in practice. Killing through the waiter's pidfd would close even that window.
    unsafe {
        libc::kill(pid as libc::pid_t, libc::SIGKILL);
    }
}

pub fn monitor_log(state_dir: &Path, name: &str) -> PathBuf {
    vm_dir(state_dir, name).join("monitor.log")
}

pub fn machine_file(state_dir: &Path, name: &str) -> PathBuf {
    vm_dir(state_dir, name).join("machine.toml")
}

pub fn vm_dir(state_dir: &Path, name: &str) -> PathBuf {
    state_dir.join("vms").join(name)
}

pub fn control_path(state_dir: &Path, name: &str) -> PathBuf {
    vm_dir(state_dir, name).join("control.sock")
}

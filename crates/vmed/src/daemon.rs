//! The daemon's operations on VMs: create, start, stop, pause, resume, restart, delete, and
//! the supervision of each VM's `vme-vmm` process. Every operation checks the lifecycle
//! first, records the transient state before acting (so the store always says what was being
//! done), and talks to a monitor only through its control socket.
//!
//! Blocking by design (process waits, control-socket calls): the HTTP layer runs these on
//! tokio's blocking pool.
//!
//! Each long action is an [`Operation`](crate::operations): checked first (a refusal is an
//! error then, before any operation exists), then carried out as a [`Task`] that records its
//! end in the operation. Every store write goes through [`Published`], so every state change
//! is a lifecycle event on [`Daemon::events`].

use crate::admission::{Host, Load, Ratios};
use crate::cgroup::{self, CgroupConfig};
use crate::events::{self, Events, Published};
use crate::lifecycle::{self, Action, Illegal, State};
use crate::operations::{Op, Operations};
use crate::store::{Store, StoreError, VmId, VmRecord};
use crate::validate;
use serde_json::{Value, json};
use std::collections::HashMap;
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
    /// A policy refuses it (403), like an unsigned image under `require_signed`.
    #[error("{0}")]
    Forbidden(String),
    /// What it needs is in a state that prevents it (409), like a corrupted image.
    #[error("{0}")]
    Conflict(String),
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
    pub cgroups: CgroupConfig,
    /// How often each VM's usage is sampled, and how long samples are kept.
    pub sample_interval: Duration,
    pub usage_retention: Duration,
    /// The cap of each VM's console log, in bytes.
    pub console_log_size: u64,
    /// The image repository's limits and signature policy.
    pub images: crate::images::ImageConfig,
    /// The security label levels, lowest first.
    pub labels: crate::labels::Levels,
    /// The uids (= gids) jailed monitors get, one per VM (see [`crate::jail`]).
    pub jail_ids: std::ops::RangeInclusive<u32>,
    /// How projects' networks are built (see [`crate::network`]).
    pub network: crate::network::NetConfig,
}

/// One live monitor process.
pub(crate) struct Monitor {
    pub(crate) pid: u32,
    control: PathBuf,
    /// When the daemon started (or adopted) it.
    since: Instant,
    /// Its cgroup, when it has one (removed once it exits).
    pub(crate) cgroup: Option<PathBuf>,
    /// Its VM's taps, for the network counters.
    pub(crate) taps: Vec<String>,
}

/// A VM that ran this long before its monitor exited starts its restart backoff afresh.
const STABLE: Duration = Duration::from_secs(60);

pub struct Daemon {
    cfg: Config,
    store: Mutex<Box<dyn Store>>,
    /// Live monitors by VM name; a waiter thread removes its entry when the process exits
    /// and signals `exited`.
    pub(crate) monitors: Mutex<HashMap<String, Monitor>>,
    exited: Condvar,
    /// VMs with an operation in progress, with what it does: one at a time per VM, so two
    /// starts cannot race.
    busy: Arc<Mutex<HashMap<String, &'static str>>>,
    /// Automatic restarts in a row, per VM (for the backoff).
    restarts: Mutex<HashMap<String, u32>>,
    /// Lifecycle and operation events (`GET /1.0/events`).
    pub events: Events,
    /// The operations running and recently ended (`GET /1.0/operations`).
    pub ops: Operations,
    /// Each live VM's last usage sample (see [`crate::accounting`]).
    pub(crate) last_samples: Mutex<HashMap<String, crate::usage::Sample>>,
    /// Held by prune and image deletion, one at a time.
    pub(crate) image_lock: Mutex<()>,
    /// The blobs of the imports running now, with how many claim each: prune and delete
    /// leave them alone, and an import cut short removes only blobs no other one claims.
    pub(crate) image_claims: Mutex<HashMap<vme_image::Digest, usize>>,
    /// The audit log, once the binary has opened it (see [`crate::audit`]).
    pub audit: std::sync::OnceLock<Arc<crate::audit::AuditLog>>,
    /// Access control's in-memory part (label levels, tokens already checked).
    pub auth: crate::authz::AuthState,
}

/// Marks a VM busy for the length of an operation (it may move to another thread with it).
pub(crate) struct BusyGuard {
    busy: Arc<Mutex<HashMap<String, &'static str>>>,
    name: String,
}

impl Drop for BusyGuard {
    fn drop(&mut self) {
        lock(&self.busy).remove(&self.name);
    }
}

/// A long action, checked and made an operation, to be carried out (blocking) by
/// [`Task::run`]: at once for a synchronous request, in the background for `?async=true`.
pub struct Task {
    pub op: Arc<Op>,
    work: Box<dyn FnOnce() -> Result<Value, OpError> + Send>,
    _unfinished: Unfinished,
}

/// Ends a task's operation as failed if the task is dropped before it ends (its work
/// panicked, or never ran because vmed is shutting down). A normal end comes first and wins:
/// only an operation's first end counts.
struct Unfinished(Arc<Op>);

impl Drop for Unfinished {
    fn drop(&mut self) {
        self.0.finish(Err(
            "the operation ended unexpectedly (vmed failed or is shutting down); see the \
             daemon's log, then check the VM's state"
                .into(),
        ));
    }
}

impl Task {
    fn new(op: Arc<Op>, work: impl FnOnce() -> Result<Value, OpError> + Send + 'static) -> Task {
        Task {
            _unfinished: Unfinished(Arc::clone(&op)),
            op,
            work: Box::new(work),
        }
    }

    /// Does the work and records its end in the operation; returns what the work returned.
    pub fn run(self) -> Result<Value, OpError> {
        let r = (self.work)();
        self.op
            .finish(r.as_ref().map(Clone::clone).map_err(ToString::to_string));
        r
    }
}

/// What an operation carrying out `action` is called.
fn describe_action(action: Action, name: &str) -> String {
    let verb = match action {
        Action::Start => "Starting",
        Action::Stop => "Stopping",
        Action::Pause => "Pausing",
        Action::Resume => "Resuming",
        Action::Restart => "Restarting",
        Action::Delete => "Deleting",
    };
    format!("{verb} VM {name}")
}

/// Locks a mutex even if a thread panicked holding it: the data are simple records whose
/// every update is a single assignment, so they stay consistent.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Holds the store; when dropped, releases it and then waits until what was written
/// through it is on disk. Writers flush outside the lock, so concurrent requests share
/// one flush (group commit) instead of queueing one flush each behind the lock; and
/// nobody acts on or replies about a write before it is durable, as long as they drop
/// the guard first (every write site here ends its guard's scope before acting).
pub(crate) struct StoreGuard<'a> {
    guard: Option<MutexGuard<'a, Box<dyn Store>>>,
    /// The store's write mark when the guard was taken.
    mark: u64,
}

impl std::ops::Deref for StoreGuard<'_> {
    type Target = Box<dyn Store>;
    fn deref(&self) -> &Self::Target {
        self.guard
            .as_ref()
            .expect("the guard is taken only in drop")
    }
}

impl std::ops::DerefMut for StoreGuard<'_> {
    fn deref_mut(&mut self) -> &mut Self::Target {
        self.guard
            .as_mut()
            .expect("the guard is taken only in drop")
    }
}

impl Drop for StoreGuard<'_> {
    fn drop(&mut self) {
        let Some(guard) = self.guard.take() else {
            return;
        };
        let mark = guard.write_mark();
        let barrier = (mark != self.mark).then(|| guard.barrier()).flatten();
        drop(guard);
        if let Some(b) = barrier {
            b.sync(mark);
        }
    }
}

impl Daemon {
    /// Takes over the store and reconciles it with the monitors that still run (see
    /// [`crate::reconcile`]): a daemon's restart takes down no VM.
    pub fn new(cfg: Config, store: Box<dyn Store>) -> Result<Arc<Daemon>, StoreError> {
        let events = Events::new();
        let daemon = Arc::new(Daemon {
            store: Mutex::new(Box::new(Published::new(store, events.clone()))),
            monitors: Mutex::new(HashMap::new()),
            exited: Condvar::new(),
            busy: Arc::new(Mutex::new(HashMap::new())),
            restarts: Mutex::new(HashMap::new()),
            ops: Operations::new(events.clone()),
            events,
            last_samples: Mutex::new(HashMap::new()),
            image_lock: Mutex::new(()),
            image_claims: Mutex::new(HashMap::new()),
            audit: std::sync::OnceLock::new(),
            auth: crate::authz::AuthState::new(cfg.labels.clone()),
            cfg,
        });
        crate::reconcile::run(&daemon)?;
        crate::accounting::spawn_sampler(&daemon);
        Ok(daemon)
    }

    pub(crate) fn config(&self) -> &Config {
        &self.cfg
    }

    /// The store, for one short critical section: what it writes is durable once the guard
    /// is dropped (see [`StoreGuard`]).
    pub(crate) fn store(&self) -> StoreGuard<'_> {
        let guard = lock(&self.store);
        StoreGuard {
            mark: guard.write_mark(),
            guard: Some(guard),
        }
    }

    /// Lists a live monitor, whose exit the caller's thread will report with [`Self::exited`].
    pub(crate) fn watch(&self, name: &str, pid: u32, cgroup: Option<PathBuf>, taps: Vec<String>) {
        let control = control_path(&self.cfg.state_dir, name);
        lock(&self.monitors).insert(
            name.to_string(),
            Monitor {
                pid,
                control,
                since: Instant::now(),
                cgroup,
                taps,
            },
        );
    }

    /// Marks the VM busy with `what` (the `action` of the lifecycle events its monitor's
    /// exit publishes meanwhile), unless it already is.
    pub(crate) fn begin(&self, name: &str, what: &'static str) -> Result<BusyGuard, OpError> {
        let mut busy = lock(&self.busy);
        if busy.contains_key(name) {
            return Err(OpError::Busy(name.into()));
        }
        busy.insert(name.to_string(), what);
        Ok(BusyGuard {
            busy: Arc::clone(&self.busy),
            name: name.into(),
        })
    }

    pub fn list(&self) -> Result<Vec<VmRecord>, OpError> {
        Ok(self.store().list()?)
    }

    pub fn metrics(&self) -> Result<String, OpError> {
        let vms = self.list()?;
        let usage = self.store().latest_samples()?;
        let mut text = crate::metrics::render(&vms, self.cfg.host, self.cfg.ratios);
        text.push_str(&crate::metrics::render_usage(&vms, &usage));
        Ok(text)
    }

    pub fn get(&self, name: &str) -> Result<VmRecord, OpError> {
        validate::key(name).map_err(OpError::BadRequest)?;
        Ok(self.store().get(name)?)
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

    /// Creates a VM (blocking; see [`Self::create_task`]).
    pub fn create(self: &Arc<Self>, req: &validate::CreateVm) -> Result<VmRecord, OpError> {
        let task = self.create_task(req.clone())?;
        let key = task.op.view().vm_key;
        task.run()?;
        self.get(&key)
    }

    /// Checks a create request (its fields, the host's room, the name is free) and makes it
    /// an operation that stores the VM.
    pub fn create_task(self: &Arc<Self>, mut req: validate::CreateVm) -> Result<Task, OpError> {
        validate::name(&req.name).map_err(OpError::BadRequest)?;
        let project = req.project_or_default().to_string();
        // The name taken is refused after the request's own checks, as before.
        let key = self.store().new_key(&project, &req.name);
        let root = self.apply_image(&mut req)?;
        let planned = key
            .as_ref()
            .map_or_else(|_| crate::store::vm_key(&project, &req.name), Clone::clone);
        // The VM's sockets live in its directory, named by its key; vsock.sock is the
        // longest of them (the monitor adds `_PORT`).
        let longest = crate::guest::vsock_socket(&self.cfg.state_dir, &planned);
        let max = vme_api::vsock::MAX_UDS_PATH_LEN;
        if longest.as_os_str().len() > max {
            return Err(OpError::BadRequest(format!(
                "VM {:?} of project {project:?} would have the socket {} ({} bytes), longer \
                 than Unix sockets allow here ({max}): choose a shorter VM or project name, \
                 or run vmed with a shorter --state-dir",
                req.name,
                longest.display(),
                longest.as_os_str().len()
            )));
        }
        let mut spec = validate::create(&req, &planned).map_err(OpError::BadRequest)?;
        let limits = validate::limits(&req, &spec).map_err(OpError::BadRequest)?;
        self.cfg
            .host
            .admits(self.cfg.ratios, load(&spec))
            .map_err(OpError::BadRequest)?;
        let label = req
            .label
            .clone()
            .unwrap_or_else(|| self.auth.levels.show(&self.auth.levels.lowest()));
        let root_bytes = root
            .as_ref()
            .and_then(|r| fs::metadata(&r.path).ok())
            .map_or(0, |m| m.len());
        let id = VmId {
            key: key?,
            name: req.name.clone(),
            project: project.clone(),
        };
        let busy = self.begin(&id.key, "create")?;
        {
            let store = self.store();
            if store.get(&id.key).is_ok() {
                return Err(StoreError::Exists(req.name).into());
            }
            crate::authz_checks::check_quota(&**store, &project, &spec, root_bytes)?;
        }
        let op = self.ops.begin(format!("Creating VM {}", req.name), &id);
        let me = Arc::clone(self);
        let work = move || {
            let _busy = busy;
            let _doing = events::doing("create");
            // Before the record: a VM is never stored without its volume.
            let volume = match (&root, spec.disks.first_mut()) {
                (Some(root), Some(disk)) => Some(me.make_root_volume(&id.key, root, disk)?),
                _ => None,
            };
            // Devices (vsock CID, tap names) are assigned under the store's lock, so two
            // creates cannot take the same ones.
            let stored = (|| -> Result<VmRecord, OpError> {
                let mut store = me.store();
                let others = store.list()?;
                let uds = crate::guest::vsock_socket(&me.cfg.state_dir, &id.key);
                crate::devices::assign(&mut spec, req.vsock.unwrap_or(true), uds, &others)
                    .map_err(OpError::BadRequest)?;
                // Again under the lock, so two creates cannot both take the last room.
                crate::authz_checks::check_quota(&**store, &project, &spec, 0)?;
                store.create(&id, &spec, req.restart_policy, &limits)?;
                store.vm_set_owner(&id.key, &project, &label)?;
                Ok(store.get(&id.key)?)
            })();
            let vm = stored.inspect_err(|_| {
                if let Some(v) = &volume {
                    let _ = fs::remove_file(v);
                }
            })?;
            crate::crashpoint::hit("create:after-insert");
            Ok(serde_json::to_value(vm).unwrap_or(Value::Null))
        };
        Ok(Task::new(op, work))
    }

    /// Whether the host has room to start `vm` next to the VMs that have a monitor.
    fn admit(&self, store: &dyn Store, vm: &VmRecord) -> Result<(), OpError> {
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
            .map_err(|e| OpError::Capacity(format!("cannot start VM {:?}: {e}", vm.name)))
    }

    /// Checks `action` against the VM's state and, if allowed, records the state it begins in.
    fn transition(&self, name: &str, action: Action) -> Result<VmRecord, OpError> {
        let mut store = self.store();
        let vm = store.get(name)?;
        lifecycle::check(vm.state, action)?;
        if action == Action::Start {
            // Under the store's lock, so two starts cannot both take the last capacity.
            self.admit(&**store, &vm)?;
        }
        if let Some(next) = lifecycle::begins(action) {
            store.set_state(name, next, "")?;
        }
        Ok(vm)
    }

    fn set_state(&self, name: &str, state: State, reason: &str) -> Result<(), OpError> {
        Ok(self.store().set_state(name, state, reason)?)
    }

    /// Moves the VM back from `now` to `back` after a failed pause or resume, unless its
    /// monitor's exit has been recorded meanwhile (that record must stay).
    fn revert(&self, name: &str, now: State, back: State) -> Result<(), OpError> {
        let mut store = self.store();
        if store.get(name)?.state == now {
            store.set_state(name, back, "")?;
        }
        Ok(())
    }

    /// Carries out a state action (`PUT /1.0/vms/NAME/state`) and returns the VM after it
    /// (blocking; see [`Self::act_task`]).
    pub fn act(
        self: &Arc<Self>,
        name: &str,
        action: Action,
        force: bool,
    ) -> Result<VmRecord, OpError> {
        self.act_task(name, action, force)?.run()?;
        self.get(name)
    }

    /// Checks a state action and makes it an operation. A refusal (a bad name, no such VM, a
    /// transition the lifecycle does not allow, no room to start, another operation on the
    /// VM in progress) is an error now, not a failed operation.
    pub fn act_task(
        self: &Arc<Self>,
        name: &str,
        action: Action,
        force: bool,
    ) -> Result<Task, OpError> {
        self.act_task_as(name, action, force, action.as_str())
    }

    /// [`Self::act_task`] on behalf of `who` (the lifecycle events' `action`).
    fn act_task_as(
        self: &Arc<Self>,
        name: &str,
        action: Action,
        force: bool,
        who: &'static str,
    ) -> Result<Task, OpError> {
        validate::key(name).map_err(OpError::BadRequest)?;
        if action == Action::Delete {
            return Err(OpError::BadRequest(
                "delete is not a state action: send DELETE /1.0/vms/NAME".into(),
            ));
        }
        let busy = self.begin(name, who)?;
        let id = {
            let store = self.store();
            let vm = store.get(name)?;
            lifecycle::check(vm.state, action)?;
            if action == Action::Start {
                self.admit(&**store, &vm)?;
            }
            vm.id()
        };
        let mut description = describe_action(action, &id.name);
        if who == "auto-restart" {
            description.push_str(" again (its restart policy)");
        }
        let op = self.ops.begin(description, &id);
        let (me, name) = (Arc::clone(self), name.to_string());
        let work = move || {
            let _busy = busy;
            let _doing = events::doing(who);
            me.act_now(&name, action, force)?;
            Ok(serde_json::to_value(me.get(&name)?).unwrap_or(Value::Null))
        };
        Ok(Task::new(op, work))
    }

    /// Carries out a checked state action, the VM marked busy.
    fn act_now(self: &Arc<Self>, name: &str, action: Action, force: bool) -> Result<(), OpError> {
        match action {
            Action::Start => self.start(name)?,
            Action::Stop => self.stop(name, force)?,
            Action::Pause => self.control_action(name, action, Request::Pause, State::Running)?,
            Action::Resume => self.control_action(name, action, Request::Resume, State::Paused)?,
            Action::Restart => {
                // Checked as a restart: stop alone allows more (a VM still starting).
                lifecycle::check(self.store().get(name)?.state, Action::Restart)?;
                self.stop(name, force)?;
                self.start(name)?;
            }
            Action::Delete => {
                return Err(OpError::BadRequest(
                    "delete is not a state action: send DELETE /1.0/vms/NAME".into(),
                ));
            }
        }
        Ok(())
    }

    /// Deletes a VM that has no monitor, and its files (blocking; see [`Self::delete_task`]).
    pub fn delete(self: &Arc<Self>, name: &str) -> Result<(), OpError> {
        self.delete_task(name)?.run().map(|_| ())
    }

    /// Checks a delete (the VM exists and has no monitor) and makes it an operation.
    pub fn delete_task(self: &Arc<Self>, name: &str) -> Result<Task, OpError> {
        validate::key(name).map_err(OpError::BadRequest)?;
        let busy = self.begin(name, "delete")?;
        let vm = self.store().get(name)?;
        lifecycle::check(vm.state, Action::Delete)?;
        let op = self
            .ops
            .begin(describe_action(Action::Delete, &vm.name), &vm.id());
        let (me, name) = (Arc::clone(self), name.to_string());
        let work = move || {
            let _busy = busy;
            let _doing = events::doing("delete");
            me.delete_now(&name)?;
            Ok(json!({}))
        };
        Ok(Task::new(op, work))
    }

    fn delete_now(&self, name: &str) -> Result<(), OpError> {
        let vm = self.transition(name, Action::Delete)?;
        if self.cfg.cgroups.enabled {
            // A leftover of a monitor that died while no vmed watched it.
            cgroup::remove(&cgroup::vm_path(&self.cfg.cgroups.root, name))
                .map_err(OpError::Failed)?;
        }
        let taps: Vec<String> = vm.spec.nets.iter().map(|n| n.tap.clone()).collect();
        crate::network::remove_taps(&self.cfg.network, &vm.project, &taps).map_err(|e| {
            OpError::Failed(format!(
                "cannot remove VM {name:?}'s taps: {e}; delete again"
            ))
        })?;
        let dir = vm_dir(&self.cfg.state_dir, name);
        if let Err(e) = fs::remove_dir_all(&dir) {
            if e.kind() != std::io::ErrorKind::NotFound {
                return Err(OpError::Failed(format!(
                    "cannot remove {}: {e}; fix its permissions and delete again",
                    dir.display()
                )));
            }
        }
        crate::crashpoint::hit("delete:after-remove-files");
        self.store().delete(name)?;
        let segment = crate::network::segment_label(self, &vm.label);
        crate::network::release_for(self, &vm.project, Some(&segment));
        Ok(())
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
        crate::crashpoint::hit("start:after-transition");
        let fail = |msg: String| -> OpError {
            let _ = self.set_state(name, State::Crashed, &msg);
            OpError::Failed(msg)
        };
        self.check_image_blobs(&vm.spec).map_err(fail)?;
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
        // Every monitor is jailed, as the VM's own uid, under strict seccomp filters.
        crate::jail::confine(&self.cfg.state_dir, name, &self.cfg.jail_ids, &mut spec)
            .map_err(|e| fail(format!("cannot prepare VM {name:?}'s jail: {e}")))?;
        let segment = crate::network::segment_label(self, &vm.label);
        let fresh = crate::network::attach(&self.cfg.network, &vm.project, &segment, &mut spec)
            .map_err(|e| fail(format!("cannot build VM {name:?}'s network: {e}")))?;
        let machine = machine_file(&self.cfg.state_dir, name);
        let log = monitor_log(&self.cfg.state_dir, name);
        let prepared = fs::create_dir_all(&dir)
            .and_then(|()| match fs::remove_file(&control_sock) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
                _ => Ok(()),
            })
            .and_then(|()| fs::write(&machine, spec.to_toml()))
            .and_then(|()| fs::File::create(&log));
        let mut log_file = prepared.map_err(|e| {
            fail(format!(
                "cannot prepare {}: {e}; check the state dir's permissions and free space",
                dir.display()
            ))
        })?;
        let group = cgroup::for_vm(&self.cfg.cgroups, &vm, &mut log_file)
            .map_err(|e| fail(format!("cannot give VM {name:?} its cgroup: {e}")))?;
        let mut cmd = Command::new(&self.cfg.vmm);
        cmd.arg("--config")
            .arg(&machine)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file);
        // Its own session: a Ctrl-C or hang-up meant for the daemon's terminal must not reach
        // the VMs, and, outside a cpu cgroup, the scheduler's autogroups then weigh each VM
        // on its own instead of all of them together as one share of the daemon's session
        // (measured: 4 riscv64 guests booted 2.5x slower on a busy host in one session).
        // The daemon runs at a raised priority (see main.rs): its monitors must not inherit it.
        // SAFETY: setsid and setpriority are async-signal-safe syscalls that touch no
        // memory of the parent.
        unsafe {
            cmd.pre_exec(|| {
                if libc::setsid() < 0 || libc::setpriority(libc::PRIO_PROCESS, 0, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        if let Some(g) = &group {
            g.attach(&mut cmd);
        }
        let child = cmd.spawn().map_err(|e| {
            if let Some(g) = &group {
                let _ = cgroup::remove(&g.dir);
            }
            fail(format!(
                "cannot run the monitor {} in its cgroup: {e}; install vme-vmm next to vmed or \
                 pass --vmm PATH",
                self.cfg.vmm.display()
            ))
        })?;
        fresh.keep();
        let pid = child.id();
        crate::crashpoint::hit("start:after-spawn");
        // The pid is recorded with `running`, in one flush: a daemon that dies before then
        // finds the monitor by its machine file (see reconcile).
        let taps = vm.spec.nets.iter().map(|n| n.tap.clone()).collect();
        self.watch(name, pid, group.map(|g| g.dir), taps);
        let me = Arc::clone(self);
        let n = name.to_string();
        std::thread::spawn(move || me.supervise(n, child, log));

        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if !lock(&self.monitors).contains_key(name) {
                let reason = self.store().get(name).map(|v| v.reason).unwrap_or_default();
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
            // A riscv64 monitor answers within tens of milliseconds: poll finely.
            std::thread::sleep(Duration::from_millis(5));
        }
        crate::crashpoint::hit("start:before-running");
        let mut store = self.store();
        // The monitor may have exited between its answer and now; the waiter recorded that.
        if store.get(name)?.state == State::Starting {
            store.set_state_and_pid(name, State::Running, "", pid)?;
        }
        Ok(())
    }

    /// Stops the VM: the ACPI power button, then (after the stop timeout, or at once with
    /// `force`) the monitor's `stop`, then SIGKILL. Returns when the monitor has exited.
    fn stop(&self, name: &str, force: bool) -> Result<(), OpError> {
        let was = self.transition(name, Action::Stop)?.state;
        crate::crashpoint::hit("stop:after-transition");
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
        crate::crashpoint::hit("stop:after-request");
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
            Ok(s) => match crate::jail::security_event(s) {
                Some(why) => {
                    self.security_event(&name, &why, &log);
                    (false, why)
                }
                None => (false, describe(s)),
            },
            Err(e) => (false, format!("could not be waited for: {e}")),
        };
        self.exited(&name, clean, &how, &log);
    }

    /// VM `name`'s monitor was ended by its seccomp filter (`why` says so): a security
    /// event, published on the event stream and appended to the audit log. The one place a
    /// security event is reported, for a monitor this daemon started or adopted.
    pub(crate) fn security_event(&self, name: &str, why: &str, log: &Path) {
        let id = self
            .store()
            .get(name)
            .map_or_else(|_| VmId::plain(name), |vm| vm.id());
        crate::jail::publish(&self.events, &id, why);
        if let Some(audit) = self.audit.get() {
            let _ = audit.security_event(
                "monitor.seccomp-kill",
                &format!("vm/{}/{}", id.project, id.name),
                "monitor",
                &format!("the monitor {why}: {}", tail(log)),
            );
        }
    }

    /// Records a monitor's exit: the state it leaves the VM in (with the log's tail as the
    /// reason of a crash), no pid, and no live monitor; wakes whoever waits for it.
    pub(crate) fn exited(self: &Arc<Self>, name: &str, clean: bool, how: &str, log: &Path) {
        // Before the VM counts as stopped: its last usage, then its cgroup goes.
        let oom = self.account_exit(name);
        let mut restart = false;
        {
            let mut store = self.store();
            if let Ok(vm) = store.get(name) {
                // An exit asked for is part of the stop (or restart) that asked; any other is
                // the monitor's own doing.
                let who = if vm.state == State::Stopping {
                    crate::crashpoint::hit("stop:after-exit");
                    lock(&self.busy).get(name).copied().unwrap_or("stop")
                } else {
                    "exit"
                };
                let _doing = events::doing(who);
                let next = lifecycle::after_exit(vm.state, clean);
                restart = vm
                    .restart_policy
                    .restarts(vm.state == State::Stopping, next);
                let reason = if next == State::Crashed {
                    let oom = oom.as_deref().map_or(String::new(), |o| format!("{o}; "));
                    format!("the monitor {how}: {oom}{}", tail(log))
                } else {
                    String::new()
                };
                let _ = store.set_state_and_pid(name, next, &reason, 0);
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
            // Refused (dropped) if a user acted meanwhile.
            if let Ok(task) = me.act_task_as(&name, Action::Start, false, "auto-restart") {
                let _ = task.run();
            }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::operations::Status;

    #[test]
    fn a_task_always_ends_its_operation() {
        let ops = Operations::new(Events::new());
        let a = VmId::plain("a");
        let op = ops.begin("ok".into(), &a);
        let r = Task::new(Arc::clone(&op), || Ok(json!({"state": "running"}))).run();
        assert_eq!(r.unwrap(), json!({"state": "running"}));
        assert_eq!(op.view().status, Status::Success);
        assert_eq!(op.view().metadata, json!({"state": "running"}));

        let op = ops.begin("refused".into(), &a);
        let r = Task::new(Arc::clone(&op), || Err(OpError::Failed("no room".into()))).run();
        assert!(r.is_err());
        assert_eq!(
            (op.view().status, op.view().err),
            (Status::Failure, "no room".into())
        );

        // Never run (vmed shutting down), or its work panicked: failed, not running forever.
        let op = ops.begin("dropped".into(), &a);
        drop(Task::new(Arc::clone(&op), || Ok(Value::Null)));
        assert_eq!(op.view().status, Status::Failure);
        let op = ops.begin("panicked".into(), &a);
        let task = Task::new(Arc::clone(&op), || panic!("a bug"));
        assert!(std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| task.run())).is_err());
        assert_eq!(op.view().status, Status::Failure);
        assert!(op.view().err.contains("see the daemon's log"));
    }
}

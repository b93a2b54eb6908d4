//! Operations, in the shape of Incus: every long action (creating, starting, stopping,
//! restarting, pausing, resuming or deleting a VM, and the restarts a restart policy makes)
//! is an operation with an id, listed under `/1.0/operations` while it runs and for a while
//! after. A client that asked for `?async=true` gets the operation at once and waits on
//! `/1.0/operations/{id}/wait`.
//!
//! Kept in memory only: a restarted daemon has no operations (its VMs' states are in the
//! store). Finished operations expire after [`KEEP`], and only the last [`KEEP_MAX`] are kept.

use crate::events::{Events, Kind, rfc3339};
use crate::store::VmId;
use serde::Serialize;
use serde_json::{Value, json};
use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};
use tokio::sync::watch;
use utoipa::ToSchema;

/// How long a finished operation stays listed.
pub const KEEP: Duration = Duration::from_secs(10 * 60);
/// How many finished operations stay listed at most.
pub const KEEP_MAX: usize = 200;

/// Where an operation is. The codes are Incus's.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, ToSchema)]
pub enum Status {
    Running,
    Success,
    Failure,
}

impl Status {
    pub fn code(self) -> u16 {
        match self {
            Status::Running => 103,
            Status::Success => 200,
            Status::Failure => 400,
        }
    }
}

/// An operation as the API shows it.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct Operation {
    pub id: String,
    /// Always `task` (an action the daemon carries out on its own).
    pub class: String,
    /// What it does, like "Starting VM web-1".
    pub description: String,
    /// RFC 3339, UTC.
    pub created_at: String,
    pub updated_at: String,
    pub status: Status,
    /// 103 running, 200 success, 400 failure.
    pub status_code: u16,
    /// The objects it acts on: `{"vms": ["/1.0/vms/NAME?project=PROJECT"]}` (no
    /// `?project=` for the `default` project).
    #[schema(value_type = Object)]
    pub resources: Value,
    /// What it produced: the VM after the action, once it succeeded; null before.
    #[schema(value_type = Option<Object>, required = true)]
    pub metadata: Value,
    /// Whether `DELETE /1.0/operations/{id}` can cancel it (never, so far).
    pub may_cancel: bool,
    /// Why it failed; empty unless the status is Failure.
    pub err: String,
    /// The internal key of the VM it acts on (see [`VmId`]); never shown.
    #[serde(skip)]
    pub vm_key: String,
    /// The VM's name, which the error shows instead of the key.
    #[serde(skip)]
    vm_name: String,
}

/// The API's URL of a VM: `/1.0/vms/NAME`, with `?project=P` outside the `default` project.
pub fn vm_url(project: &str, name: &str) -> String {
    if project == "default" {
        format!("/1.0/vms/{name}")
    } else {
        format!("/1.0/vms/{name}?project={project}")
    }
}

/// `msg` with the internal key `key` shown as the object's name: the daemon's messages name
/// the VM (or image) they are about by the key it works with. A key inside a path (next to
/// a '/') stays: that is where the file is.
pub fn show_name(msg: &str, key: &str, name: &str) -> String {
    if key == name || key.is_empty() {
        return msg.to_string();
    }
    let mut out = String::with_capacity(msg.len());
    let mut rest = msg;
    while let Some(i) = rest.find(key) {
        let (before, after) = (&rest[..i], &rest[i + key.len()..]);
        let in_path = before.ends_with('/') || after.starts_with('/');
        out.push_str(before);
        out.push_str(if in_path { key } else { name });
        rest = after;
    }
    out.push_str(rest);
    out
}

/// One operation: its record, and a signal for those waiting on its end.
pub struct Op {
    view: Mutex<Operation>,
    done: watch::Sender<bool>,
    /// When it ended (for expiry).
    ended: Mutex<Option<Instant>>,
    events: Events,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Op {
    pub fn id(&self) -> String {
        lock(&self.view).id.clone()
    }

    pub fn view(&self) -> Operation {
        lock(&self.view).clone()
    }

    pub fn is_done(&self) -> bool {
        *self.done.borrow()
    }

    /// Records the operation's end (success with what it produced, or failure with why) and
    /// wakes its waiters. Only the first end counts.
    pub fn finish(&self, result: Result<Value, String>) {
        let mut v = lock(&self.view);
        if v.status != Status::Running {
            return;
        }
        let (status, metadata, err) = match result {
            Ok(m) => (Status::Success, m, String::new()),
            Err(e) => (
                Status::Failure,
                Value::Null,
                show_name(&e, &v.vm_key, &v.vm_name),
            ),
        };
        v.status = status;
        v.status_code = status.code();
        v.metadata = metadata;
        v.err = err;
        v.updated_at = rfc3339(SystemTime::now(), true);
        let snapshot = v.clone();
        drop(v);
        *lock(&self.ended) = Some(Instant::now());
        self.done.send_replace(true);
        self.events
            .publish_vm(Kind::Operation, &snapshot.vm_key, to_value(&snapshot));
    }

    /// Waits until the operation has ended, or `timeout` has passed (None: no limit), or
    /// the daemon shuts down; returns it as it is then.
    pub async fn wait(&self, timeout: Option<Duration>) -> Operation {
        let mut rx = self.done.subscribe();
        let ended = async {
            tokio::select! {
                _ = rx.wait_for(|d| *d) => {}
                _ = self.events.closed() => {}
            }
        };
        match timeout {
            Some(t) => {
                let _ = tokio::time::timeout(t, ended).await;
            }
            None => ended.await,
        }
        self.view()
    }
}

fn to_value<T: Serialize>(v: &T) -> Value {
    serde_json::to_value(v).unwrap_or(Value::Null)
}

/// The daemon's operations, oldest first.
pub struct Operations {
    ops: Mutex<VecDeque<Arc<Op>>>,
    events: Events,
}

impl Operations {
    pub fn new(events: Events) -> Operations {
        Operations {
            ops: Mutex::new(VecDeque::new()),
            events,
        }
    }

    /// A new running operation on VM `vm`; announced on the event bus.
    pub fn begin(&self, description: String, vm: &VmId) -> Arc<Op> {
        let now = rfc3339(SystemTime::now(), true);
        let view = Operation {
            id: new_id(),
            class: "task".into(),
            description,
            created_at: now.clone(),
            updated_at: now,
            status: Status::Running,
            status_code: Status::Running.code(),
            resources: json!({"vms": [vm_url(&vm.project, &vm.name)]}),
            metadata: Value::Null,
            may_cancel: false,
            err: String::new(),
            vm_key: vm.key.clone(),
            vm_name: vm.name.clone(),
        };
        let op = Arc::new(Op {
            view: Mutex::new(view.clone()),
            done: watch::channel(false).0,
            ended: Mutex::new(None),
            events: self.events.clone(),
        });
        let mut ops = lock(&self.ops);
        prune(&mut ops);
        ops.push_back(Arc::clone(&op));
        drop(ops);
        self.events
            .publish_vm(Kind::Operation, &vm.key, to_value(&view));
        op
    }

    pub fn get(&self, id: &str) -> Option<Arc<Op>> {
        let mut ops = lock(&self.ops);
        prune(&mut ops);
        ops.iter().find(|o| lock(&o.view).id == id).cloned()
    }

    /// Every operation still kept, oldest first.
    pub fn list(&self) -> Vec<Operation> {
        let mut ops = lock(&self.ops);
        prune(&mut ops);
        ops.iter().map(|o| o.view()).collect()
    }
}

/// Drops the finished operations past [`KEEP`] or beyond the last [`KEEP_MAX`].
fn prune(ops: &mut VecDeque<Arc<Op>>) {
    let ended = |o: &Op| *lock(&o.ended);
    let mut finished = ops.iter().filter(|o| ended(o).is_some()).count();
    ops.retain(|o| match ended(o) {
        Some(t) if t.elapsed() > KEEP || finished > KEEP_MAX => {
            finished -= 1;
            false
        }
        _ => true,
    });
}

/// A random (version 4) UUID, as Incus uses for operations: ids from an earlier daemon never
/// name a new operation.
fn new_id() -> String {
    let mut b = [0u8; 16];
    // SAFETY: getrandom(2) writes at most `b.len()` bytes into `b`, which lives across the call.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
    if n != b.len() as isize {
        // No entropy (should not happen): the clock and a counter are unique enough here.
        static COUNT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let t = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos() as u64;
        let c = COUNT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        b[..8].copy_from_slice(&t.to_le_bytes());
        b[8..].copy_from_slice(&c.to_le_bytes());
    }
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_uuids() {
        let (a, b) = (new_id(), new_id());
        assert_ne!(a, b);
        assert_eq!(a.len(), 36);
        assert_eq!(&a[14..15], "4");
        assert_eq!(a.matches('-').count(), 4);
    }

    #[test]
    fn an_operation_runs_then_ends_once_and_is_announced() {
        let events = Events::new();
        let mut rx = events.subscribe();
        let ops = Operations::new(events);
        let op = ops.begin("Starting VM a".into(), &VmId::plain("a"));
        let v = op.view();
        assert_eq!(
            (v.status, v.status_code, v.class.as_str()),
            (Status::Running, 103, "task")
        );
        assert_eq!(v.resources, json!({"vms": ["/1.0/vms/a"]}));
        assert_eq!(ops.list().len(), 1);
        assert!(ops.get(&v.id).is_some() && ops.get("nope").is_none());
        op.finish(Err("it broke".into()));
        op.finish(Ok(json!({})));
        let v = op.view();
        assert_eq!(
            (v.status, v.status_code, v.err.as_str()),
            (Status::Failure, 400, "it broke")
        );
        assert!(op.is_done());
        let kinds: Vec<_> = std::iter::from_fn(|| rx.try_recv().ok())
            .map(|e| (e.kind, e.metadata["status"].as_str().unwrap().to_string()))
            .collect();
        assert_eq!(
            kinds,
            [
                (Kind::Operation, "Running".to_string()),
                (Kind::Operation, "Failure".to_string())
            ]
        );
    }

    /// Another project's VM: its URL names the project, and its errors its name, not its key.
    #[test]
    fn an_operation_shows_names_not_keys() {
        let ops = Operations::new(Events::new());
        let other = VmId {
            key: "acme_a".into(),
            name: "a".into(),
            project: "acme".into(),
        };
        let o = ops.begin("Starting VM a".into(), &other);
        assert_eq!(
            o.view().resources,
            json!({"vms": ["/1.0/vms/a?project=acme"]})
        );
        o.finish(Err(
            "VM \"acme_a\" failed in /v/vms/acme_a/x: `vme start acme_a`".into(),
        ));
        assert_eq!(
            o.view().err,
            "VM \"a\" failed in /v/vms/acme_a/x: `vme start a`",
            "the key is not shown"
        );
    }

    #[test]
    fn finished_operations_are_bounded() {
        let ops = Operations::new(Events::new());
        let running = ops.begin("Starting VM r".into(), &VmId::plain("r"));
        for i in 0..KEEP_MAX + 5 {
            ops.begin(format!("op {i}"), &VmId::plain("a"))
                .finish(Ok(Value::Null));
        }
        let list = ops.list();
        assert_eq!(list.len(), KEEP_MAX + 1, "the running one stays");
        assert_eq!(list[0].id, running.id());
        assert_eq!(
            list[1].description, "op 5",
            "the oldest finished went first"
        );
    }

    #[tokio::test]
    async fn wait_returns_at_the_end_or_the_timeout() {
        let ops = Operations::new(Events::new());
        let op = ops.begin("x".into(), &VmId::plain("a"));
        let t = Instant::now();
        let v = op.wait(Some(Duration::from_millis(50))).await;
        assert_eq!(v.status, Status::Running);
        assert!(t.elapsed() >= Duration::from_millis(50));
        let op2 = Arc::clone(&op);
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            op2.finish(Ok(json!({"ok": true})));
        });
        let v = op.wait(None).await;
        assert_eq!(
            (v.status, v.metadata.clone()),
            (Status::Success, json!({"ok": true}))
        );
    }
}

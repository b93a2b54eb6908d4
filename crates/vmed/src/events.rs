//! The daemon's event bus, behind `GET /1.0/events`: a `lifecycle` event for every change of
//! a VM's recorded state (whoever made it: a user's action, a monitor's exit, a restart
//! policy, the reconciliation at startup) and an `operation` event when an operation is
//! created and when it ends.
//!
//! Lifecycle events come from one place: [`Published`], the wrapper every store write of the
//! daemon goes through, so no state change escapes them. The bus is a tokio broadcast
//! channel: publishing never blocks, and a subscriber that falls behind loses the oldest
//! events and is told how many (a `lagged` event), so a slow reader cannot hold the daemon up.

use crate::lifecycle::{RestartPolicy, State};
use crate::limits::VmLimits;
use crate::store::{Store, StoreError, VmId, VmRecord, WalBarrier};
use crate::store_auth::{AuthStore, ProjectRecord, Quota, TokenRecord, UserChange, UserRecord};
use crate::store_images::{ImageCatalog, ImageRecord};
use crate::usage::Sample;
use serde::Serialize;
use serde_json::Value;
use std::cell::Cell;
use std::time::{SystemTime, UNIX_EPOCH};
use tokio::sync::{broadcast, watch};
use utoipa::ToSchema;
use vme_api::MachineSpec;
use vme_image::sign::Signature;

/// Events kept for each subscriber before the slowest start losing them.
const BACKLOG: usize = 1024;

/// What an event is about: what `?type=` filters on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// A VM's state changed (or the VM was created or deleted).
    Lifecycle,
    /// An operation was created or ended.
    Operation,
    /// The audit log's head was anchored: `{"seq": N, "hash": "...", "time": "..."}`.
    #[serde(rename = "audit-anchor")]
    AuditAnchor,
    /// A VM's monitor was ended by its seccomp filter (`{"vm", "reason"}`): it tried a
    /// system call it never needs, which a guest escaping into it would.
    Security,
    /// Not published: sent to one subscriber that fell behind, with how many it missed.
    Lagged,
}

impl Kind {
    pub fn parse(s: &str) -> Option<Kind> {
        match s {
            "lifecycle" => Some(Kind::Lifecycle),
            "operation" => Some(Kind::Operation),
            "audit-anchor" => Some(Kind::AuditAnchor),
            "security" => Some(Kind::Security),
            _ => None,
        }
    }
}

/// One event, as one line of `GET /1.0/events`.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct Event {
    #[serde(rename = "type")]
    pub kind: Kind,
    /// RFC 3339, UTC, milliseconds.
    pub timestamp: String,
    /// A [`LifecycleEvent`] or an operation (see `GET /1.0/operations/{id}`); for `lagged`,
    /// `{"missed": N}`.
    #[schema(value_type = Object)]
    pub metadata: Value,
    /// The internal key of the VM it is about (see [`VmId`]), for the stream's access
    /// filter; never shown (the metadata names the VM by name and project).
    #[serde(skip)]
    pub vm_key: Option<String>,
}

/// The metadata of a `lifecycle` event.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct LifecycleEvent {
    /// The VM's name (unique in its project).
    pub vm: String,
    /// The VM's project.
    pub project: String,
    /// The state before; null when the VM was just created.
    pub from: Option<State>,
    /// The state after; null when the VM was deleted.
    pub to: Option<State>,
    /// Why the VM crashed (or its start failed); empty otherwise.
    pub reason: String,
    /// What made the change: a user's action (`create`, `start`, `stop`, `pause`, `resume`,
    /// `restart`, `delete`), `exit` (the monitor exited without being asked to),
    /// `auto-restart` (a restart policy started the VM again) or `reconcile` (vmed's startup
    /// found the VM's monitor gone or adopted it).
    pub action: String,
}

/// The bus. Cheap to clone (all clones publish to the same subscribers).
#[derive(Clone)]
pub struct Events {
    tx: broadcast::Sender<Event>,
    /// Set when the daemon shuts down: the streams end, so the server can stop.
    closed: watch::Sender<bool>,
}

impl Default for Events {
    fn default() -> Self {
        Events::new()
    }
}

impl Events {
    pub fn new() -> Events {
        Events {
            tx: broadcast::channel(BACKLOG).0,
            closed: watch::channel(false).0,
        }
    }

    /// Sends an event to the current subscribers (none is fine). Never blocks.
    pub fn publish(&self, kind: Kind, metadata: Value) {
        self.send(kind, metadata, None);
    }

    /// [`Self::publish`] for an event about the VM keyed `key`.
    pub fn publish_vm(&self, kind: Kind, key: &str, metadata: Value) {
        self.send(kind, metadata, Some(key.to_string()));
    }

    fn send(&self, kind: Kind, metadata: Value, vm_key: Option<String>) {
        let _ = self.tx.send(Event {
            kind,
            timestamp: rfc3339(SystemTime::now(), true),
            metadata,
            vm_key,
        });
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.tx.subscribe()
    }

    /// Ends every stream (the daemon is shutting down).
    pub fn close(&self) {
        self.closed.send_replace(true);
    }

    /// Resolves once [`Self::close`] has been called.
    pub async fn closed(&self) {
        let mut rx = self.closed.subscribe();
        let _ = rx.wait_for(|c| *c).await;
    }
}

thread_local! {
    /// What the daemon is doing on this thread, for the `action` of the lifecycle events its
    /// store writes publish (see [`doing`]).
    static DOING: Cell<&'static str> = const { Cell::new("") };
}

/// Says what this thread is doing (`start`, `exit`, ...) until the guard is dropped; the
/// previous value comes back then.
pub fn doing(action: &'static str) -> Doing {
    Doing(DOING.with(|d| d.replace(action)))
}

pub struct Doing(&'static str);

impl Drop for Doing {
    fn drop(&mut self) {
        DOING.with(|d| d.set(self.0));
    }
}

/// A store whose every write of a VM's state (and every create and delete) publishes a
/// lifecycle event, with the `action` this thread is [`doing`].
pub struct Published {
    inner: Box<dyn Store>,
    events: Events,
}

impl Published {
    pub fn new(inner: Box<dyn Store>, events: Events) -> Published {
        Published { inner, events }
    }

    fn publish(&self, vm: &VmId, from: Option<State>, to: Option<State>, reason: &str) {
        let ev = LifecycleEvent {
            vm: vm.name.clone(),
            project: vm.project.clone(),
            from,
            to,
            reason: reason.into(),
            action: DOING.with(Cell::get).into(),
        };
        self.events.publish_vm(
            Kind::Lifecycle,
            &vm.key,
            serde_json::to_value(ev).unwrap_or(Value::Null),
        );
    }

    /// The VM keyed `key` as stored now: its name and state (None if there is none).
    fn before(&self, key: &str) -> Option<(VmId, State)> {
        let vm = self.inner.get(key).ok()?;
        Some((vm.id(), vm.state))
    }
}

impl Store for Published {
    fn create(
        &mut self,
        id: &VmId,
        spec: &MachineSpec,
        policy: RestartPolicy,
        limits: &VmLimits,
    ) -> Result<VmRecord, StoreError> {
        let vm = self.inner.create(id, spec, policy, limits)?;
        self.publish(&vm.id(), None, Some(vm.state), "");
        Ok(vm)
    }

    fn new_key(&self, project: &str, name: &str) -> Result<String, StoreError> {
        self.inner.new_key(project, name)
    }

    fn find(&self, name: &str) -> Result<Vec<VmRecord>, StoreError> {
        self.inner.find(name)
    }

    fn get(&self, name: &str) -> Result<VmRecord, StoreError> {
        self.inner.get(name)
    }

    fn list(&self) -> Result<Vec<VmRecord>, StoreError> {
        self.inner.list()
    }

    fn set_state(&mut self, name: &str, state: State, reason: &str) -> Result<(), StoreError> {
        let before = self.before(name);
        self.inner.set_state(name, state, reason)?;
        // A write that changes nothing (a state recorded again) is no event.
        if let Some((id, from)) = before.filter(|(_, from)| *from != state) {
            self.publish(&id, Some(from), Some(state), reason);
        }
        Ok(())
    }

    fn delete(&mut self, name: &str) -> Result<(), StoreError> {
        let before = self.before(name);
        self.inner.delete(name)?;
        if let Some((id, from)) = before {
            self.publish(&id, Some(from), None, "");
        }
        Ok(())
    }

    fn set_pid(&mut self, name: &str, pid: u32) -> Result<(), StoreError> {
        self.inner.set_pid(name, pid)
    }

    fn add_samples(&mut self, samples: &[Sample]) -> Result<(), StoreError> {
        self.inner.add_samples(samples)
    }

    fn samples(&self, name: &str, since_ms: i64) -> Result<Vec<Sample>, StoreError> {
        self.inner.samples(name, since_ms)
    }

    fn latest_samples(&self) -> Result<Vec<Sample>, StoreError> {
        self.inner.latest_samples()
    }

    fn prune_samples(&mut self, before_ms: i64) -> Result<usize, StoreError> {
        self.inner.prune_samples(before_ms)
    }

    fn set_state_and_pid(
        &mut self,
        name: &str,
        state: State,
        reason: &str,
        pid: u32,
    ) -> Result<(), StoreError> {
        let before = self.before(name);
        self.inner.set_state_and_pid(name, state, reason, pid)?;
        if let Some((id, from)) = before.filter(|(_, from)| *from != state) {
            self.publish(&id, Some(from), Some(state), reason);
        }
        Ok(())
    }

    fn write_mark(&self) -> u64 {
        self.inner.write_mark()
    }

    fn barrier(&self) -> Option<std::sync::Arc<WalBarrier>> {
        self.inner.barrier()
    }
}

/// Image changes publish no lifecycle event (they are no VM's): plain forwarding.
impl ImageCatalog for Published {
    fn image_insert(
        &mut self,
        project: &str,
        name: &str,
        manifest: &[u8],
        signature: Option<&Signature>,
    ) -> Result<ImageRecord, StoreError> {
        self.inner.image_insert(project, name, manifest, signature)
    }

    fn image_find(&self, name: &str) -> Result<Vec<(String, ImageRecord)>, StoreError> {
        self.inner.image_find(name)
    }

    fn image_get(&self, name: &str) -> Result<ImageRecord, StoreError> {
        self.inner.image_get(name)
    }

    fn image_list(&self) -> Result<Vec<ImageRecord>, StoreError> {
        self.inner.image_list()
    }

    fn image_delete(&mut self, name: &str) -> Result<(), StoreError> {
        self.inner.image_delete(name)
    }

    fn image_set_signature(&mut self, name: &str, sig: &Signature) -> Result<(), StoreError> {
        self.inner.image_set_signature(name, sig)
    }

    fn image_set_status(
        &mut self,
        name: &str,
        status: &str,
        reason: &str,
    ) -> Result<(), StoreError> {
        self.inner.image_set_status(name, status, reason)
    }

    fn image_alias_set(
        &mut self,
        project: &str,
        alias: &str,
        image: &str,
    ) -> Result<(), StoreError> {
        self.inner.image_alias_set(project, alias, image)
    }

    fn image_alias_delete(&mut self, key: &str) -> Result<(), StoreError> {
        self.inner.image_alias_delete(key)
    }

    fn image_blobs_in_use(&self) -> Result<Vec<String>, StoreError> {
        self.inner.image_blobs_in_use()
    }
}

/// Access-control changes publish no lifecycle event: plain forwarding.
impl AuthStore for Published {
    fn project_create(
        &mut self,
        name: &str,
        quota: &Quota,
        require_signed: bool,
    ) -> Result<ProjectRecord, StoreError> {
        self.inner.project_create(name, quota, require_signed)
    }
    fn project_get(&self, name: &str) -> Result<Option<ProjectRecord>, StoreError> {
        self.inner.project_get(name)
    }
    fn project_list(&self) -> Result<Vec<ProjectRecord>, StoreError> {
        self.inner.project_list()
    }
    fn project_set_quota(&mut self, name: &str, quota: &Quota) -> Result<(), StoreError> {
        self.inner.project_set_quota(name, quota)
    }
    fn project_set_require_signed(&mut self, name: &str, on: bool) -> Result<(), StoreError> {
        self.inner.project_set_require_signed(name, on)
    }
    fn project_delete(&mut self, name: &str) -> Result<(), StoreError> {
        self.inner.project_delete(name)
    }
    fn user_create(&mut self, name: &str, clearance: &str) -> Result<(), StoreError> {
        self.inner.user_create(name, clearance)
    }
    fn user_get(&self, name: &str) -> Result<Option<UserRecord>, StoreError> {
        self.inner.user_get(name)
    }
    fn user_by_uid(&self, uid: u32) -> Result<Option<UserRecord>, StoreError> {
        self.inner.user_by_uid(uid)
    }
    fn user_by_cert(&self, fingerprint: &str) -> Result<Option<UserRecord>, StoreError> {
        self.inner.user_by_cert(fingerprint)
    }
    fn user_list(&self) -> Result<Vec<UserRecord>, StoreError> {
        self.inner.user_list()
    }
    fn user_update(&mut self, name: &str, change: &UserChange) -> Result<(), StoreError> {
        self.inner.user_update(name, change)
    }
    fn user_delete(&mut self, name: &str) -> Result<(), StoreError> {
        self.inner.user_delete(name)
    }
    fn role_set(
        &mut self,
        user: &str,
        project: &str,
        role: Option<&str>,
    ) -> Result<(), StoreError> {
        self.inner.role_set(user, project, role)
    }
    fn token_insert(
        &mut self,
        id: &str,
        user: &str,
        hash: &str,
        expires_at: Option<i64>,
    ) -> Result<(), StoreError> {
        self.inner.token_insert(id, user, hash, expires_at)
    }
    fn token_get(&self, id: &str) -> Result<Option<TokenRecord>, StoreError> {
        self.inner.token_get(id)
    }
    fn token_list(&self, user: Option<&str>) -> Result<Vec<TokenRecord>, StoreError> {
        self.inner.token_list(user)
    }
    fn token_revoke(&mut self, id: &str) -> Result<bool, StoreError> {
        self.inner.token_revoke(id)
    }
    fn vm_set_owner(&mut self, name: &str, project: &str, label: &str) -> Result<(), StoreError> {
        self.inner.vm_set_owner(name, project, label)
    }
    fn vm_set_label(&mut self, name: &str, label: &str) -> Result<(), StoreError> {
        self.inner.vm_set_label(name, label)
    }
    fn image_set_access(
        &mut self,
        name: &str,
        project: &str,
        public: bool,
        label: &str,
    ) -> Result<(), StoreError> {
        self.inner.image_set_access(name, project, public, label)
    }
}

/// `t` in RFC 3339, UTC (`2024-05-01T12:00:00Z`, with `.123` milliseconds if `millis`).
pub fn rfc3339(t: SystemTime, millis: bool) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    // Days to a civil date (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let (h, m, s) = (rem / 3600, rem / 60 % 60, rem % 60);
    let frac = if millis {
        format!(".{:03}", d.subsec_millis())
    } else {
        String::new()
    };
    format!("{year:04}-{month:02}-{day:02}T{h:02}:{m:02}:{s:02}{frac}Z")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::SqliteStore;
    use std::time::Duration;

    #[test]
    fn dates() {
        let at = |s: u64, ms: u64| UNIX_EPOCH + Duration::from_millis(s * 1000 + ms);
        assert_eq!(rfc3339(at(0, 0), false), "1970-01-01T00:00:00Z");
        assert_eq!(
            rfc3339(at(951_782_400, 5), true),
            "2000-02-29T00:00:00.005Z"
        );
        assert_eq!(rfc3339(at(1_709_251_199, 0), false), "2024-02-29T23:59:59Z");
        assert_eq!(
            rfc3339(at(4_102_444_800, 999), true),
            "2100-01-01T00:00:00.999Z"
        );
    }

    #[test]
    fn every_write_is_published_with_what_the_thread_is_doing() {
        let events = Events::new();
        let mut rx = events.subscribe();
        let mut store = Published::new(Box::new(SqliteStore::open_in_memory().unwrap()), events);
        let spec = MachineSpec::new("/k");
        {
            let _d = doing("create");
            store
                .create(
                    &VmId::plain("a"),
                    &spec,
                    RestartPolicy::Never,
                    &VmLimits::default(),
                )
                .unwrap();
        }
        {
            let _d = doing("start");
            store.set_state("a", State::Starting, "").unwrap();
            store.set_state("a", State::Starting, "").unwrap();
            let _e = doing("exit");
            store.set_state("a", State::Crashed, "boom").unwrap();
        }
        store.delete("a").unwrap();
        let mut got = Vec::new();
        while let Ok(e) = rx.try_recv() {
            assert_eq!(e.kind, Kind::Lifecycle);
            let m = e.metadata;
            got.push(format!(
                "{} {}>{} {} {}",
                m["vm"], m["from"], m["to"], m["action"], m["reason"]
            ));
        }
        assert_eq!(
            got,
            [
                r#""a" null>"defined" "create" """#,
                r#""a" "defined">"starting" "start" """#,
                r#""a" "starting">"crashed" "exit" "boom""#,
                r#""a" "crashed">null "" """#,
            ]
        );
    }

    #[test]
    fn a_slow_subscriber_loses_events_and_blocks_nobody() {
        let events = Events::new();
        let mut rx = events.subscribe();
        for i in 0..BACKLOG + 10 {
            events.publish(Kind::Operation, Value::from(i));
        }
        match rx.try_recv() {
            Err(broadcast::error::TryRecvError::Lagged(n)) => assert_eq!(n, 10),
            other => panic!("{other:?}"),
        }
        assert_eq!(rx.try_recv().unwrap().metadata, Value::from(10));
    }
}

//! The VM lifecycle as an explicit state machine: which actions each state allows and where
//! they lead. Pure (no I/O), so every transition is tested here; the daemon asks it before
//! acting and answers 409 with [`allowed`] when it says no.

use serde::{Deserialize, Serialize};
use std::fmt;

/// Where a VM is in its life. `Starting` and `Stopping` are transient: they are recorded
/// before the daemon acts, so a crash of the daemon mid-way leaves a state that says what was
/// being done.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum State {
    /// Created, never started.
    Defined,
    Starting,
    Running,
    Paused,
    Stopping,
    /// Its monitor exited cleanly (asked to, or the guest powered off).
    Stopped,
    /// Its monitor exited without being asked to, with a failure; the reason is stored.
    Crashed,
}

/// What a user can ask of a VM.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    Start,
    Stop,
    Pause,
    Resume,
    Restart,
    Delete,
}

pub const ALL_STATES: [State; 7] = [
    State::Defined,
    State::Starting,
    State::Running,
    State::Paused,
    State::Stopping,
    State::Stopped,
    State::Crashed,
];

pub const ALL_ACTIONS: [Action; 6] = [
    Action::Start,
    Action::Stop,
    Action::Pause,
    Action::Resume,
    Action::Restart,
    Action::Delete,
];

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Defined => "defined",
            State::Starting => "starting",
            State::Running => "running",
            State::Paused => "paused",
            State::Stopping => "stopping",
            State::Stopped => "stopped",
            State::Crashed => "crashed",
        }
    }

    pub fn parse(s: &str) -> Option<State> {
        ALL_STATES.into_iter().find(|st| st.as_str() == s)
    }

    /// Whether a monitor process is (or should be) alive for the VM.
    pub fn has_monitor(self) -> bool {
        matches!(
            self,
            State::Starting | State::Running | State::Paused | State::Stopping
        )
    }
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Start => "start",
            Action::Stop => "stop",
            Action::Pause => "pause",
            Action::Resume => "resume",
            Action::Restart => "restart",
            Action::Delete => "delete",
        }
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The actions `state` allows, in a fixed order (what a 409 lists).
pub fn allowed(state: State) -> &'static [Action] {
    use Action::*;
    match state {
        State::Defined | State::Stopped | State::Crashed => &[Start, Delete],
        State::Running => &[Stop, Pause, Restart],
        // A paused VM can be stopped without resuming it first: the monitor's `stop` ends it.
        State::Paused => &[Stop, Resume, Restart],
        // Transient states accept only a stop, so a hung start or a guest that ignores the
        // power button can always be ended (with force).
        State::Starting | State::Stopping => &[Stop],
    }
}

/// The state an allowed action moves to while it is carried out (the transient state the
/// store records first). `None` for `delete`, which removes the record.
pub fn begins(action: Action) -> Option<State> {
    match action {
        Action::Start | Action::Restart => Some(State::Starting),
        Action::Stop => Some(State::Stopping),
        Action::Pause => Some(State::Paused),
        Action::Resume => Some(State::Running),
        Action::Delete => None,
    }
}

/// What the daemon does when a VM's monitor exits without being asked to.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum RestartPolicy {
    /// Leave it stopped or crashed.
    #[default]
    Never,
    /// Start it again after a crash.
    OnFailure,
    /// Start it again after any exit it was not asked for (a crash, or the guest powering
    /// itself off).
    Always,
}

impl RestartPolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            RestartPolicy::Never => "never",
            RestartPolicy::OnFailure => "on-failure",
            RestartPolicy::Always => "always",
        }
    }

    pub fn parse(s: &str) -> Option<RestartPolicy> {
        [Self::Never, Self::OnFailure, Self::Always]
            .into_iter()
            .find(|p| p.as_str() == s)
    }

    /// Whether a monitor's exit that left the VM in `after` (see [`after_exit`]) calls for a
    /// new start. `asked` says whether the daemon had asked it to stop: never restarted.
    pub fn restarts(self, asked: bool, after: State) -> bool {
        !asked
            && match self {
                RestartPolicy::Never => false,
                RestartPolicy::OnFailure => after == State::Crashed,
                RestartPolicy::Always => true,
            }
    }
}

/// How long to wait before the `attempt`th automatic restart in a row (0 first): doubling
/// from 1 s up to a minute, so a VM that cannot boot does not keep the host busy.
pub fn backoff(attempt: u32) -> std::time::Duration {
    std::time::Duration::from_secs(1u64 << attempt.min(6)).min(std::time::Duration::from_secs(60))
}

/// Refused transition: names the state and what it allows, for the 409 body.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cannot {action} a VM that is {state}; allowed now: {}", list(allowed(*state)))]
pub struct Illegal {
    pub state: State,
    pub action: Action,
}

fn list(actions: &[Action]) -> String {
    if actions.is_empty() {
        return "nothing".into();
    }
    actions
        .iter()
        .map(|a| a.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Checks that `action` is allowed in `state`.
pub fn check(state: State, action: Action) -> Result<(), Illegal> {
    if allowed(state).contains(&action) {
        Ok(())
    } else {
        Err(Illegal { state, action })
    }
}

/// The state a monitor's exit leaves the VM in. An exit the daemon asked for (the VM was
/// stopping) is a stop whatever the status; otherwise only a clean exit (status 0: the guest
/// powered off or rebooted with on_reboot=exit) is, and anything else is a crash.
pub fn after_exit(state: State, clean: bool) -> State {
    if state == State::Stopping || clean {
        State::Stopped
    } else {
        State::Crashed
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Action::*;
    use State::*;

    /// The whole table, written out once more by hand: a change to `allowed` must be a
    /// deliberate change here too.
    #[test]
    fn every_state_action_pair() {
        let ok = |s: State, a: Action| -> bool {
            matches!(
                (s, a),
                (Defined | Stopped | Crashed, Start | Delete)
                    | (Running, Stop | Pause | Restart)
                    | (Paused, Stop | Resume | Restart)
                    | (Starting | Stopping, Stop)
            )
        };
        for s in ALL_STATES {
            for a in ALL_ACTIONS {
                assert_eq!(check(s, a).is_ok(), ok(s, a), "{s} {a}");
            }
        }
    }

    #[test]
    fn illegal_names_state_and_allowed_actions() {
        let e = check(Running, Start).unwrap_err();
        assert_eq!(
            e.to_string(),
            "cannot start a VM that is running; allowed now: stop, pause, restart"
        );
        let e = check(Defined, Pause).unwrap_err();
        assert!(e.to_string().contains("allowed now: start, delete"), "{e}");
    }

    #[test]
    fn a_running_vm_cannot_be_deleted() {
        for s in [Starting, Running, Paused, Stopping] {
            assert!(check(s, Delete).is_err(), "{s}");
            assert!(s.has_monitor());
        }
        for s in [Defined, Stopped, Crashed] {
            assert!(check(s, Delete).is_ok(), "{s}");
            assert!(!s.has_monitor());
        }
    }

    #[test]
    fn every_state_allows_something() {
        for s in ALL_STATES {
            assert!(!allowed(s).is_empty(), "{s} would be a dead end");
        }
    }

    #[test]
    fn actions_begin_in_the_right_state() {
        assert_eq!(begins(Start), Some(Starting));
        assert_eq!(begins(Restart), Some(Starting));
        assert_eq!(begins(Stop), Some(Stopping));
        assert_eq!(begins(Pause), Some(Paused));
        assert_eq!(begins(Resume), Some(Running));
        assert_eq!(begins(Delete), None);
    }

    #[test]
    fn exits() {
        assert_eq!(after_exit(Stopping, false), Stopped);
        assert_eq!(after_exit(Stopping, true), Stopped);
        assert_eq!(after_exit(Running, true), Stopped);
        assert_eq!(after_exit(Running, false), Crashed);
        assert_eq!(after_exit(Paused, false), Crashed);
        assert_eq!(after_exit(Starting, false), Crashed);
    }

    #[test]
    fn restart_policies() {
        use RestartPolicy::*;
        for p in [Never, OnFailure, Always] {
            assert!(
                !p.restarts(true, Stopped) && !p.restarts(true, Crashed),
                "{p:?}"
            );
            assert_eq!(RestartPolicy::parse(p.as_str()), Some(p));
        }
        assert!(!Never.restarts(false, Crashed));
        assert!(OnFailure.restarts(false, Crashed));
        assert!(!OnFailure.restarts(false, Stopped));
        assert!(Always.restarts(false, Stopped));
        assert!(Always.restarts(false, Crashed));
        assert_eq!(serde_json::to_string(&OnFailure).unwrap(), "\"on-failure\"");
    }

    #[test]
    fn backoff_doubles_up_to_a_minute() {
        let secs: Vec<u64> = (0..9).map(|a| backoff(a).as_secs()).collect();
        assert_eq!(secs, [1, 2, 4, 8, 16, 32, 60, 60, 60]);
        assert_eq!(backoff(u32::MAX).as_secs(), 60);
    }

    #[test]
    fn names_round_trip() {
        for s in ALL_STATES {
            assert_eq!(State::parse(s.as_str()), Some(s));
            assert_eq!(serde_json::to_string(&s).unwrap(), format!("\"{s}\""));
        }
        assert_eq!(State::parse("bogus"), None);
    }
}

//! Reaching into a running guest: its serial console (the monitor's console socket, which
//! the API splices to an upgraded HTTP connection) and commands through its agent over
//! vsock (`POST /1.0/vms/NAME/exec`).

use crate::daemon::{Daemon, OpError, vm_dir};
use crate::lifecycle::State;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;
use vme_api::agent::AgentClient;

/// How long an exec waits for the guest's agent to answer (a VM that just started is still
/// booting).
const AGENT_WAIT: Duration = Duration::from_secs(60);
/// A command's time limit when the request names none, and the largest one it may name.
pub const DEFAULT_EXEC_TIMEOUT: u64 = 300;
pub const MAX_EXEC_TIMEOUT: u64 = 24 * 3600;
/// Bounds on what an exec request may carry (the agent's frame holds 64 KiB of JSON).
const MAX_ARGS: usize = 4096;
const MAX_ENV: usize = 1024;

pub fn console_socket(state_dir: &std::path::Path, name: &str) -> PathBuf {
    vm_dir(state_dir, name).join("console.sock")
}

pub fn vsock_socket(state_dir: &std::path::Path, name: &str) -> PathBuf {
    vm_dir(state_dir, name).join("vsock.sock")
}

/// The body of `POST /1.0/vms/{name}/exec`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExecRequest {
    /// The program and its arguments (no shell: use `["sh","-c","..."]` for one).
    pub command: Vec<String>,
    /// Added to the agent's environment.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// The command is killed after this many seconds (default 300; 0: no limit).
    #[serde(default)]
    pub timeout_secs: Option<u64>,
    /// How the reply carries stdout and stderr.
    #[serde(default)]
    pub output: Encoding,
}

/// `text` (default): UTF-8, invalid sequences replaced by U+FFFD; `base64`: the exact bytes.
#[derive(Debug, Default, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Encoding {
    #[default]
    Text,
    Base64,
}

impl Encoding {
    fn apply(self, bytes: &[u8]) -> String {
        match self {
            Encoding::Text => String::from_utf8_lossy(bytes).into_owned(),
            Encoding::Base64 => vme_api::base64::encode(bytes),
        }
    }
}

/// What a command did.
#[derive(Debug, Serialize)]
pub struct ExecReply {
    /// The exit status a shell would report: the command's, 128+N for signal N, 124 when
    /// its timeout killed it.
    pub status: u8,
    pub signal: Option<i32>,
    pub timed_out: bool,
    /// Output past 64 MiB was dropped.
    pub truncated: bool,
    /// How `stdout` and `stderr` are written (the request's `output`).
    pub encoding: Encoding,
    pub stdout: String,
    pub stderr: String,
}

impl ExecRequest {
    fn check(&self) -> Result<(), String> {
        if self.command.is_empty() || self.command[0].is_empty() {
            return Err(
                "command is empty: give the program and its arguments, like \
                        [\"uname\",\"-m\"]"
                    .into(),
            );
        }
        if self.command.len() > MAX_ARGS || self.env.len() > MAX_ENV {
            return Err(format!(
                "at most {MAX_ARGS} arguments and {MAX_ENV} variables: pass the rest through a \
                 script"
            ));
        }
        if self.command.iter().any(|a| a.contains('\0')) {
            return Err("an argument contains a NUL byte: remove it".into());
        }
        for k in self.env.keys() {
            if k.is_empty() || k.contains(['=', '\0']) {
                return Err(format!(
                    "environment variable name {k:?} is empty or contains '=' or NUL: fix it"
                ));
            }
        }
        if self.env.values().any(|v| v.contains('\0')) {
            return Err("an environment value contains a NUL byte: remove it".into());
        }
        if let Some(t) = self.timeout_secs {
            if t > MAX_EXEC_TIMEOUT {
                return Err(format!(
                    "timeout_secs {t} is over a day: give at most {MAX_EXEC_TIMEOUT} (or 0 for \
                     no limit)"
                ));
            }
        }
        Ok(())
    }
}

impl Daemon {
    /// Refuses (409, with the state) unless the VM is in one of `states`.
    fn require(
        &self,
        name: &str,
        states: &[State],
        what: &str,
    ) -> Result<crate::store::VmRecord, OpError> {
        let vm = self.get(name)?;
        if !states.contains(&vm.state) {
            return Err(OpError::NotRunning {
                msg: format!(
                    "VM {name:?} is {}: {what} needs it running; start it with `vme start {name}`",
                    vm.state
                ),
                state: vm.state,
            });
        }
        Ok(vm)
    }

    /// The monitor's console socket, for a VM whose monitor runs.
    pub fn console_attach(&self, name: &str) -> Result<PathBuf, OpError> {
        self.require(
            name,
            &[State::Running, State::Paused],
            "attaching to its console",
        )?;
        Ok(console_socket(&self.config().state_dir, name))
    }

    /// Runs a command in the guest through its agent; waits for it to end.
    pub fn exec(&self, name: &str, req: &ExecRequest) -> Result<ExecReply, OpError> {
        req.check().map_err(OpError::BadRequest)?;
        let vm = self.require(name, &[State::Running], "exec")?;
        let Some(vsock) = vm.spec.vsock else {
            return Err(OpError::BadRequest(format!(
                "VM {name:?} has no vsock device (it was created with vsock: false), so its \
                 agent cannot be reached: recreate it with vsock"
            )));
        };
        let mut agent = AgentClient::wait(&vsock.uds, AGENT_WAIT).map_err(|e| {
            OpError::Unavailable(format!(
                "the guest agent of VM {name:?} does not answer within {}s ({e}): does the \
                 guest run vme-agent and has it finished booting?",
                AGENT_WAIT.as_secs()
            ))
        })?;
        let timeout = req.timeout_secs.unwrap_or(DEFAULT_EXEC_TIMEOUT);
        // The reply comes when the command ends: allow for its time limit.
        let limit = (timeout > 0).then(|| Duration::from_secs(timeout + 30));
        let failed = |e: std::io::Error| {
            OpError::Unavailable(format!("the guest agent of VM {name:?} failed: {e}"))
        };
        agent.set_timeout(limit).map_err(failed)?;
        let env: Vec<(String, String)> = req.env.clone().into_iter().collect();
        let out = agent
            .exec_env(&req.command, &env, &[], Duration::from_secs(timeout))
            .map_err(failed)?;
        Ok(ExecReply {
            status: out.status(),
            signal: out.signal,
            timed_out: out.timed_out,
            truncated: out.truncated,
            encoding: req.output,
            stdout: req.output.apply(&out.stdout),
            stderr: req.output.apply(&out.stderr),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(json: &str) -> Result<(), String> {
        serde_json::from_str::<ExecRequest>(json)
            .map_err(|e| e.to_string())?
            .check()
    }

    #[test]
    fn exec_requests_are_checked() {
        assert_eq!(req(r#"{"command":["uname","-m"]}"#), Ok(()));
        assert_eq!(
            req(r#"{"command":["env"],"env":{"A":"1"},"timeout_secs":5}"#),
            Ok(())
        );
        for (bad, why) in [
            (r#"{"command":[]}"#, "empty"),
            (r#"{"command":[""]}"#, "empty"),
            (r#"{"command":["a\u0000"]}"#, "NUL"),
            (r#"{"command":["env"],"env":{"A=B":"1"}}"#, "contains '='"),
            (r#"{"command":["env"],"timeout_secs":100000}"#, "over a day"),
            (r#"{"command":["env"],"cmd":1}"#, "unknown field"),
            (r#"{"command":"uname"}"#, "invalid type"),
            (r#"{"command":["env"],"output":"hex"}"#, "unknown variant"),
        ] {
            let e = req(bad).unwrap_err();
            assert!(e.contains(why), "{bad}: {e}");
        }
    }
}

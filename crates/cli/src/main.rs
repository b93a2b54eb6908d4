//! `vme`, the command line of the vme environment: asks the daemon (`vmed`) over its REST
//! API on a Unix socket. It holds no state of its own.

mod http;
mod output;

use anyhow::{Context, Result, bail};
use clap::{CommandFactory, Parser, Subcommand};
use output::Format;
use serde_json::{Value, json};
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

const DEFAULT_SOCKET: &str = "/run/vme/vme.sock";

#[derive(Parser, Debug)]
#[command(
    name = "vme",
    version,
    about = "Manage virtual machines through the vme daemon (vmed)"
)]
struct Cli {
    /// The daemon's socket (default: $VME_SOCKET, else /run/vme/vme.sock).
    #[arg(long, global = true)]
    socket: Option<PathBuf>,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// List the VMs and their states.
    List {
        /// table, or json or yaml (the daemon's records, for scripts).
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
    },
    /// Define a VM (it is not started).
    Create {
        name: String,
        #[command(flatten)]
        spec: SpecArgs,
    },
    /// Define a VM and start it (create + start).
    Launch {
        name: String,
        #[command(flatten)]
        spec: SpecArgs,
    },
    /// Start a VM.
    Start { name: String },
    /// Stop a VM: the ACPI power button, then a hard stop after the daemon's timeout.
    Stop {
        name: String,
        /// Stop at once, without asking the guest.
        #[arg(long)]
        force: bool,
    },
    /// Pause a running VM's vCPUs.
    Pause { name: String },
    /// Resume a paused VM.
    Resume { name: String },
    /// Stop and start a VM.
    Restart {
        name: String,
        #[arg(long)]
        force: bool,
    },
    /// Delete a stopped VM and its files.
    #[command(alias = "rm")]
    Delete { name: String },
    /// Show a VM's record (state, reason, spec).
    Info {
        name: String,
        /// json, yaml or table (key: value lines).
        #[arg(long, value_enum, default_value_t = Format::Json)]
        format: Format,
    },
    /// Print the end of a VM's console output (interactive attach is not there yet).
    Console {
        name: String,
        /// Print the console log and exit.
        #[arg(long)]
        show_log: bool,
    },
    /// Follow the daemon's events (VM state changes, operations) until interrupted.
    Events {
        /// Only these kinds (comma-separated): lifecycle, operation.
        #[arg(long = "type", value_enum, value_delimiter = ',')]
        types: Vec<EventType>,
        /// table (one line an event), json (one JSON object a line) or yaml (a document
        /// an event).
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
    },
    /// The daemon's operations (long actions, running and recent).
    #[command(subcommand, alias = "op")]
    Operation(OpCmd),
    /// Print a shell completion script: `source <(vme completion bash)`.
    Completion {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

#[derive(Subcommand, Debug)]
enum OpCmd {
    /// List the operations running and recently ended.
    #[command(alias = "ls")]
    List {
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
    },
    /// Show one operation.
    Show {
        id: String,
        #[arg(long, value_enum, default_value_t = Format::Json)]
        format: Format,
    },
    /// Wait for an operation to end; fails if it failed (or is still running after
    /// --timeout).
    Wait {
        id: String,
        /// Seconds to wait at most (default: until it ends).
        #[arg(long)]
        timeout: Option<f64>,
        #[arg(long, value_enum, default_value_t = Format::Json)]
        format: Format,
    },
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
enum EventType {
    Lifecycle,
    Operation,
}

impl EventType {
    fn as_str(self) -> &'static str {
        match self {
            EventType::Lifecycle => "lifecycle",
            EventType::Operation => "operation",
        }
    }
}

/// What a new VM is made of.
#[derive(clap::Args, Debug)]
struct SpecArgs {
    /// Kernel image (bzImage or ELF for x86_64, Image for riscv64).
    #[arg(long)]
    kernel: PathBuf,
    /// An initramfs.
    #[arg(long)]
    initrd: Option<PathBuf>,
    /// x86_64 (KVM, default) or riscv64 (software machine).
    #[arg(long)]
    arch: Option<String>,
    #[arg(long)]
    vcpus: Option<u32>,
    /// Guest memory: 256M, 2G or bytes.
    #[arg(long)]
    memory: Option<String>,
    /// The kernel command line.
    #[arg(long)]
    cmdline: Option<String>,
    /// What the daemon does when the VM's monitor exits on its own: never (default),
    /// on-failure or always.
    #[arg(long)]
    restart: Option<String>,
}

impl SpecArgs {
    /// The create request's body.
    fn body(self, name: &str) -> Result<Value> {
        let mut body = json!({"name": name, "kernel": absolute("kernel", &self.kernel)?});
        if let Some(i) = self.initrd {
            body["initrd"] = json!(absolute("initrd", &i)?);
        }
        for (k, v) in [
            ("arch", self.arch.map(Value::from)),
            ("vcpus", self.vcpus.map(Value::from)),
            ("memory", self.memory.map(Value::from)),
            ("cmdline", self.cmdline.map(Value::from)),
            ("restart_policy", self.restart.map(Value::from)),
        ] {
            if let Some(v) = v {
                body[k] = v;
            }
        }
        Ok(body)
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vme: {e:#}");
            ExitCode::from(1)
        }
    }
}

/// `--socket`, else `$VME_SOCKET`, else the default.
fn socket_path(flag: Option<PathBuf>, env: Option<std::ffi::OsString>) -> PathBuf {
    flag.or_else(|| env.filter(|v| !v.is_empty()).map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from(DEFAULT_SOCKET))
}

/// The daemon does not share our working directory: send it absolute paths.
fn absolute(what: &str, p: &Path) -> Result<PathBuf> {
    std::fs::canonicalize(p).with_context(|| format!("{what} {}: check the path", p.display()))
}

fn run(cli: Cli) -> Result<()> {
    let socket = socket_path(cli.socket, std::env::var_os("VME_SOCKET"));
    let api = Api { socket };
    // Long actions run as operations the CLI waits on, showing progress on a terminal;
    // short ones (pause, resume) answer at once.
    let state = |name: &str, action: &str, force: bool, long: bool| -> Result<()> {
        let body = json!({"action": action, "force": force});
        let path = format!("/1.0/vms/{}/state", segment(name)?);
        let vm = if long {
            let op = api.call("PUT", &format!("{path}?async=true"), Some(body))?;
            api.wait(&op)?["metadata"].clone()
        } else {
            api.call("PUT", &path, Some(body))?
        };
        println!("{name}: {}", vm["state"].as_str().unwrap_or("?"));
        Ok(())
    };
    let print = |format: Format, v: &Value| -> Result<()> { out(&output::encode(format, v)?) };
    match cli.command {
        Cmd::List { format } => {
            let vms = api.call("GET", "/1.0/vms", None)?;
            match format {
                Format::Table => out(&output::vm_table(
                    vms.as_array().map(Vec::as_slice).unwrap_or_default(),
                ))?,
                f => print(f, &vms)?,
            }
        }
        Cmd::Create { name, spec } => {
            api.call("POST", "/1.0/vms", Some(spec.body(&name)?))?;
            println!("{name}: defined (start it with `vme start {name}`)");
        }
        Cmd::Launch { name, spec } => {
            api.call("POST", "/1.0/vms", Some(spec.body(&name)?))?;
            state(&name, "start", false, true)?;
        }
        Cmd::Start { name } => state(&name, "start", false, true)?,
        Cmd::Stop { name, force } => state(&name, "stop", force, true)?,
        Cmd::Pause { name } => state(&name, "pause", false, false)?,
        Cmd::Resume { name } => state(&name, "resume", false, false)?,
        Cmd::Restart { name, force } => state(&name, "restart", force, true)?,
        Cmd::Delete { name } => {
            api.call("DELETE", &format!("/1.0/vms/{}", segment(&name)?), None)?;
            println!("{name}: deleted");
        }
        Cmd::Console { name, show_log } => {
            if !show_log {
                bail!(
                    "attaching to a console is not implemented yet: use `vme console {name} --show-log`"
                );
            }
            let v = api.call(
                "GET",
                &format!("/1.0/vms/{}/console", segment(&name)?),
                None,
            )?;
            print!("{}", v["log"].as_str().unwrap_or_default());
        }
        Cmd::Info { name, format } => {
            let vm = api.call("GET", &format!("/1.0/vms/{}", segment(&name)?), None)?;
            print(format, &vm)?;
        }
        Cmd::Events { types, format } => {
            let mut path = "/1.0/events".to_string();
            if !types.is_empty() {
                let t: Vec<_> = types.iter().map(|t| t.as_str()).collect();
                path = format!("{path}?type={}", t.join(","));
            }
            api.events(&path, format)?;
        }
        Cmd::Operation(OpCmd::List { format }) => {
            let ops = api.call("GET", "/1.0/operations", None)?;
            match format {
                Format::Table => out(&output::op_table(
                    ops.as_array().map(Vec::as_slice).unwrap_or_default(),
                ))?,
                f => print(f, &ops)?,
            }
        }
        Cmd::Operation(OpCmd::Show { id, format }) => {
            let op = api.call(
                "GET",
                &format!("/1.0/operations/{}", segment_id(&id)?),
                None,
            )?;
            print(format, &op)?;
        }
        Cmd::Operation(OpCmd::Wait {
            id,
            timeout,
            format,
        }) => {
            let path = format!("/1.0/operations/{}", segment_id(&id)?);
            let op = match timeout {
                Some(t) => api.call("GET", &format!("{path}/wait?timeout={t}"), None)?,
                None => api.call("GET", &path, None)?,
            };
            let op = match timeout {
                None => api.wait_end(&op)?,
                Some(_) => op,
            };
            print(format, &op)?;
            match op["status"].as_str() {
                Some("Success") => {}
                Some("Running") => bail!(
                    "operation {id} is still running after {}s: wait again with `vme \
                     operation wait {id}`",
                    timeout.unwrap_or_default()
                ),
                _ => bail!(
                    "operation {id} failed: {}",
                    op["err"].as_str().unwrap_or("?")
                ),
            }
        }
        Cmd::Completion { shell } => {
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "vme", &mut script);
            out(&String::from_utf8_lossy(&script))?;
        }
    }
    Ok(())
}

/// Prints to stdout; a reader that went away (`vme events | head`) ends us quietly.
fn out(text: &str) -> Result<()> {
    let mut o = std::io::stdout().lock();
    match o.write_all(text.as_bytes()).and_then(|()| o.flush()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => std::process::exit(0),
        r => Ok(r?),
    }
}

/// An operation id as one URL path segment.
fn segment_id(id: &str) -> Result<&str> {
    if id.is_empty() || !id.chars().all(|c| c.is_ascii_hexdigit() || c == '-') {
        bail!("{id:?} is not an operation id: see `vme operation list` for them");
    }
    Ok(id)
}

/// A name as one URL path segment. Characters that would change the path's meaning are
/// refused here; the daemon checks the rest and says what a name may contain.
fn segment(name: &str) -> Result<&str> {
    if name.is_empty() || name.contains(['/', '?', '#', '%', ' ']) || name == "." || name == ".." {
        bail!("VM name {name:?} is not valid: use only letters, digits and '-'");
    }
    Ok(name)
}

struct Api {
    socket: PathBuf,
}

impl Api {
    fn unreachable(&self, e: std::io::Error) -> anyhow::Error {
        anyhow::anyhow!(
            "cannot reach vmed at {}: {e}; is the daemon running? Start it with \
             `vmed --socket {0}`, or point --socket or VME_SOCKET at its socket",
            self.socket.display()
        )
    }

    /// One API request; returns the reply's `metadata`, or the daemon's error message.
    fn call(&self, method: &str, path: &str, body: Option<Value>) -> Result<Value> {
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        let (code, text) =
            http::request(&self.socket, method, path, &body).map_err(|e| self.unreachable(e))?;
        reply(code, &text)
    }

    /// Waits for an operation (as the daemon returned it) to end; returns it when it
    /// succeeded, its error otherwise.
    fn wait(&self, op: &Value) -> Result<Value> {
        let op = self.wait_end(op)?;
        match op["status"].as_str() {
            Some("Success") => Ok(op),
            _ => bail!(
                "{} (operation {})",
                op["err"].as_str().unwrap_or("the operation failed"),
                op["id"].as_str().unwrap_or("?")
            ),
        }
    }

    /// Waits for an operation to end, with a spinner naming it and the time spent on a
    /// terminal (nothing otherwise); returns it as it ended.
    fn wait_end(&self, op: &Value) -> Result<Value> {
        let id = op["id"]
            .as_str()
            .context("vmed returned an operation without an id")?;
        let spinner = std::io::stderr().is_terminal().then(|| {
            let p = indicatif::ProgressBar::new_spinner();
            if let Ok(style) =
                indicatif::ProgressStyle::with_template("{spinner} {msg} ({elapsed})")
            {
                p.set_style(style);
            }
            p.set_message(op["description"].as_str().unwrap_or(id).to_string());
            p.enable_steady_tick(Duration::from_millis(100));
            p
        });
        let mut op = op.clone();
        while op["status"] == "Running" {
            op = self.call(
                "GET",
                &format!("/1.0/operations/{id}/wait?timeout=30"),
                None,
            )?;
        }
        if let Some(p) = spinner {
            p.finish_and_clear();
        }
        Ok(op)
    }

    /// Prints the event stream at `path` until the daemon ends it.
    fn events(&self, path: &str, format: Format) -> Result<()> {
        let failed = http::stream_lines(&self.socket, path, |line| {
            if line.is_empty() {
                return Ok(true);
            }
            let text = match serde_json::from_str::<Value>(line) {
                Ok(e) => output::event_line(format, &e).map_err(std::io::Error::other)?,
                Err(_) => format!("{line}\n"),
            };
            let mut o = std::io::stdout().lock();
            match o.write_all(text.as_bytes()).and_then(|()| o.flush()) {
                Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(false),
                r => r.map(|()| true),
            }
        })
        .map_err(|e| self.unreachable(e))?;
        if let Some((code, text)) = failed {
            reply(code, &text)?;
        }
        Ok(())
    }
}

/// A reply's `metadata`, or the daemon's error message.
fn reply(code: u16, text: &str) -> Result<Value> {
    let v: Value = serde_json::from_str(text)
        .with_context(|| format!("vmed sent a reply that is not JSON (HTTP {code}): {text:?}"))?;
    if !(200..300).contains(&code) {
        let msg = v["error"].as_str().unwrap_or("no message");
        bail!("{msg} (HTTP {code})");
    }
    Ok(v["metadata"].clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socket_flag_then_env_then_default() {
        let p =
            |f: Option<&str>, e: Option<&str>| socket_path(f.map(PathBuf::from), e.map(Into::into));
        assert_eq!(p(Some("/a"), Some("/b")), PathBuf::from("/a"));
        assert_eq!(p(None, Some("/b")), PathBuf::from("/b"));
        assert_eq!(p(None, Some("")), PathBuf::from(DEFAULT_SOCKET));
        assert_eq!(p(None, None), PathBuf::from(DEFAULT_SOCKET));
    }

    #[test]
    fn names_that_would_change_the_path_are_refused() {
        for n in ["", "a/b", "..", ".", "a?b", "a%2f", "a b"] {
            assert!(segment(n).is_err(), "{n:?}");
        }
        assert_eq!(segment("web-1").unwrap(), "web-1");
    }

    #[test]
    fn operation_ids() {
        assert!(segment_id("0f1e2d3c-aaaa-4bbb-8ccc-123456789abc").is_ok());
        for id in ["", "../vms", "a b", "x?y"] {
            assert!(segment_id(id).is_err(), "{id:?}");
        }
    }

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }
}

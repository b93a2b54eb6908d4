//! `vme`, the command line of the vme environment: asks the daemon (`vmed`) over its REST
//! API on a Unix socket. It holds no state of its own.

mod console;
mod http;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

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
        /// table (default) or json (the daemon's records, for scripts).
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
    /// Show a VM's record (state, reason, spec) as JSON.
    Info { name: String },
    /// Attach to a VM's serial console (detach with Ctrl-a q; Ctrl-a Ctrl-a sends Ctrl-a).
    Console {
        name: String,
        /// Print the end of the console log and exit.
        #[arg(long)]
        show_log: bool,
    },
    /// Run a command in a running VM through its guest agent; exits with its status.
    Exec {
        name: String,
        /// KEY=VALUE added to the command's environment (repeatable).
        #[arg(long = "env", value_name = "KEY=VALUE")]
        env: Vec<String>,
        /// Kill the command after this many seconds (default 300; 0: no limit).
        #[arg(long)]
        timeout: Option<u64>,
        /// The program and its arguments, after `--`.
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
enum Format {
    Table,
    Json,
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
    /// A disk image: PATH[,ro] (repeatable; vda, vdb, ... in this order).
    #[arg(long = "disk", value_name = "PATH[,ro]")]
    disks: Vec<String>,
    /// A NIC on a host tap: tap=NAME[,mac=52:54:00:12:34:56], or `default` for a tap
    /// named after the VM (repeatable).
    #[arg(long = "net", value_name = "tap=NAME[,mac=MAC]")]
    nets: Vec<String>,
    /// No vsock device: the VM gets no guest agent, so `vme exec` cannot reach it.
    #[arg(long)]
    no_vsock: bool,
}

/// `--disk PATH[,ro]` as a create request's disk.
fn disk(arg: &str) -> Result<Value> {
    let (path, ro) = match arg.rsplit_once(',') {
        Some((p, "ro")) => (p, true),
        Some((_, opt)) => bail!("unknown disk option {opt:?} in {arg:?}: use PATH or PATH,ro"),
        None => (arg, false),
    };
    let path = absolute("disk", Path::new(path))?;
    Ok(json!({"path": path, "readonly": ro}))
}

/// `--net tap=NAME[,mac=MAC]` (or `default`) as a create request's NIC.
fn nic(arg: &str) -> Result<Value> {
    let mut nic = json!({});
    if arg == "default" {
        return Ok(nic);
    }
    for item in arg.split(',') {
        match item.split_once('=') {
            Some(("tap", v)) => nic["tap"] = json!(v),
            Some(("mac", v)) => nic["mac"] = json!(v),
            _ => bail!(
                "invalid net option {item:?} in {arg:?}: use tap=NAME[,mac=52:54:00:12:34:56]                  or default"
            ),
        }
    }
    Ok(nic)
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
        if !self.disks.is_empty() {
            body["disks"] = self.disks.iter().map(|d| disk(d)).collect::<Result<_>>()?;
        }
        if !self.nets.is_empty() {
            body["nics"] = self.nets.iter().map(|n| nic(n)).collect::<Result<_>>()?;
        }
        if self.no_vsock {
            body["vsock"] = json!(false);
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
    let state = |name: &str, action: &str, force: bool| -> Result<()> {
        let body = json!({"action": action, "force": force});
        let vm = api.call(
            "PUT",
            &format!("/1.0/vms/{}/state", segment(name)?),
            Some(body),
        )?;
        println!("{name}: {}", vm["state"].as_str().unwrap_or("?"));
        Ok(())
    };
    match cli.command {
        Cmd::List { format } => {
            let vms = api.call("GET", "/1.0/vms", None)?;
            match format {
                Format::Table => {
                    print!(
                        "{}",
                        table(vms.as_array().map(Vec::as_slice).unwrap_or_default())
                    )
                }
                Format::Json => println!("{}", serde_json::to_string_pretty(&vms)?),
            }
        }
        Cmd::Create { name, spec } => {
            api.call("POST", "/1.0/vms", Some(spec.body(&name)?))?;
            println!("{name}: defined (start it with `vme start {name}`)");
        }
        Cmd::Launch { name, spec } => {
            api.call("POST", "/1.0/vms", Some(spec.body(&name)?))?;
            state(&name, "start", false)?;
        }
        Cmd::Start { name } => state(&name, "start", false)?,
        Cmd::Stop { name, force } => state(&name, "stop", force)?,
        Cmd::Pause { name } => state(&name, "pause", false)?,
        Cmd::Resume { name } => state(&name, "resume", false)?,
        Cmd::Restart { name, force } => state(&name, "restart", force)?,
        Cmd::Delete { name } => {
            api.call("DELETE", &format!("/1.0/vms/{}", segment(&name)?), None)?;
            println!("{name}: deleted");
        }
        Cmd::Console {
            name,
            show_log: false,
        } => {
            let path = format!("/1.0/vms/{}/console?attach=1", segment(&name)?);
            let conn = match http::upgrade(&api.socket, &path, "vme-console")
                .map_err(|e| api.unreachable(e))?
            {
                Ok(conn) => conn,
                Err((code, text)) => bail!("{} (HTTP {code})", api_error(&text)),
            };
            let detached =
                console::session(conn, &name).context("the console connection failed")?;
            eprintln!(
                "{}",
                if detached {
                    "Detached from the console."
                } else {
                    "The console closed (the VM stopped, or another client attached)."
                }
            );
        }
        Cmd::Exec {
            name,
            env,
            timeout,
            command,
        } => {
            let mut vars = serde_json::Map::new();
            for e in &env {
                let Some((k, v)) = e.split_once('=') else {
                    bail!("--env {e:?} is not KEY=VALUE");
                };
                vars.insert(k.into(), json!(v));
            }
            // base64: the output's exact bytes, binary or not.
            let mut body = json!({"command": command, "env": vars, "output": "base64"});
            if let Some(t) = timeout {
                body["timeout_secs"] = json!(t);
            }
            // The reply comes when the command ends; the daemon also waits up to a minute
            // for the guest's agent.
            let within = std::time::Duration::from_secs(timeout.unwrap_or(300).max(1) + 120);
            let out = api.call_within(
                "POST",
                &format!("/1.0/vms/{}/exec", segment(&name)?),
                Some(body),
                if timeout == Some(0) {
                    std::time::Duration::from_secs(u64::from(u32::MAX))
                } else {
                    within
                },
            )?;
            let bytes = |key: &str| {
                vme_api::base64::decode(out[key].as_str().unwrap_or_default())
                    .with_context(|| format!("vmed sent a {key} that is not base64"))
            };
            let (stdout, stderr) = (bytes("stdout")?, bytes("stderr")?);
            use std::io::Write;
            // A closed stdout (`| head`) is not our failure.
            let _ = std::io::stdout().write_all(&stdout);
            let _ = std::io::stdout().flush();
            let _ = std::io::stderr().write_all(&stderr);
            if out["truncated"] == json!(true) {
                eprintln!("vme: the output was cut at 64 MiB");
            }
            if out["timed_out"] == json!(true) {
                eprintln!("vme: the command was killed after its timeout");
            }
            std::process::exit(out["status"].as_i64().unwrap_or(255) as i32);
        }
        Cmd::Console { name, .. } => {
            let v = api.call(
                "GET",
                &format!("/1.0/vms/{}/console", segment(&name)?),
                None,
            )?;
            print!("{}", v["log"].as_str().unwrap_or_default());
        }
        Cmd::Info { name } => {
            let vm = api.call("GET", &format!("/1.0/vms/{}", segment(&name)?), None)?;
            println!("{}", serde_json::to_string_pretty(&vm)?);
        }
    }
    Ok(())
}

/// A name as one URL path segment. Characters that would change the path's meaning are
/// refused here; the daemon checks the rest and says what a name may contain.
fn segment(name: &str) -> Result<&str> {
    if name.is_empty() || name.contains(['/', '?', '#', '%', ' ']) || name == "." || name == ".." {
        bail!("VM name {name:?} is not valid: use only letters, digits and '-'");
    }
    Ok(name)
}

/// The message of an error reply (or the reply itself when it is not one).
fn api_error(text: &str) -> String {
    serde_json::from_str::<Value>(text)
        .ok()
        .and_then(|v| v["error"].as_str().map(String::from))
        .unwrap_or_else(|| text.to_string())
}

fn table(vms: &[Value]) -> String {
    let rows: Vec<[String; 5]> = vms
        .iter()
        .map(|v| {
            let s = |x: &Value| {
                x.as_str()
                    .map(String::from)
                    .unwrap_or_else(|| x.to_string())
            };
            [
                s(&v["name"]),
                s(&v["state"]),
                s(&v["spec"]["arch"]),
                s(&v["spec"]["vcpus"]),
                s(&v["spec"]["memory"]),
            ]
        })
        .collect();
    let head = ["NAME", "STATE", "ARCH", "VCPUS", "MEMORY"].map(String::from);
    let mut w = [0; 5];
    for r in std::iter::once(&head).chain(&rows) {
        for (i, c) in r.iter().enumerate() {
            w[i] = w[i].max(c.len());
        }
    }
    let mut out = String::new();
    for r in std::iter::once(&head).chain(&rows) {
        let line: Vec<_> = r
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<0$}", w[i]))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}

struct Api {
    socket: PathBuf,
}

impl Api {
    /// One API request; returns the reply's `metadata`, or the daemon's error message.
    fn call(&self, method: &str, path: &str, body: Option<Value>) -> Result<Value> {
        self.call_within(method, path, body, std::time::Duration::from_secs(300))
    }

    fn unreachable(&self, e: std::io::Error) -> anyhow::Error {
        anyhow::anyhow!(
            "cannot reach vmed at {}: {e}; is the daemon running? Start it with \
             `vmed --socket {0}`, or point --socket or VME_SOCKET at its socket",
            self.socket.display()
        )
    }

    /// [`Self::call`] waiting up to `within` for the reply.
    fn call_within(
        &self,
        method: &str,
        path: &str,
        body: Option<Value>,
        within: std::time::Duration,
    ) -> Result<Value> {
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        let (code, text) = http::request_within(&self.socket, method, path, &body, within)
            .map_err(|e| self.unreachable(e))?;
        let v: Value = serde_json::from_str(&text).with_context(|| {
            format!("vmed sent a reply that is not JSON (HTTP {code}): {text:?}")
        })?;
        if !(200..300).contains(&code) {
            let msg = v["error"].as_str().unwrap_or("no message");
            bail!("{msg} (HTTP {code})");
        }
        Ok(v["metadata"].clone())
    }
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
    fn table_aligns_columns() {
        let vms = [
            json!({"name":"a","state":"running","spec":{"arch":"riscv64","vcpus":2,"memory":"128M"}}),
        ];
        assert_eq!(
            table(&vms),
            "NAME  STATE    ARCH     VCPUS  MEMORY\na     running  riscv64  2      128M\n"
        );
        assert_eq!(table(&[]), "NAME  STATE  ARCH  VCPUS  MEMORY\n");
    }
}

//! `vme`, the command line of the vme environment: asks the daemon (`vmed`) over its REST
//! API on a Unix socket. It holds no state of its own.

mod access;
mod audit;
mod console;
mod http;
mod image;
mod output;
mod remote;

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
    /// A daemon over HTTPS instead: https://HOST[:PORT] (default port 8443; also
    /// $VME_REMOTE). Its admin must trust this client's certificate (see `vme remote cert`).
    #[arg(long, global = true, value_name = "URL")]
    remote: Option<String>,
    /// The SHA-256 fingerprint the remote daemon's certificate must have (vmed prints it at
    /// startup); without it the certificate seen first is pinned and must not change.
    #[arg(long, global = true, value_name = "SHA256")]
    server_fingerprint: Option<String>,
    /// An API token (from `vme token create`; also $VME_TOKEN): who you are to the daemon.
    /// It takes precedence over the socket's uid and the HTTPS client certificate.
    #[arg(long, global = true, value_name = "TOKEN")]
    token: Option<String>,
    /// The project to act in (default: your only project, else `default`).
    #[arg(long, global = true, value_name = "PROJECT")]
    project: Option<String>,
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
    /// Show a VM's usage: CPU now and in all, memory, disk and network bytes and rates.
    Stats {
        name: String,
        /// Count from this time: Unix seconds or RFC 3339 (2026-12-02T15:00:00Z). Default:
        /// every sample the daemon keeps.
        #[arg(long)]
        since: Option<String>,
        /// table (default), json or yaml (the daemon's reply, with every sample).
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
    },
    /// Show a VM's record (state, reason, spec).
    Info {
        name: String,
        /// json, yaml or table (key: value lines).
        #[arg(long, value_enum, default_value_t = Format::Json)]
        format: Format,
    },
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
    /// Follow the daemon's events (VM state changes, operations) until interrupted.
    Events {
        /// Only these kinds (comma-separated): lifecycle, operation, audit-anchor, security.
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
    /// The image repository: import, list, sign, verify, export images.
    #[command(subcommand)]
    Image(image::ImageCmd),
    /// Make a stopped VM an image: its root volume (first disk) is copied, scrubbed of
    /// machine-specific files (machine-id, ssh host keys, histories, logs) and stored with
    /// its kernel and initrd.
    Publish {
        vm: String,
        image: String,
        /// table (what the scrub did, item by item) or json or yaml (the daemon's reply).
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
    },
    /// The audit log: list records, verify its hash chain, export it.
    #[command(subcommand)]
    Audit(audit::AuditCmd),
    /// This client's identity for daemons over HTTPS (--remote).
    #[command(subcommand)]
    Remote(RemoteCmd),
    /// Who the daemon takes you for: your user, clearance and roles.
    Whoami {
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
    },
    /// Users: add, set, list, rm (admin).
    #[command(subcommand)]
    User(access::UserCmd),
    /// API tokens: create (shown once), list, revoke.
    #[command(subcommand)]
    Token(access::TokenCmd),
    /// Projects and their quotas: create, set, list, rm (admin).
    #[command(subcommand)]
    Project(access::ProjectCmd),
    /// A user's role in a project (admin).
    #[command(subcommand)]
    Role(access::RoleCmd),
    /// Security labels of VMs and images, and users' clearances (admin).
    #[command(subcommand)]
    Label(access::LabelCmd),
    /// Run the daemon: `vme daemon ARGS` is `vmed ARGS` (the vmed next to this vme, else
    /// the one on PATH); `vme daemon --help` lists its options.
    #[command(disable_help_flag = true)]
    Daemon {
        /// vmed's arguments, as they are.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<std::ffi::OsString>,
    },
    /// Print a shell completion script: `source <(vme completion bash)`.
    Completion {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

#[derive(Subcommand, Debug)]
enum RemoteCmd {
    /// Print the path and SHA-256 fingerprint of this client's certificate (made on first
    /// use), for the daemon's admin to trust: `vmed trust add FILE`.
    Cert,
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
    AuditAnchor,
    Security,
}

impl EventType {
    fn as_str(self) -> &'static str {
        match self {
            EventType::Lifecycle => "lifecycle",
            EventType::Operation => "operation",
            EventType::AuditAnchor => "audit-anchor",
            EventType::Security => "security",
        }
    }
}

/// What a new VM is made of.
#[derive(clap::Args, Debug)]
struct SpecArgs {
    /// An image from the repository (`vme image list`): it gives the kernel, initrd,
    /// command line, architecture and default resources. The project's own image of that
    /// name, else the public one; `PROJECT/NAME` picks another project's public image.
    #[arg(long, conflicts_with_all = ["kernel", "initrd"])]
    image: Option<String>,
    /// Kernel image (bzImage or ELF for x86_64, Image for riscv64).
    #[arg(long, required_unless_present = "image")]
    kernel: Option<PathBuf>,
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
    /// CPUs the VM may use in all: a percent of one CPU (50%) or a count (1.5). Default:
    /// its vCPU count.
    #[arg(long, value_name = "ALLOWANCE")]
    cpu_allowance: Option<String>,
    /// An io.max limit: DEVICE,rbps=SIZE,wbps=SIZE,riops=N,wiops=N (any of the four).
    /// DEVICE is a block device, a file on the disk to limit, or MAJ:MIN. Repeatable.
    #[arg(long, value_name = "DEVICE,LIMITS")]
    io_max: Vec<String>,
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
    /// Its security label, like `secret` or `secret:nato` (default: the lowest level).
    #[arg(long)]
    label: Option<String>,
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
        let mut body = json!({ "name": name });
        match (&self.image, &self.kernel) {
            (Some(i), _) => body["image"] = json!(i),
            (None, Some(k)) => body["kernel"] = json!(absolute("kernel", k)?),
            (None, None) => bail!("give --kernel FILE or --image NAME"),
        }
        if let Some(i) = self.initrd {
            body["initrd"] = json!(absolute("initrd", &i)?);
        }
        for (k, v) in [
            ("arch", self.arch.map(Value::from)),
            ("vcpus", self.vcpus.map(Value::from)),
            ("memory", self.memory.map(Value::from)),
            ("cmdline", self.cmdline.map(Value::from)),
            ("restart_policy", self.restart.map(Value::from)),
            ("cpu_allowance", self.cpu_allowance.map(Value::from)),
            ("label", self.label.map(Value::from)),
        ] {
            if let Some(v) = v {
                body[k] = v;
            }
        }
        if !self.io_max.is_empty() {
            let limits: Result<Vec<Value>> = self.io_max.iter().map(|s| io_max(s)).collect();
            body["io_max"] = Value::from(limits?);
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
    if let Cmd::Daemon { args } = &cli.command {
        return run_daemon(args);
    }
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vme: {e:#}");
            ExitCode::from(1)
        }
    }
}

/// Replaces this process with vmed: the one installed next to vme, else the one on PATH.
fn run_daemon(args: &[std::ffi::OsString]) -> ExitCode {
    use std::os::unix::process::CommandExt;
    let beside = std::env::current_exe()
        .ok()
        .and_then(|exe| Some(exe.parent()?.join("vmed")))
        .filter(|p| p.is_file());
    let vmed = beside.unwrap_or_else(|| PathBuf::from("vmed"));
    let e = std::process::Command::new(&vmed).args(args).exec();
    eprintln!(
        "vme: cannot run the daemon {}: {e}; install vmed next to vme or on PATH",
        vmed.display()
    );
    ExitCode::from(1)
}

/// `--socket`, else `$VME_SOCKET`, else the default.
fn socket_path(flag: Option<PathBuf>, env: Option<std::ffi::OsString>) -> PathBuf {
    flag.or_else(|| env.filter(|v| !v.is_empty()).map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from(DEFAULT_SOCKET))
}

/// One `--io-max DEVICE,KEY=VALUE,...` as the API's object.
fn io_max(arg: &str) -> Result<Value> {
    let mut parts = arg.split(',');
    let device = parts.next().unwrap_or_default();
    if device.is_empty() {
        bail!("--io-max {arg:?} names no device: give DEVICE,rbps=10M (or wbps, riops, wiops)");
    }
    let device = if device.contains(':') {
        device.to_string()
    } else {
        absolute("--io-max device", Path::new(device))?
            .display()
            .to_string()
    };
    let mut v = json!({ "device": device });
    for kv in parts {
        let Some((k, val)) = kv.split_once('=') else {
            bail!("--io-max {arg:?}: {kv:?} is not KEY=VALUE (rbps=10M, wiops=100, ...)");
        };
        v[k] = match k {
            "rbps" | "wbps" => json!(val),
            "riops" | "wiops" => json!(val.parse::<u64>().with_context(|| {
                format!("--io-max {arg:?}: {k}={val} is not a whole number of operations")
            })?),
            _ => bail!("--io-max {arg:?}: unknown limit {k:?}; use rbps, wbps, riops or wiops"),
        };
    }
    Ok(v)
}

/// Percent-encodes a query value (RFC 3986 unreserved characters stay).
fn query_value(v: &str) -> String {
    v.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// `1536` → `1.5K`: sizes as people read them.
pub(crate) fn human(bytes: f64) -> String {
    let mut v = bytes;
    for unit in ["B", "K", "M", "G", "T"] {
        if v < 1024.0 || unit == "T" {
            return if unit == "B" {
                format!("{v:.0}B")
            } else {
                format!("{v:.1}{unit}")
            };
        }
        v /= 1024.0;
    }
    unreachable!()
}

/// The `vme stats` table from a usage reply.
fn stats_table(u: &Value) -> String {
    let f = |v: &Value| v.as_f64().unwrap_or(0.0);
    let (t, r, l) = (&u["totals"], &u["rates"], &u["latest"]);
    let rate = |k: &str| {
        if r.is_null() {
            "-".to_string()
        } else {
            format!("{}/s", human(f(&r[k])))
        }
    };
    let cpu_now = if r.is_null() {
        "-".to_string()
    } else {
        format!("{:.1}%", f(&r["cpu_percent"]))
    };
    let mem_now = if l.is_null() {
        "-".to_string()
    } else {
        human(f(&l["memory_bytes"]))
    };
    let rows = [
        (
            "VM",
            format!(
                "{} ({})",
                u["name"].as_str().unwrap_or("?"),
                u["state"].as_str().unwrap_or("?")
            ),
        ),
        (
            "CPU",
            format!(
                "{cpu_now} now; {:.2} s in all (user {:.2} s, system {:.2} s)",
                f(&t["cpu_seconds"]),
                f(&t["cpu_user_seconds"]),
                f(&t["cpu_system_seconds"])
            ),
        ),
        (
            "MEMORY",
            format!("{mem_now} now; peak {}", human(f(&t["memory_peak_bytes"]))),
        ),
        (
            "DISK",
            format!(
                "read {} ({}), written {} ({})",
                human(f(&t["disk_read_bytes"])),
                rate("disk_read_bytes_per_second"),
                human(f(&t["disk_write_bytes"])),
                rate("disk_write_bytes_per_second")
            ),
        ),
        (
            "NET",
            format!(
                "received {} ({}), sent {} ({})",
                human(f(&t["net_rx_bytes"])),
                rate("net_rx_bytes_per_second"),
                human(f(&t["net_tx_bytes"])),
                rate("net_tx_bytes_per_second")
            ),
        ),
        (
            "SAMPLES",
            format!(
                "{} over {:.0} s (one every {} s)",
                t["samples"],
                f(&t["span_ms"]) / 1000.0,
                u["sample_interval_seconds"]
            ),
        ),
    ];
    rows.iter().map(|(k, v)| format!("{k:<8} {v}\n")).collect()
}

/// The daemon does not share our working directory: send it absolute paths.
fn absolute(what: &str, p: &Path) -> Result<PathBuf> {
    std::fs::canonicalize(p).with_context(|| format!("{what} {}: check the path", p.display()))
}

/// `vme remote cert`: this client's certificate, made on first use, and its fingerprint.
fn client_cert() -> Result<()> {
    let dir = remote::config_dir().map_err(anyhow::Error::msg)?;
    let path = remote::client_cert(&dir).map_err(anyhow::Error::msg)?;
    let pem = std::fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?;
    let der = vme_api::base64::decode(
        &String::from_utf8_lossy(&pem)
            .lines()
            .filter(|l| !l.starts_with("-----"))
            .collect::<String>(),
    )
    .with_context(|| format!("{} is no PEM certificate: remove it", path.display()))?;
    println!("{}", path.display());
    println!("SHA-256 {}", remote::fingerprint(&der));
    eprintln!(
        "vme: on the daemon's host, trust it with `vmed trust add FILE` (a copy of {})",
        path.display()
    );
    Ok(())
}

fn run(cli: Cli) -> Result<()> {
    let remote_url = cli
        .remote
        .or_else(|| std::env::var("VME_REMOTE").ok().filter(|v| !v.is_empty()));
    let ep = match remote_url {
        Some(url) => http::Endpoint::Tls(Box::new(
            remote::Remote::new(&url, cli.server_fingerprint.as_deref())
                .map_err(anyhow::Error::msg)?,
        )),
        None => http::Endpoint::Unix(socket_path(cli.socket, std::env::var_os("VME_SOCKET"))),
    };
    let token = cli
        .token
        .or_else(|| std::env::var("VME_TOKEN").ok().filter(|v| !v.is_empty()));
    http::set_identity(http::Identity {
        token,
        project: cli.project,
    });
    let api = Api { ep };
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
        Cmd::Whoami { format } => out(&access::whoami(&api, format)?)?,
        Cmd::User(c) => out(&access::user(&api, c)?)?,
        Cmd::Token(c) => out(&access::token(&api, c)?)?,
        Cmd::Project(c) => out(&access::project(&api, c)?)?,
        Cmd::Role(c) => out(&access::role(&api, c)?)?,
        Cmd::Label(c) => out(&access::label(&api, c)?)?,
        Cmd::Delete { name } => {
            api.call("DELETE", &format!("/1.0/vms/{}", segment(&name)?), None)?;
            println!("{name}: deleted");
        }
        Cmd::Console {
            name,
            show_log: false,
        } => {
            let path = format!("/1.0/vms/{}/console?attach=1", segment(&name)?);
            let conn = match http::upgrade(&api.ep, &path, "vme-console")
                .map_err(|e| api.unreachable(e))?
            {
                Ok(conn) => conn.into_unix()?,
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
        Cmd::Stats {
            name,
            since,
            format,
        } => {
            let mut path = format!("/1.0/vms/{}/usage", segment(&name)?);
            if let Some(s) = since {
                path.push_str(&format!("?since={}", query_value(&s)));
            }
            let u = api.call("GET", &path, None)?;
            match format {
                Format::Table => out(&stats_table(&u))?,
                f => print(f, &u)?,
            }
        }
        Cmd::Info { name, format } => {
            let vm = api.call("GET", &format!("/1.0/vms/{}", segment(&name)?), None)?;
            print(format, &vm)?;
        }
        Cmd::Remote(RemoteCmd::Cert) => client_cert()?,
        Cmd::Image(cmd) => image::run(&api, cmd)?,
        Cmd::Audit(cmd) => audit::run(&api, cmd)?,
        Cmd::Publish { vm, image, format } => image::publish(&api, &vm, &image, format)?,
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
        Cmd::Daemon { .. } => unreachable!("main runs the daemon before connecting"),
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
/// The message of an error reply (or the reply itself when it is not one).
fn api_error(text: &str) -> String {
    serde_json::from_str::<Value>(text)
        .ok()
        .and_then(|v| v["error"].as_str().map(String::from))
        .unwrap_or_else(|| text.to_string())
}

fn segment(name: &str) -> Result<&str> {
    if name.is_empty() || name.contains(['/', '?', '#', '%', ' ']) || name == "." || name == ".." {
        bail!("VM name {name:?} is not valid: use only letters, digits and '-'");
    }
    Ok(name)
}

struct Api {
    ep: http::Endpoint,
}

impl access::Call for Api {
    fn call(&self, method: &str, path: &str, body: Option<Value>) -> Result<Value> {
        Api::call(self, method, path, body)
    }
}

impl Api {
    fn unreachable(&self, e: std::io::Error) -> anyhow::Error {
        use std::io::ErrorKind::{ConnectionRefused, NotFound, TimedOut};
        match &self.ep {
            http::Endpoint::Unix(socket) => anyhow::anyhow!(
                "cannot reach vmed at {}: {e}; is the daemon running? Start it with \
                 `vmed --socket {0}`, or point --socket or VME_SOCKET at its socket",
                socket.display()
            ),
            http::Endpoint::Tls(r)
                if matches!(e.kind(), ConnectionRefused | NotFound | TimedOut) =>
            {
                anyhow::anyhow!(
                    "cannot reach vmed at {}: {e}; is the daemon serving HTTPS there \
                     (vmed --https ADDR:PORT)?",
                    r.url
                )
            }
            // A TLS refusal (a changed certificate) says all there is to say.
            http::Endpoint::Tls(r) => anyhow::anyhow!("vmed at {}: {e}", r.url),
        }
    }

    /// One API request; returns the reply's `metadata`, or the daemon's error message.
    fn call(&self, method: &str, path: &str, body: Option<Value>) -> Result<Value> {
        self.call_within(method, path, body, Duration::from_secs(300))
    }

    /// [`Self::call`] waiting up to `within` for the reply.
    fn call_within(
        &self,
        method: &str,
        path: &str,
        body: Option<Value>,
        within: Duration,
    ) -> Result<Value> {
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        let (code, text) = http::request_within(&self.ep, method, path, &body, within)
            .map_err(|e| self.unreachable(e))?;
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
        let failed = http::stream_lines(&self.ep, path, |line| {
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

    #[test]
    fn io_max_flags() {
        assert_eq!(
            io_max("8:0,rbps=10M,wiops=50").unwrap(),
            json!({"device": "8:0", "rbps": "10M", "wiops": 50})
        );
        let v = io_max("/,wbps=1M").unwrap();
        assert_eq!(v["device"], "/");
        for bad in ["", ",rbps=1M", "8:0,rbps", "8:0,wiops=many", "8:0,speed=1"] {
            assert!(io_max(bad).is_err(), "{bad:?}");
        }
        assert_eq!(
            query_value("2026-12-02T15:00:00+01:00"),
            "2026-12-02T15%3A00%3A00%2B01%3A00"
        );
    }

    #[test]
    fn stats_table_shows_totals_and_rates() {
        let u = json!({"name": "a", "state": "running", "sample_interval_seconds": 10,
            "totals": {"cpu_seconds": 3.5, "cpu_user_seconds": 3.0, "cpu_system_seconds": 0.5,
                       "memory_peak_bytes": 2097152, "disk_read_bytes": 1536,
                       "disk_write_bytes": 0, "net_rx_bytes": 0, "net_tx_bytes": 0,
                       "samples": 4, "span_ms": 30000},
            "rates": {"cpu_percent": 25.0, "disk_read_bytes_per_second": 512.0,
                      "disk_write_bytes_per_second": 0.0, "net_rx_bytes_per_second": 0.0,
                      "net_tx_bytes_per_second": 0.0},
            "latest": {"memory_bytes": 1048576}});
        let t = stats_table(&u);
        assert!(t.contains("CPU      25.0% now; 3.50 s in all"), "{t}");
        assert!(t.contains("MEMORY   1.0M now; peak 2.0M"), "{t}");
        assert!(t.contains("DISK     read 1.5K (512B/s)"), "{t}");
        assert!(t.contains("4 over 30 s"), "{t}");
        let empty = stats_table(&json!({"name": "a", "state": "defined", "totals": {},
                                        "rates": null, "latest": null}));
        assert!(empty.contains("CPU      - now"), "{empty}");
    }
}

//! `vme-agent`: the guest side of `vme-vmm exec` and of the host's agent client
//! (`vme_api::agent`). It listens on vsock port 1024 (or `--port N`), serves each
//! connection on its own thread, and answers requests until the host closes it.
//!
//! `vme-agent --connect PORT` is a small client for the other direction: it connects to the
//! host (CID 2) on PORT, sends its standard input and prints what the host answers (the
//! host side is the monitor's `<uds>_PORT` Unix socket).
//!
//! It trusts its peer: only the host can reach a guest's vsock port, and the host already
//! controls the guest. It never trusts the sizes on the wire (they are capped by the
//! protocol's frame limits).

mod exec;
mod identity;
mod stats;
mod vsock;

use std::io::{BufReader, BufWriter};
use std::process::ExitCode;
use vme_api::agent::{AGENT_PORT, Reply, Request, read_frame, write_frame};

/// Connections served at once; more wait in the listen backlog.
const MAX_CLIENTS: usize = 16;

enum Mode {
    Serve(u32),
    Connect(u32),
}

fn main() -> ExitCode {
    let port = match parse_args(std::env::args().skip(1).collect()) {
        Ok(Mode::Serve(p)) => p,
        Ok(Mode::Connect(p)) => return connect(p),
        Err(e) => {
            eprintln!("vme-agent: {e}");
            return ExitCode::from(2);
        }
    };
    let listener = match vsock::Listener::bind(port) {
        Ok(l) => l,
        Err(e) => {
            eprintln!(
                "vme-agent: cannot listen on vsock port {port}: {e} (does this VM have a \
                 vsock device?)"
            );
            return ExitCode::FAILURE;
        }
    };
    let active = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    loop {
        let conn = match listener.accept() {
            Ok(c) => c,
            Err(e) => {
                eprintln!("vme-agent: accept failed: {e}");
                std::thread::sleep(std::time::Duration::from_millis(100));
                continue;
            }
        };
        use std::sync::atomic::Ordering::SeqCst;
        if active.load(SeqCst) >= MAX_CLIENTS {
            // Dropped: the client sees the connection close and may retry.
            continue;
        }
        active.fetch_add(1, SeqCst);
        let active = active.clone();
        let spawned = std::thread::Builder::new()
            .name("client".into())
            .spawn(move || {
                serve(conn);
                active.fetch_sub(1, SeqCst);
            });
        if let Err(e) = spawned {
            eprintln!("vme-agent: cannot start a thread: {e}");
        }
    }
}

fn parse_args(args: Vec<String>) -> Result<Mode, String> {
    let port = |n: &str| n.parse().map_err(|_| format!("{n:?} is not a port number"));
    match args.as_slice() {
        [] => Ok(Mode::Serve(AGENT_PORT)),
        [flag, n] if flag == "--port" => port(n).map(Mode::Serve),
        [flag, n] if flag == "--connect" => port(n).map(Mode::Connect),
        _ => Err("usage: vme-agent [--port N] | vme-agent --connect PORT".into()),
    }
}

/// Copies stdin to the host's `port` and the answer to stdout.
fn connect(port: u32) -> ExitCode {
    let conn = match vsock::connect(vsock::HOST_CID, port) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("vme-agent: cannot connect to host port {port}: {e}");
            return ExitCode::FAILURE;
        }
    };
    let to_host = match conn.try_clone() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("vme-agent: {e}");
            return ExitCode::FAILURE;
        }
    };
    let sender = std::thread::spawn(move || {
        let mut to_host = to_host;
        let r = std::io::copy(&mut std::io::stdin().lock(), &mut to_host);
        // The host reads EOF once our input ends.
        // SAFETY: plain syscall on a descriptor we own.
        unsafe { libc::shutdown(std::os::fd::AsRawFd::as_raw_fd(&to_host), libc::SHUT_WR) };
        r
    });
    let received = std::io::copy(&mut &conn, &mut std::io::stdout().lock());
    let sent = sender
        .join()
        .unwrap_or_else(|_| Err(std::io::Error::other("panicked")));
    match (sent, received) {
        (Ok(_), Ok(_)) => ExitCode::SUCCESS,
        (Err(e), _) | (_, Err(e)) => {
            eprintln!("vme-agent: host port {port}: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Answers requests on one connection until the host closes it or breaks the protocol.
fn serve(conn: std::fs::File) {
    let mut reader = BufReader::new(&conn);
    let mut writer = BufWriter::new(&conn);
    loop {
        let (req, data) = match read_frame::<Request>(&mut reader) {
            Ok(Some(f)) => f,
            Ok(None) => return,
            Err(e) => {
                // The stream is out of step; say why once and end it.
                let reply = Reply::Error {
                    message: format!("unreadable request: {e}"),
                };
                let _ = write_frame(&mut writer, &reply, &[]);
                return;
            }
        };
        let (reply, out) = handle(req, data, &conn);
        if write_frame(&mut writer, &reply, &out).is_err() {
            return;
        }
    }
}

fn handle(req: Request, data: Vec<u8>, conn: &std::fs::File) -> (Reply, Vec<u8>) {
    let result = match req {
        Request::Ping => Ok((
            Reply::Pong {
                version: env!("CARGO_PKG_VERSION").into(),
            },
            Vec::new(),
        )),
        Request::Exec {
            argv,
            env,
            cwd,
            timeout_ms,
        } => exec::run(&argv, &env, cwd.as_deref(), timeout_ms, data),
        Request::ReadFile { path } => read_file(&path),
        Request::WriteFile { path, mode } => write_file(&path, mode, &data),
        Request::Stats => stats::collect().map(|s| (Reply::Stats(s), Vec::new())),
        Request::Identity { seed, macs } => identity::apply(&seed, &macs, conn),
    };
    result.unwrap_or_else(|message| (Reply::Error { message }, Vec::new()))
}

fn read_file(path: &str) -> Result<(Reply, Vec<u8>), String> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(path).map_err(|e| format!("cannot read {path}: {e}"))?;
    if meta.len() > u64::from(vme_api::agent::MAX_DATA) {
        return Err(format!(
            "{path} is {} bytes; at most {} can be read in one request",
            meta.len(),
            vme_api::agent::MAX_DATA
        ));
    }
    let data = std::fs::read(path).map_err(|e| format!("cannot read {path}: {e}"))?;
    Ok((
        Reply::File {
            mode: meta.permissions().mode(),
        },
        data,
    ))
}

fn write_file(path: &str, mode: Option<u32>, data: &[u8]) -> Result<(Reply, Vec<u8>), String> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    // Written beside the target and renamed over it, so a reader never sees half a file.
    let tmp = format!("{path}.vme-agent-{}", std::process::id());
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode.unwrap_or(0o644))
            .open(&tmp)?;
        f.write_all(data)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    };
    write().map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        format!("cannot write {path}: {e}")
    })?;
    Ok((
        Reply::Written {
            bytes: data.len() as u64,
        },
        Vec::new(),
    ))
}

//! `vme-vmm exec`: runs a command in a guest through its agent. The monitor's `status`
//! names the vsock socket; the agent's client does the rest.

use crate::cli::ExecArgs;
use std::io::{Read, Write};
use std::process::ExitCode;
use std::time::Duration;
use vme_api::agent::AgentClient;
use vme_api::control::{Request, call};

/// Our own failures (as ssh does), distinct from the command's usual statuses.
const FAILED: u8 = vme_api::agent::ExecOutput::UNKNOWN;

pub fn run(args: ExecArgs) -> ExitCode {
    match exec(&args) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("vme-vmm exec: {e}");
            ExitCode::from(FAILED)
        }
    }
}

fn exec(args: &ExecArgs) -> Result<u8, String> {
    let reply = call(
        &args.control_socket,
        &Request::Status,
        Duration::from_secs(30),
    )
    .map_err(|e| e.to_string())?;
    let uds = reply
        .status
        .and_then(|s| s.vsock_uds)
        .ok_or("this VM has no vsock device: start it with --vsock cid=N,uds=PATH")?;
    let mut stdin = Vec::new();
    if args.stdin {
        std::io::stdin()
            .read_to_end(&mut stdin)
            .map_err(|e| format!("cannot read standard input: {e}"))?;
    }
    let mut agent = AgentClient::wait(uds.as_ref(), Duration::from_secs(args.wait))
        .map_err(|e| format!("{e}; does the guest run vme-agent?"))?;
    // The reply comes when the command ends: allow for its timeout.
    let limit = (args.timeout > 0).then(|| Duration::from_secs(args.timeout + 30));
    agent
        .set_timeout(limit)
        .map_err(|e| format!("vsock socket: {e}"))?;
    let out = agent
        .exec(&args.command, &stdin, Duration::from_secs(args.timeout))
        .map_err(|e| e.to_string())?;
    // A closed stdout (e.g. `| head`) is not our failure.
    let _ = std::io::stdout().write_all(&out.stdout);
    let _ = std::io::stderr().write_all(&out.stderr);
    if out.truncated {
        eprintln!("vme-vmm exec: output was truncated at 64 MiB");
    }
    Ok(out.status())
}

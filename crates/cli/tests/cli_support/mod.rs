//! What the `vme` tests share: running the CLI against a daemon's socket and reading its
//! outcome. Each test binary uses a part of it.
#![allow(dead_code)]

use std::path::Path;
use std::process::{Command, Output};

pub const VME: &str = env!("CARGO_BIN_EXE_vme");

/// `vme ARGS` on `socket`, with `env` set and no token inherited from the caller.
pub fn vme_env(socket: &Path, env: &[(&str, &str)], args: &[&str]) -> Output {
    Command::new(VME)
        .env("VME_SOCKET", socket)
        .env_remove("VME_TOKEN")
        .envs(env.iter().copied())
        .args(args)
        .output()
        .unwrap()
}

/// `vme ARGS` on `socket`.
pub fn vme(socket: &Path, args: &[&str]) -> Output {
    vme_env(socket, &[], args)
}

/// Its standard output, after checking it succeeded (else both outputs are the failure).
pub fn ok(out: Output) -> String {
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

/// Its standard error, after checking it failed.
pub fn fails(out: Output) -> String {
    assert!(
        !out.status.success(),
        "it succeeded: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stderr).to_string()
}

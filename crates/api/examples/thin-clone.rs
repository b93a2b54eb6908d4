//! `thin-clone BASE DEST [SHA256]`: makes DEST a thin clone of BASE with
//! `vme_api::overlay::thin_clone` and prints what it made and the `--disk` value that uses
//! it. For benchmarks (bench/thin.py) and trying the monitor by hand; the daemon calls the
//! function itself.

use std::process::ExitCode;
use vme_api::overlay::{CloneKind, thin_clone};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if !(2..=3).contains(&args.len()) {
        eprintln!("usage: thin-clone BASE DEST [SHA256-HEX]");
        return ExitCode::from(2);
    }
    let mut digest = [0u8; 32];
    if let Some(hex) = args.get(2) {
        let ok = hex.len() == 64
            && (0..32).all(|i| match u8::from_str_radix(&hex[2 * i..2 * i + 2], 16) {
                Ok(b) => {
                    digest[i] = b;
                    true
                }
                Err(_) => false,
            });
        if !ok {
            eprintln!("thin-clone: {hex:?} is not a SHA-256 in hex (64 digits)");
            return ExitCode::from(2);
        }
    }
    match thin_clone(args[0].as_ref(), args[1].as_ref(), digest) {
        Ok(CloneKind::Reflink) => println!("reflink path={}", args[1]),
        Ok(CloneKind::Overlay) => println!("overlay path={},base={}", args[1], args[0]),
        Err(e) => {
            eprintln!("thin-clone: {e}");
            return ExitCode::from(1);
        }
    }
    ExitCode::SUCCESS
}

//! `qcow2_to_raw IN.qcow2 OUT.raw`: vme-image's qcow2 conversion alone (sparse write and
//! SHA-256, no fsync), for bench/qcow2.py to time against `qemu-img convert -O raw`.

use std::fs::{File, OpenOptions};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [src, dst] = args.as_slice() else {
        eprintln!("usage: qcow2_to_raw IN.qcow2 OUT.raw (OUT must not exist)");
        std::process::exit(2);
    };
    let run = || -> Result<_, String> {
        let s = File::open(src).map_err(|e| format!("{src}: {e}"))?;
        let d = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(dst)
            .map_err(|e| format!("{dst}: {e}"))?;
        vme_image::qcow2::convert(&s, Some(&d), vme_image::qcow2::DEFAULT_MAX_VIRTUAL_SIZE)
            .map_err(|e| format!("{src}: {e}"))
    };
    match run() {
        Ok((digest, size)) => println!("{digest} {size}"),
        Err(e) => {
            eprintln!("qcow2_to_raw: {e}");
            std::process::exit(1);
        }
    }
}

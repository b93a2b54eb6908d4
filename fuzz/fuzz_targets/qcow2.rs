//! A hostile qcow2 file given to image import's converter (vme_image::qcow2): every input
//! must end in an error or a whole raw disk, never a panic, a hang or unbounded memory.
#![no_main]

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::sync::OnceLock;

/// The input and the raw output as two files, reused: the converter reads and writes files.
fn files() -> &'static (File, File) {
    static F: OnceLock<(File, File)> = OnceLock::new();
    F.get_or_init(|| {
        let open = |tag: &str| {
            let p =
                std::env::temp_dir().join(format!("vme-fuzz-qcow2-{}.{tag}", std::process::id()));
            let f = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(&p)
                .unwrap();
            // Unlinked at once: nothing is left behind.
            let _ = std::fs::remove_file(&p);
            f
        };
        (open("in"), open("out"))
    })
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let (src, dst) = files();
    src.set_len(0).unwrap();
    src.write_all_at(data, 0).unwrap();
    dst.set_len(0).unwrap();
    // A small cap keeps each run short; the bounds checked do not depend on it.
    if let Ok((_, n)) = vme_image::qcow2::convert(src, Some(dst), 4 << 20) {
        assert_eq!(dst.metadata().unwrap().len(), n);
    }
});

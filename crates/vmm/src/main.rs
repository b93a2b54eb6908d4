//! The monitor: one process runs one VM.

fn main() {}

//! A hostile guest driving virtio-vsock through its transport (see vme_devices::virtio::fuzz).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| vme_devices::virtio::fuzz::vsock(data));

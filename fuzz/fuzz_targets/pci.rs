//! A hostile guest driving the virtio-pci transport (configuration space, BAR 0, MSI-X) with
//! each device behind it (see vme_devices::virtio::fuzz).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| vme_devices::virtio::fuzz::pci(data));

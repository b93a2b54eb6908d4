//! Virtual devices shared by both machine kinds: 16550 serial, i8042 reset, CMOS RTC, and
//! (later) PCI and virtio. Devices are small state machines: their effects leave through
//! traits (interrupt lines, output sinks), so they test without KVM.

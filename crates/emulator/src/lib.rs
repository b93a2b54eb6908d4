//! The x86 instructions the monitor completes itself when KVM cannot (PVM hosts' emulator
//! gives up on some): decode, execute against guest registers and memory, raise exceptions.
//! It makes no KVM calls: registers and memory come through traits.

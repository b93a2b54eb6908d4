//! A safe layer over KVM: the VM, its vCPUs, guest memory slots, the in-kernel irqchip, IRQ
//! lines and CPUID. It owns every KVM ioctl the monitor makes; it knows nothing of boot
//! protocols, devices or guests' operating systems.

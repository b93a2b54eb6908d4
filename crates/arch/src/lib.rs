//! x86_64 platform setup: kernel loaders (bzImage, ELF/PVH), boot parameters, the e820 map,
//! CPU templates (the CPUID/MSR set a guest sees) and ACPI tables. It computes what goes into
//! guest memory and registers; it does not run vCPUs or emulate devices.

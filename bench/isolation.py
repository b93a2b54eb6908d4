#!/usr/bin/env python3
"""Isolation benchmark: what confinement costs and how tight it is.

1. Allowed syscalls per thread kind, from `vme-vmm --print-seccomp` (the filters themselves),
   next to Firecracker's published default filters for x86_64 (resources/seccomp/
   x86_64-unknown-linux-musl.json of firecracker-microvm/firecracker at commit f7c23840f5af,
   counted by distinct syscall name; both list each KVM ioctl request they allow). One JSON
   line per tool and thread kind.
2. Boot time of the tiny riscv64 guest, jailed (--jail, strict seccomp) vs unjailed: median
   and min wall time from process start to the guest's READY marker over BENCH_RUNS runs
   (alternating). Needs root (the jail does).
"""

import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
TARGET = os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target"))
VMM = os.path.join(TARGET, "release", "vme-vmm")
IMAGES = os.path.join(TARGET, "images", "tiny-riscv64")
MARKER = b"VME-GUEST-READY"
JAIL_ID = 1_000_990

# Firecracker's default filters (x86_64 musl), distinct syscalls per thread, counted from the
# source named in the docstring. The thread kinds map onto ours: their vmm thread runs the
# event loop and devices (our main + device), api the HTTP server (our api), vcpu the vCPUs.
FIRECRACKER = {"vmm": 42, "api": 28, "vcpu": 22}


def seccomp_counts():
    out = subprocess.run([VMM, "--print-seccomp"], check=True, capture_output=True, text=True)
    counts = {}
    # | kind | syscalls | KVM ioctl requests |: the syscall count is compared.
    for m in re.finditer(r"^\| (\w+) \| (\d+) \| \d+ \|$", out.stdout, re.M):
        counts[m.group(1)] = int(m.group(2))
    return counts


def boot_once(jailed, work):
    args = [
        VMM, "--arch", "riscv64",
        "--kernel", os.path.join(IMAGES, "Image"),
        "--initrd", os.path.join(IMAGES, "initramfs.cpio"),
        "--memory", "128M",
        "--cmdline", "console=ttyS0 quiet panic=-1",
    ]
    if jailed:
        args += ["--jail", os.path.join(work, "jail"), "--jail-uid", str(JAIL_ID),
                 "--jail-gid", str(JAIL_ID), "--seccomp", "strict"]
    t0 = time.monotonic()
    p = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    seen = b""
    elapsed = None
    while True:
        chunk = p.stdout.read1(4096)
        if not chunk:
            break
        seen += chunk
        if MARKER in seen:
            elapsed = time.monotonic() - t0
            break
    p.kill()
    p.wait()
    if elapsed is None:
        raise SystemExit(f"no {MARKER!r} from the {'jailed' if jailed else 'unjailed'} guest")
    return elapsed


def main():
    counts = seccomp_counts()
    for kind, n in counts.items():
        print(json.dumps({"bench": "seccomp", "tool": "vme-vmm", "thread": kind,
                          "syscalls_allowed": n}), flush=True)
    for kind, n in FIRECRACKER.items():
        print(json.dumps({"bench": "seccomp", "tool": "firecracker", "thread": kind,
                          "syscalls_allowed": n,
                          "source": "resources/seccomp/x86_64-unknown-linux-musl.json@f7c23840f5af"}),
              flush=True)
    if os.geteuid() != 0:
        print(json.dumps({"bench": "jail_boot", "skipped": "needs root"}), flush=True)
        return
    runs = int(os.environ.get("BENCH_RUNS", "10"))
    times = {False: [], True: []}
    work = tempfile.mkdtemp(prefix="vme-bench-jail-")
    try:
        for _ in range(runs):
            for jailed in (False, True):
                times[jailed].append(boot_once(jailed, work))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for jailed, t in times.items():
        print(json.dumps({"bench": "jail_boot", "tool": "vme-vmm", "arch": "riscv64",
                          "jailed": jailed, "runs": runs,
                          "median_s": round(statistics.median(t), 4),
                          "min_s": round(min(t), 4)}), flush=True)


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Boot-time benchmark: vme-vmm against its peers on the same kernel, initramfs, memory and vCPUs.

For each tool, boots the guest BENCH_RUNS times (alternating tools, so drift in the host's load
hits all alike) and prints one JSON line per tool:
  median and min wall time from process start to the guest's READY marker, the guest-reported
  uptime at READY, peak RSS of the monitor process, and the monitor's own overhead
  (RSS outside guest RAM mappings, sampled at READY).
A peer that cannot boot the kernel on this host within the time limit is tried once; its line
says so, with the reason, and vme-vmm's figures stand alone.
"""

import json
import os
import re
import select
import shutil
import signal
import statistics
import subprocess
import sys
import time

MARKER = b"VME-GUEST-READY"


def guest_ram_rss_split(pid, guest_bytes):
    """(total RSS, RSS of mappings big enough to be guest RAM) in bytes, from /proc/PID/smaps."""
    total = ram = 0
    size = 0
    try:
        with open(f"/proc/{pid}/smaps") as f:
            for line in f:
                if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
                    lo, hi = line.split()[0].split("-")
                    size = int(hi, 16) - int(lo, 16)
                elif line.startswith("Rss:"):
                    kb = int(line.split()[1]) * 1024
                    total += kb
                    # Guest RAM is one (or, around the PCI hole, two) large mappings.
                    if size >= guest_bytes // 4:
                        ram += kb
    except OSError:
        pass
    return total, ram


def vmm_status(sock):
    """The monitor's `status` reply over its control socket, or None."""
    import socket
    try:
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(5)
            s.connect(sock)
            s.sendall(b'{"cmd":"status"}\n')
            return json.loads(s.makefile().readline()).get("status")
    except (OSError, ValueError):
        return None


def reap(proc, block):
    """wait4 on the child (so its own peak RSS is known); None while it still runs."""
    pid, status, rusage = os.wait4(proc.pid, 0 if block else os.WNOHANG)
    if pid == 0:
        return None
    proc.returncode = os.waitstatus_to_exitcode(status)
    return rusage


def boot_once(cmd, timeout, guest_bytes, sock=None):
    start = time.monotonic()
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True)
    buf = b""
    result = {"ok": False}
    rusage = None
    try:
        while True:
            left = start + timeout - time.monotonic()
            if left <= 0:
                result["error"] = f"no READY marker within {timeout:.0f} s"
                break
            ready, _, _ = select.select([proc.stdout], [], [], min(left, 1.0))
            if not ready:
                rusage = reap(proc, block=False)
                if rusage is not None:
                    break
                continue
            chunk = os.read(proc.stdout.fileno(), 65536)
            if not chunk:
                break
            buf += chunk
            at = buf.find(MARKER)
            if at >= 0 and b"\n" in buf[at:]:
                wall = time.monotonic() - start
                line = buf[at:].split(b"\n", 1)[0].decode(errors="replace")
                m = re.search(r"uptime=([0-9.]+)", line)
                total, ram = guest_ram_rss_split(proc.pid, guest_bytes)
                status = vmm_status(sock) if sock else None
                result = {"ok": True, "wall_s": wall, "status": status,
                          "guest_uptime_s": float(m.group(1)) if m else None,
                          "overhead_kib": (total - ram) // 1024}
                break
    finally:
        if rusage is None:
            os.killpg(proc.pid, signal.SIGKILL)
            rusage = reap(proc, block=True)
        result["peak_rss_kib"] = rusage.ru_maxrss
        if not result["ok"] and "error" not in result:
            err = proc.stderr.read().decode(errors="replace").strip().splitlines()
            tail = buf.decode(errors="replace").strip().splitlines()[-3:]
            result["error"] = "exited before READY: " + " | ".join((err[-3:] or []) + tail)
    return result


def main():
    runs = int(os.environ.get("BENCH_RUNS", "10"))
    limit = float(os.environ.get("BENCH_PEER_TIMEOUT", "180"))
    arch = os.environ.get("BENCH_ARCH", "x86_64")
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    target = os.environ.get("CARGO_TARGET_DIR", os.path.join(repo, "target"))
    vmm = os.path.join(target, "release", "vme-vmm")
    mem = os.environ.get("BENCH_MEMORY", "256M")
    vcpus = os.environ.get("BENCH_VCPUS", "1")
    guest_bytes = int(mem[:-1]) << 20 if mem.endswith("M") else int(mem)
    cmdline_tail = "vme.run=true"
    tools = {}
    if arch == "x86_64":
        img = os.path.join(target, "images", "tiny")
        # The uncompressed ELF (PVH entry), which every peer boots too: on PVM hosts the
        # bzImage decompressor alone runs for minutes. BENCH_KERNEL=bzImage measures that path.
        kernel = os.path.join(img, os.environ.get("BENCH_KERNEL", "vmlinux"))
        initrd = os.path.join(img, "initramfs.cpio")
        cmdline = f"console=ttyS0 quiet panic=-1 {cmdline_tail}"
        tools["vme-vmm"] = [vmm, "--kernel", kernel, "--initrd", initrd, "--memory", mem,
                            "--vcpus", vcpus, "--cmdline", cmdline]
        qemu = shutil.which("qemu-system-x86_64")
        common = ["-enable-kvm", "-cpu", "host", "-m", mem, "-smp", vcpus, "-nographic",
                  "-nodefaults", "-no-reboot", "-serial", "stdio", "-kernel", kernel,
                  "-initrd", initrd, "-append", cmdline]
        if qemu:
            tools["qemu-microvm"] = [qemu, "-M", "microvm,acpi=on"] + common
            tools["qemu-q35"] = [qemu, "-M", "q35"] + common
        fc = os.environ.get("FIRECRACKER_BIN")
        if fc:
            tools["firecracker"] = firecracker_cmd(fc, img, initrd, mem, vcpus, cmdline)
    else:
        img = os.path.join(target, "images", "tiny-riscv64")
        kernel, initrd = os.path.join(img, "Image"), os.path.join(img, "initramfs.cpio")
        cmdline = f"console=ttyS0 quiet panic=-1 {cmdline_tail}"
        tools["vme-vmm"] = [vmm, "--arch", "riscv64", "--kernel", kernel, "--initrd", initrd,
                            "--memory", mem, "--vcpus", vcpus, "--cmdline", cmdline]
        qemu = shutil.which("qemu-system-riscv64")
        if qemu:
            tools["qemu-tcg-virt"] = [qemu, "-M", "virt", "-accel", "tcg", "-m", mem, "-smp",
                                      vcpus, "-nographic", "-nodefaults", "-no-reboot",
                                      "-serial", "stdio", "-bios", "default", "-kernel", kernel,
                                      "-initrd", initrd, "-append", cmdline]

    sock = f"/tmp/vme-bench-{os.getpid()}.sock"
    tools["vme-vmm"] += ["--control-socket", sock]
    samples = {name: [] for name in tools}
    failed = {}
    for i in range(runs):
        for name, cmd in tools.items():
            if name in failed:
                continue
            is_vmm = name == "vme-vmm"
            r = boot_once(cmd, max(limit, 600) if is_vmm else limit, guest_bytes,
                          sock if is_vmm else None)
            if r["ok"]:
                samples[name].append(r)
            elif name != "vme-vmm" and not samples[name]:
                failed[name] = r.get("error", "failed")
            else:
                samples[name].append(r)
    for name in tools:
        ok = [s for s in samples[name] if s["ok"]]
        line = {"bench": "boot", "arch": arch, "tool": name, "runs": len(samples[name]),
                "booted": len(ok), "memory": mem, "vcpus": int(vcpus)}
        if name in failed:
            line["failure"] = failed[name]
        if ok:
            walls = [s["wall_s"] for s in ok]
            line.update({
                "median_s": round(statistics.median(walls), 3),
                "min_s": round(min(walls), 3),
                "guest_uptime_median_s": round(statistics.median(
                    [s["guest_uptime_s"] for s in ok if s["guest_uptime_s"] is not None] or [0]), 3),
                "peak_rss_mib": round(max(s["peak_rss_kib"] for s in ok) / 1024, 1),
                "overhead_mib": round(statistics.median(s["overhead_kib"] for s in ok) / 1024, 1),
            })
            statuses = [s["status"] for s in ok if s.get("status")]
            if statuses:
                line["exits_median"] = statistics.median(st["exits"] for st in statuses)
                line["emulated_instructions_median"] = statistics.median(
                    st["emulated_instructions"] for st in statuses)
                if statuses[0].get("instructions_retired") is not None:
                    line["instructions_median"] = statistics.median(
                        st["instructions_retired"] for st in statuses)
        elif samples[name]:
            line["failure"] = samples[name][-1].get("error")
        print(json.dumps(line), flush=True)


def firecracker_cmd(fc, img, initrd, mem, vcpus, cmdline):
    """Firecracker boots the ELF vmlinux of the same kernel, configured by a file."""
    cfg = {
        "boot-source": {"kernel_image_path": os.path.join(img, "vmlinux"),
                        "initrd_path": initrd, "boot_args": cmdline},
        "drives": [],
        "machine-config": {"vcpu_count": int(vcpus), "mem_size_mib": int(mem.rstrip("M"))},
    }
    path = f"/tmp/vme-bench-fc-{os.getpid()}.json"
    with open(path, "w") as f:
        json.dump(cfg, f)
    return [fc, "--no-api", "--config-file", path]


if __name__ == "__main__":
    sys.exit(main())

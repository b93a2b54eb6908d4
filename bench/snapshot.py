#!/usr/bin/env python3
"""Snapshot benchmark: how big and how quick a snapshot is, and how soon a restored VM runs.

riscv64 (the tiny image, one hart): vme-vmm against QEMU TCG measured in the same run, QEMU
saving with `migrate "exec:cat > FILE"` (the VM stopped) and restoring with
`-incoming "exec:cat FILE"`. For each memory size (BENCH_SNAPSHOT_MEMORY, default 256M,2G):
snapshot time and size, then BENCH_RUNS restores (default 5) each timed from process start
to the guest answering a command on its console, and for vme-vmm also to the vCPUs running
(its log line, written just before they start) with the monitor's own account.

x86_64 (with /dev/kvm): our probe guest (crates/vmm/tests/guests/x86-probe.S), vme-vmm only
(QEMU cannot start x86 guests on PVM hosts): snapshot time and size, and process start to
vCPUs running. One JSON line per tool, memory size and architecture, then ratio lines.
"""

import json
import os
import select
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGET = os.environ.get("CARGO_TARGET_DIR", os.path.join(REPO, "target"))
VMM = os.path.join(TARGET, "release", "vme-vmm")
TIMEOUT = 600


class Proc:
    """A monitor with its console on pipes; stdout and stderr read without blocking."""

    def __init__(self, cmd):
        self.start = time.monotonic()
        self.p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, start_new_session=True)
        self.out = b""
        self.err = b""

    def pump(self, deadline):
        left = max(0.0, deadline - time.monotonic())
        r, _, _ = select.select([self.p.stdout, self.p.stderr], [], [], min(left, 0.5))
        for f in r:
            data = os.read(f.fileno(), 65536)
            if f is self.p.stdout:
                self.out += data
            else:
                self.err += data
        if self.p.poll() is not None and not r:
            raise RuntimeError(f"exited {self.p.returncode}: {self.err.decode(errors='replace')[-800:]}")

    def wait_for(self, needle, where="out", timeout=TIMEOUT):
        """Seconds from process start until `needle` appears."""
        deadline = time.monotonic() + timeout
        while needle not in (self.out if where == "out" else self.err):
            if time.monotonic() > deadline:
                raise RuntimeError(f"no {needle!r} within {timeout} s")
            self.pump(deadline)
        return time.monotonic() - self.start

    def type(self, line):
        self.p.stdin.write(line.encode() + b"\n")
        self.p.stdin.flush()

    def answered(self):
        """Seconds from process start until the guest's shell runs a command. Typed again
        every 50 ms: a UART whose VM is still loading may drop what arrives (QEMU's does)."""
        deadline = time.monotonic() + TIMEOUT
        typed = 0.0
        while b"R42Z" not in self.out:
            now = time.monotonic()
            if now > deadline:
                raise RuntimeError(f"the guest did not answer within {TIMEOUT} s")
            if now - typed >= 0.05:
                self.type("echo R$((6*7))Z")
                typed = now
            self.pump(typed + 0.05)
        return time.monotonic() - self.start

    def kill(self):
        if self.p.poll() is None:
            self.p.kill()
        self.p.wait()


def control(sock, request):
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(TIMEOUT)
        s.connect(sock)
        s.sendall(json.dumps(request).encode() + b"\n")
        return json.loads(s.makefile().readline())


def hmp(sock, command, wait=b"(qemu)"):
    """One QEMU monitor command; returns its output."""
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(TIMEOUT)
        s.connect(sock)
        buf = b""
        while not buf.rstrip().endswith(wait):
            buf += s.recv(4096)
        s.sendall(command.encode() + b"\n")
        buf = b""
        while not buf.rstrip().endswith(wait):
            chunk = s.recv(4096)
            if not chunk:
                break
            buf += chunk
        return buf.decode(errors="replace")


def median(xs):
    return round(statistics.median(xs), 4) if xs else None


def vme_riscv(work, mem, runs):
    img = os.path.join(TARGET, "images", "tiny-riscv64")
    sock, snap = os.path.join(work, "vme.sock"), os.path.join(work, f"vme-{mem}")
    vm = Proc([VMM, "--arch", "riscv64", "--kernel", os.path.join(img, "Image"), "--initrd",
               os.path.join(img, "initramfs.cpio"), "--memory", mem, "--vcpus", "1",
               "--cmdline", "console=ttyS0 quiet panic=-1", "--control-socket", sock])
    try:
        vm.wait_for(b"VME-GUEST-READY")
        vm.answered()
        reply = control(sock, {"cmd": "snapshot", "dir": snap})
        if not reply.get("ok"):
            raise RuntimeError(reply.get("error"))
        info = reply["snapshot"]
    finally:
        vm.kill()
    return info, restores(runs, [VMM, "--restore", snap, "--log-level", "info"], True)


def restores(runs, cmd, is_vmm, answer=True):
    running, own, answered = [], [], []
    for _ in range(runs):
        p = Proc(cmd)
        try:
            if is_vmm:
                running.append(p.wait_for(b"restored snapshot", where="err"))
                p.wait_for(b"; the VM continues", where="err")
                line = p.err.split(b"restored snapshot", 1)[1].split(b"\n", 1)[0]
                own.append(float(line.split(b" in ", 1)[1].split(b" ", 1)[0]) / 1000)
            if answer:
                answered.append(p.answered())
        finally:
            p.kill()
    return {"to_running_s": median(running), "monitor_own_s": median(own),
            "to_answer_s": median(answered), "restores": runs}


def qemu_riscv(work, mem, runs):
    qemu = shutil.which("qemu-system-riscv64")
    if not qemu:
        return None, {"failure": "qemu-system-riscv64 is not installed"}
    img = os.path.join(TARGET, "images", "tiny-riscv64")
    base = [qemu, "-M", "virt", "-accel", "tcg", "-m", mem, "-smp", "1", "-nographic",
            "-nodefaults", "-no-reboot", "-serial", "stdio", "-bios", "default", "-kernel",
            os.path.join(img, "Image"), "-initrd", os.path.join(img, "initramfs.cpio"),
            "-append", "console=ttyS0 quiet panic=-1"]
    mon, state = os.path.join(work, "qemu.mon"), os.path.join(work, f"qemu-{mem}.state")
    vm = Proc(base + ["-monitor", f"unix:{mon},server,nowait"])
    try:
        vm.wait_for(b"VME-GUEST-READY")
        vm.answered()
        t0 = time.monotonic()
        # Running: QEMU carries the run state, and a VM saved stopped restores stopped.
        hmp(mon, f'migrate "exec:cat > {state}"')
        while "completed" not in hmp(mon, "info migrate"):
            if time.monotonic() - t0 > TIMEOUT:
                raise RuntimeError("QEMU's migration to a file did not complete")
            time.sleep(0.01)
        took = time.monotonic() - t0
    finally:
        vm.kill()
    size = os.path.getsize(state)
    info = {"took_ms": round(took * 1000), "memory_data_bytes": size, "state_bytes": None}
    return info, restores(runs, base + ["-incoming", f"exec:cat {state}"], False)


def x86_probe(work):
    src = os.path.join(REPO, "crates", "vmm", "tests", "guests", "x86-probe.S")
    obj, elf = os.path.join(work, "probe.o"), os.path.join(work, "probe.elf")
    subprocess.run(["as", "--64", "-o", obj, src], check=True)
    subprocess.run(["ld", "-m", "elf_x86_64", "-N", "-Ttext=0x100000", "-e", "_start",
                    "--no-warn-rwx-segments", "-o", elf, obj], check=True)
    return elf


def vme_x86(work, elf, mem, runs):
    sock, snap = os.path.join(work, "x86.sock"), os.path.join(work, f"x86-{mem}")
    vm = Proc([VMM, "--kernel", elf, "--memory", mem, "--vcpus", "1", "--cmdline", "s",
               "--control-socket", sock])
    try:
        vm.wait_for(b"tick ", timeout=120)
        reply = control(sock, {"cmd": "snapshot", "dir": snap})
        if not reply.get("ok"):
            raise RuntimeError(reply.get("error"))
        info = reply["snapshot"]
    finally:
        vm.kill()
    return info, restores(runs, [VMM, "--restore", snap, "--log-level", "info"], True,
                          answer=False)


def line(arch, tool, mem, info, r):
    out = {"bench": "snapshot", "arch": arch, "tool": tool, "memory": mem}
    if info:
        out.update({"snapshot_ms": info.get("took_ms"),
                    "snapshot_data_mib": round(info["memory_data_bytes"] / 2**20, 2),
                    "state_kib": (round(info["state_bytes"] / 1024, 1)
                                  if info.get("state_bytes") else None)})
    out.update(r)
    print(json.dumps(out), flush=True)
    return out


def main():
    runs = int(os.environ.get("BENCH_RUNS", "5"))
    sizes = os.environ.get("BENCH_SNAPSHOT_MEMORY", "256M,2G").split(",")
    with tempfile.TemporaryDirectory(prefix="vme-bench-snap-", dir="/var/tmp") as work:
        for mem in sizes:
            vme = line("riscv64", "vme-vmm", mem, *vme_riscv(work, mem, runs))
            try:
                qemu = line("riscv64", "qemu-tcg-virt", mem, *qemu_riscv(work, mem, runs))
            except RuntimeError as e:
                qemu = line("riscv64", "qemu-tcg-virt", mem, None, {"failure": str(e)})
            if qemu.get("to_answer_s") and vme.get("to_answer_s"):
                print(f"ratio riscv64 {mem} restore to a guest that answers: vme-vmm / QEMU = "
                      f"{vme['to_answer_s'] / qemu['to_answer_s']:.3f}", flush=True)
            if qemu.get("snapshot_ms") and vme.get("snapshot_ms"):
                print(f"ratio riscv64 {mem} snapshot time: vme-vmm / QEMU = "
                      f"{vme['snapshot_ms'] / max(qemu['snapshot_ms'], 1):.3f}", flush=True)
        if os.path.exists("/dev/kvm"):
            elf = x86_probe(work)
            for mem in sizes:
                line("x86_64", "vme-vmm", mem, *vme_x86(work, elf, mem, runs))


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""CPU-bound guest work on the riscv64 software machine against QEMU's TCG, same kernel and
initramfs, in one run: `sha256sum` of 64 MiB and a shell arithmetic loop, timed inside the
guest (from /proc/uptime around the work, so boot time is excluded), plus guest MIPS for
vme-vmm (instructions its harts retired during the work, from the control socket).
One JSON line per tool and workload."""

import json
import os
import re
import select
import shutil
import signal
import statistics
import subprocess
import time

from boot import vmm_status

WORKLOADS = {
    "sha256-64MiB": "head -c 67108864 /dev/zero | sha256sum >/dev/null",
    "shell-loop-20k": "i=0; while [ $i -lt 20000 ]; do i=$((i+1)); done",
}
# The guest prints markers around the work; its uptime clock follows host time.
# No double quotes inside: the kernel command line cannot nest them in vme.run="...".
WRAP = ("a=$(cut -d' ' -f1 /proc/uptime); echo VME-BENCH-START; {work}; "
        "b=$(cut -d' ' -f1 /proc/uptime); echo VME-BENCH-END $a $b")


def run_once(cmd, sock, timeout):
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    start = time.monotonic()
    buf = b""
    before = after = None
    result = None
    try:
        while time.monotonic() - start < timeout:
            ready, _, _ = select.select([proc.stdout], [], [], 1.0)
            if not ready:
                continue
            chunk = os.read(proc.stdout.fileno(), 65536)
            if not chunk:
                break
            buf += chunk
            if sock and before is None and b"VME-BENCH-START" in buf:
                before = vmm_status(sock)
            m = re.search(rb"VME-BENCH-END ([0-9.]+) ([0-9.]+)", buf)
            if m:
                if sock:
                    after = vmm_status(sock)
                result = {"guest_s": float(m.group(2)) - float(m.group(1))}
                if before and after and after.get("instructions_retired") is not None:
                    n = after["instructions_retired"] - before["instructions_retired"]
                    result["mips"] = round(n / result["guest_s"] / 1e6, 1)
                break
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    return result


def main():
    runs = int(os.environ.get("BENCH_RUNS", "5"))
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    target = os.environ.get("CARGO_TARGET_DIR", os.path.join(repo, "target"))
    img = os.path.join(target, "images", "tiny-riscv64")
    kernel, initrd = os.path.join(img, "Image"), os.path.join(img, "initramfs.cpio")
    sock = f"/tmp/vme-bench-cpu-{os.getpid()}.sock"
    qemu = shutil.which("qemu-system-riscv64")
    for name, work in WORKLOADS.items():
        cmdline = 'console=ttyS0 quiet panic=-1 vme.run="%s"' % WRAP.format(work=work)
        tools = {"vme-vmm": ([os.path.join(target, "release", "vme-vmm"), "--arch", "riscv64",
                              "--kernel", kernel, "--initrd", initrd, "--memory", "256M",
                              "--cmdline", cmdline, "--control-socket", sock], sock)}
        if qemu:
            tools["qemu-tcg-virt"] = ([qemu, "-M", "virt", "-accel", "tcg", "-m", "256M",
                                       "-nographic", "-nodefaults", "-serial", "stdio",
                                       "-kernel", kernel, "-initrd", initrd, "-append", cmdline],
                                      None)
        samples = {t: [] for t in tools}
        for _ in range(runs):
            for tool, (cmd, s) in tools.items():
                r = run_once(cmd, s, 600)
                if r:
                    samples[tool].append(r)
        for tool in tools:
            ok = samples[tool]
            line = {"bench": "riscv-cpu", "workload": name, "tool": tool, "runs": runs,
                    "completed": len(ok)}
            if ok:
                line["guest_s_median"] = round(statistics.median(r["guest_s"] for r in ok), 3)
                mips = [r["mips"] for r in ok if "mips" in r]
                if mips:
                    line["mips_median"] = statistics.median(mips)
            print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()

//! Shared by the integration tests: start the real `vme-vmm` binary, read what the guest
//! prints, stop it, and find the guest images `make images` built.
#![allow(dead_code)]

pub mod agent;
pub mod booted;
pub mod netns;

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::mpsc::{Receiver, channel};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

pub const VMM: &str = env!("CARGO_BIN_EXE_vme-vmm");

/// The filters the daemon always uses: x86_64 workloads run under them, so a syscall or KVM
/// ioctl a filter lacks ends the monitor (status 159) and fails the test.
pub const STRICT: [&str; 2] = ["--seccomp", "strict"];

/// Guest shell commands that print what a booted Linux guest sees of itself: `NPROC=`,
/// `MemTotal:` and `DATE=` (Unix seconds).
pub const BASIC_FACTS: &str =
    "echo NPROC=$(nproc); grep MemTotal /proc/meminfo; echo DATE=$(date +%s)";

/// What the guest does with its virtio devices (a read-only `vda`, a writable `vdb`, the
/// rng, vsock): hash vda (`VDA=`), try to write it (`VDA-RO=`), write a marker to vdb, name
/// the hardware rng and read from it (`RNG=`, `HWRNG=`), list the PCI vendors (`PCI=`) and
/// count the virtio interrupts that are MSI(-X) (`MSI=`, printed last).
pub const VIRTIO_FACTS: &str = "echo VDA=$(sha256sum /dev/vda); \
     (printf x > /dev/vda) 2>/dev/null && echo VDA-RO=no || echo VDA-RO=yes; \
     printf VME-VDB-WRITTEN > /dev/vdb; sync; \
     echo RNG=$(cat /sys/class/misc/hw_random/rng_current); \
     echo HWRNG=$(head -c 64 /dev/hwrng | wc -c); \
     echo PCI=$(sort -u /sys/bus/pci/devices/*/vendor); \
     echo MSI=$(grep -i msi /proc/interrupts | grep -c virtio)";

pub fn repo_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Path of one file of a built guest image; a missing image fails the test with the fix.
pub fn image(name: &str, file: &str) -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_dir().join("target"));
    let p = target.join("images").join(name).join(file);
    assert!(
        p.is_file(),
        "guest image file {} is missing: build it with `images/build.sh {name}` (or `make images`)",
        p.display()
    );
    p
}

/// Flags that boot the tiny riscv64 image with `cmdline_extra` after the usual console flags.
pub fn riscv_tiny_args(vcpus: &str, memory: &str, cmdline_extra: &str) -> Vec<String> {
    let k = image("tiny-riscv64", "Image");
    let i = image("tiny-riscv64", "initramfs.cpio");
    let cmdline = format!("console=ttyS0 quiet panic=-1 {cmdline_extra}");
    [
        "--arch",
        "riscv64",
        "--kernel",
        k.to_str().unwrap(),
        "--initrd",
        i.to_str().unwrap(),
    ]
    .into_iter()
    .chain(["--vcpus", vcpus, "--memory", memory, "--cmdline", &cmdline])
    .map(String::from)
    .collect()
}

/// Our x86 probe guest (`guests/x86-probe.S`), assembled and linked once per test binary.
pub fn x86_probe() -> &'static PathBuf {
    static PROBE: OnceLock<PathBuf> = OnceLock::new();
    PROBE.get_or_init(|| {
        let dir = temp_dir("x86probe");
        let src = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/guests/x86-probe.S");
        let (obj, elf) = (dir.join("probe.o"), dir.join("probe.elf"));
        let run = |cmd: &mut Command| {
            let out = cmd
                .output()
                .expect("run binutils (as, ld): apt-get install binutils");
            assert!(
                out.status.success(),
                "{cmd:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        run(Command::new("as").arg("--64").arg("-o").arg(&obj).arg(&src));
        // -N: one segment at the entry address, no ELF headers loaded below it.
        run(Command::new("ld")
            .args([
                "-m",
                "elf_x86_64",
                "-N",
                "-Ttext=0x100000",
                "-e",
                "_start",
                "--no-warn-rwx-segments",
                "-o",
            ])
            .arg(&elf)
            .arg(&obj));
        elf
    })
}

/// Sends one control command through `vme-vmm ctl`; asserts it succeeded, returns the reply.
pub fn ctl(sock: &Path, cmd: &str) -> String {
    ctl_args(sock, &[cmd])
}

/// [`ctl`] with a command that takes arguments (`["snapshot", DIR]`).
pub fn ctl_args(sock: &Path, cmd: &[&str]) -> String {
    let out = Command::new(VMM)
        .arg("ctl")
        .arg("--control-socket")
        .arg(sock)
        .args(cmd)
        .output()
        .expect("run vme-vmm ctl");
    assert!(
        out.status.success(),
        "ctl {cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `vme-vmm ctl --control-socket S words...`: whether it succeeded, and its output and
/// error output together.
pub fn ctl_words(sock: &Path, words: &[&str]) -> (bool, String) {
    let out = Command::new(VMM)
        .arg("ctl")
        .arg("--control-socket")
        .arg(sock)
        .args(words)
        .output()
        .expect("run vme-vmm ctl");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

/// True when KVM tests should run. Without /dev/kvm they fail, unless the skip is asked for.
pub fn kvm_available() -> bool {
    if std::env::var("VME_SKIP_KVM_TESTS").as_deref() == Ok("1") {
        eprintln!("VME_SKIP_KVM_TESTS=1: skipping a test that needs /dev/kvm");
        return false;
    }
    assert!(
        Path::new("/dev/kvm").exists(),
        "/dev/kvm is missing: load kvm_intel/kvm_amd, or set VME_SKIP_KVM_TESTS=1 to skip KVM tests knowingly"
    );
    true
}

/// `len` bytes that differ per run (xorshift from the clock), so a stale read cannot match.
pub fn random_bytes(len: usize) -> Vec<u8> {
    let mut x = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
        | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 32) as u8
        })
        .collect()
}

/// The SHA-256 of `data` as hex (coreutils' sha256sum).
pub fn sha256_hex(data: &[u8]) -> String {
    let mut child = Command::new("sha256sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("run sha256sum (coreutils)");
    child
        .stdin
        .take()
        .expect("piped stdin")
        .write_all(data)
        .expect("write to sha256sum");
    let out = child.wait_with_output().expect("wait for sha256sum");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .expect("sha256sum prints a hash")
        .to_string()
}

/// True on hosts whose /dev/kvm is PVM (see shared/PVM.md).
pub fn on_pvm_host() -> bool {
    Path::new("/sys/module/kvm_pvm").exists()
}

pub fn temp_dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("vme-test-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("create a test directory under the temp dir");
    d
}

/// A running monitor whose stdout (the guest console) and stderr are collected line by line.
pub struct Vm {
    child: Child,
    /// The console's input, for [`Vm::start_interactive`] guests.
    input: Option<ChildStdin>,
    lines: Receiver<String>,
    pub console: Arc<Mutex<Vec<String>>>,
    pub stderr: Arc<Mutex<String>>,
}

impl Vm {
    pub fn start(args: &[&str]) -> Vm {
        Vm::start_wrapped(&[], args)
    }

    /// Starts the monitor with its console input on a pipe, for [`Vm::type_line`].
    pub fn start_interactive(args: &[&str]) -> Vm {
        Vm::spawn(&[], args, Stdio::piped())
    }

    /// Starts the monitor under a wrapper command (`wrapper... vme-vmm args...`), e.g.
    /// `ip netns exec NS` to run it in a network namespace.
    pub fn start_wrapped(wrapper: &[&str], args: &[&str]) -> Vm {
        Vm::spawn(wrapper, args, Stdio::null())
    }

    /// [`Vm::start_wrapped`] with its console input on a pipe, for [`Vm::type_line`].
    pub fn start_wrapped_interactive(wrapper: &[&str], args: &[&str]) -> Vm {
        Vm::spawn(wrapper, args, Stdio::piped())
    }

    fn spawn(wrapper: &[&str], args: &[&str], stdin: Stdio) -> Vm {
        let mut cmd = match wrapper.split_first() {
            Some((prog, rest)) => {
                let mut c = Command::new(prog);
                c.args(rest).arg(VMM);
                c
            }
            None => Command::new(VMM),
        };
        let mut child = cmd
            .args(args)
            .stdin(stdin)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start vme-vmm");
        let input = child.stdin.take();
        let (tx, lines) = channel();
        let console = Arc::new(Mutex::new(Vec::new()));
        let stdout = child.stdout.take().expect("piped stdout");
        let log = console.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).split(b'\n') {
                let Ok(line) = line else { break };
                let line = String::from_utf8_lossy(&line)
                    .trim_end_matches('\r')
                    .to_string();
                log.lock().unwrap().push(line.clone());
                let _ = tx.send(line);
            }
        });
        let stderr = Arc::new(Mutex::new(String::new()));
        let mut err = child.stderr.take().expect("piped stderr");
        let sink = stderr.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = err.read(&mut buf) {
                if n == 0 {
                    break;
                }
                sink.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        Vm {
            child,
            input,
            lines,
            console,
            stderr,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits for a console line containing `needle`; returns it. Fails with the console so
    /// far when the VM exits first or the time runs out.
    pub fn wait_for(&mut self, needle: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if line.contains(needle) => return line,
                Ok(_) => {}
                Err(_) => self.fail(&format!(
                    "no console line with {needle:?} within {timeout:?}"
                )),
            }
        }
    }

    /// Kills the monitor and fails the test with `why`, the console and stderr.
    pub fn fail(&mut self, why: &str) -> ! {
        let exited = self.child.try_wait().ok().flatten();
        let _ = self.child.kill();
        std::thread::sleep(Duration::from_millis(100));
        panic!(
            "{why} (monitor exit: {exited:?})\n--- console ---\n{}\n--- stderr ---\n{}",
            self.console_text(),
            self.stderr.lock().unwrap()
        );
    }

    /// Fails unless the monitor's stderr is free of the line a strict filter's SIGSYS
    /// handler prints ("vme-vmm: seccomp: thread KIND made forbidden syscall ...").
    pub fn assert_no_seccomp_violation(&self) {
        let err = self.stderr.lock().unwrap().clone();
        assert!(
            !err.contains("vme-vmm: seccomp:"),
            "a seccomp filter stopped the monitor:\n{err}"
        );
    }

    /// Types a line into the guest's console (a [`Vm::start_interactive`] guest).
    pub fn type_line(&mut self, line: &str) {
        let input = self
            .input
            .as_mut()
            .expect("type_line needs a guest started with Vm::start_interactive");
        input
            .write_all(format!("{line}\n").as_bytes())
            .expect("write to the guest console");
    }

    /// The monitor's exit status if it has exited.
    pub fn try_exit(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().expect("wait for vme-vmm")
    }

    /// Lines received since the last call (drains the queue).
    pub fn take_lines(&mut self) -> Vec<String> {
        self.lines.try_iter().collect()
    }

    pub fn console_text(&self) -> String {
        self.console.lock().unwrap().join("\n")
    }

    /// Waits for the monitor to exit; kills it (and fails) after `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("wait for vme-vmm") {
                // Let the reader threads drain the pipes.
                std::thread::sleep(Duration::from_millis(100));
                return status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!(
                    "vme-vmm still running after {timeout:?}\n--- console ---\n{}\n--- stderr ---\n{}",
                    self.console_text(),
                    self.stderr.lock().unwrap()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// CPU time (user + system) the monitor process has used so far.
    pub fn cpu_time(&self) -> Duration {
        let stat =
            std::fs::read_to_string(format!("/proc/{}/stat", self.pid())).unwrap_or_default();
        // Fields after the parenthesised command name, from the 3rd (state) on; utime and
        // stime are the 14th and 15th. Taken by position: skipping fields that do not parse
        // as u64 (the state letter, a tpgid of -1 without a terminal) would shift them.
        let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
        let f: Vec<&str> = rest.split_whitespace().collect();
        let field = |n: usize| -> u64 { f.get(n - 3).and_then(|x| x.parse().ok()).unwrap_or(0) };
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
        let ticks = field(14) + field(15);
        Duration::from_millis(ticks * 1000 / hz)
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `vme-vmm` to completion with no guest expected to start (bad input); returns the exit
/// status and stderr.
pub fn run_to_end(args: &[&str]) -> (ExitStatus, String) {
    let out = Command::new(VMM)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run vme-vmm");
    (
        out.status,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Reads console lines from a child's stdout until one contains `needle` (for tests that
/// manage their own processes).
pub fn read_until(reader: &mut impl BufRead, needle: &str) -> Option<String> {
    let mut line = String::new();
    loop {
        line.clear();
        if reader.read_line(&mut line).ok()? == 0 {
            return None;
        }
        if line.contains(needle) {
            return Some(line);
        }
    }
}

//! Runs one command for the host: stdin fed from the request, stdout and stderr collected
//! (together at most `MAX_DATA` bytes), killed with its whole process group on timeout.

use std::io::{Read, Write};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Command, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;
use vme_api::agent::{MAX_DATA, Reply};

pub fn run(
    argv: &[String],
    env: &[(String, String)],
    cwd: Option<&str>,
    timeout_ms: u64,
    stdin: Vec<u8>,
) -> Result<(Reply, Vec<u8>), String> {
    let Some((program, args)) = argv.split_first() else {
        return Err("exec needs a command: argv is empty".into());
    };
    let mut cmd = Command::new(program);
    cmd.args(args)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Its own group, so a timeout also ends what it started.
        .process_group(0);
    if let Some(dir) = cwd {
        cmd.current_dir(dir);
    }
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("cannot run {program:?}: {e}"))?;
    let pid = child.id() as libc::pid_t;

    let mut input = child.stdin.take();
    let feeder = std::thread::spawn(move || {
        if let Some(mut i) = input.take() {
            // A command that exits without reading its input is not an error.
            let _ = i.write_all(&stdin);
        }
    });
    let half = MAX_DATA as u64 / 2;
    let out = collect(child.stdout.take(), half);
    let err = collect(child.stderr.take(), half);

    // The watchdog kills the group unless the command ends first. `done` is set before
    // the child is reaped, so its pid cannot have been reused when the watchdog kills.
    let state = Arc::new((Mutex::new((false, false)), Condvar::new()));
    let watchdog = (timeout_ms > 0).then(|| {
        let state = state.clone();
        std::thread::spawn(move || {
            let (lock, cv) = &*state;
            let guard = lock.lock().unwrap_or_else(|p| p.into_inner());
            let (mut guard, _) = cv
                .wait_timeout_while(guard, Duration::from_millis(timeout_ms), |s| !s.0)
                .unwrap_or_else(|p| p.into_inner());
            if !guard.0 {
                guard.1 = true;
                // SAFETY: signals a process group we created and have not reaped.
                unsafe { libc::kill(-pid, libc::SIGKILL) };
            }
        })
    });
    wait_exited(pid);
    let timed_out = {
        let (lock, cv) = &*state;
        let mut s = lock.lock().unwrap_or_else(|p| p.into_inner());
        s.0 = true;
        cv.notify_all();
        s.1
    };
    let status = child
        .wait()
        .map_err(|e| format!("cannot wait for {program:?}: {e}"))?;
    if let Some(w) = watchdog {
        let _ = w.join();
    }
    let _ = feeder.join();
    let (mut stdout, t1) = out.finish();
    let (stderr, t2) = err.finish();
    let stdout_len = stdout.len() as u64;
    stdout.extend_from_slice(&stderr);
    Ok((
        Reply::Exited {
            code: status.code(),
            signal: status.signal(),
            stdout_len,
            timed_out,
            truncated: t1 || t2,
        },
        stdout,
    ))
}

/// How long output may still arrive after the command exited. Something it started in the
/// background may hold the pipes open for ever; its later output is not waited for.
const DRAIN_GRACE: Duration = Duration::from_millis(500);

/// A pipe read to its end on a thread, keeping at most `cap` bytes (and draining the rest,
/// so the command never blocks on a full pipe).
struct Collector {
    kept: Arc<Mutex<(Vec<u8>, bool)>>,
    done: std::sync::mpsc::Receiver<()>,
}

fn collect(pipe: Option<impl Read + Send + 'static>, cap: u64) -> Collector {
    let kept = Arc::new(Mutex::new((Vec::new(), false)));
    let (tx, done) = std::sync::mpsc::channel();
    let k = kept.clone();
    std::thread::spawn(move || {
        if let Some(mut pipe) = pipe {
            let mut buf = [0u8; 16 << 10];
            loop {
                match pipe.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        let mut k = k.lock().unwrap_or_else(|p| p.into_inner());
                        let room = (cap as usize).saturating_sub(k.0.len());
                        k.0.extend_from_slice(&buf[..n.min(room)]);
                        k.1 |= n > room;
                    }
                }
            }
        }
        let _ = tx.send(());
    });
    Collector { kept, done }
}

impl Collector {
    /// The output so far, once the pipe ended or the grace period passed; and whether any
    /// was dropped.
    fn finish(self) -> (Vec<u8>, bool) {
        let _ = self.done.recv_timeout(DRAIN_GRACE);
        let mut k = self.kept.lock().unwrap_or_else(|p| p.into_inner());
        (std::mem::take(&mut k.0), k.1)
    }
}

/// Waits until `pid` has exited without reaping it (`WNOWAIT`).
fn wait_exited(pid: libc::pid_t) {
    loop {
        // SAFETY: an all-zero siginfo_t is a valid value for the kernel to fill.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: `info` outlives the call; `pid` is our own unreaped child.
        let rc = unsafe {
            libc::waitid(
                libc::P_PID,
                pid as libc::id_t,
                &mut info,
                libc::WEXITED | libc::WNOWAIT,
            )
        };
        if rc == 0 || std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh(script: &str, stdin: &[u8], timeout_ms: u64) -> (Reply, Vec<u8>) {
        let argv = ["/bin/sh", "-c", script].map(String::from);
        run(&argv, &[], None, timeout_ms, stdin.to_vec()).unwrap()
    }

    #[test]
    fn output_status_and_stdin() {
        let (reply, data) = sh("cat; echo err >&2; exit 3", b"in\n", 0);
        let Reply::Exited {
            code, stdout_len, ..
        } = reply
        else {
            panic!("{reply:?}")
        };
        assert_eq!(code, Some(3));
        assert_eq!(&data[..stdout_len as usize], b"in\n");
        assert_eq!(&data[stdout_len as usize..], b"err\n");
    }

    #[test]
    fn a_timeout_kills_the_whole_group() {
        let start = std::time::Instant::now();
        let (reply, _) = sh("sleep 30 & sleep 30", b"", 200);
        assert!(start.elapsed() < Duration::from_secs(10));
        assert!(
            matches!(
                reply,
                Reply::Exited {
                    timed_out: true,
                    signal: Some(9),
                    ..
                }
            ),
            "{reply:?}"
        );
    }

    #[test]
    fn a_background_child_holding_the_pipes_does_not_block_the_reply() {
        let start = std::time::Instant::now();
        let (reply, data) = sh("echo up; sleep 30 &", b"", 0);
        assert!(start.elapsed() < Duration::from_secs(5));
        assert!(matches!(reply, Reply::Exited { code: Some(0), .. }));
        assert_eq!(data, b"up\n");
    }

    #[test]
    fn a_missing_program_is_an_error() {
        let argv = vec!["/nonexistent/x".to_string()];
        assert!(
            run(&argv, &[], None, 0, vec![])
                .unwrap_err()
                .contains("cannot run")
        );
        assert!(run(&[], &[], None, 0, vec![]).is_err());
    }
}

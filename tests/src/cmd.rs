//! Running external commands (ip, nsenter, sysctl, proxy-agent) with a time limit.

use std::io::Read;
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// Default limit for short administrative commands (`ip`, `sysctl`, ...).
pub const SHORT: Duration = Duration::from_secs(20);

/// Runs `cmd` to completion, capturing stdout and stderr; kills it (SIGKILL, by
/// pid) when it runs longer than `timeout`. A non-zero exit status is not an
/// error here: see [`run_ok`].
pub fn run_output(cmd: &mut Command, timeout: Duration) -> Result<Output> {
    let desc = describe(cmd);
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("spawning {desc}"))?;
    let out = drain(child.stdout.take());
    let err = drain(child.stderr.take());
    let status = wait_deadline(&mut child, timeout);
    let status = match status {
        Some(s) => s,
        None => {
            let _ = child.kill();
            let _ = child.wait();
            bail!("{desc} did not finish within {timeout:?}");
        }
    };
    Ok(Output {
        status,
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
    })
}

/// Like [`run_output`] but fails when the command exits non-zero; returns stdout.
pub fn run_ok(cmd: &mut Command, timeout: Duration) -> Result<String> {
    let desc = describe(cmd);
    let out = run_output(cmd, timeout)?;
    if !out.status.success() {
        bail!(
            "{desc} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim(),
            String::from_utf8_lossy(&out.stdout).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `ip ARGS...` (use `-n NS` in `args` to act inside a namespace).
pub fn ip(args: &[&str]) -> Result<String> {
    run_ok(Command::new("ip").args(args), SHORT)
}

/// Waits for `child` until `timeout`; `None` when it is still running.
pub fn wait_deadline(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(s)) => return Some(s),
            Ok(None) => {}
            Err(_) => return None,
        }
        if Instant::now() >= deadline {
            return None;
        }
        thread::sleep(Duration::from_millis(10));
    }
}

/// Human-readable command line for error messages.
pub fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

fn drain<R: Read + Send + 'static>(r: Option<R>) -> thread::JoinHandle<Vec<u8>> {
    thread::spawn(move || {
        let mut buf = Vec::new();
        if let Some(mut r) = r {
            let _ = r.read_to_end(&mut buf);
        }
        buf
    })
}

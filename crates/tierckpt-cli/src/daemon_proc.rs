//! Runs `tierckptd` as a child process (for the demo, benchmarks and tests):
//! starts it on a directory and an ephemeral port, waits for its ready line,
//! and SIGKILLs it when asked or dropped.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};

/// Locates the `tierckptd` binary: `$TIERCKPTD_BIN`, beside this executable
/// (or one directory up, for test binaries in `deps/`), then `$PATH`.
pub fn daemon_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("TIERCKPTD_BIN") {
        return p.into();
    }
    if let Ok(exe) = std::env::current_exe() {
        for dir in exe.ancestors().skip(1).take(2) {
            let p = dir.join("tierckptd");
            if p.is_file() {
                return p;
            }
        }
    }
    "tierckptd".into()
}

/// Settings for a daemon child.
#[derive(Debug, Clone)]
pub struct DaemonOptions {
    pub memory_dir: PathBuf,
    pub memory_tier_size: String,
    pub keep_last: usize,
    /// "127.0.0.1:0" for an ephemeral port, or "off".
    pub http_addr: String,
    pub token: Option<String>,
    pub log: String,
}

impl DaemonOptions {
    pub fn new(memory_dir: impl Into<PathBuf>) -> Self {
        Self {
            memory_dir: memory_dir.into(),
            memory_tier_size: "1GiB".into(),
            keep_last: 3,
            http_addr: "127.0.0.1:0".into(),
            token: None,
            log: "warn".into(),
        }
    }
}

/// A running daemon child; killed on drop.
pub struct DaemonProcess {
    child: Child,
    pub socket: PathBuf,
    pub http_addr: Option<String>,
    pub opts: DaemonOptions,
}

impl DaemonProcess {
    /// Starts the daemon and waits (up to 30 s) for its ready line.
    pub fn spawn(opts: DaemonOptions) -> Result<Self> {
        let socket = opts.memory_dir.join("daemon.sock");
        let mut cmd = Command::new(daemon_binary());
        cmd.arg("--memory-dir")
            .arg(&opts.memory_dir)
            .arg("--memory-tier-size")
            .arg(&opts.memory_tier_size)
            .arg("--keep-last")
            .arg(opts.keep_last.to_string())
            .arg("--socket")
            .arg(&socket)
            .arg("--http-addr")
            .arg(&opts.http_addr)
            .env("TIERCKPT_LOG", &opts.log)
            .env_remove("TIERCKPT_TOKEN")
            .env_remove("TIERCKPT_TOKEN_FILE")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        if let Some(t) = &opts.token {
            cmd.env("TIERCKPT_TOKEN", t);
        }
        // The daemon dies with the process that started it (demo, bench, test).
        // SAFETY: prctl is async-signal-safe.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let mut child = cmd
            .spawn()
            .with_context(|| format!("starting {}", daemon_binary().display()))?;
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            let first = lines.next();
            let _ = tx.send(first);
            for _ in lines {}
        });
        let line = match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(Some(Ok(l))) => l,
            Ok(_) => {
                let status = child.wait().ok();
                bail!("tierckptd exited before it was ready ({status:?}); see its log above")
            }
            Err(_) => {
                let _ = child.kill();
                bail!("tierckptd was not ready within 30 s")
            }
        };
        let ready: serde_json::Value =
            serde_json::from_str(&line).with_context(|| format!("tierckptd said {line:?}"))?;
        if ready["event"] != "ready" {
            bail!("tierckptd said {line:?} instead of its ready line");
        }
        Ok(Self {
            child,
            socket,
            http_addr: ready["http_addr"].as_str().map(String::from),
            opts,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn memory_dir(&self) -> &Path {
        &self.opts.memory_dir
    }

    /// SIGKILL, then reap.
    pub fn kill(&mut self) -> Result<()> {
        self.child.kill().map_err(|e| anyhow!("killing tierckptd: {e}"))?;
        self.child.wait()?;
        Ok(())
    }

    /// SIGTERM, then reap.
    pub fn stop(&mut self) -> Result<()> {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        self.child.wait()?;
        Ok(())
    }

    /// Whether the process is still running.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Starts a new daemon on the same directory (after a kill or stop).
    pub fn restart(&mut self) -> Result<()> {
        if self.alive() {
            self.kill()?;
        }
        let fresh = Self::spawn(self.opts.clone())?;
        drop(std::mem::replace(self, fresh));
        Ok(())
    }
}

impl Drop for DaemonProcess {
    fn drop(&mut self) {
        if self.alive() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

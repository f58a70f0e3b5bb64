//! The TCP floor: a plain copy of the same bytes between two processes on
//! 127.0.0.1, or from host 0 to host 1 of [`Hosts`] (the receiver runs in
//! host 1, this end's socket is opened in host 0). This end spawns this executable as the hidden `tierckpt bench
//! tcp-sink` and, per repetition, writes an 8-byte little-endian length and
//! then the bytes with one `write_all`; the sink answers one byte once it
//! has read them all.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use tierckpt_harness::hosts::Hosts;

/// The sending end of the TCP floor: a `bench tcp-sink` child and one
/// connection to it.
pub(crate) struct TcpFloor {
    child: Child,
    stream: TcpStream,
}

impl TcpFloor {
    /// Starts a sink that takes transfers of up to `bytes` and connects to
    /// it: on loopback, or with `hosts` from host 0 to a sink on host 1.
    pub(crate) fn start(bytes: u64, hosts: Option<&Hosts>) -> Result<Self> {
        let exe = std::env::current_exe().context("locating this executable for the TCP sink")?;
        let (mut cmd, addr) = match hosts {
            Some(h) => (h.command(1, &exe), h.addr(1).to_string()),
            None => (Command::new(&exe), "127.0.0.1".to_string()),
        };
        cmd.args(["bench", "tcp-sink", "--bytes", &bytes.to_string(), "--addr", &addr])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        tierckpt_harness::daemon::die_with_parent(&mut cmd);
        let mut child = cmd.spawn().with_context(|| format!("starting {} bench tcp-sink", exe.display()))?;
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("piped stdout")).read_line(&mut line)?;
        let port: u16 = match line.trim().parse() {
            Ok(p) => p,
            Err(_) => {
                let _ = child.kill();
                let status = child.wait().ok();
                bail!("the TCP sink said {line:?} instead of its port ({status:?})");
            }
        };
        let connect = || TcpStream::connect((addr.as_str(), port));
        let stream = match hosts {
            Some(h) => h.enter(0, connect)?,
            None => connect(),
        }
        .with_context(|| format!("connecting to the TCP sink at {addr}:{port}"))?;
        stream.set_nodelay(true)?;
        Ok(Self { child, stream })
    }

    /// Sends `data` and waits for the acknowledgement; returns the seconds
    /// from the first byte to the acknowledgement.
    pub(crate) fn rep(&mut self, data: &[u8]) -> Result<f64> {
        let t = Instant::now();
        self.stream.write_all(&(data.len() as u64).to_le_bytes())?;
        self.stream.write_all(data)?;
        let mut ack = [0u8; 1];
        self.stream.read_exact(&mut ack).context("waiting for the TCP sink's acknowledgement")?;
        Ok(t.elapsed().as_secs_f64())
    }

    /// Closes the connection and waits for the sink to exit.
    pub(crate) fn finish(mut self) -> Result<()> {
        self.stream.shutdown(std::net::Shutdown::Write)?;
        let status = self.child.wait()?;
        if !status.success() {
            bail!("the TCP sink failed: {status}");
        }
        Ok(())
    }
}

impl Drop for TcpFloor {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

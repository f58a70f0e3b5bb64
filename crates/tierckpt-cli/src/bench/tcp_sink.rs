//! `tierckpt bench tcp-sink` (hidden): the receiving end of `bench
//! replicate`'s TCP floor (see `floor::tcp`).

use std::io::{Read, Write};
use std::net::TcpListener;

use anyhow::{bail, Context, Result};
use clap::Args;
use tierckpt_harness::size::parse_size;

/// Arguments of `bench tcp-sink`.
#[derive(Args, Debug, Clone)]
pub struct TcpSinkArgs {
    /// Size of the receive buffer: the largest transfer.
    #[arg(long, value_parser = parse_size)]
    pub bytes: u64,
    /// Port to listen on; 0 for any. The port is printed.
    #[arg(long, default_value_t = 0)]
    pub port: u16,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    pub addr: std::net::IpAddr,
}

/// Accepts one connection on `addr` and then, for each transfer (a
/// little-endian u64 length, then that many bytes), reads the bytes into a
/// pre-faulted buffer and answers one byte. Exits at EOF.
pub fn run(a: &TcpSinkArgs) -> Result<()> {
    let listener = TcpListener::bind((a.addr, a.port)).context("binding the TCP sink")?;
    let mut buf = vec![0u8; a.bytes as usize];
    // `vec!` of zeros maps pages lazily: touch them all before any timing.
    buf.fill(1);
    std::hint::black_box(&mut buf);
    let port = listener.local_addr()?.port();
    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "{port}")?;
        out.flush()?;
    }
    let (mut s, _) = listener.accept().context("accepting the sender")?;
    s.set_nodelay(true)?;
    loop {
        let mut hdr = [0u8; 8];
        match s.read_exact(&mut hdr) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e).context("reading a transfer's length"),
        }
        let n = u64::from_le_bytes(hdr) as usize;
        if n > buf.len() {
            bail!("transfer of {n} bytes exceeds the sink's buffer of {}", buf.len());
        }
        s.read_exact(&mut buf[..n]).context("receiving a transfer")?;
        s.write_all(&[1]).context("acknowledging a transfer")?;
    }
}

//! A real S3-protocol server for tests: `moto_server` bound to 127.0.0.1 on a
//! free port, killed on drop. Found through `$TIERCKPT_MOTO_SERVER`, the
//! workspace's `.venv` (made by `scripts/test.sh`), or `$PATH`.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A `moto_server` child on 127.0.0.1; killed on drop.
pub struct Moto {
    child: Child,
    /// Its port.
    pub port: u16,
}

fn binary() -> PathBuf {
    if let Some(p) = std::env::var_os("TIERCKPT_MOTO_SERVER") {
        return p.into();
    }
    let venv = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../.venv/bin/moto_server");
    if venv.exists() {
        return venv;
    }
    "moto_server".into()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

impl Moto {
    /// Starts one on a free port and waits until it answers.
    pub fn start() -> Self {
        for _ in 0..3 {
            let port = free_port();
            let child = Command::new(binary())
                .args(["-H", "127.0.0.1", "-p", &port.to_string()])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap_or_else(|e| {
                    panic!(
                        "cannot start moto_server ({}): {e}; run ./scripts/test.sh, or pip install 'moto[server]' and set TIERCKPT_MOTO_SERVER",
                        binary().display()
                    )
                });
            let mut m = Moto { child, port };
            let deadline = Instant::now() + Duration::from_secs(60);
            while Instant::now() < deadline {
                if TcpStream::connect(("127.0.0.1", port)).is_ok() {
                    return m;
                }
                if let Ok(Some(_)) = m.child.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = m.child.kill();
        }
        panic!("moto_server did not start on 127.0.0.1");
    }

    /// Its URL.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Creates a bucket (moto accepts unsigned requests).
    pub fn create_bucket(&self, name: &str) {
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).unwrap();
        write!(
            s,
            "PUT /{name} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            self.port
        )
        .unwrap();
        let mut resp = String::new();
        s.read_to_string(&mut resp).unwrap();
        assert!(resp.starts_with("HTTP/1.1 200"), "creating bucket {name}: {resp}");
    }

    /// Store options pointing object_store at this server.
    pub fn options(&self) -> Vec<(String, String)> {
        [
            ("endpoint", self.endpoint()),
            ("allow_http", "true".into()),
            ("region", "us-east-1".into()),
            ("access_key_id", "testing".into()),
            ("secret_access_key", "testing".into()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

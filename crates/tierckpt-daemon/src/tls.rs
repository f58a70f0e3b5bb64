//! TLS of the HTTP API and of the traffic between peers (rustls on the
//! ring provider, TLS 1.3 only).
//!
//! `tls_cert` and `tls_key` make the HTTP API serve HTTPS. `tls_ca` is the
//! cluster's CA: peers' server certificates are verified against it, the
//! peer client presents `tls_cert` as its client certificate, and the
//! server asks every client for a certificate (optional: the peer
//! endpoints alone require one, see `crate::auth`). The files are polled;
//! when one changes, both configurations are rebuilt and swapped, so new
//! connections use the new certificate. A file that does not load leaves
//! the old configuration in place and logs an error naming it.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use tokio::sync::watch;

use crate::DaemonError;

/// How often the certificate files are checked for changes.
pub const RELOAD_POLL: Duration = Duration::from_secs(2);

/// The TLS settings: where the PEM files are, and the name peers'
/// certificates must carry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsConfig {
    /// This node's certificate chain (`tls_cert`).
    pub cert: PathBuf,
    /// Its private key (`tls_key`).
    pub key: PathBuf,
    /// The cluster's CA bundle (`tls_ca`); with it, mutual TLS between peers.
    pub ca: Option<PathBuf>,
    /// The name checked on every peer's certificate (`tls_server_name`);
    /// none: the host of the peer's address.
    pub server_name: Option<String>,
}

/// The configurations built from the files at one moment.
struct Built {
    server: Arc<ServerConfig>,
    client: Option<Arc<ClientConfig>>,
}

/// Modification time and length of a file, to notice a replacement.
type Stamp = Option<(SystemTime, u64)>;

struct Current {
    built: Built,
    stamps: Vec<Stamp>,
    generation: u64,
}

/// The live TLS configurations of a daemon, reloaded when the files change.
pub struct Tls {
    cfg: TlsConfig,
    current: RwLock<Current>,
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read(setting: &str, path: &Path) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("{setting} {}: {e}", path.display()))
}

fn certificates(setting: &str, path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let pem = read(setting, path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{setting} {}: not a valid PEM certificate file ({e})", path.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "{setting} {}: no certificate in the file (expected PEM \"BEGIN CERTIFICATE\" blocks)",
            path.display()
        ));
    }
    Ok(certs)
}

fn private_key(path: &Path) -> Result<PrivateKeyDer<'static>, String> {
    let pem = read("tls_key", path)?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| {
        format!(
            "tls_key {}: no private key in the file (expected a PEM \"BEGIN PRIVATE KEY\", RSA or EC key): {e}",
            path.display()
        )
    })
}

fn tls13(e: rustls::Error) -> String {
    format!("TLS 1.3 with the ring provider: {e}")
}

fn build(cfg: &TlsConfig) -> Result<Built, String> {
    let certs = certificates("tls_cert", &cfg.cert)?;
    let key = private_key(&cfg.key)?;
    let provider = provider();
    let mismatch = |e: rustls::Error| {
        format!(
            "tls_cert {} and tls_key {} do not go together ({e}): the key must be the certificate's",
            cfg.cert.display(),
            cfg.key.display()
        )
    };
    let roots = match &cfg.ca {
        None => None,
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            for c in certificates("tls_ca", ca)? {
                roots.add(c).map_err(|e| format!("tls_ca {}: a certificate is not a usable CA ({e})", ca.display()))?;
            }
            Some(Arc::new(roots))
        }
    };
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls13)?;
    let builder = match &roots {
        // Every client may offer a certificate; a verified one is what the
        // peer endpoints require.
        Some(r) => builder.with_client_cert_verifier(
            WebPkiClientVerifier::builder_with_provider(r.clone(), provider.clone())
                .allow_unauthenticated()
                .build()
                .map_err(|e| format!("tls_ca {}: {e}", cfg.ca.as_deref().unwrap_or(Path::new("")).display()))?,
        ),
        None => builder.with_no_client_auth(),
    };
    let mut server = builder.with_single_cert(certs.clone(), key.clone_key()).map_err(mismatch)?;
    server.alpn_protocols = vec![b"http/1.1".to_vec()];
    let client = match roots {
        None => None,
        Some(r) => Some(Arc::new(
            ClientConfig::builder_with_provider(provider)
                .with_protocol_versions(&[&rustls::version::TLS13])
                .map_err(tls13)?
                .with_root_certificates(r)
                .with_client_auth_cert(certs, key)
                .map_err(mismatch)?,
        )),
    };
    Ok(Built { server: Arc::new(server), client })
}

fn stamps(cfg: &TlsConfig) -> Vec<Stamp> {
    [Some(&cfg.cert), Some(&cfg.key), cfg.ca.as_ref()]
        .into_iter()
        .flatten()
        .map(|p| std::fs::metadata(p).ok().and_then(|m| Some((m.modified().ok()?, m.len()))))
        .collect()
}

impl TlsConfig {
    /// Loads the files once, as a check; errors name the file and what is
    /// wrong with it.
    pub fn check(&self) -> Result<(), DaemonError> {
        build(self).map(|_| ()).map_err(DaemonError::Config)
    }
}

impl Tls {
    /// Loads the files; errors name the file and what is wrong with it.
    pub fn load(cfg: TlsConfig) -> Result<Arc<Self>, DaemonError> {
        let stamps = stamps(&cfg);
        let built = build(&cfg).map_err(DaemonError::Config)?;
        Ok(Arc::new(Self { cfg, current: RwLock::new(Current { built, stamps, generation: 0 }) }))
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Current> {
        self.current.read().unwrap_or_else(|p| p.into_inner())
    }

    /// The server configuration new connections get.
    pub fn server(&self) -> Arc<ServerConfig> {
        self.read().built.server.clone()
    }

    /// The peer client's configuration (none without `tls_ca`) and its
    /// generation, which changes at each reload.
    pub fn client(&self) -> Option<(u64, Arc<ClientConfig>)> {
        let c = self.read();
        c.built.client.clone().map(|cc| (c.generation, cc))
    }

    /// Whether peers must present a certificate signed by `tls_ca`.
    pub fn mutual(&self) -> bool {
        self.cfg.ca.is_some()
    }

    /// The name checked on every peer's certificate, if one is set.
    pub fn server_name(&self) -> Option<&str> {
        self.cfg.server_name.as_deref()
    }

    /// Rebuilds the configurations if a file changed since the last look;
    /// returns whether they were replaced. A file that does not load keeps
    /// the old configurations and logs an error naming it.
    pub fn reload_if_changed(&self) -> bool {
        let now = stamps(&self.cfg);
        if now == self.read().stamps {
            return false;
        }
        let built = build(&self.cfg);
        let mut c = self.current.write().unwrap_or_else(|p| p.into_inner());
        c.stamps = now;
        match built {
            Ok(b) => {
                c.built = b;
                c.generation += 1;
                tracing::info!(cert = %self.cfg.cert.display(), "TLS certificates reloaded");
                true
            }
            Err(e) => {
                tracing::error!(error = %e, "TLS files changed but do not load; keeping the previous certificate");
                false
            }
        }
    }

    /// Polls the files every [`RELOAD_POLL`] until `stop`.
    pub async fn watch(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        let mut tick = tokio::time::interval(RELOAD_POLL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.changed() => return,
                _ = tick.tick() => {}
            }
            let me = self.clone();
            let _ = tokio::task::spawn_blocking(move || me.reload_if_changed()).await;
        }
    }
}

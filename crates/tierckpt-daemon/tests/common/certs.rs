//! Certificates for tests, made with rcgen: a CA and node certificates it
//! signs (for one name and address, or the ones given; expired if asked),
//! and the settings that point a daemon at them. Shared by the TLS and the
//! several-hosts tests (`#[path = "common/certs.rs"] mod certs;`).

#![allow(dead_code)]

use std::path::{Path, PathBuf};

use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair};

/// The name every node certificate carries besides 127.0.0.1.
pub(crate) const NODE_NAME: &str = "node.tierckpt.test";

/// A test CA.
pub(crate) struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl Ca {
    pub(crate) fn new(name: &str) -> Self {
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.distinguished_name.push(DnType::CommonName, name);
        Self { issuer: CertifiedIssuer::self_signed(p, KeyPair::generate().unwrap()).unwrap() }
    }

    pub(crate) fn pem(&self) -> String {
        self.issuer.pem()
    }

    /// A node certificate for 127.0.0.1 and [`NODE_NAME`] (cert PEM, key
    /// PEM); `expired`: valid in 2000 only.
    pub(crate) fn node(&self, expired: bool) -> (String, String) {
        self.node_for(&["127.0.0.1", NODE_NAME], expired)
    }

    /// A node certificate for `names` (DNS names or IP addresses).
    pub(crate) fn node_for(&self, names: &[&str], expired: bool) -> (String, String) {
        let mut p = CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>()).unwrap();
        p.distinguished_name.push(DnType::CommonName, names[0]);
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        if expired {
            p.not_before = rcgen::date_time_ymd(2000, 1, 1);
            p.not_after = rcgen::date_time_ymd(2000, 12, 31);
        }
        let key = KeyPair::generate().unwrap();
        let cert = p.signed_by(&key, &self.issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }
}

pub(crate) fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

/// Writes `text` to `path` by rename, as a certificate manager does.
pub(crate) fn replace(path: &Path, text: &str) {
    let tmp = path.with_extension("new");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// Node `name`'s cert and key files in `dir`: the settings that set them.
pub(crate) fn node_files(dir: &Path, name: &str, (cert, key): &(String, String)) -> tierckpt_daemon::ConfigLayer {
    tierckpt_daemon::ConfigLayer {
        tls_cert: Some(write(dir, &format!("{name}.crt"), cert)),
        tls_key: Some(write(dir, &format!("{name}.key"), key)),
        ..Default::default()
    }
}

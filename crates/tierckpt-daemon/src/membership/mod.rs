//! Where a cluster's members come from: a static list, a DNS name (a
//! Kubernetes headless Service: A/AAAA or SRV records), Slurm's node list,
//! or a file, re-read every `discover_interval`. This module turns each
//! source into [`Node`]s (an id and a host:port); the cluster
//! (`crate::cluster`) keeps the runtime member set and its health.

mod discover;
mod slurm;

pub use discover::discover;
pub use slurm::expand_nodelist;

use std::path::PathBuf;

/// The port of the HTTP API unless an address says otherwise.
pub const DEFAULT_PORT: u16 = 7750;

/// A member: its id and the address its peers reach it at.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Node {
    /// Unique in the cluster; `[A-Za-z0-9_.-]`.
    pub id: String,
    /// host:port (a name, an IPv4 literal, or an IPv6 literal in brackets).
    pub addr: String,
}

/// A source of members other than a static list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Discover {
    /// Every A/AAAA record of a name, each with this port.
    Dns {
        /// The name, e.g. a headless Service's.
        name: String,
        /// The port of every member.
        port: u16,
    },
    /// Every SRV record of a name: its target and port.
    Srv {
        /// The name, e.g. `_peer._tcp.tierckpt.ns.svc.cluster.local`.
        name: String,
    },
    /// Slurm's `SLURM_JOB_NODELIST` (or `SLURM_NODELIST`), each with this port.
    Slurm {
        /// The port of every member.
        port: u16,
    },
    /// A file of members, one per line: `host:port` or `id=host:port`.
    File(PathBuf),
}

impl std::fmt::Display for Discover {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Discover::Dns { name, port } => write!(f, "dns:{name}:{port}"),
            Discover::Srv { name } => write!(f, "srv:{name}"),
            Discover::Slurm { .. } => write!(f, "slurm"),
            Discover::File(p) => write!(f, "file:{}", p.display()),
        }
    }
}

impl Discover {
    /// Parses the `discover` setting: `dns:NAME[:PORT]`, `srv:NAME`,
    /// `slurm[:PORT]` or `file:PATH`.
    pub fn parse(s: &str) -> Result<Self, String> {
        let bad =
            |why: &str| format!("discover {s:?} {why}; write dns:NAME[:PORT], srv:NAME, slurm[:PORT] or file:PATH");
        let port = |p: Option<&str>| -> Result<u16, String> {
            p.map_or(Ok(DEFAULT_PORT), |p| {
                p.parse().map_err(|_| bad(&format!("has port {p:?}, not a number below 65536")))
            })
        };
        let (kind, rest) = s.split_once(':').unwrap_or((s, ""));
        match kind {
            "dns" => {
                let (name, p) = match rest.rsplit_once(':') {
                    Some((n, p)) => (n, Some(p)),
                    None => (rest, None),
                };
                check_host(name).map_err(|e| bad(&e))?;
                Ok(Discover::Dns { name: name.to_string(), port: port(p)? })
            }
            "srv" => {
                check_host(rest).map_err(|e| bad(&e))?;
                Ok(Discover::Srv { name: rest.to_string() })
            }
            "slurm" => Ok(Discover::Slurm { port: port((!rest.is_empty()).then_some(rest))? }),
            "file" if !rest.is_empty() => Ok(Discover::File(rest.into())),
            _ => Err(bad("is not a source")),
        }
    }
}

/// Checks a host name or IP literal (brackets around IPv6 are allowed).
fn check_host(h: &str) -> Result<(), String> {
    let bare = h.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(h);
    if bare.parse::<std::net::IpAddr>().is_ok() {
        return Ok(());
    }
    let ok = !h.is_empty()
        && h.len() <= 253
        && h.trim_end_matches('.').split('.').all(|l| {
            !l.is_empty() && l.len() <= 63 && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        });
    match ok {
        true => Ok(()),
        false => Err(format!("has host {h:?}, which is neither a DNS name nor an IP address")),
    }
}

/// Splits and checks "host:port" (IPv6 literals in brackets).
pub fn parse_addr(addr: &str) -> Result<(&str, u16), String> {
    let (host, port) = addr.rsplit_once(':').ok_or_else(|| format!("{addr:?} is not host:port"))?;
    if host.contains(':') && !host.starts_with('[') {
        return Err(format!("{addr:?}: write an IPv6 address in brackets, as [fd00::1]:7750"));
    }
    check_host(host).map_err(|e| format!("{addr:?} {e}"))?;
    let port = port.parse::<u16>().map_err(|_| format!("{addr:?} has port {port:?}, not a number below 65536"))?;
    Ok((host, port))
}

/// "host:port" of an IP and a port (IPv6 in brackets).
pub fn addr_of(ip: std::net::IpAddr, port: u16) -> String {
    std::net::SocketAddr::new(ip, port).to_string()
}

/// The id of a member known only by its address: its host (characters
/// outside `[A-Za-z0-9_.-]` become `-`), with `-PORT` unless the port is
/// [`DEFAULT_PORT`].
pub fn id_for_addr(addr: &str) -> String {
    let (host, port) = addr.rsplit_once(':').unwrap_or((addr, ""));
    let host = host.trim_start_matches('[').trim_end_matches(']').trim_end_matches('.');
    let mut id: String =
        host.chars().map(|c| if c.is_ascii_alphanumeric() || "_.-".contains(c) { c } else { '-' }).collect();
    if port != DEFAULT_PORT.to_string() {
        id.push('-');
        id.push_str(port);
    }
    id
}

/// Checks a node id: 1 to 253 bytes of `[A-Za-z0-9_.-]`.
pub fn validate_node_id(id: &str) -> Result<(), String> {
    let ok = !id.is_empty() && id.len() <= 253 && id.bytes().all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b));
    match ok {
        true => Ok(()),
        false => Err(format!("node id {id:?} is invalid: use 1 to 253 of [A-Za-z0-9_.-]")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn discover_sources_parse_and_name_what_is_wrong() {
        assert_eq!(
            Discover::parse("dns:tierckpt.default.svc.cluster.local").unwrap(),
            Discover::Dns { name: "tierckpt.default.svc.cluster.local".into(), port: DEFAULT_PORT }
        );
        assert_eq!(Discover::parse("dns:peers:7000").unwrap(), Discover::Dns { name: "peers".into(), port: 7000 });
        assert_eq!(
            Discover::parse("srv:_peer._tcp.tierckpt").unwrap(),
            Discover::Srv { name: "_peer._tcp.tierckpt".into() }
        );
        assert_eq!(Discover::parse("slurm").unwrap(), Discover::Slurm { port: DEFAULT_PORT });
        assert_eq!(Discover::parse("file:/etc/m").unwrap(), Discover::File("/etc/m".into()));
        let e = Discover::parse("dns:peers:http").unwrap_err();
        assert!(e.contains("\"http\"") && e.contains("dns:NAME"), "{e}");
        let e = Discover::parse("dns:bad name:1").unwrap_err();
        assert!(e.contains("bad name"), "{e}");
        assert!(Discover::parse("consul:x").unwrap_err().contains("not a source"));
    }

    #[test]
    fn addresses_and_ids() {
        assert_eq!(parse_addr("node0.cluster.local:7750").unwrap(), ("node0.cluster.local", 7750));
        assert_eq!(parse_addr("[fd00::1]:7").unwrap(), ("[fd00::1]", 7));
        assert!(parse_addr("fd00::1:7").unwrap_err().contains("brackets"));
        assert!(parse_addr("node0").unwrap_err().contains("host:port"));
        assert!(parse_addr("no de:1").unwrap_err().contains("neither"));
        assert_eq!(id_for_addr("10.0.0.3:7750"), "10.0.0.3");
        assert_eq!(id_for_addr("127.0.0.1:40001"), "127.0.0.1-40001");
        assert_eq!(id_for_addr("[fd00::1]:7750"), "fd00--1");
        assert_eq!(id_for_addr("gpu7.cluster.:7750"), "gpu7.cluster");
        assert!(validate_node_id("gpu7.cluster").is_ok());
        assert!(validate_node_id("a/b").is_err() && validate_node_id("").is_err());
    }
}

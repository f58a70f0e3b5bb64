//! Resolving a [`Discover`] source into the members it lists now.

use super::{addr_of, expand_nodelist, id_for_addr, parse_addr, validate_node_id, Discover, Node};

/// The members `source` lists now, sorted by id; an error names the source
/// and what failed (an unresolvable name, a missing variable, a bad line).
pub async fn discover(source: &Discover) -> Result<Vec<Node>, String> {
    let mut nodes = match source {
        Discover::Dns { name, port } => {
            let found = tokio::net::lookup_host((name.as_str(), *port))
                .await
                .map_err(|e| format!("discover {source}: cannot resolve {name:?}: {e}"))?;
            found.map(|a| addr_of(a.ip(), a.port())).map(node_of_addr).collect()
        }
        Discover::Srv { name } => srv(name).await.map_err(|e| format!("discover {source}: {e}"))?,
        Discover::Slurm { port } => {
            let list = std::env::var("SLURM_JOB_NODELIST")
                .or_else(|_| std::env::var("SLURM_NODELIST"))
                .map_err(|_| format!("discover {source}: neither SLURM_JOB_NODELIST nor SLURM_NODELIST is set"))?;
            expand_nodelist(&list)?.into_iter().map(|h| node_of_addr(format!("{h}:{port}"))).collect()
        }
        Discover::File(path) => {
            let text = tokio::fs::read_to_string(path)
                .await
                .map_err(|e| format!("discover {source}: reading {}: {e}", path.display()))?;
            parse_members(&text).map_err(|e| format!("discover {source}: {e}"))?
        }
    };
    nodes.sort();
    nodes.dedup_by(|a, b| a.id == b.id);
    Ok(nodes)
}

fn node_of_addr(addr: String) -> Node {
    Node { id: id_for_addr(&addr), addr }
}

/// Lines of `host:port` or `id=host:port`; `#` starts a comment.
fn parse_members(text: &str) -> Result<Vec<Node>, String> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let node = match line.split_once('=') {
            Some((id, addr)) => Node { id: id.trim().to_string(), addr: addr.trim().to_string() },
            None => node_of_addr(line.to_string()),
        };
        parse_addr(&node.addr).map_err(|e| format!("line {}: {e}", i + 1))?;
        validate_node_id(&node.id).map_err(|e| format!("line {}: {e}", i + 1))?;
        out.push(node);
    }
    Ok(out)
}

/// The targets and ports of `name`'s SRV records.
async fn srv(name: &str) -> Result<Vec<Node>, String> {
    let resolver = hickory_resolver::Resolver::builder_tokio()
        .map_err(|e| format!("reading the system's DNS settings: {e}"))?
        .build();
    let found = resolver.srv_lookup(name).await.map_err(|e| format!("no SRV records for {name:?}: {e}"))?;
    Ok(found
        .iter()
        .map(|r| {
            let host = r.target().to_utf8();
            node_of_addr(format!("{}:{}", host.trim_end_matches('.'), r.port()))
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn member_files_name_the_bad_line() {
        let nodes = parse_members("# members\n127.0.0.1:7001\nb=127.0.0.1:7002 # the second\n\n").unwrap();
        assert_eq!(
            nodes,
            [
                Node { id: "127.0.0.1-7001".into(), addr: "127.0.0.1:7001".into() },
                Node { id: "b".into(), addr: "127.0.0.1:7002".into() }
            ]
        );
        let e = parse_members("127.0.0.1:7001\nnode3\n").unwrap_err();
        assert!(e.contains("line 2") && e.contains("node3"), "{e}");
        assert!(parse_members("a/b=h:1").unwrap_err().contains("line 1"));
    }

    #[tokio::test]
    async fn dns_names_resolve_and_unresolvable_ones_are_named() {
        let found = discover(&Discover::Dns { name: "localhost".into(), port: 7001 }).await.unwrap();
        assert!(found.iter().any(|n| n.addr == "127.0.0.1:7001" && n.id == "127.0.0.1-7001"), "{found:?}");
        let e = discover(&Discover::Dns { name: "no-such-host.invalid".into(), port: 1 }).await.unwrap_err();
        assert!(e.contains("no-such-host.invalid"), "{e}");
    }
}

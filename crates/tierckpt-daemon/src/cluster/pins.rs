//! Forwarding pins to the members, so that every node holding a copy of a
//! pinned step keeps it (see `crate::pins`).

use hyper::Method;
use tierckpt_proto::NodeState;

use super::Cluster;

impl Cluster {
    /// Pins (`pin`) or unpins `step` of `ns` on every other member; returns
    /// those not reached, with why (best effort: a member that is down keeps
    /// its copies by its own retention).
    pub async fn pin_on_peers(&self, ns: &str, step: u64, name: Option<&str>, pin: bool) -> Vec<String> {
        let (method, query) = match (pin, name) {
            (true, Some(n)) => (Method::POST, format!("?name={n}")),
            (true, None) => (Method::POST, String::new()),
            (false, _) => (Method::DELETE, String::new()),
        };
        let path = format!("/v1/peer/pins/{ns}/{step}{query}");
        let calls = self.peers_now().into_iter().map(|(id, addr, state)| {
            let (method, path) = (method.clone(), path.clone());
            async move {
                if state == NodeState::Dead {
                    return Some(format!("{id} (dead)"));
                }
                match self.peers.json(&addr, method, &path).await {
                    Ok(_) => None,
                    Err(e) => {
                        tracing::warn!(node = %id, namespace = ns, step, error = %e, "a member did not take a pin");
                        Some(format!("{id} ({e})"))
                    }
                }
            }
        });
        futures_util::future::join_all(calls).await.into_iter().flatten().collect()
    }
}

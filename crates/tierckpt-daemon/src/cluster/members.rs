//! The runtime member set: who is in the cluster now (from the configured
//! list or discovery, from nodes that made themselves known, and from
//! gossip), in placement order, with each member's health.
//!
//! Order: members listed in the configuration first, in their order; then
//! every other member by id. Every node with the same member set computes
//! the same order, so placement agrees without coordination.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use tierckpt_proto::{Holdings, MemberSeen, NodeState};

use crate::membership::Node;

/// A left node's incarnation is remembered this long, so that gossip from
/// nodes that have not heard of the leave yet does not bring it back.
const LEFT_REMEMBERED: Duration = Duration::from_secs(600);

/// One member and what this node knows of it.
pub(super) struct Member {
    pub(super) id: String,
    pub(super) addr: String,
    /// When it started (Unix ms), 0 until heard from.
    pub(super) incarnation: u64,
    pub(super) state: NodeState,
    /// The last direct answer.
    pub(super) last_ok: Option<Instant>,
    /// The freshest news of it, direct or gossiped (Unix ms).
    pub(super) last_seen_unix_ms: Option<u64>,
    /// The last probe was answered (or, if not probed lately, gossip says
    /// it is alive); only such nodes count in the view.
    pub(super) reachable: bool,
    /// When a node back from suspect or dead may be pushed to again: one
    /// heartbeat after it first answered (it may still be working off what
    /// piled up while it was silent, such as a push cut off then).
    pub(super) settled_at: Option<Instant>,
    pub(super) holdings: Option<Holdings>,
    /// Why the last direct probe failed, while it fails.
    pub(super) last_error: Option<String>,
    /// Listed by the configuration or the discovery source.
    pub(super) configured: bool,
}

impl Member {
    fn new(node: &Node, configured: bool) -> Self {
        Self {
            id: node.id.clone(),
            addr: node.addr.clone(),
            incarnation: 0,
            state: NodeState::Unknown,
            last_ok: None,
            last_seen_unix_ms: None,
            reachable: false,
            settled_at: None,
            holdings: None,
            last_error: None,
            configured,
        }
    }

    /// What gossip says of it.
    pub(super) fn seen(&self) -> MemberSeen {
        MemberSeen {
            id: self.id.clone(),
            addr: self.addr.clone(),
            incarnation: self.incarnation,
            last_seen_unix_ms: self.last_seen_unix_ms,
        }
    }
}

/// The member set of one node.
pub(super) struct Members {
    /// In placement order; this node included.
    pub(super) list: Vec<Member>,
    /// Ids in the configured static list, in its order.
    static_order: Vec<String>,
    /// Nodes that left: their incarnation and when they said so.
    left: BTreeMap<String, (u64, Instant)>,
    /// Peers whose member list differs from this node's, and how.
    pub(super) disagreements: BTreeMap<String, String>,
    /// The last discovery failure, if the last read failed.
    pub(super) discovery_error: Option<String>,
}

impl Members {
    /// The configured members (or just this node, before discovery).
    pub(super) fn new(me: &MemberSeen, configured: &[Node]) -> Self {
        let mut m = Self {
            list: Vec::new(),
            static_order: configured.iter().map(|n| n.id.clone()).collect(),
            left: BTreeMap::new(),
            disagreements: BTreeMap::new(),
            discovery_error: None,
        };
        m.set_configured(configured);
        if m.index(&me.id).is_none() {
            m.list.push(Member::new(&Node { id: me.id.clone(), addr: me.addr.clone() }, true));
        }
        let i = m.index(&me.id).expect("added");
        let mine = &mut m.list[i];
        (mine.state, mine.reachable, mine.incarnation, mine.addr) =
            (NodeState::Alive, true, me.incarnation, me.addr.clone());
        m.sort();
        m
    }

    /// Position of `id` in placement order.
    pub(super) fn index(&self, id: &str) -> Option<usize> {
        self.list.iter().position(|m| m.id == id)
    }

    /// The member `id`.
    pub(super) fn get(&self, id: &str) -> Option<&Member> {
        self.list.iter().find(|m| m.id == id)
    }

    /// The member `id`, to update.
    pub(super) fn get_mut(&mut self, id: &str) -> Option<&mut Member> {
        self.list.iter_mut().find(|m| m.id == id)
    }

    /// Member ids in placement order.
    pub(super) fn order(&self) -> Vec<String> {
        self.list.iter().map(|m| m.id.clone()).collect()
    }

    fn sort(&mut self) {
        let pos = |id: &str| self.static_order.iter().position(|s| s == id).unwrap_or(usize::MAX);
        let mut keyed: Vec<(usize, Member)> = self.list.drain(..).map(|m| (pos(&m.id), m)).collect();
        keyed.sort_by(|(pa, a), (pb, b)| pa.cmp(pb).then_with(|| a.id.cmp(&b.id)));
        self.list = keyed.into_iter().map(|(_, m)| m).collect();
    }

    /// Takes the members the source lists now: new ones are added, known
    /// ones get their listed address; members it no longer lists stay
    /// while they answer (and go once dead, see [`Members::forget_dead`]).
    /// Returns the ids added.
    pub(super) fn set_configured(&mut self, nodes: &[Node]) -> Vec<String> {
        let mut added = Vec::new();
        for m in &mut self.list {
            m.configured = false;
        }
        for n in nodes {
            // A member heard from under its own id at that address already
            // (discovery knows addresses, not ids).
            if let Some(m) = self.list.iter_mut().find(|m| m.addr == n.addr && m.id != n.id && m.incarnation != 0) {
                m.configured = true;
                continue;
            }
            let left = self.left.contains_key(&n.id);
            match self.get_mut(&n.id) {
                Some(m) => {
                    m.configured = true;
                    if m.addr != n.addr && m.incarnation == 0 {
                        m.addr = n.addr.clone();
                    }
                }
                None if !left => {
                    self.list.push(Member::new(n, true));
                    added.push(n.id.clone());
                }
                None => {}
            }
        }
        self.sort();
        added
    }

    /// A node made itself known (it probed us, or gossip names it, fresh):
    /// added if new, its address and incarnation updated if it restarted;
    /// ignored if that incarnation left. Returns whether it was added.
    pub(super) fn heard_of(&mut self, seen: &MemberSeen, direct: bool) -> bool {
        let now = Instant::now();
        self.left.retain(|_, (_, at)| now.duration_since(*at) < LEFT_REMEMBERED);
        if self.left.get(&seen.id).is_some_and(|(inc, _)| seen.incarnation <= *inc) {
            return false;
        }
        self.left.remove(&seen.id);
        let added = match self.get_mut(&seen.id) {
            Some(m) => {
                if seen.incarnation > m.incarnation {
                    // A restart (not the first we hear of its incarnation):
                    // what it held before is gone.
                    if m.incarnation != 0 {
                        if m.addr != seen.addr {
                            tracing::info!(node = %seen.id, from = %m.addr, to = %seen.addr, "a member restarted under a new address");
                        }
                        m.holdings = None;
                    }
                    m.incarnation = seen.incarnation;
                    m.addr = seen.addr.clone();
                }
                if m.state == NodeState::Left {
                    m.state = NodeState::Unknown;
                }
                false
            }
            None => {
                let mut m = Member::new(&Node { id: seen.id.clone(), addr: seen.addr.clone() }, false);
                m.incarnation = seen.incarnation;
                self.list.push(m);
                self.sort();
                true
            }
        };
        if direct {
            let m = self.get_mut(&seen.id).expect("present");
            m.last_seen_unix_ms = m.last_seen_unix_ms.max(Some(tierckpt_tiers::now_unix_ms()));
        }
        added
    }

    /// Probing discovered member `id` reached a node that calls itself
    /// `real`: the entry takes that node's id (ids come from the nodes,
    /// addresses from discovery). False for a listed member (a
    /// misconfiguration, left to show as unreachable).
    pub(super) fn rename_discovered(&mut self, id: &str, real: &MemberSeen) -> bool {
        if self.static_order.iter().any(|s| s == id) || real.id == id {
            return false;
        }
        self.list.retain(|m| m.id != id);
        self.heard_of(real, true);
        if let Some(m) = self.get_mut(&real.id) {
            m.configured = true;
        }
        true
    }

    /// `id` (at `incarnation`) left gracefully: it is dropped from the set.
    pub(super) fn leave(&mut self, id: &str, incarnation: u64) -> bool {
        self.left.insert(id.to_string(), (incarnation, Instant::now()));
        let before = self.list.len();
        self.list.retain(|m| m.id != id || m.incarnation > incarnation);
        before != self.list.len()
    }

    /// Drops members no source lists any more once they are dead; returns
    /// their ids.
    pub(super) fn forget_dead(&mut self) -> Vec<String> {
        let gone: Vec<String> =
            self.list.iter().filter(|m| !m.configured && m.state == NodeState::Dead).map(|m| m.id.clone()).collect();
        self.list.retain(|m| !gone.contains(&m.id));
        gone
    }

    /// Notes how `peer`'s member list (its gossip) differs from this one.
    pub(super) fn compare(&mut self, peer: &str, theirs: &[MemberSeen]) {
        let ours: Vec<&str> = self.list.iter().map(|m| m.id.as_str()).collect();
        let theirs_ids: Vec<&str> = theirs.iter().map(|m| m.id.as_str()).collect();
        let missing: Vec<&str> = ours.iter().copied().filter(|id| !theirs_ids.contains(id)).collect();
        let extra: Vec<&str> = theirs_ids.iter().copied().filter(|id| !ours.contains(id)).collect();
        if theirs.is_empty() || (missing.is_empty() && extra.is_empty()) {
            self.disagreements.remove(peer);
            return;
        }
        let what = format!(
            "node {peer} lists members {theirs_ids:?}: it lacks {missing:?} and has {extra:?} that this node lacks"
        );
        if self.disagreements.get(peer) != Some(&what) {
            tracing::warn!(node = peer, lacks = ?missing, extra = ?extra, "member lists disagree");
        }
        self.disagreements.insert(peer.to_string(), what);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(id: &str) -> Node {
        Node { id: id.into(), addr: format!("{id}:7750") }
    }

    fn seen(id: &str, incarnation: u64) -> MemberSeen {
        MemberSeen { id: id.into(), addr: format!("{id}.new:7750"), incarnation, last_seen_unix_ms: None }
    }

    #[test]
    fn joins_leaves_and_restarts() {
        let me = MemberSeen { id: "b".into(), addr: "b:7750".into(), incarnation: 1, last_seen_unix_ms: None };
        let mut m = Members::new(&me, &[node("c"), node("b"), node("a")]);
        assert_eq!(m.order(), ["c", "b", "a"], "the configured order");
        assert!(m.heard_of(&seen("d", 5), true));
        assert!(m.heard_of(&seen("aa", 5), true));
        assert_eq!(m.order(), ["c", "b", "a", "aa", "d"], "joined nodes after the list, by id");
        assert!(m.leave("d", 5));
        assert!(!m.heard_of(&seen("d", 5), false), "gossip does not bring back a node that left");
        assert!(m.heard_of(&seen("d", 6), true), "its next incarnation joins again");
        // "a" restarts under a new address: what it held is forgotten, but
        // not when its incarnation is first heard of.
        m.get_mut("a").unwrap().holdings = Some(Holdings::default());
        m.heard_of(&seen("a", 1), true);
        assert!(m.get("a").unwrap().holdings.is_some(), "the first incarnation heard of keeps the holdings");
        m.heard_of(&seen("a", 9), true);
        assert_eq!(m.get("a").unwrap().addr, "a.new:7750");
        assert!(m.get("a").unwrap().holdings.is_none(), "a restart drops what it held");
        // Discovery lists an address under a made-up id; the node there calls itself "e".
        m.set_configured(&[node("c"), node("b"), node("a"), Node { id: "10.0.0.9".into(), addr: "e.new:7750".into() }]);
        assert!(m.rename_discovered("10.0.0.9", &seen("e", 3)));
        m.set_configured(&[node("c"), node("b"), node("a"), Node { id: "10.0.0.9".into(), addr: "e.new:7750".into() }]);
        assert!(m.get("10.0.0.9").is_none() && m.get("e").is_some_and(|e| e.configured), "{:?}", m.order());
        assert!(!m.rename_discovered("a", &seen("x", 1)), "a listed member keeps its id");
        m.leave("e", 3);
        m.get_mut("aa").unwrap().state = NodeState::Dead;
        assert_eq!(m.forget_dead(), ["aa"]);
        assert_eq!(m.order(), ["c", "b", "a", "d"]);
    }

    #[test]
    fn disagreements_are_named_and_cleared() {
        let me = MemberSeen { id: "a".into(), addr: "a:7750".into(), incarnation: 1, last_seen_unix_ms: None };
        let mut m = Members::new(&me, &[node("a"), node("b")]);
        m.compare("b", &[seen("b", 1), seen("z", 1)]);
        let d = &m.disagreements["b"];
        assert!(d.contains("[\"a\"]") && d.contains("[\"z\"]"), "{d}");
        m.compare("b", &[seen("a", 1), seen("b", 1)]);
        assert!(m.disagreements.is_empty());
    }
}

//! Pinned and named steps. A pin keeps a step from retention on every tier
//! that holds it: this node's memory tier (memory pressure evicts it last,
//! as the drain's pin), the peers' copies (the pin is forwarded to every
//! member, best effort) and the persistent tier (a pin object in the store,
//! `<ns>/pins/<step:020>.json`, that the store's retention skips). A step
//! may carry names (`best`, `pre-spike-1200`); a name is on one step at a
//! time and pinning it on another moves it there (like `git tag -f`); the
//! step it left stays pinned. Unpinning by name unpins the step it names.
//!
//! This node's pins live in `<memory dir>/pins.json`, so they survive a
//! restart of the daemon (given to the memory tier at open, before its
//! retention runs). Deleting a step here (`tierckpt rm`) forgets its pins.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use tierckpt_format::names::validate_namespace;
use tierckpt_proto::{validate_pin_name, NamespaceSummary, PinInfo};
use tierckpt_tiers::private_fs::Access;
use tierckpt_tiers::{ErrorKind, Result, TierError};

use crate::record::JsonRecord;
use crate::Daemon;

/// Pinned steps and their names, by namespace.
type PinMap = BTreeMap<String, BTreeMap<u64, BTreeSet<String>>>;

/// A pin's names now and, when its name moved from another step, that step
/// and the names it has left.
pub(crate) type Added = (BTreeSet<String>, Option<(u64, BTreeSet<String>)>);

/// This node's pins, recorded in the memory directory.
pub struct Pins {
    rec: JsonRecord<PinMap>,
}

impl Pins {
    /// The pins kept in `memory_dir`; a missing or unreadable file is none.
    pub fn open(memory_dir: &Path, access: Access) -> Self {
        Self { rec: JsonRecord::open(memory_dir, "pins.json", access, "pinned steps") }
    }

    /// Every pinned step, by namespace (for the memory tier at open).
    pub fn steps(&self) -> BTreeMap<String, BTreeSet<u64>> {
        self.rec.lock().iter().map(|(ns, p)| (ns.clone(), p.keys().copied().collect())).collect()
    }

    /// The pinned steps of `ns` with their names.
    pub fn of(&self, ns: &str) -> BTreeMap<u64, BTreeSet<String>> {
        self.rec.lock().get(ns).cloned().unwrap_or_default()
    }

    /// Pins `step`, adding `name` to it; returns its names now and, when the
    /// name moved from another step, that step and its names left.
    fn add(&self, ns: &str, step: u64, name: Option<&str>) -> Added {
        let mut all = self.rec.lock();
        let pins = all.entry(ns.to_string()).or_default();
        let mut moved = None;
        if let Some(n) = name {
            for (s, names) in pins.iter_mut() {
                if *s != step && names.remove(n) {
                    moved = Some((*s, names.clone()));
                }
            }
        }
        let names = pins.entry(step).or_default();
        names.extend(name.map(String::from));
        let now = names.clone();
        self.rec.save(&all);
        (now, moved)
    }

    /// Forgets the pins of a deleted step (`None`: of the whole namespace).
    fn forget(&self, ns: &str, step: Option<u64>) -> Vec<u64> {
        let mut all = self.rec.lock();
        let gone: Vec<u64> = match (all.get_mut(ns), step) {
            (None, _) => return Vec::new(),
            (Some(p), Some(s)) => p.remove(&s).map(|_| s).into_iter().collect(),
            (Some(p), None) => std::mem::take(p).into_keys().collect(),
        };
        if all.get(ns).is_some_and(|p| p.is_empty()) {
            all.remove(ns);
        }
        if !gone.is_empty() {
            self.rec.save(&all);
        }
        gone
    }

    /// Unpins `step`; its names if it was pinned.
    fn remove(&self, ns: &str, step: u64) -> Option<BTreeSet<String>> {
        let mut all = self.rec.lock();
        let pins = all.get_mut(ns)?;
        let names = pins.remove(&step)?;
        if pins.is_empty() {
            all.remove(ns);
        }
        self.rec.save(&all);
        Some(names)
    }
}

fn check_name(name: Option<&str>) -> Result<()> {
    match name {
        Some(n) => validate_pin_name(n).map_err(TierError::InvalidArgument),
        None => Ok(()),
    }
}

impl Daemon {
    /// Pins `step` of `ns` on this node only (a peer's forwarded pin, and
    /// the local part of [`Daemon::pin`]); returns what [`Pins::add`] does.
    pub(crate) fn pin_here(&self, ns: &str, step: u64, name: Option<&str>) -> Result<Added> {
        validate_namespace(ns)?;
        check_name(name)?;
        self.tier.pin(ns, step)?;
        let r = self.pins.add(ns, step, name);
        tracing::info!(namespace = ns, step, ?name, "pinned a step");
        Ok(r)
    }

    /// Unpins `step` of `ns` on this node only; whether it was pinned.
    pub(crate) fn unpin_here(&self, ns: &str, step: u64) -> Result<bool> {
        validate_namespace(ns)?;
        let was = self.pins.remove(ns, step).is_some();
        self.tier.unpin(ns, step)?;
        if was {
            tracing::info!(namespace = ns, step, "unpinned a step");
        }
        Ok(was)
    }

    /// A step (`None`: the namespace) was deleted here: its pins go too,
    /// so that no name points at a step this node no longer holds. (The
    /// store's pins stay with the store's copies, which a delete keeps.)
    pub(crate) fn forget_pins(&self, ns: &str, step: Option<u64>) {
        for s in self.pins.forget(ns, step) {
            let _ = self.tier.unpin(ns, s);
        }
    }

    /// This node's namespaces, each with the steps pinned here (status,
    /// listings).
    pub fn namespaces(&self) -> Vec<NamespaceSummary> {
        let mut pinned = self.pins.steps();
        let mut all = self.tier.namespaces();
        for n in &mut all {
            n.pinned = pinned.remove(&n.namespace).unwrap_or_default().into_iter().collect();
        }
        all
    }

    /// The tiers that hold `step` of `ns` for this node.
    async fn tiers_holding(&self, ns: &str, steps: &BTreeSet<u64>) -> BTreeMap<u64, Vec<String>> {
        let mut out: BTreeMap<u64, Vec<String>> = steps.iter().map(|s| (*s, Vec::new())).collect();
        for s in self.tier.steps(ns).unwrap_or_default() {
            if let Some(t) = out.get_mut(&s.step) {
                t.push("memory".into());
            }
        }
        if let Some(d) = &self.drainer {
            match d.store.steps(ns).await {
                Ok(stored) => {
                    for s in stored.into_iter().filter(|s| s.committed) {
                        if let Some(t) = out.get_mut(&s.step) {
                            t.push("persistent".into());
                        }
                    }
                }
                Err(e) => tracing::warn!(namespace = ns, error = %e, "the persistent tier did not list its steps"),
            }
        }
        out
    }

    /// Pins `step` of `ns`, held in this node's memory or in the persistent
    /// tier, here, on every member and in the store (`node_only`: here, in
    /// memory, only); with `name`, names it (moving the name from another
    /// step). Returns the pin and the members (or the store) that could not
    /// be told.
    pub async fn pin(
        &self,
        ns: &str,
        step: u64,
        name: Option<String>,
        node_only: bool,
    ) -> Result<(PinInfo, Vec<String>)> {
        validate_namespace(ns)?;
        check_name(name.as_deref())?;
        if node_only {
            if !self.tier.steps(ns).unwrap_or_default().iter().any(|s| s.step == step) {
                return Err(TierError::NotFound(format!(
                    "{ns}/step {step} to pin on this node alone: it is not in this node's memory"
                )));
            }
            let (names, _) = self.pin_here(ns, step, name.as_deref())?;
            let tiers = vec!["memory".to_string()];
            return Ok((PinInfo { step, names: names.into_iter().collect(), tiers }, Vec::new()));
        }
        let tiers = self.tiers_holding(ns, &BTreeSet::from([step])).await.remove(&step).unwrap_or_default();
        if tiers.is_empty() {
            let persistent = if self.drainer.is_some() { " nor in the persistent tier" } else { "" };
            return Err(TierError::NotFound(format!(
                "{ns}/step {step} to pin: it is not in this node's memory{persistent}; pin a step `tierckpt ls {ns}` lists"
            )));
        }
        let (names, moved) = self.pin_here(ns, step, name.as_deref())?;
        let mut not_reached = Vec::new();
        if let Some(d) = &self.drainer {
            let mut writes = vec![(step, names.clone())];
            writes.extend(moved);
            for (s, n) in writes {
                let n: Vec<String> = n.into_iter().collect();
                if let Err(e) = d.store.put_pin(ns, s, &n).await {
                    not_reached.push(format!("the persistent tier ({e})"));
                }
            }
        }
        if let Some(c) = &self.cluster {
            not_reached.extend(c.pin_on_peers(ns, step, name.as_deref(), true).await);
        }
        Ok((PinInfo { step, names: names.into_iter().collect(), tiers }, not_reached))
    }

    /// The step of `ns` named `name`: pinned here, or recorded in the store.
    pub async fn resolve(&self, ns: &str, name: &str) -> Result<u64> {
        validate_namespace(ns)?;
        check_name(Some(name))?;
        if let Some((s, _)) = self.pins.of(ns).into_iter().find(|(_, n)| n.contains(name)) {
            return Ok(s);
        }
        if let Some(d) = &self.drainer {
            if let Some((s, _)) = d.store.pins(ns).await?.into_iter().find(|(_, n)| n.iter().any(|x| x == name)) {
                return Ok(s);
            }
        }
        Err(TierError::NotFound(format!("no step of {ns} is named {name:?}; `tierckpt ls {ns}` lists the names")))
    }

    /// Unpins a step of `ns`, given by number or by name (exactly one), here,
    /// on every member and in the store.
    pub async fn unpin(&self, ns: &str, step: Option<u64>, name: Option<String>) -> Result<(PinInfo, Vec<String>)> {
        validate_namespace(ns)?;
        let step = match (step, name) {
            (Some(s), None) => s,
            (None, Some(n)) => self.resolve(ns, &n).await?,
            _ => {
                return Err(TierError::InvalidArgument(format!("unpin of {ns} takes exactly one of a step and a name")))
            }
        };
        let here = self.unpin_here(ns, step)?;
        let mut not_reached = Vec::new();
        let mut stored = false;
        if let Some(d) = &self.drainer {
            match d.store.pins(ns).await {
                Ok(p) => stored = p.contains_key(&step),
                Err(e) => not_reached.push(format!("the persistent tier ({e})")),
            }
            if let Err(e) = d.store.remove_pin(ns, step).await {
                not_reached.push(format!("the persistent tier ({e})"));
            }
        }
        if !here && !stored && not_reached.is_empty() {
            return Err(TierError::NotFound(format!("a pin of {ns}/step {step}: it is not pinned")));
        }
        if let Some(c) = &self.cluster {
            not_reached.extend(c.pin_on_peers(ns, step, None, false).await);
        }
        let tiers = self.tiers_holding(ns, &BTreeSet::from([step])).await.remove(&step).unwrap_or_default();
        Ok((PinInfo { step, names: Vec::new(), tiers }, not_reached))
    }

    /// The pinned steps of `ns`: this node's and the store's, oldest first.
    pub async fn list_pins(&self, ns: &str) -> Result<Vec<PinInfo>> {
        validate_namespace(ns)?;
        let mut all = self.pins.of(ns);
        if let Some(d) = &self.drainer {
            match d.store.pins(ns).await {
                Ok(p) => {
                    for (s, names) in p {
                        all.entry(s).or_default().extend(names);
                    }
                }
                Err(e) if e.kind() == ErrorKind::NotFound => {}
                Err(e) => tracing::warn!(namespace = ns, error = %e, "the persistent tier did not list its pins"),
            }
        }
        let mut tiers = self.tiers_holding(ns, &all.keys().copied().collect()).await;
        Ok(all
            .into_iter()
            .map(|(step, names)| PinInfo {
                step,
                names: names.into_iter().collect(),
                tiers: tiers.remove(&step).unwrap_or_default(),
            })
            .collect())
    }
}

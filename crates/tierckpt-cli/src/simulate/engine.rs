//! The seeded discrete-event loop: a job advances step by step; checkpoints
//! stall it for their blocking cost and become usable on a tier after its
//! lag; failures (Poisson, or a fixed schedule) roll it back to the newest
//! checkpoint that survives them, and cost detection, restart and restore.

use tierckpt_harness::rng::Rng;

use super::params::Kind;

/// One tier a strategy checkpoints to.
#[derive(Debug, Clone)]
pub struct Tier {
    /// Its name in reports.
    pub name: &'static str,
    /// Checkpoint every this many steps.
    pub every: u64,
    /// Seconds training waits per checkpoint to this tier.
    pub stall_s: f64,
    /// Seconds after the stall until the copy is usable (copied in the background).
    pub lag_s: f64,
    /// Whether the copy survives each kind of failure.
    pub survives: [bool; 3],
    /// Seconds to restore from it after each kind of failure.
    pub restore_s: [f64; 3],
    /// Bytes each node sends over the network per checkpoint.
    pub net_bytes_per_node: f64,
}

/// A strategy as the engine sees it.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Its tiers, fastest first.
    pub tiers: Vec<Tier>,
    /// Seconds from a failure to restarted, before the restore, by kind.
    pub restart_s: [f64; 3],
}

/// Where failures come from.
#[derive(Debug, Clone)]
pub enum Schedule {
    /// Poisson processes: job-wide rates per second by kind, and stragglers.
    Poisson {
        /// Failures per second, by kind.
        rates: [f64; 3],
        /// Stragglers per second.
        straggler_rate: f64,
        /// A straggler's step time over the normal one.
        slowdown: f64,
        /// Seconds a straggler lasts.
        straggler_s: f64,
    },
    /// Failures right after the given steps complete (each fires once).
    Fixed(Vec<(u64, Kind)>),
}

/// What one simulated run spent its time on.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Outcome {
    /// Wall time of the job.
    pub wall_s: f64,
    /// Time of the steps that counted (steps x step time).
    pub useful_s: f64,
    /// Time training waited for checkpoints.
    pub stall_s: f64,
    /// Time of work done and then lost to failures.
    pub lost_s: f64,
    /// Time from failures to training again.
    pub recovery_s: f64,
    /// Extra time of steps slowed by stragglers.
    pub straggler_s: f64,
    /// Failures by kind.
    pub failures: [u64; 3],
    /// Failures by the tier restored from (index into the plan's tiers; last = none).
    pub restored_from: Vec<u64>,
    /// Checkpoints taken, by tier.
    pub checkpoints: Vec<u64>,
    /// Bytes each node sent for checkpoints.
    pub net_bytes_per_node: f64,
    /// Steps recomputed after each failure, in order.
    pub recomputed: Vec<u64>,
}

impl Outcome {
    /// Useful time over wall time.
    pub fn goodput(&self) -> f64 {
        if self.wall_s > 0.0 {
            self.useful_s / self.wall_s
        } else {
            1.0
        }
    }
}

/// An exponential variate of `rate` per second (infinite when the rate is 0).
fn exp(rng: &mut Rng, rate: f64) -> f64 {
    if rate <= 0.0 {
        return f64::INFINITY;
    }
    let u = ((rng.next_u64() >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
    -u.ln() / rate
}

/// The kind of a failure, drawn by the rates' weights.
fn pick(rng: &mut Rng, rates: &[f64; 3]) -> Kind {
    let total: f64 = rates.iter().sum();
    let mut x = ((rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64) * total;
    for k in Kind::ALL {
        if x < rates[k.index()] {
            return k;
        }
        x -= rates[k.index()];
    }
    Kind::RackLoss
}

/// The state of one run.
struct Run<'a> {
    plan: &'a Plan,
    step_s: f64,
    t: f64,
    step: u64,
    /// Newest usable checkpoint step per tier.
    last: Vec<u64>,
    /// A copy in flight per tier: (step, usable at).
    pending: Vec<Option<(u64, f64)>>,
    out: Outcome,
}

impl Run<'_> {
    fn settle(&mut self) {
        for (last, p) in self.last.iter_mut().zip(&mut self.pending) {
            if let Some((s, at)) = *p {
                if at <= self.t {
                    *last = (*last).max(s);
                    *p = None;
                }
            }
        }
    }

    /// After step `self.step` completes: the checkpoints due, one stall (the largest).
    // `u64::is_multiple_of` needs Rust 1.87; the workspace supports 1.85.
    #[allow(clippy::manual_is_multiple_of)]
    fn checkpoint(&mut self) {
        self.settle();
        let mut stall: f64 = 0.0;
        let mut due = Vec::new();
        for (i, tier) in self.plan.tiers.iter().enumerate() {
            // A tier still copying the previous checkpoint skips this one.
            if self.step % tier.every == 0 && self.pending[i].is_none() {
                stall = stall.max(tier.stall_s);
                due.push(i);
            }
        }
        self.t += stall;
        self.out.stall_s += stall;
        for i in due {
            let tier = &self.plan.tiers[i];
            self.pending[i] = Some((self.step, self.t + tier.lag_s));
            self.out.checkpoints[i] += 1;
            self.out.net_bytes_per_node += tier.net_bytes_per_node;
        }
        self.settle();
    }

    /// A failure of `kind` now, `partial_s` into a step.
    fn fail(&mut self, kind: Kind, partial_s: f64) {
        self.settle();
        let k = kind.index();
        self.out.failures[k] += 1;
        // The newest surviving checkpoint; among tiers holding it, the fastest restore.
        let mut best: Option<(u64, f64, usize)> = None;
        for (i, tier) in self.plan.tiers.iter().enumerate() {
            if !tier.survives[k] {
                continue;
            }
            let cand = (self.last[i], tier.restore_s[k], i);
            best = match best {
                Some(b) if b.0 > cand.0 || (b.0 == cand.0 && b.1 <= cand.1) => Some(b),
                _ => Some(cand),
            };
        }
        let (resumed, restore_s, from) = best.unwrap_or((0, 0.0, self.plan.tiers.len()));
        self.out.restored_from[from] += 1;
        let redo = self.step - resumed;
        self.out.recomputed.push(redo);
        let lost = redo as f64 * self.step_s + partial_s;
        self.out.lost_s += lost;
        self.out.useful_s -= redo as f64 * self.step_s;
        let rec = self.plan.restart_s[k] + restore_s;
        self.out.recovery_s += rec;
        self.t += rec;
        self.step = resumed;
        for (i, last) in self.last.iter_mut().enumerate() {
            *last = (*last).min(resumed);
            if self.pending[i].is_some_and(|(s, _)| s > resumed || !self.plan.tiers[i].survives[k]) {
                self.pending[i] = None;
            }
        }
    }
}

/// Runs a job of `steps` steps of `step_s` under `schedule` with `plan`.
pub fn simulate(plan: &Plan, steps: u64, step_s: f64, schedule: &Schedule, seed: u64) -> Outcome {
    let n = plan.tiers.len();
    let mut run = Run {
        plan,
        step_s,
        t: 0.0,
        step: 0,
        last: vec![0; n],
        pending: vec![None; n],
        out: Outcome { restored_from: vec![0; n + 1], checkpoints: vec![0; n], ..Outcome::default() },
    };
    // Separate streams: the i-th failure's gap and kind are the same for every
    // plan under one seed (common random numbers), whatever the stragglers do.
    let mut rng = Rng::seeded(seed);
    let mut slow_rng = Rng::seeded(seed ^ 0x5354_5241_4747_4c45);
    let (rates, straggler_rate, slowdown, straggler_s) = match schedule {
        Schedule::Poisson { rates, straggler_rate, slowdown, straggler_s } => {
            (*rates, *straggler_rate, *slowdown, *straggler_s)
        }
        Schedule::Fixed(_) => ([0.0; 3], 0.0, 1.0, 0.0),
    };
    let total: f64 = rates.iter().sum();
    let mut fixed: Vec<(u64, Kind)> = match schedule {
        Schedule::Fixed(f) => f.iter().rev().copied().collect(),
        Schedule::Poisson { .. } => Vec::new(),
    };
    let mut next_fail = exp(&mut rng, total);
    let mut next_straggler = exp(&mut slow_rng, straggler_rate);
    let mut slow_until = 0.0;
    while run.step < steps {
        while next_straggler <= run.t {
            slow_until = f64::max(slow_until, next_straggler) + straggler_s;
            next_straggler += exp(&mut slow_rng, straggler_rate);
        }
        let dur = if run.t < slow_until { step_s * slowdown } else { step_s };
        if run.t + dur > next_fail {
            // A failure during the last stall strikes as the next step begins.
            let at = next_fail.max(run.t);
            let partial = at - run.t;
            run.t = at;
            run.fail(pick(&mut rng, &rates), partial);
            next_fail = run.t + exp(&mut rng, total);
            continue;
        }
        run.t += dur;
        run.out.straggler_s += dur - step_s;
        run.out.useful_s += step_s;
        run.step += 1;
        if let Some(&(at, kind)) = fixed.last() {
            if at == run.step {
                fixed.pop();
                run.fail(kind, 0.0);
                continue;
            }
        }
        run.checkpoint();
    }
    run.out.wall_s = run.t;
    run.out
}

/// Daly's higher-order optimum checkpoint interval (seconds of work between
/// checkpoints) for blocking cost `d` and mean time between failures `m`.
pub fn daly(d: f64, m: f64) -> f64 {
    if !m.is_finite() {
        return f64::INFINITY;
    }
    if d >= 2.0 * m {
        return m;
    }
    let x = d / (2.0 * m);
    (2.0 * d * m).sqrt() * (1.0 + x.sqrt() / 3.0 + x / 9.0) - d
}

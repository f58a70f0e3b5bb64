//! The workloads of `bench reduce`, generated in the run: bf16 weights with
//! fp32 Adam moments that take real Adam steps, an embedding table of which
//! a few rows change, and random bytes.

use std::collections::BTreeMap;

use anyhow::{bail, Result};
use tierckpt_format::{Dtype, ShardLayout, TensorSpec};
use tierckpt_harness::rng::Rng;

use super::{EMBEDDING_TARGET_RATIO, FROZEN_TARGET_RATIO};

/// A kind of training state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Workload {
    FinetuneFrozen,
    FullAdam,
    Embedding,
    Random,
}

impl Workload {
    /// The target for the delta's bytes over the full size, if any.
    pub(super) fn target_ratio(self) -> Option<f64> {
        match self {
            Workload::FinetuneFrozen => Some(FROZEN_TARGET_RATIO),
            Workload::Embedding => Some(EMBEDDING_TARGET_RATIO),
            _ => None,
        }
    }

    const ALL: [Workload; 4] = [Workload::FinetuneFrozen, Workload::FullAdam, Workload::Embedding, Workload::Random];

    /// The workloads a `--workloads` list names, in the usual order.
    pub(super) fn selected(list: Option<&str>) -> Result<Vec<Workload>> {
        let Some(list) = list else { return Ok(Self::ALL.to_vec()) };
        let names: Vec<&str> = list.split(',').map(str::trim).collect();
        if let Some(bad) = names.iter().find(|n| !Self::ALL.iter().any(|w| w.name() == **n)) {
            let known: Vec<&str> = Self::ALL.iter().map(|w| w.name()).collect();
            bail!("--workloads: unknown workload {bad:?}; known: {}", known.join(", "));
        }
        Ok(Self::ALL.into_iter().filter(|w| names.contains(&w.name())).collect())
    }

    pub(super) fn name(self) -> &'static str {
        match self {
            Workload::FinetuneFrozen => "finetune-frozen",
            Workload::FullAdam => "full-adam",
            Workload::Embedding => "embedding",
            Workload::Random => "random",
        }
    }
}

/// Approximately standard normal (Irwin-Hall of four 16-bit uniforms).
fn normal(rng: &mut Rng) -> f32 {
    let x = rng.next_u64();
    let s = (x & 0xffff) + ((x >> 16) & 0xffff) + ((x >> 32) & 0xffff) + (x >> 48);
    (s as f32 / 65536.0 - 2.0) * 1.732_050_8
}

fn bf16_from_f32(x: f32) -> u16 {
    let b = x.to_bits();
    // Round to nearest even (no NaN in this data).
    ((b + 0x7fff + ((b >> 16) & 1)) >> 16) as u16
}

fn f32_from_bf16(x: u16) -> f32 {
    f32::from_bits((x as u32) << 16)
}

/// A tensor of the generated state.
enum Data {
    Bf16(Vec<u16>),
    F32(Vec<f32>),
    Bytes(Vec<u8>),
}

/// Adam state of one trainable tensor: indices of its weights, exp_avg and
/// exp_avg_sq in `Generator::tensors`, and its gradient's scale.
struct AdamGroup {
    w: usize,
    m: usize,
    v: usize,
    grad_scale: f32,
}

const BETA1: f32 = 0.9;
const BETA2: f32 = 0.999;
const EPS: f32 = 1e-8;
/// Adam steps taken before the first checkpoint (bias correction ~ 1).
const STEP0: i32 = 1000;
const EMBED_DIM: usize = 128;

/// The state of one workload, step by step.
pub(super) struct Generator {
    kind: Workload,
    pub(super) specs: Vec<TensorSpec>,
    tensors: Vec<Data>,
    groups: Vec<AdamGroup>,
    lr: f32,
    t: i32,
    rng: Rng,
}

impl Generator {
    pub(super) fn new(kind: Workload, size: u64) -> Result<Self> {
        let mut g =
            Generator { kind, specs: vec![], tensors: vec![], groups: vec![], lr: 0.0, t: STEP0, rng: Rng::seeded(7) };
        let weights = |g: &mut Generator, name: String, n: usize, trainable: bool| {
            let std = 0.02 * (0.5 + g.rng.uniform());
            let w: Vec<u16> = (0..n).map(|_| bf16_from_f32(std * normal(&mut g.rng))).collect();
            g.specs.push(TensorSpec { name: format!("{name}.weight"), dtype: Dtype::BF16, shape: vec![n] });
            g.tensors.push(Data::Bf16(w));
            if trainable {
                // Gradient scales differ by layer; moments start in a steady state.
                let grad_scale = 10f32.powf(-4.0 + 2.0 * g.rng.uniform());
                let m: Vec<f32> = (0..n).map(|_| 0.3 * grad_scale * normal(&mut g.rng)).collect();
                let v: Vec<f32> = (0..n).map(|_| grad_scale * grad_scale * (0.5 + g.rng.uniform())).collect();
                let wi = g.tensors.len() - 1;
                for (suffix, d) in [("exp_avg", m), ("exp_avg_sq", v)] {
                    g.specs.push(TensorSpec {
                        name: format!("optim.{name}.{suffix}"),
                        dtype: Dtype::F32,
                        shape: vec![n],
                    });
                    g.tensors.push(Data::F32(d));
                }
                g.groups.push(AdamGroup { w: wi, m: wi + 1, v: wi + 2, grad_scale });
            }
        };
        match kind {
            Workload::FinetuneFrozen => {
                // 100 equal bf16 tensors, every tenth trainable with two fp32
                // moments: 100 * 2p + 10 * 8p bytes.
                g.lr = 1e-4;
                let p = (size / 280).max(1) as usize;
                for i in 0..100 {
                    weights(&mut g, format!("layers.{i}"), p, i % 10 == 0);
                }
            }
            Workload::FullAdam => {
                // 32 tensors of 10 bytes per parameter.
                g.lr = 3e-4;
                let p = (size / 320).max(1) as usize;
                for i in 0..32 {
                    weights(&mut g, format!("layers.{i}"), p, true);
                }
            }
            Workload::Embedding => {
                g.lr = 1e-3;
                let rows = (size as usize / (4 * EMBED_DIM)).max(1);
                let t: Vec<f32> = (0..rows * EMBED_DIM).map(|_| normal(&mut g.rng)).collect();
                g.specs.push(TensorSpec {
                    name: "embedding.weight".into(),
                    dtype: Dtype::F32,
                    shape: vec![rows, EMBED_DIM],
                });
                g.tensors.push(Data::F32(t));
            }
            Workload::Random => {
                let mut b = vec![0u8; size as usize];
                g.rng.fill(&mut b);
                g.specs.push(TensorSpec { name: "random".into(), dtype: Dtype::U8, shape: vec![size as usize] });
                g.tensors.push(Data::Bytes(b));
            }
        }
        Ok(g)
    }

    /// One training step between checkpoints.
    pub(super) fn step(&mut self) {
        self.t += 1;
        match self.kind {
            Workload::FinetuneFrozen | Workload::FullAdam => {
                let (bc1, bc2) = (1.0 - BETA1.powi(self.t), 1.0 - BETA2.powi(self.t));
                let groups = std::mem::take(&mut self.groups);
                for gr in &groups {
                    let mut w = std::mem::replace(&mut self.tensors[gr.w], Data::Bytes(vec![]));
                    let mut m = std::mem::replace(&mut self.tensors[gr.m], Data::Bytes(vec![]));
                    let mut v = std::mem::replace(&mut self.tensors[gr.v], Data::Bytes(vec![]));
                    if let (Data::Bf16(w), Data::F32(m), Data::F32(v)) = (&mut w, &mut m, &mut v) {
                        for ((w, m), v) in w.iter_mut().zip(m.iter_mut()).zip(v.iter_mut()) {
                            // A persistent part (sign of the moment) plus noise.
                            let g = gr.grad_scale * (0.3 * m.signum() + normal(&mut self.rng));
                            *m = BETA1 * *m + (1.0 - BETA1) * g;
                            *v = BETA2 * *v + (1.0 - BETA2) * g * g;
                            let upd = self.lr * (*m / bc1) / ((*v / bc2).sqrt() + EPS);
                            *w = bf16_from_f32(f32_from_bf16(*w) - upd);
                        }
                    }
                    self.tensors[gr.w] = w;
                    self.tensors[gr.m] = m;
                    self.tensors[gr.v] = v;
                }
                self.groups = groups;
            }
            Workload::Embedding => {
                let lr = self.lr;
                if let Data::F32(t) = &mut self.tensors[0] {
                    let rows = t.len() / EMBED_DIM;
                    for r in 0..rows {
                        if self.rng.uniform() < 0.05 {
                            for x in &mut t[r * EMBED_DIM..(r + 1) * EMBED_DIM] {
                                *x -= lr * normal(&mut self.rng);
                            }
                        }
                    }
                }
            }
            Workload::Random => {
                if let Data::Bytes(b) = &mut self.tensors[0] {
                    self.rng.fill(b);
                }
            }
        }
    }

    pub(super) fn metadata(&self) -> BTreeMap<String, String> {
        BTreeMap::from([("workload".to_string(), self.kind.name().to_string())])
    }

    /// The safetensors file of the current state.
    pub(super) fn shard_bytes(&self) -> Vec<u8> {
        let meta = self.metadata();
        let layout = ShardLayout::new(&self.specs, &meta).expect("generated layout is valid");
        let mut f = vec![0u8; layout.file_len as usize];
        f[..layout.header.len()].copy_from_slice(&layout.header);
        for (e, d) in layout.entries.iter().zip(&self.tensors) {
            let dst = &mut f[e.range()];
            match d {
                Data::Bf16(v) => dst.chunks_exact_mut(2).zip(v).for_each(|(o, x)| o.copy_from_slice(&x.to_le_bytes())),
                Data::F32(v) => dst.chunks_exact_mut(4).zip(v).for_each(|(o, x)| o.copy_from_slice(&x.to_le_bytes())),
                Data::Bytes(v) => dst.copy_from_slice(v),
            }
        }
        f
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bf16_rounding() {
        assert_eq!(bf16_from_f32(1.0), 0x3f80);
        assert_eq!(f32_from_bf16(bf16_from_f32(0.5)), 0.5);
        assert_eq!(bf16_from_f32(f32::from_bits(0x3f80_8000)), 0x3f80); // tie to even
        assert_eq!(bf16_from_f32(f32::from_bits(0x3f81_8000)), 0x3f82);
    }
}

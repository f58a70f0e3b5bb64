//! The one pseudo-random generator of the tests, the demo and the
//! benchmarks: xoshiro256** seeded by splitmix64. Deterministic on every
//! machine, and its state is 32 bytes that a checkpoint can carry (the demo's
//! trainers save it with their model).

const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;

/// splitmix64's finalizer: a well-mixed hash of `x`.
pub fn mix(x: u64) -> u64 {
    let mut z = x.wrapping_add(GOLDEN);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// xoshiro256**.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rng([u64; 4]);

impl Rng {
    /// A generator whose state is four splitmix64 outputs of `seed`.
    pub fn seeded(seed: u64) -> Self {
        let mut x = seed;
        let mut next = || {
            x = x.wrapping_add(GOLDEN);
            mix(x)
        };
        Self([next(), next(), next(), next()])
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        let s = &mut self.0;
        let r = s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = s[1] << 17;
        s[2] ^= s[0];
        s[3] ^= s[1];
        s[1] ^= s[2];
        s[0] ^= s[3];
        s[2] ^= t;
        s[3] = s[3].rotate_left(45);
        r
    }

    /// Uniform in [0, 1), 24 random bits.
    pub fn uniform(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }

    /// Uniform in `0..n` (`n` > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    /// Fills `buf` with random bytes, touching every page.
    pub fn fill(&mut self, buf: &mut [u8]) {
        let mut words = buf.chunks_exact_mut(8);
        for w in &mut words {
            w.copy_from_slice(&self.next_u64().to_le_bytes());
        }
        let rest = words.into_remainder();
        let last = self.next_u64().to_le_bytes();
        rest.copy_from_slice(&last[..rest.len()]);
    }

    /// The state, to be saved in a checkpoint.
    pub fn to_bytes(&self) -> [u8; 32] {
        let mut b = [0u8; 32];
        for (c, w) in b.chunks_exact_mut(8).zip(self.0) {
            c.copy_from_slice(&w.to_le_bytes());
        }
        b
    }

    /// A generator restored from [`Rng::to_bytes`].
    pub fn from_bytes(b: &[u8; 32]) -> Self {
        let mut s = [0u64; 4];
        for (w, c) in s.iter_mut().zip(b.chunks_exact(8)) {
            *w = u64::from_le_bytes(c.try_into().expect("8 bytes"));
        }
        Self(s)
    }
}

/// Fills `buf` with the random bytes of seed `seed`.
pub fn fill_random(buf: &mut [u8], seed: u64) {
    Rng::seeded(seed).fill(buf);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deterministic_state_round_trips_and_tails_are_filled() {
        let (mut a, mut b) = (Rng::seeded(7), Rng::seeded(7));
        assert_eq!(a.next_u64(), b.next_u64());
        assert_ne!(Rng::seeded(8).next_u64(), Rng::seeded(7).next_u64());
        let saved = a.to_bytes();
        let x = a.next_u64();
        assert_eq!(Rng::from_bytes(&saved).next_u64(), x);
        let (mut p, mut q) = (vec![0u8; 1003], vec![0u8; 1003]);
        fill_random(&mut p, 7);
        fill_random(&mut q, 7);
        assert_eq!(p, q);
        assert!(p[1000..].iter().any(|&v| v != 0), "the tail is filled");
        let u = Rng::seeded(1).uniform();
        assert!((0.0..1.0).contains(&u));
    }
}

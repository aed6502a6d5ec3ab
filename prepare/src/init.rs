//! Seeded host-side initialisers: weights drawn on the host from the run's seed, so a run starts
//! from the same numbers on every device (and the PyTorch twin in `bench/` draws them too).

use candle_core::{Device, Tensor, Var};

use crate::Result;
use crate::loader::Rng;

/// Draws each tensor in turn from one SplitMix64 stream.
pub struct HostInit {
    rng: Rng,
    device: Device,
}

impl HostInit {
    pub fn new(seed: u64, device: &Device) -> Self {
        HostInit {
            rng: Rng::new(seed),
            device: device.clone(),
        }
    }

    fn var(&mut self, shape: (usize, usize), f: impl Fn(&mut Rng) -> f32) -> Result<Var> {
        let data: Vec<f32> = (0..shape.0 * shape.1).map(|_| f(&mut self.rng)).collect();
        Ok(Var::from_tensor(&Tensor::from_vec(
            data,
            shape,
            &self.device,
        )?)?)
    }

    /// Uniform in `[-bound, bound)`.
    pub fn uniform(&mut self, shape: (usize, usize), bound: f32) -> Result<Var> {
        self.var(shape, |r| (uniform01(r) * 2.0 - 1.0) * bound)
    }

    pub fn normal(&mut self, shape: (usize, usize), std: f32) -> Result<Var> {
        self.var(shape, |r| normal(r) * std)
    }

    pub fn constant(&mut self, shape: (usize, usize), value: f32) -> Result<Var> {
        self.var(shape, |_| value)
    }
}

/// Uniform in `[0, 1)` from the top 24 bits.
pub fn uniform01(rng: &mut Rng) -> f32 {
    (rng.next_u64() >> 40) as f32 / (1u64 << 24) as f32
}

/// Standard normal (Box-Muller, the cosine branch).
pub fn normal(rng: &mut Rng) -> f32 {
    let u1 = uniform01(rng).max(1e-7);
    let u2 = uniform01(rng);
    (-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos()
}

//! The research target, the ONE file the agent edits: a GPT trained for a fixed time budget, as
//! karpathy/autoresearch's train.py (RMSNorm, rotary, QK-norm, ReLU², value embeddings, sliding
//! windows, soft-cap; Muon + AdamW). `prepare` (locked) holds the data, the clock and the end of
//! the run: the harness evaluates the served model. candle's rms_norm, softmax_last_dim and rope
//! have no backward pass: use the differentiable forms here and in `fused`.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use candle_core::{DType, Device, Tensor, Var};
use prepare::init::HostInit;
use prepare::{BudgetClock, Loader, Run, Split, Stopwatch, TrainStats};

// ---- Hyperparameters: one block per preset. Edit these. ----------------------------------------

#[derive(Clone, Debug)]
struct Hyper {
    /// Transformer layers.
    depth: usize,
    /// model_dim = depth * ASPECT_RATIO, rounded up to a multiple of HEAD_DIM.
    aspect_ratio: usize,
    head_dim: usize,
    /// Per-layer attention windows, cycled: L = full context, S = half. The last layer is L.
    window_pattern: &'static str,
    /// Tokens per optimizer step (gradient accumulation makes up the difference).
    total_batch_size: usize,
    /// Rows per forward/backward pass.
    device_batch_size: usize,
    embedding_lr: f64,
    unembedding_lr: f64,
    matrix_lr: f64,
    scalar_lr: f64,
    /// Cautious weight decay of the Muon matrices, decayed linearly to 0 over the budget.
    weight_decay: f64,
    adam_betas: (f64, f64),
    warmup_ratio: f64,
    warmdown_ratio: f64,
    final_lr_frac: f64,
}

/// The original's values for one H100, but for the device batch: half the original's 128 rows
/// (~60 GB predicted with fused attention; the rows are halved again where a card holds less).
const H100: Hyper = Hyper {
    depth: 8,
    aspect_ratio: 64,
    head_dim: 128,
    window_pattern: "SSSL",
    total_batch_size: 1 << 19,
    device_batch_size: 64,
    embedding_lr: 0.6,
    unembedding_lr: 0.004,
    matrix_lr: 0.04,
    scalar_lr: 0.5,
    weight_decay: 0.2,
    adam_betas: (0.8, 0.95),
    warmup_ratio: 0.0,
    warmdown_ratio: 0.5,
    final_lr_frac: 0.0,
};

/// CPU scale: learns the builtin corpus in tens of seconds on two cores. Rates and schedules
/// are the H100 block's.
const TINY: Hyper = Hyper {
    depth: 4,
    aspect_ratio: 32,
    head_dim: 32,
    total_batch_size: 8 * 256,
    device_batch_size: 8,
    ..H100
};

const SOFTCAP: f64 = 15.0;
const VE_GATE_CHANNELS: usize = 32;
const ROPE_BASE: f64 = 10_000.0;
const NORM_EPS: f64 = 1e-6;
/// Polar-express coefficients (a, b, c) of the five orthogonalisation iterations.
const POLAR_EXPRESS: [(f64, f64, f64); 5] = [
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
];

// ---- Model -------------------------------------------------------------------------------------

#[derive(Clone, Debug)]
struct Config {
    vocab: usize,
    seq_len: usize,
    n_layer: usize,
    n_head: usize,
    head_dim: usize,
    dim: usize,
    /// Keys each layer's queries see back to (inclusive of itself: window + 1 positions).
    windows: Vec<usize>,
}

impl Config {
    fn new(hp: &Hyper, vocab: usize, seq_len: usize) -> Result<Self> {
        let dim = (hp.depth * hp.aspect_ratio).div_ceil(hp.head_dim) * hp.head_dim;
        let pattern: Vec<char> = hp.window_pattern.to_uppercase().chars().collect();
        if pattern.is_empty() || pattern.iter().any(|c| !"SL".contains(*c)) {
            bail!("WINDOW_PATTERN must be made of S and L");
        }
        let mut windows: Vec<usize> = (0..hp.depth)
            .map(|i| match pattern[i % pattern.len()] {
                'S' => seq_len / 2,
                _ => seq_len,
            })
            .collect();
        *windows.last_mut().unwrap() = seq_len;
        Ok(Config {
            vocab,
            seq_len,
            n_layer: hp.depth,
            n_head: dim / hp.head_dim,
            head_dim: hp.head_dim,
            dim,
            windows,
        })
    }

    /// Value embeddings on alternating layers, the last always included.
    fn has_ve(&self, layer: usize) -> bool {
        layer % 2 == (self.n_layer - 1) % 2
    }
}

struct Block {
    c_q: Var,
    c_k: Var,
    c_v: Var,
    c_proj: Var,
    c_fc: Var,
    mlp_proj: Var,
    ve_gate: Option<Var>,
    value_embed: Option<Var>,
}

struct Gpt {
    cfg: Config,
    wte: Var,
    blocks: Vec<Block>,
    lm_head: Var,
    resid_lambdas: Var,
    x0_lambdas: Var,
    /// cos and sin of the rotary angles, `[2, T, hd/2]`.
    rope: Tensor,
    /// bf16 on CUDA (f32 master weights, bf16 matmuls: the autocast equivalent), f32 on CPU.
    compute: DType,
}

impl Gpt {
    fn new(cfg: Config, device: &Device, seed: u64) -> Result<Self> {
        let mut init = HostInit::new(seed, device);
        let (d, v) = (cfg.dim, cfg.vocab);
        let s = 3f32.sqrt() / (d as f32).sqrt();
        let kv_dim = cfg.n_head * cfg.head_dim;
        let wte = init.normal((v, d), 1.0)?;
        let mut blocks = Vec::new();
        for layer in 0..cfg.n_layer {
            let ve = cfg.has_ve(layer);
            blocks.push(Block {
                c_q: init.uniform((kv_dim, d), s)?,
                c_k: init.uniform((kv_dim, d), s)?,
                c_v: init.uniform((kv_dim, d), s)?,
                c_proj: init.constant((d, kv_dim), 0.0)?,
                c_fc: init.uniform((4 * d, d), s)?,
                mlp_proj: init.constant((d, 4 * d), 0.0)?,
                // sigmoid(0) * 2 = 1: the gate starts neutral.
                ve_gate: ve
                    .then(|| init.constant((cfg.n_head, VE_GATE_CHANNELS), 0.0))
                    .transpose()?,
                value_embed: ve.then(|| init.uniform((v, kv_dim), s)).transpose()?,
            });
        }
        let lm_head = init.normal((v, d), 0.001)?;
        let resid_lambdas = init.constant((1, cfg.n_layer), 1.0)?;
        let x0_lambdas = init.constant((1, cfg.n_layer), 0.1)?;

        let compute = if device.is_cuda() {
            DType::BF16
        } else {
            DType::F32
        };
        let rope = rotary_tables(cfg.seq_len, cfg.head_dim, device, compute)?;
        Ok(Gpt {
            cfg,
            wte,
            blocks,
            lm_head,
            resid_lambdas,
            x0_lambdas,
            rope,
            compute,
        })
    }

    /// Soft-capped logits `[B, T, vocab]` in f32: what the evaluation scores.
    fn logits(&self, idx: &Tensor) -> Result<Tensor> {
        let logits = self.head(idx)?.to_dtype(DType::F32)?;
        Ok(((logits / SOFTCAP)?.tanh()? * SOFTCAP)?)
    }

    /// The mean cross-entropy of the soft-capped logits, fused: the normalised logits are never
    /// materialised.
    fn loss(&self, idx: &Tensor, targets: &Tensor) -> Result<Tensor> {
        let per_token = fused::softcap_cross_entropy(&self.head(idx)?, targets, SOFTCAP)?;
        Ok(per_token.mean_all()?)
    }

    /// The lm_head's output `[B, T, vocab]` in the compute dtype, before the soft-cap.
    fn head(&self, idx: &Tensor) -> Result<Tensor> {
        let (b, t) = idx.dims2()?;
        let flat = idx.flatten_all()?;
        let embed = |table: &Var| -> Result<Tensor> {
            let e = fused::embedding(table.as_tensor(), &flat, self.compute)?;
            Ok(e.reshape((b, t, ()))?)
        };
        let mut x = norm(&embed(&self.wte)?)?;
        let x0 = x.clone();
        for (i, block) in self.blocks.iter().enumerate() {
            let resid = self.resid_lambdas.as_tensor().narrow(1, i, 1)?;
            let x0_l = self.x0_lambdas.as_tensor().narrow(1, i, 1)?;
            x = fused::mix(&x, &resid, &x0, &x0_l)?;
            let ve = block.value_embed.as_ref().map(embed).transpose()?;
            x = (&x + self.attention(block, &norm(&x)?, ve.as_ref(), i)?)?;
            x = (&x + self.mlp(block, &norm(&x)?)?)?;
        }
        self.linear(&norm(&x)?, &self.lm_head)
    }

    /// `x @ wᵀ` in the compute dtype, for `x [.., in]` and `w [out, in]`.
    fn linear(&self, x: &Tensor, w: &Tensor) -> Result<Tensor> {
        let w = w.to_dtype(self.compute)?;
        let dims = x.dims().to_vec();
        let inner = *dims.last().unwrap();
        let rows = x.elem_count() / inner;
        let y = x.reshape((rows, inner))?.matmul(&w.t()?)?;
        let mut out = dims;
        *out.last_mut().unwrap() = w.dim(0)?;
        Ok(y.reshape(out)?)
    }

    fn attention(
        &self,
        block: &Block,
        x: &Tensor,
        ve: Option<&Tensor>,
        layer: usize,
    ) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        let (h, hd) = (self.cfg.n_head, self.cfg.head_dim);
        // q, k and v from one matmul: x is read once and the GEMM is three times as wide.
        let w_qkv = Tensor::cat(&[&*block.c_q, &*block.c_k, &*block.c_v], 0)?;
        let qkv = self.linear(x, &w_qkv)?;
        // q and k turned by their positions and normed (QK-norm), v as it is: [3, B, H, T, hd].
        let heads = fused::heads(&qkv, h, &self.rope.narrow(1, 0, t)?, NORM_EPS)?;
        let v_plus = match (ve, &block.ve_gate) {
            (Some(ve), Some(gate_w)) => {
                // Value residual: the value embedding through an input-dependent gate per head,
                // added to v ([B, H, T, hd], as the heads).
                let gate = sigmoid(&self.linear(&x.narrow(2, 0, VE_GATE_CHANNELS)?, gate_w)?)?;
                Some(fused::gate_heads(ve, &(gate * 2.0)?)?)
            }
            _ => None,
        };
        // Query i sees keys i - window ..= i; y comes back [B, T, H, hd].
        let y = fused::attention(&heads, v_plus.as_ref(), self.cfg.windows[layer])?;
        self.linear(&y.reshape((b, t, h * hd))?, &block.c_proj)
    }

    fn mlp(&self, block: &Block, x: &Tensor) -> Result<Tensor> {
        let h = fused::relu_squared(&self.linear(x, &block.c_fc)?)?;
        self.linear(&h, &block.mlp_proj)
    }

    /// Every trainable tensor, named, with the optimizer group it belongs to.
    fn params(&self) -> Vec<(String, &Var, Group)> {
        let mut out = vec![
            ("wte".to_string(), &self.wte, Group::Embedding),
            ("lm_head".into(), &self.lm_head, Group::Unembedding),
            ("resid_lambdas".into(), &self.resid_lambdas, Group::Resid),
            ("x0_lambdas".into(), &self.x0_lambdas, Group::X0),
        ];
        for (i, b) in self.blocks.iter().enumerate() {
            for (name, var) in [
                ("c_q", &b.c_q),
                ("c_k", &b.c_k),
                ("c_v", &b.c_v),
                ("c_proj", &b.c_proj),
                ("c_fc", &b.c_fc),
                ("mlp_proj", &b.mlp_proj),
            ] {
                out.push((format!("h.{i}.{name}"), var, Group::Matrix));
            }
            if let Some(g) = &b.ve_gate {
                out.push((format!("h.{i}.ve_gate"), g, Group::Matrix));
            }
            if let Some(e) = &b.value_embed {
                out.push((format!("value_embeds.{i}"), e, Group::Embedding));
            }
        }
        out
    }

    fn num_params(&self) -> usize {
        self.params().iter().map(|(_, v, _)| v.elem_count()).sum()
    }

    /// Training FLOPs per token as the original counts them: 6 per weight outside the
    /// embeddings and scalars, plus attention over each layer's effective window.
    fn flops_per_token(&self) -> f64 {
        let excluded: usize = self
            .params()
            .iter()
            .filter(|(_, _, g)| matches!(g, Group::Embedding | Group::Resid | Group::X0))
            .map(|(_, v, _)| v.elem_count())
            .sum();
        let c = &self.cfg;
        let attn: usize = c
            .windows
            .iter()
            .map(|&w| 12 * c.n_head * c.head_dim * w.min(c.seq_len))
            .sum();
        (6 * (self.num_params() - excluded) + attn) as f64
    }
}

/// RMSNorm without weights, computed in f32: one fused pass each way on the CPU, primitive
/// differentiable ops elsewhere (the `fused` crate).
fn norm(x: &Tensor) -> Result<Tensor> {
    Ok(fused::rms_norm(x, NORM_EPS)?)
}

fn sigmoid(x: &Tensor) -> Result<Tensor> {
    Ok((x.neg()?.exp()? + 1.0)?.recip()?)
}

/// cos and sin of the rotary angles, `[2, T, hd/2]`.
fn rotary_tables(t: usize, hd: usize, device: &Device, dtype: DType) -> Result<Tensor> {
    let half = hd / 2;
    let mut cos = Vec::with_capacity(t * half);
    let mut sin = Vec::with_capacity(t * half);
    for pos in 0..t {
        for i in 0..half {
            let inv_freq = 1.0 / ROPE_BASE.powf((2 * i) as f64 / hd as f64);
            let angle = pos as f64 * inv_freq;
            cos.push(angle.cos() as f32);
            sin.push(angle.sin() as f32);
        }
    }
    cos.extend(sin);
    Ok(Tensor::from_vec(cos, (2, t, half), device)?.to_dtype(dtype)?)
}

// ---- Optimizer: Muon for block matrices (stacked by shape), AdamW for the rest -----------------

#[derive(Clone, Copy, Debug, PartialEq)]
enum Group {
    Matrix,
    Embedding,
    Unembedding,
    Resid,
    X0,
}

struct AdamState {
    var: Var,
    lr: f64,
    betas: (f64, f64),
    m: Tensor,
    v: Tensor,
    /// Updates so far, for the bias corrections.
    steps: i32,
    /// Sits out the first step (the scalar lambdas; see `MuonAdamW::step`).
    skip_first: bool,
}

struct MuonGroup {
    vars: Vec<Var>,
    /// `[N, rows, cols]`.
    momentum: Tensor,
    /// `[N, rows, 1]` or `[N, 1, cols]`: NorMuon's second moment, per output (or input) row.
    second: Tensor,
    /// Axis NorMuon reduces over.
    red_dim: usize,
    lr_scale: f64,
}

struct MuonAdamW {
    adam: Vec<AdamState>,
    muon: Vec<MuonGroup>,
    matrix_lr: f64,
    step: i32,
}

/// Knobs the schedules set before each step.
struct StepSettings {
    lr_multiplier: f64,
    muon_momentum: f64,
    weight_decay: f64,
}

impl MuonAdamW {
    fn new(model: &Gpt, hp: &Hyper) -> Result<Self> {
        // AdamW rates were tuned at width 768; scale by 1/sqrt(dim/768).
        let scale = (model.cfg.dim as f64 / 768.0).powf(-0.5);
        let mut adam = Vec::new();
        let mut by_shape: BTreeMap<(usize, usize), Vec<Var>> = BTreeMap::new();
        for (_, var, group) in model.params() {
            let (lr, betas) = match group {
                Group::Matrix => {
                    by_shape.entry(var.dims2()?).or_default().push(var.clone());
                    continue;
                }
                Group::Embedding => (hp.embedding_lr * scale, hp.adam_betas),
                Group::Unembedding => (hp.unembedding_lr * scale, hp.adam_betas),
                Group::Resid => (hp.scalar_lr * 0.01, hp.adam_betas),
                Group::X0 => (hp.scalar_lr, (0.96, 0.95)),
            };
            adam.push(AdamState {
                var: var.clone(),
                lr,
                betas,
                m: var.zeros_like()?,
                v: var.zeros_like()?,
                steps: 0,
                skip_first: matches!(group, Group::Resid | Group::X0),
            });
        }
        let mut muon = Vec::new();
        for ((rows, cols), vars) in by_shape {
            let n = vars.len();
            let device = vars[0].device().clone();
            let (second_shape, red_dim) = if rows >= cols {
                ((n, rows, 1), 2)
            } else {
                ((n, 1, cols), 1)
            };
            muon.push(MuonGroup {
                momentum: Tensor::zeros((n, rows, cols), DType::F32, &device)?,
                second: Tensor::zeros(second_shape, DType::F32, &device)?,
                red_dim,
                lr_scale: (rows as f64 / cols as f64).max(1.0).sqrt(),
                vars,
            });
        }
        Ok(MuonAdamW {
            adam,
            muon,
            matrix_lr: hp.matrix_lr,
            step: 0,
        })
    }

    /// One update from `grads` (aligned with `Gpt::params`' vars, looked up by var).
    fn step(&mut self, grads: &Grads, s: &StepSettings) -> Result<()> {
        self.step += 1;
        for a in &mut self.adam {
            // At the first step the lambdas' true gradient is zero (zero-initialised projections
            // make every block the identity and the final norm is scale-free): what arrives is
            // rounding noise, which Adam would blow up into a full ±lr step of random sign.
            if a.skip_first && self.step == 1 {
                continue;
            }
            a.steps += 1;
            let g = grads.get(&a.var)?;
            let (b1, b2) = a.betas;
            a.m = ((&a.m * b1)? + (g * (1.0 - b1))?)?;
            a.v = ((&a.v * b2)? + (g.sqr()? * (1.0 - b2))?)?;
            let bias1 = 1.0 - b1.powi(a.steps);
            let bias2 = 1.0 - b2.powi(a.steps);
            let denom = ((&a.v / bias2)?.sqrt()? + 1e-10)?;
            let update = (a.m.div(&denom)? * (a.lr * s.lr_multiplier / bias1))?;
            a.var.set(&(a.var.as_tensor() - update)?)?;
        }
        for group in &mut self.muon {
            let g = Tensor::stack(
                &group
                    .vars
                    .iter()
                    .map(|v| grads.get(v).cloned())
                    .collect::<Result<Vec<_>>>()?,
                0,
            )?;
            let p = Tensor::stack(
                &group.vars.iter().map(|v| v.as_tensor()).collect::<Vec<_>>(),
                0,
            )?;
            let mu = s.muon_momentum;
            // Nesterov momentum.
            group.momentum = ((&group.momentum * mu)? + (&g * (1.0 - mu))?)?;
            let g = ((&g * (1.0 - mu))? + (&group.momentum * mu)?)?;
            let g = polar_express(&g)?;
            let g = normuon(&g, &mut group.second, group.red_dim, 0.95)?;
            // Cautious weight decay: decay only where the update agrees in sign with the weight.
            let lr = self.matrix_lr * group.lr_scale * s.lr_multiplier;
            let agree = (&g * &p)?.ge(0.0)?.to_dtype(DType::F32)?;
            let decay = ((&p * &agree)? * (lr * s.weight_decay))?;
            let p = ((&p - (&g * lr)?)? - decay)?;
            for (i, var) in group.vars.iter().enumerate() {
                var.set(&p.get(i)?)?;
            }
        }
        Ok(())
    }
}

/// Orthogonalises each matrix of `g [N, r, c]` with the polar-express iteration: singular
/// values go to about 1, directions stay. In bf16 on the GPU, f32 on the CPU.
fn polar_express(g: &Tensor) -> Result<Tensor> {
    let dtype = if g.device().is_cuda() {
        DType::BF16
    } else {
        DType::F32
    };
    let (_, r, c) = g.dims3()?;
    let norm = g.sqr()?.sum_keepdim((1, 2))?.sqrt()?;
    let mut x = g
        .broadcast_div(&((norm * 1.02)? + 1e-6)?)?
        .to_dtype(dtype)?;
    for (a, b, cc) in POLAR_EXPRESS {
        // The Gram matrix of the short side: the smaller product.
        let xt = x.transpose(1, 2)?;
        let m = if r > c {
            xt.matmul(&x)?
        } else {
            x.matmul(&xt)?
        };
        let bm = ((&m * b)? + (m.matmul(&m)? * cc)?)?;
        let update = if r > c {
            x.matmul(&bm)?
        } else {
            bm.matmul(&x)?
        };
        x = ((&x * a)? + update)?;
    }
    Ok(x.to_dtype(DType::F32)?)
}

/// NorMuon: rescales each row (or column) of the orthogonalised update by a running second
/// moment, keeping the update's overall norm.
fn normuon(g: &Tensor, second: &mut Tensor, red_dim: usize, beta2: f64) -> Result<Tensor> {
    let red_size = g.dim(red_dim)? as f64;
    let v_mean = g.sqr()?.mean_keepdim(red_dim)?;
    let v_norm = ((v_mean.sum_keepdim((1, 2))? * red_size)?).sqrt()?;
    *second = ((&*second * beta2)? + (&v_mean * (1.0 - beta2))?)?;
    let step_size = second.clamp(1e-10, f64::MAX)?.sqrt()?.recip()?;
    let scaled = ((&v_mean * red_size)? * step_size.sqr()?)?;
    let v_norm_new = scaled.sum_keepdim((1, 2))?.sqrt()?.clamp(1e-10, f64::MAX)?;
    let scale = step_size.broadcast_mul(&v_norm.div(&v_norm_new)?)?;
    Ok(g.broadcast_mul(&scale)?)
}

/// Gradients summed over micro-batches, by var.
struct Grads(Vec<(Var, Tensor)>);

impl Grads {
    fn get(&self, var: &Var) -> Result<&Tensor> {
        self.0
            .iter()
            .find(|(v, _)| v.id() == var.id())
            .map(|(_, g)| g)
            .context("a parameter received no gradient")
    }
}

/// The phases of a step, as `Stopwatch` reports them.
const PHASES: &[&str] = &["data", "forward", "backward", "optimizer"];

/// Forward and backward over `accum` micro-batches; returns the mean loss and the gradients.
fn forward_backward(
    model: &Gpt,
    batches: &mut dyn FnMut() -> Result<(Tensor, Tensor)>,
    accum: usize,
    watch: &mut Stopwatch,
) -> Result<(f32, Grads)> {
    let params: Vec<Var> = model
        .params()
        .into_iter()
        .map(|(_, v, _)| v.clone())
        .collect();
    let mut sums: Vec<Option<Tensor>> = vec![None; params.len()];
    // Summed on the device: one host synchronisation per step, not one per micro-batch.
    let mut total: Option<Tensor> = None;
    for _ in 0..accum {
        let (x, y) = batches()?;
        watch.lap("data")?;
        let loss = (model.loss(&x, &y)? / accum as f64)?;
        watch.lap("forward")?;
        let store = loss.backward()?;
        let loss = loss.detach();
        total = Some(match total.take() {
            Some(t) => (t + loss)?,
            None => loss,
        });
        for (sum, var) in sums.iter_mut().zip(&params) {
            let g = match store.get(var.as_tensor()) {
                Some(g) => g.clone(),
                None => var.zeros_like()?,
            };
            *sum = Some(match sum.take() {
                Some(s) => (s + g)?,
                None => g,
            });
        }
        watch.lap("backward")?;
    }
    let grads = params
        .into_iter()
        .zip(sums)
        .map(|(v, g)| (v, g.expect("accum >= 1")))
        .collect();
    let total = total.expect("accum >= 1").to_scalar::<f32>()?;
    Ok((total, Grads(grads)))
}

// ---- Schedules, driven by the fraction of the time budget spent --------------------------------

fn lr_multiplier(hp: &Hyper, progress: f64) -> f64 {
    if progress < hp.warmup_ratio {
        progress / hp.warmup_ratio
    } else if progress < 1.0 - hp.warmdown_ratio {
        1.0
    } else {
        let cooldown = (1.0 - progress) / hp.warmdown_ratio;
        cooldown + (1.0 - cooldown) * hp.final_lr_frac
    }
}

fn muon_momentum(step: u64) -> f64 {
    let frac = (step as f64 / 300.0).min(1.0);
    (1.0 - frac) * 0.85 + frac * 0.95
}

// ---- Training ----------------------------------------------------------------------------------

/// Trains for the budget; returns the model, its clock and the rows per pass.
fn train(hp: &Hyper, run: &Run) -> Result<(Gpt, BudgetClock, usize)> {
    let (data, device) = (&run.data, &run.device);
    let preset = data.preset();
    let cfg = Config::new(hp, data.vocab_size(), preset.seq_len)?;
    let model = Gpt::new(cfg, device, run.seed)?;
    // Made before the trial, so that the optimizer's state is counted in what must fit.
    let mut opt = MuonAdamW::new(&model, hp)?;
    // The card decides the rows per pass: halved until two accumulated passes fit (as a step
    // holds them: one pass's graph beside the summed gradients), the total batch kept.
    let rows = run.fit_device_batch(hp.device_batch_size, |rows| -> Result<()> {
        let x = Tensor::zeros((rows, preset.seq_len), DType::U32, device)?;
        let mut same = || Ok((x.clone(), x.clone()));
        forward_backward(&model, &mut same, 2, &mut Stopwatch::new(device, PHASES, 1))?;
        Ok(())
    })?;
    let tokens_per_pass = rows * preset.seq_len;
    if !hp.total_batch_size.is_multiple_of(tokens_per_pass) {
        bail!(
            "TOTAL_BATCH_SIZE ({}) must be a multiple of DEVICE_BATCH_SIZE × seq len ({tokens_per_pass})",
            hp.total_batch_size
        );
    }
    let accum = hp.total_batch_size / tokens_per_pass;
    println!(
        "model: depth {}, dim {}, heads {}×{}, windows {:?}, {:.2}M parameters, {:.3e} FLOPs/token",
        model.cfg.n_layer,
        model.cfg.dim,
        model.cfg.n_head,
        model.cfg.head_dim,
        model.cfg.windows,
        model.num_params() as f64 / 1e6,
        model.flops_per_token()
    );
    println!(
        "batch: {} tokens/step = {accum} × {rows} rows × {} tokens; budget {:.0}s",
        hp.total_batch_size,
        preset.seq_len,
        run.budget.as_secs_f64()
    );
    let mut loader =
        Loader::new(data, Split::Train, rows, preset.seq_len, Some(run.seed))?.prefetch(4);
    let mut clock = run.clock();
    let epoch = std::cell::Cell::new(1);
    let mut next = || -> Result<(Tensor, Tensor)> {
        let batch = loader.next_host_batch()?;
        epoch.set(batch.epoch);
        Ok(batch.to_tensors(device)?)
    };
    let mut smooth = 0f64;
    let mut last_print = Instant::now() - Duration::from_secs(10);
    let flops = model.flops_per_token();
    // One step in ten is timed by phase (each lap synchronises the device).
    let mut watch = Stopwatch::new(device, PHASES, 10);
    while !clock.exhausted() {
        clock.begin_step();
        watch.start_step(clock.steps());
        let progress = clock.progress();
        let settings = StepSettings {
            lr_multiplier: lr_multiplier(hp, progress),
            muon_momentum: muon_momentum(clock.steps()),
            weight_decay: hp.weight_decay * (1.0 - progress),
        };
        let (loss, grads) = forward_backward(&model, &mut next, accum, &mut watch)?;
        if !loss.is_finite() || loss > 100.0 {
            // NaN or exploding: fail fast instead of burning the budget.
            bail!("FAIL: loss {loss} at step {}", clock.steps());
        }
        opt.step(&grads, &settings)?;
        watch.lap("optimizer")?;
        device.synchronize()?;
        watch.end_step(clock.steps());
        let dt = clock.end_step().as_secs_f64();
        let step = clock.steps();
        smooth = 0.9 * smooth + 0.1 * loss as f64;
        // Every warm-up step is printed (a twin in another framework is checked against them).
        let warming_up = step <= prepare::clock::WARMUP_STEPS + 1;
        if warming_up || last_print.elapsed() >= Duration::from_secs(1) || clock.exhausted() {
            last_print = Instant::now();
            let tok_s = hp.total_batch_size as f64 / dt;
            let mfu = prepare::protocol::mfu_percent(device.is_cuda(), flops, tok_s, 1.0);
            println!(
                "step {:05} ({:.1}%) | loss: {:.6} | lrm: {:.2} | dt: {:.0}ms | tok/sec: {:.0} | mfu: {mfu:.1}% | epoch: {} | remaining: {:.0}s",
                step - 1,
                100.0 * progress,
                smooth / (1.0 - 0.9f64.powi(step as i32)),
                settings.lr_multiplier,
                dt * 1e3,
                tok_s,
                epoch.get(),
                clock.remaining().as_secs_f64()
            );
        }
    }
    println!("{}", watch.summary());
    Ok((model, clock, rows))
}

fn main() -> Result<()> {
    let run = Run::from_env()?;
    let hp = match run.data.preset().name.as_str() {
        "h100" => H100,
        "tiny" => TINY,
        other => bail!("no hyperparameters for preset `{other}`"),
    };
    let (model, clock, rows) = train(&hp, &run)?;
    let stats = TrainStats {
        num_steps: clock.steps(),
        total_tokens: clock.steps() * hp.total_batch_size as u64,
        flops_per_token: model.flops_per_token(),
        num_params: model.num_params() as u64,
        depth: hp.depth as u64,
        peak_vram_mb: run.memory_used_mb(),
        eval_batch_rows: rows as u32,
        training_seconds: clock.training_time().as_secs_f64(),
    };
    // The harness scores the model; run by hand, `prepare` evaluates it here.
    run.finish(stats, |x| model.logits(x))?;
    Ok(())
}

#[cfg(test)]
mod tests;

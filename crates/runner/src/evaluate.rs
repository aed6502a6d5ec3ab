//! The harness's side of the evaluation: it feeds the served model the preset's validation rows,
//! computes val_bpb from the losses it gets back and the token byte lengths, and audits the model
//! on the way, with rows the model cannot tell from the others:
//! - *causality*: a row whose tokens after a random position p are replaced by other validation
//!   text, scored with the original targets up to p: the losses at positions ≤ p must not move;
//! - *state*: a row sent a second time, in another request, must score the same;
//! - *honest losses*: at random positions the model returns its whole logit vector, and the
//!   cross-entropy recomputed from it must equal the loss it reported.
//!
//! Together they cost about 4 % of the evaluation's forward passes (see [`AuditPlan`]).

use prepare::loader::{Rng, TargetDigest};
use prepare::manifest::EvalSpec;
use prepare::protocol::{Mark, Request};
use serde::Serialize;

/// The validation rows, as the harness reads them: `inputs[r * seq + t]` predicts `targets[..]`.
pub struct Rows {
    pub seq: usize,
    pub inputs: Vec<u32>,
    pub targets: Vec<u32>,
}

impl Rows {
    pub fn len(&self) -> usize {
        self.inputs.len() / self.seq
    }

    pub fn is_empty(&self) -> bool {
        self.inputs.is_empty()
    }

    fn row(&self, r: usize) -> (&[u32], &[u32]) {
        let span = r * self.seq..(r + 1) * self.seq;
        (&self.inputs[span.clone()], &self.targets[span])
    }

    /// The preset's evaluation rows of `data`, in the evaluator's order.
    pub fn load(data: &prepare::Dataset) -> prepare::Result<Rows> {
        let seq = data.preset().seq_len;
        let mut rows = Rows {
            seq,
            inputs: Vec::new(),
            targets: Vec::new(),
        };
        for batch in prepare::loader::EvalBatches::new(data, 256)? {
            let batch = batch?;
            rows.inputs.extend(batch.inputs);
            rows.targets.extend(batch.targets);
        }
        Ok(rows)
    }
}

/// How far two scorings of the same thing may differ: `|a - b| <= atol + rtol * max(|a|, |b|)`.
/// Measured on the CPU (f32); on CUDA (bf16 matmuls, kernels chosen by batch shape) predicted.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Tolerance {
    pub atol: f64,
    pub rtol: f64,
}

impl Tolerance {
    pub fn for_device(device: crate::Device) -> Tolerance {
        match device {
            // An honest tiny model differs by at most 3.4e-7 nats between a 1-row and an
            // 8-row request (f32; measured): a hundredfold margin.
            crate::Device::Cpu => Tolerance {
                atol: 2e-5,
                rtol: 1e-5,
            },
            crate::Device::Cuda => Tolerance {
                atol: 5e-2,
                rtol: 1e-2,
            },
        }
    }

    fn close(&self, a: f64, b: f64) -> bool {
        (a - b).abs() <= self.atol + self.rtol * a.abs().max(b.abs())
    }
}

/// How many audit rows a run gets: about 4 % of the evaluation's rows, at least a few.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct AuditPlan {
    pub causal_rows: usize,
    pub repeat_rows: usize,
    pub logit_rows: usize,
    pub logit_positions: usize,
}

impl AuditPlan {
    pub fn for_rows(n: usize) -> AuditPlan {
        AuditPlan {
            causal_rows: (n / 50).max(3).min(n),
            repeat_rows: (n / 100).max(1).min(n),
            logit_rows: (n / 100).max(2).min(n),
            logit_positions: 4,
        }
    }

    /// Extra forward passes, in rows, on top of the evaluation's.
    pub fn extra_rows(&self) -> usize {
        self.causal_rows + self.repeat_rows + self.logit_rows
    }
}

/// What the harness measured.
#[derive(Clone, Debug, Serialize)]
pub struct Scored {
    pub val_bpb: f64,
    pub spec: EvalSpec,
    pub bytes: u64,
    pub audits: AuditSummary,
}

#[derive(Clone, Debug, Serialize)]
pub struct AuditSummary {
    pub plan: AuditPlan,
    pub tolerance: Tolerance,
    /// The largest differences an honest model showed, nats (how close to the tolerance it ran).
    pub max_causal_delta: f64,
    pub max_repeat_delta: f64,
    pub max_logit_delta: f64,
    pub requests: usize,
}

#[derive(Debug)]
pub enum EvalError {
    /// The model failed an audit or returned impossible losses: `invalid_report`.
    Invalid(String),
    /// The connection failed (the process ended, timed out, or spoke nonsense): the caller
    /// decides, from how the process ended.
    Link(LinkError),
}

#[derive(Debug)]
pub enum LinkError {
    Timeout,
    Interrupted,
    /// The process ended or closed its pipe.
    Gone,
    Malformed(String),
    /// The model reported an error of its own (out of memory, say).
    Failed(String),
}

/// One request, one reply, under the caller's deadline.
pub trait Link {
    fn call(&mut self, request: Request) -> Result<Mark, LinkError>;
}

enum Kind {
    Regular,
    /// Tokens after `p` replaced; positions `..= p` must match the regular row.
    Causal {
        p: usize,
    },
    Repeat,
}

struct Job {
    row: usize,
    kind: Kind,
    inputs: Vec<u32>,
    targets: Vec<u32>,
}

/// Scores the served model on `rows` and audits it. `batch_rows` is the model's own request size.
pub fn evaluate(
    link: &mut dyn Link,
    rows: &Rows,
    token_bytes: &[u32],
    vocab: usize,
    batch_rows: usize,
    tol: Tolerance,
    rng: &mut Rng,
) -> Result<Scored, EvalError> {
    let n = rows.len();
    let seq = rows.seq;
    let plan = AuditPlan::for_rows(n);
    let batch_rows = batch_rows.clamp(1, 1024);
    let jobs = plan_jobs(rows, &plan, batch_rows, rng);

    // Scores, per job, in the order sent.
    let mut losses: Vec<Vec<f32>> = vec![Vec::new(); jobs.len()];
    let mut requests = 0;
    for (chunk_index, chunk) in jobs.chunks(batch_rows).enumerate() {
        let mut inputs = Vec::with_capacity(chunk.len() * seq);
        let mut targets = Vec::with_capacity(chunk.len() * seq);
        for job in chunk {
            inputs.extend_from_slice(&job.inputs);
            targets.extend_from_slice(&job.targets);
        }
        let reply = link
            .call(Request::Losses {
                rows: chunk.len() as u32,
                seq: seq as u32,
                inputs,
                targets,
            })
            .map_err(EvalError::Link)?;
        requests += 1;
        let Mark::Losses(values) = reply else {
            return Err(EvalError::Link(LinkError::Malformed(format!(
                "expected losses, got {reply:?}"
            ))));
        };
        if values.len() != chunk.len() * seq {
            return Err(EvalError::Invalid(format!(
                "the model returned {} losses for {} targets",
                values.len(),
                chunk.len() * seq
            )));
        }
        for (i, (job, scores)) in chunk.iter().zip(values.chunks(seq)).enumerate() {
            for (t, &l) in scores.iter().enumerate() {
                if !l.is_finite() || (l as f64) < -tol.atol {
                    return Err(EvalError::Invalid(format!(
                        "the model scored row {}, position {t} at {l} nats: a cross-entropy is finite and never negative",
                        job.row
                    )));
                }
            }
            losses[chunk_index * batch_rows + i] = scores.to_vec();
        }
    }

    // The regular scores, by row, and the metric from them.
    let mut by_row: Vec<Option<&[f32]>> = vec![None; n];
    for (job, scores) in jobs.iter().zip(&losses) {
        if matches!(job.kind, Kind::Regular) {
            by_row[job.row] = Some(scores);
        }
    }
    let mut digest = TargetDigest::default();
    let (mut nats, mut bytes) = (0f64, 0u64);
    for (r, scores) in by_row.iter().enumerate() {
        let scores = scores.expect("every row scored once");
        let (_, targets) = rows.row(r);
        for (&l, &t) in scores.iter().zip(targets) {
            let b = token_bytes.get(t as usize).copied().unwrap_or(0);
            if b > 0 {
                nats += l as f64;
                bytes += b as u64;
            }
        }
        digest.update(targets);
    }
    if bytes == 0 {
        return Err(EvalError::Invalid(
            "the validation rows hold no scorable bytes".into(),
        ));
    }

    // Causality and state, from what was already scored.
    let (mut max_causal, mut max_repeat) = (0f64, 0f64);
    for (job, scores) in jobs.iter().zip(&losses) {
        let regular = by_row[job.row].expect("scored");
        match job.kind {
            Kind::Regular => {}
            Kind::Causal { p } => {
                for t in 0..=p {
                    let (a, b) = (regular[t] as f64, scores[t] as f64);
                    max_causal = max_causal.max((a - b).abs());
                    if !tol.close(a, b) {
                        return Err(EvalError::Invalid(format!(
                            "causality audit failed: row {} scored again with every token after position {p} replaced by other text: the loss at position {t} moved from {a:.4} to {b:.4} nats (tolerance {}). A prediction must not depend on later tokens: an attention mask that lets a position see the next one does this",
                            job.row, tol.atol
                        )));
                    }
                }
            }
            Kind::Repeat => {
                for t in 0..seq {
                    let (a, b) = (regular[t] as f64, scores[t] as f64);
                    max_repeat = max_repeat.max((a - b).abs());
                    if !tol.close(a, b) {
                        return Err(EvalError::Invalid(format!(
                            "state audit failed: row {} sent twice scored {a:.4} then {b:.4} nats at position {t} (tolerance {}): the evaluation must not carry state from one request to the next",
                            job.row, tol.atol
                        )));
                    }
                }
            }
        }
    }

    // Honest losses: logit vectors at random positions of random rows.
    let mut max_logit = 0f64;
    let positions_per_row = plan.logit_positions.min(seq);
    for _ in 0..plan.logit_rows {
        let r = rng.below(n);
        let (inputs, targets) = rows.row(r);
        let mut positions: Vec<u32> = Vec::new();
        while positions.len() < positions_per_row {
            let p = rng.below(seq) as u32;
            if !positions.contains(&p) {
                positions.push(p);
            }
        }
        let reply = link
            .call(Request::Logits {
                inputs: inputs.to_vec(),
                positions: positions.clone(),
            })
            .map_err(EvalError::Link)?;
        requests += 1;
        let Mark::Logits(values) = reply else {
            return Err(EvalError::Link(LinkError::Malformed(format!(
                "expected logits, got {reply:?}"
            ))));
        };
        if values.len() != positions.len() * vocab {
            return Err(EvalError::Invalid(format!(
                "the model returned {} logits for {} positions of a {vocab}-token vocabulary",
                values.len(),
                positions.len()
            )));
        }
        for (&p, logits) in positions.iter().zip(values.chunks(vocab)) {
            let target = targets[p as usize] as usize;
            let recomputed = cross_entropy(logits, target).ok_or_else(|| {
                EvalError::Invalid(format!(
                    "honest-loss audit failed: row {r}, position {p}: the logits are not finite"
                ))
            })?;
            let reported = by_row[r].expect("scored")[p as usize] as f64;
            max_logit = max_logit.max((recomputed - reported).abs());
            if !tol.close(recomputed, reported) {
                return Err(EvalError::Invalid(format!(
                    "honest-loss audit failed: row {r}, position {p}: the model reported {reported:.4} nats, but the cross-entropy of its own logits there is {recomputed:.4} (tolerance {}): losses must be the logits' cross-entropy",
                    tol.atol
                )));
            }
        }
    }
    Ok(Scored {
        val_bpb: nats / (std::f64::consts::LN_2 * bytes as f64),
        spec: digest.finish(),
        bytes,
        audits: AuditSummary {
            plan,
            tolerance: tol,
            max_causal_delta: max_causal,
            max_repeat_delta: max_repeat,
            max_logit_delta: max_logit,
            requests,
        },
    })
}

/// `logsumexp(logits) - logits[target]` in f64; `None` if anything is not finite.
fn cross_entropy(logits: &[f32], target: usize) -> Option<f64> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    if !max.is_finite() || logits.iter().any(|l| !l.is_finite()) {
        return None;
    }
    let sum: f64 = logits.iter().map(|&l| (l as f64 - max).exp()).sum();
    Some(max + sum.ln() - *logits.get(target)? as f64)
}

/// The regular rows in order, with the audit rows placed at random among them: a causal probe
/// anywhere, a repeat in a request other than its original's.
fn plan_jobs(rows: &Rows, plan: &AuditPlan, batch_rows: usize, rng: &mut Rng) -> Vec<Job> {
    let (n, seq) = (rows.len(), rows.seq);
    let mut jobs: Vec<Job> = (0..n)
        .map(|r| {
            let (x, y) = rows.row(r);
            Job {
                row: r,
                kind: Kind::Regular,
                inputs: x.to_vec(),
                targets: y.to_vec(),
            }
        })
        .collect();
    let mut extra = Vec::new();
    for _ in 0..plan.causal_rows {
        if seq < 2 || n < 2 {
            break;
        }
        let r = rng.below(n);
        let p = rng.below(seq - 1);
        let (x, y) = rows.row(r);
        let (mut inputs, mut targets) = (x.to_vec(), y.to_vec());
        // Other validation text at the same offsets, starting with a token that differs.
        let mut donor = (r + 1 + rng.below(n - 1)) % n;
        for _ in 0..n {
            if donor != r && rows.row(donor).0[p + 1] != x[p + 1] {
                break;
            }
            donor = (donor + 1) % n;
        }
        let (dx, dy) = rows.row(donor);
        inputs[p + 1..].copy_from_slice(&dx[p + 1..]);
        if inputs[p + 1] == x[p + 1] {
            // Every row has the same token there: change it by hand.
            inputs[p + 1] = (x[p + 1] + 1) % (x.iter().copied().max().unwrap_or(0) + 2);
        }
        targets[p + 1..].copy_from_slice(&dy[p + 1..]);
        extra.push(Job {
            row: r,
            kind: Kind::Causal { p },
            inputs,
            targets,
        });
    }
    for _ in 0..plan.repeat_rows {
        let r = rng.below(n);
        let (x, y) = rows.row(r);
        extra.push(Job {
            row: r,
            kind: Kind::Repeat,
            inputs: x.to_vec(),
            targets: y.to_vec(),
        });
    }
    for job in extra {
        let at = rng.below(jobs.len() + 1);
        jobs.insert(at, job);
    }
    // A repeat that shares a request with its original row swaps places with a regular row of
    // another request (when there is another request).
    let batches = jobs.len().div_ceil(batch_rows);
    let batch_of = |i: usize| i / batch_rows;
    let conflict = |jobs: &[Job], i: usize| {
        let start = batch_of(i) * batch_rows;
        let end = (start + batch_rows).min(jobs.len());
        (start..end).any(|j| {
            j != i
                && jobs[j].row == jobs[i].row
                && (matches!(jobs[i].kind, Kind::Repeat) || matches!(jobs[j].kind, Kind::Repeat))
                && (matches!(jobs[i].kind, Kind::Regular) || matches!(jobs[j].kind, Kind::Regular))
        })
    };
    for _ in 0..1000 {
        if batches < 2 {
            break;
        }
        let Some(i) =
            (0..jobs.len()).find(|&i| matches!(jobs[i].kind, Kind::Repeat) && conflict(&jobs, i))
        else {
            break;
        };
        let j = rng.below(jobs.len());
        if batch_of(j) != batch_of(i) && matches!(jobs[j].kind, Kind::Regular) {
            jobs.swap(i, j);
            if conflict(&jobs, i) || conflict(&jobs, j) {
                jobs.swap(i, j);
            }
        }
    }
    jobs
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A bigram "model" in the harness's own terms: the loss at a position depends on the inputs
    /// up to it (honest) or also on the next one (a one-token leak), and can be scaled or made
    /// stateful.
    struct Model {
        vocab: usize,
        leak: bool,
        loss_scale: f32,
        stateful: bool,
        calls: usize,
    }

    impl Model {
        fn honest(vocab: usize) -> Model {
            Model {
                vocab,
                leak: false,
                loss_scale: 1.0,
                stateful: false,
                calls: 0,
            }
        }

        fn logits_at(&self, inputs: &[u32], t: usize) -> Vec<f32> {
            let mut l = vec![0f32; self.vocab];
            l[(inputs[t] as usize * 7 + 3) % self.vocab] = 2.0;
            if self.leak && t + 1 < inputs.len() {
                l[inputs[t + 1] as usize] += 5.0;
            }
            if self.stateful {
                l[0] += self.calls as f32 * 0.5;
            }
            l
        }
    }

    impl Link for Model {
        fn call(&mut self, request: Request) -> Result<Mark, LinkError> {
            self.calls += 1;
            Ok(match request {
                Request::Losses {
                    rows,
                    seq,
                    inputs,
                    targets,
                } => {
                    let seq = seq as usize;
                    let mut out = Vec::new();
                    for r in 0..rows as usize {
                        let x = &inputs[r * seq..(r + 1) * seq];
                        for t in 0..seq {
                            let ce =
                                cross_entropy(&self.logits_at(x, t), targets[r * seq + t] as usize)
                                    .unwrap();
                            out.push(ce as f32 * self.loss_scale);
                        }
                    }
                    Mark::Losses(out)
                }
                Request::Logits { inputs, positions } => Mark::Logits(
                    positions
                        .iter()
                        .flat_map(|&p| self.logits_at(&inputs, p as usize))
                        .collect(),
                ),
                Request::Done => unreachable!(),
            })
        }
    }

    fn rows(n: usize, seq: usize, vocab: u32) -> Rows {
        let mut rng = Rng::new(5);
        let stream: Vec<u32> = (0..n * seq + 1)
            .map(|_| rng.below(vocab as usize) as u32)
            .collect();
        let mut inputs = Vec::new();
        let mut targets = Vec::new();
        for r in 0..n {
            inputs.extend_from_slice(&stream[r * seq..(r + 1) * seq]);
            targets.extend_from_slice(&stream[r * seq + 1..(r + 1) * seq + 1]);
        }
        Rows {
            seq,
            inputs,
            targets,
        }
    }

    fn run(model: &mut Model, seed: u64) -> Result<Scored, EvalError> {
        let rows = rows(40, 16, 32);
        let bytes = vec![1u32; 32];
        let tol = Tolerance::for_device(crate::Device::Cpu);
        evaluate(model, &rows, &bytes, 32, 8, tol, &mut Rng::new(seed))
    }

    fn invalid(r: Result<Scored, EvalError>) -> String {
        match r {
            Err(EvalError::Invalid(why)) => why,
            other => panic!("expected an invalid verdict, got {other:?}"),
        }
    }

    #[test]
    fn an_honest_model_passes_every_audit_and_scores_its_cross_entropy() {
        for seed in 0..20 {
            let scored = run(&mut Model::honest(32), seed).unwrap();
            assert!(scored.val_bpb > 0.0 && scored.val_bpb.is_finite());
            assert_eq!(scored.audits.max_causal_delta, 0.0);
            assert_eq!(scored.spec.tokens, 40 * 16);
        }
    }

    #[test]
    fn a_one_token_leak_fails_causality() {
        for seed in 0..20 {
            let mut m = Model::honest(32);
            m.leak = true;
            let why = invalid(run(&mut m, seed));
            assert!(why.starts_with("causality audit failed"), "{why}");
        }
    }

    #[test]
    fn scaled_or_zero_losses_fail_the_honest_loss_audit() {
        for scale in [0.5, 0.0, 2.0] {
            let mut m = Model::honest(32);
            m.loss_scale = scale;
            let why = invalid(run(&mut m, 1));
            assert!(
                why.starts_with("honest-loss audit failed"),
                "{scale}: {why}"
            );
        }
        let mut m = Model::honest(32);
        m.loss_scale = -1.0;
        assert!(invalid(run(&mut m, 1)).contains("never negative"));
    }

    #[test]
    fn state_carried_between_requests_fails() {
        let mut m = Model::honest(32);
        m.stateful = true;
        let why = invalid(run(&mut m, 3));
        assert!(
            why.starts_with("state audit failed") || why.starts_with("causality audit failed"),
            "{why}"
        );
    }

    #[test]
    fn repeats_never_share_a_request_with_their_original() {
        let rows = rows(40, 16, 32);
        for seed in 0..50 {
            let plan = AuditPlan::for_rows(40);
            let jobs = plan_jobs(&rows, &plan, 8, &mut Rng::new(seed));
            for (i, job) in jobs.iter().enumerate() {
                if matches!(job.kind, Kind::Repeat) {
                    let start = i / 8 * 8;
                    assert!(
                        !jobs[start..(start + 8).min(jobs.len())]
                            .iter()
                            .any(|j| j.row == job.row && matches!(j.kind, Kind::Regular)),
                        "seed {seed}: repeat of row {} in its original's request",
                        job.row
                    );
                }
            }
            assert_eq!(
                jobs.iter()
                    .filter(|j| matches!(j.kind, Kind::Regular))
                    .count(),
                40
            );
        }
    }
}

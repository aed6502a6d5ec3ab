//! The harness's side of the evaluation: it feeds the served model the preset's validation rows,
//! computes val_bpb from the losses it gets back and the token byte lengths, and audits the model
//! on the way, with rows the model cannot tell from the others:
//! - *causality*: a row whose tokens after a random position p are replaced by other validation
//!   text, scored with the original targets up to p: the losses at positions ≤ p must not move;
//! - *state*: a row sent a second time, in another request, must score the same;
//! - *honest losses*: the model is sent a row's prefix, up to a random position p, and returns
//!   its logit vector at p; the cross-entropy recomputed from it must equal the loss it reported
//!   for p, one by one and on average. The prefix holds no later token, so the logits cannot
//!   know the target.
//!
//! Together they cost about 4 % of the evaluation's forward passes (see [`AuditPlan`]). Audit
//! rows never share a request with their original row.

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
#[derive(Clone, Copy, Debug, Serialize, serde::Deserialize)]
pub struct Tolerance {
    pub atol: f64,
    pub rtol: f64,
}

impl Tolerance {
    pub fn for_device(device: crate::Device) -> Tolerance {
        match device {
            // An honest tiny model's largest difference between requests of other shapes (a
            // prefix of one row against 8 whole rows; f32) measured 1.1e-6 nats: an
            // eighteenfold margin, with the same position's loss otherwise bit-identical.
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

/// How many audit rows a run gets: about 4 % of the evaluation's forward passes, at least a few.
#[derive(Clone, Copy, Debug, Serialize, serde::Deserialize)]
pub struct AuditPlan {
    pub causal_rows: usize,
    pub repeat_rows: usize,
    /// Prefixes (half a row on average) whose last logit vector is checked.
    pub logit_prefixes: usize,
}

impl AuditPlan {
    pub fn for_rows(n: usize) -> AuditPlan {
        AuditPlan {
            causal_rows: (n / 64).max(3),
            repeat_rows: (n / 128).max(1),
            logit_prefixes: (n / 32).max(4),
        }
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

#[derive(Clone, Debug, Serialize, serde::Deserialize)]
pub struct AuditSummary {
    pub plan: AuditPlan,
    pub tolerance: Tolerance,
    /// The largest differences an honest model showed, nats (how close to the tolerance it ran).
    pub max_causal_delta: f64,
    pub max_repeat_delta: f64,
    pub max_logit_delta: f64,
    /// Mean of (recomputed − reported) over the logit audits: a model that shaves its losses
    /// shows here even when each position is within the tolerance.
    pub mean_logit_bias: f64,
    pub requests: usize,
    /// Rows per loss request: the model's own size, at most an eighth of the rows.
    pub request_rows: usize,
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
    /// A reply took far longer than the first one did (the message says how long).
    Slow(String),
    Interrupted,
    /// The process ended or closed its pipe.
    Gone,
    Malformed(String),
    /// The model reported an error of its own (out of memory, say).
    Failed(String),
}

/// One request, one reply, under the caller's deadline. `max_reply` bounds the reply's length.
pub trait Link {
    fn call(&mut self, request: Request, max_reply: usize) -> Result<Mark, LinkError>;
}

enum Kind {
    Regular,
    /// Tokens after `p` replaced; positions `..= p` must match the regular row.
    Causal {
        p: usize,
        inputs: Vec<u32>,
        targets: Vec<u32>,
    },
    Repeat,
}

/// One row of a request: a validation row (borrowed), or a causal probe's own tokens.
struct Job {
    row: usize,
    kind: Kind,
}

impl Job {
    fn tokens<'a>(&'a self, rows: &'a Rows) -> (&'a [u32], &'a [u32]) {
        match &self.kind {
            Kind::Causal {
                inputs, targets, ..
            } => (inputs, targets),
            _ => rows.row(self.row),
        }
    }
}

/// Losses below this are impossible for a cross-entropy, whatever the rounding.
const MIN_LOSS: f32 = -1e-4;

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
    if n == 0 || seq == 0 {
        return Err(EvalError::Invalid("no validation rows to score".into()));
    }
    let plan = AuditPlan::for_rows(n);
    // At least eight requests, so that audit rows have other requests to go to.
    let batch_rows = batch_rows.clamp(1, n.div_ceil(8).max(1));
    let requests_planned = plan_requests(rows, &plan, batch_rows, vocab, rng);

    // Scores, per job, in the order sent.
    let mut scored: Vec<(&Job, Vec<f32>)> = Vec::new();
    let mut requests = 0;
    for chunk in &requests_planned {
        let mut inputs = Vec::with_capacity(chunk.len() * seq);
        let mut targets = Vec::with_capacity(chunk.len() * seq);
        for job in chunk {
            let (x, y) = job.tokens(rows);
            inputs.extend_from_slice(x);
            targets.extend_from_slice(y);
        }
        let expected = chunk.len() * seq;
        let reply = link
            .call(
                Request::Losses {
                    rows: chunk.len() as u32,
                    seq: seq as u32,
                    inputs,
                    targets,
                },
                expected,
            )
            .map_err(EvalError::Link)?;
        requests += 1;
        let Mark::Losses(values) = reply else {
            return Err(EvalError::Link(LinkError::Malformed(format!(
                "expected losses, got {}",
                describe(&reply)
            ))));
        };
        if values.len() != expected {
            return Err(EvalError::Invalid(format!(
                "the model returned {} losses for {expected} targets",
                values.len(),
            )));
        }
        for (job, losses) in chunk.iter().zip(values.chunks(seq)) {
            for (t, &l) in losses.iter().enumerate() {
                if !l.is_finite() || l < MIN_LOSS {
                    return Err(EvalError::Invalid(format!(
                        "the model scored row {}, position {t} at {l} nats: a cross-entropy is finite and never negative",
                        job.row
                    )));
                }
            }
            scored.push((job, losses.to_vec()));
        }
    }

    // The regular scores, by row, and the metric from them.
    let mut by_row: Vec<Option<&[f32]>> = vec![None; n];
    for (job, losses) in &scored {
        if matches!(job.kind, Kind::Regular) {
            by_row[job.row] = Some(losses);
        }
    }
    let mut digest = TargetDigest::default();
    let (mut nats, mut bytes) = (0f64, 0u64);
    for (r, losses) in by_row.iter().enumerate() {
        let losses = losses.expect("every row scored once");
        let (_, targets) = rows.row(r);
        for (&l, &t) in losses.iter().zip(targets) {
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
    for (job, losses) in &scored {
        let regular = by_row[job.row].expect("scored");
        match job.kind {
            Kind::Regular => {}
            Kind::Causal { p, .. } => {
                for t in 0..=p {
                    let (a, b) = (regular[t] as f64, losses[t] as f64);
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
                    let (a, b) = (regular[t] as f64, losses[t] as f64);
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

    // Honest losses: the logit vector at the end of a prefix, which holds no later token.
    let (mut max_logit, mut bias_sum) = (0f64, 0f64);
    for _ in 0..plan.logit_prefixes {
        let (r, p) = (rng.below(n), rng.below(seq));
        let (inputs, targets) = rows.row(r);
        let reply = link
            .call(
                Request::Logits {
                    inputs: inputs[..=p].to_vec(),
                    positions: vec![p as u32],
                },
                vocab,
            )
            .map_err(EvalError::Link)?;
        requests += 1;
        let Mark::Logits(logits) = reply else {
            return Err(EvalError::Link(LinkError::Malformed(format!(
                "expected logits, got {}",
                describe(&reply)
            ))));
        };
        if logits.len() != vocab {
            return Err(EvalError::Invalid(format!(
                "the model returned {} logits for a {vocab}-token vocabulary",
                logits.len()
            )));
        }
        let recomputed = cross_entropy(&logits, targets[p] as usize).ok_or_else(|| {
            EvalError::Invalid(format!(
                "honest-loss audit failed: row {r}, position {p}: the logits are not finite"
            ))
        })?;
        let reported = by_row[r].expect("scored")[p] as f64;
        max_logit = max_logit.max((recomputed - reported).abs());
        bias_sum += recomputed - reported;
        if !tol.close(recomputed, reported) {
            return Err(EvalError::Invalid(format!(
                "honest-loss audit failed: row {r}, position {p}: the model reported {reported:.4} nats, but the cross-entropy of its own logits there (from the row's first {} tokens) is {recomputed:.4} (tolerance {}): losses must be the logits' cross-entropy",
                p + 1,
                tol.atol
            )));
        }
    }
    let k = plan.logit_prefixes as f64;
    let bias = bias_sum / k;
    // Honest differences are rounding, of either sign: their mean shrinks as 1/sqrt(k).
    let bias_bound = 3.0 * tol.atol / k.sqrt();
    if bias > bias_bound {
        return Err(EvalError::Invalid(format!(
            "honest-loss audit failed: over {k} positions the reported losses lie {bias:.2e} nats below the cross-entropy of the model's own logits on average (bound {bias_bound:.1e}): losses must be the logits' cross-entropy"
        )));
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
            mean_logit_bias: bias,
            requests,
            request_rows: batch_rows,
        },
    })
}

/// What kind of mark this is, for a message (never its contents, which may be huge).
pub(crate) fn describe(mark: &Mark) -> &'static str {
    match mark {
        Mark::Start => "a training-start mark",
        Mark::Evaluate(_) => "an evaluation request",
        Mark::Losses(_) => "losses",
        Mark::Logits(_) => "logits",
        Mark::Failed(_) => "a failure",
    }
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

/// The requests: the regular rows in order, in requests of `batch_rows`, with the audit rows
/// placed at random among them, never in the same request as their original row (a request of
/// their own at the end, where no other place is free).
fn plan_requests(
    rows: &Rows,
    plan: &AuditPlan,
    batch_rows: usize,
    vocab: usize,
    rng: &mut Rng,
) -> Vec<Vec<Job>> {
    let (n, seq) = (rows.len(), rows.seq);
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
        targets[p + 1..].copy_from_slice(&dy[p + 1..]);
        if inputs[p + 1] == x[p + 1] {
            // Every row has the same token there: change it by hand.
            inputs[p + 1] = (x[p + 1] + 1) % vocab.max(2) as u32;
        }
        extra.push(Job {
            row: r,
            kind: Kind::Causal { p, inputs, targets },
        });
    }
    for _ in 0..plan.repeat_rows {
        extra.push(Job {
            row: rng.below(n),
            kind: Kind::Repeat,
        });
    }
    let mut flat: Vec<Job> = (0..n)
        .map(|r| Job {
            row: r,
            kind: Kind::Regular,
        })
        .collect();
    for job in extra {
        let at = rng.below(flat.len() + 1);
        flat.insert(at, job);
    }
    pack(flat, batch_rows)
}

/// Packs jobs in order into requests of at most `batch_rows`, deferring a job that would share
/// a request with its original row (or an audit copy of it) to the next request.
fn pack(flat: Vec<Job>, batch_rows: usize) -> Vec<Vec<Job>> {
    let conflicts = |request: &[Job], job: &Job| {
        request.iter().any(|j| {
            j.row == job.row && matches!(j.kind, Kind::Regular) != matches!(job.kind, Kind::Regular)
        })
    };
    let mut pending: std::collections::VecDeque<Job> = flat.into();
    let mut requests = Vec::new();
    while !pending.is_empty() {
        let mut request: Vec<Job> = Vec::new();
        let mut deferred = Vec::new();
        while request.len() < batch_rows {
            let Some(job) = pending.pop_front() else {
                break;
            };
            if conflicts(&request, &job) {
                deferred.push(job);
            } else {
                request.push(job);
            }
        }
        for job in deferred.into_iter().rev() {
            pending.push_front(job);
        }
        requests.push(request);
    }
    requests
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A bigram "model" in the harness's own terms: honest, or with a one-token leak, scaled
    /// losses, state carried between requests, or losses shaved and logits bent to match them
    /// wherever the row shows the target.
    #[derive(Default)]
    struct Model {
        vocab: usize,
        leak: bool,
        loss_scale: Option<f32>,
        stateful: bool,
        /// Reports `nats - shave`; in logit requests boosts the target read from the next input.
        shave: f32,
        calls: usize,
    }

    impl Model {
        fn honest(vocab: usize) -> Model {
            Model {
                vocab,
                ..Model::default()
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
        fn call(&mut self, request: Request, _max: usize) -> Result<Mark, LinkError> {
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
                            let target = targets[r * seq + t] as usize;
                            let ce = cross_entropy(&self.logits_at(x, t), target).unwrap() as f32;
                            out.push(ce * self.loss_scale.unwrap_or(1.0) - self.shave);
                        }
                    }
                    Mark::Losses(out)
                }
                Request::Logits { inputs, positions } => {
                    let mut out = Vec::new();
                    for &p in &positions {
                        let mut l = self.logits_at(&inputs, p as usize);
                        if self.shave > 0.0 && (p as usize) + 1 < inputs.len() {
                            // Raise the target's logit until its cross-entropy drops by `shave`.
                            let target = inputs[p as usize + 1] as usize;
                            let before = cross_entropy(&l, target).unwrap();
                            let mut lo = l[target];
                            let mut hi = lo + 20.0;
                            for _ in 0..60 {
                                let mid = (lo + hi) / 2.0;
                                l[target] = mid;
                                if before - cross_entropy(&l, target).unwrap() < self.shave as f64 {
                                    lo = mid;
                                } else {
                                    hi = mid;
                                }
                            }
                        }
                        out.extend(l);
                    }
                    Mark::Logits(out)
                }
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

    fn run_with(model: &mut Model, seed: u64, n: usize, batch: usize) -> Result<Scored, EvalError> {
        let rows = rows(n, 16, 32);
        let bytes = vec![1u32; 32];
        let tol = Tolerance::for_device(crate::Device::Cpu);
        evaluate(model, &rows, &bytes, 32, batch, tol, &mut Rng::new(seed))
    }

    fn run(model: &mut Model, seed: u64) -> Result<Scored, EvalError> {
        run_with(model, seed, 40, 8)
    }

    fn invalid(r: Result<Scored, EvalError>) -> String {
        match r {
            Err(EvalError::Invalid(why)) => why,
            Err(other) => panic!("expected an invalid verdict, got {other:?}"),
            Ok(s) => panic!("expected an invalid verdict, got a score {}", s.val_bpb),
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
        // Odd shapes: one row, requests larger than the rows, one-row requests.
        for (n, batch) in [(1, 8), (3, 1024), (9, 1)] {
            run_with(&mut Model::honest(32), 1, n, batch).unwrap();
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
            m.loss_scale = Some(scale);
            let why = invalid(run(&mut m, 1));
            assert!(
                why.starts_with("honest-loss audit failed"),
                "{scale}: {why}"
            );
        }
        let mut m = Model::honest(32);
        m.loss_scale = Some(-1.0);
        assert!(invalid(run(&mut m, 1)).contains("never negative"));
    }

    #[test]
    fn shaved_losses_with_logits_bent_to_match_fail() {
        // Stateless: the logit request shows no later token, so the target cannot be boosted.
        for seed in 0..10 {
            let mut m = Model::honest(32);
            m.shave = 0.05;
            let why = invalid(run(&mut m, seed));
            assert!(why.starts_with("honest-loss audit failed"), "{why}");
        }
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
    fn audit_rows_never_share_a_request_with_their_original_and_requests_stay_small() {
        let rows = rows(40, 16, 32);
        for seed in 0..50 {
            for batch in [1, 3, 5] {
                let plan = AuditPlan::for_rows(40);
                let requests = plan_requests(&rows, &plan, batch, 32, &mut Rng::new(seed));
                let mut regular = 0;
                for request in &requests {
                    assert!(request.len() <= batch);
                    for job in request {
                        if matches!(job.kind, Kind::Regular) {
                            regular += 1;
                        } else {
                            assert!(
                                !request
                                    .iter()
                                    .any(|j| j.row == job.row && matches!(j.kind, Kind::Regular)),
                                "seed {seed}: an audit copy of row {} beside its original",
                                job.row
                            );
                        }
                    }
                }
                assert_eq!(regular, 40);
                let extra: usize = requests.iter().map(Vec::len).sum::<usize>() - 40;
                assert_eq!(extra, plan.causal_rows + plan.repeat_rows);
            }
        }
    }
}

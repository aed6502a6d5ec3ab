//! Which experiments are kept.
//!
//! The noise-aware rule (the default) measures the session's seed noise σ from repeated runs of
//! the same code (the baseline's, then every confirmation's), keeps a clear win at once,
//! discards a clear loss at once, and runs a result in between again with other seeds before
//! deciding on its mean. The best is the mean of its runs. `strict` is the original's rule: one
//! run, kept when strictly below the best.

use serde::{Deserialize, Serialize};

use crate::{Judgement, Session};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RuleKind {
    /// Margins in standard errors, confirmation runs, the best as a mean.
    Noise,
    /// The original's: kept when the one run is strictly below the best.
    Strict,
}

impl RuleKind {
    pub fn as_str(self) -> &'static str {
        match self {
            RuleKind::Noise => "noise",
            RuleKind::Strict => "strict",
        }
    }
}

/// The keep rule of a session, fixed when it starts (a resumed session keeps its own).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct KeepSettings {
    pub rule: RuleKind,
    /// Runs of the baseline, with seeds of their own: the session's first measure of σ.
    pub baseline_runs: usize,
    pub margins: Margins,
}

impl Default for KeepSettings {
    fn default() -> Self {
        KeepSettings {
            rule: RuleKind::Noise,
            baseline_runs: 3,
            margins: Margins::default(),
        }
    }
}

impl KeepSettings {
    /// The original's rule: one baseline run, one run per experiment, strictly lower kept.
    pub fn strict() -> Self {
        KeepSettings {
            rule: RuleKind::Strict,
            baseline_runs: 1,
            margins: Margins {
                max_runs: 1,
                ..Margins::default()
            },
        }
    }
}

/// The seed of run `run` of experiment `index`: the session's seed for the baseline's first
/// run (so `autoresearch train --seed` reproduces it), and a distinct, well-mixed one for
/// every other, so no two runs of a session share their luck.
pub fn run_seed(session_seed: u64, index: usize, run: usize) -> u64 {
    if index == 0 && run == 0 {
        return session_seed;
    }
    // SplitMix64's finaliser over the three numbers.
    let mut z = session_seed
        ^ (index as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)
        ^ (run as u64).wrapping_mul(0xD1B5_4A32_D192_ED03);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    (z ^ (z >> 31)) & ((1 << 53) - 1)
}

/// What the rule makes of the experiment in flight (the session's last record) after its runs
/// so far, and the figures behind it. The baseline is kept once it has its runs.
pub fn judge(settings: &KeepSettings, session: &Session) -> (Decision, Judgement) {
    judge_record(
        settings,
        session,
        session.records.last().expect("an experiment in flight"),
    )
}

/// What the rule makes of `candidate` (in flight) after its runs so far, against the session's
/// best now: in a session of several workers, not the best its episode began from.
pub fn judge_record(
    settings: &KeepSettings,
    session: &Session,
    candidate: &crate::Record,
) -> (Decision, Judgement) {
    let runs = candidate.values();
    let noise = session.noise();
    let mut j = Judgement {
        rule: settings.rule.as_str().into(),
        runs: runs.len(),
        sigma: noise.map(|n| n.sigma),
        seed_ignored: candidate.seed_ignored(),
        ..Judgement::default()
    };
    if runs.is_empty() {
        return (Decision::Discard, j);
    }
    let Some(best) = session.best() else {
        let enough = runs.len() >= settings.baseline_runs.max(1);
        return (
            if enough {
                Decision::Keep
            } else {
                Decision::Confirm
            },
            j,
        );
    };
    let best_runs = best.values();
    let best_mean = mean(&best_runs);
    j.best = Some(best_mean);
    j.gain_sigma = noise
        .filter(|n| n.sigma > 0.0)
        .map(|n| (best_mean - mean(&runs)) / n.sigma);
    let decision = match settings.rule {
        RuleKind::Strict => {
            if runs[0] < best_mean {
                Decision::Keep
            } else {
                Decision::Discard
            }
        }
        RuleKind::Noise => decide(
            &runs,
            &best_runs,
            noise.unwrap_or(Noise { sigma: 0.0, dof: 0 }),
            &settings.margins,
        ),
    };
    (decision, j)
}

/// What the noise-aware rule makes of a candidate after its runs so far.
/// What the noise-aware rule makes of a candidate after its runs so far.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    Keep,
    Discard,
    /// Too close to call: run it again with another seed.
    Confirm,
}

/// The margins of the noise-aware rule, in standard errors of the difference between the
/// candidate's mean and the best's mean (`σ·√(1/n_candidate + 1/n_best)`). Defaults from the
/// simulator (`cargo bench -p ledger --bench keep_rules`, table in BENCHMARKS.md).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Margins {
    /// Kept at once when better than the best by at least this many standard errors.
    pub win: f64,
    /// Discarded at once when better by less than this (negative: worse by more than |loss|).
    pub loss: f64,
    /// After the last confirmation run: kept when better by at least this many.
    pub confirm: f64,
    /// Runs one candidate may take, the first included.
    pub max_runs: usize,
}

impl Default for Margins {
    fn default() -> Self {
        Margins {
            win: 3.0,
            loss: 1.0,
            confirm: 2.0,
            max_runs: 4,
        }
    }
}

pub(crate) fn mean(xs: &[f64]) -> f64 {
    xs.iter().sum::<f64>() / xs.len() as f64
}

/// The seed noise of one run: σ and the degrees of freedom it was estimated with.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Noise {
    pub sigma: f64,
    pub dof: usize,
}

impl Noise {
    /// σ known exactly (the simulator's control).
    pub fn known(sigma: f64) -> Noise {
        Noise {
            sigma,
            dof: usize::MAX,
        }
    }

    /// How much wider the margins to keep get because σ is itself estimated: Student's t over
    /// the normal at 97.5 %. Three baseline runs (2 dof) more than double them; they come back
    /// towards 1 as confirmations add samples.
    fn widening(&self) -> f64 {
        const T975: [f64; 30] = [
            12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179,
            2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064,
            2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
        ];
        let t = match self.dof {
            0 => return 1.0,
            d if d <= 30 => T975[d - 1],
            d => 1.96 + 2.4 / d as f64,
        };
        t / 1.96
    }
}

/// Decides from the candidate's runs and the best's runs (val_bpb, lower is better) under
/// `noise`. The best is the mean of its runs, never its luckiest. Without a σ (a session whose
/// baseline ran once and never repeated) it falls back to comparing the means.
pub fn decide(candidate: &[f64], best: &[f64], noise: Noise, m: &Margins) -> Decision {
    assert!(!candidate.is_empty() && !best.is_empty());
    let se = noise.sigma * (1.0 / candidate.len() as f64 + 1.0 / best.len() as f64).sqrt();
    let gain = mean(best) - mean(candidate);
    if se <= 0.0 || !se.is_finite() {
        return if gain > 0.0 {
            Decision::Keep
        } else {
            Decision::Discard
        };
    }
    let z = gain / se;
    // An uncertain σ makes keeping harder, never discarding easier: a close call on a rough σ
    // is run again rather than thrown away.
    let z_keep = z / noise.widening();
    if z_keep >= m.win {
        Decision::Keep
    } else if z < m.loss {
        Decision::Discard
    } else if candidate.len() >= m.max_runs {
        if z_keep >= m.confirm {
            Decision::Keep
        } else {
            Decision::Discard
        }
    } else {
        Decision::Confirm
    }
}

/// σ from groups of repeated runs of the same code (each group its own mean): the pooled
/// sample standard deviation. `None` with fewer than two in any group.
pub fn pooled_sigma<'a>(groups: impl IntoIterator<Item = &'a [f64]>) -> Option<Noise> {
    let (mut ss, mut dof) = (0f64, 0usize);
    for g in groups.into_iter().filter(|g| g.len() >= 2) {
        let m = mean(g);
        ss += g.iter().map(|x| (x - m).powi(2)).sum::<f64>();
        dof += g.len() - 1;
    }
    (dof > 0).then(|| Noise {
        sigma: (ss / dof as f64).sqrt(),
        dof,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_clear_win_is_kept_at_once_a_clear_loss_discarded_and_the_rest_confirmed() {
        let m = Margins::default();
        let best = [1.000, 1.001, 0.999];
        let sigma = Noise::known(1e-3);
        // se with one run against three: 1e-3 * sqrt(4/3) = 1.15e-3.
        assert_eq!(decide(&[0.996], &best, sigma, &m), Decision::Keep);
        assert_eq!(decide(&[1.002], &best, sigma, &m), Decision::Discard);
        assert_eq!(decide(&[0.9985], &best, sigma, &m), Decision::Confirm);
        // Confirmed on the mean: a lucky first run that does not hold is discarded.
        assert_eq!(
            decide(&[0.9985, 1.0005], &best, sigma, &m),
            Decision::Discard
        );
        assert_eq!(
            decide(&[0.9985, 0.9975], &best, sigma, &m),
            Decision::Confirm
        );
        assert_eq!(
            decide(&[0.9985, 0.9975, 0.9980], &best, sigma, &m),
            Decision::Confirm
        );
        assert_eq!(
            decide(&[0.9985, 0.9975, 0.9980, 0.9980], &best, sigma, &m),
            Decision::Keep
        );
    }

    #[test]
    fn the_best_is_its_mean_not_its_luckiest_run() {
        let m = Margins::default();
        // The best's luckiest run (0.990) would hide this real, confirmed improvement.
        let best = [0.990, 1.010, 1.000];
        assert_eq!(
            decide(
                &[0.9950, 0.9960, 0.9955, 0.9955],
                &best,
                Noise::known(2e-3),
                &m
            ),
            Decision::Keep
        );
    }

    #[test]
    fn sigma_is_pooled_over_groups_of_repeats() {
        let Noise { sigma: s, dof } =
            pooled_sigma([&[1.0, 1.002][..], &[0.5][..], &[2.0, 2.0, 2.003][..]]).unwrap();
        assert_eq!(dof, 3);
        let expected = ((2e-6 + 6e-6) / 3f64).sqrt();
        assert!((s - expected).abs() < 1e-9, "{s} vs {expected}");
        assert!(pooled_sigma([&[1.0][..]]).is_none());
    }

    #[test]
    fn an_estimated_sigma_widens_the_margins_until_it_has_samples() {
        let m = Margins::default();
        let best = [1.000, 1.001, 0.999];
        // 3.5 SE better on one run against three: a clear win when σ is known ...
        let x = [1.0 - 3.5 * 1e-3 * (4f64 / 3.0).sqrt()];
        assert_eq!(decide(&x, &best, Noise::known(1e-3), &m), Decision::Keep);
        // ... too close to call on a σ from two degrees of freedom, a win again on thirty.
        let two = Noise {
            sigma: 1e-3,
            dof: 2,
        };
        assert_eq!(decide(&x, &best, two, &m), Decision::Confirm);
        let thirty = Noise {
            sigma: 1e-3,
            dof: 30,
        };
        assert_eq!(decide(&x, &best, thirty, &m), Decision::Keep);
    }

    #[test]
    fn run_seeds_differ_across_runs_and_experiments_and_start_at_the_sessions() {
        assert_eq!(run_seed(42, 0, 0), 42);
        let mut seen = std::collections::HashSet::new();
        for index in 0..50 {
            for run in 0..4 {
                assert!(seen.insert(run_seed(42, index, run)), "{index}/{run}");
            }
        }
        assert_ne!(run_seed(42, 1, 0), run_seed(43, 1, 0));
    }
}

//! Which experiments are kept.

use crate::Session;

/// Decides whether a finished, successful experiment is kept. Pluggable: a noise-aware rule
/// can replace the first cut.
pub trait KeepRule {
    fn keep(&self, session: &Session, val_bpb: f64) -> bool;
}

/// The first experiment (the baseline) is kept; later ones when strictly below the best kept.
pub struct StrictImprovement;

impl KeepRule for StrictImprovement {
    fn keep(&self, session: &Session, val_bpb: f64) -> bool {
        match session.best().and_then(|r| r.val_bpb()) {
            None => val_bpb.is_finite(),
            Some(best) => val_bpb < best,
        }
    }
}

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
#[derive(Clone, Copy, Debug, PartialEq)]
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
            win: 2.5,
            loss: 0.5,
            confirm: 1.5,
            max_runs: 3,
        }
    }
}

fn mean(xs: &[f64]) -> f64 {
    xs.iter().sum::<f64>() / xs.len() as f64
}

/// Decides from the candidate's runs and the best's runs (val_bpb, lower is better) under noise
/// of standard deviation `sigma`. The best is the mean of its runs, never its luckiest.
pub fn decide(candidate: &[f64], best: &[f64], sigma: f64, m: &Margins) -> Decision {
    assert!(!candidate.is_empty() && !best.is_empty());
    let se = sigma * (1.0 / candidate.len() as f64 + 1.0 / best.len() as f64).sqrt();
    let gain = mean(best) - mean(candidate);
    if se <= 0.0 || !se.is_finite() {
        return if gain > 0.0 {
            Decision::Keep
        } else {
            Decision::Discard
        };
    }
    let z = gain / se;
    if z >= m.win {
        Decision::Keep
    } else if z < m.loss {
        Decision::Discard
    } else if candidate.len() >= m.max_runs {
        if z >= m.confirm {
            Decision::Keep
        } else {
            Decision::Discard
        }
    } else {
        Decision::Confirm
    }
}

/// σ from groups of repeated runs of the same code (each group its own mean): the pooled
/// sample standard deviation and its degrees of freedom. `None` with fewer than two in any group.
pub fn pooled_sigma<'a>(groups: impl IntoIterator<Item = &'a [f64]>) -> Option<(f64, usize)> {
    let (mut ss, mut dof) = (0f64, 0usize);
    for g in groups.into_iter().filter(|g| g.len() >= 2) {
        let m = mean(g);
        ss += g.iter().map(|x| (x - m).powi(2)).sum::<f64>();
        dof += g.len() - 1;
    }
    (dof > 0).then(|| ((ss / dof as f64).sqrt(), dof))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_clear_win_is_kept_at_once_a_clear_loss_discarded_and_the_rest_confirmed() {
        let m = Margins::default();
        let best = [1.000, 1.001, 0.999];
        let sigma = 1e-3;
        // se with one run against three: 1e-3 * sqrt(4/3) = 1.15e-3.
        assert_eq!(decide(&[0.996], &best, sigma, &m), Decision::Keep);
        assert_eq!(decide(&[1.002], &best, sigma, &m), Decision::Discard);
        assert_eq!(decide(&[0.9990], &best, sigma, &m), Decision::Confirm);
        // Confirmed on the mean: a lucky first run that does not hold is discarded.
        assert_eq!(
            decide(&[0.9980, 1.0005, 1.0010], &best, sigma, &m),
            Decision::Discard
        );
        assert_eq!(
            decide(&[0.9980, 0.9978, 0.9983], &best, sigma, &m),
            Decision::Keep
        );
    }

    #[test]
    fn the_best_is_its_mean_not_its_luckiest_run() {
        let m = Margins::default();
        // The best's luckiest run (0.990) would hide this real, confirmed improvement.
        let best = [0.990, 1.010, 1.000];
        assert_eq!(
            decide(&[0.9950, 0.9960, 0.9955], &best, 2e-3, &m),
            Decision::Keep
        );
    }

    #[test]
    fn sigma_is_pooled_over_groups_of_repeats() {
        let (s, dof) =
            pooled_sigma([&[1.0, 1.002][..], &[0.5][..], &[2.0, 2.0, 2.003][..]]).unwrap();
        assert_eq!(dof, 3);
        let expected = ((2e-6 + 6e-6) / 3f64).sqrt();
        assert!((s - expected).abs() < 1e-9, "{s} vs {expected}");
        assert!(pooled_sigma([&[1.0][..]]).is_none());
    }
}

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

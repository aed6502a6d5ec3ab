//! Presets fix the evaluator's constants. The train file reads the preset's name to pick its
//! hyperparameters; the numbers here are not the train file's to change.

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Preset {
    pub name: String,
    /// Context length of training rows and of the evaluator.
    pub seq_len: usize,
    /// Target tokens the evaluator scores.
    pub eval_tokens: usize,
    /// Vocabulary size, four special tokens included.
    pub vocab_size: usize,
    /// Wall-clock training budget in seconds.
    pub time_budget_s: u64,
}

impl Preset {
    /// The original's constants, for one H100.
    pub fn h100() -> Self {
        Preset {
            name: "h100".into(),
            seq_len: 2048,
            eval_tokens: 40 * 524_288,
            vocab_size: 8192,
            time_budget_s: 300,
        }
    }

    /// CPU scale: a run of tens of seconds and an evaluation of a few seconds on two cores.
    pub fn tiny() -> Self {
        Preset {
            name: "tiny".into(),
            seq_len: 256,
            eval_tokens: 128 * 256,
            vocab_size: 1024,
            time_budget_s: 30,
        }
    }

    pub fn named(name: &str) -> Result<Self> {
        match name {
            "h100" => Ok(Self::h100()),
            "tiny" => Ok(Self::tiny()),
            other => Err(Error::UnknownPreset(other.to_string())),
        }
    }

    /// Rows of `seq_len` the evaluator scores.
    pub fn eval_rows(&self) -> usize {
        self.eval_tokens.div_ceil(self.seq_len)
    }
}

impl std::str::FromStr for Preset {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Self::named(s)
    }
}

//! The run report: the original's summary block, and the same figures with the evaluator's
//! token count and digest as JSON. A run outside the harness writes it (to
//! `$AUTORESEARCH_REPORT`, which the side-by-side benchmark reads); under the harness the
//! harness composes it from its own measurements and appends the block to the log.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::manifest::EvalSpec;
use crate::{Error, Result};

/// The figures of the summary block, in its order.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    pub val_bpb: f64,
    pub training_seconds: f64,
    pub total_seconds: f64,
    pub peak_vram_mb: f64,
    pub mfu_percent: f64,
    #[serde(rename = "total_tokens_M")]
    pub total_tokens_m: f64,
    pub num_steps: u64,
    #[serde(rename = "num_params_M")]
    pub num_params_m: f64,
    pub depth: u64,
}

impl Summary {
    /// The block the original prints, which people and tools grep for.
    pub fn to_block(&self) -> String {
        let line = |key: &str, value: String| format!("{:<18}{value}\n", format!("{key}:"));
        let mut out = String::from("---\n");
        out += &line("val_bpb", format!("{:.6}", self.val_bpb));
        out += &line("training_seconds", format!("{:.1}", self.training_seconds));
        out += &line("total_seconds", format!("{:.1}", self.total_seconds));
        out += &line("peak_vram_mb", format!("{:.1}", self.peak_vram_mb));
        out += &line("mfu_percent", format!("{:.2}", self.mfu_percent));
        out += &line("total_tokens_M", format!("{:.1}", self.total_tokens_m));
        out += &line("num_steps", self.num_steps.to_string());
        out += &line("num_params_M", format!("{:.1}", self.num_params_m));
        out += &line("depth", self.depth.to_string());
        out
    }

    /// Parses the last summary block in `log`; `None` when there is none or it is incomplete.
    pub fn parse(log: &str) -> Option<Summary> {
        let start = log.rfind("---\n")? + 4;
        let mut fields = std::collections::HashMap::new();
        for line in log[start..].lines() {
            let Some((key, value)) = line.split_once(':') else {
                break;
            };
            fields.insert(key.trim(), value.trim());
        }
        let num = |key: &str| fields.get(key)?.parse::<f64>().ok();
        let int = |key: &str| fields.get(key)?.parse::<u64>().ok();
        Some(Summary {
            val_bpb: num("val_bpb")?,
            training_seconds: num("training_seconds")?,
            total_seconds: num("total_seconds")?,
            peak_vram_mb: num("peak_vram_mb")?,
            mfu_percent: num("mfu_percent")?,
            total_tokens_m: num("total_tokens_M")?,
            num_steps: int("num_steps")?,
            num_params_m: num("num_params_M")?,
            depth: int("depth")?,
        })
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RunReport {
    #[serde(flatten)]
    pub summary: Summary,
    /// What the evaluator scored: the runner checks it against the manifest.
    pub eval: EvalSpec,
    pub preset: String,
    pub device: String,
}

impl RunReport {
    /// Prints the summary block and, when `$AUTORESEARCH_REPORT` is set, writes the JSON there.
    pub fn emit(&self) -> Result<()> {
        print!("{}", self.summary.to_block());
        if let Some(path) = std::env::var_os(crate::env::REPORT).filter(|p| !p.is_empty()) {
            self.write_json(Path::new(&path))?;
        }
        Ok(())
    }

    pub fn write_json(&self, path: &Path) -> Result<()> {
        let text = serde_json::to_string_pretty(self).expect("a report serialises");
        crate::write_atomic(path, text.as_bytes())
    }

    pub fn read_json(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        serde_json::from_str(&text).map_err(|e| Error::Read {
            path: path.to_path_buf(),
            why: e.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Summary {
        Summary {
            val_bpb: 0.9979,
            training_seconds: 300.1,
            total_seconds: 325.9,
            peak_vram_mb: 45060.2,
            mfu_percent: 39.8,
            total_tokens_m: 499.6,
            num_steps: 953,
            num_params_m: 50.3,
            depth: 8,
        }
    }

    #[test]
    fn block_matches_the_original_and_parses_back() {
        let block = sample().to_block();
        assert!(block.starts_with("---\nval_bpb:          0.997900\ntraining_seconds: 300.1\n"));
        assert!(block.contains("\nmfu_percent:      39.80\n"));
        let log = format!("step 00952 | loss 3.1\n{block}");
        assert_eq!(Summary::parse(&log), Some(sample()));
        // A cut-off block is not a summary.
        let cut = &block[..block.find("num_steps").unwrap()];
        assert_eq!(Summary::parse(cut), None);
    }

    #[test]
    fn json_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let report = RunReport {
            summary: sample(),
            eval: EvalSpec {
                tokens: 42,
                digest: "ab".into(),
            },
            preset: "h100".into(),
            device: "cuda".into(),
        };
        let path = dir.path().join("r.json");
        report.write_json(&path).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.contains("\"total_tokens_M\": 499.6"), "{text}");
        assert_eq!(RunReport::read_json(&path).unwrap(), report);
    }
}

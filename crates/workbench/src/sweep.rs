//! The `sweep` proposer: no LLM, one numeric constant per experiment.
//!
//! It reads the preset's hyperparameter block (`const TINY: Hyper = Hyper { … }` for preset
//! `tiny`, fields inherited through `..H100` included) and the scalar constants at the top
//! level, and proposes, in a fixed order, one step of one constant from the kept state:
//! multiplicative for rates and ratios, ±1 for small counts, ×2 or ÷2 for sizes. Steps the
//! workbench refuses as already tried (the same file, or the same value of the same constant)
//! are skipped, so the sweep needs no memory of its own: after a keep it starts over from the
//! new state (a greedy coordinate search over values not yet tried), and it resumes by itself.

use crate::{Proposer, ProposerError, ToolError, Workbench};

/// One proposed change: the whole new train file and how to describe it.
#[derive(Clone, Debug, PartialEq)]
pub struct Step {
    pub name: String,
    pub text: String,
    pub description: String,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Value {
    Int(u64),
    Float(f64),
}

/// Where a constant's value is written.
#[derive(Clone, Debug)]
enum Site {
    /// Line `line` reads `<indent>name: value,` (a struct field) or `const NAME: T = value;`.
    Line(usize),
    /// Inherited through `..BASE`: a field line is inserted before line `line`.
    Inherited(usize),
}

#[derive(Clone, Debug)]
struct Constant {
    name: String,
    value: Value,
    source: String,
    site: Site,
}

pub struct Sweep;

impl Proposer for Sweep {
    fn name(&self) -> String {
        "sweep".into()
    }

    fn episode(&mut self, bench: &mut dyn Workbench) -> Result<(), ProposerError> {
        let preset = bench.info().preset;
        let text = bench.train_file()?;
        for step in steps(&text, &preset) {
            bench.write_train_file(&step.text)?;
            match bench.run_experiment(
                &step.description,
                "sweep: one constant at a time, one step from the kept state",
            ) {
                Ok(_) => return Ok(()),
                Err(ToolError::AlreadyTried { .. } | ToolError::SettingsTried { .. }) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(ProposerError::Exhausted(format!(
            "every one-constant step from the kept train file has been tried (preset {preset})"
        )))
    }
}

/// Every step the sweep would try from `text`, in order: rates first, then sizes, then the
/// top-level constants; within that, each constant's first step before any constant's second.
pub fn steps(text: &str, preset: &str) -> Vec<Step> {
    let lines: Vec<&str> = text.lines().collect();
    let mut constants = hyper_block(&lines, &preset.to_ascii_uppercase());
    constants.sort_by_key(|c| matches!(c.value, Value::Int(_)));
    constants.extend(top_level(&lines));
    let per_constant: Vec<Vec<(Value, String)>> = constants
        .iter()
        .map(|c| moves(&c.name, c.value, &c.source))
        .collect();
    let rounds = per_constant.iter().map(Vec::len).max().unwrap_or(0);
    let mut out = Vec::new();
    for round in 0..rounds {
        for (c, moves) in constants.iter().zip(&per_constant) {
            let Some((_, written)) = moves.get(round) else {
                continue;
            };
            out.push(Step {
                name: c.name.clone(),
                text: rewrite(&lines, c, written, text.ends_with('\n')),
                description: format!("{} {} -> {}", c.name, c.source, written),
            });
        }
    }
    out
}

/// The fields of `const BLOCK: Hyper = Hyper { … }`, with those inherited from `..BASE`.
fn hyper_block(lines: &[&str], block: &str) -> Vec<Constant> {
    let Some((start, end)) = find_block(lines, block) else {
        return Vec::new();
    };
    let mut found = Vec::new();
    let mut base = None;
    for (i, line) in lines.iter().enumerate().take(end).skip(start + 1) {
        let t = line.trim();
        if let Some(name) = t.strip_prefix("..") {
            base = Some((i, name.trim_end_matches(',').trim().to_string()));
        } else if let Some((name, value)) = field(t) {
            found.push(Constant {
                name,
                value: value.0,
                source: value.1,
                site: Site::Line(i),
            });
        }
    }
    if let Some((at, base)) = base {
        for inherited in hyper_block(lines, &base) {
            if !found.iter().any(|c| c.name == inherited.name) {
                found.push(Constant {
                    site: Site::Inherited(at),
                    ..inherited
                });
            }
        }
    }
    found
}

fn find_block(lines: &[&str], block: &str) -> Option<(usize, usize)> {
    let start = lines.iter().position(|l| {
        let t = l.trim_start();
        t.starts_with(&format!("const {block}:")) && t.trim_end().ends_with('{')
    })?;
    let end = start
        + lines[start..]
            .iter()
            .position(|l| l.trim_start().starts_with("};"))?;
    Some((start, end))
}

/// `name: value,` with a numeric value.
fn field(t: &str) -> Option<(String, (Value, String))> {
    let (name, rest) = t.split_once(':')?;
    let name = name.trim();
    if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
        return None;
    }
    let source = rest.trim().strip_suffix(',')?.trim();
    Some((name.to_string(), (number(source)?, source.to_string())))
}

/// `const NAME: f64 = 15.0;` lines at the top level, before the first function. Reporting
/// constants (peak FLOPS) do not change training and are left alone.
fn top_level(lines: &[&str]) -> Vec<Constant> {
    let mut found = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        if line.starts_with("fn ") || line.starts_with("pub fn ") {
            break;
        }
        let Some(rest) = line.strip_prefix("const ") else {
            continue;
        };
        let Some((name, rest)) = rest.split_once(':') else {
            continue;
        };
        let Some((ty, value)) = rest.split_once('=') else {
            continue;
        };
        let ty = ty.trim();
        let is_scalar = matches!(ty, "f64" | "f32" | "usize" | "u64" | "u32" | "i64" | "i32");
        let Some(source) = value.trim().strip_suffix(';') else {
            continue;
        };
        if !is_scalar || name.contains("FLOPS") {
            continue;
        }
        if let Some(value) = number(source.trim()) {
            found.push(Constant {
                name: name.trim().to_string(),
                value,
                source: source.trim().to_string(),
                site: Site::Line(i),
            });
        }
    }
    found
}

/// A numeric literal, `a << b` or `a * b`.
fn number(source: &str) -> Option<Value> {
    let s = source.replace('_', "");
    if let Some((a, b)) = s.split_once("<<") {
        let (a, b) = (a.trim().parse::<u64>().ok()?, b.trim().parse::<u32>().ok()?);
        return a.checked_shl(b).map(Value::Int);
    }
    if s.contains('*') {
        let mut product = 1u64;
        for f in s.split('*') {
            product = product.checked_mul(f.trim().parse().ok()?)?;
        }
        return Some(Value::Int(product));
    }
    if let Ok(i) = s.parse::<u64>() {
        return Some(Value::Int(i));
    }
    let f = s.parse::<f64>().ok()?;
    (f.is_finite() && s.contains(['.', 'e'])).then_some(Value::Float(f))
}

/// The steps of one constant, each with its new value as written in the file.
fn moves(name: &str, value: Value, source: &str) -> Vec<(Value, String)> {
    let lower = name.to_ascii_lowercase();
    let fraction = lower.ends_with("_ratio") || lower.ends_with("_frac");
    let mut out: Vec<(Value, String)> = Vec::new();
    match value {
        Value::Float(0.0) => {
            if fraction {
                out.push((Value::Float(0.1), "0.1".into()));
            }
        }
        Value::Float(v) => {
            for k in [1.5, 1.0 / 1.5, 2.0, 0.5] {
                let mut x = round_sig(v * k);
                if fraction {
                    x = x.min(1.0);
                }
                if x != v && !out.iter().any(|(o, _)| *o == Value::Float(x)) {
                    out.push((Value::Float(x), float_literal(x)));
                }
            }
        }
        Value::Int(v) => {
            let counts = lower.contains("depth") || lower.contains("layer") || v <= 16;
            let candidates = if counts {
                vec![v + 1, v.saturating_sub(1)]
            } else {
                vec![v * 2, if v.is_multiple_of(2) { v / 2 } else { v }]
            };
            for x in candidates {
                if x >= 1 && x != v {
                    out.push((Value::Int(x), int_literal(x, source)));
                }
            }
        }
    }
    out
}

fn round_sig(x: f64) -> f64 {
    format!("{x:.3e}").parse().unwrap_or(x)
}

fn float_literal(x: f64) -> String {
    let s = format!("{x}");
    if s.contains(['.', 'e']) {
        s
    } else {
        format!("{s}.0")
    }
}

/// Keeps the file's style: `1 << k` stays a shift, `a * b` keeps its last factor.
fn int_literal(x: u64, source: &str) -> String {
    if source.contains("<<") && x.is_power_of_two() {
        return format!("1 << {}", x.trailing_zeros());
    }
    if let Some((_, last)) = source.rsplit_once('*')
        && let Ok(b) = last.trim().parse::<u64>()
        && b > 0
        && x.is_multiple_of(b)
    {
        return format!("{} * {b}", x / b);
    }
    x.to_string()
}

fn rewrite(lines: &[&str], c: &Constant, written: &str, trailing_newline: bool) -> String {
    let mut out: Vec<String> = lines.iter().map(|l| l.to_string()).collect();
    match c.site {
        Site::Line(i) => {
            let line = lines[i];
            // Replace the value after the (first) `:` or `=`, keeping the line's punctuation.
            let at = if line.trim_start().starts_with("const ") {
                line.find('=').expect("a const has =") + 1
            } else {
                line.find(':').expect("a field has :") + 1
            };
            let tail = if line.trim_end().ends_with(';') {
                ";"
            } else {
                ","
            };
            out[i] = format!("{} {written}{tail}", &line[..at]);
        }
        Site::Inherited(i) => {
            let indent: String = lines[i].chars().take_while(|c| c.is_whitespace()).collect();
            out.insert(i, format!("{indent}{}: {written},", c.name));
        }
    }
    let mut text = out.join("\n");
    if trailing_newline {
        text.push('\n');
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = "\
const H100: Hyper = Hyper {
    depth: 8,
    total_batch_size: 1 << 19,
    matrix_lr: 0.04,
    warmup_ratio: 0.0,
    adam_betas: (0.8, 0.95),
    window_pattern: \"SSSL\",
};

const TINY: Hyper = Hyper {
    depth: 4,
    total_batch_size: 8 * 256,
    ..H100
};

const SOFTCAP: f64 = 15.0;
const H100_BF16_PEAK_FLOPS: f64 = 989.5e12;

fn main() {}
";

    #[test]
    fn steps_cover_the_presets_block_rates_first_one_change_each() {
        let steps = steps(FILE, "tiny");
        let names: Vec<&str> = steps.iter().map(|s| s.name.as_str()).collect();
        // Round one: rates (inherited included), then sizes, then top-level constants.
        assert_eq!(
            &names[..5],
            [
                "matrix_lr",
                "warmup_ratio",
                "depth",
                "total_batch_size",
                "SOFTCAP"
            ]
        );
        assert!(!names.contains(&"H100_BF16_PEAK_FLOPS") && !names.contains(&"adam_betas"));
        let lr = &steps[0];
        assert_eq!(lr.description, "matrix_lr 0.04 -> 0.06");
        // Inherited: a line is inserted into TINY, H100 untouched.
        assert!(
            lr.text
                .contains("    total_batch_size: 8 * 256,\n    matrix_lr: 0.06,\n    ..H100")
        );
        assert!(lr.text.contains("    matrix_lr: 0.04,\n"));
        assert_eq!(lr.text.lines().count(), FILE.lines().count() + 1);
        let depth = steps.iter().find(|s| s.name == "depth").unwrap();
        assert!(
            depth
                .text
                .contains("    depth: 5,\n    total_batch_size: 8 * 256")
        );
        assert!(depth.text.contains("    depth: 8,"));
        let batch = steps.iter().find(|s| s.name == "total_batch_size").unwrap();
        assert_eq!(batch.description, "total_batch_size 8 * 256 -> 16 * 256");
        let softcap = steps.iter().find(|s| s.name == "SOFTCAP").unwrap();
        assert!(softcap.text.contains("const SOFTCAP: f64 = 22.5;\n"));
        // Each step is distinct.
        let mut texts: Vec<&str> = steps.iter().map(|s| s.text.as_str()).collect();
        texts.sort();
        texts.dedup();
        assert_eq!(texts.len(), steps.len());
    }

    #[test]
    fn the_h100_preset_edits_its_own_block_and_sizes_keep_their_style() {
        let steps = steps(FILE, "h100");
        let batch = steps.iter().find(|s| s.name == "total_batch_size").unwrap();
        assert!(
            batch
                .text
                .contains("    total_batch_size: 1 << 20,\n    matrix_lr: 0.04,")
        );
        let zero = steps.iter().find(|s| s.name == "warmup_ratio").unwrap();
        assert!(zero.text.contains("warmup_ratio: 0.1,"));
        assert!(
            super::steps(FILE, "nope")
                .iter()
                .all(|s| s.name == "SOFTCAP")
        );
    }

    #[test]
    fn the_real_train_file_has_steps_for_both_presets() {
        let file = include_str!("../../../train/src/main.rs");
        for preset in ["tiny", "h100"] {
            let steps = steps(file, preset);
            let names: Vec<&str> = steps.iter().map(|s| s.name.as_str()).collect();
            for expected in [
                "matrix_lr",
                "embedding_lr",
                "depth",
                "warmdown_ratio",
                "SOFTCAP",
            ] {
                assert!(names.contains(&expected), "{preset}: {names:?}");
            }
        }
    }
}

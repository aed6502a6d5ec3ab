//! The session's memory of ideas: what each experiment changed, read from its diff. A change
//! that only sets values (a `const`, or a field of a hyperparameter block such as
//! `TINY.matrix_lr`) is a *setting*; anything else is a *structural* change, known by its
//! description. The ledger groups settings by name, so an agent with a fresh context sees
//! every value tried and what it gave, and a proposal that sets values already tried is
//! refused before it costs a run.

use std::collections::BTreeMap;
use std::fmt::Write;

/// Setting name → value, as written in the source (`"0.04"`, `"1 << 19"`).
pub type Settings = BTreeMap<String, String>;

/// Every setting of a train file: `const NAME: T = VALUE;` at the top level, and
/// `field: VALUE,` inside a `const BLOCK: Type = Type { … }` block (as `BLOCK.field`).
pub fn settings(src: &str) -> Settings {
    scan(src).0
}

/// The settings, and the file's other meaningful lines (no blanks, no comments): two files
/// with the same other lines differ only in settings (a block's field set, unset or changed).
fn scan(src: &str) -> (Settings, Vec<String>) {
    let mut out = Settings::new();
    let mut shape = Vec::new();
    let mut block: Option<String> = None;
    for line in src.lines() {
        let t = line.trim();
        if t.is_empty() || t.starts_with("//") {
            continue;
        }
        if let Some(name) = &block {
            if t.starts_with('}') {
                block = None;
            } else if let Some((field, value)) = t.split_once(':')
                && is_ident(field.trim())
                && t.ends_with(',')
            {
                let key = format!("{name}.{}", field.trim());
                let value = value.trim().trim_end_matches(',').trim();
                out.insert(key, value.to_string());
                continue;
            }
            shape.push(t.to_string());
            continue;
        }
        let parsed = t.strip_prefix("const ").and_then(|rest| {
            let (name, after) = rest.split_once(':')?;
            let (ty, value) = after.split_once('=')?;
            Some((name.trim(), ty.trim(), value.trim()))
        });
        match parsed {
            Some((name, _, value)) if value.ends_with('{') => {
                block = Some(name.to_string());
                shape.push(t.to_string());
            }
            Some((name, ty, value)) if value.ends_with(';') => {
                shape.push(format!("const {name}: {ty} = _"));
                let v = value.trim_end_matches(';').trim();
                out.insert(name.to_string(), v.to_string());
            }
            _ => shape.push(t.to_string()),
        }
    }
    (out, shape)
}

fn is_ident(s: &str) -> bool {
    !s.is_empty()
        && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        && !s.starts_with(|c: char| c.is_ascii_digit())
}

/// A block field the child no longer sets (it falls back to the block's default).
pub const UNSET: &str = "(unset)";

/// The settings `child` sets differently from `parent`, when that is all it changes (comments
/// and blank lines aside); `None` for a structural change or none.
pub fn setting_changes(parent: &str, child: &str) -> Option<Settings> {
    let (a, shape_a) = scan(parent);
    let (b, shape_b) = scan(child);
    if shape_a != shape_b {
        return None;
    }
    let mut changed: Settings = b
        .iter()
        .filter(|(k, v)| a.get(*k) != Some(*v))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    for k in a.keys().filter(|k| !b.contains_key(*k)) {
        changed.insert(k.clone(), UNSET.into());
    }
    (!changed.is_empty()).then_some(changed)
}

/// One experiment, as the ledger of ideas sees it.
#[derive(Clone, Debug)]
pub struct Idea {
    pub index: usize,
    pub hash: String,
    pub description: String,
    /// `Some` for a settings-only change, else structural.
    pub settings: Option<Settings>,
    pub val_bpb: Option<f64>,
    pub status: String,
    pub gain_sigma: Option<f64>,
}

/// Structural changes listed by description (the latest; the results table has the rest).
const STRUCTURAL_SHOWN: usize = 30;
/// Values shown per setting (the latest; the count says how many were tried).
const VALUES_SHOWN: usize = 12;

/// The ledger as the agent reads it, bounded whatever the session's length: per setting the
/// values tried (latest 12), the latest 30 structural changes, and the near-misses.
pub fn render(ideas: &[Idea]) -> String {
    let tried: Vec<&Idea> = ideas.iter().filter(|i| i.index > 0).collect();
    if tried.is_empty() {
        return String::new();
    }
    let mut by_setting: BTreeMap<&str, Vec<(&str, &Idea)>> = BTreeMap::new();
    let mut structural = Vec::new();
    for idea in &tried {
        match &idea.settings {
            Some(s) => {
                for (k, v) in s {
                    by_setting.entry(k).or_default().push((v, idea));
                }
            }
            None => structural.push(*idea),
        }
    }
    let outcome = |i: &Idea| match i.val_bpb {
        Some(v) => format!("{v:.6} {}", i.status),
        None => i.status.clone(),
    };
    let mut out = String::from(
        "\n## Ideas tried so far (a proposal that sets values already tried is refused)\n",
    );
    if !by_setting.is_empty() {
        out += "Settings, value → result (#experiment):\n";
        for (name, values) in &by_setting {
            let skip = values.len().saturating_sub(VALUES_SHOWN);
            let shown: Vec<String> = values[skip..]
                .iter()
                .map(|(v, i)| format!("{v} → {} (#{})", outcome(i), i.index))
                .collect();
            let _ = write!(out, "- {name}: {}", shown.join("; "));
            if skip > 0 {
                let _ = write!(out, " [and {skip} earlier values]");
            }
            out.push('\n');
        }
    }
    if !structural.is_empty() {
        out += "Other changes:\n";
        let skip = structural.len().saturating_sub(STRUCTURAL_SHOWN);
        if skip > 0 {
            let _ = writeln!(out, "- [{skip} earlier ones: show_results lists them]");
        }
        for i in &structural[skip..] {
            let desc: String = i.description.chars().take(90).collect();
            let _ = writeln!(out, "- #{} {desc} → {}", i.index, outcome(i));
        }
    }
    // Discarded within one σ of the best: worth a second look combined with something else.
    let near: Vec<String> = tried
        .iter()
        .filter(|i| i.status == "discard" && i.gain_sigma.is_some_and(|g| g > -1.0))
        .rev()
        .take(10)
        .map(|i| {
            format!(
                "#{} {}",
                i.index,
                i.description.chars().take(60).collect::<String>()
            )
        })
        .collect();
    if !near.is_empty() {
        let _ = writeln!(
            out,
            "Near-misses (discarded within 1σ): {}",
            near.join("; ")
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const SRC: &str = "const SOFTCAP: f64 = 15.0;\nconst TINY: Hyper = Hyper {\n    depth: 4,\n    matrix_lr: 0.04,\n    ..H100\n};\n\nfn main() {\n    let x = 1;\n}\n";

    #[test]
    fn settings_are_consts_and_fields_of_const_blocks() {
        let s = settings(SRC);
        assert_eq!(s["SOFTCAP"], "15.0");
        assert_eq!(s["TINY.matrix_lr"], "0.04");
        assert_eq!(s["TINY.depth"], "4");
        assert_eq!(s.len(), 3, "{s:?}");
    }

    #[test]
    fn a_value_change_is_a_setting_and_anything_else_is_structural() {
        let child = SRC.replace("matrix_lr: 0.04", "matrix_lr: 0.05");
        let c = setting_changes(SRC, &child).unwrap();
        assert_eq!(c.len(), 1);
        assert_eq!(c["TINY.matrix_lr"], "0.05");
        let both = child
            .replace("15.0", "14.0")
            .replace("fn main() {", "// a comment\nfn main() {");
        assert_eq!(setting_changes(SRC, &both).unwrap().len(), 2);
        assert!(setting_changes(SRC, &SRC.replace("let x = 1;", "let x = 2;")).is_none());
        // A field set where the block's default applied, or unset: settings too.
        let set = SRC.replace("    depth: 4,\n", "    depth: 4,\n    scalar_lr: 0.0,\n");
        assert_eq!(setting_changes(SRC, &set).unwrap()["TINY.scalar_lr"], "0.0");
        let unset = SRC.replace("    depth: 4,\n", "");
        assert_eq!(setting_changes(SRC, &unset).unwrap()["TINY.depth"], UNSET);
        assert!(setting_changes(SRC, SRC).is_none(), "no change");
    }

    #[test]
    fn the_ledger_stays_bounded_after_500_experiments() {
        let mut ideas = vec![];
        for i in 1..=500 {
            let settings = (i % 2 == 0)
                .then(|| Settings::from([(format!("TINY.lr_{}", i % 7), format!("0.{i:03}"))]));
            ideas.push(Idea {
                index: i,
                hash: format!("{i:07}"),
                description: format!("idea number {i} with a longish description of the change"),
                settings,
                val_bpb: Some(0.9),
                status: if i % 5 == 0 { "keep" } else { "discard" }.into(),
                gain_sigma: Some(-0.5),
            });
        }
        let sizes: Vec<usize> = [10, 100, 500]
            .iter()
            .map(|&n| render(&ideas[..n]).len())
            .collect();
        eprintln!("ideas ledger at 10, 100, 500 experiments: {sizes:?} characters");
        assert!(sizes[2] < 8_000, "{sizes:?}");
        assert!(render(&ideas[..10]).contains("TINY.lr_2: 0.002 → 0.900000 discard (#2)"));
    }
}

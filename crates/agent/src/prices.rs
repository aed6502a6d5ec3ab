//! What tokens cost, per model: USD per million input and output tokens. The table is a
//! starting point; `autoresearch.toml` overrides or extends it.

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Price {
    pub input_per_mtok: f64,
    pub output_per_mtok: f64,
}

impl Price {
    pub fn cost(&self, input: u64, output: u64) -> f64 {
        (input as f64 * self.input_per_mtok + output as f64 * self.output_per_mtok) / 1e6
    }
}

/// Built-in prices, matched by model-name prefix (the longest wins).
const TABLE: &[(&str, f64, f64)] = &[
    ("gpt-4.1", 2.0, 8.0),
    ("gpt-4.1-mini", 0.4, 1.6),
    ("gpt-4o", 2.5, 10.0),
    ("gpt-4o-mini", 0.15, 0.6),
    ("gpt-5", 1.25, 10.0),
    ("gpt-5-mini", 0.25, 2.0),
    ("o3", 2.0, 8.0),
    ("o4-mini", 1.1, 4.4),
    ("claude-opus-4", 15.0, 75.0),
    ("claude-sonnet-4", 3.0, 15.0),
    ("claude-3-5-haiku", 0.8, 4.0),
    ("claude-haiku-4", 1.0, 5.0),
];

pub fn lookup(model: &str) -> Option<Price> {
    TABLE
        .iter()
        .filter(|(prefix, _, _)| model.starts_with(prefix))
        .max_by_key(|(prefix, _, _)| prefix.len())
        .map(|&(_, i, o)| Price {
            input_per_mtok: i,
            output_per_mtok: o,
        })
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_longest_prefix_wins() {
        assert_eq!(
            super::lookup("gpt-4.1-mini-2025").unwrap().input_per_mtok,
            0.4
        );
        assert_eq!(super::lookup("gpt-4.1").unwrap().input_per_mtok, 2.0);
        assert!(super::lookup("llama3").is_none());
        let p = super::lookup("claude-sonnet-4-5").unwrap();
        assert!((p.cost(1_000_000, 100_000) - 4.5).abs() < 1e-9);
    }
}

//! What a model costs and how much it takes: USD per million tokens (input, output, and
//! prompt-cache reads and writes), its output limit and its context window. The table is a
//! starting point (list prices); `autoresearch.toml` and flags override or extend it.

use crate::conversation::Usage;

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Price {
    pub input_per_mtok: f64,
    pub output_per_mtok: f64,
    /// Input tokens read from the prompt cache.
    pub cache_read_per_mtok: f64,
    /// Input tokens written to the prompt cache (Anthropic: 1.25× input; OpenAI: no surcharge).
    pub cache_write_per_mtok: f64,
}

impl Price {
    /// A price without cache discounts: cached tokens cost what other input costs.
    pub fn flat(input_per_mtok: f64, output_per_mtok: f64) -> Price {
        Price {
            input_per_mtok,
            output_per_mtok,
            cache_read_per_mtok: input_per_mtok,
            cache_write_per_mtok: input_per_mtok,
        }
    }

    pub fn cost(&self, usage: &Usage) -> f64 {
        let plain = usage
            .input_tokens
            .saturating_sub(usage.cache_read_tokens + usage.cache_write_tokens);
        (plain as f64 * self.input_per_mtok
            + usage.cache_read_tokens as f64 * self.cache_read_per_mtok
            + usage.cache_write_tokens as f64 * self.cache_write_per_mtok
            + usage.output_tokens as f64 * self.output_per_mtok)
            / 1e6
    }
}

/// What is known of a model by name.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ModelInfo {
    pub price: Price,
    /// The output limit we ask for: the model's own, capped at [`OUTPUT_CAP`].
    pub max_output_tokens: u32,
    pub context_window: u64,
}

/// Output tokens asked for when the model allows more: room for the whole train file (~10 k
/// tokens) twice over, and a reply that still arrives within the request timeout.
pub const OUTPUT_CAP: u32 = 32_000;

/// Output tokens for a model not in the table (local servers often default to far less).
pub const DEFAULT_OUTPUT: u32 = 16_384;

/// (prefix, input, output, cache read, cache write, max output, context window).
type Row = (&'static str, f64, f64, f64, f64, u32, u64);

const TABLE: &[Row] = &[
    ("gpt-4.1", 2.0, 8.0, 0.5, 2.0, 32_768, 1_047_576),
    ("gpt-4.1-mini", 0.4, 1.6, 0.1, 0.4, 32_768, 1_047_576),
    ("gpt-4o", 2.5, 10.0, 1.25, 2.5, 16_384, 128_000),
    ("gpt-4o-mini", 0.15, 0.6, 0.075, 0.15, 16_384, 128_000),
    ("gpt-5", 1.25, 10.0, 0.125, 1.25, 128_000, 400_000),
    ("gpt-5-mini", 0.25, 2.0, 0.025, 0.25, 128_000, 400_000),
    ("o3", 2.0, 8.0, 0.5, 2.0, 100_000, 200_000),
    ("o4-mini", 1.1, 4.4, 0.275, 1.1, 100_000, 200_000),
    ("claude-opus-4", 15.0, 75.0, 1.5, 18.75, 32_000, 200_000),
    ("claude-opus-4-5", 5.0, 25.0, 0.5, 6.25, 64_000, 200_000),
    ("claude-sonnet-4", 3.0, 15.0, 0.3, 3.75, 64_000, 200_000),
    ("claude-3-5-haiku", 0.8, 4.0, 0.08, 1.0, 8_192, 200_000),
    ("claude-haiku-4", 1.0, 5.0, 0.1, 1.25, 64_000, 200_000),
];

/// The table's row for `model`, matched by name prefix (the longest wins).
pub fn model_info(model: &str) -> Option<ModelInfo> {
    TABLE
        .iter()
        .filter(|row| model.starts_with(row.0))
        .max_by_key(|row| row.0.len())
        .map(|&(_, i, o, r, w, out, window)| ModelInfo {
            price: Price {
                input_per_mtok: i,
                output_per_mtok: o,
                cache_read_per_mtok: r,
                cache_write_per_mtok: w,
            },
            max_output_tokens: out.min(OUTPUT_CAP),
            context_window: window,
        })
}

pub fn lookup(model: &str) -> Option<Price> {
    model_info(model).map(|m| m.price)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_longest_prefix_wins() {
        assert_eq!(lookup("gpt-4.1-mini-2025").unwrap().input_per_mtok, 0.4);
        assert_eq!(lookup("gpt-4.1").unwrap().input_per_mtok, 2.0);
        assert!(lookup("llama3").is_none());
        let p = lookup("claude-sonnet-4-5").unwrap();
        let usage = |input, read, write, output| Usage {
            input_tokens: input,
            cache_read_tokens: read,
            cache_write_tokens: write,
            output_tokens: output,
        };
        assert!((p.cost(&usage(1_000_000, 0, 0, 100_000)) - 4.5).abs() < 1e-9);
        // 800 k read at $0.30, 100 k written at $3.75, 100 k plain at $3, 0 out.
        let cached = p.cost(&usage(1_000_000, 800_000, 100_000, 0));
        assert!((cached - (0.24 + 0.375 + 0.3)).abs() < 1e-9, "{cached}");
        assert_eq!(
            model_info("claude-opus-4-5").unwrap().price.input_per_mtok,
            5.0
        );
        assert_eq!(model_info("gpt-5").unwrap().max_output_tokens, OUTPUT_CAP);
        assert_eq!(model_info("gpt-4o").unwrap().max_output_tokens, 16_384);
    }
}

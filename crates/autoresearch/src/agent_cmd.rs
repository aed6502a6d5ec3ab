//! The LLM agent's settings: flags, else `autoresearch.toml` in the repository, else defaults.
//! The key comes only from the provider's environment variable.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, Result, bail};
use clap::Args;
use serde::Deserialize;

#[derive(Args, Clone, Debug, Default)]
pub struct LlmArgs {
    /// openai (any OpenAI-compatible server: OpenAI, OpenRouter, vLLM, llama.cpp, Ollama) or
    /// anthropic [default: autoresearch.toml, else anthropic when only ANTHROPIC_API_KEY is set,
    /// else openai].
    #[arg(long)]
    pub provider: Option<String>,
    /// The model [default: gpt-4.1 for openai, claude-sonnet-4-5 for anthropic].
    #[arg(long)]
    pub model: Option<String>,
    /// The API's base URL, e.g. http://localhost:11434/v1 for Ollama.
    #[arg(long)]
    pub base_url: Option<String>,
    /// Stop starting experiments once the model calls have cost this much (USD).
    #[arg(long)]
    pub max_cost: Option<f64>,
    /// Output tokens a reply may have [default: the model's own limit up to 32,000 for known
    /// models, else 16,384].
    #[arg(long)]
    pub max_output_tokens: Option<u32>,
    /// The model's context window in tokens (a local server's `--ctx-size`), so no request
    /// outgrows it [default: known models' own; else learned from the server's first refusal].
    #[arg(long)]
    pub context_window: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    pub provider: Option<String>,
    pub model: Option<String>,
    pub base_url: Option<String>,
    pub max_cost: Option<f64>,
    pub max_tool_calls: Option<usize>,
    /// Rows of the results table in each episode's context.
    pub context_results: Option<usize>,
    pub max_output_tokens: Option<u32>,
    pub context_window: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PriceConfig {
    /// USD per million input tokens.
    pub input: f64,
    /// USD per million output tokens.
    pub output: f64,
    /// USD per million input tokens read from the prompt cache [default: `input`].
    pub cached_input: Option<f64>,
    /// USD per million input tokens written to the prompt cache [default: `input`].
    pub cache_write: Option<f64>,
}

/// `autoresearch.toml`: `[agent]` settings and `[prices."model"]` overrides.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub agent: AgentConfig,
    #[serde(default)]
    pub prices: BTreeMap<String, PriceConfig>,
    #[serde(default)]
    pub slurm: SlurmConfig,
}

/// `[slurm]`: how `run --executor slurm` submits experiments.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SlurmConfig {
    pub partition: Option<String>,
    pub account: Option<String>,
    /// GPUs per job [default: 1 on CUDA, none on the CPU].
    pub gpus_per_job: Option<u32>,
    pub cpus_per_job: Option<u32>,
    /// Minutes of time limit beyond the run's own deadlines [default: 5].
    pub grace_minutes: Option<u64>,
    /// More `sbatch` flags, as given (e.g. ["--qos=normal", "--constraint=h100"]).
    #[serde(default)]
    pub sbatch_args: Vec<String>,
}

impl Config {
    pub fn load(repo: &Path) -> Result<Config> {
        let path = repo.join("autoresearch.toml");
        match std::fs::read_to_string(&path) {
            Ok(text) => {
                toml::from_str(&text).with_context(|| format!("reading {}", path.display()))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Config::default()),
            Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
        }
    }
}

fn is_loopback(url: &str) -> bool {
    let host = url.split("://").nth(1).unwrap_or(url);
    ["localhost", "127.", "[::1]", "0.0.0.0"]
        .iter()
        .any(|h| host.starts_with(h))
}

pub fn build(args: &LlmArgs, config: &Config, repo: &Path) -> Result<agent::LlmAgent> {
    let has = |var: &str| std::env::var(var).is_ok_and(|v| !v.is_empty());
    let provider_name = args
        .provider
        .clone()
        .or(config.agent.provider.clone())
        .unwrap_or_else(|| {
            if has("ANTHROPIC_API_KEY") && !has("OPENAI_API_KEY") {
                "anthropic".into()
            } else {
                "openai".into()
            }
        });
    let Some(provider) = agent::Provider::parse(&provider_name) else {
        bail!("--provider must be openai or anthropic, not `{provider_name}`");
    };
    let model = args
        .model
        .clone()
        .or(config.agent.model.clone())
        .unwrap_or_else(|| match provider {
            agent::Provider::OpenAi => "gpt-4.1".into(),
            agent::Provider::Anthropic => "claude-sonnet-4-5".into(),
        });
    let base_url = args
        .base_url
        .clone()
        .or(config.agent.base_url.clone())
        .unwrap_or_else(|| provider.default_base_url().to_string());
    let var = provider.key_var();
    let key = match std::env::var(var) {
        Ok(k) if !k.trim().is_empty() => k.trim().to_string(),
        // Local servers (Ollama, llama.cpp, vLLM) take no key.
        _ if is_loopback(&base_url) => String::new(),
        _ => bail!(
            "{var} is not set: `export {var}=...` with your {} key, pick another provider with --provider, or run without an LLM with --agent sweep",
            provider.as_str()
        ),
    };
    let program_path = repo.join("program.md");
    let program = std::fs::read_to_string(&program_path).with_context(|| {
        format!(
            "reading {}: the agent's instructions live there",
            program_path.display()
        )
    })?;
    let price = config
        .prices
        .get(&model)
        .map(|p| agent::Price {
            cache_read_per_mtok: p.cached_input.unwrap_or(p.input),
            cache_write_per_mtok: p.cache_write.unwrap_or(p.input),
            ..agent::Price::flat(p.input, p.output)
        })
        .or_else(|| agent::prices::lookup(&model));
    if price.is_none() {
        tracing::warn!(
            "no price known for model `{model}`: tokens are counted, cost is not (add [prices.\"{model}\"] to autoresearch.toml)"
        );
    }
    let mut limits = agent::Limits::default();
    if let Some(n) = config.agent.max_tool_calls {
        limits.tool_calls = n;
    }
    if let Some(n) = config.agent.context_results {
        limits.result_rows = n;
    }
    let known = agent::prices::model_info(&model);
    limits.max_output_tokens = args
        .max_output_tokens
        .or(config.agent.max_output_tokens)
        .or(known.map(|m| m.max_output_tokens))
        .unwrap_or(agent::prices::DEFAULT_OUTPUT);
    if limits.max_output_tokens < 1024 {
        bail!(
            "--max-output-tokens {} leaves no room for an edit: give 1024 or more",
            limits.max_output_tokens
        );
    }
    limits.context_window = args
        .context_window
        .or(config.agent.context_window)
        .or(known.map(|m| m.context_window));
    let client = agent::Client::new(provider, &model, &base_url, key, retry_policy())?;
    Ok(agent::LlmAgent::new(client, program, price, limits)?)
}

/// Overnight defaults; tests shorten them through the environment.
fn retry_policy() -> agent::RetryPolicy {
    let mut policy = agent::RetryPolicy::default();
    let secs = |var: &str| std::env::var(var).ok().and_then(|v| v.parse::<f64>().ok());
    if let Some(s) = secs("AUTORESEARCH_RETRY_INITIAL_S") {
        policy.initial = std::time::Duration::from_secs_f64(s);
    }
    if let Some(s) = secs("AUTORESEARCH_RETRY_MAX_S") {
        policy.max_delay = std::time::Duration::from_secs_f64(s);
    }
    if let Some(s) = secs("AUTORESEARCH_REQUEST_TIMEOUT_S") {
        policy.request_timeout = std::time::Duration::from_secs_f64(s);
    }
    policy
}

//! One model call over HTTP, with the retries that keep a night going: backoff with jitter on
//! 429, 5xx, timeouts and dropped connections (honouring `Retry-After`), an immediate stop on
//! a refused key or an unknown model, and a distinct error for a context that is too long.

use std::time::Duration;

use serde_json::Value;

use crate::conversation::{Reply, Request};
use crate::provider::Provider;

#[derive(Clone, Debug)]
pub struct RetryPolicy {
    pub initial: Duration,
    pub max_delay: Duration,
    /// Give up after this many attempts on one call (`None`: never, for overnight runs).
    pub max_attempts: Option<u32>,
    /// A request with no response in this time is dropped and retried.
    pub request_timeout: Duration,
    /// The same server error (500, 502 or 504 with the same message) to the same request this
    /// many times in a row ends the call: a server that cannot take this request (vLLM and
    /// llama.cpp answer 500 to what they cannot parse) will not take it tomorrow either.
    /// Overload (429, 503, 529) is waited out however long it lasts.
    pub max_identical_errors: u32,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            initial: Duration::from_secs(2),
            max_delay: Duration::from_secs(300),
            max_attempts: None,
            request_timeout: Duration::from_secs(600),
            max_identical_errors: 5,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The session cannot go on: bad key, unknown model, unreachable endpoint config.
    #[error("{0}")]
    Fatal(String),
    /// The conversation no longer fits the model's window.
    #[error("context too long: {0}")]
    ContextTooLong(String),
    /// The provider rejected this request (a 400): the episode is abandoned, the night goes on.
    #[error("request rejected: {0}")]
    Rejected(String),
    /// Retries ran out (only with `max_attempts`), or a stop was requested while waiting.
    #[error("{0}")]
    GaveUp(String),
}

pub struct Client {
    http: reqwest::Client,
    pub provider: Provider,
    pub model: String,
    base_url: String,
    key: String,
    pub retry: RetryPolicy,
}

// The key must never be printed, not even by `{:?}`.
impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("provider", &self.provider)
            .field("model", &self.model)
            .field("base_url", &self.base_url)
            .finish_non_exhaustive()
    }
}

impl Client {
    pub fn new(
        provider: Provider,
        model: &str,
        base_url: &str,
        key: String,
        retry: RetryPolicy,
    ) -> Result<Client, ApiError> {
        let http = reqwest::Client::builder()
            .timeout(retry.request_timeout)
            .connect_timeout(Duration::from_secs(30))
            .build()
            .map_err(|e| ApiError::Fatal(format!("HTTP client: {e}")))?;
        Ok(Client {
            http,
            provider,
            model: model.to_string(),
            base_url: base_url.to_string(),
            key,
            retry,
        })
    }

    /// The key, wherever it might have been echoed, replaced.
    fn scrub(&self, text: &str) -> String {
        if self.key.len() >= 4 {
            text.replace(&self.key, "[redacted]")
        } else {
            text.to_string()
        }
    }

    /// Sends one request, retrying passing faults until it gets a reply. `stop` is polled while
    /// waiting, so Ctrl-C is never held up by a backoff.
    pub async fn complete(
        &self,
        req: &Request<'_>,
        stop: &dyn Fn() -> bool,
    ) -> Result<Reply, ApiError> {
        let url = self.provider.endpoint(&self.base_url);
        let mut body = self.provider.body(&self.model, req);
        // OpenAI's own API wants the newer name (its reasoning models refuse `max_tokens`);
        // compatible servers know the older one.
        if self.provider == Provider::OpenAi
            && self.base_url.contains("api.openai.com")
            && let Some(v) = body.as_object_mut().and_then(|o| o.remove("max_tokens"))
        {
            body["max_completion_tokens"] = v;
        }
        let mut unreadable = 0;
        let mut attempt: u32 = 0;
        // The last server error and how many times in a row it came.
        let mut repeated: (String, u32) = (String::new(), 0);
        loop {
            attempt += 1;
            // Ctrl-C must not wait for a slow model: poll the stop flag beside the request.
            let stopped = async {
                while !stop() {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            };
            let result = tokio::select! {
                r = self.attempt(&url, &body) => r,
                () = stopped => return Err(ApiError::GaveUp("stopped during a model call".into())),
            };
            let wait = match result {
                Ok(reply) => return Ok(reply),
                Err(Attempt::Fail(e)) => return Err(e),
                Err(Attempt::Unreadable(why)) => {
                    // A proxy answering 200 with something else: worth a few tries, not a night.
                    unreadable += 1;
                    if unreadable >= 3 {
                        return Err(ApiError::Rejected(format!("{why} ({unreadable} times)")));
                    }
                    backoff(&self.retry, attempt)
                }
                Err(Attempt::Retry { why, after, status }) => {
                    if matches!(status, Some(500 | 502 | 504)) {
                        if repeated.0 == why {
                            repeated.1 += 1;
                        } else {
                            repeated = (why.clone(), 1);
                        }
                        if repeated.1 >= self.retry.max_identical_errors {
                            return Err(ApiError::Rejected(format!(
                                "the server answered {why} {} times in a row to this request",
                                repeated.1
                            )));
                        }
                    } else {
                        repeated = (String::new(), 0);
                    }
                    if self.retry.max_attempts.is_some_and(|m| attempt >= m) {
                        return Err(ApiError::GaveUp(format!(
                            "{why} (after {attempt} attempts)"
                        )));
                    }
                    let backoff = backoff(&self.retry, attempt);
                    // Retry-After can only lengthen the wait: `0` must not make a tight loop.
                    let wait =
                        after.map_or(backoff, |a| a.min(Duration::from_secs(3600)).max(backoff));
                    tracing::warn!(
                        "model call: {why}; retrying in {:.1}s (attempt {attempt})",
                        wait.as_secs_f64()
                    );
                    wait
                }
            };
            let until = tokio::time::Instant::now() + wait;
            while tokio::time::Instant::now() < until {
                if stop() {
                    return Err(ApiError::GaveUp("stopped while waiting to retry".into()));
                }
                tokio::time::sleep(
                    Duration::from_millis(100).min(until - tokio::time::Instant::now()),
                )
                .await;
            }
        }
    }

    async fn attempt(&self, url: &str, body: &Value) -> Result<Reply, Attempt> {
        let mut request = self
            .http
            .post(url)
            .header("content-type", "application/json");
        for (name, value) in self.provider.headers(&self.key) {
            request = request.header(name, value);
        }
        let response = match request.body(body.to_string()).send().await {
            Ok(r) => r,
            Err(e) => {
                let why = if e.is_timeout() {
                    "timed out".to_string()
                } else if e.is_connect() {
                    format!("could not connect to {url}")
                } else {
                    "the connection failed".to_string()
                };
                return Err(Attempt::Retry {
                    why,
                    after: None,
                    status: None,
                });
            }
        };
        let status = response.status().as_u16();
        let retry_after = response
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<f64>().ok())
            .filter(|s| s.is_finite() && *s >= 0.0)
            .map(Duration::from_secs_f64);
        let text = match response.text().await {
            Ok(t) => t,
            Err(_) => {
                return Err(Attempt::Retry {
                    why: "the response was cut off".into(),
                    after: None,
                    status: None,
                });
            }
        };
        let detail = self.scrub(&error_message(&text));
        match status {
            200..=299 => {
                let json: Value = serde_json::from_str(&text)
                    .map_err(|_| Attempt::Unreadable("the response was not JSON".into()))?;
                self.provider
                    .parse_reply(&json)
                    .map_err(Attempt::Unreadable)
            }
            401 | 403 => Err(Attempt::Fail(ApiError::Fatal(format!(
                "{} refused the API key ({status}: {detail}): check {} (and --base-url)",
                self.provider.as_str(),
                self.provider.key_var()
            )))),
            404 => Err(Attempt::Fail(ApiError::Fatal(format!(
                "model `{}` was not found at {url} (404: {detail}): check --model and --base-url",
                self.model
            )))),
            400 | 422 | 500 if is_context_error(&detail) => {
                Err(Attempt::Fail(ApiError::ContextTooLong(detail)))
            }
            408 | 409 | 425 | 429 | 500..=599 => Err(Attempt::Retry {
                why: format!("{status}: {detail}"),
                after: retry_after,
                status: Some(status),
            }),
            413 => Err(Attempt::Fail(ApiError::ContextTooLong(detail))),
            _ => Err(Attempt::Fail(ApiError::Rejected(format!(
                "{status}: {detail}"
            )))),
        }
    }
}

enum Attempt {
    /// A success status with a body that is not a reply.
    Unreadable(String),
    Retry {
        why: String,
        after: Option<Duration>,
        status: Option<u16>,
    },
    Fail(ApiError),
}

/// Doubling delay with ±50 % jitter, capped.
fn backoff(policy: &RetryPolicy, attempt: u32) -> Duration {
    let base = policy.initial.as_secs_f64() * 2f64.powi(attempt.saturating_sub(1).min(20) as i32);
    let capped = base.min(policy.max_delay.as_secs_f64());
    Duration::from_secs_f64(capped * (0.5 + jitter()))
}

/// A number in [0, 1) that differs between calls and processes (no RNG crate needed).
fn jitter() -> f64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos() as u64);
    let mut x = nanos ^ (u64::from(std::process::id()) << 32) ^ 0x9e37_79b9_7f4a_7c15;
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    (x >> 11) as f64 / (1u64 << 53) as f64
}

/// The provider's error message from a JSON error body, else the body's start.
fn error_message(body: &str) -> String {
    let from_json = serde_json::from_str::<Value>(body).ok().and_then(|v| {
        v.pointer("/error/message")
            .or_else(|| v.get("message"))
            .or_else(|| v.get("error"))
            .and_then(Value::as_str)
            .map(str::to_string)
    });
    from_json.unwrap_or_else(|| body.chars().take(300).collect())
}

/// Whether a provider's error says the request does not fit the model's window: OpenAI's and
/// vLLM's "maximum context length", Anthropic's "prompt is too long", llama.cpp's "exceeds the
/// available context size", Ollama's "exceeds the context length".
fn is_context_error(message: &str) -> bool {
    let m = message.to_ascii_lowercase();
    [
        "context length",
        "context_length",
        "maximum context",
        "too long",
        "too many tokens",
        "context window",
        "context size",
        "exceed_context",
        "n_ctx",
    ]
    .iter()
    .any(|s| m.contains(s))
}

/// The model's window in tokens, where a context error names it.
pub fn context_window_in(message: &str) -> Option<u64> {
    let m = message.to_ascii_lowercase();
    let number_after = |marker: &str| -> Option<u64> {
        let rest = &m[m.find(marker)? + marker.len()..];
        let digits: String = rest
            .trim_start()
            .chars()
            .take_while(|c| c.is_ascii_digit() || *c == ',')
            .filter(char::is_ascii_digit)
            .collect();
        digits.parse().ok().filter(|&n| n > 0)
    };
    [
        "available context size (",
        "context size (",
        "maximum context length is",
        "context length is",
        "context length of",
        "context window of",
        "context window is",
        "n_ctx =",
        "n_ctx:",
    ]
    .iter()
    .find_map(|marker| number_after(marker))
    .or_else(|| {
        // Anthropic: "prompt is too long: 250000 tokens > 200000 maximum".
        let before = &m[..m.find(" maximum")?];
        let digits: String = before
            .chars()
            .rev()
            .take_while(char::is_ascii_digit)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect();
        digits.parse().ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_is_capped_and_jittered() {
        let p = RetryPolicy {
            initial: Duration::from_secs(1),
            max_delay: Duration::from_secs(10),
            ..RetryPolicy::default()
        };
        let d1 = backoff(&p, 1).as_secs_f64();
        let d3 = backoff(&p, 3).as_secs_f64();
        let d9 = backoff(&p, 9).as_secs_f64();
        assert!(
            (0.5..1.5).contains(&d1) && (2.0..6.0).contains(&d3) && d9 <= 15.0,
            "{d1} {d3} {d9}"
        );
    }

    #[test]
    fn context_errors_are_recognised() {
        assert!(is_context_error(
            "This model's maximum context length is 8192 tokens"
        ));
        assert!(is_context_error(
            "prompt is too long: 250000 tokens > 200000 maximum"
        ));
        assert!(!is_context_error("invalid tool schema"));
        let llama = "request (32826 tokens) exceeds the available context size (32768 tokens), try increasing it";
        let vllm = "This model's maximum context length is 16384 tokens. However, you requested 17000 tokens (9000 in the messages, 8000 in the completion).";
        let ollama = "the input length exceeds the context length";
        let anthropic = "prompt is too long: 250000 tokens > 200000 maximum";
        for m in [llama, vllm, ollama, anthropic] {
            assert!(is_context_error(m), "{m}");
        }
        assert_eq!(context_window_in(llama), Some(32768));
        assert_eq!(context_window_in(vllm), Some(16384));
        assert_eq!(context_window_in(ollama), None);
        assert_eq!(context_window_in(anthropic), Some(200_000));
        assert_eq!(
            error_message(r#"{"error":{"message":"bad key"}}"#),
            "bad key"
        );
    }
}

//! What a refusal says and what every admitted response reports: messages,
//! `Retry-After`, and OpenAI's `x-ratelimit-*` headers.

use std::time::Duration;

use super::queue::QueueError;
use super::{RateWindows, Refusal, Rejection};

impl Rejection {
    /// The metric label of the reason.
    pub(crate) fn reason(&self) -> &'static str {
        match self {
            Rejection::Limited { refusal, .. } => match refusal {
                Refusal::Requests(_) => "requests_per_minute",
                Refusal::Tokens(_) => "tokens_per_minute",
                Refusal::Concurrency => "concurrency",
                Refusal::TooLarge => "request_too_large",
            },
            Rejection::Queue(QueueError::Full) => "queue_full",
            Rejection::Queue(QueueError::Timeout) => "queue_timeout",
        }
    }

    /// Whether the model is overloaded (503) rather than the tenant over
    /// its limits (429).
    pub(crate) fn is_overload(&self) -> bool {
        matches!(self, Rejection::Queue(_))
    }

    /// `Retry-After` in seconds, where waiting helps.
    pub(crate) fn retry_after(&self) -> Option<u32> {
        match self {
            Rejection::Limited { refusal, .. } => match refusal {
                Refusal::Requests(wait) | Refusal::Tokens(wait) => Some(retry_after_seconds(*wait)),
                Refusal::Concurrency => Some(1),
                Refusal::TooLarge => None,
            },
            Rejection::Queue(_) => Some(1),
        }
    }

    /// What the client is told.
    pub(crate) fn message(&self, tenant: &str, model: &str) -> String {
        match self {
            Rejection::Limited {
                refusal,
                limits,
                tokens,
                ..
            } => match refusal {
                Refusal::Requests(wait) => format!(
                    "rate limit reached: tenant '{tenant}' may send {} requests per minute; \
                     retry in {}",
                    limits.requests_per_minute,
                    format_reset(*wait)
                ),
                Refusal::Tokens(wait) => format!(
                    "rate limit reached: tenant '{tenant}' may use {} tokens (prompt and \
                     completion) per minute; retry in {}",
                    limits.tokens_per_minute,
                    format_reset(*wait)
                ),
                Refusal::Concurrency => format!(
                    "tenant '{tenant}' has {} requests in flight, its limit; retry when one ends",
                    limits.max_concurrent
                ),
                Refusal::TooLarge => format!(
                    "this request may use about {tokens} tokens (the prompt and max_tokens), \
                     more than tenant '{tenant}' may use in a minute ({}); ask for fewer tokens",
                    limits.tokens_per_minute
                ),
            },
            Rejection::Queue(QueueError::Full) => format!(
                "too many requests for the model '{model}' are waiting at this gateway; retry \
                 shortly"
            ),
            Rejection::Queue(QueueError::Timeout) => format!(
                "the request waited too long for the model '{model}' (it is busy); retry shortly"
            ),
        }
    }
}

/// Tokens to reserve for `bytes` of prompt text: about four bytes a token,
/// rounded up. The worker's count replaces the estimate when it answers.
pub(crate) fn estimate_tokens(bytes: usize) -> u64 {
    u64::try_from(bytes.div_ceil(4)).unwrap_or(u64::MAX)
}

/// The `x-ratelimit-*` headers (OpenAI's names) for `windows`.
pub(crate) fn rate_headers(windows: &RateWindows) -> Vec<(&'static str, String)> {
    let mut headers = Vec::new();
    for (window, limit, remaining, reset) in [
        (
            windows.requests,
            "x-ratelimit-limit-requests",
            "x-ratelimit-remaining-requests",
            "x-ratelimit-reset-requests",
        ),
        (
            windows.tokens,
            "x-ratelimit-limit-tokens",
            "x-ratelimit-remaining-tokens",
            "x-ratelimit-reset-tokens",
        ),
    ] {
        if let Some(window) = window {
            headers.push((limit, window.limit.to_string()));
            headers.push((remaining, window.remaining.to_string()));
            headers.push((reset, format_reset(window.reset)));
        }
    }
    headers
}

/// A duration as OpenAI writes resets: `250ms`, `1.5s`, `6m0s`.
pub(crate) fn format_reset(duration: Duration) -> String {
    let millis = duration.as_millis();
    if millis < 1000 {
        return format!("{millis}ms");
    }
    let seconds = duration.as_secs_f64();
    if seconds < 60.0 {
        let text = format!("{seconds:.3}");
        let text = text.trim_end_matches('0').trim_end_matches('.');
        return format!("{text}s");
    }
    let whole = duration.as_secs();
    format!("{}m{}s", whole / 60, whole % 60)
}

/// `Retry-After` in whole seconds: at least 1.
pub(crate) fn retry_after_seconds(duration: Duration) -> u32 {
    let seconds = duration.as_secs() + u64::from(duration.subsec_nanos() > 0);
    u32::try_from(seconds.max(1)).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::admission::Window;

    #[test]
    fn resets_are_written_as_openai_does() {
        assert_eq!(format_reset(Duration::ZERO), "0ms");
        assert_eq!(format_reset(Duration::from_millis(250)), "250ms");
        assert_eq!(format_reset(Duration::from_millis(1500)), "1.5s");
        assert_eq!(format_reset(Duration::from_secs(20)), "20s");
        assert_eq!(format_reset(Duration::from_secs(360)), "6m0s");
        assert_eq!(format_reset(Duration::from_millis(61_900)), "1m1s");
        assert_eq!(retry_after_seconds(Duration::from_millis(1)), 1);
        assert_eq!(retry_after_seconds(Duration::from_millis(20_001)), 21);
        assert_eq!(retry_after_seconds(Duration::from_secs(3)), 3);
        assert_eq!(retry_after_seconds(Duration::ZERO), 1);
        assert_eq!(estimate_tokens(0), 0);
        assert_eq!(estimate_tokens(9), 3);
    }

    #[test]
    fn rate_headers_name_each_limited_window() {
        let windows = RateWindows {
            requests: Some(Window {
                limit: 60,
                remaining: 59,
                reset: Duration::from_secs(1),
            }),
            tokens: None,
        };
        assert_eq!(
            rate_headers(&windows),
            [
                ("x-ratelimit-limit-requests", "60".to_string()),
                ("x-ratelimit-remaining-requests", "59".to_string()),
                ("x-ratelimit-reset-requests", "1s".to_string()),
            ]
        );
        assert!(rate_headers(&RateWindows::default()).is_empty());
    }
}

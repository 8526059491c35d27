//! API keys and admin tokens: generated from the operating system's random
//! source, shown once, and kept only as their SHA-256 digest (hex), with a
//! short, non-secret id for display.
//!
//! A key is `lmg-` followed by 43 base64url characters (32 random bytes); its
//! id is its first 12 characters (`lmg-` and 8 of the random ones), which
//! leave 208 secret bits.

use base64::Engine as _;
pub(crate) use lmgrid_digest::{is_sha256_hex, sha256, sha256_hex};

/// The prefix of every API key, so leaked keys are easy to recognise.
pub(crate) const KEY_PREFIX: &str = "lmg-";

/// How many characters of a key make its display id.
const KEY_ID_LEN: usize = 12;

/// Random bytes behind a key.
const KEY_BYTES: usize = 32;

/// A freshly generated API key: the secret (to show once), its id and its
/// digest (to store).
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct NewKey {
    pub(crate) secret: String,
    pub(crate) id: String,
    pub(crate) sha256: String,
}

impl std::fmt::Debug for NewKey {
    /// Never prints the secret.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NewKey")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

/// Why a key could not be generated.
#[derive(Debug, thiserror::Error)]
#[error("the operating system's random source failed: {0}")]
pub(crate) struct RandomError(String);

/// Generates a new API key.
pub(crate) fn generate() -> Result<NewKey, RandomError> {
    let secret = format!("{KEY_PREFIX}{}", random_token(KEY_BYTES)?);
    Ok(NewKey {
        id: key_id(&secret),
        sha256: sha256_hex(secret.as_bytes()),
        secret,
    })
}

/// `bytes` random bytes in base64url without padding.
pub(crate) fn random_token(bytes: usize) -> Result<String, RandomError> {
    let mut buf = vec![0u8; bytes];
    getrandom::fill(&mut buf).map_err(|e| RandomError(e.to_string()))?;
    Ok(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(buf))
}

/// The display id of a key: its first characters.
pub(crate) fn key_id(secret: &str) -> String {
    secret.chars().take(KEY_ID_LEN).collect()
}

/// The bearer token of an `Authorization` header value, if it has one.
/// The scheme is case-insensitive; surrounding whitespace is ignored.
pub(crate) fn bearer(value: &str) -> Option<&str> {
    let (scheme, token) = value.trim().split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// Whether two secrets are equal, in time that does not depend on where
/// they differ (their digests are compared).
pub(crate) fn constant_time_eq(a: &str, b: &str) -> bool {
    let (a, b) = (sha256(a.as_bytes()), sha256(b.as_bytes()));
    a.iter()
        .zip(b.iter())
        .fold(0u8, |acc, (x, y)| acc | (x ^ y))
        == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_random_prefixed_and_hashed() {
        let a = generate().unwrap();
        let b = generate().unwrap();
        assert_ne!(a.secret, b.secret);
        assert!(a.secret.starts_with(KEY_PREFIX));
        assert_eq!(a.secret.len(), KEY_PREFIX.len() + 43);
        assert_eq!(a.id.len(), 12);
        assert!(a.secret.starts_with(&a.id));
        assert_eq!(a.sha256, sha256_hex(a.secret.as_bytes()));
        assert!(is_sha256_hex(&a.sha256));
        assert!(!format!("{a:?}").contains(&a.secret), "debug hides the key");
    }

    #[test]
    fn bearer_tokens_are_parsed_from_the_header() {
        assert_eq!(bearer("Bearer lmg-abc"), Some("lmg-abc"));
        assert_eq!(bearer("bearer   lmg-abc  "), Some("lmg-abc"));
        assert_eq!(bearer("BEARER x"), Some("x"));
        assert_eq!(bearer("Basic dXNlcjpwdw=="), None);
        assert_eq!(bearer("Bearer"), None);
        assert_eq!(bearer("Bearer  "), None);
        assert_eq!(bearer(""), None);
    }

    #[test]
    fn secrets_compare_by_value() {
        assert!(constant_time_eq("s3cret", "s3cret"));
        assert!(!constant_time_eq("s3cret", "s3creT"));
        assert!(!constant_time_eq("s3cret", "s3cret2"));
    }
}

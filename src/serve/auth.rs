//! Access control: with `--api-key KEY` (or `BITNEST_API_KEY`) every route but `/health` and
//! `/v1/models` wants `Authorization: Bearer KEY`, as llama-server does.
//!
//! The key is compared in constant time: both sides are hashed with SHA-256 and the digests
//! compared with a fold that visits every byte whatever the first difference, so neither the
//! length of the key nor the place where a guess goes wrong shows in the response time.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use bitnest::fetch::Sha256;

use super::error::ApiError;

/// The key a server requires, kept as its digest.
#[derive(Clone)]
pub struct ApiKey {
    digest: [u8; 32],
}

impl std::fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ApiKey(..)")
    }
}

impl ApiKey {
    /// `None` for an empty key: an empty `BITNEST_API_KEY` means no key, not "any empty bearer".
    pub fn new(key: &str) -> Option<Self> {
        (!key.is_empty()).then(|| ApiKey { digest: digest(key.as_bytes()) })
    }

    /// Whether `candidate` is the key, in time independent of where they differ.
    pub fn matches(&self, candidate: &[u8]) -> bool {
        let d = digest(candidate);
        let diff = self.digest.iter().zip(d.iter()).fold(0u8, |acc, (a, b)| acc | (a ^ b));
        // Keep the compiler from turning the fold into an early exit.
        std::hint::black_box(diff) == 0
    }
}

fn digest(bytes: &[u8]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(bytes);
    h.finish()
}

/// Routes anyone may call: liveness for load balancers, and the model list (what clients call
/// first to discover the server), as llama-server leaves them open.
pub fn is_public(path: &str) -> bool {
    path == "/health" || path == "/v1/models" || path.starts_with("/v1/models/")
}

/// Middleware: lets a request through when the server has no key, the route is public, or the
/// request carries `Authorization: Bearer KEY`; else answers 401 in OpenAI's shape.
pub async fn require_key(State(key): State<Arc<Option<ApiKey>>>, req: Request, next: Next) -> Response {
    let Some(key) = key.as_ref() else {
        return next.run(req).await;
    };
    if is_public(req.uri().path()) {
        return next.run(req).await;
    }
    let given = req.headers().get(header::AUTHORIZATION).map(|v| v.as_bytes());
    match given.and_then(bearer) {
        Some(token) if key.matches(token) => next.run(req).await,
        Some(_) => ApiError::unauthorized("incorrect API key provided").into_response(),
        None => {
            ApiError::unauthorized("this server requires an API key: send it as the header `Authorization: Bearer KEY`")
                .into_response()
        }
    }
}

/// The token of an `Authorization: Bearer TOKEN` header (the scheme is case-insensitive).
fn bearer(value: &[u8]) -> Option<&[u8]> {
    let (scheme, rest) = value.split_at_checked(7)?;
    scheme.eq_ignore_ascii_case(b"bearer ").then(|| rest.trim_ascii())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_match_only_themselves() {
        let k = ApiKey::new("sk-local-123").unwrap();
        assert!(k.matches(b"sk-local-123"));
        for wrong in [&b""[..], b"sk-local-12", b"sk-local-1234", b"SK-LOCAL-123", b"x"] {
            assert!(!k.matches(wrong), "{wrong:?}");
        }
        assert!(ApiKey::new("").is_none());
    }

    #[test]
    fn bearer_tokens_are_read_case_insensitively_and_trimmed() {
        assert_eq!(bearer(b"Bearer abc"), Some(&b"abc"[..]));
        assert_eq!(bearer(b"bearer  abc "), Some(&b"abc"[..]));
        assert_eq!(bearer(b"Basic abc"), None);
        assert_eq!(bearer(b"Bearer"), None);
    }

    #[test]
    fn only_health_and_the_model_list_are_public() {
        assert!(is_public("/health") && is_public("/v1/models") && is_public("/v1/models/smollm2"));
        for p in ["/v1/chat/completions", "/v1/completions", "/metrics", "/tokenize", "/detokenize", "/v1/modelsx"] {
            assert!(!is_public(p), "{p}");
        }
    }
}

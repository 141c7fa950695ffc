//! Every error a client can get from Palisade itself, mapped once to a status and a JSON body
//! `{"error": {"code": N, "message": "...", "request_id": "..."}}`.

use crate::body::ResponseBody;
use crate::cache::CacheError;
use crate::upstream::UpstreamError;
use http::{HeaderValue, Method, Response, StatusCode, header};

/// A request Palisade answers itself.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// Malformed or dangerous request (the connection is closed after the answer).
    #[error("{0}")]
    BadRequest(String),
    /// The request uses a feature Palisade does not implement (a transfer coding other than
    /// chunked); the connection is closed after the answer.
    #[error("{0}")]
    NotImplemented(String),
    /// No route matches.
    #[error("no route matches {method} {host}{path}")]
    NoRoute {
        /// Request method.
        method: Method,
        /// Request host.
        host: String,
        /// Request path.
        path: String,
    },
    /// Routes match the path but not the method.
    #[error("method {method} is not allowed here; allowed: {allowed}")]
    MethodNotAllowed {
        /// Request method.
        method: Method,
        /// The methods that would match, comma-separated.
        allowed: String,
    },
    /// The client is over its rate limit.
    #[error("rate limit exceeded; retry in {}s", retry_after_secs(*.retry_after))]
    RateLimited {
        /// Time until a request would be allowed.
        retry_after: std::time::Duration,
        /// `RateLimit-Policy` value.
        policy: HeaderValue,
        /// `RateLimit` value.
        state: HeaderValue,
    },
    /// The request lacks the header or parameter its rate limit is keyed on.
    #[error("{0}")]
    MissingKey(String),
    /// The request body is larger than `max_request_body`.
    #[error("request body exceeds the limit of {limit} bytes")]
    BodyTooLarge {
        /// The limit in bytes.
        limit: u64,
    },
    /// The request head is larger than `max_header_bytes`.
    #[error("request headers exceed the limit of {limit} bytes")]
    HeadersTooLarge {
        /// The limit in bytes.
        limit: usize,
    },
    /// No replica can take the request (unhealthy or circuit open): answered at once.
    #[error("upstream {upstream} has no replica available")]
    NoReplica {
        /// Upstream name.
        upstream: String,
        /// When one may be available again (`Retry-After`).
        retry_after: std::time::Duration,
    },
    /// The replica failed or could not be reached.
    #[error("upstream request failed: {0}")]
    Upstream(UpstreamError),
    /// The cache could not answer a request that allows only the cache.
    #[error(transparent)]
    Cache(#[from] CacheError),
}

impl From<UpstreamError> for ProxyError {
    fn from(e: UpstreamError) -> Self {
        match e {
            UpstreamError::NoReplica {
                upstream,
                retry_after,
            } => ProxyError::NoReplica {
                upstream,
                retry_after,
            },
            e => ProxyError::Upstream(e),
        }
    }
}

impl From<crate::body::BodyError> for ProxyError {
    fn from(e: crate::body::BodyError) -> Self {
        match e {
            crate::body::BodyError::TooLarge { limit } => ProxyError::BodyTooLarge { limit },
            e => ProxyError::BadRequest(e.to_string()),
        }
    }
}

impl ProxyError {
    /// The status this error is answered with.
    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::BadRequest(_) | ProxyError::MissingKey(_) => StatusCode::BAD_REQUEST,
            ProxyError::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            ProxyError::NotImplemented(_) => StatusCode::NOT_IMPLEMENTED,
            ProxyError::NoRoute { .. } => StatusCode::NOT_FOUND,
            ProxyError::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            ProxyError::BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ProxyError::HeadersTooLarge { .. } => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            ProxyError::NoReplica { .. } => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::Upstream(UpstreamError::BodyTooLarge { .. }) => {
                StatusCode::PAYLOAD_TOO_LARGE
            }
            ProxyError::Upstream(UpstreamError::Timeout { .. }) => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::Upstream(UpstreamError::ClientBody { .. }) => StatusCode::BAD_REQUEST,
            ProxyError::Cache(CacheError::NotCached) => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::Upstream(_) => StatusCode::BAD_GATEWAY,
        }
    }

    /// Whether the client connection must be closed after the answer (its framing can no
    /// longer be trusted, or its body was not read).
    pub fn closes_connection(&self) -> bool {
        matches!(
            self,
            ProxyError::BadRequest(_)
                | ProxyError::NotImplemented(_)
                | ProxyError::BodyTooLarge { .. }
                | ProxyError::HeadersTooLarge { .. }
                | ProxyError::Upstream(UpstreamError::BodyTooLarge { .. })
                | ProxyError::Upstream(UpstreamError::ClientBody { .. })
        )
    }

    /// The JSON response for this error.
    pub fn into_response(self, request_id: &HeaderValue) -> Response<ResponseBody> {
        let status = self.status();
        let body = serde_json::json!({
            "error": {
                "code": status.as_u16(),
                "message": self.to_string(),
                "request_id": request_id.to_str().unwrap_or(""),
            }
        });
        let mut resp = Response::new(ResponseBody::full(body.to_string()));
        *resp.status_mut() = status;
        let h = resp.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        match &self {
            ProxyError::MethodNotAllowed { allowed, .. } => {
                if let Ok(v) = HeaderValue::from_str(allowed) {
                    h.insert(header::ALLOW, v);
                }
            }
            ProxyError::NoReplica { retry_after, .. } => {
                h.insert(
                    header::RETRY_AFTER,
                    HeaderValue::from(retry_after_secs(*retry_after)),
                );
            }
            ProxyError::RateLimited {
                retry_after,
                policy,
                state,
            } => {
                h.insert(
                    header::RETRY_AFTER,
                    HeaderValue::from(retry_after_secs(*retry_after)),
                );
                h.insert(super::headers::RATELIMIT_POLICY.clone(), policy.clone());
                h.insert(super::headers::RATELIMIT.clone(), state.clone());
            }
            _ => {}
        }
        if self.closes_connection() {
            h.insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        resp
    }
}

/// Whole seconds to wait, rounded up, at least 1 (Retry-After has no fractions).
fn retry_after_secs(d: std::time::Duration) -> u64 {
    (d.as_secs() + u64::from(d.subsec_nanos() > 0)).max(1)
}

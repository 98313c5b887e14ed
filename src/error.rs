//! One error type for the whole HTTP API: a stable snake_case `code`, a status that fits, a
//! message safe to show. Causes of a 500 are logged, never sent.

use std::fmt;

use actix_web::http::header::{self, HeaderValue};
use actix_web::http::StatusCode;
use actix_web::{HttpResponse, ResponseError};
use serde_json::json;

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    pub retry_after: Option<u64>,
    /// The methods the URL takes, for a 405's `Allow`.
    pub allow: Option<&'static str>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self { status, code, message: message.into(), retry_after: None, allow: None }
    }

    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }

    pub fn unauthorized() -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "unauthorized", "a valid API key is required (Authorization: Bearer <key>)")
    }

    pub fn method_not_allowed() -> Self {
        Self::new(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed", "this URL does not take that method")
    }

    /// A 405 that names the methods the URL takes, as HTTP asks.
    pub fn method_not_allowed_but(allow: &'static str) -> Self {
        Self { allow: Some(allow), ..Self::method_not_allowed() }
    }

    /// The admin API's: it takes the admin token, not an organization's key.
    pub fn unauthorized_admin() -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "the admin token is required (Authorization: Bearer <CALLGATE_ADMIN_TOKEN>)",
        )
    }

    pub fn forbidden(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, code, message)
    }

    pub fn not_found(what: &str) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", format!("{what} not found"))
    }

    pub fn conflict(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, code, message)
    }

    pub fn unprocessable(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNPROCESSABLE_ENTITY, code, message)
    }

    pub fn rate_limited(retry_after: u64) -> Self {
        Self::new(StatusCode::TOO_MANY_REQUESTS, "rate_limited", "too many requests; retry later")
            .retry_after(retry_after)
    }

    /// The same error, telling the client when to try again (`Retry-After`, at least 1 s).
    pub fn retry_after(self, secs: u64) -> Self {
        Self { retry_after: Some(secs.max(1)), ..self }
    }

    /// Logs the cause here, once, and keeps it out of the response.
    pub fn internal(cause: impl fmt::Display) -> Self {
        tracing::error!(error = %cause, "internal error");
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal_error", "internal error")
    }

    pub fn unavailable(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, code, message)
    }
}

impl fmt::Display for ApiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.code, self.message)
    }
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        self.status
    }

    fn error_response(&self) -> HttpResponse {
        let mut res = HttpResponse::build(self.status);
        if self.status == StatusCode::UNAUTHORIZED {
            res.insert_header((header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer")));
        }
        if let Some(secs) = self.retry_after {
            res.insert_header((header::RETRY_AFTER, secs.to_string()));
        }
        if let Some(methods) = self.allow {
            res.insert_header((header::ALLOW, HeaderValue::from_static(methods)));
        }
        res.json(json!({"error": {"code": self.code, "message": self.message}}))
    }
}

impl From<crate::store::StoreError> for ApiError {
    fn from(e: crate::store::StoreError) -> Self {
        match e {
            // Nothing was recorded and nothing stored is harmed: the sender may try again.
            crate::store::StoreError::Io { detail } => {
                // Every request fails alike while the disk does: one line a second tells it.
                static REFUSED: crate::telemetry::OncePerSecond = crate::telemetry::OncePerSecond::new();
                if REFUSED.due() {
                    tracing::error!(error = %detail, "the disk refused a write; answering 503");
                }
                ApiError::unavailable("storage_unavailable", "the gateway cannot write to its disk just now; try again")
                    .retry_after(5)
            }
            other => ApiError::internal(other),
        }
    }
}

/// actix's extractor errors, rendered in the same shape instead of its plain-text defaults.
pub mod extractors {
    use actix_web::error::{JsonPayloadError, PathError, PayloadError, QueryPayloadError, UrlencodedError};
    use actix_web::http::StatusCode;
    use actix_web::{web, HttpRequest};

    use super::ApiError;

    pub fn json(err: JsonPayloadError, _: &HttpRequest) -> actix_web::Error {
        match err {
            JsonPayloadError::OverflowKnownLength { .. } | JsonPayloadError::Overflow { .. } => too_large(),
            JsonPayloadError::ContentType => ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                "expected Content-Type: application/json",
            )
            .into(),
            JsonPayloadError::Deserialize(e) if e.is_data() => {
                ApiError::unprocessable("invalid_field", bounded(format!("invalid request body: {e}"))).into()
            }
            JsonPayloadError::Payload(PayloadError::Overflow) => too_large(),
            _ => ApiError::bad_request("malformed_json", "the request body is not valid JSON").into(),
        }
    }

    pub fn query(err: QueryPayloadError, _: &HttpRequest) -> actix_web::Error {
        ApiError::bad_request("invalid_query", bounded(format!("invalid query string: {err}"))).into()
    }

    /// serde's messages quote what the client sent (an unknown field's name, a value of the
    /// wrong type): what is quoted is shown only when it reads as a field name, since a secret
    /// pasted in the wrong place would come back in the answer and in every log of it; and a
    /// client may send kilobytes of it, so the message is cut.
    fn bounded(message: String) -> String {
        let mut message = super::unquoted_secrets(&message);
        const MOST: usize = 300;
        if let Some((cut, _)) = message.char_indices().nth(MOST) {
            message.truncate(cut);
            message.push('…');
        }
        message
    }

    pub fn path(_: PathError, _: &HttpRequest) -> actix_web::Error {
        ApiError::not_found("resource").into()
    }

    pub fn form(err: UrlencodedError, _: &HttpRequest) -> actix_web::Error {
        match err {
            UrlencodedError::Overflow { .. } => too_large(),
            _ => ApiError::bad_request("malformed_form", "the request body is not a valid form").into(),
        }
    }

    pub fn too_large() -> actix_web::Error {
        ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large", "the request body is too large").into()
    }

    pub fn configure(cfg: &mut web::ServiceConfig, body_limit: usize) {
        cfg.app_data(web::JsonConfig::default().limit(body_limit).error_handler(json))
            .app_data(web::QueryConfig::default().error_handler(query))
            .app_data(web::PathConfig::default().error_handler(path))
            .app_data(web::FormConfig::default().limit(body_limit).error_handler(form))
            .app_data(web::PayloadConfig::new(body_limit));
    }
}

/// `name` as an error message may show it: a client's own field name is, and anything that
/// does not read as one (a key, a token, a value pasted where a field name goes) is not.
pub fn shown_field(name: &str) -> &str {
    if looks_like_a_field(name) {
        name
    } else {
        "(a field whose name is not shown)"
    }
}

/// Short snake_case: what every field of this API looks like, and no carrier or LLM secret does
/// (they are longer, or mixed case, or hold `-`).
fn looks_like_a_field(s: &str) -> bool {
    (1..=30).contains(&s.len())
        && s.starts_with(|c: char| c.is_ascii_lowercase())
        && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

/// Every `…` or "…" span of serde's message that does not read as a field name is replaced,
/// and with it everything up to serde's next clause: what is quoted may hold quotes of its own,
/// unescaped, so its end cannot be told from them.
fn unquoted_secrets(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    let mut rest = message;
    while let Some(open) = rest.find(['`', '"']) {
        let quote = if rest.as_bytes()[open] == b'`' { '`' } else { '"' };
        let after = &rest[open + 1..];
        out.push_str(&rest[..open]);
        match after.find(quote).map(|close| (&after[..close], &after[close + 1..])) {
            // A name serde closed is followed by its punctuation, or nothing: one followed by
            // more text was cut short by a quote inside it.
            Some((inner, next))
                if looks_like_a_field(inner) && (next.is_empty() || next.starts_with([',', ' ', ')', ';'])) =>
            {
                out.push(quote);
                out.push_str(inner);
                out.push(quote);
                rest = next;
            }
            _ => {
                out.push_str("(not shown)");
                rest = after.find(", expected").map_or("", |at| &after[at..]);
            }
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoted_input_is_shown_only_when_it_reads_as_a_field_name() {
        let serde = "unknown field `numbr`, expected one of `number`, `config` at line 1 column 9";
        assert_eq!(unquoted_secrets(serde), serde);
        assert_eq!(
            unquoted_secrets("invalid type: string \"sk-proj-SECRET0001\", expected a boolean at line 1 column 40"),
            "invalid type: string (not shown), expected a boolean at line 1 column 40"
        );
        assert_eq!(
            unquoted_secrets("unknown field `0123456789abcdef0123456789abcdef`, expected `label`"),
            "unknown field (not shown), expected `label`"
        );
        assert_eq!(unquoted_secrets("unknown field `AuthToken`"), "unknown field (not shown)");
        assert_eq!(unquoted_secrets("a quote \"left open"), "a quote (not shown)");
        // A name holding a quote of its own does not leak what follows it.
        assert_eq!(
            unquoted_secrets("unknown field `x`SECRET0001`, expected `label`"),
            "unknown field (not shown), expected `label`"
        );
        assert_eq!(shown_field("scope"), "scope");
        for secret in ["sk-proj-SECRET0001", "0123456789abcdef0123456789abcdef", "MAXXXX", "", "a b"] {
            assert_eq!(shown_field(secret), "(a field whose name is not shown)", "{secret}");
        }
    }
}

//! Reads a request body into memory under a hard limit, before anything parses it.

use actix_web::web::{self, Bytes, BytesMut};
use futures_util::StreamExt;

use crate::error::ApiError;

pub async fn read_limited(mut payload: web::Payload, limit: usize, declared: Option<usize>) -> Result<Bytes, ApiError> {
    let too_large = || {
        ApiError::new(
            actix_web::http::StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            "the request body is too large",
        )
    };
    if declared.is_some_and(|n| n > limit) {
        return Err(too_large());
    }
    let mut buf = BytesMut::with_capacity(declared.unwrap_or(1024).min(limit));
    let read = async {
        while let Some(chunk) = payload.next().await {
            let chunk =
                chunk.map_err(|_| ApiError::bad_request("incomplete_body", "the request body could not be read"))?;
            if buf.len() + chunk.len() > limit {
                return Err(too_large());
            }
            buf.extend_from_slice(&chunk);
        }
        Ok(())
    };
    // The server's request timeout covers the head only: a body trickled a byte at a time
    // would hold its connection (and a file descriptor) for as long as the sender likes. A
    // body that is already in (nearly every carrier's) never arms the timer.
    match tokio::time::timeout(BODY_DEADLINE, read).await {
        Ok(read) => read.map(|()| buf.freeze()),
        Err(_) => Err(ApiError::new(
            actix_web::http::StatusCode::REQUEST_TIMEOUT,
            "body_timeout",
            "the request body did not arrive in time",
        )),
    }
}

/// How long a request's body may take to arrive once its head has.
pub const BODY_DEADLINE: std::time::Duration = std::time::Duration::from_secs(10);

//! OpenAI-style error responses.
//!
//! Every failure a client can cause becomes `{"error": {"message", "type", "param", "code"}}`
//! with a 4xx status, the shape the `openai` packages parse into their exception types; the
//! server never answers bad input with a bare text body or a panic.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    /// OpenAI's error class: `invalid_request_error`, `server_error`, ...
    pub kind: &'static str,
    /// The request field at fault, when there is one.
    pub param: Option<String>,
    pub code: Option<&'static str>,
    /// Seconds for a `Retry-After` header (overload only).
    pub retry_after: Option<u32>,
}

impl ApiError {
    /// 400: the request is malformed or asks for something impossible.
    pub fn invalid(message: impl Into<String>, param: Option<&str>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            kind: "invalid_request_error",
            param: param.map(str::to_string),
            code: None,
            retry_after: None,
        }
    }

    pub fn with_code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }

    pub fn with_status(mut self, status: StatusCode) -> Self {
        self.status = status;
        self
    }

    /// 503 with `Retry-After`: every slot and queue place is taken.
    pub fn overloaded(retry_after: u32) -> Self {
        Self {
            status: StatusCode::SERVICE_UNAVAILABLE,
            message: "the server is busy: the request queue is full; retry later".into(),
            kind: "server_error",
            param: None,
            code: Some("server_overloaded"),
            retry_after: Some(retry_after),
        }
    }

    /// 503 with `Retry-After` while shutting down: the request was not finished here (its
    /// `--grace` ran out, or the worker had stopped), so retrying elsewhere is safe.
    pub fn shutting_down() -> Self {
        Self {
            status: StatusCode::SERVICE_UNAVAILABLE,
            message: "the server shut down before finishing this request; retry it".into(),
            kind: "server_error",
            param: None,
            code: Some("shutting_down"),
            retry_after: Some(1),
        }
    }

    /// 503 with `Retry-After` while the model loads (`/health` says `loading`).
    pub fn loading() -> Self {
        Self {
            status: StatusCode::SERVICE_UNAVAILABLE,
            message: "the model is still loading; retry shortly".into(),
            kind: "server_error",
            param: None,
            code: Some("loading"),
            retry_after: Some(1),
        }
    }

    /// 503 with `Retry-After` for a new generation request while draining (after SIGTERM): a
    /// router sends it to another replica; nothing of it was computed here, so retrying is safe.
    pub fn draining() -> Self {
        Self {
            status: StatusCode::SERVICE_UNAVAILABLE,
            message: "this server is draining (shutting down) and takes no new requests; another replica will".into(),
            kind: "server_error",
            param: None,
            code: Some("draining"),
            retry_after: Some(1),
        }
    }

    /// 500: something went wrong on our side (the message still says what).
    pub fn internal(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            message: message.into(),
            kind: "server_error",
            param: None,
            code: None,
            retry_after: None,
        }
    }

    /// 401: the server wants `Authorization: Bearer KEY` and the request lacks it or has
    /// another key (OpenAI's `invalid_api_key`).
    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::invalid(message, None).with_status(StatusCode::UNAUTHORIZED).with_code("invalid_api_key")
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::invalid(message, None).with_status(StatusCode::NOT_FOUND).with_code("not_found")
    }

    pub fn body(&self) -> serde_json::Value {
        json!({"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut resp = (self.status, axum::Json(self.body())).into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            resp.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        if let Some(s) = self.retry_after
            && let Ok(v) = HeaderValue::from_str(&s.to_string())
        {
            resp.headers_mut().insert(header::RETRY_AFTER, v);
        }
        resp
    }
}

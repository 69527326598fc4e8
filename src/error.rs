//! Errors that become HTTP answers.
//!
//! Every error tollgate itself produces is answered in OpenAI's error shape
//! (`{"error":{"message","type","param","code"}}`) so SDKs surface it like an
//! upstream error. Like pingora, an error knows where it came from; that decides
//! its status class (4xx for the client, 502/504 for upstream, 500 for us).

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};
use serde::Serialize;

use crate::http::Body;

/// An error answered to the client in OpenAI's shape.
#[derive(Debug, Clone)]
pub struct ApiError {
    /// HTTP status of the answer.
    pub status: StatusCode,
    /// OpenAI's `type` field (`invalid_request_error`, `server_error`, ...).
    pub kind: &'static str,
    /// OpenAI's `code` field.
    pub code: Option<&'static str>,
    /// The request field or parameter at fault, if any.
    pub param: Option<String>,
    /// Human-readable explanation.
    pub message: String,
    /// Seconds for a `retry-after` header.
    pub retry_after: Option<u64>,
}

#[derive(Serialize)]
struct Envelope<'a> {
    error: Inner<'a>,
}

#[derive(Serialize)]
struct Inner<'a> {
    message: &'a str,
    #[serde(rename = "type")]
    kind: &'a str,
    param: Option<&'a str>,
    code: Option<&'a str>,
}

impl ApiError {
    fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            kind,
            code: None,
            param: None,
            message: message.into(),
            retry_after: None,
        }
    }

    /// Sets the `code` field.
    pub fn with_code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }

    /// Sets the `param` field.
    pub fn with_param(mut self, param: impl Into<String>) -> Self {
        self.param = Some(param.into());
        self
    }

    /// 400 for a malformed request.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            message.into(),
        )
    }

    /// 400 naming the field or parameter at fault.
    pub fn bad_param(param: &str, message: impl Into<String>) -> Self {
        Self::bad_request(message).with_param(param)
    }

    /// 401: no user could be established.
    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "invalid_request_error",
            message.into(),
        )
    }

    /// 404 for an unknown path or object.
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "invalid_request_error", message)
    }

    /// 405 for a known path with the wrong method.
    pub fn method_not_allowed(method: &http::Method, path: &str) -> Self {
        Self::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "invalid_request_error",
            format!("method {method} is not allowed on {path}"),
        )
    }

    /// 413 for a body over the configured limit.
    pub fn too_large(limit: u64) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request_error",
            format!("request body is larger than the limit of {limit} bytes"),
        )
        .with_code("request_too_large")
    }

    /// 408: the client stopped sending its request body.
    pub fn body_timeout(after: std::time::Duration) -> Self {
        Self::new(
            StatusCode::REQUEST_TIMEOUT,
            "invalid_request_error",
            format!("the request body stalled: no byte for {after:?}"),
        )
        .with_code("body_timeout")
    }

    /// 431 for a request head over the limit.
    pub fn headers_too_large(limit: usize) -> Self {
        Self::new(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "invalid_request_error",
            format!("request headers are larger than the limit of {limit} bytes"),
        )
        .with_code("request_header_fields_too_large")
    }

    /// 502: upstream could not be reached or broke the exchange.
    pub fn bad_gateway(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_GATEWAY, "upstream_error", message)
    }

    /// 504: upstream sent no answer in time.
    pub fn gateway_timeout(message: impl Into<String>) -> Self {
        Self::new(StatusCode::GATEWAY_TIMEOUT, "upstream_error", message).with_code("timeout")
    }

    /// 500: a fault of tollgate's own.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", message)
    }

    /// 503: tollgate cannot take the request now (e.g. the usage store is far behind).
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, "server_error", message)
    }

    /// 403: not allowed from here.
    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "invalid_request_error", message)
    }

    /// 429 from a budget or limit, freeing up after `retry_after` seconds.
    pub fn too_many(
        code: &'static str,
        message: impl Into<String>,
        retry_after: Option<u64>,
    ) -> Self {
        let mut e = Self::new(StatusCode::TOO_MANY_REQUESTS, "requests", message).with_code(code);
        e.retry_after = retry_after;
        e
    }

    /// The JSON body in OpenAI's error shape.
    pub fn body_bytes(&self) -> Bytes {
        let env = Envelope {
            error: Inner {
                message: &self.message,
                kind: self.kind,
                param: self.param.as_deref(),
                code: self.code,
            },
        };
        Bytes::from(serde_json::to_vec(&env).expect("error envelope serializes"))
    }

    /// The full HTTP answer.
    pub fn into_response(self) -> Response<Body> {
        let mut resp = Response::new(crate::http::full(self.body_bytes()));
        *resp.status_mut() = self.status;
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        if let Some(s) = self.retry_after {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        resp
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.status.as_u16(), self.message)
    }
}

impl std::error::Error for ApiError {}

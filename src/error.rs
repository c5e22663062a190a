//! The HTTP layer's error type, and the one place where errors become status codes and JSON
//! bodies (`{"error": "what is wrong", "field": "data.phone"}`).

use hyper::header::{HeaderValue, ALLOW, RETRY_AFTER, WWW_AUTHENTICATE};
use hyper::StatusCode;
use serde_json::json;

use crate::providers::PayloadError;
use crate::response::{json_response, Response};
use crate::secret::AuthFailure;
use crate::store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("no such endpoint")]
    NotFound,
    #[error("method not allowed; use {allow}")]
    MethodNotAllowed { allow: &'static str },
    #[error("{0}")]
    Unauthorized(&'static str),
    #[error("{0}")]
    Forbidden(&'static str),
    #[error("too many failed authentications from this address; retry in {retry_after_secs} s")]
    TooManyAuthFailures { retry_after_secs: u64 },
    #[error("request body is larger than the limit of {limit} bytes")]
    PayloadTooLarge { limit: usize },
    #[error("{0}")]
    UnsupportedMediaType(String),
    #[error("{0}")]
    BadRequest(#[from] PayloadError),
    #[error("the store could not save this request; nothing was acknowledged, retry later")]
    Store(StoreError),
}

impl From<StoreError> for HttpError {
    /// A refusal by the store's rules is the request's fault, and says what to change; every
    /// other store error is the service's.
    fn from(error: StoreError) -> HttpError {
        match error {
            StoreError::Refused(refusal) => {
                HttpError::bad_field(refusal.field(), refusal.to_string())
            }
            other => HttpError::Store(other),
        }
    }
}

impl HttpError {
    pub fn bad_request(message: impl Into<String>) -> Self {
        HttpError::BadRequest(PayloadError::body(message))
    }

    pub fn bad_field(field: &str, message: impl Into<String>) -> Self {
        HttpError::BadRequest(PayloadError::field(field, message))
    }

    /// The error for a failed credential check.
    pub fn auth(failure: AuthFailure) -> Self {
        match failure {
            AuthFailure::Missing => HttpError::Unauthorized("credentials are required"),
            AuthFailure::Wrong => HttpError::Forbidden("credentials are not valid"),
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            HttpError::NotFound => StatusCode::NOT_FOUND,
            HttpError::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            HttpError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            HttpError::Forbidden(_) => StatusCode::FORBIDDEN,
            HttpError::TooManyAuthFailures { .. } => StatusCode::TOO_MANY_REQUESTS,
            HttpError::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            HttpError::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            HttpError::BadRequest(_) => StatusCode::BAD_REQUEST,
            HttpError::Store(StoreError::Closed | StoreError::Reopening) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            HttpError::Store(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The field the error is about, where one applies.
    pub fn field(&self) -> Option<&str> {
        match self {
            HttpError::BadRequest(e) => e.field.as_deref(),
            HttpError::UnsupportedMediaType(_) => Some("content-type"),
            _ => None,
        }
    }

    pub fn into_response(self) -> Response {
        let mut body = json!({ "error": self.to_string() });
        if let Some(field) = self.field() {
            body["field"] = json!(field);
        }
        let mut response = json_response(self.status(), &body);
        self.decorate(&mut response);
        response
    }

    /// Adds the headers HTTP requires or advises with some statuses (`Allow`,
    /// `WWW-Authenticate`, `Retry-After`).
    pub fn decorate(&self, response: &mut Response) {
        match self {
            HttpError::MethodNotAllowed { allow } => {
                response
                    .headers_mut()
                    .insert(ALLOW, HeaderValue::from_static(allow));
            }
            HttpError::Unauthorized(_) => {
                response
                    .headers_mut()
                    .insert(WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            HttpError::TooManyAuthFailures { retry_after_secs } => {
                response
                    .headers_mut()
                    .insert(RETRY_AFTER, HeaderValue::from(*retry_after_secs));
            }
            HttpError::Store(StoreError::Reopening) => {
                response
                    .headers_mut()
                    .insert(RETRY_AFTER, HeaderValue::from_static("1"));
            }
            _ => {}
        }
    }
}

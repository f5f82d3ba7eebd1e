//! API errors: a status code, a message saying what to do, and details.

use axum::response::{IntoResponse, Response};
use hyper::StatusCode;

#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub details: Vec<String>,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
            details: Vec::new(),
        }
    }

    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, message)
    }

    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, message)
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, message)
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }

    pub fn conflict(message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, message)
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, message)
    }

    pub fn body(&self) -> serde_json::Value {
        serde_json::json!({
            "kind": "Status",
            "code": self.status.as_u16(),
            "reason": self.status.canonical_reason().unwrap_or_default(),
            "message": self.message,
            "details": self.details,
        })
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, axum::Json(self.body())).into_response()
    }
}

impl From<skiff_store::StoreError> for ApiError {
    fn from(e: skiff_store::StoreError) -> Self {
        use skiff_store::StoreError as E;
        match &e {
            E::AlreadyExists { .. } => {
                ApiError::conflict(format!("{e}; use PUT (or `skiff apply`) to change it"))
            }
            E::Conflict { .. } => ApiError::conflict(format!(
                "the object has been modified ({e}); get it again and reapply your change"
            )),
            E::NotFound { .. } => ApiError::not_found(e.to_string()),
            E::Compacted { .. } => ApiError::new(hyper::StatusCode::GONE, e.to_string()),
            E::LeaseNotFound(_) => ApiError::bad_request(e.to_string()),
            E::Closed => ApiError::new(
                hyper::StatusCode::SERVICE_UNAVAILABLE,
                "the server is shutting down",
            ),
            E::Storage(_) => ApiError::internal(e.to_string()),
        }
    }
}

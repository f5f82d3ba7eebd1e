//! Workload certificates: an agent sends a CSR made on its node for one of
//! its instances; the CA signs the request's key for the identity of the
//! instance's Service, `spiffe://<trust-domain>/ns/<ns>/sa/<service>`, for
//! the configured lifetime. The private key never reaches the server.

use std::sync::Arc;

use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use skiff_identity::{Principal, SpiffeId};
use skiff_store::Store;

use crate::api::AppState;
use crate::error::ApiError;

/// `POST …/instances/NAME/certificate` with `{"csr": "<PEM>"}`: a
/// certificate for the instance's Service identity. Only the node the
/// instance is assigned to (or an admin) may ask.
pub(crate) async fn for_instance(
    state: &Arc<AppState>,
    who: &Principal,
    key: &str,
    namespace: &str,
    name: &str,
    body: &[u8],
) -> Result<Response, ApiError> {
    let Some(kv) = state.store.get(key).await? else {
        return Err(ApiError::not_found(format!(
            "Instance {namespace}/{name} not found"
        )));
    };
    let instance: Value = serde_json::from_slice(&kv.value)
        .map_err(|e| ApiError::internal(format!("stored instance: {e}")))?;
    let assigned = instance.pointer("/spec/node").and_then(Value::as_str);
    let allowed = match who {
        Principal::Admin { .. } => true,
        Principal::Node { name: node } => assigned == Some(node.as_str()),
    };
    if !allowed {
        return Err(ApiError::forbidden(format!(
            "{who} may not get a certificate for Instance {namespace}/{name}: it is assigned to {}",
            assigned.unwrap_or("no node")
        )));
    }
    let service = instance
        .pointer("/spec/service")
        .and_then(Value::as_str)
        .unwrap_or_default();
    sign(
        state,
        namespace,
        service,
        &format!("Instance {namespace}/{name}"),
        body,
    )
}

/// `POST …/services/NAME/certificate`: a certificate for the identity
/// `…/ns/NS/sa/NAME` held by something that is not an instance (the
/// ingress gateway). Admins only; the Service need not exist.
pub(crate) fn for_service(
    state: &Arc<AppState>,
    who: &Principal,
    namespace: &str,
    name: &str,
    body: &[u8],
) -> Result<Response, ApiError> {
    if !matches!(who, Principal::Admin { .. }) {
        return Err(ApiError::forbidden(format!(
            "{who} may not get a certificate for Service {namespace}/{name}: admins only"
        )));
    }
    sign(
        state,
        namespace,
        name,
        &format!("Service {namespace}/{name}"),
        body,
    )
}

fn sign(
    state: &Arc<AppState>,
    namespace: &str,
    service: &str,
    what: &str,
    body: &[u8],
) -> Result<Response, ApiError> {
    let id = SpiffeId::new(&state.workload.trust_domain, namespace, service)
        .map_err(|e| ApiError::bad_request(format!("identity for {what}: {e}")))?;
    let request: Value = serde_json::from_slice(body).map_err(|e| {
        ApiError::bad_request(format!("body: expected {{\"csr\": \"<PEM>\"}}: {e}"))
    })?;
    let Some(csr) = request.get("csr").and_then(Value::as_str) else {
        return Err(ApiError::bad_request(
            "body.csr: a PEM certificate signing request is required",
        ));
    };
    let now = time::OffsetDateTime::now_utc();
    let cert = state
        .workload
        .ca
        .sign_workload(csr, &id, now, state.workload.lifetime)
        .map_err(|e| ApiError::bad_request(format!("body.csr: {e}")))?;
    let not_after = now + state.workload.lifetime;
    tracing::info!(identity = %id, holder = %what, "Workload certificate issued");
    Ok(axum::Json(json!({
        "identity": id.to_string(),
        "certificate": cert,
        "caCertificate": state.workload.ca.cert_pem(),
        "notAfter": not_after.unix_timestamp(),
    }))
    .into_response())
}

/// What the server needs to sign workload certificates.
#[derive(Debug)]
pub struct WorkloadCa {
    pub ca: skiff_identity::Ca,
    pub trust_domain: String,
    pub lifetime: std::time::Duration,
}

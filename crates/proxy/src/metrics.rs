//! The proxy's Prometheus metrics, under `skiff_proxy_`.

use std::sync::Arc;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

#[derive(Debug)]
pub struct Metrics {
    pub registry: Registry,
    pub requests: Family<RequestLabels, Counter>,
    pub latency: Family<LatencyLabels, Histogram>,
    pub connections: Family<ConnectionLabels, Counter>,
    pub retries: Family<ServiceLabels, Counter>,
    pub retries_refused: Family<ServiceLabels, Counter>,
    pub ejections: Family<EndpointLabels, Counter>,
    pub cert_expiry: Gauge,
    /// Recent L7 denials, for `skiff flows` (not Prometheus).
    pub denials: Denials,
}

/// Denials kept for collection; older ones are counted as lost.
const KEPT_DENIALS: usize = 1024;

/// Recent L7 denials, numbered from 1. The agent collects them with
/// `/denials?after=N` and merges them into the node's flow records.
#[derive(Debug, Default)]
pub struct Denials {
    inner: std::sync::Mutex<(u64, std::collections::VecDeque<serde_json::Value>)>,
}

impl Denials {
    /// Keeps one denial record, numbered and timed.
    pub fn record(&self, mut denial: serde_json::Value) {
        let mut guard = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let (last, kept) = &mut *guard;
        *last += 1;
        denial["seq"] = (*last).into();
        denial["time"] = time::OffsetDateTime::now_utc()
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default()
            .into();
        if kept.len() == KEPT_DENIALS {
            kept.pop_front();
        }
        kept.push_back(denial);
    }

    /// `{"next": N, "lost": L, "denials": [...]}`: the denials numbered
    /// after `after`, the number to ask after next time, and how many in
    /// between are no longer kept.
    pub fn after(&self, after: u64) -> serde_json::Value {
        let guard = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let (last, kept) = &*guard;
        let first_kept = last + 1 - kept.len() as u64;
        let lost = first_kept.saturating_sub(after + 1);
        let denials: Vec<&serde_json::Value> = kept
            .iter()
            .filter(|d| d["seq"].as_u64().is_some_and(|s| s > after))
            .collect();
        serde_json::json!({"next": last, "lost": lost, "denials": denials})
    }
}

/// A label value made once (per route, service, endpoint or connection)
/// and shared by every request's label set: cloning it is a reference
/// count, not a string copy.
#[derive(Debug, Clone, Hash, PartialEq, Eq, Default)]
pub struct Label(pub Arc<str>);

impl Label {
    pub fn new(s: &str) -> Label {
        Label(Arc::from(s))
    }
}

impl std::fmt::Display for Label {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl EncodeLabelValue for Label {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> Result<(), std::fmt::Error> {
        use std::fmt::Write;
        encoder.write_str(&self.0)
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// `inbound` or `outbound`.
    pub direction: &'static str,
    /// The route (outbound) or the policy that decided (inbound).
    pub route: Label,
    pub service: Label,
    pub backend: Label,
    /// The mTLS-verified peer identity, or `none`.
    pub peer: Label,
    pub tls: &'static str,
    pub status: u16,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LatencyLabels {
    pub direction: &'static str,
    pub route: Label,
    pub service: Label,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConnectionLabels {
    pub direction: &'static str,
    /// `http1`, `http2`, `opaque`, or `refused`.
    pub protocol: &'static str,
    pub tls: &'static str,
    pub peer: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ServiceLabels {
    pub service: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EndpointLabels {
    pub service: String,
    pub endpoint: String,
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut root = Registry::default();
        let registry = root.sub_registry_with_prefix("skiff_proxy");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "requests",
            "HTTP requests answered, by route, backend, peer and status",
            requests.clone(),
        );
        let latency = Family::<LatencyLabels, Histogram>::new_with_constructor(|| {
            Histogram::new([
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                10.0,
            ])
        });
        registry.register(
            "request_duration_seconds",
            "Time from request received to response headers sent",
            latency.clone(),
        );
        let connections = Family::<ConnectionLabels, Counter>::default();
        registry.register(
            "connections",
            "Connections accepted, by detected protocol, TLS and peer identity",
            connections.clone(),
        );
        let retries = Family::<ServiceLabels, Counter>::default();
        registry.register(
            "retries",
            "Requests sent again after a failure",
            retries.clone(),
        );
        let retries_refused = Family::<ServiceLabels, Counter>::default();
        registry.register(
            "retries_budget_exhausted",
            "Retries not made because the retry budget was spent",
            retries_refused.clone(),
        );
        let ejections = Family::<EndpointLabels, Counter>::default();
        registry.register(
            "endpoint_ejections",
            "Endpoints taken out of balancing after consecutive failures",
            ejections.clone(),
        );
        let cert_expiry = Gauge::default();
        registry.register(
            "identity_cert_expiry_timestamp_seconds",
            "When this proxy's certificate expires (0: no identity)",
            cert_expiry.clone(),
        );
        Metrics {
            registry: root,
            requests,
            latency,
            connections,
            retries,
            retries_refused,
            ejections,
            cert_expiry,
            denials: Denials::default(),
        }
    }

    /// The Prometheus text format (what `promtool check metrics` accepts).
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        skiff_api::prometheus::to_text_format(&out)
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn denials_are_numbered_and_read_after_a_number_and_losses_counted() {
        let d = Denials::default();
        for i in 0..(KEPT_DENIALS + 5) {
            d.record(serde_json::json!({"path": format!("/{i}")}));
        }
        let all = d.after(0);
        assert_eq!(all["next"], (KEPT_DENIALS + 5) as u64);
        assert_eq!(all["lost"], 5);
        assert_eq!(all["denials"].as_array().unwrap().len(), KEPT_DENIALS);
        let tail = d.after(KEPT_DENIALS as u64 + 3);
        assert_eq!(tail["lost"], 0);
        let paths: Vec<&str> = tail["denials"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v["path"].as_str().unwrap())
            .collect();
        assert_eq!(
            paths,
            vec![
                format!("/{}", KEPT_DENIALS + 3),
                format!("/{}", KEPT_DENIALS + 4)
            ]
        );
        assert!(
            tail["denials"][0]["time"]
                .as_str()
                .is_some_and(|t| t.ends_with('Z'))
        );
    }
}

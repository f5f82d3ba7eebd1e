//! Prometheus metrics of the API server, under the `skiff_` prefix.

use std::sync::atomic::{AtomicU64, Ordering};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub method: String,
    pub code: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MethodLabels {
    pub method: String,
}

type HistogramFamily = Family<MethodLabels, Histogram, fn() -> Histogram>;

#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    pub requests: Family<RequestLabels, Counter>,
    pub duration: HistogramFamily,
    pub watches: Gauge,
    pub connections: Gauge,
    revision: Gauge,
    commits: Counter,
    commits_seen: AtomicU64,
}

fn request_buckets() -> Histogram {
    Histogram::new(exponential_buckets(0.0005, 2.0, 16))
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("skiff");
        let requests = Family::<RequestLabels, Counter>::default();
        let duration: HistogramFamily = Family::new_with_constructor(request_buckets);
        let watches = Gauge::default();
        let connections = Gauge::default();
        let revision = Gauge::default();
        let commits = Counter::default();
        registry.register(
            "api_requests",
            "API requests by method and status code",
            requests.clone(),
        );
        registry.register(
            "api_request_duration_seconds",
            "Time to answer API requests (watches: to the first byte)",
            duration.clone(),
        );
        registry.register("api_watches", "Open watch streams", watches.clone());
        registry.register(
            "api_connections",
            "Open client connections",
            connections.clone(),
        );
        registry.register(
            "store_revision",
            "Latest committed store revision",
            revision.clone(),
        );
        registry.register(
            "store_commits",
            "Durable store transactions (each may carry many writes)",
            commits.clone(),
        );
        Metrics {
            registry,
            requests,
            duration,
            watches,
            connections,
            revision,
            commits,
            commits_seen: AtomicU64::new(0),
        }
    }

    /// The text exposition, with store figures read now.
    pub fn render(&self, revision: u64, commits: u64) -> String {
        self.revision
            .set(i64::try_from(revision).unwrap_or(i64::MAX));
        let seen = self.commits_seen.swap(commits, Ordering::Relaxed);
        self.commits.inc_by(commits.saturating_sub(seen));
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        skiff_api::prometheus::to_text_format(&out)
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_are_named_for_the_text_format() {
        let m = Metrics::new();
        m.requests
            .get_or_create(&RequestLabels {
                method: "GET".into(),
                code: "200".into(),
            })
            .inc();
        let text = m.render(7, 3);
        assert!(
            text.contains("# TYPE skiff_api_requests_total counter\n"),
            "{text}"
        );
        assert!(text.contains("# HELP skiff_store_commits_total "), "{text}");
        assert!(text.contains("skiff_store_commits_total 3\n"), "{text}");
        assert!(text.contains("skiff_store_revision 7\n"), "{text}");
        assert!(!text.contains("# EOF"));
    }
}

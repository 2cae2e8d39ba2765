//! Controller metrics (Prometheus text format) and the small HTTP endpoint that serves them
//! with `/healthz`: reconciles and errors per kind, nodes by best affinity, rails, leadership.

use crate::metrics_http::Reply;
use hyper::StatusCode;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// What a reconcile worked on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ReconcileKind {
    DeviceClass,
    Node,
    Rails,
}

impl ReconcileKind {
    pub fn as_str(&self) -> &'static str {
        match self {
            ReconcileKind::DeviceClass => "deviceclass",
            ReconcileKind::Node => "node",
            ReconcileKind::Rails => "rails",
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AffinityLabels {
    affinity: String,
}

pub struct Metrics {
    registry: Registry,
    reconciles: Family<KindLabels, Counter>,
    errors: Family<KindLabels, Counter>,
    nodes_by_best_affinity: Family<AffinityLabels, Gauge>,
    rails: Gauge,
    leader: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("tandem_controller");
        let reconciles = Family::<KindLabels, Counter>::default();
        let errors = Family::<KindLabels, Counter>::default();
        let nodes_by_best_affinity = Family::<AffinityLabels, Gauge>::default();
        let rails = Gauge::default();
        let leader = Gauge::default();
        registry.register("reconciles", "Reconcile passes by kind", reconciles.clone());
        registry.register(
            "reconcile_errors",
            "Failed reconcile passes by kind",
            errors.clone(),
        );
        registry.register(
            "nodes_by_best_affinity",
            "Nodes by the best GPU-NIC affinity they offer (none: no healthy pair)",
            nodes_by_best_affinity.clone(),
        );
        registry.register("rails", "Subnets with a rail number", rails.clone());
        registry.register("leader", "1 while this replica leads", leader.clone());
        Self {
            registry,
            reconciles,
            errors,
            nodes_by_best_affinity,
            rails,
            leader,
        }
    }

    fn kind(kind: ReconcileKind) -> KindLabels {
        KindLabels {
            kind: kind.as_str().to_string(),
        }
    }

    pub fn reconciled(&self, kind: ReconcileKind) {
        self.reconciles.get_or_create(&Self::kind(kind)).inc();
    }

    pub fn failed(&self, kind: ReconcileKind) {
        self.errors.get_or_create(&Self::kind(kind)).inc();
    }

    pub fn reconciles(&self, kind: ReconcileKind) -> u64 {
        self.reconciles.get_or_create(&Self::kind(kind)).get()
    }

    pub fn errors(&self, kind: ReconcileKind) -> u64 {
        self.errors.get_or_create(&Self::kind(kind)).get()
    }

    /// Replaces the node counts per best affinity label value.
    pub fn set_nodes_by_best_affinity(&self, counts: &std::collections::BTreeMap<String, i64>) {
        self.nodes_by_best_affinity.clear();
        for (affinity, count) in counts {
            self.nodes_by_best_affinity
                .get_or_create(&AffinityLabels {
                    affinity: affinity.clone(),
                })
                .set(*count);
        }
    }

    pub fn set_rails(&self, rails: usize) {
        self.rails.set(i64::try_from(rails).unwrap_or(i64::MAX));
    }

    pub fn set_leader(&self, leading: bool) {
        self.leader.set(i64::from(leading));
    }

    pub fn is_leader(&self) -> bool {
        self.leader.get() == 1
    }

    /// The Prometheus text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut text = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut text, &self.registry);
        text
    }
}

impl crate::metrics_http::Responder for Metrics {
    fn get(&self, path: &str) -> Option<Reply> {
        match path {
            "/metrics" => Some(Reply::metrics(self.encode())),
            "/healthz" => Some(Reply::text(StatusCode::OK, "ok\n")),
            _ => None,
        }
    }
}

/// Serves `/metrics` and `/healthz` on `listener` until `shutdown` fires.
pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>, shutdown: CancellationToken) {
    crate::metrics_http::serve(listener, metrics, shutdown).await;
}

/// Binds the metrics address; the error names it.
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, super::ControllerError> {
    crate::metrics_http::bind(addr)
        .await
        .map_err(|e| super::ControllerError::MetricsBind {
            addr: e.addr,
            source: e.source,
        })
}

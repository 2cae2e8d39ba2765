//! The DRA kubelet services, `v1.DRAPlugin` and `v1beta1.DRAPlugin`, as thin wire adapters
//! over one handler that turns requests into claim lists for the claim preparer and answers
//! every claim of the request with its own result or error string.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;

use tokio::sync::RwLock;
use tonic::{Request, Response, Status};

use super::metrics::{Method, PluginMetrics};
use super::proto::{dra_v1, dra_v1beta1};
use super::sockets::SerializeLock;
use crate::prepare::{ClaimRef, PreparedDevice, Preparer};

/// What the gRPC layer needs from claim preparation. Results are keyed by claim UID; an
/// error is the text the kubelet shows in the pod's events, so it names the claim.
pub trait ClaimPreparer: Send + Sync + 'static {
    fn prepare(
        &self,
        claims: &[ClaimRef],
    ) -> impl Future<Output = BTreeMap<String, Result<Vec<PreparedDevice>, String>>> + Send;
    fn unprepare(
        &self,
        claims: &[ClaimRef],
    ) -> impl Future<Output = BTreeMap<String, Result<(), String>>> + Send;
}

impl ClaimPreparer for Preparer {
    async fn prepare(
        &self,
        claims: &[ClaimRef],
    ) -> BTreeMap<String, Result<Vec<PreparedDevice>, String>> {
        Preparer::prepare(self, claims)
            .await
            .into_iter()
            .map(|(uid, result)| (uid, result.map_err(|e| e.to_string())))
            .collect()
    }

    async fn unprepare(&self, claims: &[ClaimRef]) -> BTreeMap<String, Result<(), String>> {
        Preparer::unprepare(self, claims)
            .await
            .into_iter()
            .map(|(uid, result)| (uid, result.map_err(|e| e.to_string())))
            .collect()
    }
}

fn describe(claim: &ClaimRef) -> String {
    format!("{}/{} {}", claim.namespace, claim.name, claim.uid)
}

/// Shared by the v1 and v1beta1 services. Preparation runs on its own task, so a kubelet
/// that gives up (45 s call timeout) or a dropped connection never cancels it half way.
pub struct DraHandler<P> {
    preparer: Arc<P>,
    serialize: Option<SerializeLock>,
    /// Every call holds a read guard; shutdown takes the write side to wait for them.
    in_flight: Arc<RwLock<()>>,
    metrics: Option<Arc<PluginMetrics>>,
}

impl<P: ClaimPreparer> DraHandler<P> {
    pub fn new(preparer: Arc<P>, serialize: Option<SerializeLock>) -> Self {
        Self {
            preparer,
            serialize,
            in_flight: Arc::new(RwLock::new(())),
            metrics: None,
        }
    }

    /// Counts every call and claim outcome in `metrics`.
    pub fn with_metrics(mut self, metrics: Arc<PluginMetrics>) -> Self {
        self.metrics = Some(metrics);
        self
    }

    fn record<T>(
        &self,
        method: Method,
        started: std::time::Instant,
        answers: &BTreeMap<String, Result<T, String>>,
    ) {
        if let Some(metrics) = &self.metrics {
            metrics.record_call(
                method,
                started.elapsed(),
                answers.iter().map(|(uid, r)| (uid.as_str(), r.is_ok())),
            );
        }
    }

    /// Resolves once no prepare or unprepare is running; calls that arrive later wait until
    /// the process ends, which is what shutdown wants.
    pub async fn drain(&self) -> tokio::sync::OwnedRwLockWriteGuard<()> {
        self.in_flight.clone().write_owned().await
    }

    /// One result per distinct claim UID of the request.
    pub async fn prepare(
        &self,
        claims: Vec<ClaimRef>,
    ) -> BTreeMap<String, Result<Vec<PreparedDevice>, String>> {
        let started = std::time::Instant::now();
        let (valid, rejected) = split_valid(claims);
        let mut answers: BTreeMap<_, _> = rejected
            .into_iter()
            .map(|(uid, error)| (uid, Err(error)))
            .collect();
        answers.extend(
            self.run(valid, |preparer, claims| async move {
                preparer.prepare(&claims).await
            })
            .await,
        );
        self.record(Method::Prepare, started, &answers);
        answers
    }

    /// One result per distinct claim UID of the request.
    pub async fn unprepare(&self, claims: Vec<ClaimRef>) -> BTreeMap<String, Result<(), String>> {
        let started = std::time::Instant::now();
        let (valid, rejected) = split_valid(claims);
        let mut answers: BTreeMap<_, _> = rejected
            .into_iter()
            .map(|(uid, error)| (uid, Err(error)))
            .collect();
        answers.extend(
            self.run(valid, |preparer, claims| async move {
                preparer.unprepare(&claims).await
            })
            .await,
        );
        self.record(Method::Unprepare, started, &answers);
        answers
    }

    /// Runs `operation` on its own task under the in-flight guard and, in rolling-update
    /// mode, the serialize lock; then makes sure every claim has an answer.
    async fn run<T, F, Fut>(
        &self,
        claims: Vec<ClaimRef>,
        operation: F,
    ) -> BTreeMap<String, Result<T, String>>
    where
        T: Send + 'static,
        F: FnOnce(Arc<P>, Vec<ClaimRef>) -> Fut + Send + 'static,
        Fut: Future<Output = BTreeMap<String, Result<T, String>>> + Send + 'static,
    {
        if claims.is_empty() {
            return BTreeMap::new();
        }
        let preparer = self.preparer.clone();
        let serialize = self.serialize.clone();
        let in_flight = self.in_flight.clone().read_owned().await;
        let task_claims = claims.clone();
        let task = tokio::spawn(async move {
            let _in_flight = in_flight;
            let _serialized = match &serialize {
                Some(lock) => Some(lock.acquire().await.map_err(|e| e.to_string())?),
                None => None,
            };
            Ok::<_, String>(operation(preparer, task_claims).await)
        });
        let (mut results, batch_error) = match task.await {
            Ok(Ok(results)) => (results, None),
            Ok(Err(lock_error)) => (BTreeMap::new(), Some(lock_error)),
            Err(join_error) => (BTreeMap::new(), Some(format!("task failed: {join_error}"))),
        };
        claims
            .iter()
            .map(|claim| {
                let result = results.remove(&claim.uid).unwrap_or_else(|| {
                    Err(match &batch_error {
                        Some(error) => format!("claim {}: {error}", describe(claim)),
                        None => format!("claim {}: preparer returned no result", describe(claim)),
                    })
                });
                (claim.uid.clone(), result)
            })
            .collect()
    }
}

/// Drops repeated UIDs (the response map has one entry per UID anyway) and answers claims
/// with missing fields right away, so one malformed entry cannot fail the others.
fn split_valid(claims: Vec<ClaimRef>) -> (Vec<ClaimRef>, BTreeMap<String, String>) {
    let mut valid: Vec<ClaimRef> = Vec::with_capacity(claims.len());
    let mut answers = BTreeMap::new();
    for claim in claims {
        if answers.contains_key(&claim.uid) || valid.iter().any(|c| c.uid == claim.uid) {
            continue;
        }
        let missing: Vec<&str> = [
            ("uid", claim.uid.is_empty()),
            ("namespace", claim.namespace.is_empty()),
            ("name", claim.name.is_empty()),
        ]
        .into_iter()
        .filter_map(|(field, empty)| empty.then_some(field))
        .collect();
        if missing.is_empty() {
            valid.push(claim);
        } else {
            let error = format!(
                "claim {}: request leaves {} empty",
                describe(&claim),
                missing.join(", ")
            );
            answers.insert(claim.uid, error);
        }
    }
    (valid, answers)
}

/// `k8s.io.kubelet.pkg.apis.dra.v1.DRAPlugin`.
pub struct DraV1<P>(pub Arc<DraHandler<P>>);

/// `k8s.io.kubelet.pkg.apis.dra.v1beta1.DRAPlugin`: v1 without share IDs.
pub struct DraV1beta1<P>(pub Arc<DraHandler<P>>);

macro_rules! claim_refs {
    ($claims:expr) => {
        $claims
            .into_iter()
            .map(|c| ClaimRef {
                namespace: c.namespace,
                name: c.name,
                uid: c.uid,
            })
            .collect::<Vec<_>>()
    };
}

#[tonic::async_trait]
impl<P: ClaimPreparer> dra_v1::dra_plugin_server::DraPlugin for DraV1<P> {
    async fn node_prepare_resources(
        &self,
        request: Request<dra_v1::NodePrepareResourcesRequest>,
    ) -> Result<Response<dra_v1::NodePrepareResourcesResponse>, Status> {
        let results = self
            .0
            .prepare(claim_refs!(request.into_inner().claims))
            .await;
        let claims = results
            .into_iter()
            .map(|(uid, result)| {
                let answer = match result {
                    Ok(devices) => dra_v1::NodePrepareResourceResponse {
                        devices: devices
                            .into_iter()
                            .map(|d| dra_v1::Device {
                                request_names: d.request_names,
                                pool_name: d.pool_name,
                                device_name: d.device_name,
                                cdi_device_ids: d.cdi_device_ids,
                                share_id: d.share_id,
                            })
                            .collect(),
                        error: String::new(),
                    },
                    Err(error) => dra_v1::NodePrepareResourceResponse {
                        devices: Vec::new(),
                        error,
                    },
                };
                (uid, answer)
            })
            .collect();
        Ok(Response::new(dra_v1::NodePrepareResourcesResponse {
            claims,
        }))
    }

    async fn node_unprepare_resources(
        &self,
        request: Request<dra_v1::NodeUnprepareResourcesRequest>,
    ) -> Result<Response<dra_v1::NodeUnprepareResourcesResponse>, Status> {
        let results = self
            .0
            .unprepare(claim_refs!(request.into_inner().claims))
            .await;
        let claims = results
            .into_iter()
            .map(|(uid, result)| {
                let error = result.err().unwrap_or_default();
                (uid, dra_v1::NodeUnprepareResourceResponse { error })
            })
            .collect();
        Ok(Response::new(dra_v1::NodeUnprepareResourcesResponse {
            claims,
        }))
    }
}

#[tonic::async_trait]
impl<P: ClaimPreparer> dra_v1beta1::dra_plugin_server::DraPlugin for DraV1beta1<P> {
    async fn node_prepare_resources(
        &self,
        request: Request<dra_v1beta1::NodePrepareResourcesRequest>,
    ) -> Result<Response<dra_v1beta1::NodePrepareResourcesResponse>, Status> {
        let results = self
            .0
            .prepare(claim_refs!(request.into_inner().claims))
            .await;
        let claims = results
            .into_iter()
            .map(|(uid, result)| {
                let answer = match result {
                    Ok(devices) => dra_v1beta1::NodePrepareResourceResponse {
                        devices: devices
                            .into_iter()
                            .map(|d| dra_v1beta1::Device {
                                request_names: d.request_names,
                                pool_name: d.pool_name,
                                device_name: d.device_name,
                                cdi_device_ids: d.cdi_device_ids,
                            })
                            .collect(),
                        error: String::new(),
                    },
                    Err(error) => dra_v1beta1::NodePrepareResourceResponse {
                        devices: Vec::new(),
                        error,
                    },
                };
                (uid, answer)
            })
            .collect();
        Ok(Response::new(dra_v1beta1::NodePrepareResourcesResponse {
            claims,
        }))
    }

    async fn node_unprepare_resources(
        &self,
        request: Request<dra_v1beta1::NodeUnprepareResourcesRequest>,
    ) -> Result<Response<dra_v1beta1::NodeUnprepareResourcesResponse>, Status> {
        let results = self
            .0
            .unprepare(claim_refs!(request.into_inner().claims))
            .await;
        let claims = results
            .into_iter()
            .map(|(uid, result)| {
                let error = result.err().unwrap_or_default();
                (uid, dra_v1beta1::NodeUnprepareResourceResponse { error })
            })
            .collect();
        Ok(Response::new(dra_v1beta1::NodeUnprepareResourcesResponse {
            claims,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// Prepares every claim whose name does not start with "bad", forgets claims named
    /// "forgotten", and records which claims it was asked about.
    #[derive(Default)]
    struct RecordingPreparer {
        asked: Mutex<Vec<Vec<String>>>,
    }

    impl ClaimPreparer for RecordingPreparer {
        async fn prepare(
            &self,
            claims: &[ClaimRef],
        ) -> BTreeMap<String, Result<Vec<PreparedDevice>, String>> {
            self.asked
                .lock()
                .unwrap()
                .push(claims.iter().map(|c| c.uid.clone()).collect());
            claims
                .iter()
                .filter(|c| c.name != "forgotten")
                .map(|c| {
                    let result = if c.name.starts_with("bad") {
                        Err(format!("claim {}: broken", describe(c)))
                    } else {
                        Ok(vec![PreparedDevice {
                            request_names: vec!["gpus".into()],
                            pool_name: "node-a".into(),
                            device_name: "gpu-0000-18-00-0".into(),
                            cdi_device_ids: vec![format!("tandem.dev/claim={}", c.uid)],
                            share_id: None,
                        }])
                    };
                    (c.uid.clone(), result)
                })
                .collect()
        }

        async fn unprepare(&self, claims: &[ClaimRef]) -> BTreeMap<String, Result<(), String>> {
            claims
                .iter()
                .filter(|c| c.name != "forgotten")
                .map(|c| (c.uid.clone(), Ok(())))
                .collect()
        }
    }

    fn claim(name: &str, uid: &str) -> ClaimRef {
        ClaimRef {
            namespace: "default".into(),
            name: name.into(),
            uid: uid.into(),
        }
    }

    #[tokio::test]
    async fn every_claim_gets_its_own_answer() {
        let preparer = Arc::new(RecordingPreparer::default());
        let handler = DraHandler::new(preparer.clone(), None);
        let answers = handler
            .prepare(vec![
                claim("good", "u1"),
                claim("bad-config", "u2"),
                claim("forgotten", "u3"),
                claim("good-again", "u1"),
                claim("", "u4"),
            ])
            .await;
        assert_eq!(answers.len(), 4);
        assert_eq!(
            answers["u1"].as_ref().unwrap()[0].device_name,
            "gpu-0000-18-00-0"
        );
        assert!(
            answers["u2"]
                .as_ref()
                .unwrap_err()
                .contains("default/bad-config u2")
        );
        assert!(answers["u3"].as_ref().unwrap_err().contains("no result"));
        assert!(
            answers["u4"]
                .as_ref()
                .unwrap_err()
                .contains("leaves name empty")
        );
        // The duplicate UID and the malformed claim never reach the preparer.
        assert_eq!(
            *preparer.asked.lock().unwrap(),
            vec![vec!["u1", "u2", "u3"]]
        );
    }

    #[tokio::test]
    async fn unprepare_answers_every_claim() {
        let handler = DraHandler::new(Arc::new(RecordingPreparer::default()), None);
        let answers = handler
            .unprepare(vec![claim("a", "u1"), claim("forgotten", "u2")])
            .await;
        assert_eq!(answers["u1"], Ok(()));
        assert!(
            answers["u2"]
                .as_ref()
                .unwrap_err()
                .contains("default/forgotten u2")
        );
    }

    #[tokio::test]
    async fn an_empty_request_asks_nothing() {
        let preparer = Arc::new(RecordingPreparer::default());
        let handler = DraHandler::new(preparer.clone(), None);
        assert!(handler.prepare(Vec::new()).await.is_empty());
        assert!(preparer.asked.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn drain_waits_for_calls_in_flight() {
        /// Signals when prepare started, then waits until released.
        struct Blocking {
            started: tokio::sync::Notify,
            release: tokio::sync::Notify,
        }
        impl ClaimPreparer for Blocking {
            async fn prepare(
                &self,
                claims: &[ClaimRef],
            ) -> BTreeMap<String, Result<Vec<PreparedDevice>, String>> {
                self.started.notify_one();
                self.release.notified().await;
                claims
                    .iter()
                    .map(|c| (c.uid.clone(), Ok(Vec::new())))
                    .collect()
            }
            async fn unprepare(&self, _: &[ClaimRef]) -> BTreeMap<String, Result<(), String>> {
                BTreeMap::new()
            }
        }
        let preparer = Arc::new(Blocking {
            started: tokio::sync::Notify::new(),
            release: tokio::sync::Notify::new(),
        });
        let handler = Arc::new(DraHandler::new(preparer.clone(), None));
        let call = tokio::spawn({
            let handler = handler.clone();
            async move { handler.prepare(vec![claim("a", "u1")]).await }
        });
        preparer.started.notified().await;
        let drain = handler.drain();
        tokio::pin!(drain);
        let early = tokio::time::timeout(std::time::Duration::from_millis(50), &mut drain).await;
        assert!(early.is_err(), "drain finished while a prepare was running");
        preparer.release.notify_one();
        let _drained = drain.await;
        assert!(call.await.unwrap()["u1"].is_ok());
    }
}

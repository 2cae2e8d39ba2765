//! Leader election over a coordination.k8s.io/v1 Lease with optimistic concurrency: every
//! write carries the resourceVersion it read, so of two replicas racing only one wins. A lease
//! counts as expired once this replica has seen it unchanged for its duration on its own
//! clock (as client-go does), so clock skew between replicas cannot hand out two leaderships.

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::api::{Api, PostParams};
use std::time::Duration;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaseConfig {
    pub namespace: String,
    pub name: String,
    pub identity: String,
    /// How long a holder that stopped renewing keeps the lease.
    pub duration: Duration,
}

impl LeaseConfig {
    /// How often the holder renews and candidates retry.
    pub fn retry_period(&self) -> Duration {
        (self.duration / 5).max(Duration::from_millis(50))
    }

    /// A holder that could not renew for this long steps down, before others may take over.
    pub fn renew_deadline(&self) -> Duration {
        self.duration * 2 / 3
    }
}

#[derive(Debug, thiserror::Error)]
#[error("lease {namespace}/{name}: {source}")]
pub struct LeaseError {
    pub namespace: String,
    pub name: String,
    #[source]
    pub source: kube::Error,
}

/// Why holding the lease ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HoldEnd {
    /// Another replica holds it now, or renewing failed past the renew deadline.
    Lost,
    /// The shutdown token fired; the lease is still ours until released.
    Shutdown,
}

pub struct LeaderElector {
    api: Api<Lease>,
    config: LeaseConfig,
    /// The resourceVersion last seen and when this replica first saw it.
    observed: Option<(String, Instant)>,
}

fn is_conflict(error: &kube::Error) -> bool {
    matches!(error, kube::Error::Api(status) if status.code == 409)
}

fn seconds(duration: Duration) -> i32 {
    i32::try_from(duration.as_secs().max(1)).unwrap_or(i32::MAX)
}

impl LeaderElector {
    pub fn new(client: kube::Client, config: LeaseConfig) -> Self {
        Self {
            api: Api::namespaced(client, &config.namespace),
            config,
            observed: None,
        }
    }

    fn error(&self, source: kube::Error) -> LeaseError {
        LeaseError {
            namespace: self.config.namespace.clone(),
            name: self.config.name.clone(),
            source,
        }
    }

    fn params() -> PostParams {
        PostParams {
            field_manager: Some(crate::names::CONTROLLER_FIELD_MANAGER.to_string()),
            ..Default::default()
        }
    }

    /// One attempt to take or renew the lease; true when this replica holds it afterwards.
    pub async fn try_acquire_or_renew(&mut self) -> Result<bool, LeaseError> {
        let now = Instant::now();
        let stamp = MicroTime(k8s_openapi::jiff::Timestamp::now());
        let me = self.config.identity.clone();
        let Some(mut lease) = self
            .api
            .get_opt(&self.config.name)
            .await
            .map_err(|e| self.error(e))?
        else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.config.name.clone()),
                    namespace: Some(self.config.namespace.clone()),
                    ..Default::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(me),
                    lease_duration_seconds: Some(seconds(self.config.duration)),
                    acquire_time: Some(stamp.clone()),
                    renew_time: Some(stamp),
                    lease_transitions: Some(0),
                    ..Default::default()
                }),
            };
            return match self.api.create(&Self::params(), &lease).await {
                Ok(created) => {
                    self.observe(&created, now);
                    Ok(true)
                }
                Err(e) if is_conflict(&e) => Ok(false),
                Err(e) => Err(self.error(e)),
            };
        };
        self.observe(&lease, now);
        let spec = lease.spec.clone().unwrap_or_default();
        let holder = spec.holder_identity.clone().filter(|h| !h.is_empty());
        let ours = holder.as_deref() == Some(me.as_str());
        if let Some(other) = holder.as_deref()
            && !ours
        {
            let duration = spec
                .lease_duration_seconds
                .and_then(|s| u64::try_from(s).ok())
                .map_or(self.config.duration, Duration::from_secs);
            let seen_since = self.observed.as_ref().map_or(now, |(_, at)| *at);
            if now.duration_since(seen_since) < duration {
                tracing::trace!(holder = other, "lease held by another replica");
                return Ok(false);
            }
            tracing::info!(holder = other, "lease expired; taking over");
        }
        let transitions = spec.lease_transitions.unwrap_or(0);
        lease.spec = Some(LeaseSpec {
            holder_identity: Some(me),
            lease_duration_seconds: Some(seconds(self.config.duration)),
            acquire_time: if ours {
                spec.acquire_time
            } else {
                Some(stamp.clone())
            },
            renew_time: Some(stamp),
            lease_transitions: Some(if ours { transitions } else { transitions + 1 }),
            ..spec
        });
        match self
            .api
            .replace(&self.config.name, &Self::params(), &lease)
            .await
        {
            Ok(written) => {
                self.observe(&written, now);
                Ok(true)
            }
            Err(e) if is_conflict(&e) => Ok(false),
            Err(e) => Err(self.error(e)),
        }
    }

    fn observe(&mut self, lease: &Lease, now: Instant) {
        let rv = lease.metadata.resource_version.clone().unwrap_or_default();
        if self.observed.as_ref().is_none_or(|(seen, _)| *seen != rv) {
            self.observed = Some((rv, now));
        }
    }

    /// Waits until this replica holds the lease (true) or `shutdown` fires (false).
    pub async fn acquire(&mut self, shutdown: &CancellationToken) -> bool {
        loop {
            match self.try_acquire_or_renew().await {
                Ok(true) => {
                    tracing::info!(identity = %self.config.identity, "became leader");
                    return true;
                }
                Ok(false) => {}
                Err(e) => tracing::warn!(error = %e, "leader election attempt failed"),
            }
            tokio::select! {
                () = shutdown.cancelled() => return false,
                () = tokio::time::sleep(self.config.retry_period()) => {}
            }
        }
    }

    /// Renews the lease until it is lost or `shutdown` fires.
    pub async fn hold(&mut self, shutdown: &CancellationToken) -> HoldEnd {
        let mut renewed = Instant::now();
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return HoldEnd::Shutdown,
                () = tokio::time::sleep(self.config.retry_period()) => {}
            }
            let deadline = renewed + self.config.renew_deadline();
            let attempt = tokio::time::timeout_at(deadline, self.try_acquire_or_renew()).await;
            match attempt {
                Ok(Ok(true)) => renewed = Instant::now(),
                Ok(Ok(false)) => {
                    tracing::warn!(identity = %self.config.identity, "lease taken by another replica");
                    return HoldEnd::Lost;
                }
                Ok(Err(e)) => tracing::warn!(error = %e, "renewing the lease failed"),
                Err(_) => {}
            }
            if Instant::now() >= deadline {
                tracing::warn!(identity = %self.config.identity, "could not renew the lease in time; stepping down");
                return HoldEnd::Lost;
            }
        }
    }

    /// Gives the lease up so another replica can lead at once rather than after it expires.
    pub async fn release(&mut self) -> Result<(), LeaseError> {
        let Some(mut lease) = self
            .api
            .get_opt(&self.config.name)
            .await
            .map_err(|e| self.error(e))?
        else {
            return Ok(());
        };
        let mut spec = lease.spec.clone().unwrap_or_default();
        if spec.holder_identity.as_deref() != Some(self.config.identity.as_str()) {
            return Ok(());
        }
        spec.holder_identity = None;
        spec.renew_time = None;
        spec.acquire_time = None;
        spec.lease_duration_seconds = Some(1);
        lease.spec = Some(spec);
        match self
            .api
            .replace(&self.config.name, &Self::params(), &lease)
            .await
        {
            Ok(_) => {
                tracing::info!(identity = %self.config.identity, "released the lease");
                Ok(())
            }
            // Someone else wrote it meanwhile, so it is not ours to release any more.
            Err(e) if is_conflict(&e) => Ok(()),
            Err(e) => Err(self.error(e)),
        }
    }
}

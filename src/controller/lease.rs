//! Leader election over the coordination.k8s.io/v1 Lease, by `kube-lease-manager`: a free
//! lease is taken with a server-side apply under a per-replica field manager, so of two
//! replicas racing for it the second gets a field-manager conflict; the holder renews before
//! the lease runs out, and releases it on a graceful stop so a standby takes over at once.

use kube_lease_manager::{LeaseManager, LeaseManagerBuilder, LeaseManagerError, LeaseParams};
use std::time::Duration;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaseConfig {
    pub namespace: String,
    pub name: String,
    pub identity: String,
    /// How long a holder that stopped renewing keeps the lease (whole seconds, at least 2).
    pub duration: Duration,
}

impl LeaseConfig {
    /// The Lease's `leaseDurationSeconds`.
    pub fn duration_seconds(&self) -> u64 {
        self.duration.as_secs().max(2)
    }

    /// How long before the lease runs out the holder renews it: a third of the duration, so
    /// a renewal that fails once is retried before anyone else may take over.
    pub fn grace_seconds(&self) -> u64 {
        (self.duration_seconds() / 3).max(1)
    }

    /// The field manager of this replica's Lease writes; one per replica, since conflicts
    /// between field managers are what keeps two replicas from taking a free lease together.
    pub fn field_manager(&self) -> String {
        let manager = format!(
            "{}-{}",
            crate::names::CONTROLLER_FIELD_MANAGER,
            self.identity
        );
        // The apiserver rejects field managers over 128 characters.
        manager.chars().take(128).collect()
    }
}

#[derive(Debug, thiserror::Error)]
#[error("lease {namespace}/{name}: {source}")]
pub struct LeaseError {
    pub namespace: String,
    pub name: String,
    #[source]
    pub source: LeaseManagerError,
}

/// A manager for the lease, creating the Lease object if it does not exist yet.
pub async fn lease_manager(
    client: kube::Client,
    config: &LeaseConfig,
) -> Result<LeaseManager, LeaseError> {
    let params = LeaseParams::new(
        config.identity.clone(),
        config.duration_seconds(),
        config.grace_seconds(),
    )
    .with_field_manager(config.field_manager());
    LeaseManagerBuilder::new(client, config.name.clone())
        .with_namespace(config.namespace.clone())
        .with_parameters(params)
        .build()
        .await
        .map_err(|source| LeaseError {
            namespace: config.namespace.clone(),
            name: config.name.clone(),
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_are_whole_seconds_with_room_to_renew() {
        let config = |secs: u64| LeaseConfig {
            namespace: "ns".into(),
            name: "lease".into(),
            identity: "replica-a".into(),
            duration: Duration::from_millis(secs),
        };
        assert_eq!(
            (
                config(15_000).duration_seconds(),
                config(15_000).grace_seconds()
            ),
            (15, 5)
        );
        assert_eq!(
            (config(500).duration_seconds(), config(500).grace_seconds()),
            (2, 1)
        );
        assert_eq!(
            config(15_000).field_manager(),
            "tandem-controller-replica-a"
        );
    }
}

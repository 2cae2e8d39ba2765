//! The `pluginregistration.Registration` service the kubelet's plugin watcher calls on our
//! registration socket: GetInfo tells it the driver name and where the DRA socket is, and
//! NotifyRegistrationStatus tells us whether it accepted us. What it told us last is kept in a
//! watch: readiness and ResourceSlice publishing wait for it.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::watch;
use tonic::{Request, Response, Status};

use super::proto::pluginregistration::{
    InfoRequest, PluginInfo, RegistrationStatus, RegistrationStatusResponse,
    registration_server::Registration,
};
use super::proto::{PLUGIN_TYPE_DRA, SERVICE_DRA_V1, SERVICE_DRA_V1BETA1, SERVICE_HEALTH_V1ALPHA1};

/// Where this instance stands with the kubelet.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum KubeletRegistration {
    /// No NotifyRegistrationStatus yet.
    #[default]
    Waiting,
    /// The kubelet called NotifyRegistrationStatus(registered=true).
    Registered,
    /// The kubelet refused us, with its reason; it retries with backoff.
    Rejected(String),
    /// Our registration socket disappeared (the kubelet wiped its registry directory, or
    /// someone removed it); the kubelet forgets us on its next tick.
    Lost,
}

impl KubeletRegistration {
    /// True once the kubelet accepted this instance (and has not lost it since).
    pub fn is_registered(&self) -> bool {
        *self == KubeletRegistration::Registered
    }
}

/// Follows [`KubeletRegistration`] changes.
pub type RegistrationWatch = watch::Receiver<KubeletRegistration>;

/// The registration service on our registration socket; clones share the state.
#[derive(Clone, Debug)]
pub struct RegistrationService {
    driver_name: String,
    /// Absolute: the kubelet dials exactly this path.
    dra_endpoint: PathBuf,
    state: Arc<watch::Sender<KubeletRegistration>>,
    info_served: Arc<AtomicU64>,
}

impl RegistrationService {
    /// Registers driver `driver_name` with its DRA socket at `dra_endpoint`, which must be
    /// absolute: the kubelet dials exactly this path.
    pub fn new(driver_name: String, dra_endpoint: PathBuf) -> Self {
        Self {
            driver_name,
            dra_endpoint,
            state: Arc::new(watch::Sender::new(KubeletRegistration::Waiting)),
            info_served: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Follows what the kubelet told this instance.
    pub fn watch(&self) -> RegistrationWatch {
        self.state.subscribe()
    }

    /// How many GetInfo calls this instance answered.
    pub fn info_served(&self) -> u64 {
        self.info_served.load(Ordering::Relaxed)
    }

    /// Records that the registration socket is gone, so the kubelet no longer knows us.
    pub fn mark_lost(&self) {
        self.set(KubeletRegistration::Lost);
    }

    fn set(&self, state: KubeletRegistration) {
        self.state.send_if_modified(|current| {
            let changed = *current != state;
            *current = state;
            changed
        });
    }

    /// The services we serve, in order of preference: the kubelet takes the first one it
    /// knows, so v1 comes before v1beta1; the health service is listed for kubelets that
    /// look for it and ignored by those that do not.
    pub fn supported_versions() -> Vec<String> {
        [SERVICE_DRA_V1, SERVICE_DRA_V1BETA1, SERVICE_HEALTH_V1ALPHA1]
            .into_iter()
            .map(String::from)
            .collect()
    }

    /// What GetInfo answers: type `DRAPlugin`, the driver name, the DRA socket and
    /// [`Self::supported_versions`].
    pub fn info(&self) -> PluginInfo {
        PluginInfo {
            r#type: PLUGIN_TYPE_DRA.to_string(),
            name: self.driver_name.clone(),
            endpoint: self.dra_endpoint.to_string_lossy().into_owned(),
            supported_versions: Self::supported_versions(),
        }
    }
}

#[tonic::async_trait]
impl Registration for RegistrationService {
    async fn get_info(&self, _: Request<InfoRequest>) -> Result<Response<PluginInfo>, Status> {
        let attempt = self.info_served.fetch_add(1, Ordering::Relaxed) + 1;
        let info = self.info();
        tracing::info!(
            driver = %self.driver_name,
            endpoint = %info.endpoint,
            versions = ?info.supported_versions,
            attempt,
            "registration: served GetInfo"
        );
        Ok(Response::new(info))
    }

    async fn notify_registration_status(
        &self,
        request: Request<RegistrationStatus>,
    ) -> Result<Response<RegistrationStatusResponse>, Status> {
        let status = request.into_inner();
        if status.plugin_registered {
            tracing::info!(driver = %self.driver_name, "registration: the kubelet registered the plugin");
            self.set(KubeletRegistration::Registered);
        } else {
            // Nothing we can retry from here: the kubelet retries with its own backoff (0.5 s
            // doubling to about 2 min), so the log line is what the operator has to go on.
            tracing::error!(
                driver = %self.driver_name,
                error = %status.error,
                "registration: the kubelet rejected the plugin"
            );
            self.set(KubeletRegistration::Rejected(status.error));
        }
        Ok(Response::new(RegistrationStatusResponse {}))
    }
}

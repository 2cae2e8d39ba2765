//! The `pluginregistration.Registration` service the kubelet's plugin watcher calls on our
//! registration socket: GetInfo tells it the driver name and where the DRA socket is, and
//! NotifyRegistrationStatus tells us whether it accepted us.

use std::path::PathBuf;

use tonic::{Request, Response, Status};

use super::proto::pluginregistration::{
    InfoRequest, PluginInfo, RegistrationStatus, RegistrationStatusResponse,
    registration_server::Registration,
};
use super::proto::{PLUGIN_TYPE_DRA, SERVICE_DRA_V1, SERVICE_DRA_V1BETA1, SERVICE_HEALTH_V1ALPHA1};

#[derive(Clone, Debug)]
pub struct RegistrationService {
    driver_name: String,
    /// Absolute: the kubelet dials exactly this path.
    dra_endpoint: PathBuf,
}

impl RegistrationService {
    pub fn new(driver_name: String, dra_endpoint: PathBuf) -> Self {
        Self {
            driver_name,
            dra_endpoint,
        }
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
        tracing::debug!(driver = %self.driver_name, "kubelet asked for plugin info");
        Ok(Response::new(self.info()))
    }

    async fn notify_registration_status(
        &self,
        request: Request<RegistrationStatus>,
    ) -> Result<Response<RegistrationStatusResponse>, Status> {
        let status = request.into_inner();
        if status.plugin_registered {
            tracing::info!(driver = %self.driver_name, "kubelet registered the plugin");
        } else {
            // Nothing we can retry from here: the kubelet tries again when the socket is
            // recreated, so the log line is what the operator has to go on.
            tracing::error!(
                driver = %self.driver_name,
                error = %status.error,
                "kubelet rejected the plugin registration"
            );
        }
        Ok(Response::new(RegistrationStatusResponse {}))
    }
}

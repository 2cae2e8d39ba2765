//! The kubelet's side of the wire, for `tandem demo`, tests and benchmarks: a gRPC channel
//! over one of our Unix sockets, on which the generated clients run.

use std::path::{Path, PathBuf};

use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint, Uri};

/// Nothing answered on the socket: it is missing, not a socket, or no gRPC server listens.
#[derive(Debug, thiserror::Error)]
#[error("connecting to {path}: {source}")]
pub struct ConnectError {
    /// The socket dialled.
    pub path: PathBuf,
    /// What the connection attempt failed with.
    #[source]
    pub source: tonic::transport::Error,
}

/// Connects to the gRPC server on the Unix socket `path`, as the kubelet dials
/// `unix://<endpoint>`. The URI is required by tonic and ignored by the connector.
pub async fn unix_channel(path: &Path) -> Result<Channel, ConnectError> {
    let socket = path.to_path_buf();
    let endpoint = Endpoint::from_static("http://[::1]:1");
    endpoint
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let socket = socket.clone();
            async move { UnixStream::connect(socket).await.map(TokioIo::new) }
        }))
        .await
        .map_err(|source| ConnectError {
            path: path.to_path_buf(),
            source,
        })
}

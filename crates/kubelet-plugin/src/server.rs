//! Runs the kubelet-facing servers: the DRA services (v1, v1beta1, health) on the DRA socket
//! and the registration service on the registry socket, recreated when the kubelet wipes it.
//! Shutdown deregisters first, lets in-flight calls finish, then removes our sockets.

use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{UnixListener, UnixStream};
use tokio::task::JoinHandle;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::UnixListenerStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::Server;

use crate::authority::KubeletStream;
use crate::config::PluginConfig;
use crate::dra_service::{DraHandler, DraV1, DraV1beta1};
use crate::driver::{CallObserver, Driver};
use crate::health::{DeviceHealthFeed, HealthService};
use crate::proto::dra_health_v1alpha1::dra_resource_health_server::DraResourceHealthServer;
use crate::proto::pluginregistration::registration_server::RegistrationServer;
use crate::proto::{dra_v1, dra_v1beta1};
use crate::registration::{RegistrationService, RegistrationWatch};
use crate::sockets::{self, SerializeLock, SocketError, SocketPaths};

/// A registration server that the kubelet keeps a connection to must not hold up a socket
/// recreation or the shutdown for long.
const REGISTRATION_DRAIN_TIMEOUT: Duration = Duration::from_secs(2);

/// Why the plugin could not start, or why its servers stopped.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// Binding a socket failed.
    #[error(transparent)]
    Socket(#[from] SocketError),
    /// A socket path could not be made absolute (the current directory is gone).
    #[error("making {path} absolute: {source}")]
    Absolute {
        /// The relative path.
        path: PathBuf,
        /// Why it failed.
        source: io::Error,
    },
    /// The DRA gRPC server failed.
    #[error("gRPC server on {path}: {source}")]
    Transport {
        /// The DRA socket.
        path: PathBuf,
        /// The server's error.
        source: tonic::transport::Error,
    },
    /// The server task panicked or was cancelled.
    #[error("plugin server task failed: {0}")]
    Task(String),
}

/// The servers started by [`start`]. Dropping this does not stop them; call
/// [`RunningPlugin::shutdown`] or cancel the token and [`RunningPlugin::wait`].
#[derive(Debug)]
pub struct RunningPlugin {
    paths: SocketPaths,
    shutdown: CancellationToken,
    registration: RegistrationWatch,
    task: JoinHandle<Result<(), ServeError>>,
}

impl RunningPlugin {
    /// What the kubelet last told this instance about its registration.
    pub fn registration(&self) -> RegistrationWatch {
        self.registration.clone()
    }

    /// The sockets, with absolute paths (the DRA path is what GetInfo reports).
    pub fn paths(&self) -> &SocketPaths {
        &self.paths
    }

    /// Cancelling this token starts the graceful shutdown.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Stops accepting, waits for in-flight calls and removes our sockets.
    pub async fn shutdown(self) -> Result<(), ServeError> {
        self.shutdown.cancel();
        self.wait().await
    }

    /// Waits until the servers stop (after the token is cancelled, or on a server error).
    pub async fn wait(self) -> Result<(), ServeError> {
        self.task
            .await
            .map_err(|e| ServeError::Task(e.to_string()))?
    }
}

/// Binds both sockets (so errors surface here and the sockets exist when this returns) and
/// serves until the returned handle is shut down. The DRA socket is bound before the
/// registration socket: the kubelet dials the DRA endpoint as soon as it sees registration.
pub async fn start<D: Driver, S: Send + Sync + 'static>(
    config: &PluginConfig,
    driver: Arc<D>,
    health: DeviceHealthFeed<S>,
) -> Result<RunningPlugin, ServeError> {
    start_observed(config, driver, health, None).await
}

/// [`start`], telling `observer` about every prepare and unprepare (for metrics).
pub async fn start_observed<D: Driver, S: Send + Sync + 'static>(
    config: &PluginConfig,
    driver: Arc<D>,
    health: DeviceHealthFeed<S>,
    observer: Option<Arc<dyn CallObserver>>,
) -> Result<RunningPlugin, ServeError> {
    let mut paths = config.socket_paths();
    paths.registration = absolute(&paths.registration)?;
    paths.dra = absolute(&paths.dra)?;
    paths.plugin_dir = absolute(&paths.plugin_dir)?;
    paths.serialize_lock = paths.serialize_lock.as_deref().map(absolute).transpose()?;

    let dra_listener = sockets::bind_socket(&paths.dra)?;
    let registration_listener = match sockets::bind_socket(&paths.registration) {
        Ok(listener) => listener,
        Err(e) => {
            sockets::remove_socket(&paths.dra);
            return Err(e.into());
        }
    };

    let shutdown = CancellationToken::new();
    let mut handler = DraHandler::new(driver, paths.serialize_lock.clone().map(SerializeLock::new));
    if let Some(observer) = observer {
        handler = handler.with_observer(observer);
    }
    let handler = Arc::new(handler);
    let health = HealthService::new(
        config.node_name.clone(),
        health,
        config.health_report_interval,
        shutdown.clone(),
    );
    let dra_server = Server::builder()
        .add_service(dra_v1::dra_plugin_server::DraPluginServer::from_arc(
            Arc::new(DraV1(handler.clone())),
        ))
        .add_service(dra_v1beta1::dra_plugin_server::DraPluginServer::from_arc(
            Arc::new(DraV1beta1(handler.clone())),
        ))
        .add_service(DraResourceHealthServer::new(health))
        .serve_with_incoming_shutdown(
            kubelet_connections(dra_listener, "dra"),
            shutdown.clone().cancelled_owned(),
        );
    let registration = RegistrationService::new(config.driver_name.clone(), paths.dra.clone());
    let registration_watch = registration.watch();
    tokio::spawn(warn_while_unregistered(
        registration.clone(),
        config.registry_dir.clone(),
        paths.registration.clone(),
        config.registration_warn_interval,
        shutdown.clone(),
    ));
    let registration_task = serve_registration(
        registration,
        paths.registration.clone(),
        registration_listener,
        config.registration_check_interval,
        shutdown.clone(),
    );

    let task_paths = paths.clone();
    let task_shutdown = shutdown.clone();
    let task = tokio::spawn(async move {
        let dra_task = tokio::spawn(dra_server);
        // Deregistered (socket removed) as soon as shutdown starts, so the kubelet sends new
        // calls to another instance while ours finish.
        let registration_done = async {
            registration_task.await;
            sockets::remove_socket(&task_paths.registration);
        };
        let dra_done = async {
            let served = dra_task.await;
            // A DRA server that failed ends this instance: the registration must not
            // advertise an endpoint that no longer answers.
            task_shutdown.cancel();
            served
        };
        let ((), served) = tokio::join!(registration_done, dra_done);
        let _drained = handler.drain().await;
        sockets::remove_socket(&task_paths.dra);
        tracing::info!(socket = %task_paths.dra.display(), "plugin sockets removed");
        match served {
            Ok(Ok(())) => Ok(()),
            Ok(Err(source)) => Err(ServeError::Transport {
                path: task_paths.dra.clone(),
                source,
            }),
            Err(join) => Err(ServeError::Task(join.to_string())),
        }
    });
    tracing::info!(
        registration = %paths.registration.display(),
        dra = %paths.dra.display(),
        "plugin sockets listening"
    );
    Ok(RunningPlugin {
        paths,
        shutdown,
        registration: registration_watch,
        task,
    })
}

/// The connections accepted on `listener`, each behind the `:authority` normalisation the
/// kubelet's registration dial needs (see [`super::authority`]); `socket` names them in logs.
fn kubelet_connections(
    listener: UnixListener,
    socket: &'static str,
) -> impl tokio_stream::Stream<Item = io::Result<KubeletStream<UnixStream>>> {
    UnixListenerStream::new(listener).map(move |accepted| {
        accepted
            .inspect_err(|error| tracing::warn!(socket, %error, "accepting a connection failed"))
            .map(|stream| KubeletStream::new(stream, socket))
    })
}

/// Warns every `interval` while the kubelet has not registered this instance, naming the
/// directory we serve: the usual cause is a registry directory the kubelet does not watch.
async fn warn_while_unregistered(
    registration: RegistrationService,
    registry_dir: PathBuf,
    socket: PathBuf,
    interval: Duration,
    shutdown: CancellationToken,
) {
    let mut state = registration.watch();
    loop {
        tokio::select! {
            () = tokio::time::sleep(interval) => {}
            () = shutdown.cancelled() => return,
        }
        let current = state.borrow_and_update().clone();
        if current.is_registered() {
            // Quiet until the registration is lost again.
            tokio::select! {
                _ = state.wait_for(|s| !s.is_registered()) => continue,
                () = shutdown.cancelled() => return,
            }
        }
        tracing::warn!(
            registry_dir = %registry_dir.display(),
            socket = %socket.display(),
            state = ?current,
            get_info_calls = registration.info_served(),
            "the kubelet has not registered this plugin; is --kubelet-registry-dir the \
             directory the kubelet watches (<kubelet root>/plugins_registry)?"
        );
    }
}

fn absolute(path: &Path) -> Result<PathBuf, ServeError> {
    std::path::absolute(path).map_err(|source| ServeError::Absolute {
        path: path.to_path_buf(),
        source,
    })
}

/// The inode of the socket we bound, to tell our socket from one that replaced it.
fn socket_inode(path: &Path) -> Option<u64> {
    std::fs::symlink_metadata(path).ok().map(|m| m.ino())
}

/// Serves registration until shutdown. Every `check_interval` it checks that our socket file
/// is still there; when the kubelet restarts it wipes the registry directory, and only a new
/// socket makes it register us again.
async fn serve_registration(
    service: RegistrationService,
    path: PathBuf,
    first_listener: tokio::net::UnixListener,
    check_interval: Duration,
    shutdown: CancellationToken,
) {
    let mut listener = Some(first_listener);
    while !shutdown.is_cancelled() {
        let bound = match listener.take() {
            Some(bound) => bound,
            None => match sockets::bind_socket(&path) {
                Ok(bound) => {
                    tracing::warn!(socket = %path.display(), "registration socket recreated");
                    bound
                }
                Err(e) => {
                    tracing::error!(error = %e, "cannot recreate the registration socket");
                    tokio::select! {
                        () = tokio::time::sleep(check_interval) => continue,
                        () = shutdown.cancelled() => break,
                    }
                }
            },
        };
        let inode = socket_inode(&path);
        let instance = shutdown.child_token();
        let server = Server::builder()
            .add_service(RegistrationServer::new(service.clone()))
            .serve_with_incoming_shutdown(
                kubelet_connections(bound, "registration"),
                instance.clone().cancelled_owned(),
            );
        tokio::pin!(server);
        let socket_gone = async {
            loop {
                tokio::time::sleep(check_interval).await;
                if !sockets::socket_exists(&path) || socket_inode(&path) != inode {
                    return;
                }
            }
        };
        tokio::select! {
            served = &mut server => {
                if let Err(e) = served {
                    tracing::error!(socket = %path.display(), error = %e, "registration server failed");
                }
                // Rebinding right away would spin if the failure repeats.
                tokio::select! {
                    () = tokio::time::sleep(check_interval) => {}
                    () = shutdown.cancelled() => {}
                }
            }
            () = socket_gone => {
                tracing::warn!(
                    socket = %path.display(),
                    "registration socket disappeared (kubelet restart?); recreating it"
                );
                service.mark_lost();
                instance.cancel();
                let _ = tokio::time::timeout(REGISTRATION_DRAIN_TIMEOUT, &mut server).await;
            }
            () = shutdown.cancelled() => {
                let _ = tokio::time::timeout(REGISTRATION_DRAIN_TIMEOUT, &mut server).await;
            }
        }
    }
}

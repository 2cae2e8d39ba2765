//! The small HTTP endpoint that the node plugin and the controller both serve beside their
//! main work: `/metrics` in the Prometheus text format and plain-text health checks, on TCP
//! addresses and Unix sockets. Each caller supplies a responder for GET paths; this module
//! owns binding (SO_REUSEPORT, socket files), serving with axum until shutdown, and the
//! one-request hyper client `tandem probe` uses.

use axum::response::IntoResponse;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper::{Method, Request, StatusCode, Uri};
use hyper_util::rt::TokioIo;
use std::collections::BTreeSet;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, TcpSocket, UnixListener, UnixStream};
use tokio_util::sync::CancellationToken;

use tandem_kubelet_plugin::sockets::{self, SocketError};

/// Content type of a Prometheus/OpenMetrics text exposition.
pub const OPENMETRICS_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Prefix of a Unix socket entry in an address list (`unix:/run/tandem-probe/http.sock`).
pub const UNIX_PREFIX: &str = "unix:";

/// What a GET of one path answers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    pub status: StatusCode,
    pub content_type: &'static str,
    pub body: String,
}

impl Reply {
    pub fn text(status: StatusCode, body: impl Into<String>) -> Self {
        Self {
            status,
            content_type: "text/plain; charset=utf-8",
            body: body.into(),
        }
    }

    pub fn metrics(body: String) -> Self {
        Self {
            status: StatusCode::OK,
            content_type: OPENMETRICS_CONTENT_TYPE,
            body,
        }
    }

    pub fn not_found() -> Self {
        Self::text(StatusCode::NOT_FOUND, "not found\n")
    }
}

/// Answers a GET of a path, or `None` for a path it does not serve (404).
pub trait Responder: Send + Sync + 'static {
    fn get(&self, path: &str) -> Option<Reply>;
}

/// One place the endpoint listens: `IP:PORT` or `unix:/absolute/path`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum ListenAddr {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AddrError {
    #[error("{entry:?} is neither IP:PORT nor unix:/absolute/path")]
    Invalid { entry: String },
    #[error("{entry:?}: the Unix socket path must be absolute")]
    RelativeUnixPath { entry: String },
    #[error("{entry:?} is listed twice")]
    Duplicate { entry: String },
}

impl FromStr for ListenAddr {
    type Err = AddrError;

    fn from_str(entry: &str) -> Result<Self, AddrError> {
        let entry = entry.trim();
        if let Some(path) = entry.strip_prefix(UNIX_PREFIX) {
            let path = PathBuf::from(path);
            if !path.is_absolute() {
                return Err(AddrError::RelativeUnixPath {
                    entry: entry.to_string(),
                });
            }
            return Ok(Self::Unix(path));
        }
        entry
            .parse()
            .map(Self::Tcp)
            .map_err(|_| AddrError::Invalid {
                entry: entry.to_string(),
            })
    }
}

impl fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Tcp(addr) => write!(f, "{addr}"),
            Self::Unix(path) => write!(f, "{UNIX_PREFIX}{}", path.display()),
        }
    }
}

/// Parses a comma-separated list of `IP:PORT` and `unix:/path` entries; an empty or blank
/// text is an empty list (the endpoint is off).
pub fn parse_listen_addrs(text: &str) -> Result<Vec<ListenAddr>, AddrError> {
    let mut seen = BTreeSet::new();
    let mut addrs = Vec::new();
    for entry in text.split(',').map(str::trim) {
        if entry.is_empty() {
            if text.trim().is_empty() {
                continue;
            }
            return Err(AddrError::Invalid {
                entry: entry.to_string(),
            });
        }
        let addr: ListenAddr = entry.parse()?;
        if !seen.insert(addr.clone()) {
            return Err(AddrError::Duplicate {
                entry: entry.to_string(),
            });
        }
        addrs.push(addr);
    }
    Ok(addrs)
}

#[derive(Debug, thiserror::Error)]
#[error("binding the metrics endpoint {addr}: {source}")]
pub struct BindError {
    pub addr: SocketAddr,
    #[source]
    pub source: std::io::Error,
}

/// Binding one entry of an address list failed; the message names it.
#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    #[error(transparent)]
    Tcp(#[from] BindError),
    #[error("binding the metrics endpoint: {0}")]
    Unix(#[from] SocketError),
}

/// Binds a TCP address with SO_REUSEPORT: during a rolling update with surge the old and the
/// new node plugin pod share the host network, and both must hold the port until the old one
/// stops. Linux lets only sockets of the same effective uid join the group, so another user
/// cannot take over the port this way.
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, BindError> {
    let fail = |source| BindError { addr, source };
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }
    .map_err(fail)?;
    socket.set_reuseaddr(true).map_err(fail)?;
    socket.set_reuseport(true).map_err(fail)?;
    socket.bind(addr).map_err(fail)?;
    socket.listen(1024).map_err(fail)
}

/// A bound endpoint, ready for [`serve`].
#[derive(Debug)]
pub enum Listener {
    Tcp(TcpListener),
    /// The socket file is removed when serving stops.
    Unix {
        listener: UnixListener,
        path: PathBuf,
    },
}

impl From<TcpListener> for Listener {
    fn from(listener: TcpListener) -> Self {
        Self::Tcp(listener)
    }
}

impl Listener {
    /// What it listens on, in the address-list spelling.
    pub fn local_addr(&self) -> std::io::Result<ListenAddr> {
        match self {
            Self::Tcp(listener) => listener.local_addr().map(ListenAddr::Tcp),
            Self::Unix { path, .. } => Ok(ListenAddr::Unix(path.clone())),
        }
    }
}

/// Binds one address. A Unix socket gets its parent directory created, a stale file from an
/// earlier run of the container replaced, and mode 0600 (the kubelet runs exec probes as the
/// container's own user).
pub async fn bind_addr(addr: &ListenAddr) -> Result<Listener, ListenError> {
    match addr {
        ListenAddr::Tcp(tcp) => Ok(Listener::Tcp(bind(*tcp).await?)),
        ListenAddr::Unix(path) => Ok(Listener::Unix {
            listener: sockets::bind_socket(path)?,
            path: path.clone(),
        }),
    }
}

/// Binds every address, or none: the first failure is returned and the ones bound before it
/// are closed.
pub async fn bind_all(addrs: &[ListenAddr]) -> Result<Vec<Listener>, ListenError> {
    let mut listeners = Vec::with_capacity(addrs.len());
    for addr in addrs {
        match bind_addr(addr).await {
            Ok(listener) => listeners.push(listener),
            Err(e) => {
                drop_listeners(listeners);
                return Err(e);
            }
        }
    }
    Ok(listeners)
}

fn drop_listeners(listeners: Vec<Listener>) {
    for listener in listeners {
        if let Listener::Unix { path, .. } = &listener {
            sockets::remove_socket(path);
        }
    }
}

/// What `responder` answers for `method` and `path`: only GETs are served.
fn answer<R: Responder>(responder: &R, method: &Method, path: &str) -> axum::response::Response {
    let reply = if method == Method::GET {
        responder.get(path).unwrap_or_else(Reply::not_found)
    } else {
        Reply::text(StatusCode::METHOD_NOT_ALLOWED, "only GET is served\n")
    };
    let content_type = [(hyper::header::CONTENT_TYPE, reply.content_type)];
    (reply.status, content_type, reply.body).into_response()
}

/// Serves `responder` on `listener` until `shutdown` fires; a Unix socket's file is removed
/// then.
pub async fn serve<R: Responder>(
    listener: impl Into<Listener>,
    responder: Arc<R>,
    shutdown: CancellationToken,
) {
    let app = axum::Router::new().fallback(move |method: Method, uri: Uri| {
        let responder = responder.clone();
        async move { answer(responder.as_ref(), &method, uri.path()) }
    });
    let stopped = shutdown.cancelled_owned();
    let served = match listener.into() {
        Listener::Tcp(listener) => {
            axum::serve(listener, app)
                .with_graceful_shutdown(stopped)
                .await
        }
        Listener::Unix { listener, path } => {
            let served = axum::serve(listener, app)
                .with_graceful_shutdown(stopped)
                .await;
            sockets::remove_socket(&path);
            served
        }
    };
    if let Err(error) = served {
        tracing::warn!(%error, "metrics endpoint stopped with an error");
    }
}

/// The most of a response the probe client reads; health answers are a line of text.
const MAX_RESPONSE_BYTES: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("{path:?} is not an absolute URL path without spaces")]
    BadPath { path: String },
    #[error("connecting to {socket}: {source}")]
    Connect {
        socket: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("GET {path} on {socket}: {source}")]
    Http {
        socket: PathBuf,
        path: String,
        #[source]
        source: hyper::Error,
    },
    #[error("GET {path} on {socket}: no answer within {timeout:?}")]
    Timeout {
        socket: PathBuf,
        path: String,
        timeout: Duration,
    },
    #[error("GET {path} on {socket}: malformed response: {reason}")]
    Malformed {
        socket: PathBuf,
        path: String,
        reason: String,
    },
}

/// A status and body as the endpoint answered them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProbeAnswer {
    pub status: u16,
    pub body: String,
}

/// One GET of `path` over the Unix socket `socket`, the whole exchange bounded by `timeout`
/// and the body by [`MAX_RESPONSE_BYTES`].
pub async fn get_unix(
    socket: &Path,
    path: &str,
    timeout: Duration,
) -> Result<ProbeAnswer, ProbeError> {
    let bad_path = || ProbeError::BadPath {
        path: path.to_string(),
    };
    if !path.starts_with('/') {
        return Err(bad_path());
    }
    let uri: Uri = path.parse().map_err(|_| bad_path())?;
    let http = |source| ProbeError::Http {
        socket: socket.to_path_buf(),
        path: path.to_string(),
        source,
    };
    let exchange = async {
        let stream = UnixStream::connect(socket)
            .await
            .map_err(|source| ProbeError::Connect {
                socket: socket.to_path_buf(),
                source,
            })?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(http)?;
        tokio::spawn(connection);
        let request = Request::get(uri)
            .header(hyper::header::HOST, "localhost")
            .body(Empty::<Bytes>::new())
            .map_err(|_| bad_path())?;
        let response = sender.send_request(request).await.map_err(http)?;
        let status = response.status().as_u16();
        let body = Limited::new(response.into_body(), MAX_RESPONSE_BYTES)
            .collect()
            .await
            .map_err(|e| ProbeError::Malformed {
                socket: socket.to_path_buf(),
                path: path.to_string(),
                reason: e.to_string(),
            })?
            .to_bytes();
        Ok(ProbeAnswer {
            status,
            body: String::from_utf8_lossy(&body).into_owned(),
        })
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .unwrap_or_else(|_| {
            Err(ProbeError::Timeout {
                socket: socket.to_path_buf(),
                path: path.to_string(),
                timeout,
            })
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn address_lists_mix_tcp_and_unix_entries() {
        let addrs = parse_listen_addrs(" 0.0.0.0:9477 , unix:/run/tandem-probe/http.sock,[::1]:80")
            .unwrap();
        assert_eq!(
            addrs,
            vec![
                ListenAddr::Tcp("0.0.0.0:9477".parse().unwrap()),
                ListenAddr::Unix("/run/tandem-probe/http.sock".into()),
                ListenAddr::Tcp("[::1]:80".parse().unwrap()),
            ]
        );
        assert_eq!(addrs[1].to_string(), "unix:/run/tandem-probe/http.sock");
        assert_eq!(parse_listen_addrs("").unwrap(), vec![]);
        assert_eq!(parse_listen_addrs("  ").unwrap(), vec![]);
    }

    #[test]
    fn bad_address_lists_say_which_entry_is_wrong() {
        for (text, want) in [
            (
                "localhost:9477",
                AddrError::Invalid {
                    entry: "localhost:9477".into(),
                },
            ),
            (
                "0.0.0.0:9477,",
                AddrError::Invalid {
                    entry: String::new(),
                },
            ),
            (
                "unix:http.sock",
                AddrError::RelativeUnixPath {
                    entry: "unix:http.sock".into(),
                },
            ),
            (
                "unix:/a.sock,unix:/a.sock",
                AddrError::Duplicate {
                    entry: "unix:/a.sock".into(),
                },
            ),
            (
                "9477",
                AddrError::Invalid {
                    entry: "9477".into(),
                },
            ),
        ] {
            assert_eq!(parse_listen_addrs(text), Err(want), "{text:?}");
        }
    }

    #[tokio::test]
    async fn a_probe_of_something_that_is_not_http_is_an_error() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("ssh.sock");
        let listener = UnixListener::bind(&socket).unwrap();
        tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.unwrap();
            let mut request = [0u8; 512];
            let _ = stream.read(&mut request).await;
            let _ = stream.write_all(b"SSH-2.0-OpenSSH\r\n\r\n").await;
        });
        let answer = get_unix(&socket, "/readyz", Duration::from_secs(5)).await;
        assert!(matches!(answer, Err(ProbeError::Http { .. })), "{answer:?}");
        let bad = get_unix(&socket, "readyz", Duration::from_secs(5)).await;
        assert!(matches!(bad, Err(ProbeError::BadPath { .. })), "{bad:?}");
    }
}

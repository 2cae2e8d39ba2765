//! An in-process Kubernetes apiserver on loopback HTTP, faithful enough to test against:
//! resourceVersions, conflicts, status subresources, selectors, watches and the real validation
//! of resource.k8s.io/v1 objects. Used by every test that talks to Kubernetes and by `tandem demo`.
//! [`FakeApiServer::start_tls`] serves HTTPS instead, offering HTTP/2 and HTTP/1.1 by ALPN as
//! a real apiserver does, for the tests of how clients use their connections.

mod kinds;
mod managed;
mod request;
mod selectors;
mod status;
mod store;
#[cfg(test)]
mod tests;
mod validation;
mod watches;

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use kinds::KINDS;
use request::{Query, parse_target};
use selectors::{FieldSelector, LabelSelector};
use serde_json::{Value, json};
use status::ApiError;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use store::{ObjectRef, PatchType, Store, WriteContext};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_util::sync::CancellationToken;
use watches::{WatchRequest, watch_response};

const MAX_BODY_BYTES: usize = 3 * 1024 * 1024;
/// Requests remembered for `requests()`; a long `tandem demo` must not grow without bound.
const MAX_REQUEST_LOG: usize = 100_000;
/// The real apiserver picks a random watch timeout around `--min-request-timeout` (1800 s).
const DEFAULT_WATCH_TIMEOUT: Duration = Duration::from_secs(1800);
/// The test CA that signed [`SERVER_CERT_PEM`] (`tls/README.md`), for clients to trust.
pub const TEST_CA_PEM: &str = include_str!("tls/ca.pem");
/// The HTTPS server's certificate (127.0.0.1, localhost) and its key, public test material.
const SERVER_CERT_PEM: &str = include_str!("tls/server.pem");
const SERVER_KEY_PEM: &str = include_str!("tls/server.key");

type ResponseBody = BoxBody<Bytes, Infallible>;

/// What an injected failure answers instead of serving the request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InjectedFailure {
    /// 500 InternalError.
    InternalError,
    /// 409 Conflict, as if someone else had written the object first.
    Conflict,
}

struct FailureRule {
    method: Option<Method>,
    path_contains: String,
    remaining: u32,
    failure: InjectedFailure,
}

struct Shared {
    store: Mutex<Store>,
    /// The latest resourceVersion; watches wake on every change.
    changes: watch::Sender<u64>,
    writes: AtomicU64,
    failures: Mutex<Vec<FailureRule>>,
    requests: Mutex<Vec<String>>,
    /// Connections accepted, and requests that came over HTTP/2.
    connections: AtomicU64,
    http2_requests: AtomicU64,
    shutdown: CancellationToken,
}

impl Shared {
    /// The store lock; a panic elsewhere while holding it leaves data that is still consistent
    /// per write, so a poisoned lock is taken over rather than propagated.
    fn store(&self) -> MutexGuard<'_, Store> {
        self.store.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The fake apiserver: a hyper HTTP/1 server on `127.0.0.1:<ephemeral>` in its own task (or
/// HTTPS with HTTP/2, [`FakeApiServer::start_tls`]).
pub struct FakeApiServer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    server: JoinHandle<()>,
    tls: bool,
}

impl FakeApiServer {
    /// Plain HTTP/1.1.
    pub async fn start() -> std::io::Result<FakeApiServer> {
        Self::start_with(None).await
    }

    /// HTTPS with the test certificate (trust [`TEST_CA_PEM`]), offering `h2` and
    /// `http/1.1` by ALPN, as a real apiserver does.
    pub async fn start_tls() -> std::io::Result<FakeApiServer> {
        Self::start_with(Some(tls_acceptor()?)).await
    }

    async fn start_with(tls: Option<TlsAcceptor>) -> std::io::Result<FakeApiServer> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (changes, _) = watch::channel(0);
        let shared = Arc::new(Shared {
            store: Mutex::new(Store::default()),
            changes,
            writes: AtomicU64::new(0),
            failures: Mutex::new(Vec::new()),
            requests: Mutex::new(Vec::new()),
            connections: AtomicU64::new(0),
            http2_requests: AtomicU64::new(0),
            shutdown: CancellationToken::new(),
        });
        let tls_on = tls.is_some();
        let server = tokio::spawn(serve(listener, shared.clone(), tls));
        tracing::debug!(%addr, tls = tls_on, "fake apiserver listening");
        Ok(FakeApiServer {
            addr,
            shared,
            server,
            tls: tls_on,
        })
    }

    /// `http://127.0.0.1:PORT`, or `https://` for [`FakeApiServer::start_tls`].
    pub fn url(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://{}", self.addr)
    }

    /// Connections accepted so far.
    pub fn connection_count(&self) -> u64 {
        self.shared.connections.load(Ordering::SeqCst)
    }

    /// Requests so far that came over HTTP/2.
    pub fn http2_request_count(&self) -> u64 {
        self.shared.http2_requests.load(Ordering::SeqCst)
    }

    /// Writes a kubeconfig pointing at this server, for a child process (`tandem plugin
    /// --kubeconfig`, `tandem controller --kubeconfig`) to talk to it as it would to a cluster.
    /// Over HTTPS the test CA goes beside it (see [`write_kubeconfig_for`]).
    pub fn write_kubeconfig(&self, path: &std::path::Path) -> std::io::Result<()> {
        write_kubeconfig_for(path, &self.url(), self.tls)
    }

    /// Where this server listens: `127.0.0.1:PORT`.
    pub fn address(&self) -> SocketAddr {
        self.addr
    }

    /// A kube client for this server (namespace `default`, no auth). Needs a tokio runtime.
    pub fn client(&self) -> kube::Client {
        let uri: hyper::Uri = match self.url().parse() {
            Ok(uri) => uri,
            // A SocketAddr always prints as a valid authority.
            Err(e) => unreachable!("loopback url does not parse: {e}"),
        };
        let mut config = kube::Config::new(uri);
        if self.tls {
            config.root_cert = Some(vec![test_ca_der()]);
        }
        // kube's own stack: the tests' client is not the one under test.
        match kube::Client::try_from(config) {
            Ok(client) => client,
            // Only TLS or auth settings can fail: none, or the test CA, which parses.
            Err(e) => unreachable!("the fake's kube config rejected: {e}"),
        }
    }

    /// Successful create/update/patch/delete requests so far (dry runs excluded). A no-op
    /// update counts: it is still a write request the caller need not have sent.
    pub fn write_count(&self) -> u64 {
        self.shared.writes.load(Ordering::SeqCst)
    }

    /// The current global resourceVersion.
    pub fn resource_version(&self) -> u64 {
        self.shared.store().resource_version()
    }

    /// Forgets the write history (etcd compaction): watches from an older resourceVersion
    /// get 410 Expired and must list again, as kube's watcher does.
    pub fn compact(&self) {
        self.shared.store().compact();
    }

    /// Recent requests (up to the last 100,000) as `METHOD /path?query`, oldest first.
    pub fn requests(&self) -> Vec<String> {
        self.shared
            .requests
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Answers the next `count` requests whose method matches (`None`: any) and whose path
    /// contains `path_contains` with `failure` instead of serving them.
    pub fn inject_failures(
        &self,
        method: Option<&str>,
        path_contains: &str,
        count: u32,
        failure: InjectedFailure,
    ) {
        let method = method.and_then(|m| Method::from_bytes(m.as_bytes()).ok());
        self.shared
            .failures
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(FailureRule {
                method,
                path_contains: path_contains.to_string(),
                remaining: count,
                failure,
            });
    }

    /// Stops accepting, ends every watch and connection, and waits for the server task.
    pub async fn shutdown(mut self) {
        self.shared.shutdown.cancel();
        if let Err(e) = (&mut self.server).await {
            tracing::warn!(error = %e, "fake apiserver task ended abnormally");
        }
    }
}

impl Drop for FakeApiServer {
    fn drop(&mut self) {
        self.shared.shutdown.cancel();
    }
}

async fn serve(listener: TcpListener, shared: Arc<Shared>, tls: Option<TlsAcceptor>) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            _ = shared.shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    shared.connections.fetch_add(1, Ordering::SeqCst);
                    // Go's net package, and so the real apiserver, sets TCP_NODELAY on every
                    // connection; without it, answers to streams multiplexed on one HTTP/2
                    // connection wait for the client's delayed ACK.
                    if let Err(e) = stream.set_nodelay(true) {
                        tracing::debug!(error = %e, "fake apiserver: TCP_NODELAY not set");
                    }
                    let shared = shared.clone();
                    let tls = tls.clone();
                    connections.spawn(async move {
                        let service = hyper::service::service_fn(move |req| handle(shared.clone(), req));
                        let served = match tls {
                            None => hyper::server::conn::http1::Builder::new()
                                .serve_connection(TokioIo::new(stream), service)
                                .await
                                .map_err(|e| e.to_string()),
                            Some(tls) => match tls.accept(stream).await {
                                // HTTP/1.1 or HTTP/2, whichever the client speaks (ALPN).
                                Ok(stream) => hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                                    .serve_connection(TokioIo::new(stream), service)
                                    .await
                                    .map_err(|e| e.to_string()),
                                Err(e) => Err(format!("TLS handshake: {e}")),
                            },
                        };
                        if let Err(e) = served {
                            tracing::debug!(error = %e, "fake apiserver connection ended with an error");
                        }
                    });
                }
                Err(e) => {
                    tracing::warn!(error = %e, "fake apiserver accept failed");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
    connections.shutdown().await;
}

fn json_response(code: u16, value: &Value) -> Response<ResponseBody> {
    let body = Full::new(Bytes::from(value.to_string())).boxed();
    let mut response = Response::new(body);
    *response.status_mut() =
        StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    response
}

fn take_injected_failure(shared: &Shared, method: &Method, path: &str) -> Option<ApiError> {
    let mut rules = shared.failures.lock().unwrap_or_else(|p| p.into_inner());
    let rule = rules.iter_mut().find(|r| {
        r.remaining > 0
            && r.method.as_ref().is_none_or(|m| m == method)
            && path.contains(&r.path_contains)
    })?;
    rule.remaining -= 1;
    let failure = rule.failure;
    rules.retain(|r| r.remaining > 0);
    Some(match failure {
        InjectedFailure::InternalError => ApiError::internal("injected failure"),
        InjectedFailure::Conflict => ApiError {
            code: 409,
            reason: "Conflict",
            message: format!(
                "Operation cannot be fulfilled on {path}: the object has been modified; please apply your changes to the latest version and try again"
            ),
            details: None,
        },
    })
}

async fn handle(
    shared: Arc<Shared>,
    request: Request<Incoming>,
) -> Result<Response<ResponseBody>, Infallible> {
    if request.version() == hyper::Version::HTTP_2 {
        shared.http2_requests.fetch_add(1, Ordering::SeqCst);
    }
    let method = request.method().clone();
    let path = request.uri().path().to_string();
    let raw_query = request.uri().query().unwrap_or("").to_string();
    {
        let mut requests = shared.requests.lock().unwrap_or_else(|p| p.into_inner());
        if requests.len() >= MAX_REQUEST_LOG {
            requests.drain(..MAX_REQUEST_LOG / 2);
        }
        requests.push(format!("{method} {path}?{raw_query}"));
    }
    let header = |name: hyper::header::HeaderName| {
        request
            .headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string()
    };
    let content_type = header(hyper::header::CONTENT_TYPE);
    let user_agent = header(hyper::header::USER_AGENT);
    let body = match Limited::new(request.into_body(), MAX_BODY_BYTES)
        .collect()
        .await
    {
        Ok(collected) => collected.to_bytes(),
        Err(_) => return Ok(json_response(413, &ApiError::too_large().to_status())),
    };
    if let Some(error) = take_injected_failure(&shared, &method, &path) {
        return Ok(json_response(error.code, &error.to_status()));
    }
    let query = Query::parse(&raw_query);
    let response = match route(
        &shared,
        &method,
        &path,
        &query,
        &content_type,
        &user_agent,
        &body,
    ) {
        Ok(Reply::Json(code, value)) => json_response(code, &value),
        Ok(Reply::Watch(watch)) => watch_response(&shared, watch),
        Err(error) => json_response(error.code, &error.to_status()),
    };
    Ok(response)
}

enum Reply {
    Json(u16, Value),
    Watch(WatchRequest),
}

fn parse_body(body: &Bytes) -> Result<Value, ApiError> {
    if body.is_empty() {
        return Ok(Value::Null);
    }
    serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("the request body is not valid JSON: {e}")))
}

fn route(
    shared: &Shared,
    method: &Method,
    path: &str,
    query: &Query,
    content_type: &str,
    user_agent: &str,
    body: &Bytes,
) -> Result<Reply, ApiError> {
    if path == "/version" && method == Method::GET {
        return Ok(Reply::Json(
            200,
            json!({"major": "1", "minor": "34", "gitVersion": "v1.34.0-tandem-fake", "platform": "linux/amd64"}),
        ));
    }
    let target = parse_target(path)?;
    let info = &KINDS[target.kind];
    let labels = LabelSelector::parse(query.get("labelSelector").unwrap_or(""))
        .map_err(ApiError::bad_request)?;
    let fields = FieldSelector::parse(query.get("fieldSelector").unwrap_or(""), info)
        .map_err(ApiError::bad_request)?;
    let manager = query
        .get("fieldManager")
        .map(str::to_string)
        .unwrap_or_else(|| user_agent.split('/').next().unwrap_or("").to_string());
    let ctx = WriteContext {
        dry_run: query.get("dryRun") == Some("All"),
        manager,
        operation: "Update",
        force: query.get("force") == Some("true"),
    };
    let namespace = target.namespace.clone().unwrap_or_default();
    let name = target.name.clone();

    let reply = match (method.clone(), name) {
        (Method::GET, None) if query.flag("watch") => {
            let rv = query.get("resourceVersion").unwrap_or("");
            let send_initial = query.flag("sendInitialEvents");
            let from = match rv {
                "" | "0" => 0,
                other => other.parse().map_err(|_| {
                    ApiError::bad_request(format!("invalid resource version {other:?}"))
                })?,
            };
            let timeout =
                match query.get("timeoutSeconds") {
                    Some(t) => Duration::from_secs(t.parse().map_err(|_| {
                        ApiError::bad_request(format!("invalid timeoutSeconds {t:?}"))
                    })?),
                    None => DEFAULT_WATCH_TIMEOUT,
                };
            return Ok(Reply::Watch(WatchRequest {
                kind: target.kind,
                namespace: target.namespace,
                labels,
                fields,
                initial_events: send_initial || from == 0,
                initial_events_end_bookmark: send_initial && query.flag("allowWatchBookmarks"),
                from,
                timeout,
            }));
        }
        (Method::GET, None) => {
            let limit = match query.get("limit") {
                Some(l) => Some(
                    l.parse::<usize>()
                        .map_err(|_| ApiError::bad_request(format!("invalid limit {l:?}")))?,
                ),
                None => None,
            };
            let list = shared.store().list(
                target.kind,
                target.namespace.as_deref(),
                &labels,
                &fields,
                limit,
                query.get("continue").filter(|c| !c.is_empty()),
            )?;
            return Ok(Reply::Json(200, list));
        }
        (Method::GET, Some(name)) => {
            return Ok(Reply::Json(
                200,
                shared.store().get(target.kind, &namespace, &name)?,
            ));
        }
        (Method::POST, None) => {
            if info.namespaced && target.namespace.is_none() {
                return Err(ApiError::method_not_allowed("POST"));
            }
            let body = parse_body(body)?;
            Reply::Json(
                201,
                shared.store().create(target.kind, &namespace, body, &ctx)?,
            )
        }
        (Method::PUT, Some(name)) => {
            let body = parse_body(body)?;
            Reply::Json(
                200,
                shared.store().replace(
                    ObjectRef {
                        kind: target.kind,
                        namespace: &namespace,
                        name: &name,
                    },
                    body,
                    target.status,
                    &ctx,
                )?,
            )
        }
        (Method::PATCH, Some(name)) => {
            let media = content_type.split(';').next().unwrap_or("").trim();
            let patch_type = match media {
                "application/merge-patch+json" => PatchType::Merge,
                "application/strategic-merge-patch+json" => PatchType::StrategicMerge,
                "application/apply-patch+yaml" | "application/apply-patch+cbor" => {
                    if query.get("fieldManager").is_none_or(str::is_empty) {
                        return Err(ApiError::bad_request(
                            "PATCH /apply requires fieldManager (the fieldManager query parameter is required for apply requests)",
                        ));
                    }
                    PatchType::Apply
                }
                other => return Err(ApiError::unsupported_media_type(other)),
            };
            let patch = parse_body(body)?;
            let (object, created) = shared.store().patch(
                ObjectRef {
                    kind: target.kind,
                    namespace: &namespace,
                    name: &name,
                },
                patch_type,
                patch,
                target.status,
                &ctx,
            )?;
            Reply::Json(if created { 201 } else { 200 }, object)
        }
        (Method::DELETE, Some(name)) => {
            let options = parse_body(body)?;
            Reply::Json(
                200,
                shared
                    .store()
                    .delete(target.kind, &namespace, &name, &options, &ctx)?,
            )
        }
        (Method::DELETE, None) => Reply::Json(
            200,
            shared.store().delete_collection(
                target.kind,
                target.namespace.as_deref(),
                &labels,
                &fields,
                &ctx,
            )?,
        ),
        (other, _) => return Err(ApiError::method_not_allowed(other.as_str())),
    };
    if !ctx.dry_run {
        shared.writes.fetch_add(1, Ordering::SeqCst);
        let rv = shared.store().resource_version();
        shared.changes.send_replace(rv);
    }
    Ok(reply)
}

/// Writes a kubeconfig for `server` (no user credentials). With `trust_test_ca`, the test CA
/// goes beside it, as `<file name>.ca.pem`, and the kubeconfig trusts it: for this fake over
/// HTTPS, or anything serving its test certificate (a proxy in front of it, a stand-in).
pub fn write_kubeconfig_for(
    path: &std::path::Path,
    server: &str,
    trust_test_ca: bool,
) -> std::io::Result<()> {
    let mut cluster = serde_json::json!({ "server": server });
    if trust_test_ca {
        let mut name = path.file_name().unwrap_or_default().to_os_string();
        name.push(".ca.pem");
        let ca = path.with_file_name(name);
        std::fs::write(&ca, TEST_CA_PEM)?;
        cluster["certificate-authority"] = Value::String(ca.display().to_string());
    }
    let config = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{ "name": "fake", "cluster": cluster }],
        "users": [{ "name": "fake", "user": {} }],
        "contexts": [{ "name": "fake", "context": { "cluster": "fake", "user": "fake" } }],
        "current-context": "fake",
    });
    std::fs::write(path, config.to_string())
}

/// The test CA's certificate, DER, as `kube::Config::root_cert` takes it.
pub fn test_ca_der() -> Vec<u8> {
    match CertificateDer::from_pem_slice(TEST_CA_PEM.as_bytes()) {
        Ok(der) => der.to_vec(),
        Err(e) => unreachable!("the built-in test CA does not parse: {e}"),
    }
}

/// The HTTPS server side: the test certificate, `h2` then `http/1.1` by ALPN.
fn tls_acceptor() -> std::io::Result<TlsAcceptor> {
    let invalid = |e: String| std::io::Error::new(std::io::ErrorKind::InvalidData, e);
    let certs = CertificateDer::pem_slice_iter(SERVER_CERT_PEM.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| invalid(format!("test server certificate: {e}")))?;
    let key = PrivateKeyDer::from_pem_slice(SERVER_KEY_PEM.as_bytes())
        .map_err(|e| invalid(format!("test server key: {e}")))?;
    let mut config = tokio_rustls::rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| invalid(format!("test server TLS config: {e}")))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

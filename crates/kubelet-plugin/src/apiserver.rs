//! The apiserver client: kube's request stack (base URI, authentication, extra headers,
//! retries of 429/503/504) over a connection that speaks HTTP/2 when the apiserver does.
//!
//! kube-rs builds its client for HTTP/1.1 only, so every request in flight holds a
//! connection of its own: a burst of prepares, each fetching its claim, opens one TLS
//! connection per call, and once the pool's idle connections time out (90 s) the next burst
//! pays the handshakes again. client-go, and so the kubelet beside us, multiplex all their
//! requests over one HTTP/2 connection kept alive by PINGs. This client does the same: it
//! offers `h2` by ALPN, falls back to HTTP/1.1 where the server declines it (and over plain
//! `http://`, where there is no ALPN), and pings the connection as client-go does.

use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use kube::client::ConfigExt;
use kube::client::retry::RetryPolicy;
use std::time::Duration;
use tower::ServiceBuilder;
use tower::retry::RetryLayer;

/// An HTTP/2 PING after this long without a frame from the apiserver (client-go's
/// `ReadIdleTimeout`).
pub const PING_INTERVAL: Duration = Duration::from_secs(30);
/// A PING unanswered this long closes the connection (client-go's `PingTimeout`); the next
/// request opens a new one.
pub const PING_TIMEOUT: Duration = Duration::from_secs(15);

/// A kube client for `config` whose requests share one HTTP/2 connection when the apiserver
/// offers it. A proxy in the kubeconfig goes through kube's own stack (HTTP/1.1).
pub fn client(config: kube::Config) -> Result<kube::Client, kube::Error> {
    if config.proxy_url.is_some() {
        return kube::Client::try_from(config);
    }
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    // As Go (the apiserver, client-go) does on every TCP connection. Requests multiplexed on
    // one connection go out as several small writes, which Nagle's algorithm would hold back
    // for the peer's delayed ACK: 40 ms per burst of prepares on Linux, measured.
    http.set_nodelay(true);
    let tls = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(config.rustls_client_config()?)
        .https_or_http();
    let tls = match &config.tls_server_name {
        Some(name) => {
            let name = rustls::pki_types::ServerName::try_from(name.clone()).map_err(|e| {
                kube::Error::RustlsTls(kube::client::RustlsTlsError::InvalidServerName(e))
            })?;
            tls.with_server_name_resolver(hyper_rustls::FixedServerNameResolver::new(name))
        }
        None => tls,
    };
    let https = tls.enable_http1().enable_http2().wrap_connector(http);
    let mut connector = hyper_timeout::TimeoutConnector::new(https);
    connector.set_connect_timeout(config.connect_timeout);
    connector.set_read_timeout(config.read_timeout);
    connector.set_write_timeout(config.write_timeout);
    connector.set_reset_reader_on_write(config.reset_reader_on_write);
    let http_client = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
        .timer(TokioTimer::new())
        .http2_keep_alive_interval(PING_INTERVAL)
        .http2_keep_alive_timeout(PING_TIMEOUT)
        .http2_keep_alive_while_idle(true)
        .build(connector);
    let service = ServiceBuilder::new()
        .layer(config.base_uri_layer())
        .option_layer(
            config
                .default_retry
                .then(|| RetryLayer::new(RetryPolicy::server_retry())),
        )
        .option_layer(config.auth_layer()?)
        .layer(config.extra_headers_layer()?)
        .map_err(tower::BoxError::from)
        .service(http_client);
    Ok(kube::Client::new(service, config.default_namespace))
}

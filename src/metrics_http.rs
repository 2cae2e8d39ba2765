//! The small HTTP endpoint that the node plugin and the controller both serve beside their
//! main work: `/metrics` in the Prometheus text format and plain-text health checks. Each
//! caller supplies a responder for GET paths; this module owns the accept loop and shutdown.

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// Content type of a Prometheus/OpenMetrics text exposition.
pub const OPENMETRICS_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";

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

#[derive(Debug, thiserror::Error)]
#[error("binding the metrics endpoint {addr}: {source}")]
pub struct BindError {
    pub addr: SocketAddr,
    #[source]
    pub source: std::io::Error,
}

/// Binds the endpoint's address; the error names it.
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, BindError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| BindError { addr, source })
}

fn respond<R: Responder>(
    responder: &R,
    request: &Request<hyper::body::Incoming>,
) -> Response<Full<Bytes>> {
    let reply = if request.method() == Method::GET {
        responder
            .get(request.uri().path())
            .unwrap_or_else(Reply::not_found)
    } else {
        Reply::text(StatusCode::METHOD_NOT_ALLOWED, "only GET is served\n")
    };
    let mut response = Response::new(Full::new(Bytes::from(reply.body)));
    *response.status_mut() = reply.status;
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(reply.content_type),
    );
    response
}

/// Serves `responder` on `listener` until `shutdown` fires.
pub async fn serve<R: Responder>(
    listener: TcpListener,
    responder: Arc<R>,
    shutdown: CancellationToken,
) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let responder = responder.clone();
                    connections.spawn(async move {
                        let service = hyper::service::service_fn(move |request| {
                            let response = respond(responder.as_ref(), &request);
                            async move { Ok::<_, Infallible>(response) }
                        });
                        if let Err(e) = hyper::server::conn::http1::Builder::new()
                            .serve_connection(TokioIo::new(stream), service)
                            .await
                        {
                            tracing::debug!(error = %e, "metrics connection ended with an error");
                        }
                    });
                }
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "metrics endpoint accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

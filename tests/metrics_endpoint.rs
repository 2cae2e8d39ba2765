//! The plugin's HTTP endpoint during a rolling update with surge: two instances on one node
//! (host network) share the metrics TCP port, and each pod's exec probe — the real `tandem
//! probe` binary — reaches its own instance over the Unix socket in its own emptyDir.

use std::path::Path;
use std::process::Output;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use hyper::StatusCode;
use tandem::metrics_http::{self, ListenAddr, Listener, Reply, Responder};
use tempfile::TempDir;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Stands in for one plugin pod's endpoint: `/metrics` names the instance, `/readyz` follows
/// a switch the test flips.
struct Instance {
    name: &'static str,
    ready: AtomicBool,
}

impl Responder for Instance {
    fn get(&self, path: &str) -> Option<Reply> {
        match path {
            "/metrics" => Some(Reply::metrics(format!("instance {}\n", self.name))),
            "/readyz" if self.ready.load(Ordering::SeqCst) => {
                Some(Reply::text(StatusCode::OK, "ok\n"))
            }
            "/readyz" => Some(Reply::text(
                StatusCode::SERVICE_UNAVAILABLE,
                "the first ResourceSlice publish has not succeeded yet\n",
            )),
            _ => None,
        }
    }
}

struct Running {
    instance: Arc<Instance>,
    stop: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
}

impl Running {
    async fn stop(self) {
        self.stop.cancel();
        for task in self.tasks {
            task.await.unwrap();
        }
    }
}

/// Binds `--metrics-addr` the way `tandem plugin` does and serves every listener.
async fn start(name: &'static str, metrics_addr: &str) -> Running {
    let addrs = metrics_http::parse_listen_addrs(metrics_addr).unwrap();
    let listeners = metrics_http::bind_all(&addrs)
        .await
        .unwrap_or_else(|e| panic!("instance {name}: {e}"));
    let instance = Arc::new(Instance {
        name,
        ready: AtomicBool::new(false),
    });
    let stop = CancellationToken::new();
    let tasks = listeners
        .into_iter()
        .map(|listener| {
            tokio::spawn(metrics_http::serve(
                listener,
                instance.clone(),
                stop.clone(),
            ))
        })
        .collect();
    Running {
        instance,
        stop,
        tasks,
    }
}

/// A free port on 127.0.0.1 (bound and released, as a plain listener would leave it).
fn free_port() -> u16 {
    let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    probe.local_addr().unwrap().port()
}

/// The body of GET /metrics over TCP, as a scraper sees it.
async fn scrape(port: u16) -> String {
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    stream
        .write_all(b"GET /metrics HTTP/1.0\r\nHost: node\r\n\r\n")
        .await
        .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    assert!(response.starts_with("HTTP/1.0 200"), "{response}");
    response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_string())
        .unwrap()
}

/// `tandem probe --socket SOCKET PATH`, the command the DaemonSet's exec probes run.
async fn probe(socket: &Path, path: &str) -> Output {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_tandem"))
        .args(["probe", "--socket"])
        .arg(socket)
        .arg(path)
        .output()
        .await
        .unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[tokio::test]
async fn old_and_new_instance_serve_metrics_on_the_same_port() {
    let port = free_port();
    let old = start("old", &format!("127.0.0.1:{port}")).await;
    // Without SO_REUSEPORT this bind fails with EADDRINUSE and the surge pod crash-loops.
    let new = start("new", &format!("127.0.0.1:{port}")).await;

    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..200 {
        seen.insert(scrape(port).await);
        if seen.len() == 2 {
            break;
        }
    }
    assert_eq!(
        seen.into_iter().collect::<Vec<_>>(),
        vec!["instance new\n".to_string(), "instance old\n".to_string()],
        "the kernel spreads connections over both listeners of the port"
    );

    // The old pod goes away: the port stays served, now by the new instance alone.
    old.stop().await;
    for _ in 0..20 {
        assert_eq!(scrape(port).await, "instance new\n");
    }
    new.stop().await;
}

#[tokio::test]
async fn each_probe_reaches_its_own_instance_over_its_unix_socket() {
    let old_dir = TempDir::new().unwrap();
    let new_dir = TempDir::new().unwrap();
    let old_socket = old_dir.path().join("http.sock");
    let new_socket = new_dir.path().join("http.sock");
    let port = free_port();
    let old = start(
        "old",
        &format!("127.0.0.1:{port},unix:{}", old_socket.display()),
    )
    .await;
    let new = start(
        "new",
        &format!("127.0.0.1:{port},unix:{}", new_socket.display()),
    )
    .await;
    old.instance.ready.store(true, Ordering::SeqCst);

    // The new instance has not published yet: its probe fails with /readyz's reason while
    // the old one's passes, although both listen on the same TCP port.
    let out = probe(&new_socket, "/readyz").await;
    assert!(!out.status.success(), "{out:?}");
    assert_eq!(
        text(&out.stdout),
        "the first ResourceSlice publish has not succeeded yet\n"
    );
    assert!(text(&out.stderr).contains("HTTP 503"), "{out:?}");
    let out = probe(&old_socket, "/readyz").await;
    assert!(out.status.success(), "{out:?}");
    assert_eq!(text(&out.stdout), "ok\n");

    new.instance.ready.store(true, Ordering::SeqCst);
    let out = probe(&new_socket, "/readyz").await;
    assert!(out.status.success(), "{out:?}");
    assert_eq!(text(&out.stdout), "ok\n");

    // A path the endpoint does not serve is a failure too, not a pass.
    let out = probe(&new_socket, "/nope").await;
    assert!(!out.status.success(), "{out:?}");
    assert!(text(&out.stderr).contains("HTTP 404"), "{out:?}");

    // Stopping removes the socket, and a probe of a stopped instance fails naming it.
    old.stop().await;
    assert!(!old_socket.exists());
    let out = probe(&old_socket, "/readyz").await;
    assert!(!out.status.success(), "{out:?}");
    assert!(
        text(&out.stderr).contains(&old_socket.display().to_string()),
        "{out:?}"
    );
    new.stop().await;
}

#[tokio::test]
async fn a_restarted_container_rebinds_over_its_stale_socket() {
    let dir = TempDir::new().unwrap();
    let socket = dir.path().join("probe").join("http.sock");
    // A container killed without cleanup leaves its socket file in the pod's emptyDir.
    let first = metrics_http::bind_addr(&ListenAddr::Unix(socket.clone()))
        .await
        .unwrap();
    let Listener::Unix { listener, .. } = first else {
        panic!("not a Unix listener");
    };
    drop(listener);
    assert!(socket.exists());

    let running = start("restarted", &format!("unix:{}", socket.display())).await;
    running.instance.ready.store(true, Ordering::SeqCst);
    let out = probe(&socket, "/readyz").await;
    assert!(out.status.success(), "{out:?}");
    running.stop().await;
}

#[tokio::test]
async fn a_probe_that_gets_no_answer_gives_up_within_its_timeout() {
    let dir = TempDir::new().unwrap();
    let socket = dir.path().join("http.sock");
    // Accepts and never answers, like a wedged process.
    let listener = tokio::net::UnixListener::bind(&socket).unwrap();
    let hold = tokio::spawn(async move {
        let (stream, _) = listener.accept().await.unwrap();
        tokio::time::sleep(Duration::from_secs(30)).await;
        drop(stream);
    });
    let started = std::time::Instant::now();
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_tandem"))
        .args(["probe", "--timeout", "300ms", "--socket"])
        .arg(&socket)
        .arg("/healthz")
        .output()
        .await
        .unwrap();
    assert!(!out.status.success(), "{out:?}");
    assert!(text(&out.stderr).contains("no answer within"), "{out:?}");
    assert!(started.elapsed() < Duration::from_secs(10));
    hold.abort();
}

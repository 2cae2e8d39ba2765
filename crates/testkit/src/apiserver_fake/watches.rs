//! Watches: the newline-delimited event stream a `?watch=true` request gets, replaying the
//! store's history from a resourceVersion and following new writes, filtered by selectors the
//! way the real watch cache filters them.

use super::kinds::KINDS;
use super::selectors::{FieldSelector, LabelSelector};
use super::status::ApiError;
use super::store::StoredEvent;
use super::{ResponseBody, Shared};
use bytes::Bytes;
use http_body_util::{BodyExt, StreamBody};
use hyper::Response;
use hyper::body::Frame;
use serde_json::{Value, json};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;

pub(super) struct WatchRequest {
    pub(super) kind: usize,
    pub(super) namespace: Option<String>,
    pub(super) labels: LabelSelector,
    pub(super) fields: FieldSelector,
    /// Send the matching objects as ADDED first (no resourceVersion, "0", or sendInitialEvents).
    pub(super) initial_events: bool,
    pub(super) initial_events_end_bookmark: bool,
    pub(super) from: u64,
    pub(super) timeout: Duration,
}

fn event_line(event_type: &str, object: &Value) -> Bytes {
    let mut line = json!({"type": event_type, "object": object}).to_string();
    line.push('\n');
    Bytes::from(line)
}

/// The event a selector-filtered watch sees for one write, if any: objects moving into the
/// selection arrive as ADDED and objects leaving it as DELETED, as the real watch cache does.
fn filtered_event(watch: &WatchRequest, event: &StoredEvent) -> Option<Bytes> {
    if event.kind != watch.kind
        || watch
            .namespace
            .as_ref()
            .is_some_and(|ns| *ns != event.namespace)
    {
        return None;
    }
    let selected = |o: &Value| watch.labels.matches(o) && watch.fields.matches(o);
    let now = selected(&event.object);
    let before = event.previous.as_ref().map(selected);
    let event_type = match (event.event_type, before, now) {
        ("MODIFIED", Some(true), true) => "MODIFIED",
        ("MODIFIED", Some(false), true) => "ADDED",
        ("MODIFIED", Some(true), false) => "DELETED",
        (t, None, true) => t,
        _ => return None,
    };
    Some(event_line(event_type, &event.object))
}

pub(super) fn watch_response(shared: &Arc<Shared>, watch: WatchRequest) -> Response<ResponseBody> {
    let (tx, mut rx) = mpsc::channel::<Bytes>(256);
    let shared = shared.clone();
    tokio::spawn(async move {
        let mut changes = shared.changes.subscribe();
        let info = &KINDS[watch.kind];
        let (initial, cursor) = {
            let store = shared.store();
            let initial: Vec<Bytes> = if watch.initial_events {
                store
                    .matching(
                        watch.kind,
                        watch.namespace.as_deref(),
                        &watch.labels,
                        &watch.fields,
                    )
                    .map(|(_, o)| event_line("ADDED", o))
                    .collect()
            } else {
                Vec::new()
            };
            if !watch.initial_events && store.is_compacted(watch.from) {
                // As the real apiserver: the watch opens, then one ERROR event with 410.
                let expired = ApiError {
                    code: 410,
                    reason: "Expired",
                    message: format!(
                        "too old resource version: {} ({})",
                        watch.from,
                        store.resource_version()
                    ),
                    details: None,
                };
                (vec![event_line("ERROR", &expired.to_status())], None)
            } else {
                let cursor = if watch.initial_events {
                    store.resource_version()
                } else {
                    watch.from
                };
                (initial, Some(cursor))
            }
        };
        for line in initial {
            if tx.send(line).await.is_err() {
                return;
            }
        }
        let Some(mut cursor) = cursor else {
            return;
        };
        if watch.initial_events_end_bookmark {
            let bookmark = json!({
                "apiVersion": info.api_version(),
                "kind": info.kind,
                "metadata": {
                    "resourceVersion": cursor.to_string(),
                    "annotations": {"k8s.io/initial-events-end": "true"},
                },
            });
            if tx.send(event_line("BOOKMARK", &bookmark)).await.is_err() {
                return;
            }
        }
        let deadline = tokio::time::sleep(watch.timeout);
        tokio::pin!(deadline);
        loop {
            let lines: Vec<Bytes> = {
                let store = shared.store();
                let events = store.events_since(cursor);
                if let Some(last) = events.last() {
                    cursor = last.resource_version;
                }
                events
                    .iter()
                    .filter_map(|e| filtered_event(&watch, e))
                    .collect()
            };
            for line in lines {
                if tx.send(line).await.is_err() {
                    return;
                }
            }
            tokio::select! {
                changed = changes.changed() => if changed.is_err() { return },
                _ = &mut deadline => return,
                _ = shared.shutdown.cancelled() => return,
                _ = tx.closed() => return,
            }
        }
    });
    let frames =
        futures::stream::poll_fn(move |cx| rx.poll_recv(cx).map(|b| b.map(|b| Ok(Frame::data(b)))));
    let mut response = Response::new(BodyExt::boxed(StreamBody::new(frames)));
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    response
}

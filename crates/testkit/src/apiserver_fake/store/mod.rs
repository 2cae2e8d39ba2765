//! The fake apiserver's storage: objects per kind keyed by namespace/name, one global
//! resourceVersion, and the write history that watches replay. Implements the apiserver's
//! write semantics (preconditions, status subresource, generation, finalizers, no-op updates).

mod json;
#[cfg(test)]
mod tests;
mod writes;

pub(crate) use json::merge_patch;

use super::kinds::KINDS;
use super::selectors::{FieldSelector, LabelSelector};
use super::status::ApiError;
use json::{decode_continue, hex_encode, metadata, splitmix};
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

/// Writes kept for watches to replay before the older half is compacted away.
const MAX_HISTORY: usize = 100_000;

/// (index into KINDS, namespace or "" for cluster-scoped, name).
type Key = (usize, String, String);

/// One committed write, as a watch replays it.
#[derive(Debug)]
pub(crate) struct StoredEvent {
    pub resource_version: u64,
    pub kind: usize,
    pub namespace: String,
    /// ADDED, MODIFIED or DELETED.
    pub event_type: &'static str,
    pub object: Value,
    /// The object before a MODIFIED, so selector-filtered watches can turn it into ADDED/DELETED.
    pub previous: Option<Value>,
}

/// Who writes and whether the write is only checked (`dryRun=All`).
pub(crate) struct WriteContext {
    pub dry_run: bool,
    pub manager: String,
    /// `Update` or `Apply`, as managedFields records it.
    pub operation: &'static str,
    /// `force=true`: an apply takes over fields other managers own instead of a 409.
    pub force: bool,
}

/// The object a write addresses.
#[derive(Clone, Copy)]
pub(crate) struct ObjectRef<'a> {
    pub kind: usize,
    /// "" for cluster-scoped kinds.
    pub namespace: &'a str,
    pub name: &'a str,
}

pub(crate) enum PatchType {
    Merge,
    /// Treated as a merge patch: lists are replaced rather than merged by key.
    StrategicMerge,
    Apply,
}

#[derive(Default)]
pub(crate) struct Store {
    resource_version: u64,
    objects: BTreeMap<Key, Value>,
    history: Vec<Arc<StoredEvent>>,
    /// Writes up to this resourceVersion are no longer replayable (etcd compaction).
    compacted_through: u64,
    uid_sequence: u64,
}

impl Store {
    pub fn resource_version(&self) -> u64 {
        self.resource_version
    }

    /// Forgets the whole write history, as etcd compaction does: watches from any earlier
    /// resourceVersion then get 410 Expired and clients must list again.
    pub fn compact(&mut self) {
        self.compacted_through = self.resource_version;
        self.history.clear();
    }

    /// True when a watch from `resource_version` can no longer be served.
    pub fn is_compacted(&self, resource_version: u64) -> bool {
        resource_version < self.compacted_through
    }

    fn new_uid(&mut self) -> String {
        self.uid_sequence += 1;
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        let a = splitmix(nanos ^ self.uid_sequence);
        let b = splitmix(a ^ self.uid_sequence.rotate_left(32));
        format!(
            "{:08x}-{:04x}-4{:03x}-{:04x}-{:012x}",
            a >> 32,
            (a >> 16) & 0xffff,
            a & 0xfff,
            0x8000 | ((b >> 48) & 0x3fff),
            b & 0xffff_ffff_ffff
        )
    }

    fn generated_suffix(&mut self) -> String {
        const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
        self.uid_sequence += 1;
        let mut x = splitmix(self.uid_sequence ^ 0x5eed);
        (0..5)
            .map(|_| {
                let c = ALPHABET[(x % ALPHABET.len() as u64) as usize] as char;
                x /= ALPHABET.len() as u64;
                c
            })
            .collect()
    }

    fn commit(
        &mut self,
        key: Key,
        mut object: Value,
        previous: Option<Value>,
        event_type: &'static str,
    ) -> Value {
        self.resource_version += 1;
        metadata(&mut object).insert(
            "resourceVersion".into(),
            Value::String(self.resource_version.to_string()),
        );
        if event_type == "DELETED" {
            self.objects.remove(&key);
        } else {
            self.objects.insert(key.clone(), object.clone());
        }
        if self.history.len() >= MAX_HISTORY {
            // Keep the newer half, like the apiserver's bounded watch cache.
            let drop = self.history.len() / 2;
            self.compacted_through = self.history[drop - 1].resource_version;
            self.history.drain(..drop);
        }
        self.history.push(Arc::new(StoredEvent {
            resource_version: self.resource_version,
            kind: key.0,
            namespace: key.1,
            event_type,
            object: object.clone(),
            previous,
        }));
        object
    }

    /// Writes newer than `resource_version`, oldest first.
    pub fn events_since(&self, resource_version: u64) -> &[Arc<StoredEvent>] {
        let start = self
            .history
            .partition_point(|e| e.resource_version <= resource_version);
        &self.history[start..]
    }

    pub fn get(&self, kind: usize, namespace: &str, name: &str) -> Result<Value, ApiError> {
        self.objects
            .get(&(kind, namespace.to_string(), name.to_string()))
            .cloned()
            .ok_or_else(|| ApiError::not_found(&KINDS[kind], name))
    }

    /// Objects of `kind` (in `namespace`, or all) matching both selectors, in key order.
    pub fn matching<'a>(
        &'a self,
        kind: usize,
        namespace: Option<&'a str>,
        labels: &'a LabelSelector,
        fields: &'a FieldSelector,
    ) -> impl Iterator<Item = (&'a Key, &'a Value)> + 'a {
        self.objects
            .range((kind, String::new(), String::new())..)
            .take_while(move |(k, _)| k.0 == kind)
            .filter(move |(k, _)| namespace.is_none_or(|ns| ns == k.1))
            .filter(move |(_, v)| labels.matches(v) && fields.matches(v))
    }

    pub fn list(
        &self,
        kind: usize,
        namespace: Option<&str>,
        labels: &LabelSelector,
        fields: &FieldSelector,
        limit: Option<usize>,
        continue_token: Option<&str>,
    ) -> Result<Value, ApiError> {
        let info = &KINDS[kind];
        let (list_rv, after) = match continue_token {
            Some(token) => {
                let (rv, ns, name) = decode_continue(token)?;
                (rv, Some((ns, name)))
            }
            None => (self.resource_version, None),
        };
        let mut items = Vec::new();
        let mut last_key: Option<&Key> = None;
        let mut more = false;
        for (key, object) in self.matching(kind, namespace, labels, fields) {
            if after
                .as_ref()
                .is_some_and(|(ns, name)| (&key.1, &key.2) <= (ns, name))
            {
                continue;
            }
            if limit.is_some_and(|l| l > 0 && items.len() == l) {
                more = true;
                break;
            }
            last_key = Some(key);
            items.push(object.clone());
        }
        let next = match (more, last_key) {
            (true, Some(key)) => Some(hex_encode(&format!("{list_rv}\0{}\0{}", key.1, key.2))),
            _ => None,
        };
        let mut meta = json!({"resourceVersion": list_rv.to_string()});
        if let Some(token) = next {
            meta["continue"] = Value::String(token);
        }
        Ok(json!({
            "apiVersion": info.api_version(),
            "kind": format!("{}List", info.kind),
            "metadata": meta,
            "items": items,
        }))
    }
}

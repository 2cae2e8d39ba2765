//! The fake apiserver's storage: objects per kind keyed by namespace/name, one global
//! resourceVersion, and the write history that watches replay. Implements the apiserver's
//! write semantics (preconditions, status subresource, generation, finalizers, no-op updates).

use super::kinds::{KINDS, KindInfo};
use super::managed;
use super::selectors::{FieldSelector, LabelSelector};
use super::status::ApiError;
use super::validation::{apply_defaults, validate};
use serde_json::{Map, Value, json};
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

/// RFC 3339 UTC seconds, as metav1.Time serialises.
pub(crate) fn now_rfc3339() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs()) as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

fn str_at<'a>(object: &'a Value, pointer: &str) -> Option<&'a str> {
    object.pointer(pointer).and_then(Value::as_str)
}

/// The metadata map of `object`, created when missing. `object` is known to be a JSON object.
fn metadata(object: &mut Value) -> &mut Map<String, Value> {
    if !object.get("metadata").is_some_and(Value::is_object) {
        object["metadata"] = json!({});
    }
    match object.get_mut("metadata") {
        Some(Value::Object(map)) => map,
        // Unreachable: set to an object just above.
        _ => unreachable!("metadata was just made an object"),
    }
}

/// The object without the fields the server owns, for "did anything change" comparisons.
fn comparable(object: &Value) -> Value {
    let mut copy = object.clone();
    if let Some(meta) = copy.get_mut("metadata").and_then(Value::as_object_mut) {
        meta.remove("managedFields");
        meta.remove("resourceVersion");
    }
    copy
}

/// Everything the user controls except metadata and status: a change here bumps generation.
fn spec_part(object: &Value) -> Value {
    let mut copy = object.clone();
    if let Some(map) = copy.as_object_mut() {
        map.remove("metadata");
        map.remove("status");
    }
    copy
}

/// RFC 7386 JSON merge patch.
pub(crate) fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(patch_map) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = json!({});
    }
    if let Value::Object(target_map) = target {
        for (key, value) in patch_map {
            if value.is_null() {
                target_map.remove(key);
            } else {
                merge_patch(target_map.entry(key.clone()).or_insert(Value::Null), value);
            }
        }
    }
}

fn hex_encode(s: &str) -> String {
    s.bytes().map(|b| format!("{b:02x}")).collect()
}

fn hex_decode(s: &str) -> Option<String> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    let bytes: Option<Vec<u8>> = (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect();
    String::from_utf8(bytes?).ok()
}

/// Pagination position: the list's resourceVersion and the last key returned.
pub(crate) fn decode_continue(token: &str) -> Result<(u64, String, String), ApiError> {
    let bad = || ApiError::bad_request(format!("invalid continue token {token:?}"));
    let text = hex_decode(token).ok_or_else(bad)?;
    let mut parts = text.splitn(3, '\0');
    let rv = parts.next().and_then(|p| p.parse().ok()).ok_or_else(bad)?;
    let ns = parts.next().ok_or_else(bad)?.to_string();
    let name = parts.next().ok_or_else(bad)?.to_string();
    Ok((rv, ns, name))
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

    /// Records the write in managedFields; true when field ownership changed.
    fn record_manager(
        old: Option<&Value>,
        object: &mut Value,
        info: &KindInfo,
        ctx: &WriteContext,
        subresource: Option<&str>,
        applied: Option<&Value>,
    ) -> bool {
        managed::record(
            old,
            object,
            managed::Writer {
                manager: &ctx.manager,
                operation: ctx.operation,
                subresource,
            },
            applied,
            &info.api_version(),
            &now_rfc3339(),
        )
    }

    fn check_type_meta(info: &KindInfo, body: &mut Value) -> Result<(), ApiError> {
        let Some(map) = body.as_object_mut() else {
            return Err(ApiError::bad_request(
                "the request body must be a JSON object",
            ));
        };
        let expected = info.api_version();
        if let Some(v) = map.get("apiVersion").and_then(Value::as_str)
            && v != expected
        {
            return Err(ApiError::bad_request(format!(
                "the API version in the data ({v}) does not match the expected API version ({expected})"
            )));
        }
        if let Some(k) = map.get("kind").and_then(Value::as_str)
            && k != info.kind
        {
            return Err(ApiError::bad_request(format!(
                "the kind in the data ({k}) does not match the expected kind ({})",
                info.kind
            )));
        }
        map.insert("apiVersion".into(), Value::String(expected));
        map.insert("kind".into(), Value::String(info.kind.into()));
        Ok(())
    }

    pub fn create(
        &mut self,
        kind: usize,
        namespace: &str,
        mut body: Value,
        ctx: &WriteContext,
    ) -> Result<Value, ApiError> {
        let info = &KINDS[kind];
        Self::check_type_meta(info, &mut body)?;
        if info.namespaced
            && let Some(ns) = str_at(&body, "/metadata/namespace")
            && !ns.is_empty()
            && ns != namespace
        {
            return Err(ApiError::bad_request(
                "the namespace of the provided object does not match the namespace sent on the request",
            ));
        }
        let mut name = str_at(&body, "/metadata/name").unwrap_or("").to_string();
        let generate = str_at(&body, "/metadata/generateName")
            .unwrap_or("")
            .to_string();
        if name.is_empty() && !generate.is_empty() {
            name = format!("{generate}{}", self.generated_suffix());
        }
        let key = (
            kind,
            if info.namespaced {
                namespace.to_string()
            } else {
                String::new()
            },
            name.clone(),
        );
        if !name.is_empty() && self.objects.contains_key(&key) {
            return Err(ApiError::already_exists(info, &name));
        }
        let uid = self.new_uid();
        {
            let meta = metadata(&mut body);
            for server_owned in [
                "resourceVersion",
                "uid",
                "creationTimestamp",
                "deletionTimestamp",
                "deletionGracePeriodSeconds",
                "generation",
                "managedFields",
                "selfLink",
            ] {
                meta.remove(server_owned);
            }
            if !name.is_empty() {
                meta.insert("name".into(), Value::String(name.clone()));
            }
            if info.namespaced {
                meta.insert("namespace".into(), Value::String(namespace.into()));
            } else {
                meta.remove("namespace");
            }
            meta.insert("uid".into(), Value::String(uid));
            meta.insert("creationTimestamp".into(), Value::String(now_rfc3339()));
            if info.tracks_generation {
                meta.insert("generation".into(), Value::from(1));
            }
        }
        if info.status_subresource
            && !info.status_on_create
            && let Some(map) = body.as_object_mut()
        {
            map.remove("status");
        }
        let applied = (ctx.operation == "Apply").then(|| body.clone());
        apply_defaults(info, &mut body, &now_rfc3339());
        Self::record_manager(None, &mut body, info, ctx, None, applied.as_ref());
        let errors = validate(info, &body, None);
        if !errors.is_empty() {
            let shown = if name.is_empty() { generate } else { name };
            return Err(ApiError::invalid(info, &shown, &errors));
        }
        if ctx.dry_run {
            return Ok(body);
        }
        Ok(self.commit(key, body, None, "ADDED"))
    }

    /// PUT (and the second half of PATCH): replace the object, or only its status.
    pub fn replace(
        &mut self,
        target: ObjectRef<'_>,
        body: Value,
        status_only: bool,
        ctx: &WriteContext,
    ) -> Result<Value, ApiError> {
        self.replace_applying(target, body, status_only, ctx, None)
    }

    /// `replace`, where `applied` is the configuration of a server-side apply.
    fn replace_applying(
        &mut self,
        target: ObjectRef<'_>,
        mut body: Value,
        status_only: bool,
        ctx: &WriteContext,
        applied: Option<&Value>,
    ) -> Result<Value, ApiError> {
        let ObjectRef {
            kind,
            namespace,
            name,
        } = target;
        let info = &KINDS[kind];
        let key = (kind, namespace.to_string(), name.to_string());
        let old = self
            .objects
            .get(&key)
            .cloned()
            .ok_or_else(|| ApiError::not_found(info, name))?;
        Self::check_type_meta(info, &mut body)?;
        if let Some(body_name) = str_at(&body, "/metadata/name")
            && body_name != name
        {
            return Err(ApiError::bad_request(format!(
                "the name of the object ({body_name}) does not match the name on the URL ({name})"
            )));
        }
        let old_rv = str_at(&old, "/metadata/resourceVersion")
            .unwrap_or("")
            .to_string();
        if let Some(rv) = str_at(&body, "/metadata/resourceVersion")
            && !rv.is_empty()
            && rv != old_rv
        {
            return Err(ApiError::conflict(info, name));
        }
        let old_uid = str_at(&old, "/metadata/uid").unwrap_or("").to_string();
        if let Some(uid) = str_at(&body, "/metadata/uid")
            && !uid.is_empty()
            && uid != old_uid
        {
            return Err(ApiError::conflict_because(
                info,
                name,
                &format!(
                    "Precondition failed: UID in precondition: {uid}, UID in object meta: {old_uid}"
                ),
            ));
        }
        let mut new = if status_only {
            let mut copy = old.clone();
            match body.get("status") {
                Some(status) => copy["status"] = status.clone(),
                None => {
                    if let Some(map) = copy.as_object_mut() {
                        map.remove("status");
                    }
                }
            }
            copy
        } else {
            let old_meta = old.get("metadata").cloned().unwrap_or_else(|| json!({}));
            let meta = metadata(&mut body);
            for carried in [
                "name",
                "namespace",
                "uid",
                "creationTimestamp",
                "generation",
                "deletionTimestamp",
                "deletionGracePeriodSeconds",
                "managedFields",
            ] {
                match old_meta.get(carried) {
                    Some(v) => meta.insert(carried.into(), v.clone()),
                    None => meta.remove(carried),
                };
            }
            if info.status_subresource
                && let Some(map) = body.as_object_mut()
            {
                match old.get("status") {
                    Some(status) => map.insert("status".into(), status.clone()),
                    None => map.remove("status"),
                };
            }
            body
        };
        metadata(&mut new).insert("resourceVersion".into(), Value::String(old_rv));
        if info.tracks_generation && spec_part(&new) != spec_part(&old) {
            let generation = old
                .pointer("/metadata/generation")
                .and_then(Value::as_i64)
                .unwrap_or(0);
            metadata(&mut new).insert("generation".into(), Value::from(generation + 1));
        }
        apply_defaults(info, &mut new, &now_rfc3339());
        if info.kind == "ResourceClaim" {
            drop_deallocated_status_devices(&mut new, &old);
        }
        let errors = validate(info, &new, Some(&old));
        if !errors.is_empty() {
            return Err(ApiError::invalid(info, name, &errors));
        }
        let finalized = old.pointer("/metadata/deletionTimestamp").is_some()
            && new
                .pointer("/metadata/finalizers")
                .and_then(Value::as_array)
                .is_none_or(Vec::is_empty);
        let ownership_changed = Self::record_manager(
            Some(&old),
            &mut new,
            info,
            ctx,
            status_only.then_some("status"),
            applied,
        );
        if comparable(&new) == comparable(&old) && !ownership_changed && !finalized {
            // The real apiserver skips the storage write, so no new resourceVersion and no event.
            return Ok(old);
        }
        if ctx.dry_run {
            return Ok(new);
        }
        if finalized {
            return Ok(self.commit(key, new, None, "DELETED"));
        }
        Ok(self.commit(key, new, Some(old), "MODIFIED"))
    }

    pub fn patch(
        &mut self,
        target: ObjectRef<'_>,
        patch_type: PatchType,
        patch: Value,
        status_only: bool,
        ctx: &WriteContext,
    ) -> Result<(Value, bool), ApiError> {
        let ObjectRef {
            kind,
            namespace,
            name,
        } = target;
        let info = &KINDS[kind];
        let key = (kind, namespace.to_string(), name.to_string());
        let ctx = &WriteContext {
            dry_run: ctx.dry_run,
            manager: ctx.manager.clone(),
            operation: match patch_type {
                PatchType::Apply => "Apply",
                PatchType::Merge | PatchType::StrategicMerge => "Update",
            },
            force: ctx.force,
        };
        let Some(old) = self.objects.get(&key).cloned() else {
            if matches!(patch_type, PatchType::Apply) && !status_only {
                if let Some(body_name) = str_at(&patch, "/metadata/name")
                    && body_name != name
                {
                    return Err(ApiError::bad_request(format!(
                        "the name of the object ({body_name}) does not match the name on the URL ({name})"
                    )));
                }
                let mut body = patch;
                if body.is_object() {
                    metadata(&mut body).insert("name".into(), Value::String(name.into()));
                }
                return self.create(kind, namespace, body, ctx).map(|o| (o, true));
            }
            return Err(ApiError::not_found(info, name));
        };
        if !patch.is_object() {
            return Err(ApiError::bad_request("the patch must be a JSON object"));
        }
        let applying = matches!(patch_type, PatchType::Apply);
        if applying && !ctx.force {
            managed::check_apply(
                &old,
                &patch,
                managed::Writer {
                    manager: &ctx.manager,
                    operation: ctx.operation,
                    subresource: status_only.then_some("status"),
                },
            )?;
        }
        let mut patched = old;
        merge_patch(&mut patched, &patch);
        self.replace_applying(
            target,
            patched,
            status_only,
            ctx,
            applying.then_some(&patch),
        )
        .map(|o| (o, false))
    }

    /// DELETE of one object; with finalizers it only gets a deletionTimestamp.
    pub fn delete(
        &mut self,
        kind: usize,
        namespace: &str,
        name: &str,
        options: &Value,
        ctx: &WriteContext,
    ) -> Result<Value, ApiError> {
        let info = &KINDS[kind];
        let key = (kind, namespace.to_string(), name.to_string());
        let old = self
            .objects
            .get(&key)
            .cloned()
            .ok_or_else(|| ApiError::not_found(info, name))?;
        let uid = str_at(&old, "/metadata/uid").unwrap_or("").to_string();
        let rv = str_at(&old, "/metadata/resourceVersion")
            .unwrap_or("")
            .to_string();
        if let Some(want) = str_at(options, "/preconditions/uid")
            && want != uid
        {
            return Err(ApiError::conflict_because(
                info,
                name,
                &format!(
                    "Precondition failed: UID in precondition: {want}, UID in object meta: {uid}"
                ),
            ));
        }
        if let Some(want) = str_at(options, "/preconditions/resourceVersion")
            && want != rv
        {
            return Err(ApiError::conflict_because(
                info,
                name,
                &format!(
                    "Precondition failed: ResourceVersion in precondition: {want}, ResourceVersion in meta: {rv}"
                ),
            ));
        }
        let has_finalizers = old
            .pointer("/metadata/finalizers")
            .and_then(Value::as_array)
            .is_some_and(|f| !f.is_empty());
        if ctx.dry_run {
            return Ok(old);
        }
        if has_finalizers {
            if old.pointer("/metadata/deletionTimestamp").is_some() {
                return Ok(old);
            }
            let mut marked = old.clone();
            let meta = metadata(&mut marked);
            meta.insert("deletionTimestamp".into(), Value::String(now_rfc3339()));
            meta.insert("deletionGracePeriodSeconds".into(), Value::from(0));
            return Ok(self.commit(key, marked, Some(old), "MODIFIED"));
        }
        self.commit(key, old, None, "DELETED");
        Ok(json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Success",
            "details": {"name": name, "group": info.group, "kind": info.plural, "uid": uid},
        }))
    }

    pub fn delete_collection(
        &mut self,
        kind: usize,
        namespace: Option<&str>,
        labels: &LabelSelector,
        fields: &FieldSelector,
        ctx: &WriteContext,
    ) -> Result<Value, ApiError> {
        let info = &KINDS[kind];
        // The registry lists, deletes each item, and answers with the list as it read it.
        let listed: Vec<(Key, Value)> = self
            .matching(kind, namespace, labels, fields)
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let list_version = self.resource_version.to_string();
        let mut items = Vec::with_capacity(listed.len());
        for ((_, ns, name), object) in listed {
            self.delete(kind, &ns, &name, &Value::Null, ctx)?;
            items.push(object);
        }
        Ok(json!({
            "apiVersion": info.api_version(),
            "kind": format!("{}List", info.kind),
            "metadata": {"resourceVersion": list_version},
            "items": items,
        }))
    }
}

/// The registry's `dropDeallocatedStatusDevices`: a write that removes devices from a claim's
/// allocation (deallocation) also drops their `status.devices` entries, which validation
/// would otherwise reject as not allocated.
fn drop_deallocated_status_devices(new: &mut Value, old: &Value) {
    let allocated = |claim: &Value| -> Vec<(String, String, String)> {
        claim
            .pointer("/status/allocation/devices/results")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .map(|r| {
                let field = |k: &str| r.get(k).and_then(Value::as_str).unwrap_or("").to_string();
                (field("driver"), field("pool"), field("device"))
            })
            .collect()
    };
    let (before, after) = (allocated(old), allocated(new));
    let Some(devices) = new
        .pointer_mut("/status/devices")
        .and_then(Value::as_array_mut)
    else {
        return;
    };
    devices.retain(|d| {
        let field = |k: &str| d.get(k).and_then(Value::as_str).unwrap_or("").to_string();
        let key = (field("driver"), field("pool"), field("device"));
        !before.contains(&key) || after.contains(&key)
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merge_patch_follows_rfc7386() {
        let mut target = json!({"a": "b", "c": {"d": "e", "f": "g"}});
        merge_patch(&mut target, &json!({"a": "z", "c": {"f": null}}));
        assert_eq!(target, json!({"a": "z", "c": {"d": "e"}}));
        merge_patch(&mut target, &json!({"a": [1]}));
        assert_eq!(target["a"], json!([1]));
    }

    #[test]
    fn timestamps_are_rfc3339_utc() {
        let now = now_rfc3339();
        assert_eq!(now.len(), 20, "{now}");
        assert!(now.ends_with('Z') && now.as_bytes()[10] == b'T');
        assert!(now.as_str() > "2024-01-01T00:00:00Z");
    }

    #[test]
    fn continue_tokens_round_trip() {
        let token = hex_encode("42\0ns\0name");
        assert_eq!(
            decode_continue(&token).unwrap(),
            (42, "ns".into(), "name".into())
        );
        assert!(decode_continue("zz").is_err());
    }
}

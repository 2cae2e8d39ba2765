//! The store's writes: create, replace, patch (merge, strategic merge, server-side apply),
//! delete and deletecollection, with the apiserver's preconditions, status subresource,
//! generation, finalizer and managedFields rules.

use super::super::kinds::{KINDS, KindInfo};
use super::super::managed;
use super::super::selectors::{FieldSelector, LabelSelector};
use super::super::status::ApiError;
use super::super::validation::{apply_defaults, validate};
use super::json::{comparable, metadata, now_rfc3339, spec_part, str_at};
use super::{Key, ObjectRef, PatchType, Store, WriteContext, merge_patch};
use serde_json::{Value, json};

impl Store {
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

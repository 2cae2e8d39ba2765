//! Server-side apply field ownership, as the apiserver records it in `managedFields`: every
//! write hands the fields it changed to its manager (per manager, operation and subresource),
//! and an apply that would change a field another manager owns is a 409 naming that manager,
//! unless forced. Lists are atomic (owned whole), which is what the kinds we serve declare.

use super::status::ApiError;
use serde_json::{Map, Value, json};
use std::collections::BTreeSet;

/// A field by its map keys from the object's root.
type Path = Vec<String>;
type FieldSet = BTreeSet<Path>;

/// Server-owned metadata nobody manages.
const UNMANAGED_METADATA: [&str; 9] = [
    "name",
    "namespace",
    "uid",
    "resourceVersion",
    "generation",
    "creationTimestamp",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
    "managedFields",
];

/// Who wrote: one `managedFields` entry's identity.
#[derive(Clone, Copy)]
pub(crate) struct Writer<'a> {
    pub manager: &'a str,
    /// `Apply` or `Update`.
    pub operation: &'a str,
    pub subresource: Option<&'a str>,
}

struct Entry {
    manager: String,
    operation: String,
    subresource: Option<String>,
    api_version: String,
    time: Option<String>,
    fields: FieldSet,
}

impl Entry {
    fn is(&self, writer: Writer<'_>) -> bool {
        self.manager == writer.manager
            && self.operation == writer.operation
            && self.subresource.as_deref() == writer.subresource
    }

    /// As the apiserver names a manager in a conflict (printManager in apimachinery).
    fn describe(&self) -> String {
        let mut text = format!("{:?}", self.manager);
        if let Some(sub) = &self.subresource {
            text.push_str(&format!(" with subresource {sub:?}"));
        }
        if self.operation == "Update" {
            text.push_str(&format!(" using {}", self.api_version));
            if let Some(time) = &self.time {
                text.push_str(&format!(" at {time}"));
            }
        }
        text
    }
}

fn leaves(value: &Value, prefix: &mut Path, out: &mut FieldSet) {
    match value {
        Value::Object(map) if !map.is_empty() => {
            for (key, child) in map {
                prefix.push(key.clone());
                leaves(child, prefix, out);
                prefix.pop();
            }
        }
        _ if !prefix.is_empty() => {
            out.insert(prefix.clone());
        }
        _ => {}
    }
}

/// The managed fields `object` sets: every leaf but type meta and server-owned metadata.
fn object_fields(object: &Value) -> FieldSet {
    let mut out = FieldSet::new();
    let Some(map) = object.as_object() else {
        return out;
    };
    for (key, value) in map {
        if key == "apiVersion" || key == "kind" {
            continue;
        }
        let mut prefix = vec![key.clone()];
        if key == "metadata"
            && let Some(meta) = value.as_object()
        {
            for (field, child) in meta {
                if UNMANAGED_METADATA.contains(&field.as_str()) {
                    continue;
                }
                prefix.push(field.clone());
                leaves(child, &mut prefix, &mut out);
                prefix.pop();
            }
            continue;
        }
        leaves(value, &mut prefix, &mut out);
    }
    out
}

fn value_at<'a>(object: &'a Value, path: &[String]) -> Option<&'a Value> {
    path.iter().try_fold(object, |v, key| v.get(key))
}

/// Whether `set` owns `path` itself or a field above it that `current` holds as one value
/// (a list or a scalar the apply replaces); an owned map, even an empty one, owns only itself.
fn owns(set: &FieldSet, path: &[String], current: &Value) -> bool {
    set.contains(path)
        || (1..path.len()).any(|n| {
            set.contains(&path[..n])
                && value_at(current, &path[..n]).is_some_and(|v| !v.is_object())
        })
}

/// `.spec.holderIdentity`, as structured-merge-diff prints a path.
fn path_string(path: &[String]) -> String {
    path.iter().map(|k| format!(".{k}")).collect()
}

fn to_fields_v1(set: &FieldSet) -> Value {
    let mut root = Map::new();
    for path in set {
        let mut node = &mut root;
        for key in path {
            let child = node.entry(format!("f:{key}")).or_insert_with(|| json!({}));
            let Value::Object(map) = child else {
                unreachable!("trie nodes are objects");
            };
            node = map;
        }
    }
    // No path is both a leaf and the parent of another: every set is leaves of one object.
    Value::Object(root)
}

fn from_fields_v1(value: &Value, prefix: &mut Path, out: &mut FieldSet) {
    let Some(map) = value.as_object() else {
        return;
    };
    if map.is_empty() && !prefix.is_empty() {
        out.insert(prefix.clone());
        return;
    }
    for (key, child) in map {
        match key.strip_prefix("f:") {
            Some(field) => {
                prefix.push(field.to_string());
                from_fields_v1(child, prefix, out);
                prefix.pop();
            }
            // "." (the field itself) or a list item key: we own lists whole.
            None if !prefix.is_empty() => {
                out.insert(prefix.clone());
            }
            None => {}
        }
    }
}

/// Who owns what in `list`, without the timestamps: what a write must change to count.
fn ownership(list: &[Entry]) -> Vec<(String, String, Option<String>, FieldSet)> {
    list.iter()
        .map(|e| {
            (
                e.manager.clone(),
                e.operation.clone(),
                e.subresource.clone(),
                e.fields.clone(),
            )
        })
        .collect()
}

fn entries(object: &Value) -> Vec<Entry> {
    let Some(list) = object
        .pointer("/metadata/managedFields")
        .and_then(Value::as_array)
    else {
        return Vec::new();
    };
    list.iter()
        .map(|e| {
            let text = |k: &str| e.get(k).and_then(Value::as_str).map(str::to_string);
            let mut fields = FieldSet::new();
            if let Some(v1) = e.get("fieldsV1") {
                from_fields_v1(v1, &mut Vec::new(), &mut fields);
            }
            Entry {
                manager: text("manager").unwrap_or_default(),
                operation: text("operation").unwrap_or_default(),
                subresource: text("subresource"),
                api_version: text("apiVersion").unwrap_or_default(),
                time: text("time"),
                fields,
            }
        })
        .collect()
}

/// The 409 an apply gets when it would change fields other managers own, or Ok.
pub(crate) fn check_apply(
    current: &Value,
    applied: &Value,
    writer: Writer<'_>,
) -> Result<(), ApiError> {
    let others: Vec<Entry> = entries(current)
        .into_iter()
        .filter(|e| !e.is(writer))
        .collect();
    let mut conflicts: Vec<(&Entry, Path)> = Vec::new();
    for path in object_fields(applied) {
        if value_at(current, &path) == value_at(applied, &path) {
            continue;
        }
        for entry in &others {
            if owns(&entry.fields, &path, current) {
                conflicts.push((entry, path.clone()));
            }
        }
    }
    if conflicts.is_empty() {
        return Ok(());
    }
    let causes: Vec<Value> = conflicts
        .iter()
        .map(|(entry, path)| {
            json!({
                "reason": "FieldManagerConflict",
                "message": format!("conflict with {}", entry.describe()),
                "field": path_string(path),
            })
        })
        .collect();
    let message = if let [(entry, path)] = conflicts.as_slice() {
        format!(
            "Apply failed with 1 conflict: conflict with {}: {}",
            entry.describe(),
            path_string(path)
        )
    } else {
        let mut managers: Vec<String> = conflicts.iter().map(|(e, _)| e.describe()).collect();
        managers.sort();
        managers.dedup();
        let mut lines = Vec::new();
        for manager in &managers {
            lines.push(format!("conflicts with {manager}"));
            for (_, path) in conflicts.iter().filter(|(e, _)| e.describe() == *manager) {
                lines.push(format!("- {}", path_string(path)));
            }
        }
        format!(
            "Apply failed with {} conflicts: {}",
            conflicts.len(),
            lines.join("\n")
        )
    };
    Err(ApiError::apply_conflict(message, causes))
}

/// Writes `new`'s `managedFields` after a write by `writer` turned `old` (None: a create)
/// into `new`: fields whose value changed (or went away) leave their other owners; an
/// applier owns exactly what it applied, an updater adds what it changed. True when the
/// ownership changed, so an otherwise unchanged apply still counts as a write.
pub(crate) fn record(
    old: Option<&Value>,
    new: &mut Value,
    writer: Writer<'_>,
    applied: Option<&Value>,
    api_version: &str,
    now: &str,
) -> bool {
    let mut list = old.map(entries).unwrap_or_default();
    let before = ownership(&list);
    let new_fields = object_fields(new);
    let old_fields = old.map(object_fields).unwrap_or_default();
    let changed: FieldSet = new_fields
        .union(&old_fields)
        .filter(|p| old.and_then(|o| value_at(o, p)) != value_at(new, p))
        .cloned()
        .collect();
    for entry in &mut list {
        let theirs = !entry.is(writer);
        entry
            .fields
            .retain(|p| new_fields.contains(p) && !(theirs && changed.contains(p)));
    }
    let mine = match list.iter().position(|e| e.is(writer)) {
        Some(i) => i,
        None => {
            list.push(Entry {
                manager: writer.manager.to_string(),
                operation: writer.operation.to_string(),
                subresource: writer.subresource.map(str::to_string),
                api_version: api_version.to_string(),
                time: None,
                fields: FieldSet::new(),
            });
            list.len() - 1
        }
    };
    match applied {
        Some(applied) => {
            list[mine].fields = object_fields(applied)
                .into_iter()
                .filter(|p| new_fields.contains(p))
                .collect();
        }
        None => {
            let added: Vec<Path> = changed
                .iter()
                .filter(|p| new_fields.contains(*p))
                .cloned()
                .collect();
            list[mine].fields.extend(added);
        }
    }
    list.retain(|e| !e.fields.is_empty());
    let ownership_changed = before != ownership(&list);
    let rendered: Vec<Value> = list
        .iter()
        .map(|e| {
            let stamp = if e.is(writer) || e.time.is_none() {
                now.to_string()
            } else {
                e.time.clone().unwrap_or_default()
            };
            let mut entry = json!({
                "manager": e.manager,
                "operation": e.operation,
                "apiVersion": e.api_version,
                "time": stamp,
                "fieldsType": "FieldsV1",
                "fieldsV1": to_fields_v1(&e.fields),
            });
            if let Some(sub) = &e.subresource {
                entry["subresource"] = Value::String(sub.clone());
            }
            entry
        })
        .collect();
    if let Some(meta) = new.get_mut("metadata").and_then(Value::as_object_mut) {
        if rendered.is_empty() {
            meta.remove("managedFields");
        } else {
            meta.insert("managedFields".into(), Value::Array(rendered));
        }
    }
    ownership_changed
}

#[cfg(test)]
mod tests {
    use super::*;

    const APPLY_A: Writer<'static> = Writer {
        manager: "a",
        operation: "Apply",
        subresource: None,
    };
    const APPLY_B: Writer<'static> = Writer {
        manager: "b",
        operation: "Apply",
        subresource: None,
    };

    fn applied_by(writer: Writer<'_>, old: Option<&Value>, body: Value) -> Value {
        let mut new = old.cloned().unwrap_or_else(|| json!({"metadata": {}}));
        super::super::store::merge_patch(&mut new, &body);
        record(
            old,
            &mut new,
            writer,
            Some(&body),
            "v1",
            "2026-01-01T00:00:00Z",
        );
        new
    }

    #[test]
    fn fields_v1_round_trips() {
        let set: FieldSet = [
            vec!["spec".to_string(), "holderIdentity".to_string()],
            vec![
                "metadata".to_string(),
                "labels".to_string(),
                "a/b".to_string(),
            ],
        ]
        .into();
        let v1 = to_fields_v1(&set);
        assert_eq!(v1["f:spec"]["f:holderIdentity"], json!({}));
        let mut back = FieldSet::new();
        from_fields_v1(&v1, &mut Vec::new(), &mut back);
        assert_eq!(back, set);
    }

    #[test]
    fn a_second_applier_conflicts_on_changed_values_only_and_force_moves_ownership() {
        let lease = applied_by(
            APPLY_A,
            None,
            json!({"spec": {"holderIdentity": "a", "x": 1}}),
        );
        // Same value: shared ownership, no conflict.
        assert!(check_apply(&lease, &json!({"spec": {"x": 1}}), APPLY_B).is_ok());
        let err =
            check_apply(&lease, &json!({"spec": {"holderIdentity": "b"}}), APPLY_B).unwrap_err();
        assert_eq!(err.code, 409);
        assert_eq!(
            err.message,
            "Apply failed with 1 conflict: conflict with \"a\": .spec.holderIdentity"
        );
        // The owner itself may change it.
        assert!(check_apply(&lease, &json!({"spec": {"holderIdentity": "c"}}), APPLY_A).is_ok());
        // Forced: b owns it now, a does not.
        let forced = applied_by(
            APPLY_B,
            Some(&lease),
            json!({"spec": {"holderIdentity": "b"}}),
        );
        assert!(check_apply(&forced, &json!({"spec": {"holderIdentity": "z"}}), APPLY_A).is_err());
        assert!(check_apply(&forced, &json!({"spec": {"x": 2}}), APPLY_B).is_err());
    }

    #[test]
    fn an_update_that_removes_a_field_frees_it() {
        let lease = applied_by(APPLY_A, None, json!({"spec": {"holderIdentity": "a"}}));
        let mut released = lease.clone();
        released["spec"] = json!({});
        let update = Writer {
            manager: "a",
            operation: "Update",
            subresource: None,
        };
        record(Some(&lease), &mut released, update, None, "v1", "t");
        // The applier lost the field; the updater owns only the (now empty) spec map.
        let managers = released["metadata"]["managedFields"].as_array().unwrap();
        assert_eq!(managers.len(), 1);
        assert_eq!(managers[0]["operation"], "Update");
        assert_eq!(managers[0]["fieldsV1"], json!({"f:spec": {}}));
        assert!(
            check_apply(
                &released,
                &json!({"spec": {"holderIdentity": "b"}}),
                APPLY_B
            )
            .is_ok()
        );
    }
}

//! The CDI spec schema (container-device-interface `schema/schema.json` and `defs.json`:
//! required fields and types) plus what the CDI Go library checks on load (unknown fields,
//! known `cdiVersion` at or above the minimum its fields need, kind and device name syntax,
//! env entries `KEY=VALUE`, hook names), written from those documents as a validator that is
//! not Tandem's serialiser, so a spec we write is checked by rules we do not control.

use serde_json::{Map, Value};

const VERSIONS: &[&str] = &[
    "0.3.0", "0.4.0", "0.5.0", "0.6.0", "0.7.0", "0.8.0", "1.0.0", "1.1.0",
];
const HOOK_NAMES: &[&str] = &[
    "prestart",
    "createRuntime",
    "createContainer",
    "startContainer",
    "poststart",
    "poststop",
];

pub fn validate(bytes: &[u8]) -> Result<(), String> {
    let spec: Value = serde_json::from_slice(bytes).map_err(|e| format!("not JSON: {e}"))?;
    let top = object(&spec, "spec")?;
    only_keys(
        top,
        &[
            "cdiVersion",
            "kind",
            "annotations",
            "devices",
            "containerEdits",
        ],
        "spec",
    )?;
    let version = string(top.get("cdiVersion"), "cdiVersion")?;
    let version_index = VERSIONS
        .iter()
        .position(|v| *v == version)
        .ok_or_else(|| format!("unknown cdiVersion {version:?}"))?;
    let kind = string(top.get("kind"), "kind")?;
    let (vendor, class) = kind
        .split_once('/')
        .ok_or_else(|| format!("kind {kind:?} is not vendor/class"))?;
    check_vendor_or_class(vendor, "vendor")?;
    check_vendor_or_class(class, "class")?;
    let mut needs = "0.3.0";
    let mut need = |v: &'static str| {
        if VERSIONS.iter().position(|x| *x == v) > VERSIONS.iter().position(|x| *x == needs) {
            needs = v;
        }
    };
    if top.contains_key("annotations") {
        need("0.6.0");
    }
    let devices = top
        .get("devices")
        .and_then(Value::as_array)
        .ok_or("devices: required array")?;
    if devices.is_empty() {
        return Err("devices: at least one device".into());
    }
    for (i, device) in devices.iter().enumerate() {
        let at = format!("devices[{i}]");
        let d = object(device, &at)?;
        only_keys(d, &["name", "annotations", "containerEdits"], &at)?;
        let name = string(d.get("name"), &format!("{at}.name"))?;
        check_device_name(name)?;
        if name.starts_with(|c: char| !c.is_ascii_alphabetic()) {
            need("0.5.0");
        }
        let edits = d
            .get("containerEdits")
            .ok_or(format!("{at}.containerEdits: required"))?;
        if object(edits, &at)?.is_empty() {
            return Err(format!("{at}: empty containerEdits"));
        }
        check_edits(edits, &at, &mut need)?;
    }
    if let Some(edits) = top.get("containerEdits") {
        check_edits(edits, "containerEdits", &mut need)?;
    }
    let needed = VERSIONS.iter().position(|v| *v == needs).unwrap();
    if version_index < needed {
        return Err(format!(
            "cdiVersion {version} is below {needs}, which the spec's fields need"
        ));
    }
    Ok(())
}

fn check_edits(edits: &Value, at: &str, need: &mut impl FnMut(&'static str)) -> Result<(), String> {
    let e = object(edits, at)?;
    only_keys(
        e,
        &[
            "env",
            "deviceNodes",
            "mounts",
            "hooks",
            "intelRdt",
            "additionalGids",
            "netDevices",
        ],
        at,
    )?;
    for entry in array(e.get("env"), &format!("{at}.env"))? {
        let entry = string(Some(entry), &format!("{at}.env[]"))?;
        if !entry.contains('=') {
            return Err(format!("{at}.env: {entry:?} is not KEY=VALUE"));
        }
    }
    for node in array(e.get("deviceNodes"), &format!("{at}.deviceNodes"))? {
        let n = object(node, "deviceNode")?;
        only_keys(
            n,
            &[
                "path",
                "hostPath",
                "type",
                "major",
                "minor",
                "fileMode",
                "permissions",
                "uid",
                "gid",
            ],
            "deviceNode",
        )?;
        let path = string(n.get("path"), "deviceNode.path")?;
        if !path.starts_with('/') {
            return Err(format!("deviceNode path {path:?} is not absolute"));
        }
        if n.contains_key("hostPath") {
            need("0.5.0");
        }
        if let Some(t) = n.get("type") {
            let t = string(Some(t), "deviceNode.type")?;
            if !["b", "c", "u", "p"].contains(&t) {
                return Err(format!("deviceNode type {t:?}"));
            }
        }
        for key in ["major", "minor"] {
            if let Some(v) = n.get(key) {
                v.as_i64().ok_or(format!("deviceNode.{key}: int64"))?;
            }
        }
        if let Some(p) = n.get("permissions") {
            let p = string(Some(p), "permissions")?;
            if p.chars().any(|c| !"rwm".contains(c)) {
                return Err(format!("permissions {p:?}"));
            }
        }
    }
    for mount in array(e.get("mounts"), &format!("{at}.mounts"))? {
        let m = object(mount, "mount")?;
        only_keys(
            m,
            &["hostPath", "containerPath", "options", "type"],
            "mount",
        )?;
        for key in ["hostPath", "containerPath"] {
            if string(m.get(key), &format!("mount.{key}"))?.is_empty() {
                return Err(format!("mount.{key} is empty"));
            }
        }
        for o in array(m.get("options"), "mount.options")? {
            string(Some(o), "mount.options[]")?;
        }
        if m.contains_key("type") {
            need("0.4.0");
        }
    }
    for hook in array(e.get("hooks"), &format!("{at}.hooks"))? {
        let h = object(hook, "hook")?;
        only_keys(h, &["hookName", "path", "args", "env", "timeout"], "hook")?;
        let name = string(h.get("hookName"), "hook.hookName")?;
        if !HOOK_NAMES.contains(&name) {
            return Err(format!("invalid hook name {name:?}"));
        }
        string(h.get("path"), "hook.path")?;
        for a in array(h.get("args"), "hook.args")? {
            string(Some(a), "hook.args[]")?;
        }
        if let Some(t) = h.get("timeout") {
            t.as_u64()
                .filter(|t| *t <= u64::from(u32::MAX))
                .ok_or("hook.timeout: uint32")?;
        }
    }
    if e.contains_key("intelRdt") || e.contains_key("additionalGids") {
        need("0.7.0");
    }
    if e.contains_key("netDevices") {
        need("1.1.0");
    }
    Ok(())
}

fn object<'a>(v: &'a Value, at: &str) -> Result<&'a Map<String, Value>, String> {
    v.as_object().ok_or(format!("{at}: expected an object"))
}

fn string<'a>(v: Option<&'a Value>, at: &str) -> Result<&'a str, String> {
    v.and_then(Value::as_str)
        .ok_or(format!("{at}: required string"))
}

fn array<'a>(v: Option<&'a Value>, at: &str) -> Result<&'a [Value], String> {
    match v {
        None => Ok(&[]),
        Some(v) => v
            .as_array()
            .map(Vec::as_slice)
            .ok_or(format!("{at}: expected an array")),
    }
}

fn only_keys(m: &Map<String, Value>, allowed: &[&str], at: &str) -> Result<(), String> {
    match m.keys().find(|k| !allowed.contains(&k.as_str())) {
        Some(k) => Err(format!("{at}: unknown field {k:?}")),
        None => Ok(()),
    }
}

fn check_vendor_or_class(s: &str, what: &str) -> Result<(), String> {
    let ok = s.starts_with(|c: char| c.is_ascii_alphabetic())
        && s.ends_with(|c: char| c.is_ascii_alphanumeric())
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c));
    if ok {
        Ok(())
    } else {
        Err(format!("{what} {s:?} is not a valid CDI {what}"))
    }
}

fn check_device_name(s: &str) -> Result<(), String> {
    let ok = s.starts_with(|c: char| c.is_ascii_alphanumeric())
        && s.ends_with(|c: char| c.is_ascii_alphanumeric())
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "_.:-".contains(c));
    if ok {
        Ok(())
    } else {
        Err(format!("device name {s:?} is not a valid CDI device name"))
    }
}

#[test]
fn the_validator_refuses_what_the_cdi_library_refuses() {
    let ok = br#"{"cdiVersion":"0.5.0","kind":"a.com/b","devices":[{"name":"1x","containerEdits":{"deviceNodes":[{"path":"/dev/x"}]}}]}"#;
    validate(ok).unwrap();
    for bad in [
        r#"{"cdiVersion":"0.3.0","kind":"a.com/b","devices":[{"name":"1x","containerEdits":{"env":["A=1"]}}]}"#,
        r#"{"cdiVersion":"0.5.0","kind":"a.com/b","devices":[{"name":"x","containerEdits":{"env":["A"]}}]}"#,
        r#"{"cdiVersion":"0.5.0","kind":"a.com/b","devices":[{"name":"x","containerEdits":{"mounts":[{"hostPath":"/a"}]}}]}"#,
        r#"{"cdiVersion":"0.5.0","kind":"a.com/b","devices":[{"name":"x","containerEdits":{"hooks":[{"hookName":"pre","path":"/a"}]}}]}"#,
        r#"{"cdiVersion":"0.5.0","kind":"a.com/b","devices":[{"name":"x","containerEdits":{"env":["A=1"],"extra":1}}]}"#,
        r#"{"cdiVersion":"0.5.0","kind":"ab","devices":[{"name":"x","containerEdits":{"env":["A=1"]}}]}"#,
        r#"{"cdiVersion":"0.5.0","kind":"a.com/b","devices":[]}"#,
        r#"{"cdiVersion":"0.3.0","kind":"a.com/b","devices":[{"name":"x","containerEdits":{"mounts":[{"hostPath":"/a","containerPath":"/b","type":"bind"}]}}]}"#,
    ] {
        assert!(validate(bad.as_bytes()).is_err(), "{bad}");
    }
}

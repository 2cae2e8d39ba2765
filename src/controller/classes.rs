//! The DeviceClasses `gpu.tandem.dev` and `nic.tandem.dev`: what they must say (pure), and
//! a server-side apply under the controller's field manager when one is missing or differs.

use crate::names;
use k8s_openapi::api::resource::v1::{
    CELDeviceSelector, DeviceClass, DeviceClassSpec, DeviceSelector,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, Patch, PatchParams};
use std::collections::BTreeMap;

/// The classes the controller keeps, for driver `driver` (also the attribute domain).
pub fn desired_classes(driver: &str) -> Vec<DeviceClass> {
    let base = format!("device.driver == \"{driver}\"");
    let kind = |k: &str| {
        format!(
            "device.attributes[\"{driver}\"].{} == \"{k}\"",
            names::ATTR_KIND
        )
    };
    let gpu = format!("{base} && {}", kind(names::KIND_GPU));
    let nic = format!(
        "{base} && {} && device.attributes[\"{driver}\"].{} == true",
        kind(names::KIND_NIC),
        names::ATTR_RDMA
    );
    [
        (names::DEVICE_CLASS_GPU, gpu),
        (names::DEVICE_CLASS_NIC, nic),
    ]
    .into_iter()
    .map(|(name, expression)| DeviceClass {
        metadata: ObjectMeta {
            name: Some(name.to_string()),
            labels: Some(BTreeMap::from([(
                names::LABEL_MANAGED_BY.to_string(),
                names::MANAGED_BY_VALUE.to_string(),
            )])),
            ..Default::default()
        },
        spec: DeviceClassSpec {
            selectors: Some(vec![DeviceSelector {
                cel: Some(CELDeviceSelector { expression }),
            }]),
            ..Default::default()
        },
    })
    .collect()
}

/// Whether `current` says what `desired` says in the fields the controller applies (the
/// selectors and the managed-by label); fields others add stay theirs, as SSA intends.
pub fn class_matches(current: &DeviceClass, desired: &DeviceClass) -> bool {
    let label = |c: &DeviceClass| {
        c.metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(names::LABEL_MANAGED_BY))
            .cloned()
    };
    current.spec.selectors == desired.spec.selectors && label(current) == label(desired)
}

/// Server-side applies `desired` (forced: a hand edit of our fields is taken back).
pub async fn apply_class(api: &Api<DeviceClass>, desired: &DeviceClass) -> Result<(), kube::Error> {
    let name = desired.metadata.name.clone().unwrap_or_default();
    let mut body = serde_json::to_value(desired).map_err(kube::Error::SerdeError)?;
    body["apiVersion"] = "resource.k8s.io/v1".into();
    body["kind"] = "DeviceClass".into();
    let params = PatchParams::apply(names::CONTROLLER_FIELD_MANAGER).force();
    api.patch(&name, &params, &Patch::Apply(&body)).await?;
    Ok(())
}

/// Reads each of our classes and applies those that are missing or differ; the names of the
/// classes applied, or the class that failed and why.
pub async fn ensure_classes(
    api: &Api<DeviceClass>,
    driver: &str,
) -> Result<Vec<String>, (String, kube::Error)> {
    let mut applied = Vec::new();
    for desired in desired_classes(driver) {
        let name = desired.metadata.name.clone().unwrap_or_default();
        let current = api.get_opt(&name).await.map_err(|e| (name.clone(), e))?;
        if current.is_some_and(|c| class_matches(&c, &desired)) {
            continue;
        }
        apply_class(api, &desired)
            .await
            .map_err(|e| (name.clone(), e))?;
        applied.push(name);
    }
    Ok(applied)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes_select_our_driver_and_kind() {
        let classes = desired_classes("tandem.dev");
        let expr = |i: usize| {
            classes[i].spec.selectors.as_ref().unwrap()[0]
                .cel
                .as_ref()
                .unwrap()
                .expression
                .clone()
        };
        assert_eq!(classes[0].metadata.name.as_deref(), Some("gpu.tandem.dev"));
        assert_eq!(
            expr(0),
            r#"device.driver == "tandem.dev" && device.attributes["tandem.dev"].kind == "gpu""#
        );
        assert!(
            expr(1).ends_with(r#".kind == "nic" && device.attributes["tandem.dev"].rdma == true"#)
        );
        assert!(class_matches(&classes[0], &classes[0]));
        assert!(!class_matches(&classes[1], &classes[0]));
        let mut edited = classes[0].clone();
        edited.metadata.labels = None;
        assert!(!class_matches(&edited, &classes[0]));
    }
}

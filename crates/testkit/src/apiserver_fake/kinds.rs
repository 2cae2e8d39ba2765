//! The resource kinds the fake serves and what the real apiserver does differently per kind:
//! scope, status subresource, generation tracking and the extra field selectors it allows.

/// One served resource, as the apiserver's REST mapping describes it.
#[derive(Debug)]
pub(crate) struct KindInfo {
    /// API group; empty for the core group.
    pub group: &'static str,
    pub version: &'static str,
    pub plural: &'static str,
    pub kind: &'static str,
    pub namespaced: bool,
    /// `/status` exists; writes to the main resource then leave `.status` alone.
    pub status_subresource: bool,
    /// Create keeps `.status` (nodes register with their status; claims start empty).
    pub status_on_create: bool,
    /// `metadata.generation` is set on create and bumped when anything but metadata/status changes.
    pub tracks_generation: bool,
    /// Field selectors beyond `metadata.name` and `metadata.namespace`.
    pub field_selectors: &'static [&'static str],
    pub validation: Validation,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Validation {
    ResourceSlice,
    ResourceClaim,
    DeviceClass,
    ConfigMap,
    MetadataOnly,
}

impl KindInfo {
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.to_string()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    /// `resourceslices.resource.k8s.io`, or just `configmaps` in the core group, as error
    /// messages spell the resource.
    pub fn qualified_resource(&self) -> String {
        if self.group.is_empty() {
            self.plural.to_string()
        } else {
            format!("{}.{}", self.plural, self.group)
        }
    }

    /// `ResourceSlice.resource.k8s.io`, as 422 messages spell the kind.
    pub fn qualified_kind(&self) -> String {
        if self.group.is_empty() {
            self.kind.to_string()
        } else {
            format!("{}.{}", self.kind, self.group)
        }
    }
}

const EVENT_FIELDS: &[&str] = &[
    "involvedObject.kind",
    "involvedObject.namespace",
    "involvedObject.name",
    "involvedObject.uid",
    "involvedObject.apiVersion",
    "involvedObject.resourceVersion",
    "involvedObject.fieldPath",
    "reason",
    "reportingComponent",
    "source",
    "type",
];

pub(crate) const KINDS: &[KindInfo] = &[
    KindInfo {
        group: "resource.k8s.io",
        version: "v1",
        plural: "resourceslices",
        kind: "ResourceSlice",
        namespaced: false,
        status_subresource: false,
        status_on_create: false,
        tracks_generation: true,
        field_selectors: &["spec.nodeName", "spec.driver"],
        validation: Validation::ResourceSlice,
    },
    KindInfo {
        group: "resource.k8s.io",
        version: "v1",
        plural: "resourceclaims",
        kind: "ResourceClaim",
        namespaced: true,
        status_subresource: true,
        status_on_create: false,
        tracks_generation: true,
        field_selectors: &[],
        validation: Validation::ResourceClaim,
    },
    KindInfo {
        group: "resource.k8s.io",
        version: "v1",
        plural: "resourceclaimtemplates",
        kind: "ResourceClaimTemplate",
        namespaced: true,
        status_subresource: false,
        status_on_create: false,
        tracks_generation: true,
        field_selectors: &[],
        validation: Validation::MetadataOnly,
    },
    KindInfo {
        group: "resource.k8s.io",
        version: "v1",
        plural: "deviceclasses",
        kind: "DeviceClass",
        namespaced: false,
        status_subresource: false,
        status_on_create: false,
        tracks_generation: true,
        field_selectors: &[],
        validation: Validation::DeviceClass,
    },
    KindInfo {
        group: "",
        version: "v1",
        plural: "nodes",
        kind: "Node",
        namespaced: false,
        status_subresource: true,
        status_on_create: true,
        tracks_generation: false,
        field_selectors: &["spec.unschedulable"],
        validation: Validation::MetadataOnly,
    },
    KindInfo {
        group: "",
        version: "v1",
        plural: "configmaps",
        kind: "ConfigMap",
        namespaced: true,
        status_subresource: false,
        status_on_create: false,
        tracks_generation: false,
        field_selectors: &[],
        validation: Validation::ConfigMap,
    },
    KindInfo {
        group: "",
        version: "v1",
        plural: "events",
        kind: "Event",
        namespaced: true,
        status_subresource: false,
        status_on_create: false,
        tracks_generation: false,
        field_selectors: EVENT_FIELDS,
        validation: Validation::MetadataOnly,
    },
    KindInfo {
        group: "events.k8s.io",
        version: "v1",
        plural: "events",
        kind: "Event",
        namespaced: true,
        status_subresource: false,
        status_on_create: false,
        tracks_generation: false,
        field_selectors: &[],
        validation: Validation::MetadataOnly,
    },
    KindInfo {
        group: "coordination.k8s.io",
        version: "v1",
        plural: "leases",
        kind: "Lease",
        namespaced: true,
        status_subresource: false,
        status_on_create: false,
        tracks_generation: false,
        field_selectors: &[],
        validation: Validation::MetadataOnly,
    },
];

/// The index into [`KINDS`] serving `group/version/plural`.
pub(crate) fn find_kind(group: &str, version: &str, plural: &str) -> Option<usize> {
    KINDS
        .iter()
        .position(|k| k.group == group && k.version == version && k.plural == plural)
}

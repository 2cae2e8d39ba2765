//! The installation manifests under deploy/: every kustomize overlay renders with
//! `kubectl kustomize`, parses into the typed k8s-openapi structs without losing a field, holds
//! what the kubelet, the node plugin and the controller need, and its RBAC grants exactly the
//! API calls the code makes (nothing missing, nothing extra).
//!
//! Needs kubectl on PATH (or $KUBECTL): without it the tests print why they skip, except under
//! CI=true, where they fail. hack/ci-tools.sh installs it.

use k8s_openapi::Resource;
use k8s_openapi::api::admissionregistration::v1::{
    ValidatingAdmissionPolicy, ValidatingAdmissionPolicyBinding,
};
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{
    ConfigMap, Container, EnvVar, Event, Namespace, Node, PodSpec, ServiceAccount,
};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, PolicyRule, Role, RoleBinding};
use k8s_openapi::api::resource::v1::{DeviceClass, ResourceClaim, ResourceSlice};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde::Deserialize;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use tandem::controller::index::SliceRef;
use tandem::names;

const OVERLAYS: &[&str] = &[
    "deploy/base",
    "deploy/overlays/production",
    "deploy/overlays/kind",
];
const NODE_PLUGIN: &str = "tandem-node";
/// Overlays that move exclusively allocated NICs into pods (the plugin has `--hook-path`);
/// the others hand NICs out as RDMA char devices only.
const EXCLUSIVE_ATTACH_OVERLAYS: &[&str] = &["deploy/overlays/production"];
/// What moving a netdev into a pod's namespace takes: SYS_ADMIN to setns(2) there, NET_ADMIN
/// to move and configure the link (docs/install.md explains both).
const EXCLUSIVE_ATTACH_CAPABILITIES: &[&str] = &["NET_ADMIN", "SYS_ADMIN"];
const CONTROLLER: &str = "tandem-controller";

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn kubectl() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("KUBECTL") {
        return Some(PathBuf::from(path));
    }
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|dir| dir.join("kubectl"))
        .find(|candidate| candidate.is_file())
}

/// None (after saying why) when kubectl is missing outside CI.
fn kubectl_or_skip(test: &str) -> Option<PathBuf> {
    let found = kubectl();
    if found.is_none() {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "kubectl is not on PATH and CI=true: run hack/ci-tools.sh first"
        );
        eprintln!("SKIPPED {test}: kubectl is not on PATH (hack/ci-tools.sh installs it)");
    }
    found
}

/// Every object of one rendered overlay, typed.
#[derive(Default)]
struct Rendered {
    overlay: String,
    namespaces: Vec<Namespace>,
    service_accounts: Vec<ServiceAccount>,
    daemon_sets: Vec<DaemonSet>,
    deployments: Vec<Deployment>,
    cluster_roles: Vec<ClusterRole>,
    cluster_role_bindings: Vec<ClusterRoleBinding>,
    roles: Vec<Role>,
    role_bindings: Vec<RoleBinding>,
    policies: Vec<ValidatingAdmissionPolicy>,
    policy_bindings: Vec<ValidatingAdmissionPolicyBinding>,
    device_classes: Vec<DeviceClass>,
}

/// The first place where `a` and `b` differ, as a JSON path.
fn first_difference(a: &Value, b: &Value, path: &str) -> Option<String> {
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            let keys: BTreeSet<&String> = x.keys().chain(y.keys()).collect();
            keys.into_iter().find_map(|k| match (x.get(k), y.get(k)) {
                (Some(p), Some(q)) => first_difference(p, q, &format!("{path}.{k}")),
                _ => Some(format!("{path}.{k}")),
            })
        }
        (Value::Array(x), Value::Array(y)) if x.len() == y.len() => x
            .iter()
            .zip(y)
            .enumerate()
            .find_map(|(i, (p, q))| first_difference(p, q, &format!("{path}[{i}]"))),
        _ if a == b => None,
        _ => Some(path.to_string()),
    }
}

/// Parses `doc` as `T` and serialises it back: a field the struct does not know (a typo, a
/// field at the wrong level) is dropped by serde, so the round trip shows it.
fn typed<T: DeserializeOwned + Serialize>(overlay: &str, doc: &Value) -> T {
    let name = doc["metadata"]["name"].as_str().unwrap_or("?").to_string();
    let kind = doc["kind"].as_str().unwrap_or("?").to_string();
    let object: T = serde_json::from_value(doc.clone())
        .unwrap_or_else(|e| panic!("{overlay}: {kind} {name} does not parse: {e}"));
    let back = serde_json::to_value(&object).unwrap();
    if let Some(path) = first_difference(doc, &back, "") {
        panic!("{overlay}: {kind} {name}: field {path} is not part of the {kind} schema");
    }
    object
}

fn render(overlay: &str, kubectl: &Path) -> Rendered {
    let output = Command::new(kubectl)
        .arg("kustomize")
        .arg(repo_root().join(overlay))
        .output()
        .unwrap_or_else(|e| panic!("running {} kustomize: {e}", kubectl.display()));
    assert!(
        output.status.success(),
        "kubectl kustomize {overlay} failed:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let text = String::from_utf8(output.stdout).unwrap();
    let mut rendered = Rendered {
        overlay: overlay.to_string(),
        ..Default::default()
    };
    for document in serde_norway::Deserializer::from_str(&text) {
        let doc = Value::deserialize(document)
            .unwrap_or_else(|e| panic!("{overlay}: rendered YAML does not parse: {e}"));
        if doc.is_null() {
            continue;
        }
        let api_version = doc["apiVersion"].as_str().unwrap_or_default();
        let kind = doc["kind"].as_str().unwrap_or_default();
        let r = &mut rendered;
        match (api_version, kind) {
            ("v1", "Namespace") => r.namespaces.push(typed(overlay, &doc)),
            ("v1", "ServiceAccount") => r.service_accounts.push(typed(overlay, &doc)),
            ("apps/v1", "DaemonSet") => r.daemon_sets.push(typed(overlay, &doc)),
            ("apps/v1", "Deployment") => r.deployments.push(typed(overlay, &doc)),
            ("rbac.authorization.k8s.io/v1", "ClusterRole") => {
                r.cluster_roles.push(typed(overlay, &doc))
            }
            ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding") => {
                r.cluster_role_bindings.push(typed(overlay, &doc))
            }
            ("rbac.authorization.k8s.io/v1", "Role") => r.roles.push(typed(overlay, &doc)),
            ("rbac.authorization.k8s.io/v1", "RoleBinding") => {
                r.role_bindings.push(typed(overlay, &doc))
            }
            ("admissionregistration.k8s.io/v1", "ValidatingAdmissionPolicy") => {
                r.policies.push(typed(overlay, &doc))
            }
            ("admissionregistration.k8s.io/v1", "ValidatingAdmissionPolicyBinding") => {
                r.policy_bindings.push(typed(overlay, &doc))
            }
            ("resource.k8s.io/v1", "DeviceClass") => r.device_classes.push(typed(overlay, &doc)),
            _ => panic!(
                "{overlay}: {api_version} {kind} is not a kind these tests know; add it to render()"
            ),
        }
    }
    rendered
}

/// Every overlay rendered once for all tests, or None when kubectl is missing outside CI.
fn render_all(test: &str) -> Option<&'static [Rendered]> {
    static RENDERED: OnceLock<Option<Vec<Rendered>>> = OnceLock::new();
    let kubectl = kubectl_or_skip(test)?;
    RENDERED
        .get_or_init(|| Some(OVERLAYS.iter().map(|o| render(o, &kubectl)).collect()))
        .as_deref()
}

impl Rendered {
    fn daemon_set(&self, name: &str) -> &DaemonSet {
        self.daemon_sets
            .iter()
            .find(|d| d.metadata.name.as_deref() == Some(name))
            .unwrap_or_else(|| panic!("{}: no DaemonSet {name}", self.overlay))
    }

    fn deployment(&self, name: &str) -> &Deployment {
        self.deployments
            .iter()
            .find(|d| d.metadata.name.as_deref() == Some(name))
            .unwrap_or_else(|| panic!("{}: no Deployment {name}", self.overlay))
    }

    /// (namespace, name) of the service account a pod spec runs as; it must be rendered too.
    fn identity(&self, namespace: &str, pod: &PodSpec) -> (String, String) {
        let name = pod
            .service_account_name
            .clone()
            .unwrap_or_else(|| panic!("{}: a pod without serviceAccountName", self.overlay));
        assert!(
            self.service_accounts.iter().any(|sa| {
                sa.metadata.name.as_deref() == Some(name.as_str())
                    && sa.metadata.namespace.as_deref() == Some(namespace)
            }),
            "{}: ServiceAccount {namespace}/{name} is not rendered",
            self.overlay
        );
        (namespace.to_string(), name)
    }

    fn node_plugin(&self) -> (&DaemonSet, &PodSpec, &Container) {
        let ds = self.daemon_set(NODE_PLUGIN);
        let pod = ds.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
        assert_eq!(
            pod.containers.len(),
            1,
            "{}: one plugin container",
            self.overlay
        );
        (ds, pod, &pod.containers[0])
    }

    fn controller(&self) -> (&Deployment, &PodSpec, &Container) {
        let deployment = self.deployment(CONTROLLER);
        let pod = deployment
            .spec
            .as_ref()
            .unwrap()
            .template
            .spec
            .as_ref()
            .unwrap();
        assert_eq!(
            pod.containers.len(),
            1,
            "{}: one controller container",
            self.overlay
        );
        (deployment, pod, &pod.containers[0])
    }
}

fn env<'a>(container: &'a Container, name: &str) -> Option<&'a EnvVar> {
    container.env.iter().flatten().find(|e| e.name == name)
}

fn field_ref(container: &Container, name: &str) -> Option<String> {
    env(container, name)?
        .value_from
        .as_ref()?
        .field_ref
        .as_ref()
        .map(|f| f.field_path.clone())
}

fn plain_env(container: &Container, name: &str) -> Option<String> {
    env(container, name)?.value.clone()
}

/// (hostPath, readOnly) of the volume mounted at `mount_path`, or None.
fn host_mount(pod: &PodSpec, container: &Container, mount_path: &str) -> Option<(String, bool)> {
    let mount = container
        .volume_mounts
        .iter()
        .flatten()
        .find(|m| m.mount_path == mount_path)?;
    let volume = pod
        .volumes
        .iter()
        .flatten()
        .find(|v| v.name == mount.name)?;
    let host = volume.host_path.as_ref()?;
    Some((host.path.clone(), mount.read_only.unwrap_or(false)))
}

/// The hostPath mount whose mount path is the longest prefix of `path` inside the container.
fn host_mount_holding(pod: &PodSpec, container: &Container, path: &str) -> Option<(String, bool)> {
    container
        .volume_mounts
        .iter()
        .flatten()
        .filter(|m| path == m.mount_path || path.starts_with(&format!("{}/", m.mount_path)))
        .max_by_key(|m| m.mount_path.len())
        .and_then(|m| host_mount(pod, container, &m.mount_path))
}

/// Where `path` inside the container lies on the host, through its hostPath mounts.
fn host_path_of(pod: &PodSpec, container: &Container, path: &str) -> Option<String> {
    let mount = container
        .volume_mounts
        .iter()
        .flatten()
        .filter(|m| path == m.mount_path || path.starts_with(&format!("{}/", m.mount_path)))
        .max_by_key(|m| m.mount_path.len())?;
    let (host, _) = host_mount(pod, container, &mount.mount_path)?;
    Some(format!("{host}{}", &path[mount.mount_path.len()..]))
}

/// The value of `--flag=value` or `--flag value` in the container's args.
fn flag_value<'a>(container: &'a Container, flag: &str) -> Option<&'a str> {
    let args = container.args.as_deref().unwrap_or_default();
    args.iter().enumerate().find_map(|(i, arg)| {
        if let Some(value) = arg.strip_prefix(flag).and_then(|r| r.strip_prefix('=')) {
            Some(value)
        } else if arg == flag {
            args.get(i + 1).map(String::as_str)
        } else {
            None
        }
    })
}

/// Capabilities a container adds, as a set.
fn added_capabilities(container: &Container) -> BTreeSet<&str> {
    container
        .security_context
        .as_ref()
        .and_then(|s| s.capabilities.as_ref())
        .and_then(|c| c.add.as_ref())
        .into_iter()
        .flatten()
        .map(String::as_str)
        .collect()
}

/// The init containers that run `tandem hook install`, with the path each installs to.
fn hook_installers(pod: &PodSpec) -> Vec<(&Container, Option<&str>)> {
    pod.init_containers
        .iter()
        .flatten()
        .filter(|c| {
            c.args
                .as_deref()
                .unwrap_or_default()
                .starts_with(&["hook".into(), "install".into()])
        })
        .map(|c| (c, flag_value(c, "--to")))
        .collect()
}

#[test]
fn every_overlay_renders_into_typed_objects_in_existing_namespaces() {
    let Some(overlays) = render_all("every_overlay_renders") else {
        return;
    };
    for r in overlays {
        let namespaces: BTreeSet<&str> = r
            .namespaces
            .iter()
            .filter_map(|n| n.metadata.name.as_deref())
            .chain(["default"])
            .collect();
        assert!(
            namespaces.contains(names::DEFAULT_CONTROLLER_NAMESPACE),
            "{}",
            r.overlay
        );
        let namespaced = r
            .service_accounts
            .iter()
            .map(|o| &o.metadata)
            .chain(r.daemon_sets.iter().map(|o| &o.metadata))
            .chain(r.deployments.iter().map(|o| &o.metadata))
            .chain(r.roles.iter().map(|o| &o.metadata))
            .chain(r.role_bindings.iter().map(|o| &o.metadata));
        for meta in namespaced {
            let ns = meta
                .namespace
                .as_deref()
                .unwrap_or_else(|| panic!("{}: {:?} has no namespace", r.overlay, meta.name));
            assert!(
                namespaces.contains(ns),
                "{}: namespace {ns} is not created",
                r.overlay
            );
        }
    }
}

#[test]
fn node_plugin_mounts_the_kubelet_cdi_and_state_directories_at_their_host_paths() {
    let Some(overlays) = render_all("node_plugin_mounts") else {
        return;
    };
    // The defaults the plugin uses when the DaemonSet passes no flag for them.
    let prepare = tandem::prepare::PrepareConfig::new(names::DEFAULT_DRIVER_NAME, "node");
    let same_inside_and_out = [
        names::DEFAULT_KUBELET_PLUGINS_DIR.to_string(),
        names::DEFAULT_KUBELET_REGISTRY_DIR.to_string(),
        prepare.cdi_dir.display().to_string(),
        prepare.state_dir.display().to_string(),
        prepare.topology_dir.display().to_string(),
    ];
    for r in overlays {
        let (_, pod, container) = r.node_plugin();
        assert_eq!(
            container.args.as_ref().unwrap()[0],
            "plugin",
            "{}",
            r.overlay
        );
        for path in &same_inside_and_out {
            let (host, read_only) = host_mount(pod, container, path)
                .unwrap_or_else(|| panic!("{}: nothing mounted at {path}", r.overlay));
            assert_eq!(
                &host, path,
                "{}: {path} must be the same host path",
                r.overlay
            );
            assert!(!read_only, "{}: the plugin writes {path}", r.overlay);
        }
        // Other vendors' CDI specs are read where the runtime reads them: the same host path,
        // and read-only unless it is our own spec directory.
        for dir in tandem::prepare::vendor_cdi::DEFAULT_VENDOR_CDI_DIRS {
            let (host, read_only) = host_mount(pod, container, dir)
                .unwrap_or_else(|| panic!("{}: vendor CDI dir {dir} is not mounted", r.overlay));
            assert_eq!(&host, dir, "{}", r.overlay);
            let ours = Path::new(dir) == prepare.cdi_dir;
            assert_eq!(
                read_only, !ours,
                "{}: {dir} read-only unless ours",
                r.overlay
            );
        }
        // Discovery roots: env of the plugin, each inside a read-only host mount.
        for variable in ["TANDEM_SYSFS_ROOT", "TANDEM_DEV_ROOT"] {
            let root = plain_env(container, variable)
                .unwrap_or_else(|| panic!("{}: {variable} is not set", r.overlay));
            let (_, read_only) = host_mount_holding(pod, container, &root)
                .unwrap_or_else(|| panic!("{}: {variable}={root} is not a host mount", r.overlay));
            assert!(read_only, "{}: {root} must be mounted read-only", r.overlay);
        }
        assert_eq!(
            field_ref(container, "NODE_NAME").as_deref(),
            Some("spec.nodeName"),
            "{}",
            r.overlay
        );
        assert_eq!(
            field_ref(container, "POD_UID").as_deref(),
            Some("metadata.uid"),
            "{}: POD_UID turns on the per-pod sockets that maxSurge needs",
            r.overlay
        );
        // The attach hook's guard against moving the node's own interface reads NODE_IP
        // (flag --node-ip, env NODE_IP); a literal address would be wrong on every other node.
        assert_eq!(
            field_ref(container, "NODE_IP").as_deref(),
            Some("status.hostIP"),
            "{}",
            r.overlay
        );
        if let Some(node_ip) = flag_value(container, "--node-ip") {
            assert_eq!(node_ip, "$(NODE_IP)", "{}", r.overlay);
        }
    }
}

#[test]
fn node_plugin_runs_on_accelerator_nodes_only() {
    let Some(overlays) = render_all("node_plugin_accelerator_nodes") else {
        return;
    };
    for r in overlays {
        let (_, pod, container) = r.node_plugin();
        let terms = &pod
            .affinity
            .as_ref()
            .and_then(|a| a.node_affinity.as_ref())
            .and_then(|a| {
                a.required_during_scheduling_ignored_during_execution
                    .as_ref()
            })
            .unwrap_or_else(|| panic!("{}: no required node affinity", r.overlay))
            .node_selector_terms;
        let keys: BTreeSet<&str> = terms
            .iter()
            .flat_map(|t| t.match_expressions.iter().flatten())
            .map(|e| e.key.as_str())
            .collect();
        for key in [
            "feature.node.kubernetes.io/pci-10de.present",
            "feature.node.kubernetes.io/pci-1002.present",
            "tandem.dev/accelerators",
        ] {
            assert!(
                keys.contains(key),
                "{}: node affinity lacks {key}",
                r.overlay
            );
        }

        let resources = container.resources.as_ref().unwrap();
        let requests = resources.requests.as_ref().unwrap();
        assert!(requests.contains_key("cpu") && requests.contains_key("memory"));
        assert!(resources.limits.as_ref().unwrap().contains_key("memory"));
    }
}

/// The image's entrypoint binary (`ENTRYPOINT ["/tandem"]` in the Dockerfile): exec probes
/// bypass the entrypoint and must name it.
fn image_binary() -> String {
    let text = std::fs::read_to_string(repo_root().join("Dockerfile")).unwrap();
    let line = text
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix("ENTRYPOINT"))
        .expect("the Dockerfile has an ENTRYPOINT");
    let words: Vec<String> = serde_json::from_str(line.trim()).expect("ENTRYPOINT in JSON form");
    words[0].clone()
}

#[test]
fn node_plugin_surge_pod_fits_beside_the_old_one_and_probes_itself() {
    let Some(overlays) = render_all("node_plugin_surge") else {
        return;
    };
    let binary = image_binary();
    for r in overlays {
        let (ds, pod, container) = r.node_plugin();
        let rolling = ds
            .spec
            .as_ref()
            .and_then(|s| s.update_strategy.as_ref())
            .filter(|s| s.type_.as_deref() == Some("RollingUpdate"))
            .and_then(|s| s.rolling_update.as_ref())
            .unwrap_or_else(|| panic!("{}: no rolling update", r.overlay));
        assert_eq!(
            rolling.max_surge,
            Some(IntOrString::Int(1)),
            "{}",
            r.overlay
        );
        assert_eq!(
            rolling.max_unavailable,
            Some(IntOrString::Int(0)),
            "{}",
            r.overlay
        );
        // With maxSurge the old and the new pod run on one node at once. On the host network
        // every declared port is a hostPort, which the scheduler gives to one pod per node:
        // the surge pod would stay Pending and the rollout hang.
        assert_eq!(pod.host_network, Some(true), "{}", r.overlay);
        for c in pod
            .containers
            .iter()
            .chain(pod.init_containers.iter().flatten())
        {
            assert!(
                c.ports.as_deref().unwrap_or_default().is_empty(),
                "{}: container {} declares ports {:?}, each a hostPort on the host network",
                r.overlay,
                c.name,
                c.ports
            );
        }

        // `tandem plugin --metrics-addr`: the node's port 9477 (shared by both pods through
        // SO_REUSEPORT) and a Unix socket of this pod's own.
        let addr_flag = flag_value(container, "--metrics-addr")
            .unwrap_or_else(|| panic!("{}: no --metrics-addr", r.overlay));
        let addrs = tandem::metrics_http::parse_listen_addrs(addr_flag)
            .unwrap_or_else(|e| panic!("{}: --metrics-addr: {e}", r.overlay));
        assert!(
            addrs.contains(&tandem::metrics_http::ListenAddr::Tcp(
                "0.0.0.0:9477".parse().unwrap()
            )),
            "{}: metrics are not on port 9477: {addr_flag}",
            r.overlay
        );
        let sockets: Vec<&Path> = addrs
            .iter()
            .filter_map(|a| match a {
                tandem::metrics_http::ListenAddr::Unix(path) => Some(path.as_path()),
                tandem::metrics_http::ListenAddr::Tcp(_) => None,
            })
            .collect();

        for (which, probe, path) in [
            ("readiness", &container.readiness_probe, "/readyz"),
            ("liveness", &container.liveness_probe, "/healthz"),
        ] {
            let probe = probe
                .as_ref()
                .unwrap_or_else(|| panic!("{}: no {which} probe", r.overlay));
            assert!(
                probe.http_get.is_none() && probe.tcp_socket.is_none() && probe.grpc.is_none(),
                "{}: the {which} probe must not go through the shared port",
                r.overlay
            );
            let command = probe
                .exec
                .as_ref()
                .and_then(|e| e.command.as_deref())
                .unwrap_or_else(|| panic!("{}: the {which} probe is not an exec probe", r.overlay));
            let (socket, probed) = match command {
                [bin, sub, flag, socket, probed]
                    if *bin == binary && sub == "probe" && flag == "--socket" =>
                {
                    (socket, probed)
                }
                _ => panic!(
                    "{}: {which} probe {command:?} is not `{binary} probe --socket SOCKET PATH`",
                    r.overlay
                ),
            };
            assert_eq!(probed, path, "{}: {which}", r.overlay);
            assert!(
                sockets.contains(&Path::new(socket)),
                "{}: the {which} probe asks {socket}, which --metrics-addr {addr_flag} does not serve",
                r.overlay
            );
            // The socket's directory is an emptyDir: per pod, so the two pods of a surge
            // never answer each other's probes (a hostPath would be shared).
            let mount = container
                .volume_mounts
                .iter()
                .flatten()
                .filter(|m| socket.starts_with(&format!("{}/", m.mount_path)))
                .max_by_key(|m| m.mount_path.len())
                .unwrap_or_else(|| panic!("{}: {socket} is on no volume", r.overlay));
            assert_ne!(mount.read_only, Some(true), "{}: {socket}", r.overlay);
            let volume = pod
                .volumes
                .iter()
                .flatten()
                .find(|v| v.name == mount.name)
                .unwrap();
            assert!(
                volume.empty_dir.is_some(),
                "{}: {socket} is on volume {}, not an emptyDir",
                r.overlay,
                volume.name
            );
        }
    }
}

#[test]
fn node_plugin_runs_unprivileged_with_no_capabilities_beyond_the_documented_ones() {
    let Some(overlays) = render_all("node_plugin_security") else {
        return;
    };
    for r in overlays {
        let (_, pod, plugin) = r.node_plugin();
        assert_ne!(
            pod.host_pid,
            Some(true),
            "{}: pod namespaces are found through /run/netns, not the host's /proc",
            r.overlay
        );
        let init_containers = pod.init_containers.iter().flatten();
        for container in std::iter::once(plugin).chain(init_containers) {
            let name = &container.name;
            let security = container
                .security_context
                .as_ref()
                .unwrap_or_else(|| panic!("{}: {name} has no securityContext", r.overlay));
            assert_ne!(security.privileged, Some(true), "{}: {name}", r.overlay);
            assert_eq!(
                security.allow_privilege_escalation,
                Some(false),
                "{}: {name}",
                r.overlay
            );
            assert_eq!(
                security.read_only_root_filesystem,
                Some(true),
                "{}: {name}",
                r.overlay
            );
            let capabilities = security.capabilities.as_ref().unwrap();
            assert_eq!(
                capabilities.drop.as_deref(),
                Some(&["ALL".to_string()][..]),
                "{}: {name}",
                r.overlay
            );
        }
        // Only the plugin of an overlay with exclusive attach adds capabilities, and then
        // exactly the two that moving a netdev into a pod takes.
        let attach_on = EXCLUSIVE_ATTACH_OVERLAYS.contains(&r.overlay.as_str());
        let expected: BTreeSet<&str> = if attach_on {
            EXCLUSIVE_ATTACH_CAPABILITIES.iter().copied().collect()
        } else {
            BTreeSet::new()
        };
        assert_eq!(
            added_capabilities(plugin),
            expected,
            "{}: plugin",
            r.overlay
        );
        for init in pod.init_containers.iter().flatten() {
            assert!(
                added_capabilities(init).is_empty(),
                "{}: init container {} adds capabilities",
                r.overlay,
                init.name
            );
        }
    }
}

#[test]
fn exclusive_attach_installs_the_hook_where_the_hook_path_points() {
    let Some(overlays) = render_all("exclusive_attach") else {
        return;
    };
    for r in overlays {
        let (_, pod, plugin) = r.node_plugin();
        let hook_path = flag_value(plugin, "--hook-path");
        let installers = hook_installers(pod);
        if !EXCLUSIVE_ATTACH_OVERLAYS.contains(&r.overlay.as_str()) {
            assert_eq!(hook_path, None, "{}: attach is off here", r.overlay);
            assert!(
                installers.is_empty(),
                "{}: installs a hook nothing runs",
                r.overlay
            );
            continue;
        }
        let hook_path =
            hook_path.unwrap_or_else(|| panic!("{}: the plugin has no --hook-path", r.overlay));
        assert!(hook_path.starts_with('/'), "{}: {hook_path}", r.overlay);

        // One init container copies the plugin's own binary to exactly that host path.
        let [(installer, target)] = installers.as_slice() else {
            panic!(
                "{}: {} hook install init containers",
                r.overlay,
                installers.len()
            );
        };
        assert_eq!(
            *target,
            Some(hook_path),
            "{}: the init container installs elsewhere than --hook-path",
            r.overlay
        );
        assert_eq!(
            installer.image, plugin.image,
            "{}: the hook must be the plugin's own version",
            r.overlay
        );
        let (host_dir, read_only) = host_mount_holding(pod, installer, hook_path)
            .unwrap_or_else(|| panic!("{}: {hook_path} is not in a hostPath mount", r.overlay));
        assert!(
            !read_only,
            "{}: the init container writes {host_dir}",
            r.overlay
        );
        assert_eq!(
            host_path_of(pod, installer, hook_path).as_deref(),
            Some(hook_path),
            "{}: --hook-path is a host path, so the install mount must be at the same path",
            r.overlay
        );
        let volume = pod
            .volumes
            .iter()
            .flatten()
            .find(|v| v.host_path.as_ref().is_some_and(|h| h.path == host_dir))
            .unwrap();
        assert_eq!(
            volume.host_path.as_ref().unwrap().type_.as_deref(),
            Some("DirectoryOrCreate"),
            "{}: a fresh node has no {host_dir} yet",
            r.overlay
        );

        // Releasing an interface enters the pod's namespace through its pin in the netns
        // directory, which appears after the plugin started: it needs host-to-container
        // propagation to be seen at all.
        let netns_dir =
            flag_value(plugin, "--netns-dir").unwrap_or(tandem::netattach::record::RUN_NETNS_DIR);
        let mount = plugin
            .volume_mounts
            .iter()
            .flatten()
            .find(|m| m.mount_path == netns_dir)
            .unwrap_or_else(|| panic!("{}: nothing mounted at {netns_dir}", r.overlay));
        assert_eq!(
            mount.mount_propagation.as_deref(),
            Some("HostToContainer"),
            "{}: {netns_dir}",
            r.overlay
        );
        assert_eq!(
            host_mount(pod, plugin, netns_dir)
                .map(|(host, _)| host)
                .as_deref(),
            Some(netns_dir),
            "{}: {netns_dir} must be the host's",
            r.overlay
        );
        assert_eq!(
            pod.host_network,
            Some(true),
            "{}: the default --host-netns /proc/self/ns/net is the host's only with hostNetwork",
            r.overlay
        );
    }
}

#[test]
fn controller_runs_two_non_root_replicas_with_health_probes() {
    let Some(overlays) = render_all("controller_replicas") else {
        return;
    };
    for r in overlays {
        let (deployment, pod, container) = r.controller();
        assert_eq!(
            deployment.metadata.namespace.as_deref(),
            Some(names::DEFAULT_CONTROLLER_NAMESPACE)
        );
        assert_eq!(
            deployment.spec.as_ref().unwrap().replicas,
            Some(2),
            "{}",
            r.overlay
        );
        assert_eq!(container.args.as_ref().unwrap()[0], "controller");
        let pod_security = pod.security_context.as_ref().unwrap();
        assert_eq!(pod_security.run_as_non_root, Some(true), "{}", r.overlay);
        assert_ne!(pod_security.run_as_user, Some(0), "{}", r.overlay);
        let security = container.security_context.as_ref().unwrap();
        assert_eq!(
            security.read_only_root_filesystem,
            Some(true),
            "{}",
            r.overlay
        );
        assert_eq!(
            security.allow_privilege_escalation,
            Some(false),
            "{}",
            r.overlay
        );
        assert_eq!(
            security.capabilities.as_ref().unwrap().drop.as_deref(),
            Some(&["ALL".to_string()][..])
        );
        assert_eq!(
            field_ref(container, "POD_NAMESPACE").as_deref(),
            Some("metadata.namespace")
        );
        assert_eq!(
            field_ref(container, "POD_NAME").as_deref(),
            Some("metadata.name")
        );

        let metrics_port = container
            .ports
            .iter()
            .flatten()
            .find(|p| p.container_port == 8080)
            .unwrap_or_else(|| panic!("{}: no container port 8080", r.overlay));
        for (which, probe) in [
            ("readiness", &container.readiness_probe),
            ("liveness", &container.liveness_probe),
        ] {
            let get = probe
                .as_ref()
                .and_then(|p| p.http_get.as_ref())
                .unwrap_or_else(|| panic!("{}: no {which} httpGet probe", r.overlay));
            assert_eq!(
                get.path.as_deref(),
                Some("/healthz"),
                "{}: {which}",
                r.overlay
            );
            let port_ok = match &get.port {
                IntOrString::Int(port) => *port == 8080,
                IntOrString::String(name) => metrics_port.name.as_deref() == Some(name.as_str()),
            };
            assert!(port_ok, "{}: {which} probe is not on port 8080", r.overlay);
        }
    }
}

#[test]
fn overlays_pick_the_image_they_promise() {
    let Some(overlays) = render_all("overlay_images") else {
        return;
    };
    for r in overlays {
        let (_, plugin_pod, plugin) = r.node_plugin();
        let containers = std::iter::once(plugin)
            .chain(plugin_pod.init_containers.iter().flatten())
            .chain([r.controller().2]);
        for container in containers {
            let image = container.image.as_deref().unwrap();
            match r.overlay.as_str() {
                "deploy/overlays/kind" => {
                    // up.sh loads tandem:dev into the nodes; there is nothing to pull.
                    assert_eq!(image, "tandem:dev");
                    assert_eq!(container.image_pull_policy.as_deref(), Some("Never"));
                }
                "deploy/overlays/production" => {
                    let (repository, tag) = image.rsplit_once(':').unwrap();
                    assert!(
                        repository.contains('/'),
                        "production image {image} has no registry"
                    );
                    assert_ne!(tag, "latest");
                }
                _ => assert_eq!(image, "tandem"),
            }
        }
    }
}

#[test]
fn kind_overlay_reads_the_fixture_tree_that_the_kind_cluster_mounts() {
    let Some(overlays) = render_all("kind_overlay_fixture") else {
        return;
    };
    let r = overlays
        .iter()
        .find(|r| r.overlay == "deploy/overlays/kind")
        .unwrap();
    let (_, pod, container) = r.node_plugin();
    let mut fixture_host_paths = BTreeSet::new();
    for (variable, leaf) in [
        ("TANDEM_SYSFS_ROOT", "sys"),
        ("TANDEM_PROC_ROOT", "proc"),
        ("TANDEM_DEV_ROOT", "dev"),
    ] {
        let root = plain_env(container, variable).unwrap();
        assert!(root.ends_with(&format!("/{leaf}")), "{variable}={root}");
        let (host, read_only) = host_mount_holding(pod, container, &root).unwrap();
        assert!(read_only);
        fixture_host_paths.insert(host);
    }
    assert_eq!(fixture_host_paths.len(), 1, "one fixture tree per node");

    // hack/kind/cluster.yaml must mount a fixture at that path on every labelled worker.
    let text = std::fs::read_to_string(repo_root().join("hack/kind/cluster.yaml")).unwrap();
    let config: Value = serde_norway::from_str(&text).unwrap();
    assert_eq!(config["apiVersion"], "kind.x-k8s.io/v1alpha4");
    let workers: Vec<&Value> = config["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|n| n["role"] == "worker")
        .collect();
    assert!(
        workers.len() >= 2,
        "the kind cluster has two fake GPU workers"
    );
    for worker in workers {
        assert_eq!(worker["labels"]["tandem.dev/accelerators"], "true");
        let mounts: Vec<&str> = worker["extraMounts"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|m| m["containerPath"].as_str())
            .collect();
        assert!(
            fixture_host_paths
                .iter()
                .all(|p| mounts.contains(&p.as_str())),
            "a worker does not mount {fixture_host_paths:?}"
        );
    }
}

#[test]
fn device_classes_say_what_the_controller_applies() {
    let Some(overlays) = render_all("device_classes") else {
        return;
    };
    let desired = tandem::controller::classes::desired_classes(names::DEFAULT_DRIVER_NAME);
    for r in overlays {
        assert_eq!(r.device_classes.len(), desired.len(), "{}", r.overlay);
        for want in &desired {
            let name = want.metadata.name.as_deref().unwrap();
            let shipped = r
                .device_classes
                .iter()
                .find(|c| c.metadata.name.as_deref() == Some(name))
                .unwrap_or_else(|| panic!("{}: DeviceClass {name} is not shipped", r.overlay));
            assert!(
                tandem::controller::classes::class_matches(shipped, want),
                "{}: DeviceClass {name} differs from src/controller/classes.rs:\n{:?}\n{:?}",
                r.overlay,
                shipped.spec.selectors,
                want.spec.selectors
            );
        }
    }
}

#[test]
fn admission_policy_limits_the_node_plugin_to_slices_of_its_own_node() {
    let Some(overlays) = render_all("admission_policy") else {
        return;
    };
    for r in overlays {
        let (ds, pod, _) = r.node_plugin();
        let (namespace, account) = r.identity(ds.metadata.namespace.as_deref().unwrap(), pod);
        let username = format!("system:serviceaccount:{namespace}:{account}");
        let policy = r
            .policies
            .iter()
            .find(|p| {
                p.spec.as_ref().is_some_and(|s| {
                    s.match_conditions
                        .iter()
                        .flatten()
                        .any(|c| c.expression.contains(&format!("\"{username}\"")))
                })
            })
            .unwrap_or_else(|| panic!("{}: no policy matches user {username}", r.overlay));
        let spec = policy.spec.as_ref().unwrap();
        assert_eq!(spec.failure_policy.as_deref(), Some("Fail"));
        let rules = spec
            .match_constraints
            .as_ref()
            .and_then(|m| m.resource_rules.as_ref())
            .unwrap();
        let covers = |operation: &str| {
            rules.iter().any(|rule| {
                rule.api_groups
                    .iter()
                    .flatten()
                    .any(|g| g == ResourceSlice::GROUP)
                    && rule
                        .resources
                        .iter()
                        .flatten()
                        .any(|res| res == ResourceSlice::URL_PATH_SEGMENT)
                    && rule.operations.iter().flatten().any(|o| o == operation)
            })
        };
        for operation in ["CREATE", "UPDATE", "DELETE"] {
            assert!(
                covers(operation),
                "{}: {operation} of slices is not checked",
                r.overlay
            );
        }
        let cel: String = spec
            .variables
            .iter()
            .flatten()
            .map(|v| v.expression.as_str())
            .chain(
                spec.validations
                    .iter()
                    .flatten()
                    .map(|v| v.expression.as_str()),
            )
            .collect::<Vec<_>>()
            .join("\n");
        assert!(cel.contains("authentication.kubernetes.io/node-name"));
        assert!(cel.contains("oldObject") && cel.contains("spec.nodeName"));

        let policy_name = policy.metadata.name.as_deref().unwrap();
        let binding = r
            .policy_bindings
            .iter()
            .find(|b| b.spec.as_ref().and_then(|s| s.policy_name.as_deref()) == Some(policy_name))
            .unwrap_or_else(|| panic!("{}: policy {policy_name} is not bound", r.overlay));
        let actions = binding
            .spec
            .as_ref()
            .unwrap()
            .validation_actions
            .as_ref()
            .unwrap();
        assert!(
            actions.iter().any(|a| a == "Deny"),
            "{}: binding only warns",
            r.overlay
        );
    }
}

#[test]
fn kind_scripts_parse() {
    let dir = repo_root().join("hack");
    let mut scripts = Vec::new();
    let mut pending = vec![dir];
    while let Some(dir) = pending.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                pending.push(path);
            } else if path.extension().is_some_and(|e| e == "sh") {
                scripts.push(path);
            }
        }
    }
    assert!(scripts.iter().any(|s| s.ends_with("kind/up.sh")));
    for script in scripts {
        let status = Command::new("bash")
            .arg("-n")
            .arg(&script)
            .status()
            .unwrap();
        assert!(status.success(), "bash -n {} failed", script.display());
    }
}

fn on_path(tool: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(tool).is_file()))
}

/// A kubectl stand-in for the kind scripts: logs every call to `calls.log` beside it and
/// answers the calls `case` lists (bash `case` patterns over the joined arguments) with the
/// given shell snippet; any other call fails loudly.
fn fake_kubectl(dir: &Path, answers: &[(&str, &str)]) {
    let mut script = String::from(
        "#!/usr/bin/env bash\nhere=\"$(dirname \"$0\")\"\nprintf '%s\\n' \"$*\" >> \"${here}/calls.log\"\ncase \"$*\" in\n",
    );
    for (pattern, answer) in answers {
        script.push_str(&format!("  {pattern}) {answer} ;;\n"));
    }
    script.push_str("  *) echo \"fake kubectl: unexpected call: $*\" >&2; exit 1 ;;\nesac\n");
    let path = dir.join("kubectl");
    std::fs::write(&path, script).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

/// Runs hack/kind/check.sh against the fake kubectl in `dir`: (success, stderr, calls).
fn run_kind_check(dir: &Path) -> (bool, String, String) {
    let path = std::env::join_paths(
        std::iter::once(dir.to_path_buf())
            .chain(std::env::split_paths(&std::env::var_os("PATH").unwrap())),
    )
    .unwrap();
    let output = Command::new("bash")
        .arg(repo_root().join("hack/kind/check.sh"))
        .env("PATH", path)
        .output()
        .unwrap();
    let calls = std::fs::read_to_string(dir.join("calls.log")).unwrap_or_default();
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
        calls,
    )
}

/// A cluster with a Tandem example pod (claim from a template, allocated by tandem.dev) and a
/// pod of another DRA driver (claim named directly), both running.
fn cluster_with_two_drivers(other_driver_only: bool) -> (Value, Value) {
    let mut claims = vec![serde_json::json!({
        "metadata": {"namespace": "default", "name": "other-gpu"},
        "status": {"allocation": {"devices": {"results": [
            {"request": "gpu", "driver": "gpu.example.com", "pool": "worker", "device": "gpu-0"}
        ]}}}
    })];
    let mut pods = vec![serde_json::json!({
        "metadata": {"namespace": "default", "name": "other"},
        "spec": {
            "nodeName": "worker",
            "resourceClaims": [{"name": "gpu", "resourceClaimName": "other-gpu"}],
            "containers": [{"name": "main", "resources": {"claims": [{"name": "gpu"}]}}]
        },
        "status": {"phase": "Running"}
    })];
    if !other_driver_only {
        claims.push(serde_json::json!({
            "metadata": {"namespace": "default", "name": "gpu-with-nic-pair-x7k2p"},
            "status": {"allocation": {"devices": {"results": [
                {"request": "gpu", "driver": "tandem.dev", "pool": "worker", "device": "gpu-0000-1b-00-0"},
                {"request": "nic", "driver": "tandem.dev", "pool": "worker", "device": "nic-0000-18-00-0"}
            ]}}}
        }));
        // An unallocated claim of a pending pod, and the sidecar without a claim: neither
        // is looked into.
        claims.push(serde_json::json!({
            "metadata": {"namespace": "default", "name": "pending-claim"}, "status": {}
        }));
        pods.push(serde_json::json!({
            "metadata": {"namespace": "default", "name": "gpu-with-nic"},
            "spec": {
                "nodeName": "worker",
                "resourceClaims": [{"name": "pair", "resourceClaimTemplateName": "gpu-with-nic"}],
                "containers": [
                    {"name": "main", "resources": {"claims": [{"name": "pair"}]}},
                    {"name": "sidecar"}
                ]
            },
            "status": {
                "phase": "Running",
                "resourceClaimStatuses": [{"name": "pair", "resourceClaimName": "gpu-with-nic-pair-x7k2p"}]
            }
        }));
    }
    (
        serde_json::json!({"items": claims}),
        serde_json::json!({"items": pods}),
    )
}

#[test]
fn kind_check_looks_only_at_pods_whose_claims_tandem_allocated() {
    if !on_path("jq") {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "jq is not on PATH and CI=true: run hack/ci-tools.sh first"
        );
        eprintln!("SKIPPED kind_check_looks_only_at_pods_whose_claims_tandem_allocated: no jq");
        return;
    }
    let pairs =
        r#"{"pairs":[{"gpu":"gpu-0000-1b-00-0","nic":"nic-0000-18-00-0","affinity":"PIX"}]}"#;
    for other_driver_only in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let (claims, pods) = cluster_with_two_drivers(other_driver_only);
        std::fs::write(dir.path().join("claims.json"), claims.to_string()).unwrap();
        std::fs::write(dir.path().join("pods.json"), pods.to_string()).unwrap();
        std::fs::write(dir.path().join("pairs.json"), pairs).unwrap();
        let exec = "-n default exec gpu-with-nic -c main --";
        fake_kubectl(
            dir.path(),
            &[
                (
                    "'--context kind-tandem get resourceclaims -A -o json'",
                    "cat \"${here}/claims.json\"",
                ),
                (
                    "'--context kind-tandem get pods -A -o json'",
                    "cat \"${here}/pods.json\"",
                ),
                (
                    &format!("'--context kind-tandem {exec} printenv TANDEM_PAIRS'"),
                    "echo gpu-0000-1b-00-0=nic-0000-18-00-0:PIX",
                ),
                (
                    &format!("'--context kind-tandem {exec} printenv TANDEM_NICS'"),
                    "echo nic-0000-18-00-0",
                ),
                (
                    &format!("'--context kind-tandem {exec} cat /var/run/tandem/topology.json'"),
                    "cat \"${here}/pairs.json\"",
                ),
                (
                    "'--context kind-tandem -n tandem-system get pods '*'spec.nodeName=worker'*",
                    "printf tandem-node-x",
                ),
                (
                    "'--context kind-tandem -n tandem-system exec tandem-node-x -- /tandem topo -o json'",
                    "cat \"${here}/pairs.json\"",
                ),
            ],
        );
        let (ok, stderr, calls) = run_kind_check(dir.path());
        assert!(
            !calls.contains(" other "),
            "check.sh looked into the other driver's pod:\n{calls}"
        );
        assert!(!calls.contains("sidecar"), "{calls}");
        if other_driver_only {
            assert!(!ok, "{stderr}");
            assert!(
                stderr.contains("no running pod uses a ResourceClaim allocated by tandem.dev"),
                "{stderr}"
            );
        } else {
            assert!(ok, "check.sh failed:\n{stderr}\ncalls:\n{calls}");
            assert!(
                stderr.contains("ok   default/gpu-with-nic [main] on worker"),
                "{stderr}"
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Uninstall: hack/uninstall.sh and the per-node cleanup it runs.

const HOST_CLEANUP: &str = "deploy/uninstall/host-cleanup.yaml";

/// Every path under `root` (files, sockets, directories), relative to it, as "/a/b".
fn tree(root: &Path) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut pending = vec![root.to_path_buf()];
    while let Some(dir) = pending.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            out.insert(format!("/{}", path.strip_prefix(root).unwrap().display()));
            if std::fs::symlink_metadata(&path).unwrap().is_dir() {
                pending.push(path);
            }
        }
    }
    out
}

/// Creates `path` (absolute, as on the host) under `root`: a Unix socket for `*.sock`, else a
/// small file, with its parent directories.
fn plant(root: &Path, path: &str) {
    let at = root.join(path.trim_start_matches('/'));
    std::fs::create_dir_all(at.parent().unwrap()).unwrap();
    if path.ends_with(".sock") {
        // Bound and dropped: the socket file stays, as after a killed plugin. Bound at a
        // short path and moved, because a socket path has at most 107 bytes.
        let short = root.join("s.sock");
        drop(std::os::unix::net::UnixListener::bind(&short).unwrap());
        std::fs::rename(&short, &at).unwrap();
    } else {
        std::fs::write(&at, b"x").unwrap();
    }
}

#[test]
fn host_cleanup_removes_exactly_what_the_node_plugin_leaves_on_a_node() {
    let text = std::fs::read_to_string(repo_root().join(HOST_CLEANUP)).unwrap();
    let mut namespaces: Vec<Namespace> = Vec::new();
    let mut daemon_sets: Vec<DaemonSet> = Vec::new();
    for document in serde_norway::Deserializer::from_str(&text) {
        let doc = Value::deserialize(document).unwrap();
        match (doc["apiVersion"].as_str(), doc["kind"].as_str()) {
            (Some("v1"), Some("Namespace")) => namespaces.push(typed(HOST_CLEANUP, &doc)),
            (Some("apps/v1"), Some("DaemonSet")) => daemon_sets.push(typed(HOST_CLEANUP, &doc)),
            other => panic!("{HOST_CLEANUP}: unexpected object {other:?}"),
        }
    }
    let [namespace] = &namespaces[..] else {
        panic!("{HOST_CLEANUP}: one Namespace");
    };
    let [ds] = &daemon_sets[..] else {
        panic!("{HOST_CLEANUP}: one DaemonSet");
    };
    // Its own namespace (tandem-system is gone by then), which allows hostPath volumes, and
    // the names hack/uninstall.sh waits for and deletes.
    let namespace_name = namespace.metadata.name.as_deref().unwrap();
    assert_ne!(namespace_name, names::DEFAULT_CONTROLLER_NAMESPACE);
    assert_eq!(ds.metadata.namespace.as_deref(), Some(namespace_name));
    assert_eq!(
        namespace
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get("pod-security.kubernetes.io/enforce"))
            .map(String::as_str),
        Some("privileged")
    );
    let script = std::fs::read_to_string(repo_root().join("hack/uninstall.sh")).unwrap();
    for name in [
        HOST_CLEANUP,
        namespace_name,
        ds.metadata.name.as_deref().unwrap(),
    ] {
        assert!(
            script.contains(name),
            "hack/uninstall.sh does not use {name}"
        );
    }

    let pod = ds.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
    assert!(
        pod.tolerations
            .iter()
            .flatten()
            .any(|t| t.key.is_none() && t.operator.as_deref() == Some("Exists")),
        "the cleanup must reach tainted GPU nodes too"
    );
    let [clean] = pod.init_containers.as_deref().unwrap_or_default() else {
        panic!("one init container does the cleanup");
    };
    let command = clean.command.as_deref().unwrap();
    let [shell, dash_c, cleanup] = command else {
        panic!("the cleanup is `sh -c SCRIPT`: {command:?}");
    };
    assert_eq!((shell.as_str(), dash_c.as_str()), ("sh", "-c"));
    let host_root = plain_env(clean, "HOST_ROOT").unwrap();

    // What a node that ran the plugin holds, spelled by the code that writes it.
    let driver = names::DEFAULT_DRIVER_NAME;
    let prepare = tandem::prepare::PrepareConfig::new(driver, "node");
    let registry = Path::new(names::DEFAULT_KUBELET_REGISTRY_DIR);
    let plugins = Path::new(names::DEFAULT_KUBELET_PLUGINS_DIR);
    let shared = tandem_kubelet_plugin::sockets::SocketPaths::new(driver, registry, plugins, None);
    let per_pod = tandem_kubelet_plugin::sockets::SocketPaths::new(
        driver,
        registry,
        plugins,
        Some("6f1c2a8e-3b4d-4e5f-9a0b-1c2d3e4f5a6b"),
    );
    let spec = prepare.cdi_dir.join(tandem::prepare::cdi::spec_file_name(
        driver,
        "3c0a1b2c-0000-4000-8000-000000000001",
    ));
    let spec_temp = prepare.cdi_dir.join(format!(
        ".{}.Ab12Cd{}",
        tandem::prepare::cdi::spec_file_name(driver, "u2"),
        ".tmp"
    ));
    let hook = Path::new("/opt/tandem/bin/tandem");
    let ours: Vec<PathBuf> = vec![
        prepare.state_dir.join("checkpoint.json"),
        prepare.state_dir.join("claims/u1.topology.json"),
        prepare.topology_dir.join("u2.topology.json"),
        prepare.topology_dir.join(".u3.topology.json.Xy12Zw.tmp"),
        hook.to_path_buf(),
        shared.registration.clone(),
        shared.dra.clone(),
        per_pod.registration.clone(),
        per_pod.dra.clone(),
        per_pod.serialize_lock.clone().unwrap(),
        spec.clone(),
        spec_temp.clone(),
    ];
    // Neighbours that look alike and must stay.
    let theirs = [
        "/var/lib/kubelet/plugins_registry/gpu.example.com-reg.sock",
        "/var/lib/kubelet/plugins_registry/tandem.dev-old-reg.sock",
        "/var/lib/kubelet/plugins/gpu.example.com/dra.sock",
        "/var/lib/kubelet/pods/p1/volumes/data",
        "/var/lib/tandem-backup/checkpoint.json",
        "/var/run/cdi/gpu.example.com-claim_u1.json",
        "/var/run/cdi/nvidia.yaml",
        "/var/run/tandem/other-tool.json",
        "/opt/tandem-tools/bin/tool",
        "/opt/cni/bin/bridge",
    ];

    let node = tempfile::tempdir().unwrap();
    let host = node.path().join("host");
    for path in ours.iter().map(|p| p.to_str().unwrap()).chain(theirs) {
        plant(&host, path);
    }
    let before = tree(&host);
    let run = Command::new("sh")
        .args(["-c", cleanup])
        .env("HOST_ROOT", &host)
        .output()
        .unwrap();
    assert!(
        run.status.success(),
        "cleanup failed: {}",
        String::from_utf8_lossy(&run.stderr)
    );
    let after = tree(&host);

    // Gone: every file of ours and the directories only Tandem uses, nothing else.
    let gone_roots = [
        prepare.state_dir.clone(),
        PathBuf::from("/opt/tandem"),
        shared.plugin_dir.clone(),
        shared.registration.clone(),
        per_pod.registration.clone(),
        spec.clone(),
        spec_temp.clone(),
        prepare.topology_dir.join("u2.topology.json"),
        prepare.topology_dir.join(".u3.topology.json.Xy12Zw.tmp"),
    ];
    let expected_gone: BTreeSet<String> = before
        .iter()
        .filter(|p| {
            gone_roots
                .iter()
                .any(|root| Path::new(p.as_str()).starts_with(root))
        })
        .cloned()
        .collect();
    let gone: BTreeSet<String> = before.difference(&after).cloned().collect();
    assert_eq!(gone, expected_gone, "removed (left) and expected (right)");
    for path in &ours {
        assert!(
            !after.contains(path.to_str().unwrap()),
            "{} survived",
            path.display()
        );
    }
    for path in theirs {
        assert!(after.contains(path), "{path} was removed");
    }
    let log = String::from_utf8_lossy(&run.stdout);
    assert!(
        log.contains(&format!("removed {}", prepare.state_dir.display())),
        "{log}"
    );

    // Each removed path is reached through a writable mount of the same host path.
    for root in &gone_roots {
        let inside = format!("{host_root}{}", root.display());
        assert_eq!(
            host_path_of(pod, clean, &inside).as_deref(),
            root.to_str(),
            "{inside} is not the host's {}",
            root.display()
        );
        let (_, read_only) = host_mount_holding(pod, clean, &inside).unwrap();
        assert!(!read_only, "{inside} is mounted read-only");
    }

    // Run twice (a retried pod, a node already clean): nothing to do is no failure.
    let again = Command::new("sh")
        .args(["-c", cleanup])
        .env("HOST_ROOT", &host)
        .output()
        .unwrap();
    assert!(again.status.success());
    assert_eq!(tree(&host), after);
}

/// Runs hack/uninstall.sh with the fake kubectl in `dir`: (success, stderr, calls).
fn run_uninstall(dir: &Path, args: &[&str]) -> (bool, String, Vec<String>) {
    let path = std::env::join_paths(
        std::iter::once(dir.to_path_buf())
            .chain(std::env::split_paths(&std::env::var_os("PATH").unwrap())),
    )
    .unwrap();
    let output = Command::new("bash")
        .arg(repo_root().join("hack/uninstall.sh"))
        .args(args)
        .env("PATH", path)
        .env(
            "TANDEM_CLEANUP_IMAGE",
            "mirror.example.com/library/busybox:1.37",
        )
        .output()
        .unwrap();
    let calls = std::fs::read_to_string(dir.join("calls.log")).unwrap_or_default();
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
        calls.lines().map(str::to_string).collect(),
    )
}

/// The fake apiserver side of an uninstall: `claims` is what the claim listing prints
/// ("namespace/name driver..." lines), `rollout` the exit status of the cleanup's rollout.
fn fake_uninstall_kubectl(dir: &Path, claims: &str, rollout: u8) {
    std::fs::write(dir.join("claims.txt"), claims).unwrap();
    let rollout = format!("exit {rollout}");
    fake_kubectl(
        dir,
        &[
            (
                "'get resourceclaims -A -o jsonpath='*",
                "cat \"${here}/claims.txt\"",
            ),
            ("'delete -k '*' --ignore-not-found --wait=true'*", "true"),
            (
                "'delete resourceslices --field-selector spec.driver=tandem.dev --ignore-not-found'",
                "true",
            ),
            ("'label nodes --all '*", "echo 'label \"x\" not found.'"),
            ("'annotate nodes --all '*", "true"),
            ("'apply -f -'", "cat > \"${here}/applied.yaml\""),
            (
                "'-n tandem-uninstall rollout status daemonset/tandem-host-cleanup '*",
                &rollout,
            ),
            ("'-n tandem-uninstall get pods -o wide'", "true"),
            ("'-n tandem-uninstall logs '*", "true"),
            (
                "'delete namespace tandem-uninstall --ignore-not-found --wait=true'*",
                "true",
            ),
        ],
    );
}

/// The first word after the verb of each call, to compare orders: "delete -k", "label".
fn steps(calls: &[String]) -> Vec<String> {
    calls
        .iter()
        .map(|c| {
            let words: Vec<&str> = c.split_whitespace().collect();
            let words = if words.first() == Some(&"-n") {
                &words[2..]
            } else {
                &words[..]
            };
            words[..2.min(words.len())].join(" ")
        })
        .collect()
}

#[test]
fn uninstall_removes_objects_slices_node_marks_and_host_files_in_that_order() {
    let dir = tempfile::tempdir().unwrap();
    fake_uninstall_kubectl(
        dir.path(),
        "default/other-gpu gpu.example.com\ndefault/unallocated \n",
        0,
    );
    let (ok, stderr, calls) = run_uninstall(dir.path(), &[]);
    assert!(ok, "uninstall failed:\n{stderr}\ncalls: {calls:#?}");
    // Objects first, waiting until they are gone: no plugin re-publishes slices or rewrites
    // host files, no controller re-labels nodes after the later steps.
    assert_eq!(
        steps(&calls),
        [
            "get resourceclaims",
            "delete -k",
            "delete resourceslices",
            "label nodes",
            "annotate nodes",
            "apply -f",
            "rollout status",
            "delete namespace",
        ]
    );
    assert!(
        calls[1].contains(
            &repo_root()
                .join("deploy/overlays/production")
                .display()
                .to_string()
        ),
        "{}",
        calls[1]
    );
    let label_call: BTreeSet<&str> = calls[3].split_whitespace().skip(3).collect();
    let want: BTreeSet<String> = [
        names::LABEL_GPUS,
        names::LABEL_RDMA_NICS,
        names::LABEL_BEST_AFFINITY,
    ]
    .iter()
    .map(|l| format!("{l}-"))
    .collect();
    assert_eq!(
        label_call,
        want.iter().map(String::as_str).collect(),
        "{}",
        calls[3]
    );
    assert!(
        calls[4].ends_with(&format!(" {}-", names::ANNOTATION_ALIGNMENT)),
        "{}",
        calls[4]
    );

    // What it applied is the cleanup manifest with the image swapped, nothing else changed.
    let applied = std::fs::read_to_string(dir.path().join("applied.yaml")).unwrap();
    let shipped = std::fs::read_to_string(repo_root().join(HOST_CLEANUP)).unwrap();
    let swapped = shipped.replace(
        "image: busybox:1.37",
        "image: mirror.example.com/library/busybox:1.37",
    );
    assert_ne!(swapped, shipped, "the manifest names busybox:1.37");
    assert_eq!(applied, swapped);
}

#[test]
fn uninstall_refuses_while_tandem_claims_are_allocated_and_reports_unclean_nodes() {
    let dir = tempfile::tempdir().unwrap();
    fake_uninstall_kubectl(
        dir.path(),
        "ml/train-0-pair gpu.example.com tandem.dev tandem.dev\n",
        0,
    );
    let (ok, stderr, calls) = run_uninstall(dir.path(), &[]);
    assert!(!ok);
    assert!(stderr.contains("ml/train-0-pair"), "{stderr}");
    assert_eq!(steps(&calls), ["get resourceclaims"], "nothing deleted");

    // --force goes on; a node that could not be cleaned fails the run after the cleanup
    // namespace is gone anyway.
    let dir = tempfile::tempdir().unwrap();
    fake_uninstall_kubectl(
        dir.path(),
        "ml/train-0-pair gpu.example.com tandem.dev\n",
        1,
    );
    let (ok, stderr, calls) = run_uninstall(dir.path(), &["--force"]);
    assert!(!ok, "{stderr}");
    assert!(stderr.contains("host files remain"), "{stderr}");
    let steps = steps(&calls);
    assert_eq!(
        steps.first().map(String::as_str),
        Some("get resourceclaims")
    );
    assert_eq!(steps.last().map(String::as_str), Some("delete namespace"));
    assert!(steps.iter().any(|s| s == "delete -k"));
}

// ---------------------------------------------------------------------------------------------
// RBAC coverage: the table below is every API call the code makes against a real apiserver,
// one row per (call site file, object type). The source scan checks the table against the
// code, the rendered RBAC is checked against the table.

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Who {
    NodePlugin,
    Controller,
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Scope {
    /// Granted by a ClusterRoleBinding: cluster-scoped objects, or every namespace.
    Cluster,
    /// Granted by a RoleBinding in this namespace.
    Namespace(String),
}

struct ApiUse {
    who: Who,
    /// The file holding the calls, relative to src/.
    file: &'static str,
    /// The type as spelled in `Api<...>` / `Store<...>`.
    type_name: &'static str,
    group: &'static str,
    resource: &'static str,
    /// `status` for `*_status` calls, which RBAC grants as `<resource>/status`.
    subresource: Option<&'static str>,
    scope: Scope,
    verbs: &'static [&'static str],
    /// The one object the calls touch, when the code names it (RBAC resourceNames). Never
    /// applied to `create`, which RBAC cannot narrow by name.
    only_name: Option<&'static str>,
}

macro_rules! api_use {
    ($who:ident, $file:literal, $ty:ident, $scope:expr, [$($verb:literal),+], $name:expr) => {
        api_use!(@row $who, $file, $ty, None, $scope, [$($verb),+], $name)
    };
    // `Type / "status"`: calls on the status subresource (`patch_status`, `replace_status`).
    ($who:ident, $file:literal, $ty:ident / $sub:literal, $scope:expr, [$($verb:literal),+], $name:expr) => {
        api_use!(@row $who, $file, $ty, Some($sub), $scope, [$($verb),+], $name)
    };
    (@row $who:ident, $file:literal, $ty:ident, $sub:expr, $scope:expr, [$($verb:literal),+], $name:expr) => {
        ApiUse {
            who: Who::$who,
            file: $file,
            type_name: stringify!($ty),
            group: <$ty as Resource>::GROUP,
            resource: <$ty as Resource>::URL_PATH_SEGMENT,
            subresource: $sub,
            scope: $scope,
            verbs: &[$($verb),+],
            only_name: $name,
        }
    };
}

impl ApiUse {
    /// The resource as an RBAC rule names it: `resourceclaims`, `resourceclaims/status`.
    fn rbac_resource(&self) -> String {
        match self.subresource {
            Some(sub) => format!("{}/{sub}", self.resource),
            None => self.resource.to_string(),
        }
    }

    /// The verbs as the source scan names them: `patch`, or `patch/status` on a subresource.
    fn scanned_verbs(&self) -> impl Iterator<Item = String> + '_ {
        self.verbs.iter().map(|verb| match self.subresource {
            Some(sub) => format!("{verb}/{sub}"),
            None => verb.to_string(),
        })
    }
}

/// Files that use kube's Api only against the in-process fake apiserver (`tandem demo` and
/// the tests), never a cluster.
const FAKE_APISERVER_ONLY: &[&str] = &["apiserver_fake/", "cli/demo.rs"];

fn api_uses() -> Vec<ApiUse> {
    let controller_ns = || Scope::Namespace(names::DEFAULT_CONTROLLER_NAMESPACE.to_string());
    vec![
        // fetch_claim: GET of the claim the kubelet asks to prepare, in its namespace.
        api_use!(
            NodePlugin,
            "crates/kubelet-plugin/src/claim.rs",
            ResourceClaim,
            Scope::Cluster,
            ["get"],
            None
        ),
        // Publisher: list/watch by field selector, create, replace, get_opt after a conflict,
        // delete with a UID precondition.
        api_use!(
            NodePlugin,
            "crates/kubelet-plugin/src/publish.rs",
            ResourceSlice,
            Scope::Cluster,
            ["get", "list", "watch", "create", "update", "delete"],
            None
        ),
        // apply_claim_status: server-side apply (field manager = the driver name) of
        // status.devices for the NICs attached to the claim's pod.
        api_use!(
            NodePlugin,
            "netattach/status.rs",
            ResourceClaim / "status",
            Scope::Cluster,
            ["patch"],
            None
        ),
        // watch_rail_configmap: list + watch of the controller's rail ConfigMap alone
        // (fieldSelector metadata.name), authorized by resourceNames.
        api_use!(
            NodePlugin,
            "slices/network.rs",
            ConfigMap,
            controller_ns(),
            ["list", "watch"],
            Some(names::RAILS_CONFIGMAP)
        ),
        // node_identity: the Node's UID for the slices' owner reference.
        api_use!(
            NodePlugin,
            "crates/kubelet-plugin/src/publish.rs",
            Node,
            Scope::Cluster,
            ["get"],
            None
        ),
        // lead(): the slice cache's watcher and the kube Controllers' watches: Nodes, the
        // leader Lease (field selector metadata.name=tandem-controller), and as triggers the
        // classes, this driver's slices and the rail ConfigMap (field selector
        // metadata.name=tandem-rails).
        api_use!(
            Controller,
            "controller/mod.rs",
            DeviceClass,
            Scope::Cluster,
            ["list", "watch"],
            None
        ),
        api_use!(
            Controller,
            "controller/mod.rs",
            ResourceSlice,
            Scope::Cluster,
            ["list", "watch"],
            None
        ),
        // The Node controller's trigger watch of the same slices, parsed as SliceRef (name,
        // resourceVersion and node only).
        api_use!(
            Controller,
            "controller/mod.rs",
            SliceRef,
            Scope::Cluster,
            ["list", "watch"],
            None
        ),
        api_use!(
            Controller,
            "controller/mod.rs",
            Node,
            Scope::Cluster,
            ["list", "watch"],
            None
        ),
        api_use!(
            Controller,
            "controller/mod.rs",
            ConfigMap,
            controller_ns(),
            ["list", "watch"],
            Some(names::RAILS_CONFIGMAP)
        ),
        api_use!(
            Controller,
            "controller/mod.rs",
            Lease,
            controller_ns(),
            ["list", "watch"],
            Some(names::CONTROLLER_LEASE_NAME)
        ),
        // ensure_classes: a read of each class, and a server-side apply where it differs.
        api_use!(
            Controller,
            "controller/classes.rs",
            DeviceClass,
            Scope::Cluster,
            ["get", "patch"],
            None
        ),
        // FleetReconciler: Node label merge patches; the rail ConfigMap; NodeEvents in the
        // "default" namespace (fleet.rs NODE_EVENT_NAMESPACE) with a get+replace count bump.
        api_use!(
            Controller,
            "controller/fleet.rs",
            Node,
            Scope::Cluster,
            ["patch"],
            None
        ),
        api_use!(
            Controller,
            "controller/fleet.rs",
            ConfigMap,
            controller_ns(),
            ["get", "create", "update"],
            Some(names::RAILS_CONFIGMAP)
        ),
        api_use!(
            Controller,
            "controller/fleet.rs",
            Event,
            Scope::Namespace("default".to_string()),
            ["create", "get", "update"],
            None
        ),
    ]
}

/// The production code of `file`: unit tests in `#[cfg(test)] mod tests` run against fakes.
fn production_code(text: &str) -> &str {
    match text.find("#[cfg(test)]\nmod tests") {
        Some(at) => &text[..at],
        None => text,
    }
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// (file relative to src/, type name) for every `Api<T>`, `Api::<T>` and reflector `Store<T>`
/// in production code; one-letter names are generic parameters.
/// The library crates whose apiserver calls run in the node agent or the controller; their
/// files are named from the repository root, those of `src/` from `src/`.
const LIBRARY_CRATES: &[&str] = &["crates/kubelet-plugin/src"];

/// Where a file of the api_uses() table is.
fn source_path(file: &str) -> PathBuf {
    if file.starts_with("crates/") {
        repo_root().join(file)
    } else {
        repo_root().join("src").join(file)
    }
}

fn scanned_api_types() -> BTreeMap<String, BTreeSet<String>> {
    let src = repo_root().join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    for library in LIBRARY_CRATES {
        rust_files(&repo_root().join(library), &mut files);
    }
    let mut found: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for path in files {
        let relative = match path.strip_prefix(&src) {
            Ok(in_src) => in_src,
            Err(_) => path.strip_prefix(repo_root()).unwrap(),
        }
        .to_string_lossy()
        .replace('\\', "/");
        if FAKE_APISERVER_ONLY
            .iter()
            .any(|skip| relative.starts_with(skip))
        {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        let code = production_code(&text);
        for marker in ["Api<", "Api::<", "Store<"] {
            for (at, _) in code.match_indices(marker) {
                let before = code[..at].chars().next_back();
                if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
                    continue; // e.g. `DynamicApi<`
                }
                let rest = &code[at + marker.len()..];
                let name: String = rest
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_' || *c == ':')
                    .collect();
                let name = name.rsplit("::").next().unwrap_or_default().to_string();
                if name.len() > 1 {
                    found.entry(relative.clone()).or_default().insert(name);
                }
            }
        }
    }
    found
}

/// Text in a file that shows a verb (as `scanned_verbs` spells it) is called there.
fn evidence_of(verb: &str) -> &'static [&'static str] {
    match verb {
        "get" => &[".get_opt(", ".get("],
        "list" => &[".list(", "watcher(", "Store<"],
        "watch" => &["watcher(", ".watch(", "Store<"],
        "create" => &[".create("],
        "update" => &[".replace("],
        "patch" => &[".patch("],
        "delete" => &[".delete("],
        "get/status" => &[".get_status("],
        "update/status" => &[".replace_status("],
        "patch/status" => &[".patch_status("],
        other => panic!("verb {other} has no evidence rule"),
    }
}

/// Calls that are only ever kube calls, and the verbs (any one of) they need.
const KUBE_CALLS: &[(&str, &[&str])] = &[
    (".get_opt(", &["get"]),
    ("ListParams", &["list"]),
    ("watcher(", &["list", "watch"]),
    ("PostParams", &["create", "update", "update/status"]),
    ("PatchParams", &["patch", "patch/status"]),
    ("DeleteParams", &["delete"]),
    ("delete_collection(", &["deletecollection"]),
    ("get_status(", &["get/status"]),
    ("patch_status(", &["patch/status"]),
    ("replace_status(", &["update/status"]),
];

#[test]
fn api_use_table_matches_the_source() {
    let scanned = scanned_api_types();
    let uses = api_uses();
    let mut listed: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for u in &uses {
        listed
            .entry(u.file.to_string())
            .or_default()
            .insert(u.type_name.to_string());
    }
    assert_eq!(
        scanned, listed,
        "the Api/Store uses in src/ (left) and the api_uses() table (right) differ: add a row \
         for each new call site, with the RBAC it needs in deploy/base"
    );
    for file in listed.keys() {
        let text = std::fs::read_to_string(source_path(file)).unwrap();
        let code = production_code(&text);
        let verbs: BTreeSet<String> = uses
            .iter()
            .filter(|u| u.file == file)
            .flat_map(ApiUse::scanned_verbs)
            .collect();
        for verb in &verbs {
            assert!(
                evidence_of(verb).iter().any(|e| code.contains(e)),
                "src/{file}: the table says it calls {verb}, but no {:?} is there",
                evidence_of(verb)
            );
        }
        for (call, needs) in KUBE_CALLS {
            if code.contains(call) {
                assert!(
                    needs.iter().any(|v| verbs.contains(*v)),
                    "src/{file} uses {call}, which needs {needs:?}; the table lists {verbs:?}"
                );
            }
        }
    }
}

/// A grant the apiserver checks beyond the one for the call's own verb, tied to the text in
/// the calling file that makes it needed: when the call goes, the test asks for the grant to go.
struct ImpliedGrant {
    who: Who,
    /// The file holding the call, relative to src/.
    file: &'static str,
    /// Text that must all be in that file's production code.
    evidence: &'static [&'static str],
    group: &'static str,
    resource: &'static str,
    verb: &'static str,
    scope: Scope,
    name: Option<&'static str>,
}

fn implied_grants() -> Vec<ImpliedGrant> {
    // The Lease calls are kube-lease-manager's, not ours: it reads the Lease, creates it
    // when missing, and takes, renews and releases it by PATCH (apply and strategic merge).
    let lease = |verb: &'static str, name: Option<&'static str>| ImpliedGrant {
        who: Who::Controller,
        file: "controller/lease.rs",
        evidence: &["LeaseManagerBuilder::new("],
        group: Lease::GROUP,
        resource: Lease::URL_PATH_SEGMENT,
        verb,
        scope: Scope::Namespace(names::DEFAULT_CONTROLLER_NAMESPACE.to_string()),
        name,
    };
    vec![
        lease("get", Some(names::CONTROLLER_LEASE_NAME)),
        lease("patch", Some(names::CONTROLLER_LEASE_NAME)),
        // create cannot be narrowed to a name: the name is in the body.
        lease("create", None),
        // apply_class: a server-side apply of a class someone deleted creates it, and the
        // apiserver authorizes that PATCH as create.
        ImpliedGrant {
            who: Who::Controller,
            file: "controller/classes.rs",
            evidence: &["Patch::Apply(", "PatchParams::apply("],
            group: DeviceClass::GROUP,
            resource: DeviceClass::URL_PATH_SEGMENT,
            verb: "create",
            scope: Scope::Cluster,
            name: None,
        },
        // apply_claim_status writes status.devices: since Kubernetes 1.36
        // (DRAResourceClaimGranularStatusAuthorization) that also takes the request's verb,
        // prefixed associated-node: (the writer's token is bound to the claim's node), on
        // the synthetic subresource resourceclaims/driver named after the driver.
        ImpliedGrant {
            who: Who::NodePlugin,
            file: "netattach/status.rs",
            evidence: &[".patch_status(", "\"devices\""],
            group: ResourceClaim::GROUP,
            resource: "resourceclaims/driver",
            verb: "associated-node:patch",
            scope: Scope::Cluster,
            name: Some(names::DEFAULT_DRIVER_NAME),
        },
    ]
}

#[test]
fn implied_grants_follow_the_calls_that_need_them() {
    for grant in implied_grants() {
        let text = std::fs::read_to_string(source_path(grant.file)).unwrap();
        let code = production_code(&text);
        for evidence in grant.evidence {
            assert!(
                code.contains(evidence),
                "src/{}: no {evidence:?}, so {} {} is no longer needed there",
                grant.file,
                grant.resource,
                grant.verb
            );
        }
    }
}

type Grant = (Who, String, String, String, Scope, Option<String>);

fn expected_grants() -> BTreeSet<Grant> {
    let mut grants = BTreeSet::new();
    for g in implied_grants() {
        grants.insert((
            g.who,
            g.group.to_string(),
            g.resource.to_string(),
            g.verb.to_string(),
            g.scope,
            g.name.map(str::to_string),
        ));
    }
    for u in api_uses() {
        for verb in u.verbs {
            let name = if *verb == "create" {
                None
            } else {
                u.only_name.map(str::to_string)
            };
            grants.insert((
                u.who,
                u.group.to_string(),
                u.rbac_resource(),
                verb.to_string(),
                u.scope.clone(),
                name,
            ));
        }
    }
    grants
}

fn expand(who: Who, scope: &Scope, rules: &[PolicyRule], out: &mut BTreeSet<Grant>) {
    for rule in rules {
        assert!(
            rule.non_resource_urls.is_none(),
            "non-resource URLs are not needed"
        );
        let names: Vec<Option<String>> = match &rule.resource_names {
            Some(names) if !names.is_empty() => names.iter().cloned().map(Some).collect(),
            _ => vec![None],
        };
        for group in rule.api_groups.iter().flatten() {
            for resource in rule.resources.iter().flatten() {
                for verb in &rule.verbs {
                    for text in [group, resource, verb] {
                        assert!(!text.contains('*'), "wildcard in an RBAC rule: {rule:?}");
                    }
                    for name in &names {
                        out.insert((
                            who,
                            group.clone(),
                            resource.clone(),
                            verb.clone(),
                            scope.clone(),
                            name.clone(),
                        ));
                    }
                }
            }
        }
    }
}

/// What the rendered Roles and ClusterRoles grant to the plugin's and the controller's
/// service accounts.
fn rendered_grants(r: &Rendered) -> BTreeSet<Grant> {
    let (ds, pod, _) = r.node_plugin();
    let plugin = r.identity(ds.metadata.namespace.as_deref().unwrap(), pod);
    let (deployment, pod, _) = r.controller();
    let controller = r.identity(deployment.metadata.namespace.as_deref().unwrap(), pod);
    let who_is = |namespace: Option<&str>, name: &str| -> Option<Who> {
        let account = (namespace.unwrap_or_default().to_string(), name.to_string());
        if account == plugin {
            Some(Who::NodePlugin)
        } else if account == controller {
            Some(Who::Controller)
        } else {
            None
        }
    };
    let cluster_role = |name: &str| -> Vec<PolicyRule> {
        r.cluster_roles
            .iter()
            .find(|c| c.metadata.name.as_deref() == Some(name))
            .unwrap_or_else(|| panic!("{}: ClusterRole {name} is not rendered", r.overlay))
            .rules
            .clone()
            .unwrap_or_default()
    };
    let mut grants = BTreeSet::new();
    for binding in &r.cluster_role_bindings {
        assert_eq!(binding.role_ref.kind, "ClusterRole");
        for subject in binding.subjects.iter().flatten() {
            assert_eq!(subject.kind, "ServiceAccount", "{}", r.overlay);
            let who = who_is(subject.namespace.as_deref(), &subject.name)
                .unwrap_or_else(|| panic!("{}: binding to unknown {subject:?}", r.overlay));
            expand(
                who,
                &Scope::Cluster,
                &cluster_role(&binding.role_ref.name),
                &mut grants,
            );
        }
    }
    for binding in &r.role_bindings {
        let namespace = binding.metadata.namespace.clone().unwrap();
        let rules = match binding.role_ref.kind.as_str() {
            "ClusterRole" => cluster_role(&binding.role_ref.name),
            _ => r
                .roles
                .iter()
                .find(|role| {
                    role.metadata.name.as_deref() == Some(binding.role_ref.name.as_str())
                        && role.metadata.namespace.as_deref() == Some(namespace.as_str())
                })
                .unwrap_or_else(|| {
                    panic!(
                        "{}: Role {namespace}/{} missing",
                        r.overlay, binding.role_ref.name
                    )
                })
                .rules
                .clone()
                .unwrap_or_default(),
        };
        for subject in binding.subjects.iter().flatten() {
            let who = who_is(subject.namespace.as_deref(), &subject.name)
                .unwrap_or_else(|| panic!("{}: binding to unknown {subject:?}", r.overlay));
            expand(
                who,
                &Scope::Namespace(namespace.clone()),
                &rules,
                &mut grants,
            );
        }
    }
    grants
}

#[test]
fn rbac_grants_exactly_the_api_calls_the_code_makes() {
    let Some(overlays) = render_all("rbac_coverage") else {
        return;
    };
    let expected = expected_grants();
    for r in overlays {
        let granted = rendered_grants(r);
        let missing: Vec<&Grant> = expected.difference(&granted).collect();
        let extra: Vec<&Grant> = granted.difference(&expected).collect();
        assert!(
            missing.is_empty() && extra.is_empty(),
            "{}: RBAC differs from the calls in src/\nmissing: {missing:#?}\nextra: {extra:#?}",
            r.overlay
        );
    }
}

/// True when the rendered RBAC grants `who` the verb on the resource.k8s.io resource (any object when `name`
/// is None, else that one).
fn grants(r: &Rendered, who: Who, resource: &str, verb: &str, name: Option<&str>) -> bool {
    rendered_grants(r)
        .iter()
        .any(|(w, group, res, v, scope, n)| {
            *w == who
                && group == ResourceClaim::GROUP
                && res == resource
                && v == verb
                && *scope == Scope::Cluster
                && (n.is_none() || n.as_deref() == name)
        })
}

#[test]
fn controller_can_recreate_a_deleted_device_class() {
    let Some(overlays) = render_all("controller_recreates_classes") else {
        return;
    };
    for r in overlays {
        for verb in ["create", "patch"] {
            assert!(
                grants(
                    r,
                    Who::Controller,
                    "deviceclasses",
                    verb,
                    Some("gpu.tandem.dev")
                ),
                "{}: the controller cannot {verb} DeviceClasses, so server-side apply cannot \
                 bring back a deleted one",
                r.overlay
            );
        }
    }
}

#[test]
fn node_plugin_can_write_device_status_on_kubernetes_1_34_to_1_36() {
    let Some(overlays) = render_all("node_plugin_device_status") else {
        return;
    };
    for r in overlays {
        // 1.34 and 1.35 check the status subresource only; 1.36 checks it too.
        assert!(
            grants(r, Who::NodePlugin, "resourceclaims/status", "patch", None),
            "{}: no patch on resourceclaims/status",
            r.overlay
        );
        // 1.36: per driver, and only for claims on the plugin's own node.
        assert!(
            grants(
                r,
                Who::NodePlugin,
                "resourceclaims/driver",
                "associated-node:patch",
                Some(names::DEFAULT_DRIVER_NAME)
            ),
            "{}: no associated-node:patch on resourceclaims/driver {}",
            r.overlay,
            names::DEFAULT_DRIVER_NAME
        );
        assert!(
            !grants(
                r,
                Who::NodePlugin,
                "resourceclaims/driver",
                "associated-node:patch",
                Some("other.example.com")
            ),
            "{}: the plugin may write other drivers' device status",
            r.overlay
        );
        assert!(
            rendered_grants(r)
                .iter()
                .all(|(_, _, _, verb, _, _)| !verb.starts_with("arbitrary-node:")),
            "{}: a node-bound plugin needs no arbitrary-node verb",
            r.overlay
        );
    }
}

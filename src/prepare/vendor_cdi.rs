//! Other vendors' CDI specs (`nvidia-ctk cdi generate`, the GPU Operator, AMD's container
//! toolkit): read-only, re-read when a file changes, and matched to the accelerators of the
//! inventory so that a prepared GPU also gets the vendor's device (driver libraries, hooks).
//! Reading is the only I/O here; matching is pure.

use crate::names::accelerator_device_name;
use crate::topology::{Accelerator, AcceleratorKind, Inventory, PciAddress};
use serde::Deserialize;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Weak};
use std::time::SystemTime;

/// The CDI spec directories runtimes read by default: static, then dynamic.
pub const DEFAULT_VENDOR_CDI_DIRS: &[&str] = &["/etc/cdi", "/var/run/cdi"];

/// One vendor spec file as far as matching needs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VendorSpec {
    pub path: PathBuf,
    pub kind: String,
    pub devices: Vec<VendorDevice>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VendorDevice {
    pub name: String,
    pub nodes: Vec<VendorNode>,
}

/// A device node of a vendor device: the path in the container, the host path where it
/// differs, and the numbers where the vendor wrote them (nvidia-ctk writes paths only).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VendorNode {
    pub path: String,
    pub host_path: Option<String>,
    pub numbers: Option<(i64, i64)>,
}

/// A spec file that could not be used, with why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BrokenSpec {
    pub path: PathBuf,
    pub reason: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawSpec {
    kind: String,
    #[serde(default)]
    devices: Vec<RawDevice>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawDevice {
    name: String,
    #[serde(default)]
    container_edits: RawEdits,
}

#[derive(Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawEdits {
    #[serde(default)]
    device_nodes: Vec<RawNode>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawNode {
    path: String,
    #[serde(default)]
    host_path: Option<String>,
    #[serde(default)]
    major: Option<i64>,
    #[serde(default)]
    minor: Option<i64>,
}

/// Parses a spec file's text; `.json` files as JSON, everything else as YAML (which the CDI
/// Go library also accepts for JSON text).
pub fn parse_spec(path: &Path, text: &str) -> Result<VendorSpec, String> {
    let raw: RawSpec = if path.extension().is_some_and(|e| e == "json") {
        serde_json::from_str(text).map_err(|e| e.to_string())?
    } else {
        serde_norway::from_str(text).map_err(|e| e.to_string())?
    };
    if !raw.kind.contains('/') {
        return Err(format!("kind {:?} is not vendor/class", raw.kind));
    }
    Ok(VendorSpec {
        path: path.to_path_buf(),
        kind: raw.kind,
        devices: raw
            .devices
            .into_iter()
            .map(|d| VendorDevice {
                name: d.name,
                nodes: d
                    .container_edits
                    .device_nodes
                    .into_iter()
                    .map(|n| VendorNode {
                        path: n.path,
                        host_path: n.host_path,
                        numbers: n.major.zip(n.minor),
                    })
                    .collect(),
            })
            .collect(),
    })
}

/// The vendor specs of a set of directories, re-read file by file when a file's mtime or
/// size changes. Our own claim specs (same directory as the dynamic vendor specs) are skipped.
#[derive(Debug, Default)]
pub struct VendorSpecs {
    dirs: Vec<PathBuf>,
    /// Our own spec kind (`tandem.dev/claim`) and file name prefix, never read as a vendor's.
    own_kind: String,
    own_prefix: String,
    cache: BTreeMap<PathBuf, Cached>,
    /// Raised whenever a spec is read anew or goes: what the matching depends on.
    generation: u64,
    /// The last matching, for the generation and the inventory it was made from.
    matched: Option<Matched>,
}

#[derive(Debug)]
struct Matched {
    generation: u64,
    /// Compared by address only; the weak reference keeps the address from being reused.
    inventory: Weak<Inventory>,
    matches: Arc<VendorMatches>,
}

#[derive(Debug)]
struct Cached {
    stamp: (Option<SystemTime>, u64),
    parsed: Result<VendorSpec, String>,
}

/// What the directories held at the last refresh.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SpecSnapshot {
    pub specs: Vec<VendorSpec>,
    pub broken: Vec<BrokenSpec>,
}

impl VendorSpecs {
    pub fn new(dirs: Vec<PathBuf>, driver_name: &str) -> Self {
        Self {
            dirs,
            own_kind: crate::names::cdi_claim_kind(driver_name),
            own_prefix: super::cdi::spec_file_prefix(driver_name),
            cache: BTreeMap::new(),
            generation: 0,
            matched: None,
        }
    }

    pub fn dirs(&self) -> &[PathBuf] {
        &self.dirs
    }

    /// Re-reads what changed since the last call (a stat per file; files are parsed only
    /// when new or changed) and returns every spec. A missing directory is no spec.
    pub fn refresh(&mut self) -> SpecSnapshot {
        self.rescan();
        self.snapshot()
    }

    /// The vendor device of each accelerator of `inventory`, from the specs as they are now:
    /// checked for changes (a stat per file) on every call, matched again only when a spec
    /// was read anew or went, or the inventory is another one. Every prepare asks, so the
    /// specs of a node (one per GPU vendor, tens of devices each) are not copied and matched
    /// against every GPU each time.
    pub fn matches(&mut self, inventory: &Arc<Inventory>) -> Arc<VendorMatches> {
        self.rescan();
        if let Some(m) = &self.matched
            && m.generation == self.generation
            && std::ptr::eq(m.inventory.as_ptr(), Arc::as_ptr(inventory))
        {
            return m.matches.clone();
        }
        let matches = Arc::new(match_inventory(&self.snapshot(), inventory));
        self.matched = Some(Matched {
            generation: self.generation,
            inventory: Arc::downgrade(inventory),
            matches: matches.clone(),
        });
        matches
    }

    /// Re-reads the specs that are new or changed and forgets those that went.
    fn rescan(&mut self) {
        let mut seen = BTreeSet::new();
        for dir in &self.dirs {
            let Ok(entries) = std::fs::read_dir(dir) else {
                continue;
            };
            let mut paths: Vec<PathBuf> = entries
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| {
                    p.extension()
                        .is_some_and(|e| e == "json" || e == "yaml" || e == "yml")
                })
                .filter(|p| {
                    !p.file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.starts_with(&self.own_prefix))
                })
                .collect();
            paths.sort();
            for path in paths {
                let Ok(meta) = std::fs::metadata(&path) else {
                    continue;
                };
                if !meta.is_file() {
                    continue;
                }
                let stamp = (meta.modified().ok(), meta.len());
                seen.insert(path.clone());
                if self.cache.get(&path).is_some_and(|c| c.stamp == stamp) {
                    continue;
                }
                let parsed = std::fs::read_to_string(&path)
                    .map_err(|e| e.to_string())
                    .and_then(|text| parse_spec(&path, &text));
                self.cache.insert(path, Cached { stamp, parsed });
                self.generation += 1;
            }
        }
        let before = self.cache.len();
        self.cache.retain(|path, _| seen.contains(path));
        if self.cache.len() != before {
            self.generation += 1;
        }
    }

    /// Every spec read, and those that could not be.
    fn snapshot(&self) -> SpecSnapshot {
        let mut snapshot = SpecSnapshot::default();
        for (path, cached) in &self.cache {
            match &cached.parsed {
                Ok(spec) if spec.kind == self.own_kind => {}
                Ok(spec) => snapshot.specs.push(spec.clone()),
                Err(reason) => snapshot.broken.push(BrokenSpec {
                    path: path.clone(),
                    reason: reason.clone(),
                }),
            }
        }
        snapshot
    }
}

/// The vendor device chosen for one accelerator, or why there is none.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AcceleratorVendor {
    /// Fully qualified CDI id, `nvidia.com/gpu=GPU-<uuid>`.
    pub device_id: Option<String>,
    /// Spec file the device came from.
    pub spec_path: Option<PathBuf>,
    /// Each names the spec file and the GPU.
    pub warnings: Vec<String>,
}

/// Per accelerator (by PCI address): its vendor device and warnings.
pub type VendorMatches = BTreeMap<PciAddress, AcceleratorVendor>;

/// The CDI vendor domain a kind of accelerator's toolkit writes, to tell which specs concern
/// it even when none of their devices point at a GPU we know.
fn vendor_domain(kind: AcceleratorKind) -> Option<&'static str> {
    match kind {
        AcceleratorKind::NvidiaGpu => Some("nvidia.com/"),
        AcceleratorKind::AmdGpu => Some("amd.com/"),
        AcceleratorKind::ProcessingAccelerator => None,
    }
}

/// Device names that stand for more than one GPU (`all`) or part of one (MIG: `0:1`,
/// `MIG-<uuid>`): never the vendor device of a whole GPU.
fn names_one_whole_device(name: &str) -> bool {
    name != "all" && !name.contains(':') && !name.starts_with("MIG-")
}

/// Whether a device name is a UUID, as nvidia-ctk's `uuid` naming strategy writes it.
fn is_uuid_name(name: &str) -> bool {
    name.starts_with("GPU-")
}

/// A device node path relative to `/dev` (`nvidia3`, `dri/renderD128`).
fn dev_relative(path: &str) -> Option<&str> {
    path.strip_prefix("/dev/").filter(|p| !p.is_empty())
}

/// Matches every accelerator of the inventory to at most one vendor device. A device belongs
/// to an accelerator when every one of its nodes that some accelerator owns (by path below
/// `/dev` or by major:minor; the inventory's nodes come from the accelerator's own sysfs and
/// procfs entries, e.g. `/proc/driver/nvidia/gpus/<BDF>/information`'s `Device Minor`) is
/// owned by that accelerator alone. A UUID-named device must also carry that accelerator's
/// UUID: one that does not is a stale spec. Among several devices the UUID-named one wins.
pub fn match_inventory(snapshot: &SpecSnapshot, inventory: &Inventory) -> VendorMatches {
    let accelerators: Vec<&Accelerator> =
        inventory.accelerators.iter().filter(|a| !a.vfio).collect();
    let mut by_path: BTreeMap<&str, PciAddress> = BTreeMap::new();
    let mut by_numbers: BTreeMap<(i64, i64), PciAddress> = BTreeMap::new();
    for a in &accelerators {
        for c in &a.char_devices {
            by_path.insert(c.path.as_str(), a.pci.address);
            by_numbers.insert((i64::from(c.major), i64::from(c.minor)), a.pci.address);
        }
    }
    let owner = |node: &VendorNode| -> Option<PciAddress> {
        if let Some(numbers) = node.numbers
            && let Some(a) = by_numbers.get(&numbers)
        {
            return Some(*a);
        }
        [Some(node.path.as_str()), node.host_path.as_deref()]
            .into_iter()
            .flatten()
            .filter_map(dev_relative)
            .find_map(|p| by_path.get(p).copied())
    };

    let mut matches = VendorMatches::new();
    for a in &accelerators {
        let gpu = accelerator_device_name(&a.pci.address);
        let mut result = AcceleratorVendor::default();
        // (uuid-named, spec path, device name) of every device that is this GPU's.
        let mut candidates: Vec<(bool, &VendorSpec, &VendorDevice)> = Vec::new();
        let mut concerned: Vec<&VendorSpec> = Vec::new();
        for spec in &snapshot.specs {
            let mut touches_kind = vendor_domain(a.kind).is_some_and(|d| spec.kind.starts_with(d));
            for device in &spec.devices {
                let owners: BTreeSet<PciAddress> = device.nodes.iter().filter_map(owner).collect();
                touches_kind |= owners.iter().any(|o| {
                    accelerators
                        .iter()
                        .any(|x| x.pci.address == *o && x.kind == a.kind)
                });
                if owners.len() != 1
                    || !owners.contains(&a.pci.address)
                    || !names_one_whole_device(&device.name)
                {
                    continue;
                }
                if is_uuid_name(&device.name) {
                    let ours = a
                        .uuid
                        .as_deref()
                        .is_some_and(|u| u.eq_ignore_ascii_case(&device.name));
                    if !ours {
                        result.warnings.push(format!(
                            "vendor CDI spec {}: device {:?} points at GPU {gpu} ({}), whose UUID is {}: the spec is stale (regenerate it, e.g. nvidia-ctk cdi generate)",
                            spec.path.display(),
                            device.name,
                            a.pci.address,
                            a.uuid.as_deref().unwrap_or("unknown"),
                        ));
                        continue;
                    }
                }
                candidates.push((is_uuid_name(&device.name), spec, device));
            }
            if touches_kind {
                concerned.push(spec);
            }
        }
        // UUID-named first, then by spec file and device name for a stable choice.
        candidates.sort_by(|x, y| {
            y.0.cmp(&x.0)
                .then_with(|| x.1.path.cmp(&y.1.path))
                .then_with(|| x.2.name.cmp(&y.2.name))
        });
        if let Some((_, spec, device)) = candidates.first() {
            result.device_id = Some(format!("{}={}", spec.kind, device.name));
            result.spec_path = Some(spec.path.clone());
        } else {
            for spec in concerned {
                result.warnings.push(format!(
                    "vendor CDI spec {} ({}) has no device for GPU {gpu} ({}): the GPU gets Tandem's device nodes only",
                    spec.path.display(),
                    spec.kind,
                    a.pci.address,
                ));
            }
        }
        for broken in &snapshot.broken {
            result.warnings.push(format!(
                "vendor CDI spec {} is not usable ({}); GPU {gpu} ({}) does not get its devices",
                broken.path.display(),
                broken.reason,
                a.pci.address,
            ));
        }
        matches.insert(a.pci.address, result);
    }
    matches
}

/// Which GPU has which vendor device, for `tandem topo` and `tandem demo`: one line per GPU
/// (`gpu-0000-1b-00-0  nvidia.com/gpu=GPU-...`, or `none` and the first warning).
pub fn render_text(matches: &VendorMatches) -> String {
    let mut out = String::new();
    for (address, found) in matches {
        let name = accelerator_device_name(address);
        match &found.device_id {
            Some(id) => out.push_str(&format!("  {name}  {id}\n")),
            None => {
                let why = found.warnings.first().map(String::as_str).unwrap_or("");
                out.push_str(&format!("  {name}  none  {why}\n"));
            }
        }
    }
    out
}

/// `{"gpu-0000-1b-00-0": "nvidia.com/gpu=GPU-...", "gpu-...": null}`.
pub fn to_json(matches: &VendorMatches) -> serde_json::Value {
    serde_json::Value::Object(
        matches
            .iter()
            .map(|(address, found)| {
                (
                    accelerator_device_name(address),
                    found
                        .device_id
                        .clone()
                        .map_or(serde_json::Value::Null, serde_json::Value::String),
                )
            })
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn yaml_and_json_specs_parse_and_bad_ones_say_why() {
        let yaml = "cdiVersion: 0.5.0\nkind: nvidia.com/gpu\ndevices:\n- name: \"0\"\n  containerEdits:\n    deviceNodes:\n    - path: /dev/nvidia0\ncontainerEdits:\n  env:\n  - NVIDIA_VISIBLE_DEVICES=void\n";
        let spec = parse_spec(Path::new("/etc/cdi/nvidia.yaml"), yaml).unwrap();
        assert_eq!(spec.kind, "nvidia.com/gpu");
        assert_eq!(spec.devices[0].name, "0");
        assert_eq!(spec.devices[0].nodes[0].path, "/dev/nvidia0");
        let json = r#"{"cdiVersion":"0.6.0","kind":"amd.com/gpu","devices":[{"name":"1","containerEdits":{"deviceNodes":[{"path":"/dev/dri/renderD129","major":226,"minor":129}]}}]}"#;
        let spec = parse_spec(Path::new("/var/run/cdi/amd.json"), json).unwrap();
        assert_eq!(spec.devices[0].nodes[0].numbers, Some((226, 129)));
        assert!(parse_spec(Path::new("x.yaml"), "kind: [").is_err());
        assert!(parse_spec(Path::new("x.json"), "{}").is_err());
        assert!(parse_spec(Path::new("x.yaml"), "kind: nogpu\ndevices: []\n").is_err());
    }

    #[test]
    fn device_names_for_one_whole_gpu() {
        assert!(names_one_whole_device("3"));
        assert!(names_one_whole_device("GPU-5b1a7a2c"));
        assert!(!names_one_whole_device("all"));
        assert!(!names_one_whole_device("0:1"));
        assert!(!names_one_whole_device("MIG-7d8e"));
    }
}

//! Driver-root mode, for clusters whose GPU driver is installed in a directory of the host
//! and no vendor CDI spec describes it (GKE's `/home/kubernetes/bin/nvidia`, the GPU
//! Operator's driver container root `/run/nvidia/driver`, a ROCm install): found and checked
//! once at start-up, then mounted read-only into every GPU container of a claim at
//! `--gpu-driver-mount` (default `/usr/local/nvidia`), with `LD_LIBRARY_PATH` and `PATH` set
//! as GKE's device plugin does.

use super::cdi::{ContainerEdits, Mount};
use crate::topology::AcceleratorKind;
use std::path::{Path, PathBuf};

/// Where GKE's device plugin mounts the driver and CUDA images expect it.
pub const DEFAULT_DRIVER_MOUNT: &str = "/usr/local/nvidia";

/// Whose user space the root holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DriverVendor {
    Nvidia,
    Amd,
}

/// A driver root that holds the driver's libraries, with what the claim's CDI spec mounts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DriverRoot {
    pub root: PathBuf,
    pub mount: PathBuf,
    pub vendor: DriverVendor,
    mounts: Vec<Mount>,
    env: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum DriverRootError {
    #[error("--gpu-driver-root {0}: not an absolute path")]
    NotAbsolute(PathBuf),
    #[error("--gpu-driver-mount {0}: not an absolute path")]
    MountNotAbsolute(PathBuf),
    #[error(
        "--gpu-driver-root {root}: no libcuda.so* (NVIDIA) nor libhsa-runtime64.so* / libamdhip64.so* (AMD ROCm) in any of {searched}; give the directory the driver is installed in (GKE: /home/kubernetes/bin/nvidia, GPU Operator driver container: /run/nvidia/driver) and mount it into the plugin's pod at the same path"
    )]
    NoDriverLibraries { root: PathBuf, searched: String },
    #[error("--gpu-driver-root: {} is not UTF-8", .0.display())]
    NotUtf8(PathBuf),
}

/// Library directories of an install directory (GKE, ROCm): mounted whole.
const INSTALL_LIB_DIRS: &[&str] = &["lib64", "lib"];
/// Library directories of a root file system (a driver container's root): only the driver's
/// own files are mounted, never the root's C library.
const ROOTFS_LIB_DIRS: &[&str] = &[
    "usr/lib/x86_64-linux-gnu",
    "usr/lib/aarch64-linux-gnu",
    "usr/lib64",
    "usr/lib",
];
const NVIDIA_MARKER: &str = "libcuda.so";
const AMD_MARKERS: &[&str] = &["libhsa-runtime64.so", "libamdhip64.so"];
/// Driver files in a root file system's library directory.
const NVIDIA_LIB_PREFIXES: &[&str] =
    &["libcuda.so", "libnvidia-", "libnvcuvid.so", "libnvoptix.so"];
const RO: [&str; 4] = ["ro", "nosuid", "nodev", "bind"];
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

impl DriverRoot {
    /// Looks for the driver's libraries below `root`; errors name what was searched.
    pub fn discover(root: &Path, mount: &Path) -> Result<Self, DriverRootError> {
        if !root.is_absolute() {
            return Err(DriverRootError::NotAbsolute(root.to_path_buf()));
        }
        if !mount.is_absolute() {
            return Err(DriverRootError::MountNotAbsolute(mount.to_path_buf()));
        }
        let text = |p: &Path| {
            p.to_str()
                .map(String::from)
                .ok_or_else(|| DriverRootError::NotUtf8(p.to_path_buf()))
        };
        // An install directory keeps its layout (`lib64` stays `lib64`, ROCm's `lib` stays
        // `lib`); a root file system's driver files all go to `lib64`.
        let mut lib_target = mount.join("lib64");
        let bin_target = mount.join("bin");
        let mut mounts = Vec::new();
        let mut found = None;
        for dir in INSTALL_LIB_DIRS {
            let host = root.join(dir);
            if let Some(vendor) = vendor_of(&host) {
                lib_target = mount.join(dir);
                mounts.push(ro_mount(text(&host)?, text(&lib_target)?));
                let bin = root.join("bin");
                if bin.is_dir() {
                    mounts.push(ro_mount(text(&bin)?, text(&bin_target)?));
                }
                found = Some(vendor);
                break;
            }
        }
        if found.is_none() {
            for dir in ROOTFS_LIB_DIRS {
                let host = root.join(dir);
                if vendor_of(&host) != Some(DriverVendor::Nvidia) {
                    continue;
                }
                for name in file_names(&host) {
                    if NVIDIA_LIB_PREFIXES.iter().any(|p| name.starts_with(p)) {
                        mounts.push(ro_mount(
                            text(&host.join(&name))?,
                            text(&lib_target.join(&name))?,
                        ));
                    }
                }
                let bin = root.join("usr/bin");
                for name in file_names(&bin) {
                    if name.starts_with("nvidia-") {
                        mounts.push(ro_mount(
                            text(&bin.join(&name))?,
                            text(&bin_target.join(&name))?,
                        ));
                    }
                }
                found = Some(DriverVendor::Nvidia);
                break;
            }
        }
        let Some(vendor) = found else {
            let searched: Vec<String> = INSTALL_LIB_DIRS
                .iter()
                .chain(ROOTFS_LIB_DIRS)
                .map(|d| root.join(d).display().to_string())
                .collect();
            return Err(DriverRootError::NoDriverLibraries {
                root: root.to_path_buf(),
                searched: searched.join(", "),
            });
        };
        let mut env = vec![format!("LD_LIBRARY_PATH={}", text(&lib_target)?)];
        let bin_text = text(&bin_target)?;
        if mounts
            .iter()
            .any(|m| m.container_path.starts_with(&bin_text))
        {
            env.push(format!("PATH={bin_text}:{DEFAULT_PATH}"));
        }
        Ok(Self {
            root: root.to_path_buf(),
            mount: mount.to_path_buf(),
            vendor,
            mounts,
            env,
        })
    }

    /// Whether this root's user space is for accelerators of `kind`.
    pub fn serves(&self, kind: AcceleratorKind) -> bool {
        matches!(
            (self.vendor, kind),
            (DriverVendor::Nvidia, AcceleratorKind::NvidiaGpu)
                | (DriverVendor::Amd, AcceleratorKind::AmdGpu)
        )
    }

    /// The mounts and env a GPU device of a claim gets.
    pub fn edits(&self) -> ContainerEdits {
        ContainerEdits {
            env: self.env.clone(),
            mounts: self.mounts.clone(),
            ..ContainerEdits::default()
        }
    }
}

fn ro_mount(host_path: String, container_path: String) -> Mount {
    Mount {
        host_path,
        container_path,
        options: RO.map(String::from).to_vec(),
    }
}

fn file_names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok())
                .filter_map(|e| e.file_name().into_string().ok())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

fn vendor_of(dir: &Path) -> Option<DriverVendor> {
    let names = file_names(dir);
    if names.iter().any(|n| n.starts_with(NVIDIA_MARKER)) {
        Some(DriverVendor::Nvidia)
    } else if names
        .iter()
        .any(|n| AMD_MARKERS.iter().any(|m| n.starts_with(m)))
    {
        Some(DriverVendor::Amd)
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn touch(path: &Path) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, b"").unwrap();
    }

    #[test]
    fn gke_install_dir_is_mounted_whole_with_gke_env() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("home/kubernetes/bin/nvidia");
        touch(&root.join("lib64/libcuda.so.580.95.05"));
        touch(&root.join("bin/nvidia-smi"));
        let r = DriverRoot::discover(&root, Path::new(DEFAULT_DRIVER_MOUNT)).unwrap();
        assert_eq!(r.vendor, DriverVendor::Nvidia);
        let e = r.edits();
        let pairs: Vec<(&str, &str)> = e
            .mounts
            .iter()
            .map(|m| (m.host_path.as_str(), m.container_path.as_str()))
            .collect();
        let lib = root.join("lib64");
        let bin = root.join("bin");
        assert_eq!(
            pairs,
            [
                (lib.to_str().unwrap(), "/usr/local/nvidia/lib64"),
                (bin.to_str().unwrap(), "/usr/local/nvidia/bin"),
            ]
        );
        assert!(e.mounts.iter().all(|m| m.options.contains(&"ro".into())));
        assert_eq!(
            e.env,
            [
                "LD_LIBRARY_PATH=/usr/local/nvidia/lib64",
                "PATH=/usr/local/nvidia/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
            ]
        );
        assert!(r.serves(AcceleratorKind::NvidiaGpu));
        assert!(!r.serves(AcceleratorKind::AmdGpu));
    }

    #[test]
    fn driver_container_root_mounts_only_driver_files() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("run/nvidia/driver");
        let lib = root.join("usr/lib/x86_64-linux-gnu");
        touch(&lib.join("libcuda.so.580.95.05"));
        touch(&lib.join("libnvidia-ml.so.580.95.05"));
        touch(&lib.join("libc.so.6"));
        touch(&root.join("usr/bin/nvidia-smi"));
        touch(&root.join("usr/bin/bash"));
        let r = DriverRoot::discover(&root, Path::new("/usr/local/nvidia")).unwrap();
        let targets: Vec<String> = r
            .edits()
            .mounts
            .iter()
            .map(|m| m.container_path.clone())
            .collect();
        assert_eq!(
            targets,
            [
                "/usr/local/nvidia/lib64/libcuda.so.580.95.05",
                "/usr/local/nvidia/lib64/libnvidia-ml.so.580.95.05",
                "/usr/local/nvidia/bin/nvidia-smi",
            ]
        );
    }

    #[test]
    fn rocm_root_is_amd_and_an_empty_root_is_refused_clearly() {
        let dir = tempfile::tempdir().unwrap();
        let rocm = dir.path().join("opt/rocm");
        touch(&rocm.join("lib/libhsa-runtime64.so.1"));
        let r = DriverRoot::discover(&rocm, Path::new("/opt/rocm")).unwrap();
        assert_eq!(r.vendor, DriverVendor::Amd);
        assert_eq!(r.edits().mounts[0].container_path, "/opt/rocm/lib");
        assert_eq!(r.edits().env, ["LD_LIBRARY_PATH=/opt/rocm/lib"]);
        assert!(r.serves(AcceleratorKind::AmdGpu));
        let empty = dir.path().join("empty");
        std::fs::create_dir_all(&empty).unwrap();
        let e = DriverRoot::discover(&empty, Path::new("/usr/local/nvidia"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("libcuda.so") && e.contains("lib64"), "{e}");
        assert!(DriverRoot::discover(Path::new("rel"), Path::new("/x")).is_err());
    }
}

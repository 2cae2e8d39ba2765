//! The plugin's Unix sockets and the rolling-update lock: where they live, binding them
//! (stale file removed first, mode 0600), removing them on shutdown, and the flock that
//! serializes prepare/unprepare between the old and the new pod.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};
use tokio::net::UnixListener;

/// Where the kubelet's plugin watcher looks for registration sockets.
pub const DEFAULT_KUBELET_REGISTRY_DIR: &str = "/var/lib/kubelet/plugins_registry";
/// The kubelet's directory of per-driver plugin directories (`<dir>/<driver>/dra.sock`).
pub const DEFAULT_KUBELET_PLUGINS_DIR: &str = "/var/lib/kubelet/plugins";
/// `<registry dir>/<driver>-reg.sock` (`<driver>-<pod uid>-reg.sock` in rolling-update mode).
pub const REGISTRATION_SOCKET_SUFFIX: &str = "-reg.sock";
/// `<plugins dir>/<driver>/dra.sock` (`dra-<pod uid>.sock` in rolling-update mode).
pub const DRA_SOCKET_STEM: &str = "dra";
/// File in the plugin directory whose flock serializes prepare/unprepare across the old and
/// the new pod during a rolling update.
pub const SERIALIZE_LOCK_FILE: &str = "serialize.lock";

/// Why a socket could not be bound or the rolling-update lock taken. Each names its path.
#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    /// The socket's or lock's parent directory could not be created.
    #[error("creating directory {path}: {source}")]
    CreateDir {
        /// The directory.
        path: PathBuf,
        /// Why it could not be created.
        source: io::Error,
    },
    /// A file left at the socket path could not be removed.
    #[error("removing stale socket {path}: {source}")]
    RemoveStale {
        /// The socket path.
        path: PathBuf,
        /// Why the file could not be removed (or examined).
        source: io::Error,
    },
    /// A directory sits where the socket should be; it is not ours to remove.
    #[error("{path} exists and is a directory, not a socket")]
    IsDirectory {
        /// The socket path.
        path: PathBuf,
    },
    /// `bind` failed (a path too long for a Unix socket, permissions, ...).
    #[error("binding Unix socket {path}: {source}")]
    Bind {
        /// The socket path.
        path: PathBuf,
        /// Why `bind` failed.
        source: io::Error,
    },
    /// The socket could not be restricted to its owner.
    #[error("setting mode 0600 on {path}: {source}")]
    Chmod {
        /// The socket path.
        path: PathBuf,
        /// Why `chmod` failed.
        source: io::Error,
    },
    /// The lock file could not be opened or created.
    #[error("opening lock file {path}: {source}")]
    OpenLock {
        /// The lock file.
        path: PathBuf,
        /// Why it could not be opened.
        source: io::Error,
    },
    /// `flock` failed.
    #[error("locking {path}: {source}")]
    Lock {
        /// The lock file.
        path: PathBuf,
        /// Why `flock` failed.
        source: nix::Error,
    },
    /// The blocking task waiting for the lock panicked or was cancelled.
    #[error("lock task for {path} did not finish: {message}")]
    LockTask {
        /// The lock file.
        path: PathBuf,
        /// The task's join error.
        message: String,
    },
}

/// Where the kubelet finds this instance: the registration socket it watches for, the DRA
/// socket named in GetInfo, and (rolling update only) the lock shared with the other pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SocketPaths {
    /// `<registry dir>/<driver>-reg.sock`, or `<driver>-<uid>-reg.sock` in rolling-update mode.
    pub registration: PathBuf,
    /// `<plugins dir>/<driver>/dra.sock`, or `dra-<uid>.sock` in rolling-update mode.
    pub dra: PathBuf,
    /// `<plugins dir>/<driver>`, the plugin's data directory.
    pub plugin_dir: PathBuf,
    /// `<plugin dir>/serialize.lock` when rolling updates are on.
    pub serialize_lock: Option<PathBuf>,
}

impl SocketPaths {
    /// The paths the kubelet expects for `driver_name`; `pod_uid` selects rolling-update mode,
    /// in which the old and the new pod each have their own sockets.
    pub fn new(
        driver_name: &str,
        registry_dir: &Path,
        plugins_dir: &Path,
        pod_uid: Option<&str>,
    ) -> Self {
        let plugin_dir = plugins_dir.join(driver_name);
        let (registration_name, dra_name) = match pod_uid {
            Some(uid) => (
                format!("{driver_name}-{uid}{}", REGISTRATION_SOCKET_SUFFIX),
                format!("{}-{uid}.sock", DRA_SOCKET_STEM),
            ),
            None => (
                format!("{driver_name}{}", REGISTRATION_SOCKET_SUFFIX),
                format!("{}.sock", DRA_SOCKET_STEM),
            ),
        };
        Self {
            registration: registry_dir.join(registration_name),
            dra: plugin_dir.join(dra_name),
            serialize_lock: pod_uid.map(|_| plugin_dir.join(SERIALIZE_LOCK_FILE)),
            plugin_dir,
        }
    }
}

/// Binds a Unix socket at `path`: creates the parent directory, removes a stale socket left
/// by an earlier run (the kernel refuses to bind over an existing file), then restricts the
/// socket to its owner, because anyone who can connect can prepare devices.
pub fn bind_socket(path: &Path) -> Result<UnixListener, SocketError> {
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent).map_err(|source| SocketError::CreateDir {
            path: parent.to_path_buf(),
            source,
        })?;
    }
    remove_stale(path)?;
    let listener = UnixListener::bind(path).map_err(|source| SocketError::Bind {
        path: path.to_path_buf(),
        source,
    })?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o600)).map_err(|source| {
        SocketError::Chmod {
            path: path.to_path_buf(),
            source,
        }
    })?;
    Ok(listener)
}

fn remove_stale(path: &Path) -> Result<(), SocketError> {
    match fs::symlink_metadata(path) {
        Ok(meta) if meta.is_dir() => Err(SocketError::IsDirectory {
            path: path.to_path_buf(),
        }),
        Ok(_) => fs::remove_file(path).map_err(|source| SocketError::RemoveStale {
            path: path.to_path_buf(),
            source,
        }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(SocketError::RemoveStale {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// True if `path` is a Unix socket right now (the kubelet wipes its registry directory on
/// restart, and a plain file in its place would not be ours either).
pub fn socket_exists(path: &Path) -> bool {
    fs::symlink_metadata(path)
        .map(|meta| meta.file_type().is_socket())
        .unwrap_or(false)
}

/// Removes one of our sockets on shutdown; a socket already gone is fine.
pub fn remove_socket(path: &Path) {
    match fs::remove_file(path) {
        Ok(()) => tracing::debug!(socket = %path.display(), "removed socket"),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => tracing::warn!(socket = %path.display(), error = %e, "cannot remove socket"),
    }
}

/// The exclusive flock on `serialize.lock`. Two plugin pods run side by side during a rolling
/// update and the kubelet may send prepare to one and unprepare to the other, so the lock has
/// to live in the filesystem, not in memory.
#[derive(Clone, Debug)]
pub struct SerializeLock {
    path: PathBuf,
}

/// Held while one prepare or unprepare runs; dropping it releases the flock.
#[derive(Debug)]
pub struct SerializeGuard {
    _lock: Flock<File>,
}

impl SerializeLock {
    /// The lock on the file at `path` (created on first use); nothing is locked yet.
    pub fn new(path: PathBuf) -> Self {
        Self { path }
    }

    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Waits for the exclusive lock. flock blocks the calling thread, so it runs on the
    /// blocking pool; each call opens its own file description, which makes concurrent
    /// calls inside this process wait for each other too.
    pub async fn acquire(&self) -> Result<SerializeGuard, SocketError> {
        let path = self.path.clone();
        tokio::task::spawn_blocking(move || lock_exclusive(&path))
            .await
            .map_err(|e| SocketError::LockTask {
                path: self.path.clone(),
                message: e.to_string(),
            })?
    }
}

fn lock_exclusive(path: &Path) -> Result<SerializeGuard, SocketError> {
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent).map_err(|source| SocketError::CreateDir {
            path: parent.to_path_buf(),
            source,
        })?;
    }
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(path)
        .map_err(|source| SocketError::OpenLock {
            path: path.to_path_buf(),
            source,
        })?;
    let lock =
        Flock::lock(file, FlockArg::LockExclusive).map_err(|(_, source)| SocketError::Lock {
            path: path.to_path_buf(),
            source,
        })?;
    Ok(SerializeGuard { _lock: lock })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    #[test]
    fn default_names_follow_the_kubelet_helper() {
        let paths = SocketPaths::new(
            "tandem.dev",
            Path::new("/var/lib/kubelet/plugins_registry"),
            Path::new("/var/lib/kubelet/plugins"),
            None,
        );
        assert_eq!(
            paths.registration,
            Path::new("/var/lib/kubelet/plugins_registry/tandem.dev-reg.sock")
        );
        assert_eq!(
            paths.dra,
            Path::new("/var/lib/kubelet/plugins/tandem.dev/dra.sock")
        );
        assert_eq!(paths.serialize_lock, None);
    }

    #[test]
    fn rolling_update_names_carry_the_pod_uid() {
        let paths = SocketPaths::new("d.io", Path::new("/r"), Path::new("/p"), Some("abc"));
        assert_eq!(paths.registration, Path::new("/r/d.io-abc-reg.sock"));
        assert_eq!(paths.dra, Path::new("/p/d.io/dra-abc.sock"));
        assert_eq!(
            paths.serialize_lock.as_deref(),
            Some(Path::new("/p/d.io/serialize.lock"))
        );
    }

    #[tokio::test]
    async fn bind_replaces_stale_file_and_restricts_mode() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/x.sock");
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(&path, b"stale").unwrap();
        let _listener = bind_socket(&path).unwrap();
        let meta = fs::symlink_metadata(&path).unwrap();
        assert!(meta.file_type().is_socket());
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        assert!(socket_exists(&path));
        remove_socket(&path);
        assert!(!socket_exists(&path));
    }

    #[tokio::test]
    async fn bind_refuses_a_directory() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.sock");
        fs::create_dir(&path).unwrap();
        assert!(matches!(
            bind_socket(&path),
            Err(SocketError::IsDirectory { .. })
        ));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn serialize_lock_excludes_concurrent_holders() {
        let dir = tempfile::tempdir().unwrap();
        let lock = SerializeLock::new(dir.path().join("serialize.lock"));
        let inside = Arc::new(AtomicUsize::new(0));
        let most_inside = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for _ in 0..8 {
            let (lock, inside, most_inside) = (lock.clone(), inside.clone(), most_inside.clone());
            tasks.push(tokio::spawn(async move {
                let _guard = lock.acquire().await.unwrap();
                let now = inside.fetch_add(1, Ordering::SeqCst) + 1;
                most_inside.fetch_max(now, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(5)).await;
                inside.fetch_sub(1, Ordering::SeqCst);
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(most_inside.load(Ordering::SeqCst), 1);
    }
}

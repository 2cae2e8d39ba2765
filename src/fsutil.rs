//! Crash-safe file writes and removals for the CDI and state directories: a reader (the
//! container runtime, a restarted plugin) sees either the old file or the new one, never half.
//! Every flush to disk goes through here and is counted, so benchmarks and tests can hold the
//! prepare path to its budget (docs/durability.md).

use std::fs::{self, File, Permissions};
use std::io::{self, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

/// fsync/fdatasync calls made through this module since the process started.
static FLUSHES: AtomicU64 = AtomicU64::new(0);

/// How many fsync/fdatasync calls this process made through the prepare path's writers.
pub fn flush_count() -> u64 {
    FLUSHES.load(Ordering::Relaxed)
}

fn counted<T>(flush: impl FnOnce() -> io::Result<T>) -> io::Result<T> {
    FLUSHES.fetch_add(1, Ordering::Relaxed);
    flush()
}

/// Suffix of our temporary files. CDI loads only `*.json`/`*.yaml`, so a half-written temp file
/// left by a crash is never read by the runtime; `recover()` deletes it.
pub(crate) const TEMP_SUFFIX: &str = ".tmp";

/// Writes `contents` to `path` through a temp file in the same directory: write, fsync, set
/// the mode, rename over the target, fsync the directory so the rename itself is durable.
pub(crate) fn write_atomic(path: &Path, contents: &[u8], mode: u32) -> io::Result<()> {
    let (dir, _) = split_path(path)?;
    let temp = temp_with(path, contents, mode)?;
    counted(|| temp.as_file().sync_all())?;
    temp.persist(path).map_err(|e| e.error)?;
    sync_dir(dir)
}

/// Replaces `path` through a temp file and rename, with no flush: readers see the old file or
/// the new one, and a killed process loses nothing (the page cache outlives it). For files
/// whose loss in a power cut does not matter: those on tmpfs (CDI specs), and per-claim files
/// that the checkpoint's boot ID invalidates after a reboot anyway.
pub(crate) fn replace(path: &Path, contents: &[u8], mode: u32) -> io::Result<()> {
    let temp = temp_with(path, contents, mode)?;
    temp.persist(path).map_err(|e| e.error)?;
    Ok(())
}

/// Replaces `path` with exactly one flush: the temp file's data is flushed (fdatasync) before
/// the rename, so after a power cut the name holds the old content or the new, never a torn
/// or empty file. The rename itself is not flushed (no directory fsync): it reaches the disk
/// with the filesystem's next journal commit. Returns the file, renamed, for its identity.
pub(crate) fn replace_flushed(path: &Path, contents: &[u8], mode: u32) -> io::Result<File> {
    let temp = temp_with(path, contents, mode)?;
    counted(|| temp.as_file().sync_data())?;
    temp.persist(path).map_err(|e| e.error)
}

fn temp_with(path: &Path, contents: &[u8], mode: u32) -> io::Result<tempfile::NamedTempFile> {
    let (dir, file_name) = split_path(path)?;
    let mut temp = tempfile::Builder::new()
        .prefix(&format!(".{file_name}."))
        .suffix(TEMP_SUFFIX)
        .permissions(Permissions::from_mode(mode))
        .tempfile_in(dir)?;
    // The process umask must not decide who can read a CDI spec (the runtime) or the
    // checkpoint (root only): when it would have cleared bits of `mode` (or is unknown), the
    // mode is set again with fchmod. Under the usual 022 the create mode is exact, and every
    // file a prepare or an unprepare writes saves that system call.
    if umask_clears(process_umask(), mode) {
        temp.as_file()
            .set_permissions(Permissions::from_mode(mode))?;
    }
    temp.write_all(contents)?;
    Ok(temp)
}

/// The process's file-creation mask, read once from `/proc/self/status` (Linux 4.7 and
/// later); `None` when it cannot be read. Nothing in the process changes it.
fn process_umask() -> Option<u32> {
    static UMASK: OnceLock<Option<u32>> = OnceLock::new();
    *UMASK.get_or_init(|| {
        let status = fs::read_to_string("/proc/self/status").ok()?;
        parse_umask(&status)
    })
}

/// The `Umask:` field of a `/proc/<pid>/status` text (octal).
fn parse_umask(status: &str) -> Option<u32> {
    let value = status.lines().find_map(|l| l.strip_prefix("Umask:"))?;
    u32::from_str_radix(value.trim(), 8).ok()
}

/// Whether a file created with `mode` under `umask` would lack some of `mode`'s bits; an
/// unknown umask counts as one that does.
fn umask_clears(umask: Option<u32>, mode: u32) -> bool {
    umask.is_none_or(|umask| umask & mode != 0)
}

/// Removes a file; a file that is already gone counts as removed (unprepare is idempotent).
/// Returns whether something was removed.
pub(crate) fn remove_file_if_present(path: &Path) -> io::Result<bool> {
    match fs::remove_file(path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    }
}

/// Removes a directory tree; a missing one counts as removed. An empty directory (the usual
/// case: its files were removed one by one) costs one rmdir; only a directory with something
/// left in it (or not a directory) is walked.
pub(crate) fn remove_dir_if_present(path: &Path) -> io::Result<bool> {
    match fs::remove_dir(path) {
        Ok(()) => return Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(_) => {}
    }
    match fs::remove_dir_all(path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    }
}

/// Makes renames and unlinks in `dir` durable.
pub(crate) fn sync_dir(dir: &Path) -> io::Result<()> {
    let dir = File::open(dir)?;
    counted(|| dir.sync_all())
}

/// Runs `write`, which writes a file in `dir`. The directories are made at start, so they are
/// not checked before each write (a mkdir and a stat per file); only when `write` fails and
/// `dir` turns out to be gone (removed under the running process) is it made again, with
/// `mode`, and `write` run once more.
pub(crate) fn in_dir<T>(dir: &Path, mode: u32, write: impl Fn() -> io::Result<T>) -> io::Result<T> {
    match write() {
        Err(e) if !dir.is_dir() => {
            ensure_dir(dir, mode).map_err(|created| {
                io::Error::new(
                    created.kind(),
                    format!("{e}; creating the missing {}: {created}", dir.display()),
                )
            })?;
            write()
        }
        result => result,
    }
}

/// Creates a directory (and parents) with the given mode when it does not exist yet.
pub(crate) fn ensure_dir(path: &Path, mode: u32) -> io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    match fs::DirBuilder::new()
        .recursive(true)
        .mode(mode)
        .create(path)
    {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists && path.is_dir() => Ok(()),
        Err(e) => Err(e),
    }
}

fn split_path(path: &Path) -> io::Result<(&Path, String)> {
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty());
    let name = path.file_name().and_then(|n| n.to_str());
    match (dir, name) {
        (Some(dir), Some(name)) => Ok((dir, name.to_string())),
        (None, Some(name)) => Ok((Path::new("."), name.to_string())),
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} is not a file path", path.display()),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_write_replaces_content_sets_mode_and_leaves_no_temp_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("spec.json");
        write_atomic(&path, b"old", 0o600).unwrap();
        write_atomic(&path, b"new", 0o644).unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"new");
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o644);
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("spec.json")]);
    }

    #[test]
    fn replace_and_replace_flushed_swap_content_and_leave_no_temp_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("checkpoint.json");
        replace(&path, b"one", 0o600).unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"one");
        let file = replace_flushed(&path, b"two", 0o600).unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"two");
        use std::os::unix::fs::MetadataExt;
        assert_eq!(
            file.metadata().unwrap().ino(),
            fs::metadata(&path).unwrap().ino()
        );
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn the_create_mode_is_trusted_only_under_a_umask_that_keeps_its_bits() {
        let status = "Name:\ttandem\nUmask:\t0022\nState:\tS (sleeping)\n";
        assert_eq!(parse_umask(status), Some(0o022));
        assert_eq!(parse_umask("Name:\ttandem\n"), None);
        assert!(!umask_clears(Some(0o022), 0o644));
        assert!(!umask_clears(Some(0o022), 0o600));
        assert!(
            umask_clears(Some(0o077), 0o644),
            "a CDI spec the runtime could not read"
        );
        assert!(!umask_clears(Some(0o077), 0o600));
        assert!(umask_clears(None, 0o600));
        // What this process runs under is read, and files get exactly their mode either way
        // (the other tests check the modes on disk).
        assert!(process_umask().is_some());
    }

    #[test]
    fn a_write_recreates_its_missing_directory_once() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("cdi");
        let path = dir.join("spec.json");
        let calls = std::cell::Cell::new(0);
        let write = || {
            calls.set(calls.get() + 1);
            replace(&path, b"spec", 0o644)
        };
        in_dir(&dir, 0o755, write).unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"spec");
        assert_eq!(
            calls.get(),
            2,
            "failed once, then wrote in the new directory"
        );
        let mode = fs::metadata(&dir).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o755);
        in_dir(&dir, 0o755, write).unwrap();
        assert_eq!(calls.get(), 3, "an existing directory costs no retry");

        // A directory that cannot be made: the error says both what failed and why.
        let blocked = root.path().join("file");
        fs::write(&blocked, b"x").unwrap();
        let inside = blocked.join("sub");
        let error = in_dir(&inside, 0o755, || replace(&inside.join("a"), b"", 0o644))
            .unwrap_err()
            .to_string();
        assert!(error.contains("creating the missing"), "{error}");
        assert!(error.contains(&*inside.to_string_lossy()), "{error}");
    }

    #[test]
    fn directories_are_removed_empty_or_not() {
        let root = tempfile::tempdir().unwrap();
        let empty = root.path().join("empty");
        fs::create_dir(&empty).unwrap();
        assert!(remove_dir_if_present(&empty).unwrap());
        let full = root.path().join("full");
        fs::create_dir_all(full.join("nested")).unwrap();
        fs::write(full.join("nested/record.json"), b"{}").unwrap();
        assert!(remove_dir_if_present(&full).unwrap());
        assert!(!full.exists());
        assert!(!remove_dir_if_present(&full).unwrap());
    }

    #[test]
    fn removing_missing_files_is_not_an_error() {
        let dir = tempfile::tempdir().unwrap();
        assert!(!remove_file_if_present(&dir.path().join("gone")).unwrap());
        assert!(!remove_dir_if_present(&dir.path().join("gone-dir")).unwrap());
        let file = dir.path().join("here");
        fs::write(&file, b"x").unwrap();
        assert!(remove_file_if_present(&file).unwrap());
        assert!(!file.exists());
    }
}

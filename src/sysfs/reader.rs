//! Root-relative file access for discovery: every sysfs/procfs read goes through a
//! `RootedReader`, which resolves symlinks lexically inside its root (so a link can never lead
//! onto the real `/`) and turns each failure into a `ReadError` naming the file at fault.

use std::cell::RefCell;
use std::collections::{HashSet, VecDeque};
use std::ffi::OsString;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Component, Path, PathBuf};

/// More links than this while resolving one path is treated as a loop, like the kernel's
/// own limit of 40 for path walks.
const MAX_LINK_HOPS: usize = 40;

/// Sysfs attributes are at most one page; anything larger is not a sysfs attribute.
const MAX_ATTR_BYTES: u64 = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("{}: does not exist", path.display())]
    Missing { path: PathBuf },
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
    #[error("{}: expected {expected}, found {found:?}", path.display())]
    Malformed {
        path: PathBuf,
        expected: &'static str,
        found: String,
    },
    #[error("{}: symbolic link loop (more than {MAX_LINK_HOPS} links)", path.display())]
    LinkLoop { path: PathBuf },
    #[error("{}: expected a regular file, found a symbolic link", path.display())]
    UnexpectedLink { path: PathBuf },
}

impl ReadError {
    pub fn path(&self) -> &Path {
        match self {
            Self::Missing { path }
            | Self::Io { path, .. }
            | Self::Malformed { path, .. }
            | Self::LinkLoop { path }
            | Self::UnexpectedLink { path } => path,
        }
    }

    /// The message without the path, for a `DiscoveryProblem` which carries the path apart.
    pub fn message(&self) -> String {
        match self {
            Self::Missing { .. } => "does not exist".to_string(),
            Self::Io { source, .. } => source.to_string(),
            Self::Malformed {
                expected, found, ..
            } => format!("expected {expected}, found {found:?}"),
            Self::LinkLoop { .. } => {
                format!("symbolic link loop (more than {MAX_LINK_HOPS} links)")
            }
            Self::UnexpectedLink { .. } => {
                "expected a regular file, found a symbolic link".to_string()
            }
        }
    }

    pub fn is_missing(&self) -> bool {
        matches!(self, Self::Missing { .. })
    }

    pub fn is_not_directory(&self) -> bool {
        matches!(self, Self::Io { source, .. } if source.raw_os_error() == Some(nix::libc::ENOTDIR))
    }

    /// EINVAL on read is how some attributes (netdev `speed`, port `rate`) say "unknown now".
    pub fn is_invalid_argument(&self) -> bool {
        matches!(self, Self::Io { source, .. } if source.raw_os_error() == Some(nix::libc::EINVAL))
    }

    fn from_io(path: PathBuf, source: io::Error) -> Self {
        match source.kind() {
            io::ErrorKind::NotFound => Self::Missing { path },
            _ if source.raw_os_error() == Some(nix::libc::ELOOP) => Self::UnexpectedLink { path },
            _ => Self::Io { path, source },
        }
    }
}

/// One entry of a directory listing, with what `readdir` said it is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirEntry {
    pub name: String,
    pub is_symlink: bool,
}

/// Reads files below one root (`/sys` or `/proc`, or a fixture standing in for them).
#[derive(Debug)]
pub struct RootedReader {
    root: PathBuf,
    /// Root-relative paths already known to be real directories (not links), so that walking
    /// many devices below the same bridges checks each bridge directory once.
    known_dirs: RefCell<HashSet<PathBuf>>,
}

impl RootedReader {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self {
            root: root.into(),
            known_dirs: RefCell::new(HashSet::new()),
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The host path of a root-relative path, for messages and for opening.
    pub fn host_path(&self, rel: &Path) -> PathBuf {
        self.root.join(rel)
    }

    /// A directory whose root-relative path another reader of the same root has already
    /// resolved (so it holds no symlinks): lets a discovery thread pick up where another left
    /// off without walking the path again.
    pub(super) fn resolved_dir(&self, rel: PathBuf) -> SysDir<'_> {
        SysDir { reader: self, rel }
    }

    /// A directory below the root, every symlink on the way resolved inside the root.
    pub fn dir(&self, rel: impl AsRef<Path>) -> Result<SysDir<'_>, ReadError> {
        let resolved = self.resolve(Path::new(""), rel.as_ref())?;
        Ok(SysDir {
            reader: self,
            rel: resolved,
        })
    }

    /// Resolves `rel`, taken relative to the already resolved directory `base`, one component
    /// at a time: a symlink's text is spliced in place (an absolute target restarts at the
    /// root) and `..` never climbs above the root, the way `openat2(RESOLVE_IN_ROOT)` does.
    /// The last component must exist; it may be a file or a directory.
    fn resolve(&self, base: &Path, rel: &Path) -> Result<PathBuf, ReadError> {
        let mut pending: VecDeque<OsString> = VecDeque::new();
        let mut out = base.to_path_buf();
        push_components(&mut pending, &mut out, rel, false);
        let mut hops = 0usize;
        while let Some(name) = pending.pop_front() {
            if name == ".." {
                out.pop();
                continue;
            }
            out.push(&name);
            if self.known_dirs.borrow().contains(&out) {
                continue;
            }
            let host = self.root.join(&out);
            let meta =
                fs::symlink_metadata(&host).map_err(|e| ReadError::from_io(host.clone(), e))?;
            if meta.file_type().is_symlink() {
                hops += 1;
                if hops > MAX_LINK_HOPS {
                    return Err(ReadError::LinkLoop { path: host });
                }
                let target =
                    fs::read_link(&host).map_err(|e| ReadError::from_io(host.clone(), e))?;
                out.pop();
                push_components(&mut pending, &mut out, &target, true);
            } else if meta.is_dir() {
                self.known_dirs.borrow_mut().insert(out.clone());
            }
        }
        Ok(out)
    }
}

/// Queues the components of `path` (in front of `pending` for a link's target, which must be
/// walked before the rest). An absolute path restarts at the root of this reader, so a link
/// to `/devices/pci0000:00` means `<sysfs root>/devices/pci0000:00`, never the host's.
fn push_components(pending: &mut VecDeque<OsString>, out: &mut PathBuf, path: &Path, front: bool) {
    let mut names = Vec::new();
    for component in path.components() {
        match component {
            Component::RootDir | Component::Prefix(_) => {
                out.clear();
                names.clear();
            }
            Component::CurDir => {}
            Component::ParentDir => names.push(OsString::from("..")),
            Component::Normal(n) => names.push(n.to_os_string()),
        }
    }
    if front {
        for name in names.into_iter().rev() {
            pending.push_front(name);
        }
    } else {
        pending.extend(names);
    }
}

/// A resolved directory below a reader's root (no symlinks on its root-relative path).
#[derive(Clone, Debug)]
pub struct SysDir<'r> {
    reader: &'r RootedReader,
    rel: PathBuf,
}

impl<'r> SysDir<'r> {
    /// Root-relative path, e.g. `devices/pci0000:15/0000:15:01.0/0000:16:00.0`.
    pub fn rel(&self) -> &Path {
        &self.rel
    }

    /// The host path of this directory.
    pub fn path(&self) -> PathBuf {
        self.reader.host_path(&self.rel)
    }

    /// The host path of a file below this directory, for messages.
    pub fn file_path(&self, name: &str) -> PathBuf {
        self.reader.host_path(&self.rel.join(name))
    }

    /// A subdirectory (or a link to one), resolved inside the root.
    pub fn subdir(&self, rel: impl AsRef<Path>) -> Result<SysDir<'r>, ReadError> {
        let resolved = self.reader.resolve(&self.rel, rel.as_ref())?;
        Ok(SysDir {
            reader: self.reader,
            rel: resolved,
        })
    }

    /// The directory an entry of this directory names. An entry that `readdir` reported as a
    /// symlink (every `bus/pci/devices` entry) is read as a link straight away, which saves
    /// the `lstat` that resolving it by name would cost.
    pub fn entry_dir(&self, entry: &DirEntry) -> Result<SysDir<'r>, ReadError> {
        if !entry.is_symlink {
            return self.subdir(&entry.name);
        }
        let host = self.file_path(&entry.name);
        let target = fs::read_link(&host).map_err(|e| ReadError::from_io(host, e))?;
        let resolved = self.reader.resolve(&self.rel, &target)?;
        Ok(SysDir {
            reader: self.reader,
            rel: resolved,
        })
    }

    /// Like `subdir`, but `None` when it does not exist.
    pub fn opt_subdir(&self, rel: impl AsRef<Path>) -> Result<Option<SysDir<'r>>, ReadError> {
        match self.subdir(rel) {
            Ok(d) => Ok(Some(d)),
            Err(e) if e.is_missing() => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Entries sorted by name. Real subdirectories are remembered so that resolving them later
    /// costs no further `lstat`.
    pub fn entries(&self) -> Result<Vec<DirEntry>, ReadError> {
        let host = self.path();
        let iter = fs::read_dir(&host).map_err(|e| ReadError::from_io(host.clone(), e))?;
        let mut entries = Vec::new();
        for entry in iter {
            let entry = entry.map_err(|e| ReadError::from_io(host.clone(), e))?;
            let Ok(name) = entry.file_name().into_string() else {
                // Sysfs names are ASCII; a non-UTF-8 name is nothing discovery looks for.
                continue;
            };
            let file_type = entry
                .file_type()
                .map_err(|e| ReadError::from_io(host.join(&name), e))?;
            if file_type.is_dir() {
                self.reader
                    .known_dirs
                    .borrow_mut()
                    .insert(self.rel.join(&name));
            }
            entries.push(DirEntry {
                is_symlink: file_type.is_symlink(),
                name,
            });
        }
        entries.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(entries)
    }

    /// The text of an attribute file with surrounding whitespace removed. The file itself
    /// must not be a symlink (sysfs attributes never are), so it cannot lead out of the root.
    pub fn attr(&self, name: &str) -> Result<String, ReadError> {
        let host = self.file_path(name);
        let file = OpenOptions::new()
            .read(true)
            .custom_flags(nix::libc::O_NOFOLLOW)
            .open(&host)
            .map_err(|e| ReadError::from_io(host.clone(), e))?;
        read_text(file, host)
    }

    /// Like `attr`, but `None` when the file does not exist.
    pub fn opt_attr(&self, name: &str) -> Result<Option<String>, ReadError> {
        match self.attr(name) {
            Ok(s) => Ok(Some(s)),
            Err(e) if e.is_missing() => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// An attribute parsed by `parse`; `expected` describes the format for the error message.
    pub fn parsed<T>(
        &self,
        name: &str,
        expected: &'static str,
        parse: impl FnOnce(&str) -> Option<T>,
    ) -> Result<T, ReadError> {
        let text = self.attr(name)?;
        parse(&text).ok_or_else(|| ReadError::Malformed {
            path: self.file_path(name),
            expected,
            found: text,
        })
    }

    /// Like `parsed`, but `None` when the file does not exist.
    pub fn opt_parsed<T>(
        &self,
        name: &str,
        expected: &'static str,
        parse: impl FnOnce(&str) -> Option<T>,
    ) -> Result<Option<T>, ReadError> {
        match self.parsed(name, expected, parse) {
            Ok(v) => Ok(Some(v)),
            Err(e) if e.is_missing() => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The last component of a symlink's text (`driver` -> `.../drivers/nvidia` gives
    /// `nvidia`), `None` when the link does not exist. The link is never followed.
    pub fn link_name(&self, name: &str) -> Result<Option<String>, ReadError> {
        let host = self.file_path(name);
        let target = match fs::read_link(&host) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => {
                return Err(ReadError::Io {
                    path: host,
                    source: e,
                });
            }
        };
        match target.file_name().and_then(|n| n.to_str()) {
            Some(base) => Ok(Some(base.to_string())),
            None => Err(ReadError::Malformed {
                path: host,
                expected: "a link whose target ends in a name",
                found: target.display().to_string(),
            }),
        }
    }
    /// The target name of a link, parsed (`iommu_group` -> `21`); `None` when the link does
    /// not exist.
    pub fn parsed_link_name<T>(
        &self,
        name: &str,
        expected: &'static str,
        parse: impl FnOnce(&str) -> Option<T>,
    ) -> Result<Option<T>, ReadError> {
        let Some(target) = self.link_name(name)? else {
            return Ok(None);
        };
        match parse(&target) {
            Some(v) => Ok(Some(v)),
            None => Err(ReadError::Malformed {
                path: self.file_path(name),
                expected,
                found: target,
            }),
        }
    }
}

/// Reads a whole attribute. A read that returns fewer bytes than asked for is taken as the
/// end of the file: sysfs produces an attribute in one read, seq_file (procfs) fills what it
/// is asked for, and regular files (fixtures) only come up short at the end. That saves the
/// second, empty read (and the `fstat` of `read_to_end`) on every one of several hundred files.
fn read_text(mut file: File, path: PathBuf) -> Result<String, ReadError> {
    let mut bytes = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = match file.read(&mut chunk) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(ReadError::from_io(path, e)),
        };
        bytes.extend_from_slice(&chunk[..n]);
        if n < chunk.len() || bytes.len() as u64 >= MAX_ATTR_BYTES {
            break;
        }
    }
    match String::from_utf8(bytes) {
        Ok(s) => Ok(s.trim().to_string()),
        Err(e) => Err(ReadError::Malformed {
            path,
            expected: "UTF-8 text",
            found: String::from_utf8_lossy(e.as_bytes()).into_owned(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn tree() -> tempfile::TempDir {
        let t = tempfile::tempdir().unwrap();
        fs::create_dir_all(t.path().join("devices/pci0000:00/0000:00:01.0")).unwrap();
        fs::write(
            t.path().join("devices/pci0000:00/0000:00:01.0/vendor"),
            "0x10de\n",
        )
        .unwrap();
        fs::create_dir_all(t.path().join("bus/pci/devices")).unwrap();
        t
    }

    #[test]
    fn resolves_relative_links_inside_root() {
        let t = tree();
        symlink(
            "../../../devices/pci0000:00/0000:00:01.0",
            t.path().join("bus/pci/devices/0000:00:01.0"),
        )
        .unwrap();
        let r = RootedReader::new(t.path());
        let d = r.dir("bus/pci/devices/0000:00:01.0").unwrap();
        assert_eq!(d.rel(), Path::new("devices/pci0000:00/0000:00:01.0"));
        assert_eq!(d.attr("vendor").unwrap(), "0x10de");
    }

    #[test]
    fn absolute_and_escaping_links_stay_in_root() {
        let t = tree();
        symlink("/devices/pci0000:00", t.path().join("bus/abs")).unwrap();
        symlink("../../../../../../devices", t.path().join("bus/pci/up")).unwrap();
        let r = RootedReader::new(t.path());
        assert_eq!(
            r.dir("bus/abs").unwrap().rel(),
            Path::new("devices/pci0000:00")
        );
        assert_eq!(r.dir("bus/pci/up").unwrap().rel(), Path::new("devices"));
    }

    #[test]
    fn loops_and_dangling_links_are_errors() {
        let t = tree();
        symlink("b", t.path().join("bus/a")).unwrap();
        symlink("a", t.path().join("bus/b")).unwrap();
        symlink("nowhere", t.path().join("bus/dangling")).unwrap();
        let r = RootedReader::new(t.path());
        assert!(matches!(r.dir("bus/a"), Err(ReadError::LinkLoop { .. })));
        assert!(r.dir("bus/dangling").unwrap_err().is_missing());
    }

    #[test]
    fn attribute_symlinks_are_refused() {
        let t = tree();
        let dev = t.path().join("devices/pci0000:00/0000:00:01.0");
        symlink("/etc/hostname", dev.join("numa_node")).unwrap();
        let r = RootedReader::new(t.path());
        let d = r.dir("devices/pci0000:00/0000:00:01.0").unwrap();
        let err = d.attr("numa_node").unwrap_err();
        assert!(matches!(err, ReadError::UnexpectedLink { .. }), "{err}");
        assert!(err.path().ends_with("numa_node"));
    }

    #[test]
    fn parsed_reports_malformed_with_path() {
        let t = tree();
        let r = RootedReader::new(t.path());
        let d = r.dir("devices/pci0000:00/0000:00:01.0").unwrap();
        let err = d
            .parsed("vendor", "a decimal number", |s| s.parse::<u32>().ok())
            .unwrap_err();
        assert!(err.to_string().contains("vendor"), "{err}");
        assert!(err.to_string().contains("0x10de"), "{err}");
        assert_eq!(d.opt_attr("absent").unwrap(), None);
        assert_eq!(d.link_name("driver").unwrap(), None);
    }
}

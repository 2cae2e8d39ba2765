//! Walking a fixture or scratch tree the way the tests inspect it: every entry below a root,
//! never following symlinks (sysfs fixtures link back up the tree, so following would loop,
//! and a link's target is reported where it really lives).

use std::fs::FileType;
use std::path::{Path, PathBuf};

/// Every entry below `root` (not `root` itself) with its own type, a symlink as a link, sorted
/// by path. Directories that cannot be read are passed over.
pub fn entries_under(root: &Path) -> Vec<(PathBuf, FileType)> {
    let mut found = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let Ok(kind) = entry.file_type() else {
                continue;
            };
            if kind.is_dir() {
                stack.push(entry.path());
            }
            found.push((entry.path(), kind));
        }
    }
    found.sort_by(|a, b| a.0.cmp(&b.0));
    found
}

//! The rtnetlink shell of netattach: reads, moves and configures links. A netlink socket is
//! bound to the namespace it was created in, so every step runs on a dedicated thread that
//! first enters the namespace and then opens its own connection there.

use super::{InterfaceSnapshot, NetAttachError};
use std::fs::File;
use std::path::Path;

mod messages;
mod ops;
mod session;

pub use messages::{all_tables, interface_address};
pub use ops::{attach, interface_in_netns, move_and_configure, release, snapshot};

/// An open network namespace plus the label that error messages use for it.
#[derive(Debug)]
pub struct Netns {
    file: File,
    label: String,
}

impl Netns {
    /// Opens `/proc/<pid>/ns/net`, `/run/netns/<name>` or any other nsfs file.
    pub fn open(path: &Path) -> Result<Self, NetAttachError> {
        let file = File::open(path).map_err(|source| NetAttachError::OpenNamespace {
            path: path.to_path_buf(),
            source,
        })?;
        Ok(Self {
            file,
            label: path.display().to_string(),
        })
    }

    pub fn label(&self) -> &str {
        &self.label
    }

    pub(crate) fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        std::os::fd::AsFd::as_fd(&self.file)
    }

    /// Device and inode of the namespace; equal identities are the same namespace.
    pub fn identity(&self) -> Result<(u64, u64), NetAttachError> {
        use std::os::unix::fs::MetadataExt;
        let meta = self
            .file
            .metadata()
            .map_err(|source| NetAttachError::OpenNamespace {
                path: self.label.clone().into(),
                source,
            })?;
        Ok((meta.dev(), meta.ino()))
    }
}

/// What [`attach`] found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AttachOutcome {
    /// The interface was moved and configured; this is what release must restore.
    Attached(InterfaceSnapshot),
    /// The pod already has an interface of that name (second container of the pod).
    AlreadyPresent,
}

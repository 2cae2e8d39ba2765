//! The RDMA netlink socket and what is done with it: open it inside a namespace, ask for the
//! netns mode and the device list, and move a device between namespaces. Every error names
//! the namespace and the device.

use super::wire::{
    Attribute, DataMessage, DecodeError, IB_DEVICE_NAME_MAX, RDMA_NLDEV_ATTR_DEV_INDEX,
    RDMA_NLDEV_NET_NS_FD, RECEIVE_BUFFER, RdmaDevice, RdmaNetnsMode, ReplyCollector, ReplyError,
    RequestKind, devices_from_dump, encode_request,
};
use crate::netattach::Netns;
use nix::errno::Errno;
use nix::sched::{CloneFlags, setns};
use nix::sys::socket::{
    AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol, SockType, bind, recv, sendto,
    setsockopt, socket, sockopt,
};
use nix::sys::time::{TimeVal, TimeValLike};
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::time::{Duration, Instant};

/// What went wrong talking to the RDMA subsystem; every variant names the namespace and,
/// where one is involved, the device.
#[derive(Debug, thiserror::Error)]
pub enum RdmaError {
    #[error("invalid RDMA device name {name:?}: {reason}")]
    InvalidName { name: String, reason: &'static str },
    #[error("cannot enter network namespace {ns}: {source}")]
    EnterNamespace { ns: String, source: nix::Error },
    #[error("cannot open an RDMA netlink socket in namespace {ns}: {source}")]
    Socket { ns: String, source: nix::Error },
    #[error("{what} {device} in namespace {ns}: cannot send the request: {source}")]
    Send {
        what: &'static str,
        device: String,
        ns: String,
        source: nix::Error,
    },
    #[error("{what} {device} in namespace {ns}: cannot receive the reply: {source}")]
    Receive {
        what: &'static str,
        device: String,
        ns: String,
        source: nix::Error,
    },
    #[error("{what} {device} in namespace {ns} timed out after {after:?}")]
    Timeout {
        what: &'static str,
        device: String,
        ns: String,
        after: Duration,
    },
    #[error("{what} {device} in namespace {ns} failed: kernel answered {errno}")]
    Kernel {
        what: &'static str,
        device: String,
        ns: String,
        errno: Errno,
    },
    #[error("{what} {device} in namespace {ns}: malformed reply: {source}")]
    Malformed {
        what: &'static str,
        device: String,
        ns: String,
        source: DecodeError,
    },
    #[error("RDMA device {device} is in neither namespace {from} nor {to}")]
    NotFound {
        device: String,
        from: String,
        to: String,
    },
    #[error("RDMA namespace worker thread for {ns} panicked")]
    WorkerPanicked { ns: String },
}

/// RDMA device names are at most `IB_DEVICE_NAME_MAX - 1` bytes and become sysfs
/// directory names, so they cannot hold `/` or NUL.
pub fn validate_device_name(name: &str) -> Result<(), RdmaError> {
    let reason = if name.is_empty() {
        Some("empty")
    } else if name.len() >= IB_DEVICE_NAME_MAX {
        Some("longer than 63 bytes")
    } else if name
        .bytes()
        .any(|b| b == b'/' || b == 0 || b.is_ascii_whitespace())
    {
        Some("contains '/', NUL or whitespace")
    } else {
        None
    };
    match reason {
        Some(reason) => Err(RdmaError::InvalidName {
            name: name.to_string(),
            reason,
        }),
        None => Ok(()),
    }
}

/// An RDMA netlink socket in the namespace of the thread that opened it.
#[derive(Debug)]
pub struct RdmaNetlink {
    socket: OwnedFd,
    ns: String,
    timeout: Duration,
    seq: u32,
}

impl RdmaNetlink {
    /// Opens the socket in the calling thread's network namespace; `ns` labels errors.
    /// `Ok(None)` means the kernel has no RDMA subsystem (ib_core not loaded): the protocol
    /// is then unknown to netlink. Every later request waits at most `timeout`.
    pub fn open(ns: &str, timeout: Duration) -> Result<Option<Self>, RdmaError> {
        let socket_error = |source| RdmaError::Socket {
            ns: ns.to_string(),
            source,
        };
        let socket = match socket(
            AddressFamily::Netlink,
            SockType::Raw,
            SockFlag::SOCK_CLOEXEC,
            SockProtocol::NetlinkRDMA,
        ) {
            Ok(socket) => socket,
            Err(Errno::EPROTONOSUPPORT | Errno::EPFNOSUPPORT | Errno::EAFNOSUPPORT) => {
                return Ok(None);
            }
            Err(source) => return Err(socket_error(source)),
        };
        bind(socket.as_raw_fd(), &NetlinkAddr::new(0, 0)).map_err(socket_error)?;
        // Sequence numbers only need to differ between requests on this socket; starting
        // from the clock keeps two sockets' traces distinguishable.
        let seq = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(1);
        Ok(Some(Self {
            socket,
            ns: ns.to_string(),
            timeout,
            seq,
        }))
    }

    /// Sends one request and returns the data messages of its reply.
    fn request(
        &mut self,
        kind: RequestKind,
        device: &str,
        attributes: &[Attribute],
    ) -> Result<Vec<DataMessage>, RdmaError> {
        let what = kind.describe();
        self.seq = self.seq.wrapping_add(1);
        let seq = self.seq;
        let request = encode_request(kind, seq, attributes);
        let kernel = NetlinkAddr::new(0, 0);
        let send_error = |source| RdmaError::Send {
            what,
            device: device.to_string(),
            ns: self.ns.clone(),
            source,
        };
        let sent = sendto(
            self.socket.as_raw_fd(),
            &request,
            &kernel,
            MsgFlags::empty(),
        )
        .map_err(send_error)?;
        if sent != request.len() {
            return Err(send_error(Errno::EMSGSIZE));
        }

        let deadline = Instant::now() + self.timeout;
        let mut collector = ReplyCollector::new(seq);
        let mut buffer = vec![0u8; RECEIVE_BUFFER];
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                return Err(self.timed_out(what, device));
            }
            // SO_RCVTIMEO bounds each recv; re-arming it with what is left bounds the whole
            // reply, however many datagrams a dump takes.
            let micros = i64::try_from(remaining.as_micros())
                .unwrap_or(i64::MAX)
                .max(1_000);
            setsockopt(
                &self.socket,
                sockopt::ReceiveTimeout,
                &TimeVal::microseconds(micros),
            )
            .map_err(|source| RdmaError::Socket {
                ns: self.ns.clone(),
                source,
            })?;
            let received = match recv(self.socket.as_raw_fd(), &mut buffer, MsgFlags::MSG_TRUNC) {
                Ok(n) => n,
                Err(Errno::EINTR) => continue,
                Err(Errno::EAGAIN) => return Err(self.timed_out(what, device)),
                Err(source) => {
                    return Err(RdmaError::Receive {
                        what,
                        device: device.to_string(),
                        ns: self.ns.clone(),
                        source,
                    });
                }
            };
            let outcome = if received > buffer.len() {
                Err(ReplyError::Decode(DecodeError::Oversized))
            } else {
                collector.feed(&buffer[..received])
            };
            match outcome {
                Ok(true) => return Ok(collector.into_data()),
                Ok(false) => {}
                Err(ReplyError::Kernel(errno)) => {
                    return Err(RdmaError::Kernel {
                        what,
                        device: device.to_string(),
                        ns: self.ns.clone(),
                        errno,
                    });
                }
                Err(ReplyError::Decode(source)) => {
                    return Err(self.malformed(what, device, source));
                }
            }
        }
    }

    fn timed_out(&self, what: &'static str, device: &str) -> RdmaError {
        RdmaError::Timeout {
            what,
            device: device.to_string(),
            ns: self.ns.clone(),
            after: self.timeout,
        }
    }

    fn malformed(&self, what: &'static str, device: &str, source: DecodeError) -> RdmaError {
        RdmaError::Malformed {
            what,
            device: device.to_string(),
            ns: self.ns.clone(),
            source,
        }
    }

    /// `rdma system show netns`.
    pub fn netns_mode(&mut self) -> Result<RdmaNetnsMode, RdmaError> {
        let kind = RequestKind::SystemInfo;
        let reply = self.request(kind, "(system)", &[])?;
        RdmaNetnsMode::from_sys_reply(&reply)
            .map_err(|source| self.malformed(kind.describe(), "(system)", source))
    }

    /// The RDMA devices visible in this namespace.
    pub fn devices(&mut self) -> Result<Vec<RdmaDevice>, RdmaError> {
        let kind = RequestKind::ListDevices;
        let reply = self.request(kind, "(all)", &[])?;
        devices_from_dump(&reply).map_err(|source| self.malformed(kind.describe(), "(all)", source))
    }

    /// The device called `name`, if this namespace sees it.
    pub fn device(&mut self, name: &str) -> Result<Option<RdmaDevice>, RdmaError> {
        validate_device_name(name)?;
        Ok(self.devices()?.into_iter().find(|d| d.name == name))
    }

    /// The kernel index of the device called `name`, if this namespace sees it.
    pub fn device_index(&mut self, name: &str) -> Result<Option<u32>, RdmaError> {
        Ok(self.device(name)?.map(|d| d.index))
    }

    /// Moves `device` into the namespace behind `netns_fd`. The kernel refuses with
    /// EOPNOTSUPP in shared mode and EPERM without CAP_NET_ADMIN over the target.
    pub fn move_to_netns(
        &mut self,
        device: &RdmaDevice,
        netns_fd: BorrowedFd<'_>,
    ) -> Result<(), RdmaError> {
        let fd = u32::try_from(netns_fd.as_raw_fd()).map_err(|_| RdmaError::Send {
            what: RequestKind::SetDevice.describe(),
            device: device.name.clone(),
            ns: self.ns.clone(),
            source: Errno::EBADF,
        })?;
        self.request(
            RequestKind::SetDevice,
            &device.name,
            &[
                Attribute::u32(RDMA_NLDEV_ATTR_DEV_INDEX, device.index),
                Attribute::u32(RDMA_NLDEV_NET_NS_FD, fd),
            ],
        )
        .map(drop)
    }
}

/// Runs `work` with an RDMA socket inside `ns` (`None` when the kernel has no RDMA
/// subsystem), on a thread of its own so that the caller never changes namespace.
fn with_rdma_in<T: Send>(
    ns: &Netns,
    timeout: Duration,
    work: impl FnOnce(Option<&mut RdmaNetlink>) -> Result<T, RdmaError> + Send,
) -> Result<T, RdmaError> {
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                setns(ns.as_fd(), CloneFlags::CLONE_NEWNET).map_err(|source| {
                    RdmaError::EnterNamespace {
                        ns: ns.label().to_string(),
                        source,
                    }
                })?;
                let mut socket = RdmaNetlink::open(ns.label(), timeout)?;
                work(socket.as_mut())
            })
            .join()
            .unwrap_or_else(|_| {
                Err(RdmaError::WorkerPanicked {
                    ns: ns.label().to_string(),
                })
            })
    })
}

/// The RDMA netns mode as seen from `ns` (the mode is system-wide; the namespace only
/// decides where the socket lives). `None` when the kernel has no RDMA subsystem.
pub fn netns_mode_in(ns: &Netns, timeout: Duration) -> Result<Option<RdmaNetnsMode>, RdmaError> {
    with_rdma_in(ns, timeout, |rdma| rdma.map(|r| r.netns_mode()).transpose())
}

/// What [`move_rdma_device`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RdmaMove {
    /// The device was in `from` and is now in `to`.
    Moved,
    /// The device is not in `from` but `to` has it: an earlier attempt got there.
    AlreadyThere,
    /// Shared mode: every namespace already sees the device and the kernel forbids moves.
    SharedMode,
    /// The kernel has no RDMA subsystem at all.
    NoRdmaSubsystem,
}

/// Moves the RDMA device `device` from `from` to `to`, as `rdma dev set <device> netns`.
/// Safe to repeat: a device already in `to` is left there.
pub fn move_rdma_device(
    from: &Netns,
    to: &Netns,
    device: &str,
    timeout: Duration,
) -> Result<RdmaMove, RdmaError> {
    validate_device_name(device)?;
    // The kernel moves a device only out of the namespace of the requesting thread
    // (`current->nsproxy->net_ns`), so the request must come from inside `from`.
    let target = to.as_fd();
    let in_source = with_rdma_in(from, timeout, |rdma| {
        let Some(rdma) = rdma else {
            return Ok(Some(RdmaMove::NoRdmaSubsystem));
        };
        if rdma.netns_mode()? == RdmaNetnsMode::Shared {
            return Ok(Some(RdmaMove::SharedMode));
        }
        match rdma.device(device)? {
            Some(found) => {
                rdma.move_to_netns(&found, target)?;
                Ok(Some(RdmaMove::Moved))
            }
            None => Ok(None),
        }
    })?;
    if let Some(outcome) = in_source {
        return Ok(outcome);
    }
    let in_target = with_rdma_in(to, timeout, |rdma| match rdma {
        Some(rdma) => rdma.device(device).map(|d| d.is_some()),
        None => Ok(false),
    })?;
    if in_target {
        Ok(RdmaMove::AlreadyThere)
    } else {
        Err(RdmaError::NotFound {
            device: device.to_string(),
            from: from.label().to_string(),
            to: to.label().to_string(),
        })
    }
}

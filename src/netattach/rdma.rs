//! The RDMA-netlink shell of netattach: when the kernel's RDMA subsystem runs in `exclusive`
//! netns mode an HCA (`mlx5_0`) is visible in one network namespace only, so giving a pod its
//! NIC means moving the RDMA device too — what `rdma dev set mlx5_0 netns <ns>` does.
//! Message encoding and decoding are pure; [`RdmaNetlink`] is the thin socket around them.

use super::Netns;
use nix::errno::Errno;
use nix::sched::{CloneFlags, setns};
use nix::sys::socket::{
    AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol, SockType, bind, recv, sendto,
    setsockopt, socket, sockopt,
};
use nix::sys::time::{TimeVal, TimeValLike};
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::time::{Duration, Instant};

// Numbers from the Linux uapi headers (checked against torvalds/linux at commit 60675d4c):
// include/uapi/linux/netlink.h for the protocol, message types and flags,
// include/uapi/rdma/rdma_netlink.h for the client, commands and attributes.

/// `RDMA_NL_NLDEV`, the fifth RDMA netlink client (after RDMA_CM, IWCM, RSVD and LS).
const RDMA_NL_NLDEV: u16 = 5;
/// `enum rdma_nldev_command`: UNSPEC, GET, SET, NEWLINK, DELLINK, PORT_GET, SYS_GET.
const RDMA_NLDEV_CMD_GET: u16 = 1;
const RDMA_NLDEV_CMD_SET: u16 = 2;
const RDMA_NLDEV_CMD_SYS_GET: u16 = 6;
/// `enum rdma_nldev_attr` positions.
pub const RDMA_NLDEV_ATTR_DEV_INDEX: u16 = 1;
pub const RDMA_NLDEV_ATTR_DEV_NAME: u16 = 2;
pub const RDMA_NLDEV_SYS_ATTR_NETNS_MODE: u16 = 66;
pub const RDMA_NLDEV_NET_NS_FD: u16 = 68;

const NLMSG_NOOP: u16 = 1;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLMSG_OVERRUN: u16 = 4;
/// Types below this are netlink control messages, not family payloads.
const NLMSG_MIN_TYPE: u16 = 0x10;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_DUMP: u16 = 0x300;
const NLMSG_HDRLEN: usize = 16;
const NLA_HDRLEN: usize = 4;
/// `NLA_F_NESTED | NLA_F_NET_BYTEORDER` are flags on the type, not part of it.
const NLA_TYPE_MASK: u16 = !((1 << 15) | (1 << 14));

/// `IB_DEVICE_NAME_MAX` (include/rdma/ib_verbs.h) including the terminating NUL.
const IB_DEVICE_NAME_MAX: usize = 64;

/// Large enough for any single netlink datagram the kernel builds for this family (dumps
/// are sized by the kernel to at most a few pages).
const RECEIVE_BUFFER: usize = 64 * 1024;

const fn align4(len: usize) -> usize {
    (len + 3) & !3
}

/// What a request asks of the RDMA `nldev` client.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RequestKind {
    /// `RDMA_NLDEV_CMD_GET` as a dump: every device this namespace can see.
    ListDevices,
    /// `RDMA_NLDEV_CMD_SYS_GET`: subsystem-wide settings such as the netns mode.
    SystemInfo,
    /// `RDMA_NLDEV_CMD_SET`: change one device (here: its namespace).
    SetDevice,
}

impl RequestKind {
    /// `RDMA_NL_GET_TYPE(RDMA_NL_NLDEV, op)`.
    pub const fn message_type(self) -> u16 {
        let op = match self {
            RequestKind::ListDevices => RDMA_NLDEV_CMD_GET,
            RequestKind::SystemInfo => RDMA_NLDEV_CMD_SYS_GET,
            RequestKind::SetDevice => RDMA_NLDEV_CMD_SET,
        };
        (RDMA_NL_NLDEV << 10) + op
    }

    /// Dumps end with NLMSG_DONE; single requests ask for an ACK so that success is an
    /// explicit message rather than the absence of an error.
    pub const fn flags(self) -> u16 {
        match self {
            RequestKind::ListDevices => NLM_F_REQUEST | NLM_F_DUMP,
            RequestKind::SystemInfo | RequestKind::SetDevice => NLM_F_REQUEST | NLM_F_ACK,
        }
    }

    const fn describe(self) -> &'static str {
        match self {
            RequestKind::ListDevices => "listing RDMA devices",
            RequestKind::SystemInfo => "reading the RDMA netns mode",
            RequestKind::SetDevice => "moving RDMA device",
        }
    }
}

/// One netlink attribute: its type (flag bits masked off on decode) and raw payload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attribute {
    pub kind: u16,
    pub payload: Vec<u8>,
}

impl Attribute {
    pub fn u32(kind: u16, value: u32) -> Self {
        Self {
            kind,
            payload: value.to_ne_bytes().to_vec(),
        }
    }

    /// A NUL-terminated string, as the kernel's `NLA_NUL_STRING` policy wants.
    pub fn string(kind: u16, value: &str) -> Self {
        let mut payload = Vec::with_capacity(value.len() + 1);
        payload.extend_from_slice(value.as_bytes());
        payload.push(0);
        Self { kind, payload }
    }

    pub fn as_u32(&self) -> Result<u32, DecodeError> {
        let bytes: [u8; 4] = self
            .payload
            .as_slice()
            .try_into()
            .map_err(|_| self.wrong_size("u32"))?;
        Ok(u32::from_ne_bytes(bytes))
    }

    pub fn as_u8(&self) -> Result<u8, DecodeError> {
        match self.payload.as_slice() {
            [value] => Ok(*value),
            _ => Err(self.wrong_size("u8")),
        }
    }

    /// The string up to the first NUL (the kernel always sends one; tolerate its absence).
    pub fn as_str(&self) -> Result<&str, DecodeError> {
        let end = self
            .payload
            .iter()
            .position(|b| *b == 0)
            .unwrap_or(self.payload.len());
        std::str::from_utf8(&self.payload[..end])
            .map_err(|_| DecodeError::NotUtf8 { kind: self.kind })
    }

    fn wrong_size(&self, expected: &'static str) -> DecodeError {
        DecodeError::AttributeSize {
            kind: self.kind,
            expected,
            len: self.payload.len(),
        }
    }
}

/// Appends one attribute: header, payload, zero padding to 4 bytes.
pub fn encode_attribute(out: &mut Vec<u8>, attribute: &Attribute) {
    let len = NLA_HDRLEN + attribute.payload.len();
    // Attribute lengths are u16; every attribute this module builds is a few bytes.
    out.extend_from_slice(&u16::try_from(len).unwrap_or(u16::MAX).to_ne_bytes());
    out.extend_from_slice(&attribute.kind.to_ne_bytes());
    out.extend_from_slice(&attribute.payload);
    out.resize(out.len() + (align4(len) - len), 0);
}

/// A complete request datagram: `nlmsghdr` (port id 0, the kernel fills in ours) followed
/// by the attributes; RDMA nldev has no family header.
pub fn encode_request(kind: RequestKind, seq: u32, attributes: &[Attribute]) -> Vec<u8> {
    let mut out = vec![0; NLMSG_HDRLEN];
    for attribute in attributes {
        encode_attribute(&mut out, attribute);
    }
    let len = u32::try_from(out.len()).unwrap_or(u32::MAX);
    out[0..4].copy_from_slice(&len.to_ne_bytes());
    out[4..6].copy_from_slice(&kind.message_type().to_ne_bytes());
    out[6..8].copy_from_slice(&kind.flags().to_ne_bytes());
    out[8..12].copy_from_slice(&seq.to_ne_bytes());
    out
}

/// Why a buffer from the kernel could not be read as netlink messages.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("message at byte {offset} is truncated: {needed} bytes needed, {available} left")]
    Truncated {
        offset: usize,
        needed: usize,
        available: usize,
    },
    #[error("message at byte {offset} declares length {len}, shorter than its header")]
    MessageTooShort { offset: usize, len: usize },
    #[error("attribute at byte {offset} of a message payload is malformed (length {len})")]
    BadAttribute { offset: usize, len: usize },
    #[error("{what} message carries a {len}-byte payload")]
    ShortControl { what: &'static str, len: usize },
    #[error("attribute {kind} should be a {expected} but has {len} bytes")]
    AttributeSize {
        kind: u16,
        expected: &'static str,
        len: usize,
    },
    #[error("attribute {kind} is not UTF-8")]
    NotUtf8 { kind: u16 },
    #[error("attribute {kind} missing from the reply")]
    MissingAttribute { kind: u16 },
    #[error("the kernel dropped messages (NLMSG_OVERRUN)")]
    Overrun,
    #[error("the reply datagram was larger than {RECEIVE_BUFFER} bytes")]
    Oversized,
}

/// A family message with its attributes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DataMessage {
    pub message_type: u16,
    pub flags: u16,
    pub seq: u32,
    pub attributes: Vec<Attribute>,
}

impl DataMessage {
    pub fn attribute(&self, kind: u16) -> Option<&Attribute> {
        self.attributes.iter().find(|a| a.kind == kind)
    }

    fn require(&self, kind: u16) -> Result<&Attribute, DecodeError> {
        self.attribute(kind)
            .ok_or(DecodeError::MissingAttribute { kind })
    }
}

/// One message of a reply datagram.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Message {
    Data(DataMessage),
    /// NLMSG_DONE; `status` is the dump's result (0, or a negative errno).
    Done {
        seq: u32,
        status: i32,
    },
    /// NLMSG_ERROR with error 0: the acknowledgement asked for by NLM_F_ACK.
    Ack {
        seq: u32,
    },
    /// NLMSG_ERROR with a failure; `errno` is positive.
    Error {
        seq: u32,
        errno: i32,
    },
}

fn read_u16(buf: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(buf.get(at..at + 2)?.try_into().ok()?))
}

fn read_u32(buf: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(buf.get(at..at + 4)?.try_into().ok()?))
}

fn read_i32(buf: &[u8], at: usize) -> Option<i32> {
    Some(i32::from_ne_bytes(buf.get(at..at + 4)?.try_into().ok()?))
}

/// Splits a message payload into attributes.
pub fn decode_attributes(payload: &[u8]) -> Result<Vec<Attribute>, DecodeError> {
    let mut attributes = Vec::new();
    let mut offset = 0;
    while offset < payload.len() {
        let (Some(len), Some(kind)) = (read_u16(payload, offset), read_u16(payload, offset + 2))
        else {
            return Err(DecodeError::BadAttribute {
                offset,
                len: payload.len() - offset,
            });
        };
        let len = usize::from(len);
        if len < NLA_HDRLEN || offset + len > payload.len() {
            return Err(DecodeError::BadAttribute { offset, len });
        }
        attributes.push(Attribute {
            kind: kind & NLA_TYPE_MASK,
            payload: payload[offset + NLA_HDRLEN..offset + len].to_vec(),
        });
        // The last attribute may end without its padding.
        offset = (offset + align4(len)).min(payload.len());
    }
    Ok(attributes)
}

/// Splits one received datagram into messages. Never panics, whatever the bytes.
pub fn decode_messages(buf: &[u8]) -> Result<Vec<Message>, DecodeError> {
    let mut messages = Vec::new();
    let mut offset = 0;
    while offset < buf.len() {
        let available = buf.len() - offset;
        if available < NLMSG_HDRLEN {
            return Err(DecodeError::Truncated {
                offset,
                needed: NLMSG_HDRLEN,
                available,
            });
        }
        let header = (
            read_u32(buf, offset),
            read_u16(buf, offset + 4),
            read_u16(buf, offset + 6),
            read_u32(buf, offset + 8),
        );
        let (Some(len), Some(message_type), Some(flags), Some(seq)) = header else {
            return Err(DecodeError::Truncated {
                offset,
                needed: NLMSG_HDRLEN,
                available,
            });
        };
        let len = usize::try_from(len).unwrap_or(usize::MAX);
        if len < NLMSG_HDRLEN {
            return Err(DecodeError::MessageTooShort { offset, len });
        }
        if len > available {
            return Err(DecodeError::Truncated {
                offset,
                needed: len,
                available,
            });
        }
        let payload = &buf[offset + NLMSG_HDRLEN..offset + len];
        match message_type {
            NLMSG_NOOP => {}
            NLMSG_ERROR => {
                let code = read_i32(payload, 0).ok_or(DecodeError::ShortControl {
                    what: "NLMSG_ERROR",
                    len: payload.len(),
                })?;
                messages.push(if code == 0 {
                    Message::Ack { seq }
                } else {
                    Message::Error {
                        seq,
                        errno: code.saturating_neg(),
                    }
                });
            }
            // Older kernels end a dump with an empty DONE; newer ones append the status.
            NLMSG_DONE => messages.push(Message::Done {
                seq,
                status: read_i32(payload, 0).unwrap_or(0),
            }),
            NLMSG_OVERRUN => return Err(DecodeError::Overrun),
            t if t < NLMSG_MIN_TYPE => {}
            _ => messages.push(Message::Data(DataMessage {
                message_type,
                flags,
                seq,
                attributes: decode_attributes(payload)?,
            })),
        }
        offset = (offset + align4(len)).min(buf.len());
    }
    Ok(messages)
}

/// Why a reply did not yield data.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ReplyError {
    #[error(transparent)]
    Decode(#[from] DecodeError),
    #[error("kernel answered {0}")]
    Kernel(Errno),
}

/// Gathers the messages answering one request across as many datagrams as the kernel sends,
/// until the request's terminal message (ACK, DONE or an error).
#[derive(Debug)]
pub struct ReplyCollector {
    seq: u32,
    data: Vec<DataMessage>,
}

impl ReplyCollector {
    pub fn new(seq: u32) -> Self {
        Self {
            seq,
            data: Vec::new(),
        }
    }

    /// Takes one datagram; `Ok(true)` once the reply is complete. Messages of other
    /// sequence numbers are answers to an earlier request that timed out and are dropped.
    pub fn feed(&mut self, datagram: &[u8]) -> Result<bool, ReplyError> {
        for message in decode_messages(datagram)? {
            match message {
                Message::Data(data) if data.seq == self.seq => self.data.push(data),
                Message::Ack { seq } if seq == self.seq => return Ok(true),
                Message::Done { seq, status } if seq == self.seq => {
                    return if status < 0 {
                        Err(ReplyError::Kernel(Errno::from_raw(status.saturating_neg())))
                    } else {
                        Ok(true)
                    };
                }
                Message::Error { seq, errno } if seq == self.seq => {
                    return Err(ReplyError::Kernel(Errno::from_raw(errno)));
                }
                _ => {}
            }
        }
        Ok(false)
    }

    pub fn into_data(self) -> Vec<DataMessage> {
        self.data
    }
}

/// `rdma system show netns`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RdmaNetnsMode {
    /// Every namespace sees every RDMA device; nothing to move.
    Shared,
    /// Each RDMA device lives in one namespace and must follow its NIC into the pod.
    Exclusive,
}

impl RdmaNetnsMode {
    /// The kernel reports `ib_devices_shared_netns` as a u8: non-zero is shared. Kernels
    /// that predate RDMA netns support have no SYS_GET handler and only acknowledge the
    /// request; they have no exclusive mode either, so an empty reply means shared.
    pub fn from_sys_reply(reply: &[DataMessage]) -> Result<Self, DecodeError> {
        if reply.is_empty() {
            return Ok(RdmaNetnsMode::Shared);
        }
        let kind = RDMA_NLDEV_SYS_ATTR_NETNS_MODE;
        let attribute = reply
            .iter()
            .find_map(|m| m.attribute(kind))
            .ok_or(DecodeError::MissingAttribute { kind })?;
        Ok(if attribute.as_u8()? == 0 {
            RdmaNetnsMode::Exclusive
        } else {
            RdmaNetnsMode::Shared
        })
    }
}

/// An RDMA device as the namespace's `rdma dev` lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RdmaDevice {
    pub index: u32,
    pub name: String,
}

/// Reads the devices out of a `RDMA_NLDEV_CMD_GET` dump.
pub fn devices_from_dump(reply: &[DataMessage]) -> Result<Vec<RdmaDevice>, DecodeError> {
    reply
        .iter()
        .map(|m| {
            Ok(RdmaDevice {
                index: m.require(RDMA_NLDEV_ATTR_DEV_INDEX)?.as_u32()?,
                name: m.require(RDMA_NLDEV_ATTR_DEV_NAME)?.as_str()?.to_string(),
            })
        })
        .collect()
}

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

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A netlink message written field by field, independent of [`encode_request`].
    fn raw_message(message_type: u16, flags: u16, seq: u32, payload: &[u8]) -> Vec<u8> {
        let len = (16 + payload.len()) as u32;
        let mut out = Vec::new();
        out.extend_from_slice(&len.to_ne_bytes());
        out.extend_from_slice(&message_type.to_ne_bytes());
        out.extend_from_slice(&flags.to_ne_bytes());
        out.extend_from_slice(&seq.to_ne_bytes());
        out.extend_from_slice(&4242u32.to_ne_bytes());
        out.extend_from_slice(payload);
        out.resize(out.len().next_multiple_of(4), 0);
        out
    }

    /// A device entry as the kernel's dump fills it: index, name, and a u64 attribute the
    /// decoder must step over.
    fn device_payload(index: u32, name: &[u8]) -> Vec<u8> {
        let mut p = Vec::new();
        p.extend_from_slice(&8u16.to_ne_bytes());
        p.extend_from_slice(&1u16.to_ne_bytes());
        p.extend_from_slice(&index.to_ne_bytes());
        let name_len = 4 + name.len() + 1;
        p.extend_from_slice(&(name_len as u16).to_ne_bytes());
        p.extend_from_slice(&2u16.to_ne_bytes());
        p.extend_from_slice(name);
        p.push(0);
        p.resize(p.len().next_multiple_of(4), 0);
        // RDMA_NLDEV_ATTR_NODE_GUID (6), u64.
        p.extend_from_slice(&12u16.to_ne_bytes());
        p.extend_from_slice(&6u16.to_ne_bytes());
        p.extend_from_slice(&0x0c42_a103_0011_2233u64.to_ne_bytes());
        p
    }

    #[test]
    fn message_types_follow_rdma_nl_get_type() {
        assert_eq!(RequestKind::ListDevices.message_type(), 0x1401);
        assert_eq!(RequestKind::SetDevice.message_type(), 0x1402);
        assert_eq!(RequestKind::SystemInfo.message_type(), 0x1406);
    }

    #[test]
    fn dump_request_is_a_bare_header() {
        let bytes = encode_request(RequestKind::ListDevices, 7, &[]);
        let expected: Vec<u8> = [
            16u32.to_ne_bytes().as_slice(),
            0x1401u16.to_ne_bytes().as_slice(),
            0x0301u16.to_ne_bytes().as_slice(),
            7u32.to_ne_bytes().as_slice(),
            0u32.to_ne_bytes().as_slice(),
        ]
        .concat();
        assert_eq!(bytes, expected);
        if cfg!(target_endian = "little") {
            assert_eq!(bytes, [16, 0, 0, 0, 1, 0x14, 1, 3, 7, 0, 0, 0, 0, 0, 0, 0]);
        }
    }

    #[test]
    fn set_netns_request_carries_index_and_fd() {
        let bytes = encode_request(
            RequestKind::SetDevice,
            0x0102_0304,
            &[
                Attribute::u32(RDMA_NLDEV_ATTR_DEV_INDEX, 3),
                Attribute::u32(RDMA_NLDEV_NET_NS_FD, 9),
            ],
        );
        let expected: Vec<u8> = [
            32u32.to_ne_bytes().as_slice(),
            0x1402u16.to_ne_bytes().as_slice(),
            0x0005u16.to_ne_bytes().as_slice(),
            0x0102_0304u32.to_ne_bytes().as_slice(),
            0u32.to_ne_bytes().as_slice(),
            8u16.to_ne_bytes().as_slice(),
            1u16.to_ne_bytes().as_slice(),
            3u32.to_ne_bytes().as_slice(),
            8u16.to_ne_bytes().as_slice(),
            68u16.to_ne_bytes().as_slice(),
            9u32.to_ne_bytes().as_slice(),
        ]
        .concat();
        assert_eq!(bytes, expected);
        if cfg!(target_endian = "little") {
            assert_eq!(
                bytes,
                [
                    32, 0, 0, 0, 2, 0x14, 5, 0, 4, 3, 2, 1, 0, 0, 0, 0, 8, 0, 1, 0, 3, 0, 0, 0, 8,
                    0, 68, 0, 9, 0, 0, 0
                ]
            );
        }
    }

    #[test]
    fn string_attribute_is_nul_terminated_and_padded() {
        let mut out = Vec::new();
        encode_attribute(
            &mut out,
            &Attribute::string(RDMA_NLDEV_ATTR_DEV_NAME, "mlx5_0"),
        );
        let mut expected = Vec::new();
        expected.extend_from_slice(&11u16.to_ne_bytes());
        expected.extend_from_slice(&2u16.to_ne_bytes());
        expected.extend_from_slice(b"mlx5_0\0\0");
        assert_eq!(out, expected);
        assert_eq!(out.len(), 12);
    }

    fn two_device_dump(seq: u32) -> Vec<u8> {
        let mut buf = raw_message(0x1401, 0x2, seq, &device_payload(0, b"mlx5_0"));
        buf.extend(raw_message(0x1401, 0x2, seq, &device_payload(1, b"mlx5_1")));
        buf.extend(raw_message(NLMSG_DONE, 0x2, seq, &0i32.to_ne_bytes()));
        buf
    }

    #[test]
    fn dump_with_two_devices_and_done_decodes() {
        let seq = 77;
        let mut collector = ReplyCollector::new(seq);
        assert!(collector.feed(&two_device_dump(seq)).unwrap());
        let devices = devices_from_dump(&collector.into_data()).unwrap();
        assert_eq!(
            devices,
            [
                RdmaDevice {
                    index: 0,
                    name: "mlx5_0".into()
                },
                RdmaDevice {
                    index: 1,
                    name: "mlx5_1".into()
                },
            ]
        );
    }

    #[test]
    fn dump_split_over_datagrams_completes_only_at_done() {
        let seq = 5;
        let mut collector = ReplyCollector::new(seq);
        assert!(
            !collector
                .feed(&raw_message(0x1401, 0x2, seq, &device_payload(4, b"ib0")))
                .unwrap()
        );
        // A late answer to an earlier, timed-out request must not end or pollute this one.
        assert!(
            !collector
                .feed(&raw_message(NLMSG_DONE, 0x2, seq - 1, &[]))
                .unwrap()
        );
        assert!(
            !collector
                .feed(&raw_message(0x1401, 0x2, seq - 1, &device_payload(9, b"x")))
                .unwrap()
        );
        assert!(
            collector
                .feed(&raw_message(NLMSG_DONE, 0x2, seq, &[]))
                .unwrap()
        );
        let devices = devices_from_dump(&collector.into_data()).unwrap();
        assert_eq!(
            devices,
            [RdmaDevice {
                index: 4,
                name: "ib0".into()
            }]
        );
    }

    #[test]
    fn error_reply_maps_to_errno() {
        let seq = 11;
        let request = encode_request(
            RequestKind::SetDevice,
            seq,
            &[Attribute::u32(RDMA_NLDEV_ATTR_DEV_INDEX, 0)],
        );
        let mut payload = (-95i32).to_ne_bytes().to_vec();
        payload.extend_from_slice(&request[..16]);
        let reply = raw_message(NLMSG_ERROR, 0x100, seq, &payload);
        assert_eq!(
            decode_messages(&reply).unwrap(),
            [Message::Error { seq, errno: 95 }]
        );
        let mut collector = ReplyCollector::new(seq);
        assert_eq!(
            collector.feed(&reply),
            Err(ReplyError::Kernel(Errno::EOPNOTSUPP))
        );
    }

    #[test]
    fn sys_get_reply_then_ack_gives_the_mode() {
        let seq = 3;
        let mut attr = Vec::new();
        attr.extend_from_slice(&5u16.to_ne_bytes());
        attr.extend_from_slice(&66u16.to_ne_bytes());
        attr.push(0);
        let mut buf = raw_message(0x1406, 0, seq, &attr);
        let mut ack = 0i32.to_ne_bytes().to_vec();
        ack.extend_from_slice(&encode_request(RequestKind::SystemInfo, seq, &[]));
        buf.extend(raw_message(NLMSG_ERROR, 0, seq, &ack));
        let mut collector = ReplyCollector::new(seq);
        assert!(collector.feed(&buf).unwrap());
        let reply = collector.into_data();
        assert_eq!(
            RdmaNetnsMode::from_sys_reply(&reply).unwrap(),
            RdmaNetnsMode::Exclusive
        );

        let shared = raw_message(0x1406, 0, seq, &[5, 0, 66, 0, 1, 0, 0, 0]);
        let reply = match &decode_messages(&shared).unwrap()[..] {
            [Message::Data(d)] => vec![d.clone()],
            other => panic!("{other:?}"),
        };
        assert_eq!(
            RdmaNetnsMode::from_sys_reply(&reply).unwrap(),
            RdmaNetnsMode::Shared
        );
        assert_eq!(
            RdmaNetnsMode::from_sys_reply(&[]),
            Ok(RdmaNetnsMode::Shared)
        );
        let unrelated = raw_message(0x1406, 0, seq, &[5, 0, 67, 0, 1, 0, 0, 0]);
        let reply = match &decode_messages(&unrelated).unwrap()[..] {
            [Message::Data(d)] => vec![d.clone()],
            other => panic!("{other:?}"),
        };
        assert_eq!(
            RdmaNetnsMode::from_sys_reply(&reply),
            Err(DecodeError::MissingAttribute { kind: 66 })
        );
    }

    #[test]
    fn dump_failure_status_in_done_is_an_error() {
        let mut collector = ReplyCollector::new(1);
        assert_eq!(
            collector.feed(&raw_message(NLMSG_DONE, 0x2, 1, &(-1i32).to_ne_bytes())),
            Err(ReplyError::Kernel(Errno::EPERM))
        );
    }

    #[test]
    fn every_cut_inside_a_message_is_an_error() {
        let buf = two_device_dump(1);
        let boundaries: Vec<usize> = {
            let mut at = vec![0];
            let mut offset = 0;
            while offset < buf.len() {
                let len = u32::from_ne_bytes(buf[offset..offset + 4].try_into().unwrap());
                offset += (len as usize).next_multiple_of(4);
                at.push(offset);
            }
            at
        };
        for cut in 1..buf.len() {
            let result = decode_messages(&buf[..cut]);
            if boundaries.contains(&cut) {
                assert!(result.is_ok(), "cut at {cut}: {result:?}");
            } else {
                assert!(result.is_err(), "cut at {cut} decoded: {result:?}");
            }
        }
    }

    #[test]
    fn garbage_lengths_are_errors() {
        let mut short = raw_message(0x1401, 0, 1, &[]);
        short[0..4].copy_from_slice(&8u32.to_ne_bytes());
        assert_eq!(
            decode_messages(&short),
            Err(DecodeError::MessageTooShort { offset: 0, len: 8 })
        );
        let mut huge = raw_message(0x1401, 0, 1, &[]);
        huge[0..4].copy_from_slice(&u32::MAX.to_ne_bytes());
        assert!(matches!(
            decode_messages(&huge),
            Err(DecodeError::Truncated { offset: 0, .. })
        ));
        // An attribute claiming 2 bytes (less than its own header).
        let bad_attr = raw_message(0x1401, 0, 1, &[2, 0, 1, 0]);
        assert_eq!(
            decode_messages(&bad_attr),
            Err(DecodeError::BadAttribute { offset: 0, len: 2 })
        );
        let short_error = raw_message(NLMSG_ERROR, 0, 1, &[1, 2]);
        assert!(matches!(
            decode_messages(&short_error),
            Err(DecodeError::ShortControl { .. })
        ));
        assert_eq!(
            decode_messages(&raw_message(NLMSG_OVERRUN, 0, 1, &[])),
            Err(DecodeError::Overrun)
        );
        // A device entry without its name cannot be listed.
        let nameless = raw_message(0x1401, 2, 1, &[8, 0, 1, 0, 0, 0, 0, 0]);
        let data: Vec<DataMessage> = decode_messages(&nameless)
            .unwrap()
            .into_iter()
            .filter_map(|m| match m {
                Message::Data(d) => Some(d),
                _ => None,
            })
            .collect();
        assert_eq!(
            devices_from_dump(&data),
            Err(DecodeError::MissingAttribute { kind: 2 })
        );
    }

    #[test]
    fn device_names_are_validated() {
        assert!(validate_device_name("mlx5_0").is_ok());
        assert!(validate_device_name("").is_err());
        assert!(validate_device_name("a/b").is_err());
        assert!(validate_device_name(&"x".repeat(64)).is_err());
        assert!(validate_device_name(&"x".repeat(63)).is_ok());
    }

    proptest! {
        #[test]
        fn decoder_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode_messages(&bytes);
            let _ = ReplyCollector::new(1).feed(&bytes);
            let _ = decode_attributes(&bytes);
        }

        #[test]
        fn requests_decode_back_to_their_attributes(
            seq in any::<u32>(),
            attrs in proptest::collection::vec(
                (1u16..0x3fff, proptest::collection::vec(any::<u8>(), 0..40)),
                0..6,
            ),
        ) {
            let attributes: Vec<Attribute> = attrs
                .into_iter()
                .map(|(kind, payload)| Attribute { kind, payload })
                .collect();
            let bytes = encode_request(RequestKind::SetDevice, seq, &attributes);
            prop_assert_eq!(bytes.len() % 4, 0);
            let messages = decode_messages(&bytes).unwrap();
            prop_assert_eq!(
                messages,
                vec![Message::Data(DataMessage {
                    message_type: RequestKind::SetDevice.message_type(),
                    flags: RequestKind::SetDevice.flags(),
                    seq,
                    attributes,
                })]
            );
        }
    }

    const TIMEOUT: Duration = Duration::from_secs(5);

    /// Against the running kernel: either the subsystem answers or it is cleanly absent.
    #[test]
    fn real_socket_opens_or_reports_no_subsystem() {
        match RdmaNetlink::open("current", TIMEOUT).unwrap() {
            None => {
                eprintln!("no RDMA subsystem in this kernel");
                assert!(!std::path::Path::new("/sys/class/infiniband").exists());
            }
            Some(mut rdma) => {
                let mode = rdma.netns_mode().unwrap();
                let devices = rdma.devices().unwrap();
                eprintln!("RDMA netns mode {mode:?}, devices {devices:?}");
                assert_eq!(rdma.device_index("no-such-dev").unwrap(), None);
                for device in &devices {
                    assert_eq!(rdma.device_index(&device.name).unwrap(), Some(device.index));
                }
            }
        }
    }

    /// The namespace-entering path, with the current namespace as both ends: nothing can
    /// move, and the outcome must agree with what the plain socket sees.
    #[test]
    fn move_within_own_namespace_reports_the_subsystem_state() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipping: entering a namespace needs root");
            return;
        }
        let own = Netns::open(std::path::Path::new("/proc/self/ns/net")).unwrap();
        let mode = netns_mode_in(&own, TIMEOUT).unwrap();
        let outcome = move_rdma_device(&own, &own, "no-such-dev", TIMEOUT);
        eprintln!("netns mode {mode:?}, move outcome {outcome:?}");
        match mode {
            None => assert_eq!(outcome.unwrap(), RdmaMove::NoRdmaSubsystem),
            Some(RdmaNetnsMode::Shared) => assert_eq!(outcome.unwrap(), RdmaMove::SharedMode),
            Some(RdmaNetnsMode::Exclusive) => {
                let err = outcome.unwrap_err();
                assert!(matches!(err, RdmaError::NotFound { .. }), "{err}");
                assert!(err.to_string().contains("no-such-dev"), "{err}");
            }
        }
        assert!(matches!(
            move_rdma_device(&own, &own, "bad/name", TIMEOUT),
            Err(RdmaError::InvalidName { .. })
        ));
    }
}

//! The RDMA `nldev` netlink wire format, pure: request encoding, reply decoding and the
//! collector that turns a stream of datagrams into one reply. Kept apart from the socket so
//! every byte layout is tested without a kernel.

use nix::errno::Errno;

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
pub(super) const NLMSG_ERROR: u16 = 2;
pub(super) const NLMSG_DONE: u16 = 3;
pub(super) const NLMSG_OVERRUN: u16 = 4;
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
pub(super) const IB_DEVICE_NAME_MAX: usize = 64;

/// Large enough for any single netlink datagram the kernel builds for this family (dumps
/// are sized by the kernel to at most a few pages).
pub(super) const RECEIVE_BUFFER: usize = 64 * 1024;

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

    pub(super) const fn describe(self) -> &'static str {
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

//! Unit tests of the RDMA wire format (byte layouts, decoding of every malformed input) and,
//! against the running kernel, of the socket.

use super::wire::{NLMSG_DONE, NLMSG_ERROR, NLMSG_OVERRUN};
use super::*;
use crate::netattach::Netns;
use nix::errno::Errno;
use std::time::Duration;

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
                32, 0, 0, 0, 2, 0x14, 5, 0, 4, 3, 2, 1, 0, 0, 0, 0, 8, 0, 1, 0, 3, 0, 0, 0, 8, 0,
                68, 0, 9, 0, 0, 0
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

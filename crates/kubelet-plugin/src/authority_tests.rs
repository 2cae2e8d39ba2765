//! The rewriter against header blocks encoded as grpc-go encodes them (dynamic table, size
//! updates), fed in arbitrary pieces, and decoded again as `h2` would with a fresh table.

use loona_hpack::{Decoder, Encoder};
use proptest::prelude::*;

use super::*;

const REG_AUTHORITY: &str = "%2Fvar%2Flib%2Fkubelet%2Fplugins_registry%2Ftandem.dev-reg.sock";

fn kubelet_headers(path: &str, authority: Option<&str>) -> HeaderList {
    let mut headers: Vec<(&str, &str)> = vec![(":method", "POST"), (":scheme", "http")];
    headers.push((":path", path));
    if let Some(authority) = authority {
        headers.push((":authority", authority));
    }
    headers.extend([
        ("content-type", "application/grpc"),
        ("user-agent", "grpc-go/1.79.3"),
        ("te", "trailers"),
        ("grpc-accept-encoding", "gzip"),
        ("grpc-timeout", "999562u"),
    ]);
    headers
        .into_iter()
        .map(|(n, v)| (n.as_bytes().to_vec(), v.as_bytes().to_vec()))
        .collect()
}

fn frame(frame_type: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    FrameHeader {
        len: payload.len(),
        frame_type,
        flags,
        stream,
    }
    .write(&mut out);
    out.extend_from_slice(payload);
    out
}

fn encode(encoder: &mut Encoder<'static>, headers: &HeaderList) -> Vec<u8> {
    encoder.encode(headers.iter().map(|(n, v)| (&n[..], &v[..])))
}

/// A frame as (type, flags, stream, payload).
type Frame = (u8, u8, u32, Vec<u8>);
type HeaderList = Vec<(Vec<u8>, Vec<u8>)>;

/// Splits `bytes` into frames (after the preface) and decodes every header block with one
/// decoder, as the server would.
fn server_view(bytes: &[u8]) -> (Vec<Frame>, Vec<HeaderList>) {
    assert_eq!(&bytes[..PREFACE.len()], PREFACE);
    let mut rest = &bytes[PREFACE.len()..];
    let mut frames = Vec::new();
    let mut blocks = Vec::new();
    let mut decoder = Decoder::new();
    let mut block = Vec::new();
    while !rest.is_empty() {
        let header = FrameHeader::parse(rest);
        let payload = rest[FRAME_HEADER_LEN..FRAME_HEADER_LEN + header.len].to_vec();
        rest = &rest[FRAME_HEADER_LEN + header.len..];
        if header.is_header_block() {
            let skip = if header.flags & FLAG_PRIORITY != 0 {
                5
            } else {
                0
            };
            block.extend_from_slice(&payload[skip..]);
            if header.flags & FLAG_END_HEADERS != 0 {
                blocks.push(decoder.decode(&block).expect("server-side decode"));
                block.clear();
            }
        }
        frames.push((header.frame_type, header.flags, header.stream, payload));
    }
    (frames, blocks)
}

fn rewrite_in_pieces(input: &[u8], pieces: &[usize]) -> Result<Vec<u8>, WireError> {
    let mut rewriter = InboundRewriter::new();
    let mut out = Vec::new();
    let mut rest = input;
    let mut sizes = pieces.iter().cycle();
    while !rest.is_empty() {
        let size = (*sizes.next().unwrap_or(&1)).clamp(1, rest.len());
        rewriter.push(&rest[..size], &mut out)?;
        rest = &rest[size..];
    }
    Ok(out)
}

/// A registration connection as the kubelet opens it: SETTINGS, GetInfo then Notify, both
/// sharing the dynamic table, each with one DATA frame.
fn registration_connection() -> Vec<u8> {
    let mut encoder = Encoder::new();
    let mut bytes = PREFACE.to_vec();
    bytes.extend(frame(0x4, 0, 0, &[]));
    let get_info = kubelet_headers(
        "/pluginregistration.Registration/GetInfo",
        Some(REG_AUTHORITY),
    );
    bytes.extend(frame(
        FRAME_HEADERS,
        FLAG_END_HEADERS,
        1,
        &encode(&mut encoder, &get_info),
    ));
    bytes.extend(frame(0x0, FLAG_END_STREAM, 1, &[0, 0, 0, 0, 0]));
    let notify = kubelet_headers(
        "/pluginregistration.Registration/NotifyRegistrationStatus",
        Some(REG_AUTHORITY),
    );
    bytes.extend(frame(
        FRAME_HEADERS,
        FLAG_END_HEADERS,
        3,
        &encode(&mut encoder, &notify),
    ));
    bytes.extend(frame(0x0, FLAG_END_STREAM, 3, &[0, 0, 0, 0, 2, 0x08, 0x01]));
    bytes
}

fn authority_of(block: &[(Vec<u8>, Vec<u8>)]) -> Option<&[u8]> {
    block
        .iter()
        .find(|(n, _)| n == b":authority")
        .map(|(_, v)| &v[..])
}

#[test]
fn percent_encoded_authority_becomes_localhost_and_the_rest_is_kept() {
    let input = registration_connection();
    let out = rewrite_in_pieces(&input, &[input.len()]).unwrap();
    let (frames, blocks) = server_view(&out);
    assert_eq!(blocks.len(), 2);
    for (block, path) in blocks.iter().zip(["GetInfo", "NotifyRegistrationStatus"]) {
        assert_eq!(authority_of(block), Some(&b"localhost"[..]));
        let expected = kubelet_headers(
            &format!("/pluginregistration.Registration/{path}"),
            Some("localhost"),
        );
        assert_eq!(
            block, &expected,
            "order and values of every other header kept"
        );
    }
    // SETTINGS and both DATA frames pass unchanged.
    assert_eq!(frames[0], (0x4, 0, 0, vec![]));
    assert_eq!(frames[2], (0x0, FLAG_END_STREAM, 1, vec![0, 0, 0, 0, 0]));
    assert_eq!(
        frames[4],
        (0x0, FLAG_END_STREAM, 3, vec![0, 0, 0, 0, 2, 0x08, 0x01])
    );
}

#[test]
fn missing_and_empty_authorities_are_accepted() {
    let mut encoder = Encoder::new();
    let mut input = PREFACE.to_vec();
    let absent = kubelet_headers("/a", None);
    input.extend(frame(
        FRAME_HEADERS,
        FLAG_END_HEADERS,
        1,
        &encode(&mut encoder, &absent),
    ));
    let empty = kubelet_headers("/b", Some(""));
    input.extend(frame(
        FRAME_HEADERS,
        FLAG_END_HEADERS,
        3,
        &encode(&mut encoder, &empty),
    ));
    let (_, blocks) = server_view(&rewrite_in_pieces(&input, &[7]).unwrap());
    assert_eq!(authority_of(&blocks[0]), None, "absent stays absent");
    assert_eq!(authority_of(&blocks[1]), Some(&b"localhost"[..]));
}

#[test]
fn padding_priority_and_continuation_are_unwrapped() {
    let mut encoder = Encoder::new();
    let block = encode(&mut encoder, &kubelet_headers("/x", Some(REG_AUTHORITY)));
    let (first, second) = block.split_at(block.len() / 2);
    let mut payload = vec![3];
    payload.extend([0x80, 0, 0, 0, 15]);
    payload.extend_from_slice(first);
    payload.extend([0, 0, 0]);
    let mut input = PREFACE.to_vec();
    input.extend(frame(
        FRAME_HEADERS,
        FLAG_PADDED | FLAG_PRIORITY | FLAG_END_STREAM,
        5,
        &payload,
    ));
    input.extend(frame(FRAME_CONTINUATION, FLAG_END_HEADERS, 5, second));
    let (frames, blocks) = server_view(&rewrite_in_pieces(&input, &[1, 2, 3]).unwrap());
    assert_eq!(
        frames.len(),
        1,
        "one HEADERS frame, padding and CONTINUATION folded in"
    );
    let (_, flags, stream, payload) = &frames[0];
    assert_eq!(*stream, 5);
    assert_eq!(*flags, FLAG_END_HEADERS | FLAG_END_STREAM | FLAG_PRIORITY);
    assert_eq!(&payload[..5], &[0x80, 0, 0, 0, 15], "priority fields kept");
    assert_eq!(authority_of(&blocks[0]), Some(&b"localhost"[..]));
}

#[test]
fn a_large_block_is_split_into_continuations_within_the_frame_limit() {
    let mut encoder = Encoder::new();
    let mut headers = kubelet_headers("/big", Some(REG_AUTHORITY));
    headers.push((b"x-big".to_vec(), vec![b'v'; 40_000]));
    let mut input = PREFACE.to_vec();
    let block = encode(&mut encoder, &headers);
    let (a, rest) = block.split_at(MAX_FRAME_LEN);
    let (b, c) = rest.split_at(MAX_FRAME_LEN);
    input.extend(frame(FRAME_HEADERS, 0, 1, a));
    input.extend(frame(FRAME_CONTINUATION, 0, 1, b));
    input.extend(frame(FRAME_CONTINUATION, FLAG_END_HEADERS, 1, c));
    let (frames, blocks) = server_view(&rewrite_in_pieces(&input, &[4096]).unwrap());
    assert!(frames.iter().all(|f| f.3.len() <= MAX_FRAME_LEN));
    assert_eq!(frames.last().map(|f| f.1), Some(FLAG_END_HEADERS));
    assert_eq!(blocks[0].last(), headers.last());
}

#[test]
fn broken_framing_and_hpack_end_the_connection_with_a_reason() {
    let mut input = PREFACE.to_vec();
    input.extend(frame(FRAME_HEADERS, 0, 1, &[0x82]));
    input.extend(frame(0x0, FLAG_END_STREAM, 1, &[0; 5]));
    assert!(matches!(
        rewrite_in_pieces(&input, &[100]),
        Err(WireError::InterruptedBlock {
            open: 1,
            got: 1,
            frame_type: 0
        })
    ));
    let mut input = PREFACE.to_vec();
    input.extend(frame(FRAME_CONTINUATION, FLAG_END_HEADERS, 3, &[0x82]));
    assert_eq!(
        rewrite_in_pieces(&input, &[100]),
        Err(WireError::StrayContinuation { stream: 3 })
    );
    let mut input = PREFACE.to_vec();
    // Index 70 of an empty dynamic table.
    input.extend(frame(FRAME_HEADERS, FLAG_END_HEADERS, 1, &[0x80 | 70]));
    assert!(matches!(
        rewrite_in_pieces(&input, &[100]),
        Err(WireError::Hpack { stream: 1, .. })
    ));
    let mut input = PREFACE.to_vec();
    // A table size update above the 4096 bytes the server allows.
    input.extend(frame(
        FRAME_HEADERS,
        FLAG_END_HEADERS,
        1,
        &[0x3f, 0xe1, 0x3f, 0x82],
    ));
    assert!(matches!(
        rewrite_in_pieces(&input, &[100]),
        Err(WireError::Hpack { .. })
    ));
    let mut input = PREFACE.to_vec();
    input.extend(frame(
        FRAME_HEADERS,
        FLAG_PADDED | FLAG_END_HEADERS,
        1,
        &[9, 0x82],
    ));
    assert_eq!(
        rewrite_in_pieces(&input, &[100]),
        Err(WireError::BadPadding { stream: 1 })
    );
}

#[test]
fn a_client_without_the_preface_passes_through_for_h2_to_refuse() {
    let input = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n";
    let out = rewrite_in_pieces(input, &[3]).unwrap();
    assert_eq!(out, input);
}

#[test]
fn outbound_resets_and_goaways_are_reported() {
    let mut bytes = frame(0x4, 0, 0, &[0, 3, 0, 0, 0, 100]);
    bytes.extend(frame(FRAME_RST_STREAM, 0, 1, &1u32.to_be_bytes()));
    bytes.extend(frame(0x0, 0, 3, &[1; 40]));
    let mut goaway = 7u32.to_be_bytes().to_vec();
    goaway.extend(2u32.to_be_bytes());
    goaway.extend(b"bad".iter());
    bytes.extend(frame(FRAME_GOAWAY, 0, 0, &goaway));
    let mut observer = OutboundObserver::default();
    let mut signals = Vec::new();
    for piece in bytes.chunks(5) {
        observer.push(piece, &mut signals);
    }
    assert_eq!(
        signals,
        vec![
            ServerSignal::Reset { stream: 1, code: 1 },
            ServerSignal::GoAway {
                last_stream: 7,
                code: 2,
                debug: "bad".into()
            },
        ]
    );
    assert_eq!(error_code_name(1), "PROTOCOL_ERROR");
}

proptest! {
    #[test]
    fn any_split_of_the_input_gives_the_same_output(pieces in proptest::collection::vec(1usize..64, 1..20)) {
        let input = registration_connection();
        let whole = rewrite_in_pieces(&input, &[input.len()]).unwrap();
        prop_assert_eq!(rewrite_in_pieces(&input, &pieces).unwrap(), whole);
    }

    #[test]
    fn arbitrary_bytes_after_the_preface_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let mut input = PREFACE.to_vec();
        input.extend(bytes);
        let _ = rewrite_in_pieces(&input, &[13]);
    }
}

//! Lets any `:authority` through to our gRPC handlers. The kubelet's plugin watcher dials the
//! registration socket by bare path, so grpc-go sends the percent-encoded socket path
//! (`%2Fvar%2Flib%2F…-reg.sock`) as HTTP/2 `:authority`; `h2`, under tonic, rejects that as a
//! malformed URI and resets the stream before a handler runs. This layer sits between each
//! accepted Unix stream and `h2`: it decodes every header block the client sends (HPACK, with
//! the client's dynamic table), sets `:authority` to `localhost` (it names nothing on a Unix
//! socket), and re-encodes the block without the dynamic table, so `h2`'s decoder state never
//! depends on ours. All other frames pass through untouched. The server's replies pass through
//! too, watched for stream resets and GOAWAYs, so that failures no handler sees are logged.
//! This file holds the frame parsing and header-block rewriting (client to server);
//! authority/outbound.rs watches the replies and authority/stream.rs is the stream wrapper.

mod huffman;
mod outbound;
mod stream;

pub use outbound::{OutboundObserver, ServerSignal, error_code_name};
pub use stream::KubeletStream;

use loona_hpack::Decoder;

/// What `:authority` becomes.
pub const NORMALISED_AUTHORITY: &str = "localhost";
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const FRAME_HEADER_LEN: usize = 9;
const FRAME_HEADERS: u8 = 0x1;
const FRAME_RST_STREAM: u8 = 0x3;
const FRAME_GOAWAY: u8 = 0x7;
const FRAME_CONTINUATION: u8 = 0x9;
const FLAG_END_STREAM: u8 = 0x1;
const FLAG_END_HEADERS: u8 = 0x4;
const FLAG_PADDED: u8 = 0x8;
const FLAG_PRIORITY: u8 = 0x20;
/// SETTINGS_MAX_FRAME_SIZE and SETTINGS_HEADER_TABLE_SIZE as `h2` leaves them (it advertises
/// neither, so the client assumes the RFC 9113 defaults).
const MAX_FRAME_LEN: usize = 16_384;
const HEADER_TABLE_SIZE: usize = 4_096;
/// A header block larger than this (all its frames together) ends the connection; the
/// kubelet's largest is under 200 bytes.
const MAX_HEADER_BLOCK: usize = 1 << 20;

/// Why a connection was ended before `h2` saw the offending bytes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// A HEADERS or CONTINUATION frame over the frame size `h2` allows.
    #[error("HEADERS frame of {len} bytes is over the {MAX_FRAME_LEN}-byte frame limit")]
    FrameTooLarge {
        /// The frame's payload length.
        len: usize,
    },
    /// A header block over the size this layer buffers.
    #[error("header block on stream {stream} is over {MAX_HEADER_BLOCK} bytes")]
    BlockTooLarge {
        /// The stream the block belongs to.
        stream: u32,
    },
    /// Another frame arrived in the middle of a header block (RFC 9113 forbids it).
    #[error(
        "frame of type {frame_type:#x} on stream {got} while the header block of stream {open} awaits CONTINUATION"
    )]
    InterruptedBlock {
        /// The stream whose header block is open.
        open: u32,
        /// The stream of the frame that arrived.
        got: u32,
        /// The type of the frame that arrived.
        frame_type: u8,
    },
    /// A CONTINUATION frame with no header block to continue.
    #[error("CONTINUATION on stream {stream} without an open header block")]
    StrayContinuation {
        /// The frame's stream.
        stream: u32,
    },
    /// A HEADERS frame whose padding or priority fields do not fit in it.
    #[error("HEADERS on stream {stream} with padding or priority longer than the frame")]
    BadPadding {
        /// The frame's stream.
        stream: u32,
    },
    /// The header block is not valid HPACK.
    #[error("HPACK decoding of the header block on stream {stream} failed: {reason}")]
    Hpack {
        /// The block's stream.
        stream: u32,
        /// The decoder's error.
        reason: String,
    },
}

/// Client-to-server byte rewriting, fed in whatever pieces the socket delivers.
pub struct InboundRewriter {
    mode: Mode,
    /// Bytes of a frame header, or of a whole HEADERS/CONTINUATION frame, not yet complete.
    pending: Vec<u8>,
    /// Payload bytes of a passed-through frame still to come.
    passthrough_left: usize,
    block: Option<OpenBlock>,
    decoder: Decoder<'static>,
    /// Sends the decoder raw strings instead of Huffman-coded ones (see authority/huffman.rs).
    dehuffman: huffman::Dehuffman,
    requests: u64,
    last_authority: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Matched this many bytes of the client preface so far.
    Preface(usize),
    Frames,
    /// Not HTTP/2 with prior knowledge: passed on as is, for `h2` to refuse.
    Raw,
}

struct OpenBlock {
    stream: u32,
    end_stream: bool,
    priority: Option<[u8; 5]>,
    fragment: Vec<u8>,
}

impl Default for InboundRewriter {
    fn default() -> Self {
        Self::new()
    }
}

impl InboundRewriter {
    /// A rewriter for a new connection, expecting the client preface first.
    pub fn new() -> Self {
        let mut decoder = Decoder::new();
        decoder.set_max_allowed_table_size(HEADER_TABLE_SIZE);
        Self {
            mode: Mode::Preface(0),
            pending: Vec::new(),
            passthrough_left: 0,
            block: None,
            decoder,
            dehuffman: huffman::Dehuffman::new(),
            requests: 0,
            last_authority: None,
        }
    }

    /// Header blocks seen so far (requests and trailers).
    pub fn header_blocks(&self) -> u64 {
        self.requests
    }

    /// The `:authority` of the latest header block that had one, as the client sent it.
    pub fn last_authority(&self) -> Option<&str> {
        self.last_authority.as_deref()
    }

    /// True when the client did not open with the HTTP/2 preface.
    pub fn is_raw(&self) -> bool {
        self.mode == Mode::Raw
    }

    /// Consumes `input`, appending what `h2` should read to `out`. An error means the
    /// connection cannot go on: the client broke HTTP/2 framing or HPACK.
    pub fn push(&mut self, mut input: &[u8], out: &mut Vec<u8>) -> Result<(), WireError> {
        while !input.is_empty() {
            match self.mode {
                Mode::Raw => {
                    out.extend_from_slice(input);
                    return Ok(());
                }
                Mode::Preface(matched) => {
                    let take = (PREFACE.len() - matched).min(input.len());
                    if input[..take] != PREFACE[matched..matched + take] {
                        // The bytes matched so far are in `out` already.
                        self.mode = Mode::Raw;
                        continue;
                    }
                    out.extend_from_slice(&input[..take]);
                    input = &input[take..];
                    self.mode = if matched + take == PREFACE.len() {
                        Mode::Frames
                    } else {
                        Mode::Preface(matched + take)
                    };
                }
                Mode::Frames => input = self.push_frames(input, out)?,
            }
        }
        Ok(())
    }

    fn push_frames<'a>(
        &mut self,
        mut input: &'a [u8],
        out: &mut Vec<u8>,
    ) -> Result<&'a [u8], WireError> {
        if self.passthrough_left > 0 {
            let take = self.passthrough_left.min(input.len());
            out.extend_from_slice(&input[..take]);
            self.passthrough_left -= take;
            return Ok(&input[take..]);
        }
        if self.pending.len() < FRAME_HEADER_LEN {
            let take = (FRAME_HEADER_LEN - self.pending.len()).min(input.len());
            self.pending.extend_from_slice(&input[..take]);
            input = &input[take..];
            if self.pending.len() < FRAME_HEADER_LEN {
                return Ok(input);
            }
            let header = FrameHeader::parse(&self.pending);
            if let Some(open) = &self.block
                && header.frame_type != FRAME_CONTINUATION
            {
                return Err(WireError::InterruptedBlock {
                    open: open.stream,
                    got: header.stream,
                    frame_type: header.frame_type,
                });
            }
            if !header.is_header_block() {
                out.extend_from_slice(&self.pending);
                self.pending.clear();
                self.passthrough_left = header.len;
                return Ok(input);
            }
            if header.len > MAX_FRAME_LEN {
                return Err(WireError::FrameTooLarge { len: header.len });
            }
        }
        // A HEADERS or CONTINUATION frame: its whole payload is needed to decode it.
        let header = FrameHeader::parse(&self.pending);
        let want = FRAME_HEADER_LEN + header.len - self.pending.len();
        let take = want.min(input.len());
        self.pending.extend_from_slice(&input[..take]);
        if take == want {
            let frame = std::mem::take(&mut self.pending);
            self.header_frame(header, &frame[FRAME_HEADER_LEN..], out)?;
        }
        Ok(&input[take..])
    }

    fn header_frame(
        &mut self,
        header: FrameHeader,
        payload: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<(), WireError> {
        if header.frame_type == FRAME_CONTINUATION {
            let Some(open) = self
                .block
                .as_mut()
                .filter(|open| open.stream == header.stream)
            else {
                return Err(WireError::StrayContinuation {
                    stream: header.stream,
                });
            };
            open.fragment.extend_from_slice(payload);
            if open.fragment.len() > MAX_HEADER_BLOCK {
                return Err(WireError::BlockTooLarge {
                    stream: header.stream,
                });
            }
        } else {
            let bad_padding = WireError::BadPadding {
                stream: header.stream,
            };
            let mut body = payload;
            let mut padding = 0;
            if header.flags & FLAG_PADDED != 0 {
                let (&pad, rest) = body.split_first().ok_or(bad_padding.clone())?;
                padding = usize::from(pad);
                body = rest;
            }
            let mut priority = None;
            if header.flags & FLAG_PRIORITY != 0 {
                let (fields, rest) = body.split_first_chunk::<5>().ok_or(bad_padding.clone())?;
                priority = Some(*fields);
                body = rest;
            }
            let fragment = body
                .get(..body.len().checked_sub(padding).ok_or(bad_padding)?)
                .unwrap_or_default();
            self.block = Some(OpenBlock {
                stream: header.stream,
                end_stream: header.flags & FLAG_END_STREAM != 0,
                priority,
                fragment: fragment.to_vec(),
            });
        }
        if header.flags & FLAG_END_HEADERS != 0
            && let Some(block) = self.block.take()
        {
            self.finish_block(block, out)?;
        }
        Ok(())
    }

    fn finish_block(&mut self, block: OpenBlock, out: &mut Vec<u8>) -> Result<(), WireError> {
        let mut encoded = Vec::with_capacity(block.fragment.len() * 2);
        let mut authority = None;
        let fragment = self.dehuffman.rewrite(&block.fragment);
        self.decoder
            .decode_with_cb(&fragment, |name, value| {
                let value = if name.as_ref() == b":authority" {
                    authority = Some(String::from_utf8_lossy(&value).into_owned());
                    NORMALISED_AUTHORITY.as_bytes()
                } else {
                    value.as_ref()
                };
                encode_literal(&name, value, &mut encoded);
            })
            .map_err(|e| WireError::Hpack {
                stream: block.stream,
                reason: format!("{e:?}"),
            })?;
        self.requests += 1;
        if authority.is_some() {
            self.last_authority = authority;
        }
        write_header_frames(&block, &encoded, out);
        Ok(())
    }
}

#[derive(Debug, Clone, Copy)]
struct FrameHeader {
    len: usize,
    frame_type: u8,
    flags: u8,
    stream: u32,
}

impl FrameHeader {
    /// `bytes` holds at least the 9 header bytes.
    fn parse(bytes: &[u8]) -> Self {
        Self {
            len: usize::from(bytes[0]) << 16 | usize::from(bytes[1]) << 8 | usize::from(bytes[2]),
            frame_type: bytes[3],
            flags: bytes[4],
            stream: u32::from_be_bytes([bytes[5], bytes[6], bytes[7], bytes[8]]) & 0x7fff_ffff,
        }
    }

    fn is_header_block(&self) -> bool {
        self.frame_type == FRAME_HEADERS || self.frame_type == FRAME_CONTINUATION
    }

    fn write(&self, out: &mut Vec<u8>) {
        let len = self.len as u32;
        out.extend_from_slice(&len.to_be_bytes()[1..]);
        out.push(self.frame_type);
        out.push(self.flags);
        out.extend_from_slice(&self.stream.to_be_bytes());
    }
}

/// HPACK "literal header field without indexing, new name", no Huffman: what it decodes to
/// does not depend on any table.
fn encode_literal(name: &[u8], value: &[u8], out: &mut Vec<u8>) {
    out.push(0x00);
    encode_string(name, out);
    encode_string(value, out);
}

fn encode_string(text: &[u8], out: &mut Vec<u8>) {
    // RFC 7541 §5.1 integer with a 7-bit prefix, the H bit (Huffman) clear.
    let mut len = text.len();
    if len < 0x7f {
        out.push(len as u8);
    } else {
        out.push(0x7f);
        len -= 0x7f;
        while len >= 0x80 {
            out.push((len % 0x80) as u8 | 0x80);
            len /= 0x80;
        }
        out.push(len as u8);
    }
    out.extend_from_slice(text);
}

/// One HEADERS frame and as many CONTINUATIONs as the frame size limit asks for.
fn write_header_frames(block: &OpenBlock, encoded: &[u8], out: &mut Vec<u8>) {
    let priority = block.priority.as_ref().map_or(&[][..], |p| &p[..]);
    let first_room = MAX_FRAME_LEN - priority.len();
    let (first, mut rest) = encoded.split_at(first_room.min(encoded.len()));
    let mut flags = if rest.is_empty() { FLAG_END_HEADERS } else { 0 };
    if block.end_stream {
        flags |= FLAG_END_STREAM;
    }
    if block.priority.is_some() {
        flags |= FLAG_PRIORITY;
    }
    FrameHeader {
        len: priority.len() + first.len(),
        frame_type: FRAME_HEADERS,
        flags,
        stream: block.stream,
    }
    .write(out);
    out.extend_from_slice(priority);
    out.extend_from_slice(first);
    while !rest.is_empty() {
        let (chunk, tail) = rest.split_at(MAX_FRAME_LEN.min(rest.len()));
        rest = tail;
        FrameHeader {
            len: chunk.len(),
            frame_type: FRAME_CONTINUATION,
            flags: if rest.is_empty() { FLAG_END_HEADERS } else { 0 },
            stream: block.stream,
        }
        .write(out);
        out.extend_from_slice(chunk);
    }
}

#[cfg(test)]
#[path = "authority_tests.rs"]
mod tests;

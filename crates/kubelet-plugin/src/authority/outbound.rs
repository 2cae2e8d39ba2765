//! The server-to-client direction: frames pass through untouched, but stream resets and
//! GOAWAYs are picked out so that failures no gRPC handler sees still reach the logs.

use super::{FRAME_GOAWAY, FRAME_HEADER_LEN, FRAME_RST_STREAM, FrameHeader};

/// What the server sent that a handler never saw: a stream reset or a GOAWAY with an error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerSignal {
    /// RST_STREAM: the server ended one stream.
    Reset {
        /// The stream.
        stream: u32,
        /// The HTTP/2 error code ([`error_code_name`] names it).
        code: u32,
    },
    /// GOAWAY: the server is closing the connection.
    GoAway {
        /// The last stream the server processed or may process.
        last_stream: u32,
        /// The HTTP/2 error code ([`error_code_name`] names it).
        code: u32,
        /// The frame's debug data (its first 200 bytes), lossily as UTF-8.
        debug: String,
    },
}

/// Follows the server-to-client frames, to report resets and GOAWAYs.
#[derive(Default)]
pub struct OutboundObserver {
    pending: Vec<u8>,
    skip: usize,
}

/// Enough of a GOAWAY's debug data to say why.
const GOAWAY_KEPT: usize = 8 + 200;

impl OutboundObserver {
    /// Follows `input`, the next bytes the server sent, appending the resets and GOAWAYs
    /// completed in it to `signals`. The bytes themselves are not changed.
    pub fn push(&mut self, mut input: &[u8], signals: &mut Vec<ServerSignal>) {
        while !input.is_empty() {
            if self.skip > 0 {
                let take = self.skip.min(input.len());
                self.skip -= take;
                input = &input[take..];
                continue;
            }
            let want = if self.pending.len() < FRAME_HEADER_LEN {
                FRAME_HEADER_LEN
            } else {
                FRAME_HEADER_LEN + self.kept_payload(FrameHeader::parse(&self.pending))
            };
            let take = (want - self.pending.len()).min(input.len());
            self.pending.extend_from_slice(&input[..take]);
            input = &input[take..];
            if self.pending.len() < want {
                continue;
            }
            let header = FrameHeader::parse(&self.pending);
            let kept = self.kept_payload(header);
            if self.pending.len() < FRAME_HEADER_LEN + kept {
                continue;
            }
            let payload = &self.pending[FRAME_HEADER_LEN..];
            match header.frame_type {
                FRAME_RST_STREAM if payload.len() >= 4 => signals.push(ServerSignal::Reset {
                    stream: header.stream,
                    code: u32::from_be_bytes([payload[0], payload[1], payload[2], payload[3]]),
                }),
                FRAME_GOAWAY if payload.len() >= 8 => signals.push(ServerSignal::GoAway {
                    last_stream: u32::from_be_bytes([
                        payload[0], payload[1], payload[2], payload[3],
                    ]) & 0x7fff_ffff,
                    code: u32::from_be_bytes([payload[4], payload[5], payload[6], payload[7]]),
                    debug: String::from_utf8_lossy(&payload[8..]).into_owned(),
                }),
                _ => {}
            }
            self.skip = header.len - kept;
            self.pending.clear();
        }
    }

    fn kept_payload(&self, header: FrameHeader) -> usize {
        match header.frame_type {
            FRAME_RST_STREAM | FRAME_GOAWAY => header.len.min(GOAWAY_KEPT),
            _ => 0,
        }
    }
}

/// The HTTP/2 error code names (RFC 9113 §7), for the logs.
pub fn error_code_name(code: u32) -> &'static str {
    match code {
        0x0 => "NO_ERROR",
        0x1 => "PROTOCOL_ERROR",
        0x2 => "INTERNAL_ERROR",
        0x3 => "FLOW_CONTROL_ERROR",
        0x4 => "SETTINGS_TIMEOUT",
        0x5 => "STREAM_CLOSED",
        0x6 => "FRAME_SIZE_ERROR",
        0x7 => "REFUSED_STREAM",
        0x8 => "CANCEL",
        0x9 => "COMPRESSION_ERROR",
        0xa => "CONNECT_ERROR",
        0xb => "ENHANCE_YOUR_CALM",
        0xc => "INADEQUATE_SECURITY",
        0xd => "HTTP_1_1_REQUIRED",
        _ => "UNKNOWN",
    }
}

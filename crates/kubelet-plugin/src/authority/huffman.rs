//! A pass over a client's header block, before `loona-hpack` decodes it, that turns every
//! Huffman-coded string literal into the same string sent raw.
//!
//! `loona-hpack` builds a fresh Huffman decoding table (257 entries in nested `HashMap`s) for
//! every Huffman-coded string it meets: a gRPC request carries several, and that alone was 7%
//! of the plugin's CPU in a prepare. Here one decoder per connection, built once, decodes the
//! strings, so `loona-hpack` only ever sees raw ones; its dynamic table and what it decodes to
//! are the same (RFC 7541 sizes table entries by their decoded octets).
//!
//! The pass walks the representations of RFC 7541 §6 and copies everything else byte for byte.
//! Anything it cannot walk (a truncated block, an integer out of range, bad Huffman) is left to
//! `loona-hpack` as the client sent it, so malformed input gets the same error as before.

use super::encode_string;
use loona_hpack::huffman::HuffmanDecoder;
use std::borrow::Cow;

/// Rewrites Huffman-coded strings of header blocks as raw ones.
pub(super) struct Dehuffman {
    decoder: HuffmanDecoder,
}

/// The walk could not go on: leave the block as it is.
struct Unwalkable;

impl Dehuffman {
    pub(super) fn new() -> Self {
        Self {
            decoder: HuffmanDecoder::new(),
        }
    }

    /// `block` with every Huffman-coded string sent raw; borrowed when it has none, and also
    /// when it cannot be walked (the decoder then reports what is wrong with it).
    pub(super) fn rewrite<'a>(&mut self, block: &'a [u8]) -> Cow<'a, [u8]> {
        let mut out = Vec::with_capacity(block.len() * 2);
        match self.walk(block, &mut out) {
            Ok(true) => Cow::Owned(out),
            Ok(false) | Err(Unwalkable) => Cow::Borrowed(block),
        }
    }

    /// Copies `block` to `out` with raw strings; returns whether any string was Huffman-coded.
    fn walk(&mut self, mut block: &[u8], out: &mut Vec<u8>) -> Result<bool, Unwalkable> {
        let mut changed = false;
        while let Some(&first) = block.first() {
            let (prefix_bits, literal) = match first {
                0x80..=0xff => (7, false), // indexed field
                0x40..=0x7f => (6, true),  // literal with incremental indexing
                0x20..=0x3f => (5, false), // dynamic table size update
                _ => (4, true),            // literal without indexing / never indexed
            };
            let (index, used) = integer(block, prefix_bits)?;
            out.extend_from_slice(&block[..used]);
            block = &block[used..];
            // A literal with a new name (index 0) carries the name, then the value.
            let strings = match (literal, index) {
                (false, _) => 0,
                (true, 0) => 2,
                (true, _) => 1,
            };
            for _ in 0..strings {
                let huffman;
                (block, huffman) = self.string(block, out)?;
                changed |= huffman;
            }
        }
        Ok(changed)
    }

    /// Copies the string literal at the start of `block` to `out`, raw; returns what follows,
    /// and whether the string was Huffman-coded.
    fn string<'a>(
        &mut self,
        block: &'a [u8],
        out: &mut Vec<u8>,
    ) -> Result<(&'a [u8], bool), Unwalkable> {
        let huffman = block.first().ok_or(Unwalkable)? & 0x80 != 0;
        let (len, used) = integer(block, 7)?;
        let end = used.checked_add(len).ok_or(Unwalkable)?;
        let text = block.get(used..end).ok_or(Unwalkable)?;
        if huffman {
            let decoded = self.decoder.decode(text).map_err(|_| Unwalkable)?;
            encode_string(&decoded, out);
        } else {
            out.extend_from_slice(&block[..end]);
        }
        Ok((&block[end..], huffman))
    }
}

/// An RFC 7541 §5.1 integer with a `prefix_bits` prefix at the start of `bytes`: its value and
/// the bytes it took. At most 4 continuation bytes (values up to 2^28 and a little more).
fn integer(bytes: &[u8], prefix_bits: u8) -> Result<(usize, usize), Unwalkable> {
    let mask = (1u16 << prefix_bits) as u8 - 1;
    let first = bytes.first().ok_or(Unwalkable)? & mask;
    if first < mask {
        return Ok((usize::from(first), 1));
    }
    let mut value = usize::from(mask);
    for (i, &b) in bytes.iter().enumerate().skip(1).take(4) {
        value += usize::from(b & 0x7f) << (7 * (i - 1));
        if b & 0x80 == 0 {
            return Ok((value, i + 1));
        }
    }
    Err(Unwalkable)
}

#[cfg(test)]
mod tests {
    use super::*;
    use loona_hpack::Decoder;

    fn headers(block: &[u8]) -> Vec<(Vec<u8>, Vec<u8>)> {
        Decoder::new()
            .decode(block)
            .expect("decodable")
            .into_iter()
            .collect()
    }

    fn hex(text: &str) -> Vec<u8> {
        let digits: Vec<u8> = text.bytes().filter(u8::is_ascii_hexdigit).collect();
        digits
            .chunks(2)
            .map(|pair| u8::from_str_radix(std::str::from_utf8(pair).unwrap(), 16).unwrap())
            .collect()
    }

    /// RFC 7541 C.4.1 and C.4.2 (requests with Huffman coding), and C.6.1 (response fields
    /// with Huffman coding and literals with incremental indexing), decoded after the pass on
    /// one connection: the same fields as decoding the original, and no Huffman string left.
    #[test]
    fn rfc_7541_examples_decode_the_same_after_the_pass() {
        let blocks = [
            hex("8286 8441 8cf1 e3c2 e5f2 3a6b a0ab 90f4 ff"),
            hex("8286 84be 5886 a8eb 1064 9cbf"),
            hex(
                "4882 6402 5885 aec3 771a 4b61 96d0 7abe 9410 54d4 44a8 2005 9504 0b81 66e0 82a6 2d1b ff6e 919d 29ad 1718 63c7 8f0b 97c8 e9ae 82ae 43d3",
            ),
        ];
        let mut pass = Dehuffman::new();
        let (mut original, mut rewritten) = (Decoder::new(), Decoder::new());
        for block in &blocks {
            let raw = pass.rewrite(block).into_owned();
            assert_ne!(&raw, block, "a Huffman string was left in {block:02x?}");
            assert_eq!(
                rewritten.decode(&raw).unwrap(),
                original.decode(block).unwrap()
            );
        }
        assert_eq!(
            headers(&hex("8286 8441 8cf1 e3c2 e5f2 3a6b a0ab 90f4 ff"))[3],
            (b":authority".to_vec(), b"www.example.com".to_vec())
        );
    }

    #[test]
    fn blocks_without_huffman_strings_and_unwalkable_ones_are_left_alone() {
        let mut pass = Dehuffman::new();
        // C.3.1: the same request without Huffman coding.
        let plain = hex("8286 8441 0f77 7777 2e65 7861 6d70 6c65 2e63 6f6d");
        assert!(matches!(pass.rewrite(&plain), Cow::Borrowed(b) if b == plain));
        for broken in [hex("41 8c f1e3"), hex("41 ff ffff ffff 01"), hex("00 81")] {
            assert!(matches!(pass.rewrite(&broken), Cow::Borrowed(b) if b == broken));
        }
    }

    proptest::proptest! {
        /// Whatever the bytes, the pass never panics, and a block the decoder accepts decodes
        /// to the same fields after it.
        #[test]
        fn any_block_decodes_the_same_after_the_pass(block in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..256)) {
            let rewritten = Dehuffman::new().rewrite(&block).into_owned();
            if let Ok(expected) = Decoder::new().decode(&block) {
                proptest::prop_assert_eq!(Decoder::new().decode(&rewritten).ok(), Some(expected));
            }
        }
    }
}

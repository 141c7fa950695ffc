//! HTTP/1.1 message framing (RFC 9112 §6, §7.1) shared by the client-facing server and the
//! upstream client: Content-Length values, transfer-coding lists, chunked decoding.

use bytes::{Buf, Bytes, BytesMut};

/// The longest chunk-size line accepted (extensions included).
pub const MAX_CHUNK_LINE: usize = 4096;
/// The most trailer bytes accepted after a chunked body (they are read and dropped).
pub const MAX_TRAILERS: usize = 16 * 1024;

/// A chunked body that breaks the protocol, with what is wrong.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ChunkError(pub &'static str);

/// A Content-Length value: digits, or a list of equal digit strings.
pub fn parse_length(v: &[u8]) -> Option<u64> {
    let mut out = None;
    for part in v.split(|&b| b == b',') {
        let part = part.trim_ascii();
        if part.is_empty() || part.len() > 19 || !part.iter().all(u8::is_ascii_digit) {
            return None;
        }
        let n = part.iter().fold(0u64, |n, &d| n * 10 + u64::from(d - b'0'));
        if out.is_some_and(|o| o != n) {
            return None;
        }
        out = Some(n);
    }
    out
}

/// Whether the last token of a comma-separated list is `token` (any case).
pub fn last_token_is(v: &[u8], token: &[u8]) -> bool {
    v.rsplit(|&b| b == b',')
        .next()
        .is_some_and(|t| t.trim_ascii().eq_ignore_ascii_case(token))
}

/// Which framing header [`FramingHeaders::observe`] took in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FramingHeader {
    /// Content-Length.
    ContentLength,
    /// Transfer-Encoding.
    TransferEncoding,
    /// Connection.
    Connection,
}

/// What a message head's framing headers say (RFC 9112 §6, §9.6), gathered one header at a
/// time; each side (requests, upstream responses) then decides what it refuses.
#[derive(Debug, Default, Clone, Copy)]
pub struct FramingHeaders {
    /// The Content-Length, when every value seen parsed and agreed.
    pub length: Option<u64>,
    /// Content-Length headers seen.
    pub length_headers: usize,
    /// A Content-Length value that does not parse.
    pub length_invalid: bool,
    /// Content-Length values that disagree.
    pub length_conflict: bool,
    /// A Transfer-Encoding header was present.
    pub te: bool,
    /// How often `chunked` is named across Transfer-Encoding values.
    pub chunked: usize,
    /// Codings named across Transfer-Encoding values.
    pub codings: usize,
    /// Whether the last Transfer-Encoding value ends with `chunked`.
    pub last_chunked: bool,
    /// Connection names `close`.
    pub close: bool,
    /// Connection names `keep-alive`.
    pub keep_alive: bool,
}

impl FramingHeaders {
    /// Takes in one header, by its name (any case) and value; which framing header it was.
    pub fn observe(&mut self, name: &[u8], value: &[u8]) -> Option<FramingHeader> {
        match name.len() {
            14 if name.eq_ignore_ascii_case(b"content-length") => {
                self.length_headers += 1;
                match parse_length(value) {
                    Some(n) if self.length.is_none_or(|l| l == n) => self.length = Some(n),
                    Some(_) => self.length_conflict = true,
                    None => self.length_invalid = true,
                }
                Some(FramingHeader::ContentLength)
            }
            17 if name.eq_ignore_ascii_case(b"transfer-encoding") => {
                self.te = true;
                for coding in value.split(|&b| b == b',').map(<[u8]>::trim_ascii) {
                    self.chunked += usize::from(coding.eq_ignore_ascii_case(b"chunked"));
                    self.codings += usize::from(!coding.is_empty());
                }
                self.last_chunked = last_token_is(value, b"chunked");
                Some(FramingHeader::TransferEncoding)
            }
            10 if name.eq_ignore_ascii_case(b"connection") => {
                for token in value.split(|&b| b == b',').map(<[u8]>::trim_ascii) {
                    self.close |= token.eq_ignore_ascii_case(b"close");
                    self.keep_alive |= token.eq_ignore_ascii_case(b"keep-alive");
                }
                Some(FramingHeader::Connection)
            }
            _ => None,
        }
    }

    /// Whether a Content-Length value was invalid or disagreed with another.
    pub fn bad_length(&self) -> bool {
        self.length_invalid || self.length_conflict
    }
}

/// Where a chunked body's decoding stands.
#[derive(Clone, Copy, PartialEq, Debug)]
pub enum Chunk {
    /// Reading a chunk-size line.
    Size,
    /// Inside a chunk's data, with this many bytes left.
    Data(u64),
    /// Expecting the CRLF after a chunk's data.
    DataEnd,
    /// Reading trailer lines, this many bytes of them so far.
    Trailers(usize),
}

/// What one step of chunked decoding found.
pub enum Step {
    /// Body bytes.
    Data(Bytes),
    /// The buffer holds too little: read more.
    More,
    /// A step was taken: call again.
    Again,
    /// The body ended (its trailers are skipped).
    End,
}

/// Whether `b` may appear in a token (RFC 9110 §5.6.2).
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// Whether the rest of a chunk-size line is a list of extensions (RFC 9112 §7.1.1):
/// `*( BWS ";" BWS token [ BWS "=" BWS ( token / quoted-string ) ] )`, with no control bytes.
fn valid_extensions(mut rest: &[u8]) -> bool {
    let ws = |r: &[u8]| r.iter().take_while(|&&b| b == b' ' || b == b'\t').count();
    loop {
        rest = &rest[ws(rest)..];
        let Some(after) = rest.strip_prefix(b";") else {
            return rest.is_empty();
        };
        rest = &after[ws(after)..];
        let name = rest.iter().take_while(|&&b| is_tchar(b)).count();
        if name == 0 {
            return false;
        }
        rest = &rest[name..];
        let eq = ws(rest);
        if rest.get(eq) != Some(&b'=') {
            continue;
        }
        rest = &rest[eq + 1..];
        rest = &rest[ws(rest)..];
        if let Some(quoted) = rest.strip_prefix(b"\"") {
            let mut i = 0;
            loop {
                match quoted.get(i) {
                    None => return false,
                    Some(b'"') => break,
                    Some(b'\\')
                        if quoted
                            .get(i + 1)
                            .is_some_and(|&b| b >= 0x20 && b != 0x7f || b == b'\t') =>
                    {
                        i += 2
                    }
                    Some(&b) if (b >= 0x20 && b != 0x7f && b != b'\\') || b == b'\t' => i += 1,
                    Some(_) => return false,
                }
            }
            rest = &quoted[i + 1..];
        } else {
            let value = rest.iter().take_while(|&&b| is_tchar(b)).count();
            if value == 0 {
                return false;
            }
            rest = &rest[value..];
        }
    }
}

/// Whether a trailer line is a field: `token ":" value`, the value free of control bytes.
fn valid_trailer(line: &[u8]) -> bool {
    let name = line.iter().take_while(|&&b| is_tchar(b)).count();
    name > 0
        && line.get(name) == Some(&b':')
        && line[name + 1..]
            .iter()
            .all(|&b| b == b'\t' || (b >= 0x20 && b != 0x7f))
}

/// Takes one step of decoding from the front of `buf`.
pub fn chunk_step(buf: &mut BytesMut, chunk: &mut Chunk) -> Result<Step, ChunkError> {
    match *chunk {
        Chunk::Size => {
            let Some(nl) = memchr::memchr(b'\n', buf) else {
                if buf.len() > MAX_CHUNK_LINE {
                    return Err(ChunkError("chunk size line too long"));
                }
                return Ok(Step::More);
            };
            if nl > MAX_CHUNK_LINE {
                return Err(ChunkError("chunk size line too long"));
            }
            if nl == 0 || buf[nl - 1] != b'\r' {
                return Err(ChunkError("chunk size line not ended by CRLF"));
            }
            let line = &buf[..nl - 1];
            let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
            if digits == 0 || digits > 16 {
                return Err(ChunkError("invalid chunk size"));
            }
            if !valid_extensions(&line[digits..]) {
                return Err(ChunkError("invalid chunk extension"));
            }
            let size = line[..digits].iter().fold(0u64, |n, &d| {
                (n << 4) | u64::from((d as char).to_digit(16).unwrap_or(0))
            });
            buf.advance(nl + 1);
            *chunk = if size == 0 {
                Chunk::Trailers(0)
            } else {
                Chunk::Data(size)
            };
            Ok(Step::Again)
        }
        Chunk::Data(rem) => {
            if buf.is_empty() {
                return Ok(Step::More);
            }
            let n = rem.min(buf.len() as u64);
            let data = buf.split_to(n as usize).freeze();
            *chunk = if n == rem {
                Chunk::DataEnd
            } else {
                Chunk::Data(rem - n)
            };
            Ok(Step::Data(data))
        }
        Chunk::DataEnd => {
            if buf.len() < 2 {
                return Ok(Step::More);
            }
            if &buf[..2] != b"\r\n" {
                return Err(ChunkError("chunk data not followed by CRLF"));
            }
            buf.advance(2);
            *chunk = Chunk::Size;
            Ok(Step::Again)
        }
        Chunk::Trailers(seen) => {
            let Some(nl) = memchr::memchr(b'\n', buf) else {
                if seen + buf.len() > MAX_TRAILERS {
                    return Err(ChunkError("trailers too long"));
                }
                return Ok(Step::More);
            };
            if nl == 0 || buf[nl - 1] != b'\r' {
                return Err(ChunkError("trailer line not ended by CRLF"));
            }
            let empty = nl == 1;
            if !empty && !valid_trailer(&buf[..nl - 1]) {
                return Err(ChunkError("invalid trailer field"));
            }
            buf.advance(nl + 1);
            if empty {
                return Ok(Step::End);
            }
            if seen + nl + 1 > MAX_TRAILERS {
                return Err(ChunkError("trailers too long"));
            }
            *chunk = Chunk::Trailers(seen + nl + 1);
            Ok(Step::Again)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn framing_headers_gather_lengths_codings_and_connection_tokens() {
        let mut f = FramingHeaders::default();
        assert_eq!(f.observe(b"Host", b"x"), None);
        assert_eq!(
            f.observe(b"Content-Length", b"5, 5"),
            Some(FramingHeader::ContentLength)
        );
        assert_eq!((f.length, f.bad_length()), (Some(5), false));
        f.observe(b"content-length", b"6");
        assert_eq!(
            (f.length, f.length_conflict, f.length_headers),
            (Some(5), true, 2)
        );
        f.observe(b"content-length", b"x");
        assert!(f.length_invalid);
        f.observe(b"Transfer-Encoding", b"gzip, chunked");
        f.observe(b"transfer-encoding", b"chunked");
        assert_eq!(
            (f.te, f.chunked, f.codings, f.last_chunked),
            (true, 2, 3, true)
        );
        f.observe(b"TRANSFER-ENCODING", b"chunked, gzip");
        assert!(!f.last_chunked, "the last value decides");
        f.observe(b"Connection", b"Keep-Alive, x-foo");
        assert_eq!((f.close, f.keep_alive), (false, true));
        f.observe(b"connection", b" close ");
        assert!(f.close);
    }

    /// Decodes a chunked body fed `step` bytes at a time.
    fn dechunk(wire: &[u8], step: usize) -> Result<(Vec<u8>, Vec<u8>), ChunkError> {
        let mut buf = BytesMut::new();
        let mut chunk = Chunk::Size;
        let mut out = Vec::new();
        let mut fed = 0;
        loop {
            match chunk_step(&mut buf, &mut chunk)? {
                Step::Data(d) => out.extend_from_slice(&d),
                Step::Again => {}
                Step::End => return Ok((out, buf.to_vec())),
                Step::More => {
                    if fed == wire.len() {
                        return Err(ChunkError("cut"));
                    }
                    let n = step.min(wire.len() - fed);
                    buf.extend_from_slice(&wire[fed..fed + n]);
                    fed += n;
                }
            }
        }
    }

    #[test]
    fn chunked_bodies_decode_at_any_split() {
        let wire = b"5\r\nhello\r\n1;ext=1\r\n \r\nA ; a ; b = \"q\\\"t\"\r\n0123456789\r\n0\r\nX-T: 1\r\n\r\nNEXT";
        for step in [1, 2, 3, 7, wire.len()] {
            let (body, rest) = dechunk(wire, step).unwrap();
            assert_eq!(body, b"hello 0123456789", "step {step}");
            if step == wire.len() {
                assert_eq!(rest, b"NEXT");
            }
        }
    }

    #[test]
    fn bad_chunks_are_errors() {
        for wire in [
            &b"g\r\nhello\r\n0\r\n\r\n"[..],
            b"5\nhello\r\n0\r\n\r\n",
            b"5\r\nhelloXX0\r\n\r\n",
            b"11111111111111111\r\n",
            b"5\r\nhel",
            b"5 zz\r\nhello\r\n0\r\n\r\n",
            b"5;a\rb\r\nhello\r\n0\r\n\r\n",
            b"5;\r\nhello\r\n0\r\n\r\n",
            b"5;a=\"x\r\nhello\r\n0\r\n\r\n",
            b"0\r\n\nGET /hidden HTTP/1.1\r\n\r\n",
            b"0\r\nX-T: 1\n\r\n",
            b"0\r\nnot a field\r\n\r\n",
        ] {
            assert!(
                dechunk(wire, 1).is_err(),
                "{:?}",
                String::from_utf8_lossy(wire)
            );
        }
        let long = vec![b'1'; MAX_CHUNK_LINE + 10];
        assert!(dechunk(&long, MAX_CHUNK_LINE + 10).is_err());
    }

    #[test]
    fn lengths_and_tokens() {
        assert_eq!(parse_length(b"12"), Some(12));
        assert_eq!(parse_length(b" 3 , 3"), Some(3));
        assert_eq!(parse_length(b"3,4"), None);
        assert_eq!(parse_length(b""), None);
        assert_eq!(parse_length(b"+3"), None);
        assert!(last_token_is(b"gzip, Chunked", b"chunked"));
        assert!(!last_token_is(b"chunked, gzip", b"chunked"));
    }
}

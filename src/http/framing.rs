//! Follows the request heads and bodies going by on a connection to find
//! heads that carry both `Content-Length` and `Transfer-Encoding`, the shape
//! of request smuggling. Hyper settles such a head silently (it drops the
//! length and reads chunks), so its caller cannot tell; the verdicts found
//! here, one per head and in order, let the service refuse them with 400.

/// Largest request head followed; past it (hyper's own limit is larger) the
/// scanner stops and the connection is served as hyper alone would.
const MAX_HEAD: usize = 64 * 1024;
/// Longest chunk-size or trailer line followed.
const MAX_LINE: usize = 4 * 1024;
/// Hyper's default header count limit.
const MAX_HEADERS: usize = 100;

#[derive(Debug, Default)]
pub struct FramingScanner {
    state: State,
    buf: Vec<u8>,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum State {
    #[default]
    Head,
    /// Bytes of a `Content-Length` body still to come.
    Fixed(u64),
    ChunkSize,
    ChunkData(u64),
    /// The CRLF after a chunk's data.
    ChunkEnd,
    Trailers,
    /// Lost track (something hyper refuses, or a head too large): nothing
    /// more is judged on this connection.
    Off,
}

/// What a request head says about its body.
enum Framing {
    None,
    Length(u64),
    Chunked,
    Unknown,
}

impl FramingScanner {
    /// Follows bytes read from the client; `verdict(true)` for every complete
    /// head that names both a length and a transfer coding, `verdict(false)`
    /// for every other one.
    pub fn feed(&mut self, mut input: &[u8], verdict: &mut impl FnMut(bool)) {
        while !input.is_empty() {
            match self.state {
                State::Off => return,
                State::Head => input = self.head(input, verdict),
                State::Fixed(left) => {
                    let n = left.min(input.len() as u64);
                    input = &input[n as usize..];
                    self.state = if n == left { State::Head } else { State::Fixed(left - n) };
                }
                State::ChunkData(left) => {
                    let n = left.min(input.len() as u64);
                    input = &input[n as usize..];
                    self.state = if n == left { State::ChunkEnd } else { State::ChunkData(left - n) };
                }
                State::ChunkSize | State::ChunkEnd | State::Trailers => {
                    let Some((line, rest)) = self.line(input) else { return };
                    input = rest;
                    self.state = match self.state {
                        State::ChunkEnd => State::ChunkSize,
                        State::Trailers if line.is_empty() => State::Head,
                        State::Trailers => State::Trailers,
                        _ => match chunk_size(&line) {
                            Some(0) => State::Trailers,
                            Some(n) => State::ChunkData(n),
                            None => State::Off,
                        },
                    };
                }
            }
        }
    }

    /// Follows nothing more on this connection (it switched protocols).
    pub fn stop(&mut self) {
        if self.state != State::Off {
            self.state = State::Off;
            self.buf = Vec::new();
        }
    }

    /// Collects one line (without its line end) across reads.
    fn line<'a>(&mut self, input: &'a [u8]) -> Option<(Vec<u8>, &'a [u8])> {
        match input.iter().position(|&b| b == b'\n') {
            Some(end) => {
                self.buf.extend_from_slice(&input[..end]);
                let mut line = std::mem::take(&mut self.buf);
                if line.last() == Some(&b'\r') {
                    line.pop();
                }
                Some((line, &input[end + 1..]))
            }
            None => {
                self.buf.extend_from_slice(input);
                if self.buf.len() > MAX_LINE {
                    self.state = State::Off;
                }
                None
            }
        }
    }

    fn head<'a>(&mut self, input: &'a [u8], verdict: &mut impl FnMut(bool)) -> &'a [u8] {
        let start = self.buf.len();
        self.buf.extend_from_slice(input);
        // A head ends with an empty line: parse only once one may be there,
        // so that a head sent byte by byte costs no more than it is long.
        let window = &self.buf[start.saturating_sub(3)..];
        let may_end = window.windows(2).any(|w| w == b"\n\n") || window.windows(3).any(|w| w == b"\n\r\n");
        if !may_end {
            if self.buf.len() > MAX_HEAD {
                self.state = State::Off;
            }
            return &[];
        }
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut request = httparse::Request::new(&mut headers);
        let used = match request.parse(&self.buf) {
            Ok(httparse::Status::Complete(used)) => used,
            Ok(httparse::Status::Partial) if self.buf.len() <= MAX_HEAD => return &[],
            _ => {
                self.state = State::Off;
                return &[];
            }
        };
        let named = |name: &'static str| request.headers.iter().filter(move |h| h.name.eq_ignore_ascii_case(name));
        let has_length = named("content-length").next().is_some();
        let coding = named("transfer-encoding").next_back().map(|h| h.value);
        verdict(has_length && coding.is_some());
        let framing = match coding {
            Some(value) if is_chunked(value) => Framing::Chunked,
            Some(_) => Framing::Unknown,
            None => match named("content-length").map(|h| parse_length(h.value)).collect::<Option<Vec<_>>>() {
                Some(lengths) if lengths.is_empty() => Framing::None,
                Some(lengths) if lengths.iter().all(|n| *n == lengths[0]) => Framing::Length(lengths[0]),
                _ => Framing::Unknown,
            },
        };
        self.state = match framing {
            Framing::None | Framing::Length(0) => State::Head,
            Framing::Length(n) => State::Fixed(n),
            Framing::Chunked => State::ChunkSize,
            Framing::Unknown => State::Off,
        };
        // The bytes after the head belong to its body (or the next head).
        let taken = used - start.min(used);
        self.buf.clear();
        &input[taken.min(input.len())..]
    }
}

fn is_chunked(value: &[u8]) -> bool {
    let last = value.rsplit(|&b| b == b',').next().unwrap_or_default();
    last.trim_ascii().eq_ignore_ascii_case(b"chunked")
}

fn parse_length(value: &[u8]) -> Option<u64> {
    let value = value.trim_ascii();
    if value.is_empty() || !value.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(value).ok()?.parse().ok()
}

fn chunk_size(line: &[u8]) -> Option<u64> {
    let mut with_end = line.to_vec();
    with_end.extend_from_slice(b"\r\n");
    match httparse::parse_chunk_size(&with_end) {
        Ok(httparse::Status::Complete((_, size))) => Some(size),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The verdicts for a byte stream fed in pieces of `step` bytes.
    fn verdicts(stream: &[u8], step: usize) -> Vec<bool> {
        let mut scanner = FramingScanner::default();
        let mut found = Vec::new();
        for piece in stream.chunks(step) {
            scanner.feed(piece, &mut |v| found.push(v));
        }
        found
    }

    fn all_steps(stream: &[u8]) -> Vec<bool> {
        let whole = verdicts(stream, stream.len());
        for step in [1, 2, 3, 7, 64] {
            assert_eq!(verdicts(stream, step), whole, "fed {step} bytes at a time");
        }
        whole
    }

    #[test]
    fn length_and_coding_together_are_found_in_either_order() {
        let cl_first =
            b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n";
        let te_first = b"POST /a HTTP/1.1\r\nTransfer-Encoding: chunked\r\ncontent-length: 5\r\n\r\n0\r\n\r\n";
        assert_eq!(all_steps(cl_first), [true]);
        assert_eq!(all_steps(te_first), [true]);
    }

    #[test]
    fn bodies_are_skipped_so_later_heads_on_the_connection_are_judged() {
        let mut stream = Vec::new();
        stream.extend_from_slice(b"POST /a HTTP/1.1\r\nContent-Length: 40\r\n\r\n");
        stream.extend_from_slice(b"GET / HTTP/1.1\r\nContent-Length: 1\r\n\r\nxxx");
        stream.extend_from_slice(b"POST /b HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n");
        stream.extend_from_slice(b"1e;ext=1\r\nGET / HTTP/1.1\r\nContent-Length\r\n0\r\nX-Trailer: 1\r\n\r\n");
        stream.extend_from_slice(b"GET /c HTTP/1.1\r\n\r\n");
        stream.extend_from_slice(b"POST /d HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n");
        assert_eq!(all_steps(&stream), [false, false, false, true]);
    }

    #[test]
    fn what_hyper_refuses_stops_the_scanner() {
        let stream =
            b"NOT HTTP AT ALL\r\n\r\nPOST / HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n";
        assert!(all_steps(stream).is_empty());
        let oversized = vec![b'a'; MAX_HEAD + 10];
        assert!(verdicts(&oversized, 100).is_empty());
    }
}

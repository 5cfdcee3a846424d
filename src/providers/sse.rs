//! Server-sent events, as the providers stream them: an incremental parser
//! (bytes in, events out, any chunking) and the driver that turns an HTTP
//! body into `ChatEvent`s through a per-format `Decoder`.
//!
//! The parser follows the WHATWG event-stream rules: lines end in `\n`,
//! `\r\n` or `\r`; `data:` lines of one event are joined with `\n`; lines
//! starting with `:` are comments; a blank line ends an event. Lines are only
//! decoded once complete, so UTF-8 split across reads is never cut.

use std::collections::VecDeque;

use futures::{StreamExt, stream};

use super::{ChatEvent, ChatStream, ProviderError};

/// A line longer than this is a broken or hostile stream, not a reply.
const MAX_LINE_BYTES: usize = 8 * 1024 * 1024;

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SseEvent {
    /// The `event:` field; empty when the event had none.
    pub event: String,
    pub data: String,
    pub id: Option<String>,
}

#[derive(Debug, Default)]
pub struct SseParser {
    line: Vec<u8>,
    /// The last byte seen was `\r`: a `\n` right after it ends nothing.
    after_cr: bool,
    seen_first_line: bool,
    event: String,
    data: String,
    has_data: bool,
    id: Option<String>,
}

impl SseParser {
    pub fn new() -> Self {
        Self::default()
    }

    /// Feeds the next bytes of the stream; complete events go to `out`.
    pub fn feed(&mut self, mut bytes: &[u8], out: &mut Vec<SseEvent>) -> Result<(), ProviderError> {
        while !bytes.is_empty() {
            if self.after_cr {
                self.after_cr = false;
                if bytes[0] == b'\n' {
                    bytes = &bytes[1..];
                    continue;
                }
            }
            match bytes.iter().position(|&b| b == b'\n' || b == b'\r') {
                Some(end) => {
                    self.line.extend_from_slice(&bytes[..end]);
                    self.after_cr = bytes[end] == b'\r';
                    bytes = &bytes[end + 1..];
                    self.end_line(out);
                }
                None => {
                    self.line.extend_from_slice(bytes);
                    bytes = &[];
                }
            }
            if self.line.len() > MAX_LINE_BYTES {
                return Err(ProviderError::Protocol("an event-stream line exceeds 8 MiB".into()));
            }
        }
        Ok(())
    }

    /// The stream ended: a last unterminated line and event still count
    /// (some servers omit the final blank line).
    pub fn finish(&mut self, out: &mut Vec<SseEvent>) {
        if !self.line.is_empty() {
            self.end_line(out);
        }
        self.end_line(out);
    }

    fn end_line(&mut self, out: &mut Vec<SseEvent>) {
        let mut raw = std::mem::take(&mut self.line);
        if !self.seen_first_line {
            self.seen_first_line = true;
            if raw.starts_with(b"\xEF\xBB\xBF") {
                raw.drain(..3);
            }
        }
        if raw.is_empty() {
            self.dispatch(out);
            return;
        }
        let line = String::from_utf8_lossy(&raw);
        if line.starts_with(':') {
            return;
        }
        let (field, value) = match line.split_once(':') {
            Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
            None => (line.as_ref(), ""),
        };
        match field {
            "event" => self.event = value.to_owned(),
            "data" => {
                if self.has_data {
                    self.data.push('\n');
                }
                self.data.push_str(value);
                self.has_data = true;
            }
            "id" if !value.contains('\0') => self.id = Some(value.to_owned()),
            _ => {}
        }
    }

    fn dispatch(&mut self, out: &mut Vec<SseEvent>) {
        let event = std::mem::take(&mut self.event);
        if !std::mem::take(&mut self.has_data) {
            return;
        }
        out.push(SseEvent { event, data: std::mem::take(&mut self.data), id: self.id.clone() });
    }
}

/// What a wire format does with the events of its stream.
pub trait Decoder: Send + 'static {
    /// Handles one event, pushing what it means to `out`; answers true when
    /// this was the stream's end marker (nothing after it is read).
    fn on_event(&mut self, event: SseEvent, out: &mut Vec<ChatEvent>) -> Result<bool, ProviderError>;

    /// The body ended without an end marker: final events, or an error if
    /// the reply was cut short.
    fn on_eof(&mut self, out: &mut Vec<ChatEvent>) -> Result<(), ProviderError>;
}

/// A broken body: a connection lost or reset mid-stream.
fn body_error(e: reqwest::Error) -> ProviderError {
    if e.is_timeout() {
        ProviderError::Timeout
    } else {
        ProviderError::Connect(format!("the provider's stream broke off: {}", e.without_url()))
    }
}

struct Driver<D> {
    body: futures::stream::BoxStream<'static, Result<bytes::Bytes, reqwest::Error>>,
    parser: SseParser,
    decoder: D,
    pending: VecDeque<Result<ChatEvent, ProviderError>>,
    finished: bool,
}

impl<D: Decoder> Driver<D> {
    /// Runs parsed events through the decoder; stops at an end marker or error.
    fn decode(&mut self, events: Vec<SseEvent>) {
        let mut out = Vec::new();
        for event in events {
            match self.decoder.on_event(event, &mut out) {
                Ok(done) => {
                    self.pending.extend(out.drain(..).map(Ok));
                    if done {
                        self.finished = true;
                        return;
                    }
                }
                Err(e) => {
                    self.pending.extend(out.drain(..).map(Ok));
                    self.pending.push_back(Err(e));
                    self.finished = true;
                    return;
                }
            }
        }
    }

    async fn next(&mut self) -> Option<Result<ChatEvent, ProviderError>> {
        loop {
            if let Some(event) = self.pending.pop_front() {
                return Some(event);
            }
            if self.finished {
                return None;
            }
            let mut events = Vec::new();
            match self.body.next().await {
                Some(Ok(bytes)) => {
                    if let Err(e) = self.parser.feed(&bytes, &mut events) {
                        self.decode(events);
                        if !self.finished {
                            self.pending.push_back(Err(e));
                            self.finished = true;
                        }
                        continue;
                    }
                    self.decode(events);
                }
                Some(Err(e)) => {
                    self.pending.push_back(Err(body_error(e)));
                    self.finished = true;
                }
                None => {
                    self.parser.finish(&mut events);
                    self.decode(events);
                    if !self.finished {
                        let mut out = Vec::new();
                        let end = self.decoder.on_eof(&mut out);
                        self.pending.extend(out.into_iter().map(Ok));
                        if let Err(e) = end {
                            self.pending.push_back(Err(e));
                        }
                        self.finished = true;
                    }
                }
            }
        }
    }
}

/// The chat events of a successful streaming response.
pub fn decode(response: reqwest::Response, decoder: impl Decoder) -> ChatStream {
    let driver = Driver {
        body: response.bytes_stream().boxed(),
        parser: SseParser::new(),
        decoder,
        pending: VecDeque::new(),
        finished: false,
    };
    Box::pin(stream::unfold(driver, |mut d| async move { d.next().await.map(|e| (e, d)) }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_all(chunks: &[&[u8]]) -> Vec<SseEvent> {
        let mut p = SseParser::new();
        let mut out = Vec::new();
        for c in chunks {
            p.feed(c, &mut out).unwrap();
        }
        p.finish(&mut out);
        out
    }

    fn ev(event: &str, data: &str) -> SseEvent {
        SseEvent { event: event.into(), data: data.into(), id: None }
    }

    /// Streams in each provider's style, with what they must parse to.
    fn samples() -> Vec<(&'static str, Vec<SseEvent>)> {
        vec![
            (
                // OpenAI: LF only, [DONE], a keep-alive comment (OpenRouter).
                ": OPENROUTER PROCESSING\n\ndata: {\"choices\":[{\"delta\":{\"content\":\"Héllo 👋\"}}]}\n\n\
                 data: {\"choices\":[],\"usage\":{\"prompt_tokens\":3}}\n\ndata: [DONE]\n\n",
                vec![
                    ev("", "{\"choices\":[{\"delta\":{\"content\":\"Héllo 👋\"}}]}"),
                    ev("", "{\"choices\":[],\"usage\":{\"prompt_tokens\":3}}"),
                    ev("", "[DONE]"),
                ],
            ),
            (
                // Gemini: CRLF line ends.
                "data: {\"candidates\":[{\"content\":{\"parts\":[{\"text\":\"日本語\"}]}}]}\r\n\r\n\
                 data: {\"usageMetadata\":{\"promptTokenCount\":2}}\r\n\r\n",
                vec![
                    ev("", "{\"candidates\":[{\"content\":{\"parts\":[{\"text\":\"日本語\"}]}}]}"),
                    ev("", "{\"usageMetadata\":{\"promptTokenCount\":2}}"),
                ],
            ),
            (
                // Anthropic: named events.
                "event: message_start\ndata: {\"type\":\"message_start\"}\n\n\
                 event: ping\ndata: {\"type\": \"ping\"}\n\n\
                 event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"delta\":{\"text\":\"ça\"}}\n\n\
                 event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n",
                vec![
                    ev("message_start", "{\"type\":\"message_start\"}"),
                    ev("ping", "{\"type\": \"ping\"}"),
                    ev("content_block_delta", "{\"type\":\"content_block_delta\",\"delta\":{\"text\":\"ça\"}}"),
                    ev("message_stop", "{\"type\":\"message_stop\"}"),
                ],
            ),
            (
                // Multi-line data, CR-only line ends, a field without a colon,
                // an empty data line, no space after the colon, an id.
                "data:first\rdata: second\r\rid: 7\rdata\r\revent: x\n: comment\ndata:  two spaces\n\n",
                vec![
                    ev("", "first\nsecond"),
                    SseEvent { event: "".into(), data: "".into(), id: Some("7".into()) },
                    SseEvent { event: "x".into(), data: " two spaces".into(), id: Some("7".into()) },
                ],
            ),
        ]
    }

    #[test]
    fn parses_each_sample_whole() {
        for (text, expected) in samples() {
            assert_eq!(parse_all(&[text.as_bytes()]), expected, "{text:?}");
        }
    }

    #[test]
    fn any_split_position_gives_the_same_events() {
        for (text, expected) in samples() {
            let bytes = text.as_bytes();
            for cut in 0..=bytes.len() {
                let (a, b) = bytes.split_at(cut);
                assert_eq!(parse_all(&[a, b]), expected, "split at byte {cut} of {text:?}");
            }
            for first in 0..bytes.len() {
                for second in first..=bytes.len() {
                    let got = parse_all(&[&bytes[..first], &bytes[first..second], &bytes[second..]]);
                    assert_eq!(got, expected, "split at bytes {first} and {second} of {text:?}");
                }
            }
        }
    }

    #[test]
    fn byte_by_byte_gives_the_same_events() {
        for (text, expected) in samples() {
            let chunks: Vec<&[u8]> = text.as_bytes().chunks(1).collect();
            assert_eq!(parse_all(&chunks), expected);
        }
    }

    #[test]
    fn a_leading_bom_is_dropped_even_when_split() {
        let bytes = b"\xEF\xBB\xBFdata: x\n\n";
        for cut in 0..=bytes.len() {
            let (a, b) = bytes.split_at(cut);
            assert_eq!(parse_all(&[a, b]), vec![ev("", "x")]);
        }
    }

    #[test]
    fn a_last_event_without_blank_line_still_counts() {
        assert_eq!(parse_all(&[b"data: [DONE]"]), vec![ev("", "[DONE]")]);
        assert_eq!(parse_all(&[b"data: [DONE]\n"]), vec![ev("", "[DONE]")]);
    }

    #[test]
    fn an_endless_line_is_refused() {
        let mut p = SseParser::new();
        let chunk = vec![b'a'; 1024 * 1024];
        let mut out = Vec::new();
        let refused = (0..10).any(|_| p.feed(&chunk, &mut out).is_err());
        assert!(refused);
    }
}

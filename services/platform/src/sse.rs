//! Reading server-sent events (the `text/event-stream` format of the HTML standard) from a byte stream
//! that arrives in arbitrary pieces: lines end with CRLF, LF or CR; an event ends at a blank line; its
//! `data` lines are joined with newlines; comments and unknown fields are skipped. A last event that the
//! stream ends without a blank line is still delivered by [`Decoder::finish`], since providers do that.

/// One event: its `event` and `id` fields, if it has them, and its data.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Event {
    pub event: Option<String>,
    pub id: Option<String>,
    pub data: String,
}

/// The events of a byte stream (a response's body), the last one even when the stream ends without
/// its blank line. An error of the byte stream is the last item.
pub fn events<S, B, E>(bytes: S) -> impl futures::Stream<Item = Result<Event, E>>
where
    S: futures::Stream<Item = Result<B, E>> + Unpin,
    B: AsRef<[u8]>,
{
    use futures::StreamExt;
    futures::stream::unfold(Some((bytes, Decoder::default())), |state| async move {
        let (mut bytes, mut decoder) = state?;
        loop {
            if let Some(event) = decoder.next_event() {
                return Some((Ok(event), Some((bytes, decoder))));
            }
            match bytes.next().await {
                Some(Ok(chunk)) => decoder.push(chunk.as_ref()),
                Some(Err(error)) => return Some((Err(error), None)),
                None => return decoder.finish().map(|event| (Ok(event), None)),
            }
        }
    })
}

/// Turns pieces of a stream into events.
#[derive(Debug, Default)]
pub struct Decoder {
    /// Bytes not yet split into lines.
    pending: Vec<u8>,
    /// Where the next line starts in `pending`.
    start: usize,
    /// The event being read.
    event: Option<String>,
    id: Option<String>,
    data: Option<String>,
}

impl Decoder {
    /// Adds the next piece of the stream.
    pub fn push(&mut self, bytes: &[u8]) {
        if self.start > 0 {
            self.pending.drain(..self.start);
            self.start = 0;
        }
        self.pending.extend_from_slice(bytes);
    }

    /// The next complete event, if the stream so far holds one.
    pub fn next_event(&mut self) -> Option<Event> {
        while let Some(line) = self.next_line(false) {
            if let Some(event) = self.read_line(&line) {
                return Some(event);
            }
        }
        None
    }

    /// At the end of the stream: the event it ended in without a blank line, if any.
    pub fn finish(&mut self) -> Option<Event> {
        while let Some(line) = self.next_line(true) {
            if let Some(event) = self.read_line(&line) {
                return Some(event);
            }
        }
        self.dispatch()
    }

    /// The next whole line (without its ending). A CR at the very end of what has arrived may be the
    /// first half of a CRLF, so it waits for more bytes unless the stream has ended.
    fn next_line(&mut self, at_end: bool) -> Option<String> {
        let rest = &self.pending[self.start..];
        let Some(end) = rest.iter().position(|&byte| byte == b'\n' || byte == b'\r') else {
            if at_end && !rest.is_empty() {
                let line = String::from_utf8_lossy(rest).into_owned();
                self.start = self.pending.len();
                return Some(line);
            }
            return None;
        };
        let width = match (rest[end], rest.get(end + 1)) {
            (b'\r', Some(b'\n')) => 2,
            (b'\r', None) if !at_end => return None,
            _ => 1,
        };
        let line = String::from_utf8_lossy(&rest[..end]).into_owned();
        self.start += end + width;
        Some(line)
    }

    /// Applies one line; a blank line completes the event being read.
    fn read_line(&mut self, line: &str) -> Option<Event> {
        if line.is_empty() {
            return self.dispatch();
        }
        if line.starts_with(':') {
            return None;
        }
        let (field, value) = match line.split_once(':') {
            Some((field, value)) => (field, value.strip_prefix(' ').unwrap_or(value)),
            None => (line, ""),
        };
        match field {
            "data" => match &mut self.data {
                Some(data) => {
                    data.push('\n');
                    data.push_str(value);
                }
                None => self.data = Some(value.to_owned()),
            },
            "event" => self.event = Some(value.to_owned()),
            "id" => self.id = Some(value.to_owned()),
            _ => {}
        }
        None
    }

    /// The event read so far, if it has data (an event without data is not an event).
    fn dispatch(&mut self) -> Option<Event> {
        let (event, id) = (self.event.take(), self.id.take());
        self.data.take().map(|data| Event { event, id, data })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_byte_stream_becomes_its_events_with_the_last_unterminated_one() {
        use futures::StreamExt;
        let pieces: Vec<Result<&[u8], ()>> =
            vec![Ok(b"event: a\r\ndata: 1\r"), Ok(b"\n\r\n: comment\n\ndata: 2\ndata: 3"), Ok(b"\n")];
        let read: Vec<_> = events(futures::stream::iter(pieces)).collect().await;
        let data: Vec<String> = read.into_iter().map(|event| event.unwrap().data).collect();
        assert_eq!(data, ["1", "2\n3"]);
        let broken: Vec<Result<&[u8], &str>> = vec![Ok(b"data: 1\n\n"), Err("reset"), Ok(b"data: 2\n\n")];
        let items: Vec<_> = events(futures::stream::iter(broken)).collect().await;
        assert_eq!(items.len(), 2);
        assert_eq!(items[1], Err("reset"));
    }

    fn all(pieces: &[&[u8]]) -> Vec<Event> {
        let mut decoder = Decoder::default();
        let mut events = Vec::new();
        for piece in pieces {
            decoder.push(piece);
            events.extend(std::iter::from_fn(|| decoder.next_event()));
        }
        events.extend(decoder.finish());
        events
    }

    fn data(events: &[Event]) -> Vec<&str> {
        events.iter().map(|event| event.data.as_str()).collect()
    }

    #[test]
    fn events_end_at_blank_lines_whatever_the_line_endings() {
        for ending in ["\n", "\r\n", "\r"] {
            let stream = format!("data: {{\"a\":1}}{ending}{ending}data: [DONE]{ending}{ending}");
            assert_eq!(data(&all(&[stream.as_bytes()])), ["{\"a\":1}", "[DONE]"], "{ending:?}");
        }
    }

    #[test]
    fn an_event_split_anywhere_reads_the_same() {
        let stream = b"event: delta\r\nid: 7\r\ndata: one\r\ndata: two\r\n\r\n: a comment\r\ndata:three\r\n\r\n";
        let whole = all(&[stream]);
        let first = Event { event: Some("delta".to_owned()), id: Some("7".to_owned()), data: "one\ntwo".to_owned() };
        assert_eq!(whole[0], first);
        assert_eq!(whole[1], Event { event: None, id: None, data: "three".to_owned() });
        for split in 1..stream.len() {
            assert_eq!(all(&[&stream[..split], &stream[split..]]), whole, "split at {split}");
        }
    }

    #[test]
    fn the_last_event_counts_without_a_blank_line() {
        assert_eq!(data(&all(&[b"data: one\n\ndata: [DONE]"])), ["one", "[DONE]"]);
        assert_eq!(data(&all(&[b"data: one\r\n\r\ndata: [DONE]\r\n"])), ["one", "[DONE]"]);
        assert_eq!(data(&all(&[b"data: one\r"])), ["one"]);
    }

    #[test]
    fn nothing_but_comments_and_blank_lines_is_no_event() {
        assert!(all(&[b": keep-alive\n\n\n\nevent: ping\n\n"]).is_empty());
    }
}

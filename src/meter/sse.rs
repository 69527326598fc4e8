//! The SSE answer scanner: event boundaries across chunk splits, usage and
//! model of each event, and stripping the usage-only chunk tollgate asked
//! for on the client's behalf.

use std::sync::LazyLock;

use bytes::Bytes;
use memchr::memmem::Finder;

use super::json::{parse_seconds, parse_usage};
use super::scan::{
    choices_empty, find_model, find_tier, find_usage_object, skip_string, value_after_key,
    ERROR_KEY,
};
use super::tools::ToolCounter;
use super::window::Window;
use super::Found;
use crate::endpoint::StreamKind;
use crate::record::Capture;

/// Largest partial event held back while stripping; past it, stripping stops
/// for the stream and bytes flow through unchanged.
const HOLD_CAP: usize = 1 << 20;
const EVENT_HEAD: usize = 64 << 10;
const EVENT_TAIL: usize = 64 << 10;

/// Incremental reader of an SSE answer: finds event boundaries across chunk
/// splits, reads usage and model, captures text for estimation and, when
/// `strip` is set, removes the usage-only chunk (`"choices":[]`) that tollgate
/// asked for on the client's behalf.
#[derive(Debug)]
pub struct SseScanner {
    kind: StreamKind,
    strip: bool,
    /// Terminator progress at the end of the last chunk: 1 after `\n`, 2 after `\n\r`.
    nl: u8,
    event: Window,
    held: Vec<u8>,
    /// What has been found so far.
    pub found: Found,
    /// Tool calls of the `response.output_item.done` events so far.
    /// Boxed, and only for streams that have such events: the scanner
    /// stays small for all the others.
    items_done: Option<Box<ToolCounter>>,
    /// Text kept for estimation.
    pub capture: Capture,
}

impl SseScanner {
    /// A scanner; `strip` removes the usage-only chunk from the output.
    pub fn new(kind: StreamKind, strip: bool) -> Self {
        SseScanner {
            kind,
            strip,
            nl: 0,
            event: Window::new(EVENT_HEAD, EVENT_TAIL),
            held: Vec::new(),
            found: Found::default(),
            items_done: None,
            capture: Capture::default(),
        }
    }

    /// Whether the scanner removes the usage-only chunk.
    pub fn strips(&self) -> bool {
        self.strip
    }

    /// Feeds one chunk; returns what to forward to the client now.
    pub fn feed(&mut self, chunk: &Bytes) -> Bytes {
        let b = &chunk[..];
        let mut pos = 0;
        let held_at_entry = !self.held.is_empty();
        // Materialized output; while `None`, the output so far is exactly `b[..pos]`.
        let mut out: Option<Vec<u8>> = None;
        while let Some(end) = self.next_end(b, pos) {
            let seg = &b[pos..end];
            let keep = if self.event.is_empty() {
                self.inspect(seg)
            } else {
                self.event.push(seg);
                let ev = std::mem::replace(&mut self.event, Window::new(EVENT_HEAD, EVENT_TAIL));
                self.inspect_window(&ev)
            };
            if self.strip {
                // The first event of a chunk may have begun in earlier chunks.
                let first = pos == 0 && held_at_entry;
                if out.is_none() && (first || !keep) {
                    out = Some(b[..pos].to_vec());
                }
                if let (Some(o), true) = (out.as_mut(), keep) {
                    if first {
                        o.extend_from_slice(&self.held);
                    }
                    o.extend_from_slice(seg);
                }
                if first {
                    self.held.clear();
                }
            }
            pos = end;
        }
        let rest = &b[pos..];
        if !rest.is_empty() {
            self.event.push(rest);
        }
        if !self.strip {
            return chunk.clone();
        }
        if !rest.is_empty() {
            self.held.extend_from_slice(rest);
            if self.held.len() > HOLD_CAP {
                // No event boundary in sight: stop stripping, release everything.
                self.strip = false;
                let mut o = out.unwrap_or_else(|| b[..pos].to_vec());
                o.append(&mut self.held);
                return Bytes::from(o);
            }
        }
        match out {
            Some(o) => Bytes::from(o),
            None => chunk.slice(..pos),
        }
    }

    /// Ends the stream: returns held-back bytes (a final event without its
    /// blank line) and inspects them.
    pub fn finish(&mut self) -> Bytes {
        if !self.event.is_empty() {
            let ev = std::mem::take(&mut self.event);
            let keep = self.inspect_window(&ev);
            if !keep {
                self.held.clear();
            }
        }
        Bytes::from(std::mem::take(&mut self.held))
    }

    /// End (exclusive) of the next event terminator at or after `from`.
    fn next_end(&mut self, b: &[u8], from: usize) -> Option<usize> {
        // An empty chunk must not lose a terminator split across chunks.
        if from >= b.len() {
            return None;
        }
        let mut i = from;
        // Resume a terminator split across chunks.
        if from == 0 && self.nl != 0 {
            let state = std::mem::replace(&mut self.nl, 0);
            match (state, b.first(), b.get(1)) {
                (1, Some(b'\n'), _) => return Some(1),
                (1, Some(b'\r'), Some(b'\n')) => return Some(2),
                (1, Some(b'\r'), None) => {
                    self.nl = 2;
                    return None;
                }
                (2, Some(b'\n'), _) => return Some(1),
                _ => {}
            }
        }
        while let Some(k) = memchr::memchr(b'\n', &b[i..]) {
            let k = i + k;
            match (b.get(k + 1), b.get(k + 2)) {
                (Some(b'\n'), _) => return Some(k + 2),
                (Some(b'\r'), Some(b'\n')) => return Some(k + 3),
                (None, _) => {
                    self.nl = 1;
                    return None;
                }
                (Some(b'\r'), None) => {
                    self.nl = 2;
                    return None;
                }
                _ => i = k + 1,
            }
        }
        None
    }

    fn inspect_window(&mut self, w: &Window) -> bool {
        match w.whole() {
            Some(all) => self.inspect(all),
            None => {
                // An event too large to keep whole (a Responses API
                // `response.completed` carries the whole response): usage
                // sits at its end, type and model near its start.
                if self.found.model.is_none() || self.kind == StreamKind::Responses {
                    if let Some(m) = find_model(&w.head) {
                        self.found.model = Some(m);
                    }
                }
                if let Some(u) = find_usage_object(&w.tail).and_then(parse_usage) {
                    self.found.usage = Some(u);
                }
                if let Some(t) = find_tier(&w.tail).or_else(|| find_tier(&w.head)) {
                    self.found.tier = Some(t);
                }
                if self.kind == StreamKind::Responses {
                    let ty = event_type(&w.head).unwrap_or_default();
                    let item = ty == "response.output_item.done";
                    if is_terminal(&ty) || item {
                        // Head and tail apart: a key split between them is no key.
                        self.count_tools(&[&w.head, &w.tail], item);
                    }
                    if is_terminal(&ty) {
                        self.found.done = true;
                    }
                }
                true
            }
        }
    }

    /// Reads one complete event; returns whether to forward it.
    fn inspect(&mut self, ev: &[u8]) -> bool {
        match self.kind {
            StreamKind::Chat => {
                if is_done(ev) {
                    self.found.done = true;
                    return true;
                }
                if self.found.model.is_none() {
                    self.found.model = find_model(ev);
                }
                // Every chunk may carry it; the last one's is the answer's.
                if let Some(t) = find_tier(ev) {
                    self.found.tier = Some(t);
                }
                if let Some(s) = find_usage_object(ev).and_then(parse_seconds) {
                    self.found.units.seconds = s;
                }
                if let Some(u) = find_usage_object(ev).and_then(parse_usage) {
                    self.found.usage = Some(u);
                    if choices_empty(ev) {
                        return false;
                    }
                }
                // A mid-stream error event (`data: {"error": {...}}`) is no answer text.
                let is_error = ERROR_KEY
                    .find_iter(ev)
                    .any(|at| value_after_key(ev, at, 7).is_some_and(|v| ev.get(v) == Some(&b'{')));
                if !is_error {
                    self.capture.push(ev);
                }
                true
            }
            StreamKind::Responses => {
                let ty = event_type(ev).unwrap_or_default();
                if ty.ends_with(".delta") {
                    self.capture.push(ev);
                } else if ty == "response.created" || ty == "response.in_progress" {
                    if self.found.model.is_none() {
                        self.found.model = find_model(ev);
                    }
                    if let Some(t) = find_tier(ev) {
                        self.found.tier = Some(t);
                    }
                } else if ty == "response.output_item.done" {
                    self.count_tools(&[ev], true);
                } else if is_terminal(&ty) {
                    self.count_tools(&[ev], false);
                    if let Some(m) = find_model(ev) {
                        self.found.model = Some(m);
                    }
                    if let Some(t) = find_tier(ev) {
                        self.found.tier = Some(t);
                    }
                    if let Some(u) = find_usage_object(ev).and_then(parse_usage) {
                        self.found.usage = Some(u);
                    }
                    self.found.done = true;
                }
                true
            }
        }
    }
}

/// The Responses API events that end a response (and may carry usage).
impl SseScanner {
    /// Tool calls in a Responses event: the terminal event lists them all,
    /// each `response.output_item.done` one; the larger count of each kind
    /// wins, so none is counted twice and none is lost when the terminal
    /// event is too large to be read whole.
    fn count_tools(&mut self, parts: &[&[u8]], item_done: bool) {
        let counts = if item_done {
            // Each item's own event: a tally across them (containers stay distinct).
            let tally = self.items_done.get_or_insert_with(Box::default);
            for p in parts {
                tally.add(p);
            }
            tally.counts()
        } else {
            let mut c = ToolCounter::default();
            for p in parts {
                c.add(p);
            }
            c.counts()
        };
        for (have, n) in self.found.units.tools.iter_mut().zip(counts) {
            *have = (*have).max(n);
        }
    }
}

fn is_terminal(ty: &str) -> bool {
    matches!(
        ty,
        "response.completed" | "response.incomplete" | "response.failed"
    )
}

fn is_done(ev: &[u8]) -> bool {
    ev.split(|&c| c == b'\n').any(|line| {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        line.strip_prefix(b"data:")
            .map(|d| d.trim_ascii() == b"[DONE]")
            .unwrap_or(false)
    })
}

/// The SSE `event:` name, else the data's `"type"`.
fn event_type(ev: &[u8]) -> Option<String> {
    for line in ev.split(|&c| c == b'\n') {
        if let Some(name) = line.strip_prefix(b"event:") {
            return Some(String::from_utf8_lossy(name.trim_ascii()).into_owned());
        }
    }
    static TYPE_KEY: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b"\"type\""));
    let at = TYPE_KEY.find(ev)?;
    let v = value_after_key(ev, at, 6)?;
    let end = skip_string(ev, v)?;
    serde_json::from_slice(&ev[v..end]).ok()
}

#[cfg(test)]
mod tests;

//! Built-in tool calls of a Responses answer (`web_search_call`,
//! `file_search_call`, `code_interpreter_call` and its containers,
//! `image_generation_call` output items), counted from the answer's bytes
//! chunk by chunk: a JSON answer with generated images is far larger than
//! the windows the usage is read from, and a call in its middle still counts.

use memchr::memmem::Finder;
use std::sync::LazyLock;

use super::scan::{skip_string, value_after_key};
use crate::pricing::Tool;

static TYPE_KEY: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b"\"type\""));
static CONTAINER_KEY: LazyLock<Finder<'static>> =
    LazyLock::new(|| Finder::new(b"\"container_id\""));

/// Bytes kept from one chunk to the next, so a key and value split across
/// chunks is still found: longer than any `"type": "..._call"` or
/// `"container_id": "cntr_..."` pair OpenAI writes.
const CARRY: usize = 256;

/// Most distinct containers remembered per answer (a bound on memory; more
/// are counted as one each beyond it).
const MAX_CONTAINERS: usize = 64;

/// Tool calls counted so far.
#[derive(Debug, Default, Clone)]
pub struct ToolCounter {
    carry: Vec<u8>,
    calls: [u64; 4],
    containers: Vec<Vec<u8>>,
    extra_containers: u64,
}

impl ToolCounter {
    /// Counts the calls in one chunk of an answer.
    pub fn feed(&mut self, chunk: &[u8]) {
        if !self.carry.is_empty() {
            // Only pairs that start in the carried bytes and end in this
            // chunk: the others were counted with the chunk they are in.
            let mut joined = std::mem::take(&mut self.carry);
            let split = joined.len();
            joined.extend_from_slice(&chunk[..chunk.len().min(CARRY)]);
            self.scan(&joined, Some(split));
            self.carry = joined;
            self.carry.truncate(split);
        }
        self.scan(chunk, None);
        if chunk.len() >= CARRY {
            self.carry.clear();
            self.carry.extend_from_slice(&chunk[chunk.len() - CARRY..]);
        } else {
            self.carry.extend_from_slice(chunk);
            let over = self.carry.len().saturating_sub(CARRY);
            self.carry.drain(..over);
        }
    }

    /// Counts the calls in one whole text (an SSE event), unrelated to
    /// the bytes fed before.
    pub fn add(&mut self, b: &[u8]) {
        self.scan(b, None);
    }

    /// Counts the calls in one whole text.
    #[cfg(test)]
    pub fn of(b: &[u8]) -> ToolCounter {
        let mut c = ToolCounter::default();
        c.add(b);
        c
    }

    /// Keys found at `at`, counted when they lie wholly in `b` and, with
    /// `split`, start before it and end after it.
    fn scan(&mut self, b: &[u8], split: Option<usize>) {
        let counts = |start: usize, end: usize| match split {
            None => true,
            Some(s) => start < s && end > s,
        };
        for at in TYPE_KEY.find_iter(b) {
            let Some((s, e)) = string_value(b, at, 6) else {
                continue;
            };
            if !counts(at, e) {
                continue;
            }
            let Ok(name) = std::str::from_utf8(&b[s + 1..e - 1]) else {
                continue;
            };
            if let Some(t) = Tool::from_item_type(name) {
                let c = &mut self.calls[t as usize];
                *c = c.saturating_add(1);
            }
        }
        for at in CONTAINER_KEY.find_iter(b) {
            let Some((s, e)) = string_value(b, at, 14) else {
                continue;
            };
            if !counts(at, e) {
                continue;
            }
            let id = &b[s..e];
            if !self.containers.iter().any(|c| c == id) {
                if self.containers.len() < MAX_CONTAINERS {
                    self.containers.push(id.to_vec());
                } else {
                    self.extra_containers = self.extra_containers.saturating_add(1);
                }
            }
        }
    }

    /// Calls per [`Tool`] (in [`Tool::ALL`]'s order); code interpreter
    /// calls counted by container, at least one when there were calls.
    pub fn counts(&self) -> [u64; 4] {
        let mut c = self.calls;
        let ci = Tool::CodeInterpreter as usize;
        if c[ci] > 0 {
            let containers = (self.containers.len() as u64).saturating_add(self.extra_containers);
            c[ci] = containers.max(1);
        }
        c
    }
}

/// The span (quotes included) of the string value of the key at `at`.
fn string_value(b: &[u8], at: usize, key_len: usize) -> Option<(usize, usize)> {
    let v = value_after_key(b, at, key_len)?;
    if b.get(v) != Some(&b'"') {
        return None;
    }
    Some((v, skip_string(b, v)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    const ANSWER: &str = r#"{"id":"resp_1","object":"response","output":[
      {"type": "web_search_call", "id": "ws_1", "status": "completed"},
      {"type": "web_search_call", "id": "ws_2", "status": "completed"},
      {"type": "file_search_call", "id": "fs_1", "queries": ["\"type\": \"web_search_call\""]},
      {"type": "code_interpreter_call", "id": "ci_1", "container_id": "cntr_a"},
      {"type": "code_interpreter_call", "id": "ci_2", "container_id": "cntr_a"},
      {"type": "image_generation_call", "id": "ig_1", "result": "AAAA"},
      {"type": "message", "content": [{"type": "output_text", "text": "hi"}]}],
      "tools": [{"type": "web_search"}, {"type": "code_interpreter", "container": {"type": "auto"}}]}"#;

    #[test]
    fn counts_calls_and_containers_whatever_the_chunking() {
        assert_eq!(ToolCounter::of(ANSWER.as_bytes()).counts(), [2, 1, 1, 1]);
        let b = ANSWER.as_bytes();
        for size in [1, 2, 3, 7, 13, 64, 255, 256, 300] {
            let mut c = ToolCounter::default();
            for chunk in b.chunks(size) {
                c.feed(chunk);
            }
            assert_eq!(c.counts(), [2, 1, 1, 1], "chunks of {size}");
        }
    }

    #[test]
    fn a_call_past_a_large_image_still_counts() {
        let big = "A".repeat(3 << 20);
        let body = format!(
            r#"{{"output":[{{"type":"image_generation_call","result":"{big}"}},{{"type":"web_search_call"}}]}}"#
        );
        let mut c = ToolCounter::default();
        for chunk in body.as_bytes().chunks(16 << 10) {
            c.feed(chunk);
        }
        assert_eq!(c.counts(), [1, 0, 0, 1]);
    }
}

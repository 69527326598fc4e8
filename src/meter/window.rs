//! The bounded window the SSE and JSON scanners read events and bodies
//! through.

/// Bytes kept of an event or body for inspection: all of it up to `head_cap`,
/// then only a rolling tail, so memory stays bounded whatever the size.
#[derive(Debug, Default)]
pub(super) struct Window {
    pub(super) head: Vec<u8>,
    pub(super) tail: Vec<u8>,
    pub(super) len: u64,
    head_cap: usize,
    tail_cap: usize,
}

impl Window {
    pub(super) fn new(head_cap: usize, tail_cap: usize) -> Self {
        Window {
            head_cap,
            tail_cap,
            ..Window::default()
        }
    }

    pub(super) fn push(&mut self, mut b: &[u8]) {
        self.len += b.len() as u64;
        if self.head.len() < self.head_cap {
            let n = b.len().min(self.head_cap - self.head.len());
            self.head.extend_from_slice(&b[..n]);
            b = &b[n..];
        }
        if !b.is_empty() {
            self.tail.extend_from_slice(b);
            if self.tail.len() > 2 * self.tail_cap {
                let cut = self.tail.len() - self.tail_cap;
                self.tail.drain(..cut);
            }
        }
    }

    pub(super) fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The whole content, when it was small enough to keep whole.
    pub(super) fn whole(&self) -> Option<&[u8]> {
        self.tail.is_empty().then_some(&self.head[..])
    }
}

//! The access log: one line per record (target `tollgate::access`), never
//! prompt or answer text, never keys.
//!
//! The writer thread formats the lines of a whole batch into one buffer and
//! hands it to the log writer in one piece. Going through `tracing` cost
//! about 10 us of CPU per line (field visitors, a formatter, one message and
//! one `write` per line on the appender thread); on a few cores that work
//! took the CPU from the request workers and showed as a tail of tens of
//! milliseconds (BENCHMARKS.md). The lines keep the `tracing` text and JSON
//! shapes, so log tooling sees no difference, and `RUST_LOG` still turns
//! them off (`tollgate::access=off`).
//!
//! Every value a client chooses (user, path, model, upstream's request id)
//! is quoted and escaped in text lines, as JSON strings are: a newline, a
//! quote or `key=value` inside a value can neither end a line nor forge a
//! field.

use std::io::Write;
use std::sync::OnceLock;

use parking_lot::Mutex;

use crate::config::LogFormat;
use crate::record::Priced;

/// Where access lines go, set once by the binary.
struct Sink {
    format: LogFormat,
    out: Mutex<Box<dyn Write + Send>>,
}

static SINK: OnceLock<Sink> = OnceLock::new();

/// Sends access lines, in `format`, to `out` (the binary passes its
/// non-blocking log writer, so a slow stderr drops lines rather than
/// stalling the writer). Without a call, no access lines are written.
pub fn install(format: LogFormat, out: impl Write + Send + 'static) {
    let _ = SINK.set(Sink {
        format,
        out: Mutex::new(Box::new(out)),
    });
}

/// Writes the access lines of a written batch.
pub(super) fn write_batch(batch: &[Priced], buf: &mut Vec<u8>) {
    let Some(sink) = SINK.get() else {
        return;
    };
    if batch.is_empty() || !tracing::enabled!(target: "tollgate::access", tracing::Level::INFO) {
        return;
    }
    buf.clear();
    let now = chrono::Utc::now()
        .format("%Y-%m-%dT%H:%M:%S%.6fZ")
        .to_string();
    for p in batch {
        match sink.format {
            LogFormat::Text => text_line(buf, &now, p),
            LogFormat::Json => json_line(buf, &now, p),
        }
    }
    let _ = sink.out.lock().write_all(buf);
}

/// `tracing`'s text shape: `TIME  INFO tollgate::access: request key=value ...`.
pub fn text_line(buf: &mut Vec<u8>, now: &str, p: &Priced) {
    let r = &p.record;
    let _ = write!(buf, "{now}  INFO tollgate::access: request user=");
    quoted(buf, &r.user);
    buf.extend_from_slice(b" endpoint=");
    quoted(buf, &r.endpoint);
    buf.extend_from_slice(b" model=");
    quoted(buf, r.model_or_requested());
    let u = &r.usage;
    int(buf, b" status=", r.status.into());
    buf.extend_from_slice(if r.stream {
        b" stream=true"
    } else {
        b" stream=false"
    });
    int(buf, b" query_tokens=", u.query);
    int(buf, b" answer_tokens=", u.answer);
    int(buf, b" cached_tokens=", u.cached);
    int(buf, b" reasoning_tokens=", u.reasoning);
    buf.extend_from_slice(if r.estimated {
        b" estimated=true"
    } else {
        b" estimated=false"
    });
    buf.extend_from_slice(b" cost=");
    crate::pricing::write_scaled(buf, p.cost.into(), 12);
    buf.extend_from_slice(b" duration_ms=");
    millis(buf, r.duration_us);
    if let Some(t) = r.ttfb_us {
        buf.extend_from_slice(b" ttfb_ms=");
        millis(buf, t);
    }
    if let Some(id) = &r.request_id {
        buf.extend_from_slice(b" request_id=");
        quoted(buf, id);
    }
    buf.push(b'\n');
}

/// A value in double quotes with `"`, `\\` and every control character
/// escaped (Rust's `Debug` for strings). Plain printable ASCII, which nearly
/// every value is, is copied as it is: `Debug` walks it char by char.
fn quoted(buf: &mut Vec<u8>, s: &str) {
    if s.bytes()
        .all(|b| (0x20..0x7f).contains(&b) && b != b'"' && b != b'\\')
    {
        buf.push(b'"');
        buf.extend_from_slice(s.as_bytes());
        buf.push(b'"');
    } else {
        let _ = write!(buf, "{s:?}");
    }
}

fn int(buf: &mut Vec<u8>, key: &[u8], v: u64) {
    buf.extend_from_slice(key);
    buf.extend_from_slice(itoa::Buffer::new().format(v).as_bytes());
}

/// Microseconds as milliseconds, written as `Display` writes
/// `us as f64 / 1000.0` (`2.5`, `1`, `0.001`) without float formatting.
fn millis(buf: &mut Vec<u8>, us: u64) {
    buf.extend_from_slice(itoa::Buffer::new().format(us / 1000).as_bytes());
    let frac = us % 1000;
    if frac != 0 {
        let digits = [
            b'.',
            b'0' + (frac / 100) as u8,
            b'0' + (frac / 10 % 10) as u8,
            b'0' + (frac % 10) as u8,
        ];
        let end = digits.len() - digits.iter().rev().take_while(|&&d| d == b'0').count();
        buf.extend_from_slice(&digits[..end]);
    }
}

/// `tracing`'s JSON shape: `{"timestamp","level","fields":{...},"target"}`.
pub fn json_line(buf: &mut Vec<u8>, now: &str, p: &Priced) {
    let r = &p.record;
    let u = &r.usage;
    let _ = write!(
        buf,
        r#"{{"timestamp":"{now}","level":"INFO","fields":{{"message":"request","user":"#
    );
    json_str(buf, &r.user);
    buf.extend_from_slice(br#","endpoint":"#);
    json_str(buf, &r.endpoint);
    buf.extend_from_slice(br#","model":"#);
    json_str(buf, r.model_or_requested());
    int(buf, br#","status":"#, r.status.into());
    buf.extend_from_slice(if r.stream {
        br#","stream":true"#
    } else {
        br#","stream":false"#
    });
    int(buf, br#","query_tokens":"#, u.query);
    int(buf, br#","answer_tokens":"#, u.answer);
    int(buf, br#","cached_tokens":"#, u.cached);
    int(buf, br#","reasoning_tokens":"#, u.reasoning);
    buf.extend_from_slice(if r.estimated {
        br#","estimated":true"#
    } else {
        br#","estimated":false"#
    });
    buf.extend_from_slice(br#","cost":""#);
    crate::pricing::write_scaled(buf, p.cost.into(), 12);
    buf.extend_from_slice(br#"","duration_ms":"#);
    millis(buf, r.duration_us);
    if let Some(t) = r.ttfb_us {
        buf.extend_from_slice(br#","ttfb_ms":"#);
        millis(buf, t);
    }
    if let Some(id) = &r.request_id {
        buf.extend_from_slice(br#","request_id":"#);
        json_str(buf, id);
    }
    buf.extend_from_slice(br#"},"target":"tollgate::access"}"#);
    buf.push(b'\n');
}

fn json_str(buf: &mut Vec<u8>, s: &str) {
    let _ = serde_json::to_writer(&mut *buf, s);
}

#[cfg(test)]
mod tests;

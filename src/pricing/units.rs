//! Billable counts that are not tokens: images priced per image (with the
//! size and quality their price rule is chosen by), built-in tool calls of
//! the Responses API, audio seconds and speech characters; their canonical
//! text form, which is what records store.
//!
//! Only tollgate's own names and numbers make up that text: a size is kept
//! only as `WxH` digits and a quality only from a fixed set, so nothing a
//! client invents reaches storage, CSV or logs.

/// An image quality a per-image price rule can name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Quality {
    /// `standard` (dall-e-3's default).
    Standard,
    /// `hd`.
    Hd,
    /// `low`.
    Low,
    /// `medium`.
    Medium,
    /// `high`.
    High,
}

impl Quality {
    /// The quality a request's `quality` names; `None` for anything else
    /// (`auto` included: the model's default applies).
    pub fn parse(s: &str) -> Option<Quality> {
        Some(match s {
            "standard" => Quality::Standard,
            "hd" => Quality::Hd,
            "low" => Quality::Low,
            "medium" => Quality::Medium,
            "high" => Quality::High,
            _ => return None,
        })
    }

    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Quality::Standard => "standard",
            Quality::Hd => "hd",
            Quality::Low => "low",
            Quality::Medium => "medium",
            Quality::High => "high",
        }
    }
}

/// Reads an image size `WxH` (both 1 to 65535); `None` for anything else.
pub fn parse_size(s: &str) -> Option<(u16, u16)> {
    let (w, h) = s.split_once('x')?;
    let num = |t: &str| -> Option<u16> {
        if t.is_empty() || t.len() > 5 || !t.bytes().all(|c| c.is_ascii_digit()) {
            return None;
        }
        t.parse::<u16>().ok().filter(|&v| v > 0)
    };
    Some((num(w)?, num(h)?))
}

/// A built-in tool of the Responses API whose calls are billed per call
/// (code interpreter: per container).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tool {
    /// `web_search_call` output items.
    WebSearch,
    /// `file_search_call` output items.
    FileSearch,
    /// Distinct containers of `code_interpreter_call` output items.
    CodeInterpreter,
    /// `image_generation_call` output items.
    ImageGeneration,
}

impl Tool {
    /// Every tool, in the order records list them.
    pub const ALL: [Tool; 4] = [
        Tool::WebSearch,
        Tool::FileSearch,
        Tool::CodeInterpreter,
        Tool::ImageGeneration,
    ];

    /// The output item type of its calls, also the name of its price rows
    /// (`web_search_call`, `web_search_call/gpt-4o`).
    pub fn item_type(self) -> &'static str {
        match self {
            Tool::WebSearch => "web_search_call",
            Tool::FileSearch => "file_search_call",
            Tool::CodeInterpreter => "code_interpreter_call",
            Tool::ImageGeneration => "image_generation_call",
        }
    }

    /// The tool whose calls an output item type is.
    pub fn from_item_type(s: &str) -> Option<Tool> {
        Tool::ALL.into_iter().find(|t| t.item_type() == s)
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// A record's counts that are priced per unit rather than per token.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct Units {
    /// Images priced per image (dall-e-2, dall-e-3): the request's `n`.
    pub images: u64,
    /// The request's `size`, when it named one.
    pub image_size: Option<(u16, u16)>,
    /// The request's `quality`, when it named one.
    pub image_quality: Option<Quality>,
    /// Built-in tool calls by [`Tool`] (code interpreter: containers).
    pub tools: [u64; 4],
    /// Seconds of audio priced per minute (`usage.type` `duration`).
    pub seconds: u64,
    /// Characters of speech input priced per character (tts-1).
    pub characters: u64,
}

impl Units {
    /// Whether nothing is counted.
    pub fn is_empty(&self) -> bool {
        self.images == 0 && self.tools == [0; 4] && self.seconds == 0 && self.characters == 0
    }

    /// Calls of one tool.
    pub fn tool(&self, t: Tool) -> u64 {
        self.tools[t.index()]
    }

    /// Adds calls of one tool (saturating: the counts come from upstream).
    pub fn add_tool(&mut self, t: Tool, n: u64) {
        let c = &mut self.tools[t.index()];
        *c = c.saturating_add(n);
    }

    /// The canonical text: `key=value` pairs separated by spaces, in a
    /// fixed order, zero counts left out; empty when nothing is counted.
    pub fn to_text(&self) -> String {
        use std::fmt::Write;
        let mut out = String::new();
        let mut pair = |k: &str, v: &dyn std::fmt::Display| {
            if !out.is_empty() {
                out.push(' ');
            }
            let _ = write!(out, "{k}={v}");
        };
        if self.images > 0 {
            pair("images", &self.images);
            if let Some((w, h)) = self.image_size {
                pair("size", &format_args!("{w}x{h}"));
            }
            if let Some(q) = self.image_quality {
                pair("quality", &q.as_str());
            }
        }
        for t in Tool::ALL {
            if self.tool(t) > 0 {
                pair(t.item_type(), &self.tool(t));
            }
        }
        if self.seconds > 0 {
            pair("seconds", &self.seconds);
        }
        if self.characters > 0 {
            pair("characters", &self.characters);
        }
        out
    }

    /// Reads [`Units::to_text`]'s form; unknown or broken pairs are skipped
    /// (a newer tollgate may have written more kinds).
    pub fn from_text(s: &str) -> Units {
        let mut u = Units::default();
        for pair in s.split_ascii_whitespace() {
            let Some((k, v)) = pair.split_once('=') else {
                continue;
            };
            let n = v.parse::<u64>().ok();
            match k {
                "images" => u.images = n.unwrap_or(0),
                "size" => u.image_size = parse_size(v),
                "quality" => u.image_quality = Quality::parse(v),
                "seconds" => u.seconds = n.unwrap_or(0),
                "characters" => u.characters = n.unwrap_or(0),
                k => {
                    if let (Some(t), Some(n)) = (Tool::from_item_type(k), n) {
                        u.add_tool(t, n);
                    }
                }
            }
        }
        u
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_form_round_trips_and_keeps_only_known_names() {
        let mut u = Units {
            images: 2,
            image_size: Some((1024, 1792)),
            image_quality: Some(Quality::Hd),
            seconds: 37,
            ..Units::default()
        };
        u.add_tool(Tool::WebSearch, 2);
        u.add_tool(Tool::CodeInterpreter, 1);
        let t = u.to_text();
        assert_eq!(
            t,
            "images=2 size=1024x1792 quality=hd web_search_call=2 code_interpreter_call=1 seconds=37"
        );
        assert_eq!(Units::from_text(&t), u);
        assert_eq!(Units::default().to_text(), "");
        assert!(Units::from_text("").is_empty());
        let odd = Units::from_text("x=1 size=1e3x5 quality=ultra web_search_call=y images=1");
        assert_eq!(
            odd,
            Units {
                images: 1,
                ..Units::default()
            }
        );
        assert_eq!(parse_size("256x256"), Some((256, 256)));
        for bad in ["auto", "0x5", "1024x", "x1", "99999x1", "+1x1", "1024X1024"] {
            assert_eq!(parse_size(bad), None, "{bad}");
        }
    }
}

//! How much a request reserves against its user's budget before it goes
//! upstream, by endpoint family: the worst case its body allows where the
//! body is read (JSON APIs, image generations), what this process has seen
//! such requests cost where it streams (image edits, audio), and the
//! `--reserve-floor` for every other endpoint that can spend. The README's
//! budget section lists where a real cost may still exceed its reservation.

use crate::app::App;
use crate::endpoint::Endpoint;

use super::{path, Ctx};

/// Image output tokens of gpt-image-1 per image, by quality (low, medium,
/// high), as OpenAI publishes them: 1024x1024, then 1024x1536 and
/// 1536x1024.
const SQUARE_TOKENS: [u64; 3] = [272, 1056, 4160];
const OBLONG_TOKENS: [u64; 3] = [408, 1584, 6240];

/// Extra image output tokens per partial image of a streamed generation.
const PARTIAL_IMAGE_TOKENS: u64 = 100;

/// Size assumed of an audio upload that declares none: OpenAI's limit on
/// audio files (25 MB), so a chunked upload cannot dodge its reservation.
const AUDIO_UPLOAD_LIMIT: u64 = 25 << 20;

/// Families whose POSTs spend nothing (listing models, storing files,
/// moderation, conversation state): they reserve nothing.
const FREE_FAMILIES: [&str; 5] = ["models", "files", "uploads", "moderations", "conversations"];

/// The worst-case cost (pico-dollars) and tokens a request may spend.
pub(super) fn reservation(app: &App, ctx: &Ctx) -> (i128, u64) {
    let floor = i128::from(app.config.reserve_floor);
    match ctx.endpoint {
        e if e.needs_model() => json_api(app, ctx),
        Endpoint::Images => images(app, ctx, floor),
        // The model is in the upload, read only once it streams.
        Endpoint::ImageUpload => (floor.max(app.budgets.recent.any_image().into()), 0),
        Endpoint::Audio => {
            let bytes = ctx.request.declared.unwrap_or(AUDIO_UPLOAD_LIMIT);
            (floor.max(app.budgets.recent.audio(bytes)), 0)
        }
        _ if ctx.post && !FREE_FAMILIES.contains(&path::family(&ctx.path)) => (floor, 0),
        _ => (0, 0),
    }
}

/// A prompt of at most one token per 3 bytes of body plus the answer size
/// it asks for times the answers it asks for (or the configured default),
/// at the requested model's prices.
fn json_api(app: &App, ctx: &Ctx) -> (i128, u64) {
    let r = &ctx.request;
    let prompt = (r.body.len() as u64).div_ceil(3);
    let answer = if ctx.endpoint == Endpoint::Embeddings {
        0
    } else {
        r.max_tokens
            .unwrap_or(app.config.reserve_answer_tokens)
            .saturating_mul(r.choices)
    };
    let cost = app
        .store
        .prices()
        .lookup(&r.model, &r.model, ctx.started_ms)
        .map_or(0, |(_, p)| worst_cost(prompt, answer, p));
    (cost, prompt.saturating_add(answer))
}

/// Pico-dollars of `prompt` and `answer` tokens at `p`: saturating, so a
/// sum past any budget refuses and never wraps.
fn worst_cost(prompt: u64, answer: u64, p: &crate::pricing::Price) -> i128 {
    i128::from(prompt)
        .saturating_mul(i128::from(p.query))
        .saturating_add(i128::from(answer).saturating_mul(i128::from(p.answer)))
}

/// Image output tokens of one image of this size and quality; the largest
/// of the row or column when either is `auto`, absent or unknown.
pub(super) fn image_tokens(size: Option<&str>, quality: Option<&str>) -> u64 {
    let row = match size {
        Some("1024x1024") => SQUARE_TOKENS,
        _ => OBLONG_TOKENS,
    };
    match quality {
        Some("low") => row[0],
        Some("medium") => row[1],
        _ => row[2],
    }
}

/// A priced model: its prompt (one token per 3 body bytes) and `n` images
/// of the size and quality asked for, at its prices, or the largest cost
/// seen of a request for that model if higher. Else that largest cost, else
/// the floor.
fn images(app: &App, ctx: &Ctx, floor: i128) -> (i128, u64) {
    let r = &ctx.request;
    let Some(img) = &r.image else {
        return (floor, 0);
    };
    let seen = app.budgets.recent.image(&img.model).map(i128::from);
    let prompt = (r.body.len() as u64).div_ceil(3);
    let per_image = image_tokens(img.size.as_deref(), img.quality.as_deref())
        .saturating_add(PARTIAL_IMAGE_TOKENS.saturating_mul(img.partial_images));
    let answer = per_image.saturating_mul(img.n);
    let priced = app
        .store
        .prices()
        .lookup(&img.model, &img.model, ctx.started_ms)
        .map(|(_, p)| worst_cost(prompt, answer, p));
    match (priced, seen) {
        (Some(c), s) => (c.max(s.unwrap_or(0)), prompt.saturating_add(answer)),
        (None, Some(s)) => (s, 0),
        (None, None) => (floor, 0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_tokens_follow_the_published_table() {
        assert_eq!(image_tokens(Some("1024x1024"), Some("low")), 272);
        assert_eq!(image_tokens(Some("1024x1024"), Some("medium")), 1056);
        assert_eq!(image_tokens(Some("1024x1024"), Some("high")), 4160);
        assert_eq!(image_tokens(Some("1024x1536"), Some("low")), 408);
        assert_eq!(image_tokens(Some("1536x1024"), Some("medium")), 1584);
        assert_eq!(image_tokens(Some("1536x1024"), Some("high")), 6240);
        // The largest when unsaid, auto or unknown.
        assert_eq!(image_tokens(None, None), 6240);
        assert_eq!(image_tokens(Some("auto"), Some("auto")), 6240);
        assert_eq!(image_tokens(Some("1024x1024"), None), 4160);
        assert_eq!(image_tokens(Some("1024x1024"), Some("hd")), 4160);
        assert_eq!(image_tokens(Some("256x256"), Some("low")), 408);
    }
}

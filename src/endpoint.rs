//! Which API a request belongs to, decided from its method and path: it picks
//! how the request and answer bodies are read and how tokens are estimated.

/// The API an incoming path belongs to; decides how bodies are read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    /// `POST /v1/chat/completions`.
    Chat,
    /// `POST /v1/completions` (legacy).
    Completions,
    /// `POST /v1/responses`.
    Responses,
    /// `POST /v1/embeddings`.
    Embeddings,
    /// `POST /v1/images/generations`: a small JSON body, read whole before
    /// admission (its `n`, `size` and `quality` set the reservation).
    Images,
    /// `POST /v1/images/edits` and `/v1/images/variations`: multipart
    /// uploads, streamed; answers may carry usage.
    ImageUpload,
    /// `POST /v1/audio/transcriptions` and `/v1/audio/translations`:
    /// multipart uploads, streamed; answers may carry usage.
    Audio,
    /// `POST /v1/audio/speech`: a small JSON body, read whole (its `input`
    /// is what speech is priced by); the answer is audio without usage.
    Speech,
    /// Everything else under `/v1/`: streamed through, recorded with zero tokens.
    Other,
}

impl Endpoint {
    /// Classifies a request.
    pub fn classify(method: &http::Method, path: &str) -> Endpoint {
        if method != http::Method::POST {
            return Endpoint::Other;
        }
        match path.trim_end_matches('/') {
            "/v1/chat/completions" => Endpoint::Chat,
            "/v1/completions" => Endpoint::Completions,
            "/v1/responses" => Endpoint::Responses,
            "/v1/embeddings" => Endpoint::Embeddings,
            "/v1/audio/transcriptions" | "/v1/audio/translations" => Endpoint::Audio,
            "/v1/images/generations" => Endpoint::Images,
            "/v1/audio/speech" => Endpoint::Speech,
            "/v1/images/edits" | "/v1/images/variations" => Endpoint::ImageUpload,
            _ => Endpoint::Other,
        }
    }

    /// Whether the request body is a JSON object that must carry a `model`.
    pub fn needs_model(self) -> bool {
        matches!(
            self,
            Endpoint::Chat | Endpoint::Completions | Endpoint::Responses | Endpoint::Embeddings
        )
    }

    /// Whether the request body is read whole (within `--max-body`) before
    /// the request is admitted; every other body streams through.
    pub fn reads_body(self) -> bool {
        self.needs_model() || matches!(self, Endpoint::Images | Endpoint::Speech)
    }

    /// Whether the request body is an upload streamed through unread, whose
    /// `model` is sniffed from its first bytes.
    pub fn is_upload(self) -> bool {
        matches!(self, Endpoint::ImageUpload | Endpoint::Audio)
    }

    /// Whether upstream only reports streamed usage when asked (`include_usage`).
    pub fn usage_on_request(self) -> bool {
        matches!(self, Endpoint::Chat | Endpoint::Completions)
    }

    /// How an SSE answer of this endpoint is framed.
    pub fn stream_kind(self) -> StreamKind {
        match self {
            Endpoint::Responses => StreamKind::Responses,
            _ => StreamKind::Chat,
        }
    }
}

/// SSE framing flavour.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamKind {
    /// `data: {chunk}` events ending in `data: [DONE]` (chat and legacy completions).
    Chat,
    /// Named Responses API events (`event: response.completed`).
    Responses,
}

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
    /// Audio transcription/translation and image generation/edits: bodies streamed, answers may carry usage.
    Media,
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
            "/v1/audio/transcriptions"
            | "/v1/audio/translations"
            | "/v1/images/generations"
            | "/v1/images/edits"
            | "/v1/images/variations" => Endpoint::Media,
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

//! The configured upstreams: which ones serve a model (a `[[fallback]]`
//! list, else the first whose `models` match), where a request goes on each
//! (Azure's deployment paths), and each one's pool of keys, used in turn,
//! with a key answered 429 resting until upstream's reset.

use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering};
use std::sync::Arc;

use http::{HeaderMap, HeaderName, HeaderValue, Uri};

use parking_lot::Mutex;

use crate::config::{Config, NamedUpstream};
use crate::ratelimit::{RateLimits, Raw};
use crate::upstream::Upstream;

/// Every upstream, in the configured order, and the fallback lists.
pub struct Upstreams {
    routes: Vec<Route>,
    /// Model pattern and the indices of its upstreams, in order.
    fallbacks: Vec<(String, Vec<usize>)>,
    /// `singles[i]` is `[i]`: a one-upstream chain without allocating.
    singles: Vec<[usize; 1]>,
}

/// The upstreams a request may be sent to, in order: found once per
/// request, resolved with [`Upstreams::chain`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Chain {
    /// One upstream, by index.
    One(usize),
    /// A `[[fallback]]` list, by index.
    Fallback(usize),
}

/// One upstream: its name, the models it serves, its connections and keys.
pub struct Route {
    /// The name records carry.
    pub name: Arc<str>,
    /// The name as the `x-tollgate-upstream` answer header.
    pub name_header: HeaderValue,
    conf: NamedUpstream,
    /// Connections to it.
    pub conn: Upstream,
    keys: Vec<Key>,
    next: AtomicUsize,
    /// The latest rate-limit headers of answers sent without a key.
    keyless_limits: Mutex<Option<Raw>>,
}

/// One key of a pool.
pub struct Key {
    /// `authorization`, or `api-key` for Azure.
    pub name: HeaderName,
    /// `Bearer <key>` (Azure: the bare key), marked sensitive.
    pub header: HeaderValue,
    /// When it may be used again after a 429 (ms since the epoch; 0: now).
    rest_until_ms: AtomicI64,
    /// What `/ratelimits` shows for it: the first 8 hex digits of the
    /// key's SHA-256, never the key.
    pub id: String,
    /// The latest rate-limit headers of answers to it.
    limits: Mutex<Option<Raw>>,
}

/// One key's (or a keyless upstream's) latest rate limits.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct KeyLimits {
    /// The upstream's name.
    pub upstream: String,
    /// The key's short id (`None`: sent without a key).
    pub key: Option<String>,
    /// What its latest answer with `x-ratelimit-*` headers said.
    #[serde(flatten)]
    pub limits: RateLimits,
}

/// Why the upstreams could not be built.
pub struct BuildError {
    /// The upstream's name.
    pub upstream: String,
    /// Whether a key was at fault (else its trusted roots).
    pub key: bool,
    /// What went wrong.
    pub message: String,
}

impl Upstreams {
    /// The upstreams of `config` for `workers` server threads.
    pub fn new(config: &Config, workers: usize) -> Result<Upstreams, BuildError> {
        let routes = config
            .named_upstreams()
            .into_iter()
            .map(|conf| {
                let fail = |key: bool, message: String| BuildError {
                    upstream: conf.name.clone(),
                    key,
                    message,
                };
                let conn = Upstream::new(&conf.url, &conf.trust, config, workers)
                    .map_err(|m| fail(false, m))?;
                let azure = conf.azure.is_some();
                let keys = conf
                    .keys
                    .iter()
                    .map(|k| {
                        let value = if azure {
                            k.clone()
                        } else {
                            format!("Bearer {k}")
                        };
                        let mut header = HeaderValue::from_str(&value)
                            .map_err(|_| fail(true, "a key is not a valid header value".into()))?;
                        header.set_sensitive(true);
                        let digest = ring::digest::digest(&ring::digest::SHA256, k.as_bytes());
                        let id = digest.as_ref()[..4]
                            .iter()
                            .map(|b| format!("{b:02x}"))
                            .collect();
                        Ok(Key {
                            id,
                            limits: Mutex::new(None),
                            name: if azure {
                                HeaderName::from_static("api-key")
                            } else {
                                http::header::AUTHORIZATION
                            },
                            header,
                            rest_until_ms: AtomicI64::new(0),
                        })
                    })
                    .collect::<Result<Vec<_>, BuildError>>()?;
                let name_header = HeaderValue::from_str(&conf.name)
                    .map_err(|_| fail(false, "the name is not a valid header value".into()))?;
                Ok(Route {
                    name: Arc::from(conf.name.as_str()),
                    name_header,
                    conn,
                    keys,
                    next: AtomicUsize::new(0),
                    keyless_limits: Mutex::new(None),
                    conf,
                })
            })
            .collect::<Result<Vec<_>, BuildError>>()?;
        // Config checked every name.
        let fallbacks = config
            .fallbacks
            .iter()
            .map(|f| {
                let at = f
                    .upstreams
                    .iter()
                    .filter_map(|n| routes.iter().position(|r| *r.name == **n))
                    .collect();
                (f.model.clone(), at)
            })
            .collect();
        let singles = (0..routes.len()).map(|i| [i]).collect();
        Ok(Upstreams {
            routes,
            fallbacks,
            singles,
        })
    }

    /// The upstreams serving `model`: the first `[[fallback]]` whose model
    /// matches, else the first upstream whose patterns match. A request
    /// without a model goes to the first upstream.
    pub fn route(&self, model: &str) -> Option<Chain> {
        if model.is_empty() {
            return Some(Chain::One(0));
        }
        if let Some(i) = self.fallbacks.iter().position(|(p, ups)| {
            crate::config::glob(p, model) && ups.iter().any(|&u| self.routes[u].serves(model))
        }) {
            return Some(Chain::Fallback(i));
        }
        self.routes
            .iter()
            .position(|r| r.conf.serves(model))
            .map(Chain::One)
    }

    /// The upstreams of `chain`, by index, in order (those of a fallback
    /// list that do not serve the request's model are skipped when sent).
    pub fn chain(&self, chain: Chain) -> &[usize] {
        match chain {
            Chain::One(i) => &self.singles[i],
            Chain::Fallback(i) => &self.fallbacks[i].1,
        }
    }

    /// Every upstream, in order.
    pub fn all(&self) -> &[Route] {
        &self.routes
    }

    /// Starts each upstream's reaper of idle connections on this worker.
    pub fn spawn_reapers(&self) {
        for r in &self.routes {
            r.conn.spawn_reaper();
        }
    }

    /// The latest rate limits of every key (and keyless upstream) that
    /// had an answer with `x-ratelimit-*` headers, in configured order.
    pub fn ratelimits(&self) -> Vec<KeyLimits> {
        let mut out = Vec::new();
        for r in &self.routes {
            let slots = r
                .keys
                .iter()
                .map(|k| (Some(&k.id), &k.limits))
                .chain(std::iter::once((None, &r.keyless_limits)));
            for (id, slot) in slots {
                let Some(limits) = slot.lock().as_ref().and_then(Raw::parse) else {
                    continue;
                };
                out.push(KeyLimits {
                    upstream: r.name.to_string(),
                    key: id.cloned(),
                    limits,
                });
            }
        }
        out
    }

    /// Idle connections right now, all upstreams together.
    pub fn idle_connections(&self) -> usize {
        self.routes.iter().map(|r| r.conn.idle_connections()).sum()
    }
}

impl Route {
    /// The base URL, for logs.
    pub fn url(&self) -> &crate::config::UpstreamUrl {
        &self.conf.url
    }

    /// Whether it serves `model` (any model when the request has none).
    pub fn serves(&self, model: &str) -> bool {
        model.is_empty() || self.conf.serves(model)
    }

    /// The model its records of `model` are priced by: an Azure
    /// deployment's base model; `None`: as upstream answers.
    pub fn priced_as(&self, model: &str) -> Option<&str> {
        let a = self.conf.azure.as_ref()?;
        a.deployment(model).map(|d| d.priced_as())
    }

    /// The request target for the client's (normalised, under `/v1/`,
    /// origin form). Azure: `/v1/x` becomes
    /// `/openai/deployments/{deployment}/x` for a model it has a
    /// deployment of, else `/openai/x`, with `api-version` added.
    pub fn target(&self, client: &Uri, model: &str) -> Result<Uri, String> {
        let Some(a) = &self.conf.azure else {
            if self.conf.url.base_path.is_empty() {
                return Ok(client.clone());
            }
            let pq = client.path_and_query().map_or("/", |pq| pq.as_str());
            return self.conf.url.uri_for(pq).map_err(|e| e.to_string());
        };
        let (path, query) = (client.path(), client.query());
        let rest = path.strip_prefix("/v1").unwrap_or(path);
        let mut pq = match a.deployment(model) {
            Some(d) => format!("/openai/deployments/{}{rest}?", d.deployment),
            None => format!("/openai{rest}?"),
        };
        // The configured version wins over one the client sent.
        if let Some(q) = query {
            for pair in q
                .split('&')
                .filter(|p| !p.starts_with("api-version=") && !p.is_empty())
            {
                pq.push_str(pair);
                pq.push('&');
            }
        }
        pq.push_str("api-version=");
        pq.push_str(&a.api_version);
        self.conf.url.uri_for(&pq).map_err(|e| e.to_string())
    }

    /// The key for the next attempt, by index: in turn, skipping keys
    /// already `tried` by this request and keys resting after a 429 (when
    /// every untried key rests, the one whose rest ends first). `None`:
    /// no key left to try (or the upstream has none).
    pub fn pick(&self, now_ms: i64, tried: &[usize]) -> Option<usize> {
        let n = self.keys.len();
        if n == 0 {
            return None;
        }
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let untried = (0..n)
            .map(|off| (start + off) % n)
            .filter(|i| !tried.contains(i));
        let mut soonest: Option<(i64, usize)> = None;
        for i in untried {
            let rest = self.keys[i].rest_until_ms.load(Ordering::Relaxed);
            if rest <= now_ms {
                return Some(i);
            }
            if soonest.is_none_or(|(r, _)| rest < r) {
                soonest = Some((rest, i));
            }
        }
        soonest.map(|(_, i)| i)
    }

    /// Key `i`.
    pub fn key(&self, i: usize) -> &Key {
        &self.keys[i]
    }

    /// How many keys it has.
    pub fn key_count(&self) -> usize {
        self.keys.len()
    }

    /// Rests key `i` until upstream's reset after a 429 (at least a second).
    pub fn rest(&self, i: usize, now_ms: i64, answer: &HeaderMap) {
        let until = now_ms + reset_after_ms(answer).unwrap_or(1_000).max(1_000);
        self.keys[i]
            .rest_until_ms
            .fetch_max(until, Ordering::Relaxed);
    }

    /// Keeps the rate-limit headers of an answer to key `key` (`None`:
    /// sent without one), if it has any.
    pub fn note_limits(&self, key: Option<usize>, answer: &HeaderMap, now_ms: i64) {
        let Some(raw) = Raw::capture(answer, now_ms) else {
            return;
        };
        let slot = match key {
            Some(i) => &self.keys[i].limits,
            None => &self.keyless_limits,
        };
        *slot.lock() = Some(raw);
    }

    /// Whether key `i` rests at `now_ms`.
    pub fn resting(&self, i: usize, now_ms: i64) -> bool {
        self.keys[i].rest_until_ms.load(Ordering::Relaxed) > now_ms
    }
}

/// Longest rest a 429's headers can impose: a broken or hostile value must
/// not take a key out for good.
const MAX_REST_MS: i64 = 10 * 60 * 1000;

/// How long a 429 asks to wait, from `retry-after` (seconds),
/// `retry-after-ms`, or the later of OpenAI's `x-ratelimit-reset-requests`
/// / `x-ratelimit-reset-tokens` (durations like `1s`, `6m0s`, `20ms`).
pub fn reset_after_ms(h: &HeaderMap) -> Option<i64> {
    let text = |name: &str| h.get(name).and_then(|v| v.to_str().ok()).map(str::trim);
    let ms = if let Some(v) = text("retry-after-ms").and_then(|v| v.parse::<f64>().ok()) {
        Some(v as i64)
    } else if let Some(v) = text("retry-after").and_then(|v| v.parse::<f64>().ok()) {
        Some((v * 1000.0) as i64)
    } else {
        ["x-ratelimit-reset-requests", "x-ratelimit-reset-tokens"]
            .iter()
            .filter_map(|n| text(n))
            .filter_map(crate::duration::parse_go_duration_ns)
            .map(|ns| i64::try_from(ns / 1_000_000).unwrap_or(i64::MAX))
            .max()
    };
    ms.map(|m| m.clamp(0, MAX_REST_MS))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, v.parse().unwrap());
        }
        h
    }

    #[test]
    fn the_reset_comes_from_retry_after_or_openai_headers() {
        assert_eq!(
            reset_after_ms(&headers(&[("retry-after", "3")])),
            Some(3000)
        );
        assert_eq!(
            reset_after_ms(&headers(&[("retry-after-ms", "250")])),
            Some(250)
        );
        assert_eq!(
            reset_after_ms(&headers(&[
                ("x-ratelimit-reset-requests", "1s"),
                ("x-ratelimit-reset-tokens", "6m0s")
            ])),
            Some(360_000)
        );
        assert_eq!(
            reset_after_ms(&headers(&[("retry-after", "999999")])),
            Some(MAX_REST_MS)
        );
        assert_eq!(reset_after_ms(&HeaderMap::new()), None);
    }

    #[test]
    fn globs_match_names_and_patterns() {
        use crate::config::glob;
        assert!(glob("gpt-4o*", "gpt-4o-mini"));
        assert!(glob("gpt-4o*", "gpt-4o"));
        assert!(!glob("gpt-4o*", "gpt-4"));
        assert!(glob("llama-?b", "llama-8b"));
        assert!(!glob("llama-?b", "llama-70b"));
        assert!(glob("*", ""));
        assert!(glob("a*b*c", "a-x-b-y-c"));
        assert!(!glob("a*b*c", "a-x-c"));
        assert!(glob("o1", "o1"));
        assert!(!glob("o1", "o1-mini"));
    }
}

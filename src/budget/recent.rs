//! The costs this process has seen on the endpoints whose cost cannot be
//! worked out from the request alone (images, audio): the largest cost of
//! an image request per requested model and over all image requests, and
//! the highest cost per byte of an audio upload. Reservations of later
//! requests are sized from them.

use std::collections::HashMap;

use parking_lot::Mutex;

use crate::endpoint::Endpoint;

/// Most models whose largest image cost is kept. Requested model names are
/// the client's, so the map is bounded; past it only the overall maximum
/// grows.
const MAX_MODELS: usize = 256;

/// Largest costs seen, in pico-dollars; only ever grows while the process lives.
#[derive(Debug, Default)]
pub struct RecentCosts {
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    image_by_model: HashMap<String, i64>,
    image_any: i64,
    /// (cost, bytes) of the audio upload with the highest cost per byte.
    audio: Option<(i64, u64)>,
}

impl RecentCosts {
    /// Learns from a priced record: its endpoint, requested model, cost
    /// (pico-dollars) and, for uploads, the bytes uploaded.
    pub fn learn(&self, endpoint: Endpoint, model: &str, cost: i64, uploaded: u64) {
        if cost <= 0 {
            return;
        }
        let mut s = self.inner.lock();
        match endpoint {
            Endpoint::Images | Endpoint::ImageUpload => {
                s.image_any = s.image_any.max(cost);
                if endpoint == Endpoint::Images {
                    let len = s.image_by_model.len();
                    match s.image_by_model.get_mut(model) {
                        Some(m) => *m = (*m).max(cost),
                        None if len < MAX_MODELS => {
                            s.image_by_model.insert(model.to_owned(), cost);
                        }
                        None => {}
                    }
                }
            }
            Endpoint::Audio if uploaded > 0 => {
                // cost / uploaded > c / b, compared exactly.
                let higher = s.audio.is_none_or(|(c, b)| {
                    i128::from(cost) * i128::from(b) > i128::from(c) * i128::from(uploaded)
                });
                if higher {
                    s.audio = Some((cost, uploaded));
                }
            }
            _ => {}
        }
    }

    /// The largest cost of an image generation that asked for `model`.
    pub fn image(&self, model: &str) -> Option<i64> {
        self.inner.lock().image_by_model.get(model).copied()
    }

    /// The largest cost of any image request (0 before the first).
    pub fn any_image(&self) -> i64 {
        self.inner.lock().image_any
    }

    /// `bytes` of audio at the highest cost per byte seen, rounded up
    /// (0 before the first priced audio upload).
    pub fn audio(&self, bytes: u64) -> i128 {
        match self.inner.lock().audio {
            // Only positive costs are learnt: `c` fits a u64.
            Some((c, b)) => {
                let n = (u128::from(c.unsigned_abs()) * u128::from(bytes)).div_ceil(u128::from(b));
                i128::try_from(n).unwrap_or(i128::MAX)
            }
            None => 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_largest_costs() {
        let r = RecentCosts::default();
        assert_eq!((r.image("m"), r.any_image(), r.audio(1000)), (None, 0, 0));
        r.learn(Endpoint::Images, "m", 30, 0);
        r.learn(Endpoint::Images, "m", 20, 0);
        r.learn(Endpoint::ImageUpload, "x", 50, 9);
        r.learn(Endpoint::Images, "z", 0, 0);
        assert_eq!(r.image("m"), Some(30));
        assert_eq!(r.image("x"), None, "edits are not keyed by model");
        assert_eq!(r.image("z"), None, "free records teach nothing");
        assert_eq!(r.any_image(), 50);
        r.learn(Endpoint::Audio, "a", 100, 1000);
        r.learn(Endpoint::Audio, "a", 150, 2000);
        assert_eq!(r.audio(3), 1, "0.3 rounds up");
        assert_eq!(r.audio(2000), 200);
        r.learn(Endpoint::Audio, "a", 30, 100);
        assert_eq!(r.audio(2000), 600);
        assert_eq!(r.audio(u64::MAX), (30 * i128::from(u64::MAX) + 99) / 100);
        r.learn(Endpoint::Chat, "c", 10_000, 1);
        assert_eq!(r.audio(100), 30);
    }

    #[test]
    fn the_model_map_is_bounded() {
        let r = RecentCosts::default();
        for i in 0..(MAX_MODELS + 10) {
            r.learn(Endpoint::Images, &format!("m{i}"), 1 + i as i64, 0);
        }
        assert_eq!(r.inner.lock().image_by_model.len(), MAX_MODELS);
        assert_eq!(r.image("m0"), Some(1));
        r.learn(Endpoint::Images, "m0", 5, 0);
        assert_eq!(r.image("m0"), Some(5), "known models still grow");
        assert_eq!(r.any_image(), (MAX_MODELS + 10) as i64);
    }
}

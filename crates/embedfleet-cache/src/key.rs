//! The key scheme shared by both tiers and by every process that reads or writes the cache.
//!
//! ```text
//! embedfleet:v1:p:{model}:{revision}:{content-key-hex}    a per-model partial
//! embedfleet:v1:f:{fusion-version}:{content-key-hex}      a fused vector
//! ```
//!
//! `{content-key-hex}` is [`ContentKey::to_hex`]: 32 lowercase hex digits, always last. The
//! `embedfleet:v1:` prefix keeps the cache apart from anything else in the same Redis (one
//! `SCAN MATCH embedfleet:*` finds it all) and lets a future incompatible scheme live beside this
//! one. The kind says what the vector is:
//!
//! - `p:{model}:{revision}`: the content key already hashes the model name and revision (see
//!   `embedfleet_proto::content_key`), so they are repeated here only to make keys readable and
//!   to let an operator drop one model's or one revision's partials with a pattern.
//! - `f:{fusion-version}`: the fusion weights version is *not* in the content key, so it is what
//!   keeps vectors of old weights from being served after an upgrade. The content key of a fused
//!   vector must cover everything else the vector depends on (the input, the instruction, the
//!   set of models and their revisions, and any option that changes the output such as
//!   `normalize`); building it is the fleet's job.
//!
//! Names are used verbatim. A `:` inside a model or revision makes the split ambiguous to a
//! reader, never to the cache: the content key still tells the entries apart.

use std::fmt;

use embedfleet_proto::ContentKey;

/// Version of the key scheme. Bumping it orphans every cached entry (they expire or get evicted).
pub const KEY_SCHEME_VERSION: u32 = 1;

/// Prefix of every key the cache writes.
pub const KEY_PREFIX: &str = "embedfleet:v1:";

/// The full key of one cached vector, identical in the in-process tier and in Redis.
///
/// Built once per lookup and kept as the final string, since both tiers need exactly that.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CacheKey(String);

impl CacheKey {
    /// The key of `model`'s partial embedding at `revision` of the input behind `content`.
    pub fn partial(model: &str, revision: &str, content: &ContentKey) -> Self {
        CacheKey(format!("{KEY_PREFIX}p:{model}:{revision}:{content}"))
    }

    /// The key of the fused vector of `content` under fusion weights `fusion_version`.
    pub fn fused(fusion_version: &str, content: &ContentKey) -> Self {
        CacheKey(format!("{KEY_PREFIX}f:{fusion_version}:{content}"))
    }

    /// The key as stored, e.g. `embedfleet:v1:p:minilm:rev1:0a45...`.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for CacheKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use embedfleet_proto::Input;

    use super::*;

    fn content() -> ContentKey {
        ContentKey::new(
            &Input::Text("hello world".into()),
            Some("query: "),
            embedfleet_proto::InputType::Document,
            "minilm",
            "rev1",
        )
    }

    #[test]
    fn keys_follow_the_documented_scheme() {
        let hex = "400cf593bf5f99a0631454ea7c1caf66";
        assert_eq!(content().to_hex(), hex);
        assert_eq!(
            CacheKey::partial("minilm", "rev1", &content()).as_str(),
            format!("embedfleet:v1:p:minilm:rev1:{hex}")
        );
        assert_eq!(
            CacheKey::fused("fusemoe-3", &content()).to_string(),
            format!("embedfleet:v1:f:fusemoe-3:{hex}")
        );
    }

    #[test]
    fn kinds_never_share_a_key() {
        let c = content();
        assert_ne!(CacheKey::partial("m", "r", &c), CacheKey::fused("m", &c));
        assert_ne!(CacheKey::fused("1", &c), CacheKey::fused("2", &c));
        assert_ne!(
            CacheKey::partial("m", "r1", &c),
            CacheKey::partial("m", "r2", &c)
        );
    }
}

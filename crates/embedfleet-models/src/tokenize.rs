//! Text to token ids, with each model's length limit applied the way its checkpoint expects.

use std::path::Path;

use tokenizers::{Tokenizer, TruncationParams};

use crate::error::ModelError;

/// A `tokenizer.json` prepared for one model: no padding (batches are packed, not padded) and
/// truncation at the model's max length.
pub struct TextTokenizer {
    model: &'static str,
    max_len: usize,
    /// Cuts at `max_len`, keeping the closing special token (what sentence-transformers does).
    truncating: Tokenizer,
    /// Never cuts; used when the request asked for a 413 instead of truncation, so the error can
    /// say how long the input really is.
    full: Tokenizer,
}

impl TextTokenizer {
    pub fn load(path: &Path, model: &'static str, max_len: usize) -> Result<Self, ModelError> {
        let bad = |reason: String| ModelError::BadTokenizer {
            path: path.to_path_buf(),
            reason,
        };
        if !path.is_file() {
            return Err(ModelError::MissingFile {
                path: path.to_path_buf(),
                reason: "no tokenizer.json".into(),
            });
        }
        let mut full = Tokenizer::from_file(path).map_err(|e| bad(e.to_string()))?;
        full.with_padding(None);
        full.with_truncation(None).map_err(|e| bad(e.to_string()))?;
        let mut truncating = full.clone();
        truncating
            .with_truncation(Some(TruncationParams {
                max_length: max_len,
                ..Default::default()
            }))
            .map_err(|e| bad(e.to_string()))?;
        Ok(Self {
            model,
            max_len,
            truncating,
            full,
        })
    }

    pub fn max_len(&self) -> usize {
        self.max_len
    }

    /// Token ids (special tokens included) for each text, in order.
    ///
    /// `first_index` is the batch position of `texts[0]`, so errors name the caller's index.
    pub fn encode(
        &self,
        texts: &[&str],
        truncate: bool,
        first_index: usize,
    ) -> Result<Vec<Vec<u32>>, ModelError> {
        for (offset, text) in texts.iter().enumerate() {
            if text.trim().is_empty() {
                return Err(ModelError::EmptyInput {
                    index: first_index + offset,
                });
            }
        }
        let tokenizer = if truncate {
            &self.truncating
        } else {
            &self.full
        };
        let encodings =
            tokenizer
                .encode_batch(texts.to_vec(), true)
                .map_err(|e| ModelError::Tokenize {
                    model: self.model.to_string(),
                    reason: e.to_string(),
                })?;
        let mut ids = Vec::with_capacity(encodings.len());
        for (offset, encoding) in encodings.into_iter().enumerate() {
            let tokens = encoding.get_ids();
            if tokens.len() > self.max_len {
                return Err(ModelError::InputTooLong {
                    model: self.model.to_string(),
                    index: first_index + offset,
                    tokens: tokens.len(),
                    max: self.max_len,
                });
            }
            ids.push(tokens.to_vec());
        }
        Ok(ids)
    }
}

//! Text to token ids, with each model's length limit applied the way its checkpoint expects.
//!
//! Checkpoints ship their tokenizer in one of three forms, and [`load_tokenizer`] takes whichever
//! the directory holds, in this order:
//! - `tokenizer.json`: the `tokenizers` serialisation, complete in itself.
//! - `vocab.json` + `merges.txt`: a byte-level BPE (RoBERTa, GPT-2), built the way transformers'
//!   `RobertaConverter` builds it: byte-level pre-tokenizer, `<s> … </s>` around each sequence.
//! - `vocab.txt`: a WordPiece vocabulary (BERT), built the way `BertConverter` builds it: BERT
//!   normaliser, BERT pre-tokenizer, `[CLS] … [SEP]` around each sequence.
//!
//! For the last two, `tokenizer_config.json` (when present) supplies what the vocabulary cannot:
//! `do_lower_case`, `strip_accents`, `tokenize_chinese_chars`, `add_prefix_space`,
//! `trim_offsets` and the special tokens' spellings, with the defaults of the transformers class.

use std::path::{Path, PathBuf};

use serde_json::Value;
use tokenizers::models::bpe::BPE;
use tokenizers::models::wordpiece::WordPiece;
use tokenizers::normalizers::BertNormalizer;
use tokenizers::pre_tokenizers::bert::BertPreTokenizer;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::processors::roberta::RobertaProcessing;
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{decoders, AddedToken, Tokenizer, TruncationParams};

use crate::error::ModelError;
use crate::resolve::ModelFiles;

/// The tokenizer files a checkpoint may ship, in the order [`load_tokenizer`] looks for them.
pub const TOKENIZER_FILES: &str = "tokenizer.json, vocab.json + merges.txt, vocab.txt";

/// The checkpoint's tokenizer, from whichever of [`TOKENIZER_FILES`] its directory holds.
///
/// A directory with none of them is a `MissingFile` error naming what was looked for; a file
/// that is there but unreadable is a `BadTokenizer` error naming it. Padding and truncation are
/// as the files say; [`TextTokenizer`] sets its own.
pub fn load_tokenizer(files: &ModelFiles) -> Result<Tokenizer, ModelError> {
    let config = TokenizerConfig::read(files)?;
    if let Some(path) = files.file("tokenizer.json") {
        return Tokenizer::from_file(&path).map_err(|e| bad(&path, e));
    }
    match (files.file("vocab.json"), files.file("merges.txt")) {
        (Some(vocab), Some(merges)) => return byte_level_bpe(&vocab, &merges, &config),
        (Some(vocab), None) if files.file("vocab.txt").is_none() => {
            return Err(ModelError::MissingFile {
                path: files.dir.join("merges.txt"),
                reason: format!(
                    "{} has no merges.txt beside it (a byte-level BPE needs both)",
                    vocab.display()
                ),
            })
        }
        _ => {}
    }
    if let Some(vocab) = files.file("vocab.txt") {
        return wordpiece(&vocab, &config);
    }
    Err(ModelError::MissingFile {
        path: files.dir.join("tokenizer.json"),
        reason: format!("the tokenizer is missing (looked for {TOKENIZER_FILES})"),
    })
}

fn bad(path: &Path, error: impl std::fmt::Display) -> ModelError {
    ModelError::BadTokenizer {
        path: path.to_path_buf(),
        reason: error.to_string(),
    }
}

/// The fields of `tokenizer_config.json` the vocabulary-file tokenizers need.
struct TokenizerConfig {
    path: Option<PathBuf>,
    fields: serde_json::Map<String, Value>,
}

impl TokenizerConfig {
    fn read(files: &ModelFiles) -> Result<Self, ModelError> {
        let Some(path) = files.file("tokenizer_config.json") else {
            return Ok(Self {
                path: None,
                fields: Default::default(),
            });
        };
        let text = std::fs::read_to_string(&path).map_err(|e| bad(&path, e))?;
        let fields = match serde_json::from_str(&text).map_err(|e| bad(&path, e))? {
            Value::Object(fields) => fields,
            _ => return Err(bad(&path, "not a JSON object")),
        };
        Ok(Self {
            path: Some(path),
            fields,
        })
    }

    fn flag(&self, name: &str, default: bool) -> Result<bool, ModelError> {
        self.optional_flag(name).map(|v| v.unwrap_or(default))
    }

    /// A boolean that may also be `null` (transformers' "follow another setting").
    fn optional_flag(&self, name: &str) -> Result<Option<bool>, ModelError> {
        match self.fields.get(name) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Bool(value)) => Ok(Some(*value)),
            Some(other) => Err(self.wrong(name, other)),
        }
    }

    /// A special token's spelling: a string, or an `AddedToken` object with `content`.
    fn token(&self, name: &str, default: &str) -> Result<String, ModelError> {
        match self.fields.get(name) {
            None | Some(Value::Null) => Ok(default.to_string()),
            Some(Value::String(content)) => Ok(content.clone()),
            Some(Value::Object(object)) => match object.get("content") {
                Some(Value::String(content)) => Ok(content.clone()),
                _ => Err(self.wrong(name, &Value::Object(object.clone()))),
            },
            Some(other) => Err(self.wrong(name, other)),
        }
    }

    fn wrong(&self, name: &str, value: &Value) -> ModelError {
        let path = self.path.clone().unwrap_or_default();
        bad(&path, format!("`{name}` has an unexpected value {value}"))
    }
}

/// The id of a special token, which must be in the vocabulary.
fn special_id(tokenizer: &Tokenizer, token: &str, vocab: &Path) -> Result<u32, ModelError> {
    tokenizer.token_to_id(token).ok_or_else(|| {
        bad(
            vocab,
            format!("the special token `{token}` is not in the vocabulary"),
        )
    })
}

/// BERT's WordPiece from `vocab.txt`, as transformers' `BertConverter` builds it.
fn wordpiece(vocab: &Path, config: &TokenizerConfig) -> Result<Tokenizer, ModelError> {
    let unk = config.token("unk_token", "[UNK]")?;
    let cls = config.token("cls_token", "[CLS]")?;
    let sep = config.token("sep_token", "[SEP]")?;
    let specials = [
        cls.clone(),
        sep.clone(),
        unk.clone(),
        config.token("pad_token", "[PAD]")?,
        config.token("mask_token", "[MASK]")?,
    ];
    let model = WordPiece::from_file(&vocab.to_string_lossy())
        .unk_token(unk)
        .build()
        .map_err(|e| bad(vocab, e))?;
    let mut tokenizer = Tokenizer::new(model);
    tokenizer.with_normalizer(Some(BertNormalizer::new(
        true,
        config.flag("tokenize_chinese_chars", true)?,
        config.optional_flag("strip_accents")?,
        config.flag("do_lower_case", true)?,
    )));
    tokenizer.with_pre_tokenizer(Some(BertPreTokenizer));
    tokenizer.with_decoder(Some(decoders::wordpiece::WordPiece::default()));
    let (cls_id, sep_id) = (
        special_id(&tokenizer, &cls, vocab)?,
        special_id(&tokenizer, &sep, vocab)?,
    );
    let template = TemplateProcessing::builder()
        .try_single(format!("{cls}:0 $A:0 {sep}:0"))
        .and_then(|t| t.try_pair(format!("{cls}:0 $A:0 {sep}:0 $B:1 {sep}:1")))
        .map_err(|e| bad(vocab, e))?
        .special_tokens(vec![(cls.clone(), cls_id), (sep.clone(), sep_id)])
        .build()
        .map_err(|e| bad(vocab, e))?;
    tokenizer.with_post_processor(Some(template));
    add_specials(&mut tokenizer, &specials, None);
    Ok(tokenizer)
}

/// RoBERTa's byte-level BPE from `vocab.json` + `merges.txt`, as transformers'
/// `RobertaConverter` builds it.
fn byte_level_bpe(
    vocab: &Path,
    merges: &Path,
    config: &TokenizerConfig,
) -> Result<Tokenizer, ModelError> {
    let add_prefix_space = config.flag("add_prefix_space", false)?;
    let trim_offsets = config.flag("trim_offsets", true)?;
    let cls = config.token("cls_token", "<s>")?;
    let sep = config.token("sep_token", "</s>")?;
    let mask = config.token("mask_token", "<mask>")?;
    let specials = [
        cls.clone(),
        sep.clone(),
        config.token("unk_token", "<unk>")?,
        config.token("pad_token", "<pad>")?,
        mask.clone(),
    ];
    let model = BPE::from_file(&vocab.to_string_lossy(), &merges.to_string_lossy())
        .build()
        .map_err(|e| bad(vocab, format!("with {}: {e}", merges.display())))?;
    let mut tokenizer = Tokenizer::new(model);
    tokenizer.with_pre_tokenizer(Some(ByteLevel::new(add_prefix_space, trim_offsets, true)));
    tokenizer.with_decoder(Some(ByteLevel::default()));
    let (cls_id, sep_id) = (
        special_id(&tokenizer, &cls, vocab)?,
        special_id(&tokenizer, &sep, vocab)?,
    );
    tokenizer.with_post_processor(Some(
        RobertaProcessing::new((sep, sep_id), (cls, cls_id))
            .trim_offsets(trim_offsets)
            .add_prefix_space(add_prefix_space),
    ));
    // RoBERTa's mask token swallows the space before it (`lstrip`), as in its tokenizer class.
    add_specials(&mut tokenizer, &specials, Some(&mask));
    Ok(tokenizer)
}

/// Registers the special tokens the vocabulary has, so that their spelling in a text maps to
/// their id rather than being split, as the transformers tokenizers do.
fn add_specials(tokenizer: &mut Tokenizer, specials: &[String], lstrip: Option<&str>) {
    let tokens: Vec<AddedToken> = specials
        .iter()
        .filter(|token| tokenizer.token_to_id(token).is_some())
        .map(|token| AddedToken::from(token.clone(), true).lstrip(Some(token.as_str()) == lstrip))
        .collect();
    tokenizer.add_special_tokens(&tokens);
}

/// A checkpoint's tokenizer prepared for one model: no padding (batches are packed, not padded)
/// and truncation at the model's max length.
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
    /// The tokenizer of the checkpoint in `files`, whichever kind it ships (see
    /// [`load_tokenizer`]).
    pub fn from_files(
        files: &ModelFiles,
        model: &'static str,
        max_len: usize,
    ) -> Result<Self, ModelError> {
        let path = files.dir.clone();
        Self::new(load_tokenizer(files)?, &path, model, max_len)
    }

    /// A `tokenizer.json` file.
    pub fn load(path: &Path, model: &'static str, max_len: usize) -> Result<Self, ModelError> {
        if !path.is_file() {
            return Err(ModelError::MissingFile {
                path: path.to_path_buf(),
                reason: "no tokenizer.json".into(),
            });
        }
        let tokenizer = Tokenizer::from_file(path).map_err(|e| bad(path, e))?;
        Self::new(tokenizer, path, model, max_len)
    }

    /// `tokenizer` with this crate's padding and truncation; `source` names it in errors.
    pub fn new(
        mut full: Tokenizer,
        source: &Path,
        model: &'static str,
        max_len: usize,
    ) -> Result<Self, ModelError> {
        full.with_padding(None);
        full.with_truncation(None).map_err(|e| bad(source, e))?;
        let mut truncating = full.clone();
        truncating
            .with_truncation(Some(TruncationParams {
                max_length: max_len,
                ..Default::default()
            }))
            .map_err(|e| bad(source, e))?;
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

//! Tokenizers: train a byte-level BPE with the `tokenizers` crate, or load any HF `tokenizer.json`.

use std::path::Path;

use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::models::TrainerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::processors::sequence::Sequence;
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::processors::PostProcessorWrapper;
use tokenizers::{AddedToken, Tokenizer};

use crate::error::{DataError, Result};

/// Default vocabulary size of a trained tokenizer.
pub const DEFAULT_VOCAB_SIZE: usize = 8192;
/// Default beginning-of-document token.
pub const DEFAULT_BOS: &str = "<|bos|>";
/// Default end-of-document token.
pub const DEFAULT_EOS: &str = "<|eos|>";
/// Default padding token.
pub const DEFAULT_PAD: &str = "<|pad|>";
/// Default cap on the text used to train a tokenizer (256 MiB).
pub const DEFAULT_MAX_TRAIN_BYTES: u64 = 256 << 20;

/// How a tokenizer is trained and which special tokens frame documents.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq)]
#[serde(default)]
pub struct TokenizerConfig {
    /// Vocabulary size of a trained tokenizer, special tokens included (default 8192).
    pub vocab_size: usize,
    /// Smallest pair frequency that makes a merge (default 2).
    pub min_frequency: u64,
    /// Beginning-of-document token (default `<|bos|>`).
    pub bos_token: String,
    /// End-of-document token (default `<|eos|>`).
    pub eos_token: String,
    /// Padding token (default `<|pad|>`).
    pub pad_token: String,
    /// Prepend BOS to every document (default true; EOS is always appended).
    pub add_bos: bool,
    /// At most this much text trains the tokenizer (default 256 MiB): over it, each input file
    /// gives text from its start in proportion to its size on disk.
    pub max_train_bytes: u64,
    /// A tokenizer to use instead of training one (default none: train): a `tokenizer.json`
    /// path, or a Hugging Face repository id (`org/name[@revision]`) whose `tokenizer.json`
    /// is fetched. Read by the pipelines (`cargo xtask pretrain`, `compare`);
    /// [`crate::build_shards`] takes its tokenizer from its [`crate::TokenizerSource`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub file: Option<String>,
}

impl Default for TokenizerConfig {
    fn default() -> Self {
        Self {
            vocab_size: DEFAULT_VOCAB_SIZE,
            min_frequency: 2,
            bos_token: DEFAULT_BOS.into(),
            eos_token: DEFAULT_EOS.into(),
            pad_token: DEFAULT_PAD.into(),
            add_bos: true,
            max_train_bytes: DEFAULT_MAX_TRAIN_BYTES,
            file: None,
        }
    }
}

/// Ids of the special tokens that frame documents.
#[derive(Debug, Clone, Copy, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct SpecialTokens {
    /// Beginning of document, prepended when `add_bos`.
    pub bos: Option<u32>,
    /// End of document, appended to every document.
    pub eos: u32,
    /// Padding, if the tokenizer has one.
    pub pad: Option<u32>,
}

/// The longest run of non-whitespace characters the BPE trainer is given whole: longer runs are
/// cut into pieces of this many characters for training (not for encoding). The trainer
/// rescans a whole pre-token at every merge it takes part in, so one long run (a base64 blob, a
/// minified line, a sequence of bases) costs merges × its length: 2 MB of letters without a
/// space took over 5 minutes, cut into runs of 100 characters 5 seconds. No merge that fits in a
/// run this long changes.
pub const MAX_TRAIN_RUN: usize = 256;

/// `text` in pieces with no run of more than [`MAX_TRAIN_RUN`] non-whitespace characters (the
/// pieces together are `text`); normal text is one piece.
pub fn cut_long_runs(text: &str) -> Vec<&str> {
    let (mut pieces, mut start, mut run) = (Vec::new(), 0, 0);
    for (i, c) in text.char_indices() {
        if c.is_whitespace() {
            run = 0;
            continue;
        }
        if run == MAX_TRAIN_RUN {
            pieces.push(&text[start..i]);
            (start, run) = (i, 0);
        }
        run += 1;
    }
    pieces.push(&text[start..]);
    pieces
}

/// Trains a byte-level BPE tokenizer (GPT-2 style: no normalizer, byte-level pre-tokenizer and
/// decoder, so `decode(encode(text)) == text` for any text) on the given texts, their runs of
/// more than [`MAX_TRAIN_RUN`] non-whitespace characters cut ([`cut_long_runs`]). With
/// `add_bos`, encoding with special tokens puts the BOS token first (a post-processor, as
/// Llama 3's), so that HF `AutoTokenizer` frames a prompt as training framed documents.
pub fn train_bpe<I, S>(texts: I, cfg: &TokenizerConfig) -> Result<Tokenizer>
where
    I: Iterator<Item = S> + Send,
    S: AsRef<str> + Send,
{
    let specials = [&cfg.bos_token, &cfg.eos_token, &cfg.pad_token];
    if cfg.vocab_size < 256 + specials.len() {
        return Err(DataError::Config(format!(
            "vocab_size must be at least {} (256 bytes + special tokens), got {}",
            256 + specials.len(),
            cfg.vocab_size
        )));
    }
    let specials: Vec<AddedToken> = specials.iter().map(|t| AddedToken::from(t.to_string(), true)).collect();
    let trainer = BpeTrainerBuilder::new()
        .vocab_size(cfg.vocab_size)
        .min_frequency(cfg.min_frequency)
        .show_progress(false)
        .special_tokens(specials)
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .build();
    let mut trainer = TrainerWrapper::BpeTrainer(trainer);
    let byte_level = ByteLevel::new(false, true, true);
    let mut tok = Tokenizer::new(BPE::default());
    tok.with_pre_tokenizer(Some(byte_level));
    tok.with_decoder(Some(byte_level));
    tok.with_post_processor(Some(byte_level));
    let pieces = texts.flat_map(|t| cut_long_runs(t.as_ref()).into_iter().map(str::to_string).collect::<Vec<_>>());
    tok.train(&mut trainer, pieces).map_err(|e| DataError::Tokenizer(format!("training failed: {e}")))?;
    if cfg.add_bos {
        if let Some(template) = bos_template(&tok, &cfg.bos_token) {
            let steps = vec![PostProcessorWrapper::ByteLevel(byte_level), PostProcessorWrapper::Template(template)];
            tok.with_post_processor(Some(Sequence::new(steps)));
        }
    }
    Ok(tok)
}

/// The post-processor that puts `bos` before a text when special tokens are asked for (HF's
/// `tokenizer(text)`, Python `tokenizers`' `encode(text)`), as Llama 3's `tokenizer.json` does:
/// documents are trained as BOS + text, so a model's users encode prompts the same way. Our own
/// encoding adds BOS itself and asks for no special tokens. `None` for a token name a template
/// cannot hold (with spaces, which split a template, or a colon, which gives a type id): the
/// builder refuses it.
fn bos_template(tok: &Tokenizer, bos: &str) -> Option<TemplateProcessing> {
    let id = tok.token_to_id(bos)?;
    TemplateProcessing::builder()
        .try_single(format!("{bos} $A"))
        .ok()?
        .try_pair(format!("{bos} $A {bos}:1 $B:1"))
        .ok()?
        .special_tokens(vec![(bos.to_string(), id)])
        .build()
        .ok()
}

/// Loads a HF `tokenizer.json`.
pub fn load_tokenizer(path: &Path) -> Result<Tokenizer> {
    if !path.is_file() {
        return Err(DataError::Missing(path.to_path_buf()));
    }
    Tokenizer::from_file(path)
        .map_err(|e| DataError::Tokenizer(format!("{}: not a valid tokenizer.json: {e}", path.display())))
}

/// The tokenizer's canonical serialization (what is saved beside shards).
pub fn tokenizer_json(tok: &Tokenizer) -> Result<String> {
    tok.to_string(false).map_err(|e| DataError::Tokenizer(format!("cannot serialize: {e}")))
}

/// `sha256:<hex>` of the tokenizer's canonical serialization.
pub fn fingerprint(tok: &Tokenizer) -> Result<String> {
    let json = tokenizer_json(tok)?;
    Ok(crate::shard::sha256_bytes(json.as_bytes()))
}

/// Number of ids the tokenizer can emit: one past the largest id, added tokens included.
pub fn vocab_size(tok: &Tokenizer) -> usize {
    tok.get_vocab(true).values().copied().max().map_or(0, |m| m as usize + 1)
}

fn find(tok: &Tokenizer, names: &[&str]) -> Option<u32> {
    names.iter().find_map(|n| tok.token_to_id(n))
}

/// Resolves the special tokens by the configured names, falling back to the names common HF
/// tokenizers use (`<|endoftext|>`, `</s>`, `<s>`, ...).
pub fn special_tokens(tok: &Tokenizer, cfg: &TokenizerConfig) -> Result<SpecialTokens> {
    let eos = find(tok, &eos_names(cfg)).ok_or_else(|| {
        DataError::Tokenizer(format!(
            "the tokenizer has no end-of-document token \"{}\"; set tokenizer.eos_token to one of its special tokens",
            cfg.eos_token
        ))
    })?;
    let bos = find(tok, &bos_names(cfg));
    if cfg.add_bos && bos.is_none() {
        return Err(DataError::Tokenizer(format!(
            "the tokenizer has no beginning-of-document token \"{}\"; set tokenizer.bos_token, or tokenizer.add_bos = false",
            cfg.bos_token
        )));
    }
    let pad = find(tok, &[&cfg.pad_token, "<pad>", "<|pad|>"]);
    Ok(SpecialTokens { bos: if cfg.add_bos { bos } else { None }, eos, pad })
}

/// The names an end-of-document token goes by: the configured one, then the usual ones.
fn eos_names(cfg: &TokenizerConfig) -> [&str; 5] {
    [&cfg.eos_token, "<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>"]
}

/// The names a beginning-of-document token goes by: the configured one, then the usual ones.
fn bos_names(cfg: &TokenizerConfig) -> [&str; 5] {
    [&cfg.bos_token, "<s>", "<|begin_of_text|>", "<bos>", "<|endoftext|>"]
}

/// Adds to `tok` the document tokens [`special_tokens`] needs and it lacks (a character- or
/// word-level tokenizer often has none): `cfg.eos_token`, and with `cfg.add_bos`
/// `cfg.bos_token`, as special tokens with the next free ids. Returns those added, with their
/// ids; none where the tokenizer has them (by any name [`special_tokens`] knows). An added BOS
/// also goes before a text where special tokens are asked for (a post-processor step, as a
/// trained tokenizer's), so HF's `tokenizer(text)` frames a text as training framed documents.
pub fn add_missing_special_tokens(tok: &mut Tokenizer, cfg: &TokenizerConfig) -> Result<Vec<(String, u32)>> {
    let mut missing = Vec::new();
    if find(tok, &eos_names(cfg)).is_none() {
        missing.push(cfg.eos_token.clone());
    }
    if cfg.add_bos && find(tok, &bos_names(cfg)).is_none() && !missing.contains(&cfg.bos_token) {
        missing.push(cfg.bos_token.clone());
    }
    let mut added = Vec::new();
    for name in missing {
        tok.add_special_tokens([tokenizers::AddedToken::from(name.clone(), true)])
            .map_err(|e| DataError::Tokenizer(format!("could not add the special token \"{name}\": {e}")))?;
        let id = tok
            .token_to_id(&name)
            .ok_or_else(|| DataError::Tokenizer(format!("could not add the special token \"{name}\"")))?;
        added.push((name, id));
    }
    // HF's tokenizer(text) then frames a text as the documents are framed: BOS first.
    if added.iter().any(|(n, _)| *n == cfg.bos_token) {
        if let Some(template) = bos_template(tok, &cfg.bos_token) {
            let template = PostProcessorWrapper::Template(template);
            let pp = match tok.get_post_processor().cloned() {
                None => template,
                Some(p) => PostProcessorWrapper::Sequence(Sequence::new(vec![p, template])),
            };
            tok.with_post_processor(Some(pp));
        }
    }
    Ok(added)
}

/// Encodes one document: BOS (if any) + tokens + EOS. All of `text` is ordinary text: the string
/// of a special token inside it (`<|eos|>` in a document about tokenizers) is encoded as the
/// characters it is made of, never as that token, so no document can end, or start another, from
/// inside (as nanoGPT's `encode_ordinary`). A tokenizer from [`ordinary_text`] skips the search
/// for such strings.
pub fn encode_document(tok: &Tokenizer, text: &str, specials: &SpecialTokens) -> Result<Vec<u32>> {
    let enc = encode_ordinary(tok, text)?;
    let ids = enc.get_ids();
    let mut out = Vec::with_capacity(ids.len() + 2);
    out.extend(specials.bos);
    out.extend_from_slice(ids);
    out.push(specials.eos);
    Ok(out)
}

/// The text of a continuation of `prompt` (ids, special ones included), a token at a time, as
/// decoding the whole sequence and cutting the prompt's text off gives it: a SentencePiece-style
/// decoder that drops the space a text starts with keeps the one between prompt and continuation,
/// and a character split across tokens comes out whole, once its last byte is in.
pub struct ContinuationText<'a> {
    stream: tokenizers::tokenizer::DecodeStream<
        'a,
        tokenizers::ModelWrapper,
        tokenizers::NormalizerWrapper,
        tokenizers::PreTokenizerWrapper,
        tokenizers::PostProcessorWrapper,
        tokenizers::DecoderWrapper,
    >,
}

impl<'a> ContinuationText<'a> {
    /// A continuation of `prompt`, special tokens left out of the text.
    pub fn new(tok: &'a Tokenizer, prompt: &[u32]) -> Result<Self> {
        let mut stream = tok.decode_stream(true);
        for &id in prompt {
            stream.step(id).map_err(|e| DataError::Tokenizer(format!("decoding the prompt failed: {e}")))?;
        }
        Ok(Self { stream })
    }

    /// The text that token `id` adds, if it completes any.
    pub fn push(&mut self, id: u32) -> Result<Option<String>> {
        self.stream.step(id).map_err(|e| DataError::Tokenizer(format!("decoding token {id} failed: {e}")))
    }
}

/// The tokens of `text` alone, no special tokens added, the strings of special tokens inside it
/// encoded as ordinary text (see [`encode_document`]).
pub fn encode_text(tok: &Tokenizer, text: &str) -> Result<Vec<u32>> {
    Ok(encode_ordinary(tok, text)?.get_ids().to_vec())
}

fn encode_ordinary(tok: &Tokenizer, text: &str) -> Result<tokenizers::Encoding> {
    let ordinary;
    let tok = if tok.get_encode_special_tokens() || !mentions_special_token(tok, text) {
        tok
    } else {
        ordinary = ordinary_text(tok);
        &ordinary
    };
    tok.encode_fast(text, false).map_err(|e| DataError::Tokenizer(format!("encoding failed: {e}")))
}

/// A copy of `tok` that encodes the strings of special tokens as ordinary text (see
/// [`encode_document`]); the tokenizer.json it would save is the same.
pub fn ordinary_text(tok: &Tokenizer) -> Tokenizer {
    let mut t = tok.clone();
    t.set_encode_special_tokens(true);
    t
}

fn mentions_special_token(tok: &Tokenizer, text: &str) -> bool {
    tok.get_added_vocabulary()
        .get_added_tokens_decoder()
        .values()
        .any(|t| t.special && text.contains(t.content.as_str()))
}

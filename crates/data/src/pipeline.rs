//! The data stage end to end: sources → tokenizer → shards → manifest.

use std::path::{Path, PathBuf};
use std::sync::mpsc::sync_channel;
use std::time::Instant;

use crate::progress::ByteBar;
use rayon::prelude::*;
use tokenizers::Tokenizer;

use crate::error::{io_err, DataError, Result};
use crate::resume::{self, Journal};
use crate::shard::{
    write_atomic, Manifest, ShardInfo, ShardWriter, Split, TokenDtype, DEFAULT_SHARD_MB, TOKENIZER_FILE,
};
use crate::source::{Document, Documents, SourceConfig};
use crate::tokenizer::{self, TokenizerConfig};

/// Default fraction of documents held out for validation.
pub const DEFAULT_VAL_FRACTION: f64 = 0.02;
/// Documents are tokenized in parallel batches of about this many bytes (4 MiB).
const BATCH_BYTES: usize = 4 << 20;

/// Settings of the data stage. Saved as part of every run's resolved config.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq)]
#[serde(default)]
pub struct DataConfig {
    /// How inputs are read.
    pub source: SourceConfig,
    /// How the tokenizer is trained and documents are framed.
    pub tokenizer: TokenizerConfig,
    /// Fraction of documents held out for validation, by a hash of their text (default 0.02).
    pub val_fraction: f64,
    /// Seed of the hash-based split (default 0).
    pub split_seed: u64,
    /// Target shard size in MiB (default 256).
    pub shard_mb: u64,
}

impl Default for DataConfig {
    fn default() -> Self {
        Self {
            source: SourceConfig::default(),
            tokenizer: TokenizerConfig::default(),
            val_fraction: DEFAULT_VAL_FRACTION,
            split_seed: 0,
            shard_mb: DEFAULT_SHARD_MB,
        }
    }
}

/// Where the tokenizer comes from.
pub enum TokenizerSource<'a> {
    /// Train a byte-level BPE on the inputs.
    Train,
    /// Load this HF `tokenizer.json`.
    File(&'a Path),
    /// Use this tokenizer.
    Given(Box<Tokenizer>),
}

/// What [`build_shards`] did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BuildSummary {
    /// Documents written (both splits).
    pub documents: u64,
    /// Documents in the validation split.
    pub val_documents: u64,
    /// Tokens written (both splits).
    pub tokens: u64,
    /// Tokens in the training split.
    pub train_tokens: u64,
    /// Tokens in the validation split.
    pub val_tokens: u64,
    /// UTF-8 bytes of text read.
    pub bytes: u64,
    /// Empty documents skipped.
    pub skipped_empty: u64,
    /// Invalid UTF-8 sequences replaced with U+FFFD (with `source.invalid_utf8 = "replace"`).
    pub replaced_invalid_utf8: u64,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Seconds spent training the tokenizer (0 when loaded).
    pub tokenizer_secs: f64,
    /// Shards kept from an earlier build of the same inputs and settings into the same
    /// directory, interrupted or finished (0 for a fresh build).
    pub resumed_shards: usize,
    /// Seconds spent end to end.
    pub secs: f64,
}

impl BuildSummary {
    /// Tokens per byte of text (a measure of the tokenizer's compression).
    pub fn tokens_per_byte(&self) -> f64 {
        self.tokens as f64 / self.bytes.max(1) as f64
    }
}

/// FNV-1a over the seed and the text, mapped to [0, 1): deterministic, order-independent, and
/// identical documents land in the same split.
pub fn split_of(text: &str, seed: u64, val_fraction: f64) -> Split {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in seed.to_le_bytes().iter().chain(text.as_bytes()) {
        h ^= *b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    // Finalize (splitmix64) so that nearby hashes spread over [0, 1).
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^= h >> 31;
    let u = (h >> 11) as f64 / (1u64 << 53) as f64;
    if u < val_fraction {
        Split::Val
    } else {
        Split::Train
    }
}

/// The input files' size on disk (the progress bars' total).
fn total_input_bytes(files: &[PathBuf]) -> u64 {
    files.iter().filter_map(|f| f.metadata().ok()).map(|m| m.len()).sum()
}

/// The documents a tokenizer trains on: all of them within `limit` bytes; over it, each file
/// gives text in proportion to its size on disk (from its start, a long document cut at the
/// file's share), so that every source trains the tokenizer, not the files that sort first. An
/// error ends the iteration and waits in `err`.
struct TrainingSample<'a> {
    files: &'a [std::path::PathBuf],
    source: &'a SourceConfig,
    sizes: Vec<u64>,
    total: u64,
    limit: u64,
    pb: &'a ByteBar,
    /// The open file (the `next - 1`-th), and the bytes taken from it.
    docs: Option<Documents>,
    next: usize,
    taken: u64,
    seen: u64,
    /// Whether the sample has been read to its end.
    done: bool,
    err: Option<DataError>,
}

impl<'a> TrainingSample<'a> {
    fn new(files: &'a [std::path::PathBuf], source: &'a SourceConfig, limit: u64, pb: &'a ByteBar) -> Self {
        let sizes: Vec<u64> = files.iter().map(|f| f.metadata().map_or(0, |m| m.len())).collect();
        let total = sizes.iter().sum();
        Self { files, source, sizes, total, limit, pb, docs: None, next: 0, taken: 0, seen: 0, done: false, err: None }
    }

    /// The bytes of text file `i` may give.
    fn share(&self, i: usize) -> u64 {
        if self.total <= self.limit {
            u64::MAX
        } else {
            ((self.limit as u128 * self.sizes[i] as u128 / self.total as u128) as u64).max(1)
        }
    }
}

impl Iterator for TrainingSample<'_> {
    type Item = String;

    fn next(&mut self) -> Option<String> {
        while self.seen < self.limit && self.err.is_none() {
            if self.docs.is_none() {
                let Some(f) = self.files.get(self.next) else { break };
                match Documents::open(std::slice::from_ref(f), self.source) {
                    Ok(d) => self.docs = Some(d),
                    Err(e) => self.err = Some(e),
                }
                (self.next, self.taken) = (self.next + 1, 0);
                continue;
            }
            let share = self.share(self.next - 1);
            match self.docs.as_mut().and_then(Iterator::next) {
                Some(Ok(d)) if self.taken < share => {
                    let mut text = d.text;
                    let mut cut = usize::try_from(share - self.taken).unwrap_or(usize::MAX).min(text.len());
                    while !text.is_char_boundary(cut) {
                        cut -= 1;
                    }
                    // A cut document ends the file's share.
                    self.taken = if cut < text.len() { share } else { self.taken + cut as u64 };
                    text.truncate(cut);
                    self.seen += text.len() as u64;
                    self.pb.set_position(self.seen);
                    return Some(text);
                }
                Some(Ok(_)) | None => self.docs = None,
                Some(Err(e)) => self.err = Some(e),
            }
        }
        if !self.done {
            // The trainer has every text now; the merges take a while on a large sample.
            self.done = true;
            self.pb.stage(&format!("bpe merges from {}", indicatif::BinaryBytes(self.seen)));
        }
        None
    }
}

/// Refuses an `out` that holds anything but a data build's own files (shards, `manifest.json`,
/// `tokenizer.json`, the build's journals and lock, and their temp files): a build writes and
/// removes those names there and would overwrite, or delete, another directory's files.
fn check_build_dir(out: &Path) -> Result<()> {
    if out.exists() && !out.is_dir() {
        return Err(DataError::Config(format!(
            "{} is a file, not a directory: give --out a new or empty directory",
            out.display()
        )));
    }
    let Ok(entries) = std::fs::read_dir(out) else { return Ok(()) };
    let ours = |name: &str| {
        let base = name.split('.').next().unwrap_or("");
        // A shard, or a shard's temp file (`train-00001.arrow.<pid>-<n>.tmp`).
        let shard = (base.starts_with("train-") || base.starts_with("val-"))
            && (name.ends_with(".arrow") || (name.contains(".arrow.") && name.ends_with(".tmp")));
        let own =
            [crate::shard::MANIFEST, TOKENIZER_FILE, resume::BUILD_FILE, resume::PROGRESS_FILE, resume::LOCK_FILE];
        shard || own.iter().any(|f| name == *f || (name.starts_with(f) && name.ends_with(".tmp")))
    };
    let mut foreign: Vec<String> =
        entries.flatten().map(|e| e.file_name().to_string_lossy().to_string()).filter(|n| !ours(n)).collect();
    // A manifest.json there must be a shard directory's (of any format version: a build replaces
    // an older one).
    let manifest = out.join(crate::shard::MANIFEST);
    let shard_manifest = || {
        let v: Option<serde_json::Value> = std::fs::read(&manifest).ok().and_then(|b| serde_json::from_slice(&b).ok());
        v.is_some_and(|v| v["format"] == "patchlm-shards")
    };
    if manifest.is_file() && !shard_manifest() {
        foreign.push(format!("{} (not a shard manifest)", crate::shard::MANIFEST));
    }
    if foreign.is_empty() {
        return Ok(());
    }
    foreign.sort();
    foreign.truncate(5);
    Err(DataError::Config(format!(
        "{} holds files that are not a data build's ({}); a build writes manifest.json, tokenizer.json and shards \
         there and removes stale ones: choose a new or empty --out",
        out.display(),
        foreign.join(", ")
    )))
}

/// Reads `inputs`, trains or loads the tokenizer, tokenizes on all cores and writes shards, the
/// tokenizer and `manifest.json` into `out`. The same inputs and settings give byte-identical
/// output. `progress` shows a progress bar on stderr.
///
/// A build that was interrupted (killed, out of disk, a bad input fixed since) resumes: while it
/// runs, `out/build-progress.json` names the build (settings, input files with their sizes and
/// modification times, tokenizer) and the shards committed so far. When a build with the same
/// identity finds it, it keeps those shards (each checked against its recorded size and sha256),
/// reuses the tokenizer it trained, reads past the documents they hold without tokenizing them
/// and writes the rest; the result is byte for byte what an uninterrupted build writes. A finished
/// build of the same identity is kept the same way (`out/build.json` names it), so running
/// a build twice tokenizes once. Any other build into `out` starts over. The journal is removed
/// once `manifest.json` is written. Two builds into one `out` at once take turns on the lock
/// `out/.build.lock`.
pub fn build_shards<P: AsRef<Path>>(
    inputs: &[P],
    out: &Path,
    cfg: &DataConfig,
    tok_source: TokenizerSource<'_>,
    progress: bool,
) -> Result<BuildSummary> {
    build(inputs, out, cfg, tok_source, progress, None)?
        .ok_or_else(|| DataError::Corpus("the build stopped before its end".into()))
}

/// Whether `out` holds a finished [`build_shards`] of `inputs` with `cfg` and `tok_source`: the
/// identity its `build.json` records (the settings, every input file's path, size and
/// modification time, the tokenizer) is the one this build would have, and its current manifest
/// lists the same shards. The shards are not hashed here ([`build_shards`] hashes each before it
/// keeps it; [`crate::Dataset::open`] checks each against its sha256 by default), so a cache can ask
/// this on every run at the cost of reading two small files. A directory that another build
/// wrote over, an interrupted build, or a build of an earlier revision of this crate answers
/// `false`.
pub fn holds_build<P: AsRef<Path>>(
    inputs: &[P],
    out: &Path,
    cfg: &DataConfig,
    tok_source: &TokenizerSource<'_>,
) -> Result<bool> {
    let Some(done) = Journal::find(out).filter(|j| j.finished) else {
        return Ok(false);
    };
    let files = crate::source::expand_inputs(inputs)?;
    let given = match tok_source {
        TokenizerSource::Train => None,
        TokenizerSource::File(p) => Some(tokenizer::load_tokenizer(p)?),
        TokenizerSource::Given(t) => Some((**t).clone()),
    };
    let ident = match given {
        None => build_identity(cfg, &files, None),
        Some(mut tok) => {
            tokenizer::add_missing_special_tokens(&mut tok, &cfg.tokenizer)?;
            build_identity(cfg, &files, Some(&tokenizer::fingerprint(&tok)?))
        }
    };
    Ok(resume::digest(&ident) == done.identity_sha256)
}

/// The identity a build records (see [`resume::identity`]): with a trained tokenizer
/// (`fingerprint` None) a function of the settings and inputs alone, known before training; with
/// a given one, its fingerprint once document tokens are added. [`build_shards`] and
/// [`holds_build`] both ask this, so that they cannot disagree.
fn build_identity(cfg: &DataConfig, files: &[PathBuf], fingerprint: Option<&str>) -> serde_json::Value {
    resume::identity(cfg, files, fingerprint.unwrap_or("train"))
}

/// [`build_shards`] that stops, as if killed, once `stop_after` more shards are committed
/// (`Ok(None)`), leaving its journal; for tests of resuming.
#[doc(hidden)]
pub fn build_shards_stopping<P: AsRef<Path>>(
    inputs: &[P],
    out: &Path,
    cfg: &DataConfig,
    tok_source: TokenizerSource<'_>,
    stop_after: usize,
) -> Result<Option<BuildSummary>> {
    build(inputs, out, cfg, tok_source, false, Some(stop_after))
}

fn build<P: AsRef<Path>>(
    inputs: &[P],
    out: &Path,
    cfg: &DataConfig,
    tok_source: TokenizerSource<'_>,
    progress: bool,
    stop_after: Option<usize>,
) -> Result<Option<BuildSummary>> {
    let start = Instant::now();
    if !(0.0..1.0).contains(&cfg.val_fraction) {
        return Err(DataError::Config(format!("val_fraction must be in [0, 1), got {}", cfg.val_fraction)));
    }
    if cfg.shard_mb == 0 {
        return Err(DataError::Config("shard_mb must be at least 1".into()));
    }
    // Open once up front so that missing inputs fail before any work.
    Documents::open(inputs, &cfg.source)?;
    check_build_dir(out)?;
    std::fs::create_dir_all(out).map_err(io_err(out))?;
    let lock_path = out.join(resume::LOCK_FILE);
    let what = format!("another build into {}", out.display());
    let _lock = crate::shard::lock_exclusive(&lock_path, &what, &format!("building into {}", out.display()))?;
    let files = crate::source::expand_inputs(inputs)?;
    let in_bytes = total_input_bytes(&files);
    let prior = Journal::find(out);

    let t0 = Instant::now();
    let trained = matches!(tok_source, TokenizerSource::Train);
    // A trained tokenizer is a function of the settings and inputs, so such a build's identity is
    // known before the tokenizer; a given one's includes its fingerprint.
    let train_ident = trained.then(|| build_identity(cfg, &files, None));
    let mut tok = match tok_source {
        TokenizerSource::File(p) => tokenizer::load_tokenizer(p)?,
        TokenizerSource::Given(t) => *t,
        TokenizerSource::Train => match reusable_tokenizer(prior.as_ref(), out, train_ident.as_ref()) {
            Some(t) => t,
            None => {
                let pb = ByteBar::new(in_bytes.min(cfg.tokenizer.max_train_bytes), progress, "bpe train");
                let mut sample = TrainingSample::new(&files, &cfg.source, cfg.tokenizer.max_train_bytes, &pb);
                let t = tokenizer::train_bpe(sample.by_ref(), &cfg.tokenizer);
                pb.finish_and_clear();
                if let Some(e) = sample.err {
                    return Err(e);
                }
                t?
            }
        },
    };
    let tokenizer_secs = if trained { t0.elapsed().as_secs_f64() } else { 0.0 };
    // A given tokenizer without document tokens (character- or word-level ones often have none)
    // gets them; the shards' tokenizer.json holds them.
    let added = tokenizer::add_missing_special_tokens(&mut tok, &cfg.tokenizer)?;
    if progress && !added.is_empty() {
        let list: Vec<String> = added.iter().map(|(t, id)| format!("{t} (id {id})")).collect();
        let (what, tokens, them) = match added.len() {
            1 => ("an end-of-document token", "a special token", "it"),
            _ => ("document-boundary tokens", "special tokens", "them"),
        };
        eprintln!(
            "note: the tokenizer has no {what}: added {} as {tokens}; the tokenizer.json beside the shards holds \
             {them}",
            list.join(" and ")
        );
    }
    let specials = tokenizer::special_tokens(&tok, &cfg.tokenizer)?;
    let vocab_size = tokenizer::vocab_size(&tok);
    let dtype = TokenDtype::for_vocab(vocab_size);
    let json = tokenizer::tokenizer_json(&tok)?;
    let fingerprint = tokenizer::fingerprint(&tok)?;

    // The shards an interrupted build of this same identity committed stay; everything else of
    // an earlier build goes, so that the directory ends up holding exactly what the manifest lists.
    let ident = train_ident.unwrap_or_else(|| build_identity(cfg, &files, Some(&fingerprint)));
    let ident_sha = resume::digest(&ident);
    let prior = prior.filter(|j| j.identity_sha256 == ident_sha && j.tokenizer_fingerprint == fingerprint);
    let (kept_train, kept_val) = match &prior {
        Some(j) => (j.intact(out, Split::Train), j.intact(out, Split::Val)),
        None => Default::default(),
    };
    let kept: Vec<ShardInfo> = kept_train.iter().chain(&kept_val).cloned().collect();
    if let Some(j) = prior.as_ref().filter(|j| j.finished && j.shards.len() == kept.len()) {
        // A finished build of this identity, every shard whole: no input to read again.
        let manifest = Manifest::load(out)?;
        write_atomic(&out.join(TOKENIZER_FILE), json.as_bytes())?;
        if progress {
            eprintln!("{} already holds this build: its {} shards checked and kept", out.display(), j.shards.len());
        }
        return Ok(Some(summary(&manifest, tokenizer_secs, kept.len(), start)));
    }
    resume::clear_except(out, &kept)?;
    let skip = [kept_train.iter().map(|s| s.rows).sum::<u64>(), kept_val.iter().map(|s| s.rows).sum::<u64>()];
    if let (true, Some(_)) = (progress, &prior) {
        let (n, docs, s) = (kept.len(), skip[0] + skip[1], if kept.len() == 1 { "" } else { "s" });
        eprintln!("resuming the build in {}: {n} shard{s} ({docs} documents) kept from an earlier run", out.display());
    }
    let resumed_shards = kept.len();
    write_atomic(&out.join(TOKENIZER_FILE), json.as_bytes())?;
    let mut journal = Journal {
        identity_sha256: ident_sha,
        identity: ident,
        tokenizer_fingerprint: fingerprint.clone(),
        shards: kept,
        finished: false,
    };
    journal.save(out, resume::PROGRESS_FILE)?;

    let target = cfg.shard_mb << 20;
    let mut train_w = ShardWriter::resuming(out, Split::Train, dtype, vocab_size, target, kept_train);
    let mut val_w = ShardWriter::resuming(out, Split::Val, dtype, vocab_size, target, kept_val);

    // A reader thread streams batches of documents, each with its split, leaving out those that
    // kept shards already hold (counted in bytes, for the progress bar); this thread tokenizes
    // each batch on all cores and writes it in order, so the output does not depend on
    // scheduling.
    let pb = ByteBar::new(in_bytes, progress, "tokenize");
    type Batch = (Vec<(Document, Split)>, u64);
    let (tx, rx) = sync_channel::<Result<Batch>>(2);
    let inputs_owned: Vec<std::path::PathBuf> = inputs.iter().map(|p| p.as_ref().to_path_buf()).collect();
    let src_cfg = cfg.source.clone();
    let (seed, val_fraction) = (cfg.split_seed, cfg.val_fraction);
    let reader = std::thread::spawn(move || -> crate::source::SourceStats {
        let mut docs = match Documents::open(&inputs_owned, &src_cfg) {
            Ok(d) => d,
            Err(e) => {
                let _ = tx.send(Err(e));
                return Default::default();
            }
        };
        let mut batch = Vec::new();
        let (mut bytes, mut skipped_bytes) = (0usize, 0u64);
        let mut seen = [0u64; 2];
        for d in docs.by_ref() {
            match d {
                Ok(d) => {
                    let split = split_of(&d.text, seed, val_fraction);
                    let i = usize::from(split == Split::Val);
                    seen[i] += 1;
                    if seen[i] <= skip[i] {
                        skipped_bytes += d.text.len() as u64;
                    } else {
                        bytes += d.text.len();
                        batch.push((d, split));
                    }
                    if bytes >= BATCH_BYTES || skipped_bytes >= BATCH_BYTES as u64 {
                        if tx.send(Ok((std::mem::take(&mut batch), skipped_bytes))).is_err() {
                            return docs.stats().clone();
                        }
                        bytes = 0;
                        skipped_bytes = 0;
                    }
                }
                Err(e) => {
                    let _ = tx.send(Err(e));
                    return docs.stats().clone();
                }
            }
        }
        if !batch.is_empty() || skipped_bytes > 0 {
            let _ = tx.send(Ok((batch, skipped_bytes)));
        }
        docs.stats().clone()
    });

    // (Special tokens' strings in the text are ordinary text; see encode_document.)
    let ordinary = tokenizer::ordinary_text(&tok);
    let mut text_bytes = 0u64;
    let mut failure = None;
    let mut stopped = false;
    for batch in rx.iter() {
        let (batch, skipped_bytes) = match batch {
            Ok(b) => b,
            Err(e) => {
                failure = Some(e);
                break;
            }
        };
        text_bytes += skipped_bytes;
        let encoded: Result<Vec<Vec<u32>>> = batch
            .par_iter()
            .map(|(d, _)| {
                tokenizer::encode_document(&ordinary, &d.text, &specials).map_err(|e| {
                    let msg = match e {
                        DataError::Tokenizer(m) => m,
                        e => e.to_string(),
                    };
                    DataError::Tokenizer(format!("{}: document {}: {msg}", d.source.display(), d.position))
                })
            })
            .collect();
        let encoded = match encoded {
            Ok(e) => e,
            Err(e) => {
                failure = Some(e);
                break;
            }
        };
        for ((d, split), ids) in batch.iter().zip(&encoded) {
            if let Some(&id) = ids.iter().find(|&&t| t as usize >= vocab_size) {
                failure = Some(DataError::TokenRange { id, dtype: dtype.name(), vocab: vocab_size });
                break;
            }
            let w = match split {
                Split::Train => &mut train_w,
                Split::Val => &mut val_w,
            };
            let before = w.committed().len();
            if let Err(e) = w.push(ids) {
                failure = Some(e);
                break;
            }
            text_bytes += d.text.len() as u64;
            if w.committed().len() > before {
                // A shard was committed: the journal names it before anything else is written.
                journal.shards = train_w.committed().iter().chain(val_w.committed()).cloned().collect();
                if let Err(e) = journal.save(out, resume::PROGRESS_FILE) {
                    failure = Some(e);
                    break;
                }
                if stop_after.is_some_and(|n| journal.shards.len() >= resumed_shards + n) {
                    stopped = true;
                    break;
                }
            }
        }
        if failure.is_some() || stopped {
            break;
        }
        pb.set_position(text_bytes.min(in_bytes));
    }
    drop(rx);
    let stats = reader.join().map_err(|_| DataError::Corpus("the reader thread panicked".into()))?;
    pb.finish_and_clear();
    if let Some(e) = failure {
        return Err(e);
    }
    if stopped {
        return Ok(None);
    }
    if stats.documents == 0 {
        return Err(DataError::Corpus(format!(
            "no document in the inputs ({} file{} read, {} empty document{} skipped); nothing to make shards of",
            stats.files,
            if stats.files == 1 { "" } else { "s" },
            stats.skipped_empty,
            if stats.skipped_empty == 1 { "" } else { "s" },
        )));
    }
    let mut shards = train_w.finish()?;
    shards.extend(val_w.finish()?);
    let manifest = Manifest {
        format: "patchlm-shards".into(),
        format_version: crate::shard::FORMAT_VERSION,
        build_revision: crate::shard::BUILD_REVISION,
        tokenizer_fingerprint: fingerprint,
        vocab_size,
        dtype,
        special_tokens: specials,
        val_fraction: cfg.val_fraction,
        split_seed: cfg.split_seed,
        source: stats,
        shards,
    };
    manifest.save(out)?;
    journal.shards = manifest.shards.clone();
    journal.save(out, resume::BUILD_FILE)?;
    let journal_path = out.join(resume::PROGRESS_FILE);
    match std::fs::remove_file(&journal_path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(DataError::Io { path: journal_path, source: e })
        }
        _ => {}
    }
    Ok(Some(summary(&manifest, tokenizer_secs, resumed_shards, start)))
}

/// What a build that wrote (or kept) `manifest` did.
fn summary(manifest: &Manifest, tokenizer_secs: f64, resumed_shards: usize, start: Instant) -> BuildSummary {
    let train_tokens = manifest.tokens(Split::Train);
    let val_tokens = manifest.tokens(Split::Val);
    BuildSummary {
        documents: manifest.documents(Split::Train) + manifest.documents(Split::Val),
        val_documents: manifest.documents(Split::Val),
        tokens: train_tokens + val_tokens,
        train_tokens,
        val_tokens,
        bytes: manifest.source.bytes,
        skipped_empty: manifest.source.skipped_empty,
        replaced_invalid_utf8: manifest.source.replaced_invalid_utf8,
        vocab_size: manifest.vocab_size,
        tokenizer_secs,
        resumed_shards,
        secs: start.elapsed().as_secs_f64(),
    }
}

/// The tokenizer an interrupted build of these settings and inputs trained, when its journal
/// says so and `out/tokenizer.json` is still the one it recorded.
fn reusable_tokenizer(prior: Option<&Journal>, out: &Path, ident: Option<&serde_json::Value>) -> Option<Tokenizer> {
    let j = prior?;
    if j.identity_sha256 != resume::digest(ident?) {
        return None;
    }
    let tok = tokenizer::load_tokenizer(&out.join(TOKENIZER_FILE)).ok()?;
    (tokenizer::fingerprint(&tok).ok()? == j.tokenizer_fingerprint).then_some(tok)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Over its limit, the tokenizer's sample takes from each file its share of the limit (in
    /// proportion to the file's size on disk): whole documents while they fit, then the next
    /// one cut at the share (at a character boundary), then nothing more from that file. Within
    /// the limit, every document whole.
    #[test]
    fn the_training_sample_takes_each_files_share() {
        let dir = tempfile::tempdir().unwrap();
        let line = |t: &str| format!("{}\n", serde_json::json!({ "text": t }));
        let a_docs: Vec<String> = (0..10).map(|i| format!("{i}{}", "a".repeat(99))).collect();
        let b_docs: Vec<String> = (0..4).map(|i| format!("{i}{}", "é".repeat(30))).collect();
        let files = vec![dir.path().join("a.jsonl"), dir.path().join("b.jsonl")];
        std::fs::write(&files[0], a_docs.iter().map(|t| line(t)).collect::<String>()).unwrap();
        std::fs::write(&files[1], b_docs.iter().map(|t| line(t)).collect::<String>()).unwrap();
        let sizes: Vec<u64> = files.iter().map(|f| f.metadata().unwrap().len()).collect();
        let total: u64 = sizes.iter().sum();
        let source = SourceConfig::default();
        let pb = ByteBar::new(0, false, "test");
        let sample = |limit: u64| TrainingSample::new(&files, &source, limit, &pb).collect::<Vec<String>>();

        let all: Vec<String> = a_docs.iter().chain(&b_docs).cloned().collect();
        assert_eq!(sample(total), all);
        assert_eq!(sample(u64::MAX), all);

        // By hand: the documents of one file up to `share` bytes, the last one cut.
        fn upto(docs: &[String], share: usize) -> Vec<String> {
            let (mut out, mut taken) = (Vec::new(), 0);
            for d in docs {
                if taken >= share {
                    break;
                }
                let mut cut = (share - taken).min(d.len());
                while !d.is_char_boundary(cut) {
                    cut -= 1;
                }
                out.push(d[..cut].to_string());
                taken = if cut < d.len() { share } else { taken + cut };
            }
            out
        }
        for limit in [450, 700, 1000] {
            let share = |i: usize| (limit * sizes[i] / total) as usize;
            assert!(share(0) < a_docs.iter().map(String::len).sum::<usize>(), "{limit}");
            let want: Vec<String> = [upto(&a_docs, share(0)), upto(&b_docs, share(1))].concat();
            let got = sample(limit);
            assert_eq!(got, want, "limit {limit}: shares {} and {}", share(0), share(1));
            assert!(got.iter().map(String::len).sum::<usize>() <= limit as usize);
        }
        // At 450 bytes: the shares are 356 (1120 bytes of 1412) and 93 (292 of 1412); the
        // second file's second document would be cut at 93 − 61 = 32 bytes, inside an é.
        assert_eq!(sizes, [1120, 292]);
        let got = sample(450);
        assert_eq!(got.iter().map(String::len).collect::<Vec<_>>(), [100, 100, 100, 56, 61, 31]);

        // Each file gives at least a byte, but the sample stops at its limit: 2 of 4 files.
        let small: Vec<PathBuf> = (0..4).map(|i| dir.path().join(format!("s{i}.jsonl"))).collect();
        for f in &small {
            std::fs::write(f, line("xyz")).unwrap();
        }
        let got: Vec<String> = TrainingSample::new(&small, &source, 2, &pb).collect();
        assert_eq!(got, ["x", "x"]);
    }
}

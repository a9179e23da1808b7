//! # patchlm-data: text in, tokenized Arrow shards out
//!
//! The data stage of patchlm, usable on its own: stream text from plain files (a document each,
//! or one a paragraph or line), directories, JSONL, JSON arrays or Parquet (gzip- or
//! zstd-compressed too) with bounded memory; train a byte-level BPE
//! tokenizer or load any HF `tokenizer.json`; tokenize on all cores; write Arrow IPC shards (one
//! row per document, a `tokens` list column of UInt16 or UInt32) with a deterministic hash-based
//! train/validation split and a `manifest.json` of checksums; read them back memory-mapped and
//! zero-copy. The crate knows nothing of models.
//!
//! ## Example: a folder of JSONL into shards, then random windows back
//!
//! ```
//! use patchlm_data::{build_shards, DataConfig, Dataset, Split, TokenizerSource};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let dir = tempfile::tempdir()?;
//! let corpus = dir.path().join("corpus");
//! std::fs::create_dir(&corpus)?;
//! let mut jsonl = String::new();
//! for i in 0..200 {
//!     jsonl += &format!("{{\"text\": \"Document {i}: the quick brown fox jumps over the lazy dog.\"}}\n");
//! }
//! std::fs::write(corpus.join("part-0.jsonl"), jsonl)?;
//!
//! // Train a small byte-level BPE on the corpus and write shards + manifest + tokenizer.json.
//! let mut cfg = DataConfig::default();
//! cfg.tokenizer.vocab_size = 300;
//! cfg.val_fraction = 0.1;
//! let out = dir.path().join("shards");
//! let summary = build_shards(&[&corpus], &out, &cfg, TokenizerSource::Train, false)?;
//! assert_eq!(summary.documents, 200);
//!
//! // Read random 16-token windows of the training stream (checksums verified on open).
//! let ds = Dataset::open(&out)?;
//! let train = ds.split(Split::Train);
//! let mut window = Vec::new();
//! for start in [0, 123, train.len() - 16] {
//!     train.read_into(start, start + 16, &mut window)?;
//!     assert_eq!(window.len(), 16);
//! }
//! # Ok(())
//! # }
//! ```
#![warn(missing_docs)]

pub mod corpus;
pub mod error;
#[cfg(feature = "hub")]
pub mod hub;
pub mod parquet_io;
pub mod pipeline;
pub mod progress;
pub mod reader;
mod resume;
pub mod shard;
pub mod source;
pub mod tokenizer;

pub use error::{DataError, Result};
pub use parquet_io::{export_parquet, import_parquet, parquet_rows_json};
pub use pipeline::{
    build_shards, build_shards_stopping, holds_build, split_of, BuildSummary, DataConfig, TokenizerSource,
};
pub use reader::{map_ipc_file, Dataset, ReaderOptions, TokenChunk, TokenStream};
pub use resume::{BUILD_FILE, PROGRESS_FILE};
pub use shard::{Manifest, ShardInfo, Split, TokenDtype};
pub use source::{Document, Documents, SourceConfig, SourceStats};
pub use tokenizers::Tokenizer;

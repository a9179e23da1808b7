//! Pre-grouped patch datasets: the training token stream split at λ, cut into blocks of K·T
//! tokens (patch phase) and T + 1 tokens (token phase), shuffled with a seed, stored as Arrow IPC
//! fixed-size-list rows with a manifest; plus validation blocks of T + 1 tokens.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow_array::cast::AsArray;
use arrow_array::types::{UInt16Type, UInt32Type};
use arrow_array::{Array, ArrayRef, FixedSizeListArray, RecordBatch, UInt16Array, UInt32Array};
use arrow_schema::{DataType, Field, Schema};
use patchlm_data::shard::{sha256_file, write_atomic, AtomicFile};
use patchlm_data::{map_ipc_file, Dataset, ReaderOptions, TokenDtype};
use patchlm_model::SplitMix64;

use crate::config::PatchConfig;
use crate::error::{PatchError, Result};

/// The manifest's file name.
pub const MANIFEST: &str = "patch_manifest.json";
/// Format version of patch datasets.
pub const FORMAT_VERSION: u32 = 1;
/// Blocks per Arrow record batch.
const BLOCKS_PER_BATCH: usize = 256;

/// How the datasets are cut.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq)]
#[serde(default)]
pub struct PatchDataConfig {
    /// Context length T in positions (default 256).
    pub context: usize,
    /// Seed of the block shuffle (default 0).
    pub seed: u64,
    /// Passes over the data (default 1). With more than one, the patch phase makes the first
    /// λ·epochs passes over the whole stream (a fraction of a pass included) and the token phase
    /// the remaining (1 − λ)·epochs, as in the paper.
    pub epochs: usize,
    /// At most this many validation blocks of T + 1 tokens (default 64).
    pub max_val_blocks: usize,
    /// Use only the first this many training tokens (default 0 = all); λ splits what is used.
    pub max_tokens: u64,
}

impl PatchDataConfig {
    /// Checks the settings: a context of at least 2 positions, at least one epoch.
    pub fn validate(&self) -> Result<()> {
        if self.context < 2 {
            return Err(PatchError::Config(format!("context length must be at least 2, got {}", self.context)));
        }
        if self.epochs == 0 {
            return Err(PatchError::Config("epochs must be at least 1".into()));
        }
        Ok(())
    }
}

impl Default for PatchDataConfig {
    fn default() -> Self {
        Self { context: 256, seed: 0, epochs: 1, max_val_blocks: 64, max_tokens: 0 }
    }
}

/// One phase's block file.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct BlockFile {
    /// File name relative to the manifest.
    pub file: String,
    /// Tokens per block (K·T or T + 1).
    pub block_len: usize,
    /// Blocks in the file.
    pub blocks: u64,
    /// Token range `[a, b)` of the source split the blocks were cut from.
    pub source_range: (u64, u64),
    /// Passes the phase makes over this file (λ·epochs or (1 − λ)·epochs: not always whole; the
    /// phase takes round(blocks · epochs) blocks, wrapping around the end).
    pub epochs: f64,
    /// `sha256:<hex>` of the file.
    pub sha256: String,
}

/// `patch_manifest.json`.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct PatchManifest {
    /// Always `patchlm-patch-data`.
    pub format: String,
    /// [`FORMAT_VERSION`].
    pub format_version: u32,
    /// Patch settings.
    pub patch: PatchConfig,
    /// Cutting settings.
    pub data: PatchDataConfig,
    /// The shards' tokenizer fingerprint.
    pub tokenizer_fingerprint: String,
    /// The sha256 of the shards' `manifest.json` (every shard's sha256, the tokenizer's, the
    /// split): which shards the blocks were cut from. Empty in manifests from before it was kept.
    #[serde(default)]
    pub shards_manifest_sha256: String,
    /// The shards' vocabulary size.
    pub vocab_size: usize,
    /// Element type.
    pub dtype: TokenDtype,
    /// Patch-phase blocks (K·T tokens), absent when λ = 0.
    pub patch_phase: Option<BlockFile>,
    /// Token-phase blocks (T + 1 tokens).
    pub token_phase: BlockFile,
    /// Validation blocks (T + 1 tokens, in order).
    pub val: BlockFile,
}

impl PatchManifest {
    /// `sha256:<hex>` of what training reads: the tokenizer and the two phases' block files (the
    /// blocks and their order). Different inputs, tokenizer or cutting give a different one.
    pub fn training_data_fingerprint(&self) -> String {
        let patch = self.patch_phase.as_ref().map_or("none", |b| b.sha256.as_str());
        let ident = format!("{}\n{patch}\n{}", self.tokenizer_fingerprint, self.token_phase.sha256);
        patchlm_data::shard::sha256_bytes(ident.as_bytes())
    }

    /// Reads `dir/patch_manifest.json`.
    pub fn load(dir: &Path) -> Result<Self> {
        let path = dir.join(MANIFEST);
        let text = std::fs::read_to_string(&path).map_err(|e| PatchError::File {
            path: path.clone(),
            msg: format!("{e}; build patch datasets first (patchlm_patch::build_patch_datasets)"),
        })?;
        let m: PatchManifest = serde_json::from_str(&text)
            .map_err(|e| PatchError::File { path: path.clone(), msg: format!("invalid manifest: {e}") })?;
        if m.format != "patchlm-patch-data" || m.format_version != FORMAT_VERSION {
            return Err(PatchError::File {
                path,
                msg: format!("unsupported format {} v{}", m.format, m.format_version),
            });
        }
        Ok(m)
    }
}

fn block_schema(dtype: TokenDtype, len: usize) -> Arc<Schema> {
    let item = Arc::new(Field::new("item", dtype.arrow(), false));
    Arc::new(Schema::new(vec![Field::new("tokens", DataType::FixedSizeList(item, len as i32), false)]))
}

/// A seeded permutation of 0..n (Fisher-Yates).
pub fn permutation(n: u64, seed: u64) -> Vec<u64> {
    let mut p: Vec<u64> = (0..n).collect();
    let mut rng = SplitMix64(seed ^ 0x5eed_b10c);
    for i in (1..p.len()).rev() {
        p.swap(i, rng.below(i + 1));
    }
    p
}

/// Element `i` of a keyed pseudo-random permutation of `0..n`, with no table in memory: a
/// four-round Feistel network on the smallest even number of bits that holds `n`, applied again
/// while the result falls outside `0..n` (cycle walking keeps it a bijection). Later passes over
/// a block file read it in such an order, so any block of any pass is found in O(1).
pub fn permuted_index(i: u64, n: u64, key: u64) -> u64 {
    if n <= 1 {
        return 0;
    }
    let half = (64 - (n - 1).leading_zeros()).div_ceil(2);
    let mask = (1u64 << half) - 1;
    let mut rng = SplitMix64(key);
    let round_keys: [u64; 4] = std::array::from_fn(|_| rng.next_u64());
    let mut x = i % n;
    loop {
        let (mut l, mut r) = (x >> half, x & mask);
        for k in round_keys {
            (l, r) = (r, l ^ (SplitMix64(r ^ k).next_u64() & mask));
        }
        x = (l << half) | r;
        if x < n {
            return x;
        }
    }
}

fn write_blocks(
    path: &Path,
    stream: &patchlm_data::TokenStream,
    start: u64,
    block_len: usize,
    order: &[u64],
    dtype: TokenDtype,
) -> Result<String> {
    let schema = block_schema(dtype, block_len);
    let af = AtomicFile::create(path)?;
    let ferr = |e: arrow_schema::ArrowError| PatchError::File { path: path.to_path_buf(), msg: e.to_string() };
    let mut w = arrow_ipc::writer::FileWriter::try_new(af, &schema).map_err(ferr)?;
    let mut buf = Vec::new();
    let mut vals: Vec<u32> = Vec::with_capacity(BLOCKS_PER_BATCH * block_len);
    for chunk in order.chunks(BLOCKS_PER_BATCH) {
        vals.clear();
        for &b in chunk {
            let a = start + b * block_len as u64;
            stream.read_into(a, a + block_len as u64, &mut buf)?;
            vals.extend_from_slice(&buf);
        }
        let values: ArrayRef = match dtype {
            TokenDtype::Uint16 => Arc::new(UInt16Array::from_iter_values(vals.iter().map(|&t| t as u16))),
            TokenDtype::Uint32 => Arc::new(UInt32Array::from_iter_values(vals.iter().copied())),
        };
        let item = Arc::new(Field::new("item", dtype.arrow(), false));
        let list = FixedSizeListArray::try_new(item, block_len as i32, values, None).map_err(ferr)?;
        let batch = RecordBatch::try_new(schema.clone(), vec![Arc::new(list)]).map_err(ferr)?;
        w.write(&batch).map_err(ferr)?;
    }
    w.finish().map_err(ferr)?;
    let af = w.into_inner().map_err(ferr)?;
    Ok(af.commit()?.1)
}

/// Cuts the shard directory `shards` into patch datasets in `out` (see the module docs).
/// λ splits the training stream by tokens: the first λ go to the patch phase, the rest to the
/// token phase (disjoint), unless `data.epochs` > 1, when each phase uses the whole stream.
pub fn build_patch_datasets(
    shards: &Path,
    out: &Path,
    patch: &PatchConfig,
    data: &PatchDataConfig,
) -> Result<PatchManifest> {
    patch.validate()?;
    data.validate()?;
    let ds = Dataset::open_with(shards, &ReaderOptions::default())?;
    let m = ds.manifest();
    let train = ds.train();
    let n = if data.max_tokens > 0 { train.len().min(data.max_tokens) } else { train.len() };
    let (k, t) = (patch.k, data.context);
    // With several epochs, the first λ of the passes are at patch level, fractions included
    // (the paper's λ = 4/5 of 6 epochs: 4.8 patch-level passes, then 1.2 token-level ones).
    let (patch_epochs, token_epochs, split) = if data.epochs > 1 {
        let e = data.epochs as f64;
        (patch.lambda * e, (1.0 - patch.lambda) * e, None)
    } else {
        (if patch.lambda > 0.0 { 1.0 } else { 0.0 }, 1.0, Some((patch.lambda * n as f64).round() as u64))
    };
    let (patch_range, token_range) = match split {
        Some(s) => ((0, s), (s, n)),
        None => ((0, n), (0, n)),
    };
    std::fs::create_dir_all(out).map_err(|e| PatchError::File { path: out.to_path_buf(), msg: e.to_string() })?;
    let file = |name: &str| -> PathBuf { out.join(name) };

    let patch_phase = if patch_epochs > 0.0 {
        let blen = k * t;
        let blocks = (patch_range.1 - patch_range.0) / blen as u64;
        if blocks == 0 {
            return Err(PatchError::TooSmall(format!(
                "the patch phase's {} tokens do not fill one block of K·T = {blen} tokens; use more data, a shorter context or a smaller lambda",
                patch_range.1 - patch_range.0
            )));
        }
        let order = permutation(blocks, data.seed);
        let sha256 = write_blocks(&file("patch.arrow"), train, patch_range.0, blen, &order, m.dtype)?;
        Some(BlockFile {
            file: "patch.arrow".into(),
            block_len: blen,
            blocks,
            source_range: patch_range,
            epochs: patch_epochs,
            sha256,
        })
    } else {
        None
    };
    let tlen = t + 1;
    let tblocks = (token_range.1 - token_range.0) / tlen as u64;
    if tblocks == 0 {
        return Err(PatchError::TooSmall(format!(
            "the token phase's {} tokens do not fill one block of T + 1 = {tlen} tokens; use more data, a shorter context or a smaller lambda",
            token_range.1 - token_range.0
        )));
    }
    let order = permutation(tblocks, data.seed.wrapping_add(1));
    let sha256 = write_blocks(&file("token.arrow"), train, token_range.0, tlen, &order, m.dtype)?;
    let token_phase = BlockFile {
        file: "token.arrow".into(),
        block_len: tlen,
        blocks: tblocks,
        source_range: token_range,
        epochs: token_epochs,
        sha256,
    };
    let val = ds.val();
    let vblocks = (val.len() / tlen as u64).min(data.max_val_blocks as u64);
    if vblocks == 0 {
        return Err(PatchError::TooSmall(format!(
            "the validation split's {} tokens do not fill one block of {tlen} tokens; hold out more (--val-fraction, \
             data.val_fraction), cut few long documents into more (a text file is one document unless --sample-by, \
             data.source.sample_by, says paragraph or line) or shorten the context",
            val.len()
        )));
    }
    let vorder: Vec<u64> = (0..vblocks).collect();
    let sha256 = write_blocks(&file("val.arrow"), val, 0, tlen, &vorder, m.dtype)?;
    let valf = BlockFile {
        file: "val.arrow".into(),
        block_len: tlen,
        blocks: vblocks,
        source_range: (0, vblocks * tlen as u64),
        epochs: 1.0,
        sha256,
    };
    let manifest = PatchManifest {
        format: "patchlm-patch-data".into(),
        format_version: FORMAT_VERSION,
        patch: *patch,
        data: data.clone(),
        tokenizer_fingerprint: m.tokenizer_fingerprint.clone(),
        shards_manifest_sha256: patchlm_data::shard::shards_identity(shards)?,
        vocab_size: m.vocab_size,
        dtype: m.dtype,
        patch_phase,
        token_phase,
        val: valf,
    };
    let json = serde_json::to_vec_pretty(&manifest)
        .map_err(|e| PatchError::File { path: file(MANIFEST), msg: e.to_string() })?;
    write_atomic(&file(MANIFEST), &json)?;
    Ok(manifest)
}

#[derive(Clone)]
enum Vals {
    U16(arrow_buffer::ScalarBuffer<u16>),
    U32(arrow_buffer::ScalarBuffer<u32>),
}

/// Memory-mapped reader of one block file: batches of whole blocks, from any block index.
pub struct BlockReader {
    batches: Vec<(u64, Vals)>,
    block_len: usize,
    blocks: u64,
    /// Keys the order of the passes after the first (from the file's checksum).
    key: u64,
}

impl BlockReader {
    /// Opens `dir/info.file`, verifying its checksum.
    pub fn open(dir: &Path, info: &BlockFile) -> Result<Self> {
        let path = dir.join(&info.file);
        let actual = sha256_file(&path)?;
        if actual != info.sha256 {
            return Err(PatchError::File {
                path,
                msg: format!("checksum mismatch (manifest {}, file {actual}); rebuild the patch datasets", info.sha256),
            });
        }
        let (_, batches) = map_ipc_file(&path)?;
        let mut out = Vec::new();
        let mut first = 0u64;
        for b in batches {
            let list = b
                .column(0)
                .as_fixed_size_list_opt()
                .ok_or_else(|| PatchError::File { path: path.clone(), msg: "not a fixed-size list column".into() })?;
            if list.value_length() as usize != info.block_len {
                return Err(PatchError::File {
                    path: path.clone(),
                    msg: "block length differs from the manifest".into(),
                });
            }
            let vals = list.values();
            let v = if let Some(a) = vals.as_primitive_opt::<UInt16Type>() {
                Vals::U16(a.values().clone())
            } else if let Some(a) = vals.as_primitive_opt::<UInt32Type>() {
                Vals::U32(a.values().clone())
            } else {
                return Err(PatchError::File { path: path.clone(), msg: "tokens are not uint16/uint32".into() });
            };
            out.push((first, v));
            first += list.len() as u64;
        }
        if first != info.blocks {
            return Err(PatchError::File {
                path,
                msg: format!("holds {first} blocks, the manifest says {}", info.blocks),
            });
        }
        let key =
            info.sha256.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3));
        Ok(Self { batches: out, block_len: info.block_len, blocks: info.blocks, key })
    }

    /// Blocks in the file.
    pub fn num_blocks(&self) -> u64 {
        self.blocks
    }

    /// Tokens per block.
    pub fn block_len(&self) -> usize {
        self.block_len
    }

    /// Appends blocks `first..first + count` of the phase's stream to `out` as a flat
    /// (count, block_len) array. Block `g` of the stream is in pass `g / blocks`: the first pass
    /// reads the file in its (shuffled) order, each later one in an order of its own
    /// ([`permuted_index`] keyed by the file and the pass), as a sampler reshuffling every epoch.
    pub fn read_blocks(&self, first: u64, count: usize, out: &mut Vec<u32>) {
        out.clear();
        out.reserve(count * self.block_len);
        let n = self.blocks.max(1);
        for g in first..first + count as u64 {
            let (pass, j) = (g / n, g % n);
            let blk = if pass == 0 { j } else { permuted_index(j, n, self.key ^ pass) };
            let bi = self.batches.partition_point(|(f, _)| *f <= blk) - 1;
            let (f, vals) = &self.batches[bi];
            let a = (blk - f) as usize * self.block_len;
            match vals {
                Vals::U16(v) => out.extend(v[a..a + self.block_len].iter().map(|&x| x as u32)),
                Vals::U32(v) => out.extend_from_slice(&v[a..a + self.block_len]),
            }
        }
    }
}

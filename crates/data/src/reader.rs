//! Memory-mapped, zero-copy reading of a shard directory.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::ptr::NonNull;
use std::sync::Arc;

use arrow_array::cast::AsArray;
use arrow_array::types::{UInt16Type, UInt32Type};
use arrow_array::Array;
use arrow_buffer::{Buffer, ScalarBuffer};
use arrow_ipc::convert::try_fb_to_schema;
use arrow_ipc::reader::{read_footer_length, FileDecoder};
use arrow_ipc::root_as_footer;

use crate::error::{io_err, DataError, Result};
use crate::shard::{sha256_file, Manifest, ShardInfo, Split, TokenDtype};

/// How a dataset is opened.
#[derive(Debug, Clone)]
pub struct ReaderOptions {
    /// Verify every shard's SHA-256 against the manifest on open (default true).
    pub verify_checksums: bool,
}

impl Default for ReaderOptions {
    fn default() -> Self {
        Self { verify_checksums: true }
    }
}

/// A borrowed run of tokens, in the shard's own dtype (no copy).
#[derive(Debug, Clone, Copy)]
pub enum TokenChunk<'a> {
    /// A uint16 run.
    U16(&'a [u16]),
    /// A uint32 run.
    U32(&'a [u32]),
}

impl TokenChunk<'_> {
    /// Number of tokens.
    pub fn len(&self) -> usize {
        match self {
            TokenChunk::U16(s) => s.len(),
            TokenChunk::U32(s) => s.len(),
        }
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Appends the tokens, widened to u32, to `out`.
    pub fn extend_into(&self, out: &mut Vec<u32>) {
        match self {
            TokenChunk::U16(s) => out.extend(s.iter().map(|&t| t as u32)),
            TokenChunk::U32(s) => out.extend_from_slice(s),
        }
    }

    /// The tokens as an owned u32 vector.
    pub fn to_vec(&self) -> Vec<u32> {
        let mut v = Vec::with_capacity(self.len());
        self.extend_into(&mut v);
        v
    }
}

#[derive(Clone)]
enum Values {
    U16(ScalarBuffer<u16>),
    U32(ScalarBuffer<u32>),
}

impl Values {
    fn chunk(&self, a: usize, b: usize) -> TokenChunk<'_> {
        match self {
            Values::U16(v) => TokenChunk::U16(&v[a..b]),
            Values::U32(v) => TokenChunk::U32(&v[a..b]),
        }
    }
}

/// One record batch: a contiguous run of tokens and its document offsets.
struct Block {
    /// Global index of the block's first token.
    start: u64,
    /// Global index of the block's first document.
    first_doc: u64,
    values: Values,
    /// Document boundaries relative to `values` (len = docs + 1, starting at 0).
    offsets: Vec<usize>,
}

impl Block {
    fn len(&self) -> u64 {
        *self.offsets.last().unwrap_or(&0) as u64
    }
}

/// The token stream of one split: all documents of its shards, concatenated in order.
pub struct TokenStream {
    blocks: Vec<Block>,
    tokens: u64,
    documents: u64,
}

impl TokenStream {
    /// Total tokens.
    pub fn len(&self) -> u64 {
        self.tokens
    }

    /// True when the split holds no tokens.
    pub fn is_empty(&self) -> bool {
        self.tokens == 0
    }

    /// Number of documents.
    pub fn num_documents(&self) -> u64 {
        self.documents
    }

    fn block_of_token(&self, t: u64) -> usize {
        self.blocks.partition_point(|b| b.start + b.len() <= t)
    }

    /// Zero-copy runs covering the global token range `[a, b)`, across shard boundaries.
    pub fn chunks(&self, a: u64, b: u64) -> Result<impl Iterator<Item = TokenChunk<'_>> + '_> {
        if a > b || b > self.tokens {
            return Err(DataError::OutOfRange(format!(
                "token range [{a}, {b}) is outside the split's {} tokens",
                self.tokens
            )));
        }
        let first = self.block_of_token(a);
        Ok(self.blocks[first..].iter().take_while(move |blk| blk.start < b).filter_map(move |blk| {
            let lo = a.max(blk.start) - blk.start;
            let hi = b.min(blk.start + blk.len()) - blk.start;
            (hi > lo).then(|| blk.values.chunk(lo as usize, hi as usize))
        }))
    }

    /// Copies the global token range `[a, b)` into `out` (cleared first), widened to u32.
    pub fn read_into(&self, a: u64, b: u64, out: &mut Vec<u32>) -> Result<()> {
        out.clear();
        out.reserve((b.saturating_sub(a)) as usize);
        for c in self.chunks(a, b)? {
            c.extend_into(out);
        }
        Ok(())
    }

    /// The global token range `[a, b)` as u32.
    pub fn tokens(&self, a: u64, b: u64) -> Result<Vec<u32>> {
        let mut v = Vec::new();
        self.read_into(a, b, &mut v)?;
        Ok(v)
    }

    /// Document `i` (zero-copy).
    pub fn document(&self, i: u64) -> Result<TokenChunk<'_>> {
        if i >= self.documents {
            return Err(DataError::OutOfRange(format!(
                "document {i} is outside the split's {} documents",
                self.documents
            )));
        }
        let bi = self.blocks.partition_point(|b| b.first_doc + (b.offsets.len() as u64 - 1) <= i);
        let blk = &self.blocks[bi];
        let j = (i - blk.first_doc) as usize;
        Ok(blk.values.chunk(blk.offsets[j], blk.offsets[j + 1]))
    }

    /// All documents in order (zero-copy).
    pub fn documents(&self) -> impl Iterator<Item = TokenChunk<'_>> + '_ {
        self.blocks.iter().flat_map(|blk| blk.offsets.windows(2).map(move |w| blk.values.chunk(w[0], w[1])))
    }
}

/// A shard directory opened for reading: the manifest and both splits, memory-mapped.
pub struct Dataset {
    dir: PathBuf,
    manifest: Manifest,
    train: TokenStream,
    val: TokenStream,
}

impl Dataset {
    /// Opens `dir` with default options (checksums verified).
    pub fn open(dir: impl AsRef<Path>) -> Result<Self> {
        Self::open_with(dir, &ReaderOptions::default())
    }

    /// Opens `dir`.
    pub fn open_with(dir: impl AsRef<Path>, opts: &ReaderOptions) -> Result<Self> {
        let dir = dir.as_ref().to_path_buf();
        let manifest = Manifest::load(&dir)?;
        let mut train = TokenStream { blocks: Vec::new(), tokens: 0, documents: 0 };
        let mut val = TokenStream { blocks: Vec::new(), tokens: 0, documents: 0 };
        for info in &manifest.shards {
            let stream = match info.split {
                Split::Train => &mut train,
                Split::Val => &mut val,
            };
            load_shard(&dir, info, manifest.dtype, opts, stream)?;
        }
        Ok(Self { dir, manifest, train, val })
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The manifest.
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// One split's token stream.
    pub fn split(&self, split: Split) -> &TokenStream {
        match split {
            Split::Train => &self.train,
            Split::Val => &self.val,
        }
    }

    /// The training split.
    pub fn train(&self) -> &TokenStream {
        &self.train
    }

    /// The validation split.
    pub fn val(&self) -> &TokenStream {
        &self.val
    }
}

fn load_shard(
    dir: &Path,
    info: &ShardInfo,
    dtype: TokenDtype,
    opts: &ReaderOptions,
    stream: &mut TokenStream,
) -> Result<()> {
    let path = dir.join(&info.file);
    let serr = |msg: String| DataError::Shard { path: path.clone(), msg };
    if !path.is_file() {
        return Err(serr("listed in the manifest but missing; rebuild the shards with `cargo xtask data`".into()));
    }
    if opts.verify_checksums {
        let actual = sha256_file(&path)?;
        if actual != info.sha256 {
            return Err(DataError::Checksum { path, expected: info.sha256.clone(), actual });
        }
    }
    let (schema, batches) = map_ipc_file(&path)?;
    let expected = crate::shard::shard_schema(dtype);
    if schema.fields() != expected.fields() {
        return Err(serr(format!("schema {:?} does not match the manifest's dtype {}", schema.fields(), dtype.name())));
    }
    let (mut rows, mut tokens) = (0u64, 0u64);
    for batch in batches {
        let list = batch.column(0).as_list_opt::<i32>().ok_or_else(|| serr("tokens column is not a list".into()))?;
        let offs = list.value_offsets();
        let (lo, hi) = (offs[0] as usize, offs[offs.len() - 1] as usize);
        let values = match dtype {
            TokenDtype::Uint16 => Values::U16(list.values().as_primitive::<UInt16Type>().values().slice(lo, hi - lo)),
            TokenDtype::Uint32 => Values::U32(list.values().as_primitive::<UInt32Type>().values().slice(lo, hi - lo)),
        };
        let offsets: Vec<usize> = offs.iter().map(|&o| o as usize - lo).collect();
        let n = (hi - lo) as u64;
        let docs = list.len() as u64;
        stream.blocks.push(Block { start: stream.tokens, first_doc: stream.documents, values, offsets });
        stream.tokens += n;
        stream.documents += docs;
        rows += docs;
        tokens += n;
    }
    if rows != info.rows || tokens != info.tokens {
        return Err(serr(format!(
            "holds {rows} documents / {tokens} tokens but the manifest says {} / {}",
            info.rows, info.tokens
        )));
    }
    Ok(())
}

/// Where a record batch's bytes lie in an IPC file, as (offset, length), when they lie after the
/// leading magic (8 bytes) and end at or before the footer; `None` for anything else, negative
/// or overflowing values included.
fn batch_span(block: &arrow_ipc::Block, footer_start: usize) -> Option<(usize, usize)> {
    let off = usize::try_from(block.offset()).ok()?;
    let meta = usize::try_from(block.metaDataLength()).ok()?;
    let body = usize::try_from(block.bodyLength()).ok()?;
    let len = meta.checked_add(body)?;
    (off >= 8 && off.checked_add(len)? <= footer_start).then_some((off, len))
}

/// Memory-maps an Arrow IPC file and decodes its record batches without copying: the arrays'
/// buffers point into the map (kept alive by the arrays). Errors name the file and say when it
/// looks truncated.
pub fn map_ipc_file(path: &Path) -> Result<(arrow_schema::SchemaRef, Vec<arrow_array::RecordBatch>)> {
    let serr = |msg: String| DataError::Shard { path: path.to_path_buf(), msg };
    let file = File::open(path).map_err(io_err(path))?;
    // SAFETY: the map is read-only; files are written once (temp + rename) and never modified in
    // place. A file truncated by another process after this point is outside what we can guard.
    let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(io_err(path))?;
    let len = mmap.len();
    // The file is the leading magic (8 bytes with its padding), the batches, the footer, then
    // the footer's length and the closing magic (10 bytes).
    if len < 8 + 10 {
        return Err(serr(format!("{len} bytes is too short for an Arrow IPC file (truncated?)")));
    }
    let ptr = NonNull::new(mmap.as_ptr() as *mut u8).ok_or_else(|| serr("empty map".into()))?;
    // SAFETY: ptr/len describe the mapping, which the Arc'd owner keeps alive as long as the buffer.
    let buffer = unsafe { Buffer::from_custom_allocation(ptr, len, Arc::new(mmap)) };
    let trailer: [u8; 10] = buffer[len - 10..].try_into().map_err(|_| serr("bad trailer".into()))?;
    let footer_len =
        read_footer_length(trailer).map_err(|e| serr(format!("not an Arrow IPC file (truncated?): {e}")))?;
    if footer_len > len - 8 - 10 {
        return Err(serr("footer length past the start of the file (truncated?)".into()));
    }
    let footer_start = len - 10 - footer_len;
    let footer = root_as_footer(&buffer[footer_start..len - 10]).map_err(|e| serr(format!("bad footer: {e}")))?;
    let fb_schema = footer.schema().ok_or_else(|| serr("footer has no schema".into()))?;
    let schema = Arc::new(try_fb_to_schema(fb_schema).map_err(|e| serr(format!("bad schema: {e}")))?);
    let decoder = FileDecoder::new(schema.clone(), footer.version()).with_require_alignment(true);
    let blocks: Vec<_> = footer.recordBatches().map(|b| b.iter().copied().collect()).unwrap_or_default();
    let mut out = Vec::with_capacity(blocks.len());
    for block in blocks {
        let Some((off, block_len)) = batch_span(&block, footer_start) else {
            return Err(serr("a record batch lies outside the file's data, before its footer (truncated?)".into()));
        };
        let data = buffer.slice_with_length(off, block_len);
        let batch = decoder
            .read_record_batch(&block, &data)
            .map_err(|e| serr(format!("cannot decode a record batch: {e}")))?
            .ok_or_else(|| serr("empty record batch".into()))?;
        out.push(batch);
    }
    Ok((schema, out))
}

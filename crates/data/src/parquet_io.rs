//! Parquet export and import of shard directories, for compressed interchange.
//!
//! An exported directory holds `<split>-NNNNN.parquet` (zstd, the same `tokens` list column),
//! `tokenizer.json` and `manifest.json` whose shard entries name the Parquet files. Importing it
//! writes Arrow shards again; the tokens, documents and splits are identical.

use std::fs::File;
use std::path::Path;
use std::sync::Arc;

use arrow_array::cast::AsArray;
use arrow_array::types::{UInt16Type, UInt32Type};
use arrow_array::{Array, ArrayRef, ListArray, RecordBatch, UInt16Array, UInt32Array};
use arrow_buffer::OffsetBuffer;
use arrow_schema::Field;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::properties::WriterProperties;

use crate::error::{io_err, DataError, Result};
use crate::reader::{Dataset, ReaderOptions, TokenChunk};
use crate::shard::{sha256_file, shard_schema, Manifest, ShardInfo, ShardWriter, Split, TokenDtype, TOKENIZER_FILE};

const ROWS_PER_GROUP: usize = 8192;

fn perr(path: &Path) -> impl Fn(parquet::errors::ParquetError) -> DataError + '_ {
    move |e| DataError::Parquet { path: path.to_path_buf(), msg: e.to_string() }
}

/// Exports the shard directory `src` as Parquet into `dst`.
pub fn export_parquet(src: &Path, dst: &Path) -> Result<Manifest> {
    let ds = Dataset::open_with(src, &ReaderOptions::default())?;
    std::fs::create_dir_all(dst).map_err(io_err(dst))?;
    let mut manifest = ds.manifest().clone();
    let dtype = manifest.dtype;
    let schema = shard_schema(dtype);
    let mut shards = Vec::new();
    for split in [Split::Train, Split::Val] {
        let stream = ds.split(split);
        if stream.num_documents() == 0 {
            continue;
        }
        let file = format!("{}-00000.parquet", split.name());
        let path = dst.join(&file);
        let props = WriterProperties::builder()
            .set_compression(Compression::ZSTD(ZstdLevel::try_new(3).map_err(perr(&path))?))
            .build();
        let tmp = dst.join(format!("{file}.tmp"));
        let f = File::create(&tmp).map_err(io_err(&tmp))?;
        let mut w = ArrowWriter::try_new(f, schema.clone(), Some(props)).map_err(perr(&path))?;
        let docs: Vec<TokenChunk<'_>> = stream.documents().collect();
        for group in docs.chunks(ROWS_PER_GROUP) {
            let mut offsets = vec![0i32];
            let mut values = Vec::new();
            for d in group {
                d.extend_into(&mut values);
                offsets.push(values.len() as i32);
            }
            let arr: ArrayRef = match dtype {
                TokenDtype::Uint16 => Arc::new(UInt16Array::from_iter_values(values.iter().map(|&t| t as u16))),
                TokenDtype::Uint32 => Arc::new(UInt32Array::from_iter_values(values)),
            };
            let list = ListArray::try_new(
                Arc::new(Field::new("item", dtype.arrow(), false)),
                OffsetBuffer::new(offsets.into()),
                arr,
                None,
            )
            .map_err(|e| DataError::Parquet { path: path.clone(), msg: e.to_string() })?;
            let batch = RecordBatch::try_new(schema.clone(), vec![Arc::new(list)])
                .map_err(|e| DataError::Parquet { path: path.clone(), msg: e.to_string() })?;
            w.write(&batch).map_err(perr(&path))?;
        }
        let f = w.into_inner().map_err(perr(&path))?;
        f.sync_all().map_err(io_err(&tmp))?;
        std::fs::rename(&tmp, &path).map_err(io_err(&path))?;
        shards.push(ShardInfo {
            split,
            file,
            rows: stream.num_documents(),
            tokens: stream.len(),
            bytes: path.metadata().map_err(io_err(&path))?.len(),
            sha256: sha256_file(&path)?,
        });
    }
    std::fs::copy(src.join(TOKENIZER_FILE), dst.join(TOKENIZER_FILE)).map_err(io_err(dst.join(TOKENIZER_FILE)))?;
    manifest.shards = shards;
    manifest.save(dst)?;
    Ok(manifest)
}

/// Imports a directory written by [`export_parquet`] into Arrow shards in `dst`.
pub fn import_parquet(src: &Path, dst: &Path, shard_mb: u64) -> Result<Manifest> {
    let manifest = Manifest::load(src)?;
    std::fs::create_dir_all(dst).map_err(io_err(dst))?;
    let mut out = manifest.clone();
    out.shards.clear();
    for split in [Split::Train, Split::Val] {
        let mut w = ShardWriter::new(dst, split, manifest.dtype, manifest.vocab_size, shard_mb.max(1) << 20);
        for info in manifest.shards.iter().filter(|s| s.split == split) {
            let path = src.join(&info.file);
            let actual = sha256_file(&path)?;
            if actual != info.sha256 {
                return Err(DataError::Checksum { path, expected: info.sha256.clone(), actual });
            }
            let f = File::open(&path).map_err(io_err(&path))?;
            let reader =
                ParquetRecordBatchReaderBuilder::try_new(f).map_err(perr(&path))?.build().map_err(perr(&path))?;
            let mut doc = Vec::new();
            for batch in reader {
                let batch = batch.map_err(|e| DataError::Parquet { path: path.clone(), msg: e.to_string() })?;
                let col = batch.column_by_name("tokens").and_then(|c| c.as_list_opt::<i32>()).ok_or_else(|| {
                    DataError::Parquet { path: path.clone(), msg: "no list column \"tokens\"".into() }
                })?;
                for i in 0..col.len() {
                    let v = col.value(i);
                    doc.clear();
                    match manifest.dtype {
                        TokenDtype::Uint16 => {
                            doc.extend(v.as_primitive::<UInt16Type>().values().iter().map(|&t| t as u32))
                        }
                        TokenDtype::Uint32 => doc.extend_from_slice(v.as_primitive::<UInt32Type>().values()),
                    }
                    w.push(&doc)?;
                }
            }
        }
        out.shards.extend(w.finish()?);
    }
    std::fs::copy(src.join(TOKENIZER_FILE), dst.join(TOKENIZER_FILE)).map_err(io_err(dst.join(TOKENIZER_FILE)))?;
    out.save(dst)?;
    Ok(out)
}

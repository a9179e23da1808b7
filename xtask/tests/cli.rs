//! End to end through the CLI, as a user runs it: data → pretrain (patch phase, token phase)
//! → HF model → score / generate, on a tiny corpus the test writes.

#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::Command;

fn xtask(args: &[&str], cwd: &Path) -> (bool, String) {
    xtask_env(args, cwd, None)
}

/// `xtask` with `PATCHLM_LOG_SECS` (progress lines in a log) set to `log_secs`, or unset.
fn xtask_env(args: &[&str], cwd: &Path, log_secs: Option<&str>) -> (bool, String) {
    let mut c = Command::new(env!("CARGO_BIN_EXE_xtask"));
    c.args(args).current_dir(cwd).env_remove("PATCHLM_LOG_SECS");
    if let Some(secs) = log_secs {
        c.env("PATCHLM_LOG_SECS", secs);
    }
    let out = c.output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

/// The run config of the tiny CLI runs.
fn tiny_config(micro_batch: usize, eval_every: usize, checkpoint_every: usize) -> String {
    format!(
        "preset = \"tiny\"\n[data]\nval_fraction = 0.1\n[data.tokenizer]\nvocab_size = 320\n[blocks]\ncontext = 16\n\
         max_val_blocks = 8\n[train]\ntokens_per_step = 256\nmicro_batch = {micro_batch}\nlr = 3e-3\nwarmup_steps = 2\n\
         eval_every = {eval_every}\ncheckpoint_every = {checkpoint_every}\nprogress = false\n"
    )
}

/// The shard folders (`shards-<hash>`) a data directory caches, in name order.
fn shard_dirs_in(data_dir: &Path) -> Vec<std::path::PathBuf> {
    let mut dirs: Vec<_> = std::fs::read_dir(data_dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.file_name().unwrap().to_string_lossy().starts_with("shards-"))
        .collect();
    dirs.sort();
    dirs
}

/// A JSON file the CLI wrote.
fn read_json(path: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The JSON object that `score --json` prints after any log lines (null where there is none).
fn printed_json(out: &str) -> serde_json::Value {
    out.find('{').and_then(|i| serde_json::from_str(&out[i..]).ok()).unwrap_or_default()
}

#[test]
fn pretrain_end_to_end_on_a_tiny_corpus() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut s = String::new();
    for i in 0..600 {
        let words: Vec<String> = (0..50).map(|j| format!("w{}", (i * 7 + j * 13) % 53)).collect();
        s += &serde_json::json!({"text": words.join(" ")}).to_string();
        s.push('\n');
    }
    std::fs::write(d.join("tiny.jsonl"), s).unwrap();
    std::fs::write(d.join("run.toml"), tiny_config(4, 5, 4)).unwrap();

    // Standalone data stage.
    let (ok, out) = xtask(&["data", "--input", "tiny.jsonl", "--out", "shards", "--vocab-size", "320"], d);
    assert!(ok, "{out}");
    assert!(out.contains("documents      600"), "{out}");
    // 53 words hold fewer pairs to merge than 320 ids need (said so below, on fewer words), but
    // enough for 280: a vocabulary of the size asked is just its size.
    let (ok, out) = xtask(&["data", "--input", "tiny.jsonl", "--out", "shards280", "--vocab-size", "280"], d);
    assert!(ok && out.contains("  vocabulary     280\n"), "{out}");
    // Nothing skipped or replaced, both splits filled, nothing kept of an earlier build: no line
    // says otherwise.
    for quiet in ["skipped", "replaced", "warning", "kept"] {
        assert!(!out.contains(quiet), "{out}");
    }
    // Empty documents are skipped, and stray bytes replaced where asked: each counted.
    let mixed: String = (0..40)
        .map(|i| format!("{{\"text\": \"{}\"}}\n", if i % 20 == 0 { String::new() } else { format!("w{i} w3") }))
        .collect();
    std::fs::write(d.join("mixed.jsonl"), mixed).unwrap();
    std::fs::write(d.join("bad.txt"), b"w1 w2 \xff w3 \xfe\xfe w4\n").unwrap();
    let args = ["data", "--input", "mixed.jsonl", "bad.txt", "--out", "mixed", "--vocab-size", "270"];
    let (ok, out) = xtask(&[&args[..], &["--invalid-utf8", "replace"]].concat(), d);
    assert!(ok && out.contains("  skipped        2 empty documents\n"), "{out}");
    assert!(out.contains("  replaced       3 invalid utf-8 sequences with U+FFFD\n"), "{out}");
    // Stderr is no terminal here (as in a batch job's log): no bar, and no line within a minute.
    assert!(!out.contains("tokenize: "), "{out}");
    // A file named twice is read twice, with a warning.
    let args = ["data", "--input", "tiny.jsonl", "./tiny.jsonl", "--out", "twice", "--vocab-size", "320"];
    let (ok, out) = xtask(&args, d);
    assert!(ok && out.contains("documents      1200") && out.contains("is read more than once"), "{out}");
    // A split left empty is warned about, either one.
    std::fs::write(d.join("one.txt"), "w1 w2 w3 w4").unwrap();
    for (vf, want) in [("0", "no document fell in the validation split"), ("0.9999", "none in the training split")] {
        let out_dir = format!("one-{vf}");
        let args = ["data", "--input", "one.txt", "--out", &out_dir, "--vocab-size", "320", "--val-fraction", vf];
        let (ok, out) = xtask(&args, d);
        assert!(ok && out.contains(want), "{out}");
        // Four words hold few pairs to merge: the vocabulary falls short of the size asked, said so.
        assert!(out.contains("(of 320 asked: the text has no more pairs"), "{out}");
    }

    // Settings wrong on their own are refused before the data stage (which can take hours on a
    // large corpus): no shards are made, no run directory; so is a compare with such a K.
    let bad = [
        vec!["pretrain", "--set", "train.tokens_per_step=250", "--out", "run-bad"],
        vec!["compare", "--k", "3", "--out", "cmp-bad"],
    ];
    for extra in bad {
        let args: Vec<&str> = extra
            .iter()
            .copied()
            .chain(["--config", "run.toml", "--input", "tiny.jsonl", "--data-dir", "dd-bad"])
            .collect();
        let (ok, out) = xtask(&args, d);
        assert!(!ok && out.contains("is not divisible by the patch-phase block"), "{out}");
        assert!(!d.join("dd-bad").exists() && !d.join("run-bad").exists() && !d.join("cmp-bad").exists(), "{out}");
    }

    let args = ["pretrain", "--config", "run.toml", "--input", "tiny.jsonl", "--out", "run", "--data-dir", "dd"];
    let (ok, out) = xtask(&args, d);
    assert!(ok, "{out}");
    assert!(out.contains("patch phase  K=4") && out.contains("token phase  K=1"), "{out}");
    // The throughput ratio of the phases' median tokens/s, as summary.json keeps them.
    let phases = read_json(&d.join("run/summary.json"))["summary"]["phases"].clone();
    let tps = |i: usize| phases[i]["tokens_per_sec"].as_f64().unwrap();
    assert!(out.contains(&format!("patch/token throughput ratio {:.2} (K = 4)", tps(0) / tps(1))), "{out}");
    assert!(!out.contains("warmup_steps"), "{out}");
    assert!(out.contains("next: cargo xtask generate --model run --prompt"), "{out}");
    assert!(out.contains("validation loss"), "{out}");
    for f in [
        "config.toml",
        "metrics.jsonl",
        "summary.json",
        "model/config.json",
        "model/model.safetensors",
        "model/tokenizer.json",
    ] {
        assert!(d.join("run").join(f).is_file(), "missing {f}");
    }
    // The loss plot: validation loss and each phase's training loss, the switch marked.
    let png = std::fs::read(d.join("run/loss.png")).unwrap();
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    let svg = std::fs::read_to_string(d.join("run/loss.svg")).unwrap();
    for label in [
        "Loss of run run",
        "validation loss (token level)",
        "training loss, patch phase (mean over the K=4 tokens of the next patch)",
        "training loss, token phase",
        "patch → token switch",
        "training tokens",
    ] {
        assert!(svg.contains(label), "loss.svg lacks {label}");
    }
    assert!(svg.matches("<polyline").count() >= 3);
    // The token phase predicts one token: no mean over K is named for it.
    assert!(!svg.contains("K=1 tokens"), "{svg}");
    assert!(!d.join("run/.loss.tmp.png").exists() && !d.join("run/.loss.tmp.svg").exists());
    // The saved config is fully resolved and loads back as the run's config.
    let saved = std::fs::read_to_string(d.join("run/config.toml")).unwrap();
    assert!(saved.contains("lambda") && saved.contains("vocab_size = 320"), "{saved}");
    // It names its inputs and explains each key.
    // It names its inputs (by absolute path: it repeats the run from any directory) and explains
    // each key.
    let tiny = std::path::absolute(d.join("tiny.jsonl")).unwrap();
    let named = toml::to_string(&toml::toml! { input = [(tiny.to_str().unwrap())] }).unwrap();
    assert!(saved.contains(&named) && saved.contains("# Peak learning rate"), "{saved}");
    // Validation loss fell.
    let evals: Vec<f64> = std::fs::read_to_string(d.join("run/metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v["kind"] == "eval")
        .map(|v| v["val_loss"].as_f64().unwrap())
        .collect();
    assert!(evals.last().unwrap() < &(evals[0] - 0.5), "{evals:?}");

    // Shards are cached by settings and input contents: an edited input is re-tokenized.
    let shard_dirs = || shard_dirs_in(&d.join("dd")).len();
    assert_eq!(shard_dirs(), 1);
    // `--config` of the saved config repeats the run: the same text (so the same shards) and
    // the same settings give the same model (the saved config used to leave the inputs out, so
    // that this trained on the default corpus).
    let weights = |r: &str| std::fs::read(d.join(r).join("model/model.safetensors")).unwrap();
    let (ok, out) = xtask(&["pretrain", "--config", "run/config.toml", "--out", "rerun", "--data-dir", "dd"], d);
    assert!(ok, "{out}");
    assert_eq!(shard_dirs(), 1);
    // From another directory too (shards are keyed by the inputs' canonical paths, so these
    // are the same shards).
    std::fs::create_dir(d.join("elsewhere")).unwrap();
    let (ok, out) = xtask(
        &[
            "pretrain",
            "--config",
            "../run/config.toml",
            "--out",
            "../rerun2",
            "--data-dir",
            "../dd",
            "--set",
            "train.progress=true",
        ],
        &d.join("elsewhere"),
    );
    assert!(ok, "{out}");
    // With progress on and no terminal (a batch job's log), each validation is a line.
    let evals = std::fs::read_to_string(d.join("run/metrics.jsonl")).unwrap().matches("\"kind\":\"eval\"").count();
    assert_eq!(out.matches(": validation loss ").count(), evals, "{out}");
    assert!(out.contains("patch step      0/") && out.contains("token step "), "{out}");
    assert_eq!(shard_dirs(), 1);
    assert!(weights("run") == weights("rerun2"), "the run repeated elsewhere trained another model");
    assert!(weights("run") == weights("rerun"), "the repeated run trained another model");
    // Shards an earlier revision of the data stage made (as after an update that changed what
    // it makes of these inputs) are made again in place, not reused: here the same shards again.
    let cached = shard_dirs_in(&d.join("dd")).remove(0);
    let manifest = cached.join("manifest.json");
    let mut v = read_json(&manifest);
    v["build_revision"] = 0.into();
    std::fs::write(&manifest, serde_json::to_vec_pretty(&v).unwrap()).unwrap();
    let (ok, out) = xtask(&["pretrain", "--config", "run/config.toml", "--out", "rerun3", "--data-dir", "dd"], d);
    assert!(ok, "{out}");
    assert!(
        out.contains(&format!("shards in {}", std::path::Path::new("dd").join(cached.file_name().unwrap()).display())),
        "{out}"
    );
    assert!(patchlm_data::Manifest::load(&cached).unwrap().is_current());
    assert_eq!(shard_dirs(), 1);
    assert!(weights("run") == weights("rerun3"), "the shards made again trained another model");
    // Another build written over the cached folder (`data --out` naming it) is not taken for
    // this run's: its shards are made again.
    let other: Vec<String> =
        (0..60).map(|i| serde_json::json!({ "text": format!("other text number {i} here") }).to_string()).collect();
    std::fs::write(d.join("other.jsonl"), other.join("\n")).unwrap();
    let over = cached.to_str().unwrap();
    let (ok, out) = xtask(&["data", "--input", "other.jsonl", "--out", over, "--vocab-size", "280"], d);
    assert!(ok, "{out}");
    let (ok, out) = xtask(&["pretrain", "--config", "run/config.toml", "--out", "rerun4", "--data-dir", "dd"], d);
    assert!(ok && out.contains("shards in "), "{out}");
    assert_eq!(shard_dirs(), 1);
    assert!(weights("run") == weights("rerun4"), "a run trained on the shards written over its cache");

    // --resume on a finished run trains nothing more and reports the same model.
    let mut resume = args.to_vec();
    resume.push("--resume");
    // Nor does it cut the blocks again from the same shards with the same settings.
    let cut = || std::fs::metadata(d.join("run/patchdata/patch_manifest.json")).unwrap().modified().unwrap();
    let cut_before = cut();
    let (ok, out) = xtask(&resume, d);
    assert!(ok, "{out}");
    assert_eq!(cut(), cut_before, "a resume cut the blocks again");
    // Its summary has no phase trained here: no phase's line, no throughput ratio (of nothing).
    assert!(out.contains("run summary (K=4") && !out.contains("phase  K=") && !out.contains("ratio"), "{out}");
    // Without --resume, an existing run is refused with advice.
    let (ok, out) = xtask(&args, d);
    assert!(!ok && out.contains("--resume"), "{out}");
    // A run directory that another process's run holds (here this test's) is refused, the
    // holder named, before anything there is written: a second `--resume` of a live run.
    let files = ["metrics.jsonl", "config.toml", "model/model.safetensors"];
    let before: Vec<Vec<u8>> = files.iter().map(|f| std::fs::read(d.join("run").join(f)).unwrap()).collect();
    let held = std::fs::OpenOptions::new().write(true).open(d.join("run/.lock")).unwrap();
    held.lock().unwrap();
    std::fs::write(d.join("run/.lock"), std::process::id().to_string()).unwrap();
    let (ok, out) = xtask(&resume, d);
    let holder = format!("in use by another run (process {})", std::process::id());
    assert!(!ok && out.contains(&holder), "{out}");
    for (f, bytes) in files.iter().zip(&before) {
        assert_eq!(&std::fs::read(d.join("run").join(f)).unwrap(), bytes, "{f} changed");
    }
    drop(held);
    // --set overrides, and bad values fail before training with a clear message.
    let (ok, out) = xtask(
        &[
            "pretrain",
            "--config",
            "run.toml",
            "--input",
            "tiny.jsonl",
            "--out",
            "bad",
            "--data-dir",
            "dd",
            "--set",
            "patch.lambda=1.5",
        ],
        d,
    );
    assert!(!ok && out.contains("lambda must be in [0, 1)"), "{out}");
    assert!(!d.join("bad/metrics.jsonl").exists());
    // A run over a given tokenizer whose input is then edited: the same tokenizer, other shards.
    // The blocks are cut again from the new shards, and --resume refuses the checkpoints of the
    // old ones (it used to go on over the blocks of the old text).
    std::fs::copy(d.join("tiny.jsonl"), d.join("given.jsonl")).unwrap();
    let given: Vec<&str> = ["pretrain", "--config", "run.toml", "--input", "given.jsonl", "--out", "given"]
        .into_iter()
        .chain(["--data-dir", "dd", "--set", "data.tokenizer.file=shards/tokenizer.json"])
        .chain(["--set", "train.warmup_steps=1000"])
        .collect();
    let (ok, out) = xtask(&given, d);
    assert!(ok, "{out}");
    // A warmup longer than a phase is capped at it, and said so (twice: both phases).
    assert_eq!(out.matches("note: train.warmup_steps 1000 is longer than this phase").count(), 2, "{out}");
    let text = std::fs::read_to_string(d.join("given.jsonl")).unwrap();
    std::fs::write(d.join("given.jsonl"), text.replace("w1 ", "w2 ")).unwrap();
    let cut_from = || {
        let m = read_json(&d.join("given/patchdata/patch_manifest.json"));
        m["shards_manifest_sha256"].as_str().unwrap().to_string()
    };
    let old_shards = cut_from();
    let (ok, out) = xtask(&[&given[..], &["--resume"]].concat(), d);
    assert!(!ok && out.contains("was trained on other data"), "{out}");
    // The blocks were cut again, from the new shards (whose identity the data crate gives).
    let new_shards = cut_from();
    let identities: Vec<String> =
        shard_dirs_in(&d.join("dd")).iter().map(|p| patchlm_data::shard::shards_identity(p).unwrap()).collect();
    assert!(new_shards != old_shards && identities.contains(&new_shards), "{old_shards} {new_shards} {identities:?}");
    let (ok, out) = xtask(
        &[
            "pretrain",
            "--config",
            "run.toml",
            "--input",
            "tiny.jsonl",
            "--out",
            "bad",
            "--data-dir",
            "dd",
            "--set",
            "blocks.context=100000",
            "--set",
            "train.tokens_per_step=400000",
        ],
        d,
    );
    assert!(!ok && out.contains("do not fill one block"), "{out}");

    // Score and generate with the trained model.
    let (ok, out) = xtask(&["score", "--model", "run/model", "--text", "w1 w14 w27", "--json"], d);
    assert!(ok, "{out}");
    let v = printed_json(&out);
    let lps: Vec<f64> = v["tokens"].as_array().unwrap().iter().map(|t| t["logprob"].as_f64().unwrap()).collect();
    assert!(lps.iter().all(|&x| x <= 0.0));
    assert!((v["nll"].as_f64().unwrap() + lps.iter().sum::<f64>()).abs() < 1e-3);
    // One byte is one token, scored after BOS; no text is nothing to score.
    let (ok, out) = xtask(&["score", "--model", "run/model", "--text", "w", "--json"], d);
    let v = printed_json(&out);
    assert!(ok && v["tokens"].as_array().map(Vec::len) == Some(1), "{out}");
    let (ok, out) = xtask(&["score", "--model", "run/model", "--text", ""], d);
    assert!(!ok && out.contains("the text has no token to score"), "{out}");
    // Each token shows the text it adds, so they add up to the text, a character cut across
    // tokens (the byte-level BPE never saw these) at its last token.
    let text = "w1 naïve 🤗 w14";
    let (ok, out) = xtask(&["score", "--model", "run/model", "--text", text, "--json"], d);
    assert!(ok, "{out}");
    let v = printed_json(&out);
    let pieces: String = v["tokens"].as_array().unwrap().iter().map(|t| t["token"].as_str().unwrap()).collect();
    assert_eq!(pieces, text);
    let (ok, out) =
        xtask(&["generate", "--model", "run/model", "--prompt", "w1", "--max-tokens", "8", "--seed", "3"], d);
    assert!(ok && out.starts_with("w1"), "{out}");
    let (ok2, out2) =
        xtask(&["generate", "--model", "run/model", "--prompt", "w1", "--max-tokens", "8", "--seed", "3"], d);
    assert!(ok2 && out == out2, "same seed, same text");
    // All 8 tokens drawn: nothing to say of the context.
    assert!(!out.contains("stopped after"), "{out}");
    // Without a limit that comes first, a continuation stops where the model's context of 64
    // positions is full (BOS and the prompt's one token, then 62), and says so; unless it draws
    // its end of text first, as some seeds may.
    let full = (1..=5).any(|seed| {
        let seed = seed.to_string();
        let args = ["generate", "--model", "run/model", "--prompt", "w1", "--max-tokens", "1000", "--seed", &seed];
        let (ok, out) = xtask(&args, d);
        assert!(ok, "{out}");
        out.contains("stopped after 62 tokens: prompt and continuation fill the model's context of 64")
    });
    assert!(full, "no seed's continuation of five filled the context");
    // A run's directory stands for its final model; a checkpoint loads as a model too.
    let (ok, by_run) = xtask(&["score", "--model", "run", "--text", "w1 w14 w27", "--json"], d);
    let (_, by_model) = xtask(&["score", "--model", "run/model", "--text", "w1 w14 w27", "--json"], d);
    assert!(ok && by_run == by_model, "{by_run}");
    let ck = std::fs::read_dir(d.join("run/checkpoints")).unwrap().flatten().map(|e| e.path()).max().unwrap();
    let (ok, out) = xtask(&["generate", "--model", ck.to_str().unwrap(), "--prompt", "w1", "--max-tokens", "4"], d);
    assert!(ok && out.starts_with("w1"), "{out}");
    // Text longer than the context: scored in sliding windows, every token once; a prompt that
    // fills the context is refused with what to do, and so is a temperature below 0.
    let long: Vec<String> = (0..60).map(|i| format!("w{}", i % 47)).collect();
    let long = long.join(" ");
    let (ok, out) = xtask(&["score", "--model", "run/model", "--text", &long, "--json", "--stride", "3"], d);
    assert!(ok, "{out}");
    let v = printed_json(&out);
    assert!(v["tokens"].as_array().unwrap().len() >= 60, "{out}");
    // eval --text scores a document as score scores its text (after BOS, no EOS), with the
    // document's bytes and words.
    std::fs::write(d.join("long.jsonl"), format!("{}\n", serde_json::json!({ "text": long }))).unwrap();
    let (ok, out) = xtask(
        &["eval", "--model", "run/model", "--text", "long.jsonl", "--stride", "3", "--json", "long-eval.json"],
        d,
    );
    assert!(ok && out.contains("word ppl"), "{out}");
    // A --json that cannot be written is refused before the evaluation, not after it.
    std::fs::create_dir(d.join("results")).unwrap();
    for (json, want) in [("results", "--json results: is a folder"), ("nowhere/e.json", "there is no folder nowhere")] {
        let (ok, out) = xtask(&["eval", "--model", "run/model", "--text", "long.jsonl", "--json", json], d);
        assert!(!ok && out.contains(want) && !out.contains("word ppl"), "{out}");
    }
    let e = read_json(&d.join("long-eval.json"));
    let p = &e["perplexity"];
    assert_eq!(
        (p["tokens"].as_u64(), p["bytes"].as_u64(), p["words"].as_u64()),
        (v["tokens"].as_array().map(|t| t.len() as u64), Some(long.len() as u64), Some(60))
    );
    assert!(
        (p["nll"].as_f64().unwrap() - v["nll"].as_f64().unwrap()).abs() < 1e-6 * p["nll"].as_f64().unwrap(),
        "{p} vs {}",
        v["nll"]
    );
    assert!(
        (p["word_perplexity"].as_f64().unwrap() - (p["nll"].as_f64().unwrap() / 60.0).exp()).abs()
            < 1e-6 * p["word_perplexity"].as_f64().unwrap()
    );
    // The same text under another field (--text-field, as `data` takes it; the error without it
    // used to name a flag eval did not have), and as one paragraph of a text file of three
    // (--sample-by paragraph): the same scores.
    std::fs::write(d.join("content.jsonl"), format!("{}\n", serde_json::json!({ "content": long }))).unwrap();
    let (ok, out) = xtask(&["eval", "--model", "run/model", "--text", "content.jsonl", "--stride", "3"], d);
    assert!(!ok && out.contains("with --text-field (data.source.text_field in a pretrain config)"), "{out}");
    std::fs::write(d.join("paras.txt"), format!("{long}\n\n{long}\n\n\n{long}\n")).unwrap();
    for (input, flags) in [("content.jsonl", ["--text-field", "content"]), ("paras.txt", ["--sample-by", "paragraph"])]
    {
        let args = ["eval", "--model", "run/model", "--text", input, "--stride", "3", "--json", "other.json"];
        let (ok, out) = xtask(&[&args[..], &flags[..]].concat(), d);
        assert!(ok, "{out}");
        let o = read_json(&d.join("other.json"));
        let q = &o["perplexity"];
        let n = if input == "paras.txt" { 3 } else { 1 };
        assert_eq!((q["documents"].as_u64(), q["tokens"].as_u64()), (Some(n), p["tokens"].as_u64().map(|t| t * n)));
        assert!((q["nll"].as_f64().unwrap() - n as f64 * p["nll"].as_f64().unwrap()).abs() < 1e-5, "{q} vs {p}");
    }
    let (ok, out) = xtask(&["generate", "--model", "run/model", "--prompt", &long], d);
    assert!(!ok && out.starts_with("Error: the prompt has ") && out.contains("shorten the prompt"), "{out}");
    let (ok, out) = xtask(&["generate", "--model", "run/model", "--prompt", "w1", "--temperature=-1"], d);
    // Refused before the prompt is printed: the error is all there is.
    assert!(!ok && out.starts_with("Error: temperature -1 is out of range"), "{out}");

    // In a batch job's log long work says how far it is each PATCHLM_LOG_SECS seconds (0: at
    // every step), each stage in its own words; a value that is not seconds is refused up front.
    let args = ["data", "--input", "tiny.jsonl", "--out", "logged", "--vocab-size", "320"];
    let (ok, out) = xtask_env(&args, d, Some("0"));
    assert!(ok, "{out}");
    for line in ["bpe train: ", "bpe merges from ", "tokenize: "] {
        assert!(out.lines().any(|l| l.starts_with(line) && (line.contains("merges") || l.contains("%), "))), "{out}");
    }
    let args = ["pretrain", "--config", "run.toml", "--input", "tiny.jsonl", "--out", "run-logged", "--data-dir", "dd"];
    let (ok, out) = xtask_env(&[&args[..], &["--set", "train.progress=true"]].concat(), d, Some("0"));
    assert!(ok, "{out}");
    let summary = read_json(&d.join("run-logged/summary.json"));
    for phase in summary["summary"]["phases"].as_array().unwrap() {
        let (name, steps) = (phase["name"].as_str().unwrap(), phase["steps"].as_u64().unwrap());
        // A line at every step.
        let lines =
            out.lines().filter(|l| l.trim_start().starts_with(&format!("{name} step")) && l.contains("phase eta"));
        assert_eq!(lines.count() as u64, steps, "{name}: {out}");
    }
    let args = ["eval", "--model", "run/model", "--text", "paras.txt", "--sample-by", "paragraph", "--stride", "3"];
    let (ok, out) = xtask_env(&args, d, Some("0"));
    assert!(
        ok && ["1 document,", "2 documents,", "3 documents,"].iter().all(|n| out.contains(&format!("text: {n} "))),
        "{out}"
    );
    let (ok, out) = xtask_env(&args, d, Some("soon"));
    assert!(!ok && out.contains("PATCHLM_LOG_SECS=\"soon\" is not a number of seconds"), "{out}");
}

/// SIGTERM (a scheduler preempting the job) or Ctrl-C while a run trains stops it after the step
/// at hand, with a checkpoint there, and says to resume; the loss plot shows where it got to.
#[cfg(unix)]
#[test]
fn a_signal_stops_a_run_after_its_step_with_a_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let lines: String =
        (0..300).map(|i| format!("{{\"text\": \"note {i} of the tiny corpus, w{} w{}\"}}\n", i % 7, i % 11)).collect();
    std::fs::write(d.join("tiny.jsonl"), lines).unwrap();
    // Checkpoints only at a phase's end, many steps (epochs): a stop's checkpoint is its own.
    std::fs::write(d.join("run.toml"), tiny_config(4, 100_000, 100_000)).unwrap();
    let args = ["pretrain", "--config", "run.toml", "--input", "tiny.jsonl", "--out", "run", "--data-dir", "dd"];
    let child = Command::new(env!("CARGO_BIN_EXE_xtask"))
        .args(args)
        .args(["--set", "blocks.epochs=40"])
        .current_dir(d)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(300);
    while !std::fs::read_to_string(d.join("run/metrics.jsonl")).is_ok_and(|m| m.contains("\"kind\":\"step\"")) {
        assert!(std::time::Instant::now() < deadline, "the run made no step");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    // The loss plot is drawn while the run trains, first at its validation before step 1 (with
    // no training loss yet).
    while !d.join("run/loss.svg").is_file() {
        assert!(std::time::Instant::now() < deadline, "no loss plot while training");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let kill = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    assert!(kill.success());
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("stopped on request after step") && err.contains("--resume"),
        "{err}"
    );
    let checkpoints: Vec<String> = std::fs::read_dir(d.join("run/checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(checkpoints.len(), 1, "{checkpoints:?}");
    assert!(err.contains(&checkpoints[0]), "{err}");
    assert!(d.join("run/loss.png").is_file() && !d.join("run/model").exists());
    // Drawn again once stopped: it shows the steps trained before the stop.
    let svg = std::fs::read_to_string(d.join("run/loss.svg")).unwrap();
    assert!(svg.contains("training loss, patch phase"), "{svg}");
}

#[test]
fn compare_end_to_end_on_a_tiny_corpus() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // Multi-line documents, so the held-out continuation task has lines to draw.
    let mut s = String::new();
    for i in 0..300 {
        let lines: Vec<String> = (0..10)
            .map(|l| (0..7).map(|j| format!("w{}", (i * 7 + l * 5 + j * 13) % 47)).collect::<Vec<_>>().join(" "))
            .collect();
        s += &serde_json::json!({"text": lines.join("\n")}).to_string();
        s.push('\n');
    }
    std::fs::write(d.join("tiny.jsonl"), s).unwrap();
    std::fs::write(d.join("run.toml"), tiny_config(8, 10, 20)).unwrap();
    let base = ["compare", "--config", "run.toml", "--input", "tiny.jsonl", "--data-dir", "dd", "--out", "cmp"];
    let with = |extra: &[&'static str]| -> Vec<&str> { base.iter().copied().chain(extra.iter().copied()).collect() };
    let args = with(&["--continuation-examples", "40"]);
    let (ok, out) = xtask(&args, d);
    assert!(ok, "{out}");
    // On the --input given, not the default corpus.
    assert!(!d.join("dd/corpus").exists(), "{out}");
    // Each run's summary names its setting; a baseline's has no K.
    assert_eq!(out.matches("run summary (token level: lambda 0)").count(), 2, "{out}");
    assert_eq!(out.matches("run summary (K=4, lambda=0.667)").count(), 1, "{out}");
    for f in [
        "report.md",
        "report.json",
        "continuation.jsonl",
        "loss_vs_compute.png",
        "loss_vs_compute.svg",
        "loss_vs_tokens.png",
        "loss_vs_tokens.svg",
        "loss_vs_time.png",
        "loss_vs_time.svg",
        "runs/baseline/summary.json",
        "runs/patch-k4-l0.667/summary.json",
        "runs/baseline-eq-k4-l0.667/summary.json",
    ] {
        assert!(d.join("cmp").join(f).is_file(), "missing {f}\n{out}");
    }
    let report = read_json(&d.join("cmp/report.json"));
    let runs = report["runs"].as_array().unwrap();
    let names: Vec<&str> = runs.iter().map(|r| r["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["baseline", "patch K=4 λ=0.667", "baseline, compute of K=4 λ=0.667"]);
    let cost = |i: usize| runs[i]["cost"].as_f64().unwrap();
    let tokens = |i: usize| runs[i]["tokens"].as_f64().unwrap();
    assert!((cost(0) - 1.0).abs() < 1e-9);
    // Patch run: cost ≈ λ/K + 1 − λ = 0.5 on about the baseline's tokens; the equal-compute
    // baseline: about that cost on about half the tokens.
    assert!((cost(1) - 0.5).abs() < 0.05, "{}", cost(1));
    assert!((cost(2) - cost(1)).abs() < 0.05, "{} vs {}", cost(2), cost(1));
    assert!((tokens(2) / tokens(0) - 0.5).abs() < 0.05);
    assert!(runs[1]["marker"].is_object() && runs[0]["marker"].is_null());
    for r in runs {
        assert_eq!(r["tasks"][0]["n"], 40);
        let curve = r["curve"].as_array().unwrap();
        assert!(curve.len() >= 3);
        // Compute relative to the baseline's whole run: rising to at most the run's cost.
        let compute: Vec<f64> = curve.iter().map(|p| p["compute"].as_f64().unwrap()).collect();
        let cost = r["cost"].as_f64().unwrap();
        assert!(compute.windows(2).all(|w| w[0] < w[1]) && compute[0] >= 0.0, "{compute:?}");
        assert!(*compute.last().unwrap() <= cost + 1e-9, "{compute:?} against cost {cost}");
    }
    let md = std::fs::read_to_string(d.join("cmp/report.md")).unwrap();
    assert!(md.contains(
        "| model | K | λ | cost | tokens | wall time | val loss | val PPL | bits/byte | continuation acc_norm |"
    ));
    assert!(md.contains("| patch K=4 λ=0.667 | 4 | 0.667 | 0.5"), "{md}");
    assert!(md.contains("![Validation loss vs relative compute](loss_vs_compute.png)"));

    // The table's validation loss is what `xtask eval --shards` gives for the same model.
    let shards = shard_dirs_in(&d.join("dd")).remove(0);
    let (ok, out) = xtask(
        &["eval", "--model", "cmp/runs/baseline/model", "--shards", shards.to_str().unwrap(), "--context", "16"],
        d,
    );
    assert!(ok, "{out}");
    let line = out.lines().find(|l| l.starts_with("validation split")).unwrap();
    let loss: f64 = line.split_whitespace().nth(4).unwrap().parse().unwrap();
    assert!((loss - runs[0]["val_loss"].as_f64().unwrap()).abs() < 1e-3, "{line}");
    // Its zero-shot accuracy too, and with --samples each question's scores, whose argmax is
    // that accuracy; the report itself keeps accuracies only.
    let model = "cmp/runs/baseline/model";
    let (ok, out) = xtask(&["eval", "--model", model, "--task", "cmp/continuation.jsonl", "--samples"], d);
    assert!(!ok && out.contains("--json"), "{out}");
    let (ok, out) =
        xtask(&["eval", "--model", model, "--task", "cmp/continuation.jsonl", "--json", "e.json", "--samples"], d);
    assert!(ok, "{out}");
    let e = read_json(&d.join("e.json"));
    let t = &e["tasks"][0];
    assert_eq!(t["acc"], runs[0]["tasks"][0]["acc"]);
    let samples = t["samples"].as_array().unwrap();
    assert_eq!(samples.len(), 40);
    let hits = samples
        .iter()
        .filter(|s| {
            let lls: Vec<f64> = serde_json::from_value(s["loglikelihoods"].clone()).unwrap();
            let best = (0..lls.len()).fold(0, |b, i| if lls[i] > lls[b] { i } else { b });
            s["gold"].as_u64() == Some(best as u64)
        })
        .count();
    assert!((t["acc"].as_f64().unwrap() - hits as f64 / 40.0).abs() < 1e-12, "{t}");
    assert!(runs[0]["tasks"][0].get("samples").is_none());
    // A folder of the task's records in two files is the same task, named by the folder; a
    // folder without task files says so.
    let lines: Vec<String> =
        std::fs::read_to_string(d.join("cmp/continuation.jsonl")).unwrap().lines().map(|l| format!("{l}\n")).collect();
    std::fs::create_dir_all(d.join("parts/empty")).unwrap();
    std::fs::write(d.join("parts/a.jsonl"), lines[..15].concat()).unwrap();
    std::fs::write(d.join("parts/b.jsonl"), lines[15..].concat()).unwrap();
    let (ok, out) = xtask(&["eval", "--model", model, "--task", "parts", "--json", "p.json"], d);
    // One task: no average of tasks.
    assert!(ok && !out.contains("average of"), "{out}");
    let p = read_json(&d.join("p.json"));
    assert_eq!(
        (&p["tasks"][0]["task"], &p["tasks"][0]["n"], &p["tasks"][0]["acc"]),
        (&"parts".into(), &40.into(), &t["acc"])
    );
    // Several tasks: their unweighted mean too, as the paper averages its zero-shot tasks.
    let (ok, out) = xtask(&["eval", "--model", model, "--task", "parts", "parts/a.jsonl", "--json", "q.json"], d);
    assert!(ok && out.contains("average of 2 tasks"), "{out}");
    let q = read_json(&d.join("q.json"));
    for m in ["acc", "acc_norm"] {
        let mean = (q["tasks"][0][m].as_f64().unwrap() + q["tasks"][1][m].as_f64().unwrap()) / 2.0;
        assert!((q["average"][m].as_f64().unwrap() - mean).abs() < 1e-12, "{q}");
    }
    // A BIG-bench task's folder is its task.json alone: what else it holds (the `results/` of
    // scored models that BIG-bench's folders keep) is no part of the task.
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("../crates/eval/tests/fixtures/tasks/bigbench");
    std::fs::create_dir_all(d.join("bb/results")).unwrap();
    std::fs::copy(fixtures.join("plain/task.json"), d.join("bb/task.json")).unwrap();
    std::fs::write(d.join("bb/results/scores_gpt.json"), r#"{"scores": [{"score_dict": {"acc": 0.5}}]}"#).unwrap();
    let scored = |task: &str, json: &str| {
        let (ok, out) = xtask(&["eval", "--model", model, "--task", task, "--json", json], d);
        assert!(ok, "{out}");
        let v = read_json(&d.join(json));
        v["tasks"][0].clone()
    };
    let (folder, file) = (scored("bb", "bb1.json"), scored("bb/task.json", "bb2.json"));
    assert_eq!(folder["task"], "bb");
    assert_eq!((&folder["n"], &folder["acc"]), (&file["n"], &file["acc"]));
    let (ok, out) = xtask(&["eval", "--model", model, "--task", "parts/empty"], d);
    assert!(!ok && out.contains("parts/empty: the folder holds no .parquet, .jsonl or .json file"), "{out}");
    let (ok, out) = xtask(&["eval", "--model", model, "--task", "parts/missing.jsonl"], d);
    assert!(!ok && out.contains("task parts/missing.jsonl: no such file or folder"), "{out}");

    // `plot`: the runs, found two levels down, on shared axes; the table's last validation loss
    // is each metrics.jsonl's last validation. A run still training (no summary.json, its last
    // line half written) is drawn as far as its metrics go.
    std::fs::create_dir_all(d.join("live")).unwrap();
    std::fs::copy(d.join("cmp/runs/patch-k4-l0.667/config.toml"), d.join("live/config.toml")).unwrap();
    let metrics = std::fs::read_to_string(d.join("cmp/runs/patch-k4-l0.667/metrics.jsonl")).unwrap();
    let kept: Vec<&str> = metrics.lines().take(7).collect();
    let next = metrics.lines().nth(7).unwrap();
    std::fs::write(d.join("live/metrics.jsonl"), format!("{}\n{}", kept.join("\n"), &next[..20])).unwrap();
    let (ok, out) = xtask(&["plot", "cmp", "live", "--out", "pl"], d);
    assert!(ok, "{out}");
    for f in ["runs.md", "loss_vs_compute.png", "loss_vs_tokens.svg", "loss_vs_time.png"] {
        assert!(d.join("pl").join(f).is_file(), "missing {f}\n{out}");
    }
    let last_val = |m: &str| {
        let v: serde_json::Value =
            serde_json::from_str(m.lines().rfind(|l| l.contains("\"kind\":\"eval\"")).unwrap()).unwrap();
        format!("{:.4}", v["val_loss"].as_f64().unwrap())
    };
    let last_step = |m: &str| {
        let v: serde_json::Value = serde_json::from_str(m.lines().last().unwrap()).unwrap();
        v["global_step"].to_string()
    };
    let rows: Vec<Vec<&str>> = out
        .lines()
        .filter(|l| l.starts_with("| ") && !l.starts_with("| run"))
        .map(|l| l.trim_matches('|').split('|').map(str::trim).collect())
        .collect();
    let names: Vec<(&str, &str, &str)> = rows.iter().map(|r| (r[0], r[1], r[8])).collect();
    assert_eq!(
        names,
        [
            ("baseline", "token level", "finished"),
            ("baseline-eq-k4-l0.667", "token level", "finished"),
            ("patch-k4-l0.667", "K=4 λ=0.667", "finished"),
            ("live", "K=4 λ=0.667", "stopped (--resume continues it)")
        ],
        "{out}"
    );
    // Runs are found at any depth: the compare's three (./cmp/runs/*) and the live one.
    let (ok, all) = xtask(&["plot", ".", "--out", "pl-all"], d);
    assert!(ok, "{all}");
    let found: Vec<&str> = all.lines().filter(|l| l.starts_with("| ") && !l.starts_with("| run")).collect();
    assert_eq!(found.len(), 4, "{all}");
    // A run that a process holds (its lock taken, as a training run takes it) is training.
    let lock = std::fs::File::create(d.join("live/.lock")).unwrap();
    std::fs::write(d.join("live/.lock"), "4242").unwrap();
    lock.lock().unwrap();
    let (ok, held) = xtask(&["plot", "live", "--out", "pl-live"], d);
    assert!(ok && held.contains("| training (process 4242) |"), "{held}");
    drop(lock);
    for (row, run) in rows.iter().zip(["baseline", "baseline-eq-k4-l0.667", "patch-k4-l0.667"]) {
        let m = std::fs::read_to_string(d.join("cmp/runs").join(run).join("metrics.jsonl")).unwrap();
        assert_eq!((row[2], row[6]), (last_step(&m).as_str(), last_val(&m).as_str()), "{run}: {out}");
    }
    let live = kept.join("\n");
    assert_eq!((rows[3][2], rows[3][6]), (last_step(&live).as_str(), last_val(&live).as_str()), "{out}");
    // Not into a run's directory (its files would be foreign there), and not of what is no run.
    let (ok, out) = xtask(&["plot", "cmp", "--out", "cmp/runs/baseline"], d);
    assert!(!ok && out.contains("is a run directory"), "{out}");
    let (ok, out) = xtask(&["plot", "parts"], d);
    assert!(!ok && out.contains("parts is not a run directory"), "{out}");
    let (ok, out) = xtask(&["plot", "nowhere"], d);
    assert!(!ok && out.contains("nowhere: no such run directory"), "{out}");

    // Run again: every run is reused, nothing retrains.
    let (ok, out) = xtask(&args, d);
    assert!(ok, "{out}");
    assert_eq!(out.matches("finished before; reused").count(), 3, "{out}");
    // Over edited inputs (a retrained tokenizer, other shards), no run is reused or continued:
    // the report would mix models of other data.
    let edited = d.join("edited.jsonl");
    let text = std::fs::read_to_string(d.join("tiny.jsonl")).unwrap();
    std::fs::write(&edited, text.replace("w1 ", "v1 ")).unwrap();
    let edited_args: Vec<&str> = args.iter().map(|&x| if x == "tiny.jsonl" { "edited.jsonl" } else { x }).collect();
    let (ok, out) = xtask(&edited_args, d);
    assert!(!ok && !out.contains("reused") && out.contains("was trained on other data"), "{out}");
    // A sweep reuses what matches (baseline, K=4) and trains only the new K=2 run.
    let (ok, out) = xtask(&with(&["--k", "2,4", "--no-equal-compute", "--continuation-examples", "0"]), d);
    assert!(ok, "{out}");
    assert_eq!(out.matches("finished before; reused").count(), 2, "{out}");
    // No continuation task asked for: none is drawn, and none is said to be skipped.
    assert!(!out.contains("continuation task"), "{out}");
    assert!(d.join("cmp/runs/patch-k2-l0.667/summary.json").is_file());
    let md = std::fs::read_to_string(d.join("cmp/report.md")).unwrap();
    assert!(md.contains("| patch K=2 λ=0.667 | 2 |") && !md.contains("continuation acc_norm"), "{md}");
    // Two passes over the data: the equal-compute baseline makes two passes over half of it.
    let (ok, out) = xtask(
        &[&base[..7], &["--out", "cmp2", "--set", "blocks.epochs=2", "--continuation-examples", "0"]].concat(),
        d,
    );
    assert!(ok, "{out}");
    let report = read_json(&d.join("cmp2/report.json"));
    let runs = report["runs"].as_array().unwrap();
    let tokens2 = |i: usize| runs[i]["tokens"].as_f64().unwrap();
    assert!((tokens2(0) / tokens(0) - 2.0).abs() < 0.05, "{} vs {}", tokens2(0), tokens(0));
    assert!((tokens2(2) / tokens2(0) - 0.5).abs() < 0.05, "{} vs {}", tokens2(2), tokens2(0));
    assert!((runs[2]["cost"].as_f64().unwrap() - runs[1]["cost"].as_f64().unwrap()).abs() < 0.05);
    // Bad sweep values fail before any training: λ must lie strictly between 0 and 1 (its ends
    // are the baseline and a run with no token phase), K must be at least 2.
    for lambda in ["0", "1", "1.2"] {
        let (ok, out) = xtask(&with(&["--lambda", lambda]), d);
        assert!(!ok && out.contains(&format!("--lambda {lambda}: fractions must be in (0, 1)")), "{out}");
    }
    let (ok, out) = xtask(&with(&["--k", "1"]), d);
    assert!(!ok && out.contains("--k 1: patch sizes must be at least 2"), "{out}");
    // --dtype sets every run's (f16 is refused: no loss scaling).
    let (ok, out) = xtask(&with(&["--dtype", "f16"]), d);
    assert!(!ok && out.contains("f16 training needs loss scaling") && !out.contains("== run"), "{out}");
}

#[test]
fn each_bench_prints_a_json_row_per_setting() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let rows = |out: &str| -> Vec<serde_json::Value> {
        out.lines().filter(|l| l.starts_with('{')).map(|l| serde_json::from_str(l).unwrap()).collect()
    };
    // A command and its wall time in ms: no time a benchmark prints can be longer.
    let timed = |args: &[&str]| {
        let t0 = std::time::Instant::now();
        let (ok, out) = xtask(args, d);
        (ok, out, t0.elapsed().as_secs_f64() * 1e3)
    };
    let args = ["bench", "model", "--preset", "tiny", "--batch", "2", "--ctx", "8", "--k", "1,4", "--steps", "1"];
    let (ok, out, wall) =
        timed(&[&args[..], &["--fused", "both", "--attention", "both", "--backward", "both"]].concat());
    assert!(ok, "{out}");
    let r = rows(&out);
    // Composed ops with autograd (k = 1, 4); fused with the softmax and with flash attention,
    // each with autograd and with the tape.
    let settings: Vec<(bool, String, String, u64)> = r
        .iter()
        .map(|x| {
            let s = |k: &str| x[k].as_str().unwrap().to_string();
            (x["fused"].as_bool().unwrap(), s("attention"), s("backward"), x["k"].as_u64().unwrap())
        })
        .collect();
    assert_eq!(settings.len(), 10, "{out}");
    assert!(settings.contains(&(true, "flash".into(), "tape".into(), 4)), "{out}");
    assert!(settings.contains(&(true, "softmax".into(), "autograd".into(), 1)), "{out}");
    assert!(settings.contains(&(false, "softmax".into(), "autograd".into(), 1)), "{out}");
    assert!(!settings.contains(&(false, "softmax".into(), "tape".into(), 1)), "{out}");
    // --fused both alone: the fused row with the tape, the composed one with autograd.
    let (ok, out) = xtask(&[&args[..8], &["--k", "1", "--steps", "1", "--fused", "both"]].concat(), d);
    assert!(ok, "{out}");
    let backward: Vec<(bool, &str)> = rows(&out)
        .iter()
        .map(|x| (x["fused"].as_bool().unwrap(), if x["backward"] == "tape" { "tape" } else { "autograd" }))
        .collect();
    assert_eq!(backward, [(false, "autograd"), (true, "tape")], "{out}");
    // Tokens a second and MFU from the step's time: B·T·K tokens, B·T positions of the model's
    // FLOPs each against the peak.
    let tiny = patchlm_model::ModelConfig::preset("tiny").unwrap();
    for x in &r {
        let ms = |k: &str| x[k].as_f64().unwrap();
        let (f, b, o, parts) = (ms("fwd_ms"), ms("bwd_ms"), ms("opt_ms"), ms("parts_step_ms"));
        assert!(ms("step_ms") > 0.0 && ms("tokens_per_s") > 0.0, "{x}");
        let secs = ms("step_ms") / 1e3;
        let k = x["k"].as_f64().unwrap();
        assert!((ms("tokens_per_s") * secs - 16.0 * k).abs() < 1e-9 * 16.0 * k, "{x}");
        let mfu = 16.0 * tiny.flops_per_position(8) / secs / 989e12;
        assert!((ms("mfu") - mfu).abs() < 1e-9 * mfu, "{x}");
        // Each part's enqueue time within its synchronised time, every time within the command's.
        assert!(ms("fwd_enqueue_ms") <= f && ms("bwd_enqueue_ms") <= b, "{x}");
        // A training step, even of the tiny preset, takes more than a microsecond.
        assert!(parts > 1e-3 && ms("step_ms") > 1e-3, "{x}");
        assert!([f, b, o, parts, ms("step_ms")].iter().all(|&t| t < wall), "{wall} ms: {x}");
        // One step timed whole and one timed by parts (medians of one sample), so the parts add
        // up to that step's time.
        assert!(f > 0.0 && b > 0.0 && o >= 0.0 && (f + b + o - parts).abs() < 1e-6 * parts.max(1.0) + 1e-6, "{x}");
    }
    // --profile: one more step by named spans, in the row and as a table by kind. The spans
    // cover the layers' parts once per layer (tiny: 2 layers) and, on the CPU where ops run
    // synchronously, nearly all of the step.
    let (ok, out) =
        xtask(&[&args[..4], &["--batch", "2", "--ctx", "8", "--k", "4", "--steps", "1", "--profile"]].concat(), d);
    assert!(ok, "{out}");
    let r = rows(&out);
    assert_eq!(r.len(), 1, "{out}");
    let spans = r[0]["profile"].as_object().unwrap();
    for name in ["fwd.matmul.qkv", "fwd.attention", "bwd.attention", "fwd.embedding", "bwd.loss", "opt.optimizer"] {
        assert!(spans[name].as_f64().unwrap() > 0.0, "{name}: {out}");
    }
    let covered: f64 = spans.values().map(|v| v.as_f64().unwrap()).sum();
    let step = r[0]["profile_step_ms"].as_f64().unwrap();
    assert!(covered <= step && covered > 0.5 * step, "{covered} of {step}: {out}");
    assert!(out.contains("profile of one step, tiny k=4") && out.contains("outside spans"), "{out}");
    let calls = out.lines().find(|l| l.trim_start().starts_with("fwd.attention")).unwrap();
    assert!(calls.trim_end().ends_with("2 spans"), "{out}");
    // The table by kind: each kind's time is the sum of the spans of that kind (`pass.kind...`).
    let kinds: Vec<(&str, f64)> = out
        .lines()
        .filter(|l| l.starts_with("  ") && !l.starts_with("   ") && !l.contains("outside spans"))
        .map(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            (w[0], w[1].parse().unwrap())
        })
        .collect();
    assert!(kinds.iter().any(|(k, _)| *k == "attention") && kinds.iter().any(|(k, _)| *k == "matmul"), "{out}");
    let mut listed = 0;
    for (kind, ms) in &kinds {
        let of_kind: Vec<f64> = spans
            .iter()
            .filter(|(name, _)| name.split('.').nth(1) == Some(*kind))
            .map(|(_, v)| v.as_f64().unwrap())
            .collect();
        listed += of_kind.len();
        assert!((of_kind.iter().sum::<f64>() - ms).abs() <= 0.0051, "{kind}: {out}");
    }
    assert_eq!(listed, spans.len(), "{out}");
    // bench flash --variants: a row per variant in one process, each naming it; a malformed
    // variant fails before any timing, naming itself.
    let flash = ["bench", "flash", "--preset", "tiny", "--batch", "1", "--ctx", "16", "--reps", "1"];
    let (ok, out) = xtask(&[&flash[..], &["--variants", "0:0:0:0:0,1:0:1:0:2"]].concat(), d);
    assert!(ok, "{out}");
    let r = rows(&out);
    let configs: Vec<&str> = r.iter().map(|x| x["config"].as_str().unwrap()).collect();
    assert_eq!(configs, ["0:0:0:0:0", "1:0:1:0:2"], "{out}");
    assert!(r.iter().all(|x| x["bench"] == "flash" && x["kernels"] == "cpu" && x["fwd_ms"].as_f64().unwrap() > 0.0));
    for bad in ["1:0:0:0", "0:0:0:0:3", "0:0:x:0:0"] {
        let (ok, out) = xtask(&[&flash[..], &["--variants", bad]].concat(), d);
        assert!(!ok && out.contains(&format!("{bad:?} is not WIDE:WIDE_BWD:DQ_ATOMIC:OCC4:WGMMA")), "{out}");
    }
    // Without a subcommand: the suite (token and patch phase of each shape), then its table.
    let (ok, out) = xtask(&["bench", "--device", "cpu", "--shapes", "tiny:2x8", "--steps", "1"], d);
    assert!(ok, "{out}");
    let ks: Vec<u64> = rows(&out).iter().map(|x| x["k"].as_u64().unwrap()).collect();
    assert_eq!(ks, [1, 4], "{out}");
    // On the CPU the suite's dtype defaults to f32.
    assert!(rows(&out).iter().all(|x| x["dtype"] == "f32") && out.contains("training step, cpu f32"), "{out}");
    let table: Vec<&str> = out.lines().filter(|l| l.trim_start().starts_with("tiny")).collect();
    assert!(table.len() == 2 && table[0].contains("token") && table[1].contains("K=4"), "{out}");
    assert!(out.contains("peak of 989 TFLOP/s"), "{out}");
    let (ok, out) = xtask(&["bench", "--device", "cpu", "--shapes", "tiny:2"], d);
    assert!(!ok && out.contains("preset:BATCHxCTX"), "{out}");
    // Each count of each benchmark at 0, alone: refused before any work.
    for (what, count) in [("model", "--steps"), ("ops", "--reps"), ("flash", "--reps")] {
        for zero in [count, "--batch", "--ctx"] {
            let (ok, out) = xtask(&["bench", what, "--preset", "tiny", zero, "0"], d);
            let want = format!("bench {what}: {count}, --batch and --ctx must be at least 1");
            assert!(!ok && out.contains(&want), "{what} {zero} 0: {out}");
        }
    }
    for zero in [&["--steps", "0"][..], &["--k", "1,0"]] {
        let (ok, out) = xtask(&[&["bench", "--device", "cpu", "--shapes", "tiny:2x8"][..], zero].concat(), d);
        assert!(!ok && out.contains("--steps and every --k must be at least 1"), "{zero:?}: {out}");
    }
    let (ok, out) = xtask(&["bench", "model", "--preset", "tiny", "--attention", "sdpa"], d);
    assert!(!ok && out.contains("--attention sdpa"), "{out}");
    let (ok, out) = xtask(&["bench", "model", "--preset", "tiny", "--backward", "jit"], d);
    assert!(!ok && out.contains("--backward jit"), "{out}");

    let (ok, out, wall) = timed(&["bench", "ops", "--preset", "tiny", "--batch", "2", "--ctx", "8", "--reps", "1"]);
    assert!(ok, "{out}");
    for x in rows(&out) {
        let (f, fb) = (x["fwd_ms"].as_f64().unwrap(), x["fwd_bwd_ms"].as_f64().unwrap());
        assert!(0.0 < f && f <= fb && fb < wall, "{wall} ms: {x}");
    }
    let ops: Vec<(String, bool)> =
        rows(&out).iter().map(|x| (x["op"].as_str().unwrap().to_string(), x["fused"].as_bool().unwrap())).collect();
    for op in ["rms_norm", "attention (softmax)", "attention (flash)", "mlp", "embedding", "lm_head + loss"] {
        assert!(ops.contains(&(op.to_string(), true)), "{op} fused: {out}");
    }
    assert!(ops.contains(&("mlp".to_string(), false)) && !ops.contains(&("attention (flash)".to_string(), false)));

    // Flash attention alone: the tiny preset's 4 heads of size 8; TFLOP/s from FlashAttention's
    // causal count, forward 4·B·H·T²·d/2 = 4·2·4·64·8/2 = 8192 FLOPs, backward 2.5× that.
    let (ok, out, wall) = timed(&["bench", "flash", "--preset", "tiny", "--batch", "2", "--ctx", "8", "--reps", "2"]);
    assert!(ok, "{out}");
    let r = rows(&out);
    assert_eq!(r.len(), 1, "{out}");
    let x = &r[0];
    // Per launch: two launches of each pass within the command's time.
    assert!(2.0 * (x["fwd_ms"].as_f64().unwrap() + x["bwd_ms"].as_f64().unwrap()) < wall, "{wall} ms: {x}");
    assert_eq!((x["heads"].as_u64(), x["head_dim"].as_u64(), x["kernels"].as_str()), (Some(4), Some(8), Some("cpu")));
    let f = |k: &str| x[k].as_f64().unwrap();
    for (pass, flops) in [("fwd", 8192.0), ("bwd", 2.5 * 8192.0)] {
        let ms = f(&format!("{pass}_ms"));
        let implied = f(&format!("{pass}_tflops")) * 1e12 * ms * 1e-3;
        assert!(ms > 0.0 && (implied - flops).abs() < 1e-6 * flops, "{pass}: {implied} FLOPs: {x}");
    }

    // bench data: the text of all its inputs encoded, the stage built into a folder of its own
    // inside --out (removed after, whatever else is there kept), the reader timed on it.
    let doc = |i: usize| (0..40).map(|j| format!("w{}", (i * 7 + j * 13) % 53)).collect::<Vec<_>>().join(" ");
    let (a, b): (Vec<String>, Vec<String>) = ((0..150).map(doc).collect(), (150..200).map(doc).collect());
    for (name, texts) in [("a.jsonl", &a), ("b.jsonl", &b)] {
        let lines: Vec<String> = texts.iter().map(|t| serde_json::json!({ "text": t }).to_string()).collect();
        std::fs::write(d.join(name), lines.join("\n")).unwrap();
    }
    let (ok, out) = xtask(&["data", "--input", "a.jsonl", "--out", "tok", "--vocab-size", "300"], d);
    assert!(ok, "{out}");
    std::fs::create_dir(d.join("scratch")).unwrap();
    std::fs::write(d.join("scratch/keep.txt"), "mine").unwrap();
    let data = ["bench", "data", "--tokenizer", "tok/tokenizer.json", "--out", "scratch", "--input"];
    let (ok, out, wall) = timed(&[&data[..], &["a.jsonl", "b.jsonl"]].concat());
    assert!(ok, "{out}");
    let r = rows(&out);
    assert_eq!(r.len(), 1, "{out}");
    let bytes: usize = a.iter().chain(&b).map(String::len).sum();
    let mb = bytes as f64 / 1e6;
    assert_eq!(r[0]["text_mb"].as_f64(), Some(mb), "{out}");
    // Each rate is at least what it read over the command's wall time: the text (MB); 20,000
    // windows of 1,024 tokens; the train split and its first shard, more than 1,024 tokens each.
    // No encoder reaches 100 GB/s.
    let secs = wall / 1e3;
    for (key, least, most) in [
        ("encode_mb_per_s", mb / secs, 1e5),
        ("stage_mb_per_s", mb / secs, 1e5),
        ("random_1024_windows_tokens_per_s", 20_000.0 * 1024.0 / secs, f64::MAX),
        ("sequential_scan_tokens_per_s", 1024.0 / secs, f64::MAX),
        ("raw_read_tokens_per_s", 1024.0 / secs, f64::MAX),
    ] {
        let x = r[0][key].as_f64().unwrap();
        assert!(x.is_finite() && least < x && x < most, "{key}: {least} .. {most}: {out}");
    }
    let left: Vec<_> = std::fs::read_dir(d.join("scratch")).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(left, ["keep.txt"], "{out}");
    // Too little text for one window: refused, saying so (not an out-of-range read).
    std::fs::write(d.join("c.jsonl"), serde_json::json!({ "text": doc(0) }).to_string()).unwrap();
    let (ok, out) = xtask(&[&data[..], &["c.jsonl"]].concat(), d);
    assert!(!ok && out.contains("too few for random 1024-token windows"), "{out}");
    assert_eq!(std::fs::read_dir(d.join("scratch")).unwrap().count(), 1, "{out}");
}

/// A failure prints its error and what caused it; with `RUST_BACKTRACE` set (and not `0`),
/// anyhow's own report, which adds the backtrace.
#[test]
fn an_error_carries_a_backtrace_only_when_asked_for() {
    let dir = tempfile::tempdir().unwrap();
    for (value, backtrace) in [(None, false), (Some("0"), false), (Some("1"), true), (Some("full"), true)] {
        let mut c = Command::new(env!("CARGO_BIN_EXE_xtask"));
        c.args(["plot", "nowhere"]).current_dir(dir.path()).env_remove("RUST_LIB_BACKTRACE");
        match value {
            Some(v) => c.env("RUST_BACKTRACE", v),
            None => c.env_remove("RUST_BACKTRACE"),
        };
        let out = c.output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.starts_with("Error: nowhere: no such run directory"), "{err}");
        assert_eq!(err.contains("Stack backtrace:"), backtrace, "RUST_BACKTRACE={value:?}: {err}");
    }
}

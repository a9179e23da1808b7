//! End to end through the CLI, as a user runs it: data → pretrain (patch phase, token phase)
//! → HF model → score / generate, on a tiny corpus the test writes.

#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::Command;

fn xtask(args: &[&str], cwd: &Path) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_xtask")).args(args).current_dir(cwd).output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
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
    std::fs::write(
        d.join("run.toml"),
        r#"
preset = "tiny"
[data]
val_fraction = 0.1
[data.tokenizer]
vocab_size = 320
[blocks]
context = 16
max_val_blocks = 8
[train]
tokens_per_step = 256
micro_batch = 4
lr = 3e-3
warmup_steps = 2
eval_every = 5
checkpoint_every = 4
progress = false
"#,
    )
    .unwrap();

    // Standalone data stage.
    let (ok, out) = xtask(&["data", "--input", "tiny.jsonl", "--out", "shards", "--vocab-size", "320"], d);
    assert!(ok, "{out}");
    assert!(out.contains("documents      600"), "{out}");

    let args = ["pretrain", "--config", "run.toml", "--input", "tiny.jsonl", "--out", "run", "--data-dir", "dd"];
    let (ok, out) = xtask(&args, d);
    assert!(ok, "{out}");
    assert!(out.contains("patch phase  K=4") && out.contains("token phase  K=1"), "{out}");
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
    // The saved config is fully resolved and loads back as the run's config.
    let saved = std::fs::read_to_string(d.join("run/config.toml")).unwrap();
    assert!(saved.contains("lambda") && saved.contains("vocab_size = 320"), "{saved}");
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
    let shard_dirs = || {
        std::fs::read_dir(d.join("dd"))
            .unwrap()
            .filter(|e| e.as_ref().unwrap().file_name().to_string_lossy().starts_with("shards-"))
            .count()
    };
    assert_eq!(shard_dirs(), 1);

    // --resume on a finished run trains nothing more and reports the same model.
    let mut resume = args.to_vec();
    resume.push("--resume");
    let (ok, out) = xtask(&resume, d);
    assert!(ok, "{out}");
    // Without --resume, an existing run is refused with advice.
    let (ok, out) = xtask(&args, d);
    assert!(!ok && out.contains("--resume"), "{out}");
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
        ],
        d,
    );
    assert!(!ok && out.contains("do not fill one block"), "{out}");

    // Score and generate with the trained model.
    let (ok, out) = xtask(&["score", "--model", "run/model", "--text", "w1 w14 w27", "--json"], d);
    assert!(ok, "{out}");
    let v: serde_json::Value = serde_json::from_str(&out[out.find('{').unwrap()..]).unwrap();
    let lps: Vec<f64> = v["tokens"].as_array().unwrap().iter().map(|t| t["logprob"].as_f64().unwrap()).collect();
    assert!(lps.iter().all(|&x| x <= 0.0));
    assert!((v["nll"].as_f64().unwrap() + lps.iter().sum::<f64>()).abs() < 1e-3);
    let (ok, out) =
        xtask(&["generate", "--model", "run/model", "--prompt", "w1", "--max-tokens", "8", "--seed", "3"], d);
    assert!(ok && out.starts_with("w1"), "{out}");
    let (ok2, out2) =
        xtask(&["generate", "--model", "run/model", "--prompt", "w1", "--max-tokens", "8", "--seed", "3"], d);
    assert!(ok2 && out == out2, "same seed, same text");
}

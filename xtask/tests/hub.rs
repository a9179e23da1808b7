//! The Hugging Face Hub through the CLI, as a user meets it: a model repository, its tokenizer
//! and a dataset served by the stand-in hub (`HF_ENDPOINT`), used by `score`, `eval`, `data` and
//! `pretrain`, then again offline from the cache they filled.

#![allow(clippy::unwrap_used)]

#[path = "../../crates/data/tests/support/fake_hub.rs"]
mod fake_hub;

use std::path::Path;
use std::process::Command;

use fake_hub::{repo_with, FakeHub, State};

fn xtask(args: &[&str], cwd: &Path, env: &[(&str, String)]) -> (bool, String) {
    let mut c = Command::new(env!("CARGO_BIN_EXE_xtask"));
    c.args(args).current_dir(cwd);
    for k in ["HF_TOKEN", "HF_HOME", "HF_HUB_CACHE", "HF_ENDPOINT", "HF_HUB_OFFLINE", "XDG_CACHE_HOME"] {
        c.env_remove(k);
    }
    for (k, v) in env {
        c.env(k, v);
    }
    let out = c.output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

fn corpus(n: usize, salt: usize) -> String {
    let mut s = String::new();
    for i in 0..n {
        let words: Vec<String> = (0..40).map(|j| format!("w{}", (i * 7 + j * 13 + salt) % 53)).collect();
        s += &serde_json::json!({"text": words.join(" ")}).to_string();
        s.push('\n');
    }
    s
}

#[test]
fn models_tokenizers_and_datasets_come_from_the_hub() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (part0, part1) = (corpus(300, 0), corpus(300, 5));

    // A model repository: a tokenizer trained on the text and a tiny model, in HF format.
    let texts: Vec<String> = part0.lines().map(|l| l.to_string()).collect();
    let tcfg = patchlm_data::tokenizer::TokenizerConfig { vocab_size: 320, ..Default::default() };
    let tok = patchlm_data::tokenizer::train_bpe(texts.iter(), &tcfg).unwrap();
    let tok_json = patchlm_data::tokenizer::tokenizer_json(&tok).unwrap();
    let sp = patchlm_data::tokenizer::special_tokens(&tok, &tcfg).unwrap();
    let mut mcfg = patchlm_model::ModelConfig::preset("tiny").unwrap();
    mcfg.vocab_size = 320;
    let (_, varmap) = patchlm_model::init_model(&mcfg, &candle_core::Device::Cpu, 1).unwrap();
    let local = d.join("local-model");
    patchlm_model::save_pretrained(&local, &mcfg, &varmap, Some(&tok_json), sp.bos, Some(sp.eos)).unwrap();
    let read = |f: &str| std::fs::read(local.join(f)).unwrap();

    let mut st = State::default();
    let (cfg_json, weights) = (read("config.json"), read("model.safetensors"));
    st.repos.insert(
        "org/tiny".into(),
        repo_with(&[
            ("config.json", &cfg_json, false),
            ("model.safetensors", &weights, true),
            ("tokenizer.json", tok_json.as_bytes(), false),
            ("pytorch_model.bin", b"not fetched", true),
        ]),
    );
    st.repos.insert(
        "datasets/org/corpus".into(),
        repo_with(&[
            ("README.md", b"# card\n", false),
            ("data/train-0.jsonl", part0.as_bytes(), true),
            ("data/train-1.jsonl", part1.as_bytes(), false),
        ]),
    );
    // A BIG-bench composite task: its task.json and its subtasks' folders.
    let bb = Path::new(env!("CARGO_MANIFEST_DIR")).join("../crates/eval/tests/fixtures/tasks/bigbench/composite");
    let bb_files: Vec<(String, Vec<u8>)> = ["task.json", "a_sub/task.json", "b_sub/task.json"]
        .iter()
        .map(|f| (format!("bb/composite/{f}"), std::fs::read(bb.join(f)).unwrap()))
        .collect();
    let bb_entries: Vec<(&str, &[u8], bool)> = bb_files.iter().map(|(f, b)| (f.as_str(), &b[..], false)).collect();
    st.repos.insert("datasets/org/tasks".into(), repo_with(&bb_entries));
    let fake = FakeHub::start(st);
    let cache = d.join("hf-cache").to_string_lossy().into_owned();
    let env = vec![
        ("HF_ENDPOINT", fake.url.clone()),
        ("HF_HUB_CACHE", cache.clone()),
        ("HF_HOME", d.join("hf-home").to_string_lossy().into_owned()),
        ("HF_HUB_DISABLE_PROGRESS_BARS", "1".into()),
    ];

    // score: a repository id gives the same numbers as the local directory it was made from.
    let text = "w1 w14 w27 w40";
    let (ok, from_hub) = xtask(&["score", "--model", "org/tiny", "--text", text, "--json"], d, &env);
    assert!(ok, "{from_hub}");
    let (ok, from_dir) = xtask(&["score", "--model", "local-model", "--text", text, "--json"], d, &env);
    assert!(ok, "{from_dir}");
    assert_eq!(from_hub, from_dir);
    // So does its hf:// address; a file inside the repository is refused with the reason.
    let (ok, by_url) = xtask(&["score", "--model", "hf://org/tiny", "--text", text, "--json"], d, &env);
    assert!(ok && by_url == from_dir, "{by_url}");
    let (ok, out) = xtask(&["score", "--model", "hf://org/tiny/config.json", "--text", text], d, &env);
    assert!(!ok && out.contains("name the model repository itself, not `config.json` inside it"), "{out}");
    let snap = Path::new(&cache).join("models--org--tiny/snapshots").join(fake_hub::COMMIT);
    assert!(snap.join("model.safetensors").is_file() && !snap.join("pytorch_model.bin").exists());

    // data: the dataset's data folder with the model repository's tokenizer; with progress bars
    // on, in a log (stderr is no terminal here) each download says how far it is, each
    // PATCHLM_LOG_SECS seconds.
    let args = ["data", "--input", "hf://datasets/org/corpus/data", "--tokenizer", "org/tiny", "--out", "shards"];
    let mut logged: Vec<(&str, String)> =
        env.iter().filter(|(k, _)| *k != "HF_HUB_DISABLE_PROGRESS_BARS").cloned().collect();
    logged.push(("PATCHLM_LOG_SECS", "0".into()));
    let (ok, out) = xtask(&args, d, &logged);
    assert!(ok, "{out}");
    assert!(out.contains("documents      600") && out.contains("2 files"), "{out}");
    for f in ["train-0.jsonl", "train-1.jsonl"] {
        let size = indicatif::BinaryBytes(if f == "train-0.jsonl" { part0.len() } else { part1.len() } as u64);
        let line = format!("downloading datasets/org/corpus@{}/data/{f}: {size} of {size} (100%)", fake_hub::COMMIT);
        assert!(out.contains(&line), "no line {line:?} in {out}");
    }
    assert_eq!(std::fs::read_to_string(d.join("shards/tokenizer.json")).unwrap(), tok_json);

    // eval on one file of the dataset.
    let args = ["eval", "--model", "org/tiny", "--text", "hf://datasets/org/corpus/data/train-0.jsonl"];
    let (ok, out) = xtask(&args, d, &env);
    assert!(ok, "{out}");
    assert!(out.contains("perplexity") && out.contains("300"), "{out}");

    // A composite BIG-bench task through an hf:// folder (its task.json and every subtask's
    // file resolved) has as many questions as the local folder, each subtask counted once.
    let local_bb = bb.to_string_lossy().into_owned();
    let mut counts = Vec::new();
    for task in ["hf://datasets/org/tasks/bb/composite", local_bb.as_str()] {
        let (ok, out) = xtask(&["eval", "--model", "local-model", "--task", task, "--json", "bb.json"], d, &env);
        assert!(ok, "{out}");
        let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(d.join("bb.json")).unwrap()).unwrap();
        counts.push(v["tasks"][0]["n"].as_u64().unwrap());
    }
    assert_eq!(counts[0], counts[1], "hf:// against local: {counts:?}");

    // pretrain on the whole dataset (its README is no training text) with the hub tokenizer.
    std::fs::write(
        d.join("run.toml"),
        "preset = \"tiny\"\n[data]\nval_fraction = 0.1\n[data.tokenizer]\nfile = \"org/tiny\"\n[blocks]\ncontext = 16\n\
         max_val_blocks = 8\n[train]\ntokens_per_step = 256\nmicro_batch = 4\nlr = 3e-3\nwarmup_steps = 2\n\
         eval_every = 5\ncheckpoint_every = 0\nprogress = false\n",
    )
    .unwrap();
    // First a run on the same inputs and data dir that trains its tokenizer: its cached shards
    // must not be served to the run that names the hub tokenizer (the setting is in the key).
    let trained = std::fs::read_to_string(d.join("run.toml")).unwrap().replace("file = \"org/tiny\"\n", "");
    std::fs::write(d.join("trained.toml"), trained).unwrap();
    let args = [
        "pretrain",
        "--config",
        "trained.toml",
        "--input",
        "hf://datasets/org/corpus",
        "--out",
        "run-trained",
        "--data-dir",
        "dd",
    ];
    let (ok, out) = xtask(&args, d, &env);
    assert!(ok, "{out}");
    assert_ne!(std::fs::read_to_string(d.join("run-trained/model/tokenizer.json")).unwrap(), tok_json);
    let args =
        ["pretrain", "--config", "run.toml", "--input", "hf://datasets/org/corpus", "--out", "run", "--data-dir", "dd"];
    let (ok, out) = xtask(&args, d, &env);
    assert!(ok, "{out}");
    assert!(out.contains("validation loss"), "{out}");
    assert_eq!(std::fs::read_to_string(d.join("run/model/tokenizer.json")).unwrap(), tok_json);
    assert!(std::fs::read_to_string(d.join("run/config.toml")).unwrap().contains("file = \"org/tiny\""));
    // The same setting naming other bytes (here a local file rewritten between two runs; on the
    // hub, a branch that moved) tokenizes again instead of serving the cached shards.
    let local_tok = std::fs::read_to_string(d.join("run.toml")).unwrap().replace("\"org/tiny\"", "\"tok.json\"");
    std::fs::write(d.join("local.toml"), local_tok).unwrap();
    let other_tok = std::fs::read_to_string(d.join("run-trained/model/tokenizer.json")).unwrap();
    for (out_dir, tok) in [("run-a", &tok_json), ("run-b", &other_tok)] {
        std::fs::write(d.join("tok.json"), tok).unwrap();
        let args = [
            "pretrain",
            "--config",
            "local.toml",
            "--input",
            "hf://datasets/org/corpus",
            "--out",
            out_dir,
            "--data-dir",
            "dd",
        ];
        let (ok, out) = xtask(&args, d, &env);
        assert!(ok, "{out}");
        assert_eq!(&std::fs::read_to_string(d.join(out_dir).join("model/tokenizer.json")).unwrap(), tok, "{out_dir}");
    }

    // Offline, against a hub that is gone: everything above answers from the cache.
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", l.local_addr().unwrap())
    };
    let mut offline = env.clone();
    offline[0].1 = dead.clone();
    offline.push(("HF_HUB_OFFLINE", "1".into()));
    let (ok, out) = xtask(&["score", "--model", "org/tiny", "--text", text, "--json"], d, &offline);
    assert!(ok, "{out}");
    assert_eq!(out, from_dir);
    let args = ["data", "--input", "hf://datasets/org/corpus/data", "--tokenizer", "org/tiny", "--out", "shards2"];
    let (ok, out) = xtask(&args, d, &offline);
    assert!(ok && out.contains("documents      600"), "{out}");

    // What is not there fails with the repository named and what to do.
    let (ok, out) = xtask(&["score", "--model", "org/missing", "--text", text], d, &env);
    assert!(!ok && out.contains("org/missing") && out.contains("no such repository"), "{out}");
    let (ok, out) = xtask(&["score", "--model", "org/missing", "--text", text], d, &offline);
    assert!(!ok && out.contains("HF_HUB_OFFLINE"), "{out}");
    let (ok, out) = xtask(&["score", "--model", "runs/none/model", "--text", text], d, &env);
    assert!(!ok && out.contains("runs/none/model: no such model directory"), "{out}");
}

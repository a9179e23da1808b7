//! Eval tests: perplexity windows against HF transformers, batched choice log-likelihoods against
//! HF, lm-eval's acc / acc_norm rules by hand, the task formats, and bad task files.

#![allow(clippy::unwrap_used)]

use std::path::PathBuf;

use candle_core::{DType, Device};
use patchlm_eval::*;
use patchlm_model::load_pretrained;

fn fixture_model() -> patchlm_model::Llama {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../model/tests/fixtures/tiny-llama");
    load_pretrained(&dir, &Device::Cpu, DType::F32).unwrap().0
}

fn golden() -> serde_json::Value {
    serde_json::from_str(include_str!("fixtures/eval_golden.json")).unwrap()
}

#[test]
fn perplexity_windows_match_hf_transformers() {
    let g = golden();
    let ids: Vec<u32> = serde_json::from_value(g["ids"].clone()).unwrap();
    let model = fixture_model();
    for (ctx, stride, key) in [
        (64, None, "nll_context64"),
        (64, Some(16), "nll_context64_stride16"),
        (32, Some(32), "nll_context32_stride32"),
    ] {
        let nlls = sequence_nlls(&model, &ids, &WindowConfig { context: ctx, stride }, &Device::Cpu).unwrap();
        assert_eq!(nlls.len(), ids.len() - 1);
        let total: f64 = nlls.iter().sum();
        let want = g[key].as_f64().unwrap();
        assert!((total - want).abs() < 1e-3, "{key}: {total} vs {want}");
    }
    // Bits per byte and perplexity from the sums, by hand.
    let s = NllSum { tokens: 4, nll: 4.0 * 2f64.ln(), bytes: 2, documents: 1 };
    assert!((s.perplexity() - 2.0).abs() < 1e-12);
    assert!((s.bits_per_byte() - 2.0).abs() < 1e-12);
}

#[test]
fn batched_choice_logliks_match_hf_transformers() {
    let g = golden();
    let ctx: Vec<u32> = serde_json::from_value(g["ctx"].clone()).unwrap();
    let conts: Vec<Vec<u32>> = serde_json::from_value(g["conts"].clone()).unwrap();
    let want: Vec<f64> = serde_json::from_value(g["logliks"].clone()).unwrap();
    let got = choice_loglikelihoods(&fixture_model(), &ctx, &conts, &Device::Cpu).unwrap();
    for (a, b) in got.iter().zip(&want) {
        assert!((a - b).abs() < 1e-4, "{a} vs {b}");
    }
}

#[test]
fn acc_and_acc_norm_by_hand() {
    // Choice 0: ll −4 over 2 bytes (−2/byte); choice 1: ll −3 over 1 byte (−3/byte).
    // acc picks 1 (−3 > −4), acc_norm picks 0 (−2 > −3).
    assert_eq!(pick(&[-4.0, -3.0], &[2, 1]), (1, 0));
    assert_eq!(pick(&[-1.0, -3.0, -2.0], &[10, 1, 1]), (0, 0));
    // lm-eval's sample standard error: p = 0.5 over 5 questions → sqrt(0.25/4) = 0.25.
    assert!((stderr_of(0.5, 5) - 0.25).abs() < 1e-12);
    assert_eq!(stderr_of(1.0, 1), 0.0);
}

#[test]
fn task_formats_load() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(
        d.join("task.json"),
        r#"{"name": "t", "examples": [{"input": "2 + 2 =", "target_scores": {"3": 0, "4": 1, "5": 0}}]}"#,
    )
    .unwrap();
    let bb = load_task(&d.join("task.json")).unwrap();
    assert_eq!(bb[0].context, "2 + 2 =");
    assert_eq!(bb[0].choices[bb[0].gold], " 4");
    std::fs::write(
        d.join("hs.jsonl"),
        "{\"ctx\": \"A man\", \"endings\": [\"runs.\", \"flies.\"], \"label\": \"1\"}\n",
    )
    .unwrap();
    let hs = load_task(&d.join("hs.jsonl")).unwrap();
    assert_eq!((hs[0].choices.clone(), hs[0].gold), (vec![" runs.".to_string(), " flies.".to_string()], 1));
    std::fs::write(
        d.join("piqa.jsonl"),
        "{\"goal\": \"Open a jar\", \"sol1\": \"twist\", \"sol2\": \"kick\", \"label\": 0}\n",
    )
    .unwrap();
    let pq = load_task(&d.join("piqa.jsonl")).unwrap();
    assert_eq!(pq[0].context, "Question: Open a jar\nAnswer:");
    assert_eq!(pq[0].gold, 0);
    std::fs::write(
        d.join("arc.jsonl"),
        "{\"question\": \"Sky?\", \"choices\": {\"text\": [\"green\", \"blue\"], \"label\": [\"A\", \"B\"]}, \"answerKey\": \"B\"}\n",
    )
    .unwrap();
    let arc = load_task(&d.join("arc.jsonl")).unwrap();
    assert_eq!((arc[0].choices[1].as_str(), arc[0].gold), (" blue", 1));
    // Bad files name the file and line.
    std::fs::write(d.join("bad.jsonl"), "{\"ctx\": \"x\", \"endings\": [\"a\", \"b\"], \"label\": 0}\n{\"foo\": 1}\n")
        .unwrap();
    let e = load_task(&d.join("bad.jsonl")).unwrap_err().to_string();
    assert!(e.contains("bad.jsonl") && e.contains("line 2"), "{e}");
    std::fs::write(d.join("gold.jsonl"), "{\"ctx\": \"x\", \"endings\": [\"a\", \"b\"], \"label\": 5}\n").unwrap();
    assert!(load_task(&d.join("gold.jsonl")).unwrap_err().to_string().contains("gold index 5"));
}

#[test]
fn tiny_task_scored_end_to_end() {
    // A trained-on-nothing model with a byte-level tokenizer; the expected answers are computed
    // independently, one unbatched forward per choice through the model crate's scorer.
    let texts: Vec<String> = (0..20).map(|i| format!("the cat sat on mat number {i}")).collect();
    let cfg = patchlm_data::tokenizer::TokenizerConfig { vocab_size: 300, ..Default::default() };
    let tok = patchlm_data::tokenizer::train_bpe(texts.iter(), &cfg).unwrap();
    let mut mc = patchlm_model::ModelConfig::preset("tiny").unwrap();
    mc.vocab_size = 320;
    let (model, _) = patchlm_model::init_model(&mc, &Device::Cpu, 5).unwrap();
    let examples = vec![
        McExample {
            context: "the cat".into(),
            choices: vec![" sat".into(), " flew away".into(), " x".into()],
            gold: 0,
        },
        McExample { context: "on mat".into(), choices: vec![" number".into(), " cat".into()], gold: 1 },
        McExample { context: "number".into(), choices: vec![" 1".into(), " 22".into()], gold: 1 },
    ];
    let bos = tok.token_to_id("<|bos|>");
    let r = score_task(&model, &tok, bos, "tiny", &examples, &Device::Cpu, false).unwrap();
    let (mut hits, mut hits_norm) = (0, 0);
    for e in &examples {
        let mut lls = Vec::new();
        for c in &e.choices {
            let mut ids: Vec<u32> = bos.into_iter().collect();
            ids.extend(tok.encode(e.context.as_str(), false).unwrap().get_ids());
            let n_ctx = ids.len();
            ids.extend(tok.encode(c.as_str(), false).unwrap().get_ids());
            let lp = patchlm_model::score_tokens(&model, &ids, &Device::Cpu).unwrap();
            lls.push(lp[n_ctx - 1..].iter().map(|&x| x as f64).sum::<f64>());
        }
        let lens: Vec<usize> = e.choices.iter().map(|c| c.len()).collect();
        let (a, an) = pick(&lls, &lens);
        hits += usize::from(a == e.gold);
        hits_norm += usize::from(an == e.gold);
    }
    assert_eq!(r.n, 3);
    assert!((r.acc - hits as f64 / 3.0).abs() < 1e-12, "{r:?}");
    assert!((r.acc_norm - hits_norm as f64 / 3.0).abs() < 1e-12, "{r:?}");
}

//! Eval tests: perplexity windows against HF transformers, batched choice log-likelihoods against
//! HF, lm-eval's acc / acc_norm rules by hand, the task formats, lm-eval's own prompts and pair
//! encoding (golden values), and bad task files.

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
    let s = NllSum { tokens: 4, nll: 4.0 * 2f64.ln(), bytes: 2, words: 1, documents: 1 };
    assert!((s.perplexity() - 2.0).abs() < 1e-12);
    assert!((s.bits_per_byte() - 2.0).abs() < 1e-12);
}

/// A window of no tokens or a stride of none is refused (a stride of 0 ran as 1: a forward pass
/// per token), and so is one longer than the model's positions or a stride longer than the window.
#[test]
fn empty_windows_are_refused() {
    let model = fixture_model();
    for (context, stride, want) in [
        (0, None, "at least 1 token"),
        (16, Some(0), "at least 1 token"),
        // Longer than the model's 64 positions, or a stride past the window: refused, not
        // quietly cut to what fits (the run's --json would record numbers it did not use).
        (65, None, "longer than the model's 64 positions"),
        (16, Some(17), "a stride of 17 tokens is longer than the window (16)"),
    ] {
        let e = sequence_nlls(&model, &[1, 2, 3, 4], &WindowConfig { context, stride }, &Device::Cpu).unwrap_err();
        assert!(e.to_string().contains(want), "{e}");
    }
    assert!(sequence_nlls(&model, &[1, 2, 3, 4], &WindowConfig { context: 64, stride: Some(64) }, &Device::Cpu).is_ok());
}

#[test]
fn batched_choice_logliks_match_hf_transformers() {
    let g = golden();
    let ctx: Vec<u32> = serde_json::from_value(g["ctx"].clone()).unwrap();
    let conts: Vec<Vec<u32>> = serde_json::from_value(g["conts"].clone()).unwrap();
    let want: Vec<f64> = serde_json::from_value(g["logliks"].clone()).unwrap();
    let got = choice_loglikelihoods(&fixture_model(), &ctx, &conts, &Device::Cpu).unwrap();
    assert_eq!((got.len(), want.len()), (conts.len(), conts.len()), "one log-likelihood per choice");
    for (a, b) in got.iter().zip(&want) {
        assert!((a - b).abs() < 1e-4, "{a} vs {b}");
    }
}

/// Pairs longer than the context are cut on the left, as lm-eval cuts them (the last T + 1 ids,
/// T of them fed): the scores equal the one-sequence scores of what is kept, each pair in a
/// batch of different lengths. A continuation of T tokens fits (one token of context before it);
/// one of T + 1 is refused.
#[test]
fn long_pairs_are_cut_on_the_left_and_too_long_continuations_refused() {
    let model = fixture_model();
    let t = model.config().max_position_embeddings;
    let ids: Vec<u32> = (0..t as u32 + 20).map(|i| (i * 7 + 3) % 60 + 1).collect();
    let pairs = vec![
        (ids[..t + 15].to_vec(), ids[t + 15..].to_vec()),
        (ids[..5].to_vec(), ids[5..9].to_vec()),
        (ids[..2].to_vec(), ids[2..t + 1].to_vec()),
        // Exactly T + 1 ids: nothing is cut. Exactly T: one short of the cut.
        (ids[..1].to_vec(), ids[1..t + 1].to_vec()),
        (ids[..3].to_vec(), ids[3..t].to_vec()),
    ];
    let got = pair_loglikelihoods(&model, &pairs, &Device::Cpu).unwrap();
    for ((ctx, cont), g) in pairs.iter().zip(&got) {
        let all: Vec<u32> = ctx.iter().chain(cont).copied().collect();
        let kept = &all[all.len().saturating_sub(t + 1)..];
        let lp = patchlm_model::score_tokens(&model, kept, &Device::Cpu).unwrap();
        let want: f64 = lp[lp.len() - cont.len()..].iter().map(|&x| f64::from(x)).sum();
        assert!((g - want).abs() < 1e-3, "{g} vs {want}");
    }
    let too_long = vec![(ids[..3].to_vec(), ids[3..t + 4].to_vec())];
    let e = pair_loglikelihoods(&model, &too_long, &Device::Cpu).unwrap_err().to_string();
    assert!(e.contains(&format!("continuation of {} tokens", t + 1)), "{e}");
}

#[test]
fn acc_and_acc_norm_by_hand() {
    // Choice 0: ll −4 over 2 characters (−2 each); choice 1: ll −3 over 1 character (−3).
    // acc picks 1 (−3 > −4), acc_norm picks 0 (−2 > −3).
    assert_eq!(pick(&[-4.0, -3.0], &[2, 1]), (1, 0));
    assert_eq!(pick(&[-1.0, -3.0, -2.0], &[10, 1, 1]), (0, 0));
    // Ties go to the first, as numpy's argmax: -2 twice for acc, and -2/1 = -2/1 = -4/2 for acc_norm.
    assert_eq!(pick(&[-3.0, -2.0, -2.0, -4.0], &[1, 1, 1, 2]), (1, 1));
    // lm-eval's sample standard error: 0/1 values, p = 0.4 over 5 questions → sqrt(0.24/4);
    // 0, ½, 1: sample variance ¼ over 3 → sqrt(1/12); one value: 0.
    assert!((stderr_of(&[1.0, 0.0, 1.0, 0.0, 0.0]) - 0.06f64.sqrt()).abs() < 1e-12);
    assert!((stderr_of(&[0.0, 0.5, 1.0]) - (1.0f64 / 12.0).sqrt()).abs() < 1e-12);
    assert_eq!(stderr_of(&[1.0]), 0.0);
    // Two questions, one right: sample variance 0.5, over 2, square root.
    assert!((stderr_of(&[0.0, 1.0]) - 0.5).abs() < 1e-12);
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
    assert_eq!(bb[0].context, "\nQ: 2 + 2 =\n  choice: 3\n  choice: 4\n  choice: 5\nA: ");
    assert_eq!((bb[0].choices[bb[0].gold].as_str(), &bb[0].scores[..]), ("4", &[0.0, 1.0, 0.0][..]));
    std::fs::write(
        d.join("hs.jsonl"),
        "{\"ctx\": \"A man\", \"endings\": [\"runs.\", \"flies.\"], \"label\": \"1\"}\n",
    )
    .unwrap();
    let hs = load_task(&d.join("hs.jsonl")).unwrap();
    assert_eq!((hs[0].choices.clone(), hs[0].gold), (vec![" runs.".to_string(), " flies.".to_string()], 1));
    // Compressed as the data stage reads inputs: gzip by name, zstd by its first bytes; a
    // compressed Parquet file is refused by name.
    let plain = std::fs::read(d.join("hs.jsonl")).unwrap();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    std::io::Write::write_all(&mut gz, &plain).unwrap();
    std::fs::write(d.join("hs.jsonl.gz"), gz.finish().unwrap()).unwrap();
    assert_eq!(load_task(&d.join("hs.jsonl.gz")).unwrap(), hs);
    std::fs::write(
        d.join("bb.download"),
        zstd::stream::encode_all(&std::fs::read(d.join("task.json")).unwrap()[..], 3).unwrap(),
    )
    .unwrap();
    assert_eq!(load_task(&d.join("bb.download")).unwrap(), bb);
    std::fs::write(d.join("t.parquet.gz"), b"x").unwrap();
    let e = load_task(&d.join("t.parquet.gz")).unwrap_err().to_string();
    assert!(e.contains("t.parquet.gz: a compressed Parquet file"), "{e}");
    // A bad Parquet row is named by its number, counted from 1 (the file is pyarrow's, written by
    // fixtures/make_task_golden.py).
    let fixtures = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tasks");
    let e = load_task(&fixtures.join("mmlu_bad_row.parquet")).unwrap_err().to_string();
    assert!(e.contains("mmlu_bad_row.parquet: row 2: 4 choices with gold index 9"), "{e}");
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
    // A .jsonl file holds records, one a line, even when its one line looks like a BIG-bench
    // task.json: that line is read as a record, and is none.
    std::fs::write(
        d.join("task.jsonl"),
        "{\"examples\": [{\"input\": \"2 + 2?\", \"target_scores\": {\"4\": 1, \"5\": 0}}]}\n",
    )
    .unwrap();
    let e = load_task(&d.join("task.jsonl")).unwrap_err().to_string();
    assert!(e.contains("task.jsonl: line 1"), "{e}");
    std::fs::write(d.join("task.json"), std::fs::read(d.join("task.jsonl")).unwrap()).unwrap();
    assert_eq!(load_task(&d.join("task.json")).unwrap()[0].choices, ["4", "5"], "the same text as task.json");
    std::fs::write(d.join("gold.jsonl"), "{\"ctx\": \"x\", \"endings\": [\"a\", \"b\"], \"label\": 5}\n").unwrap();
    assert!(load_task(&d.join("gold.jsonl")).unwrap_err().to_string().contains("gold index 5"));
    // A JSON array names the record; MMLU takes a letter as the answer too; WinoGrande needs
    // its blank and an answer of "1" or "2".
    let records = r#"[{"question": "1 + 1?", "choices": ["1", "2"], "answer": "B"},
        {"sentence": "no blank", "option1": "a", "option2": "b", "answer": "1"}]"#;
    std::fs::write(d.join("mixed.json"), records).unwrap();
    let e = load_task(&d.join("mixed.json")).unwrap_err().to_string();
    assert!(e.contains("mixed.json: example 2") && e.contains("no \"_\" blank"), "{e}");
    std::fs::write(
        d.join("mmlu.jsonl"),
        "{\"question\": \"1 + 1?\", \"choices\": [\"1\", \"2\"], \"answer\": \"B\"}\n",
    )
    .unwrap();
    let m = load_task(&d.join("mmlu.jsonl")).unwrap();
    assert_eq!(
        (m[0].context.as_str(), m[0].choices.clone(), m[0].gold),
        ("1 + 1?\nA. 1\nB. 2\nAnswer:", vec![" A".to_string(), " B".to_string()], 1)
    );
    // Letters A to Z: 26 choices load, 27 do not.
    let rec = serde_json::json!({"question": "?", "choices": (0..26).map(|i| i.to_string()).collect::<Vec<_>>(), "answer": "Z"});
    std::fs::write(d.join("az.jsonl"), format!("{rec}\n")).unwrap();
    let az = load_task(&d.join("az.jsonl")).unwrap();
    assert_eq!((az[0].choices.len(), az[0].gold, az[0].choices[25].as_str()), (26, 25, " Z"));
    let rec = serde_json::json!({"question": "?", "choices": (0..27).map(|i| i.to_string()).collect::<Vec<_>>(), "answer": 0});
    std::fs::write(d.join("many.jsonl"), format!("{rec}\n")).unwrap();
    assert!(load_task(&d.join("many.jsonl")).unwrap_err().to_string().contains("more than 26 choices"));
    let many: Vec<String> = (0..300).map(|i| i.to_string()).collect();
    let rec = serde_json::json!({"question": "?", "choices": many, "answer": 0});
    std::fs::write(d.join("many.jsonl"), format!("{rec}\n")).unwrap();
    let e = load_task(&d.join("many.jsonl")).unwrap_err().to_string();
    assert!(e.contains("more than 26 choices"), "{e}");
    std::fs::write(
        d.join("wg.jsonl"),
        "{\"sentence\": \"I _ it.\", \"option1\": \"a\", \"option2\": \"b\", \"answer\": \"\"}\n",
    )
    .unwrap();
    let e = load_task(&d.join("wg.jsonl")).unwrap_err().to_string();
    assert!(e.contains("wg.jsonl: line 1") && e.contains("\"answer\""), "{e}");
    // Answer "2" is the second option; a line that is no JSON is named by its number.
    std::fs::write(
        d.join("wg2.jsonl"),
        "{\"sentence\": \"I _ it.\", \"option1\": \"a\", \"option2\": \"b\", \"answer\": \"2\"}\n",
    )
    .unwrap();
    assert_eq!(load_task(&d.join("wg2.jsonl")).unwrap()[0].gold, 1);
    std::fs::write(
        d.join("broken.jsonl"),
        format!("{}\n\n{{\"ctx\": \n", std::fs::read_to_string(d.join("hs.jsonl")).unwrap().trim()),
    )
    .unwrap();
    let e = load_task(&d.join("broken.jsonl")).unwrap_err().to_string();
    assert!(e.contains("broken.jsonl: line 3: invalid json"), "{e}");
    // One record on one line in a .json file is JSONL of one line, not a BIG-bench task.
    std::fs::copy(d.join("hs.jsonl"), d.join("one.json")).unwrap();
    assert_eq!(load_task(&d.join("one.json")).unwrap(), hs);
    // lm-eval's HellaSwag cleaning (its preprocess run on the same text): markers go, a "[" with
    // no "]" before the line's end stays.
    assert_eq!(
        hellaswag_clean(" Cut [step 1] the [onion\nthen] stir [title] Done. "),
        "Cut the [onion\nthen] stir. Done."
    );
    std::fs::write(d.join("empty.jsonl"), "\n\n").unwrap();
    let e = load_task(&d.join("empty.jsonl")).unwrap_err().to_string();
    assert!(e.ends_with("empty.jsonl: no examples"), "{e}");
    // BIG-bench: a question needs a right answer, scores are numbers, settings have their types.
    for (task, want) in [
        (r#"{"examples": [{"input": "a", "target_scores": {"x": 1, "y": 1}}]}"#, "example 1: no correct choice"),
        (r#"{"examples": [{"input": "a", "target_scores": {"x": 1}}]}"#, "example 1: no correct choice"),
        (r#"{"examples": [{"input": "a", "target_scores": {"x": "1", "y": 0}}]}"#, "score of \"x\" is not a number"),
        (r#"{"examples": [{"input": "a", "target": "x"}]}"#, "example 1: example lacks \"target_scores\""),
        (
            r#"{"task_prefix": 3, "examples": [{"input": "a", "target_scores": {"x": 1, "y": 0}}]}"#,
            "\"task_prefix\" is not a string",
        ),
        (r#"{"append_choices_to_input": "no", "examples": []}"#, "\"append_choices_to_input\" is not true or false"),
        (r#"{"examples": []}"#, "bb.json: no examples"),
    ] {
        std::fs::write(d.join("bb.json"), task).unwrap();
        let e = load_task(&d.join("bb.json")).unwrap_err().to_string();
        assert!(e.contains("bb.json") && e.contains(want), "{task}: {e}");
    }
    // BIG-bench's hub records: the right answer must be a choice; a file of generative records
    // only has no questions.
    for (rec, want) in [
        (
            r#"{"inputs": "q", "targets": ["z"], "multiple_choice_targets": ["x", "y"]}"#,
            "line 1: targets[0] \"z\" is not one of",
        ),
        (r#"{"inputs": "q", "multiple_choice_targets": ["x", "y"]}"#, "line 1: missing \"targets\""),
        (r#"{"inputs": "q", "targets": ["x"], "multiple_choice_targets": []}"#, "hub.jsonl: no examples"),
        // Without the column of choices at all it is no hub record (which always has it), and no
        // known record either: refused, not dropped as a generative one.
        (r#"{"inputs": "q", "targets": ["x"]}"#, "hub.jsonl: line 1: "),
    ] {
        std::fs::write(d.join("hub.jsonl"), format!("{rec}\n")).unwrap();
        let e = load_task(&d.join("hub.jsonl")).unwrap_err().to_string();
        assert!(e.contains(want), "{rec}: {e}");
    }
    // A subtask's error names its own file.
    let sub = d.join("composite");
    std::fs::create_dir_all(sub.join("part")).unwrap();
    std::fs::write(sub.join("task.json"), r#"{"name": "composite"}"#).unwrap();
    std::fs::write(sub.join("part/task.json"), r#"{"examples": [{"input": "a"}]}"#).unwrap();
    let e = load_task(&sub.join("task.json")).unwrap_err().to_string();
    assert!(e.contains("part/task.json: example 1"), "{e}");
    // A composite's task.json without its folders (named alone, as an hf:// file would come)
    // says so, instead of failing as a JSONL line.
    let lone = d.join("lone");
    std::fs::create_dir_all(&lone).unwrap();
    std::fs::write(lone.join("task.json"), "{\n  \"name\": \"composite\"\n}\n").unwrap();
    let e = load_task(&lone.join("task.json")).unwrap_err().to_string();
    assert!(e.contains("lone/task.json: a JSON object that is no task") && e.contains("name its folder"), "{e}");
}

/// The prompts, choices, gold answers and normalising lengths lm-eval-harness 0.4.13 makes of
/// BIG-bench's own JsonTask on the task files under tests/fixtures/tasks/bigbench
/// (tests/fixtures/make_bigbench_golden.py): each question's prompt as BIG-bench poses it
/// zero-shot (its prefixes, a task's own ones, choices listed in numpy's shuffled order or not
/// at all, duplicates dropped, subtasks from folders or from the file), its choices and target
/// scores; and the `multiple_choice_grade` BIG-bench computed from a stand-in model's
/// log-likelihoods, which the picks' mean credit must equal (several right answers, partial
/// credit, a composite's example-weighted aggregate).
#[test]
fn bigbench_prompts_and_grades() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tasks/bigbench");
    let g: serde_json::Value = serde_json::from_str(include_str!("fixtures/bigbench_golden.json")).unwrap();
    for (file, want) in g.as_object().unwrap() {
        let examples = load_task(&dir.join(file)).unwrap();
        let questions = want["questions"].as_array().unwrap();
        assert_eq!(examples.len(), questions.len(), "{file}");
        let mut credits = Vec::new();
        for (n, (e, q)) in examples.iter().zip(questions).enumerate() {
            assert_eq!(e.context, q["prompt"].as_str().unwrap(), "{file} question {n}");
            // The choices in the order BIG-bench asks for them (the file's), with their scores.
            let asked: Vec<String> = serde_json::from_value(q["choices"].clone()).unwrap();
            let scores: Vec<f64> = asked.iter().map(|c| q["target_scores"][c].as_f64().unwrap()).collect();
            assert_eq!((&e.choices, &e.scores), (&asked, &scores), "{file} question {n}");
            let lls: Vec<f64> = serde_json::from_value(q["loglikelihoods"].clone()).unwrap();
            let lens: Vec<usize> = (0..e.choices.len()).map(|i| e.norm_len(i)).collect();
            credits.push(e.credit(pick(&lls, &lens).0));
        }
        let grade = credits.iter().sum::<f64>() / credits.len() as f64;
        let want = want["multiple_choice_grade"].as_f64().unwrap();
        assert!((grade - want).abs() < 1e-12, "{file}: grade {grade} against BIG-bench's {want}");
    }
}

/// Several files as one task (an `hf://` folder resolves to every file under it): a composite
/// `task.json` and its subtasks' `task.json` files count each question once, as the composite
/// alone does; a `task.json` under a task that has its own examples is a task of its own.
#[test]
fn task_files_count_a_composites_subtasks_once() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tasks/bigbench");
    let c = dir.join("composite");
    let composite = load_task(&c.join("task.json")).unwrap();
    let (a, b) = (load_task(&c.join("a_sub/task.json")).unwrap(), load_task(&c.join("b_sub/task.json")).unwrap());
    assert_eq!(composite.len(), a.len() + b.len());
    let files = [c.join("task.json"), c.join("a_sub/task.json"), c.join("b_sub/task.json")];
    assert_eq!(load_task_files(&files).unwrap(), composite);
    // The subtasks without their composite are each read.
    assert_eq!(load_task_files(&files[1..]).unwrap(), [a.clone(), b].concat());
    // A task with examples reads no folders: a task.json below it counts as its own.
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    std::fs::create_dir_all(t.join("inner")).unwrap();
    std::fs::copy(dir.join("plain/task.json"), t.join("task.json")).unwrap();
    std::fs::copy(c.join("a_sub/task.json"), t.join("inner/task.json")).unwrap();
    let plain = load_task(&t.join("task.json")).unwrap();
    let both = load_task_files(&[t.join("task.json"), t.join("inner/task.json")]).unwrap();
    assert_eq!(both, [plain, a].concat());
}

/// HellaSwag, MMLU, WinoGrande, ARC, PIQA and the hub's BIG-bench records (tests/fixtures/make_task_golden.py, which
/// ran lm-eval's own task code and templates), from the records as the hub serves them: Parquet
/// written by pyarrow (lists, a struct of lists, strings, integers), a JSON array with nested
/// objects, JSONL. And
/// lm-eval's `_encode_pair` on a byte-level BPE.
#[test]
fn lm_eval_prompts_and_pairs() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let g: serde_json::Value = serde_json::from_str(include_str!("fixtures/task_golden.json")).unwrap();
    for (task, file) in [
        ("hellaswag", "hellaswag.parquet"),
        ("mmlu", "mmlu.parquet"),
        ("winogrande", "winogrande.parquet"),
        ("arc", "arc.json"),
        ("arc", "arc.parquet"),
        ("piqa", "piqa.jsonl"),
        ("bigbench_hf", "bigbench_hf.parquet"),
    ] {
        let examples = load_task(&dir.join("tasks").join(file)).unwrap();
        let want = g[task].as_array().unwrap();
        assert_eq!(examples.len(), want.len(), "{task}");
        for (n, (e, w)) in examples.iter().zip(want).enumerate() {
            let pairs: Vec<(String, String)> = serde_json::from_value(w["pairs"].clone()).unwrap();
            let got: Vec<(String, String)> = e.pairs().map(|(c, x)| (c.to_string(), x.to_string())).collect();
            assert_eq!(got, pairs, "{task} example {n}");
            assert_eq!(e.gold, w["gold"].as_u64().unwrap() as usize, "{task} example {n}");
            let lens: Vec<usize> = serde_json::from_value(w["norm_lens"].clone()).unwrap();
            assert_eq!((0..e.choices.len()).map(|i| e.norm_len(i)).collect::<Vec<_>>(), lens, "{task} example {n}");
        }
    }
    let tok = tokenizers::Tokenizer::from_file(dir.join("tasks/tokenizer.json")).unwrap();
    for case in g["encode_pair"].as_array().unwrap() {
        let (ctx, cont): (String, String) = serde_json::from_value(case["pair"].clone()).unwrap();
        let want: (Vec<u32>, Vec<u32>) = serde_json::from_value(case["ids"].clone()).unwrap();
        assert_eq!(encode_pair(&tok, None, &ctx, &cont).unwrap(), want, "{ctx:?} + {cont:?}");
        // BOS starts the context.
        let (c, x) = encode_pair(&tok, Some(7), &ctx, &cont).unwrap();
        assert_eq!((c[0], &c[1..], x), (7, &want.0[..], want.1));
    }
}

/// A byte-level BPE of 300 ids trained on `texts` and an untrained `tiny` model (320 ids) drawn
/// with `seed`.
fn bpe_and_untrained_model(texts: &[String], seed: u64) -> (tokenizers::Tokenizer, patchlm_model::Llama) {
    let cfg = patchlm_data::tokenizer::TokenizerConfig { vocab_size: 300, ..Default::default() };
    let tok = patchlm_data::tokenizer::train_bpe(texts.iter(), &cfg).unwrap();
    let mut mc = patchlm_model::ModelConfig::preset("tiny").unwrap();
    mc.vocab_size = 320;
    (tok, patchlm_model::init_model(&mc, &Device::Cpu, seed).unwrap().0)
}

#[test]
fn tiny_task_scored_end_to_end() {
    // A trained-on-nothing model with a byte-level tokenizer; the expected answers are computed
    // independently, one unbatched forward per choice through the model crate's scorer.
    let texts: Vec<String> = (0..20).map(|i| format!("the cat sat on mat number {i}")).collect();
    let (tok, model) = bpe_and_untrained_model(&texts, 5);
    let examples = vec![
        McExample::new("the cat", vec![" sat".into(), " flew away".into(), " x".into()], 0),
        McExample::new("on mat", vec![" number".into(), " cat".into()], 1),
        McExample::new("number", vec![" 1".into(), " 22".into()], 1),
    ];
    let bos = tok.token_to_id("<|bos|>");
    let r = score_task(&model, &tok, bos, "tiny", &examples, &Device::Cpu, false).unwrap();
    let (mut hits, mut hits_norm) = (0, 0);
    assert_eq!(r.samples.len(), examples.len());
    for (e, sample) in examples.iter().zip(&r.samples) {
        let mut lls = Vec::new();
        for c in &e.choices {
            // lm-eval 0.4: the whole encoded, the continuation what follows the context's tokens.
            let mut ids: Vec<u32> = bos.into_iter().collect();
            let n_ctx = ids.len() + tok.encode(e.context.as_str(), false).unwrap().len();
            ids.extend(tok.encode(format!("{}{c}", e.context), false).unwrap().get_ids());
            let lp = patchlm_model::score_tokens(&model, &ids, &Device::Cpu).unwrap();
            lls.push(lp[n_ctx - 1..].iter().map(|&x| x as f64).sum::<f64>());
        }
        // acc_norm: characters of each choice without its leading space.
        let lens: Vec<usize> = e.choices.iter().map(|c| c.trim_start().chars().count()).collect();
        // Each question's scores as the result records them (eval --samples).
        assert_eq!((sample.gold, &sample.lengths), (e.gold, &lens));
        for (got, want) in sample.loglikelihoods.iter().zip(&lls) {
            assert!((got - want).abs() < 1e-4, "{got} vs {want}");
        }
        let (a, an) = pick(&lls, &lens);
        hits += usize::from(a == e.gold);
        hits_norm += usize::from(an == e.gold);
    }
    assert_eq!(r.n, 3);
    assert!((r.acc - hits as f64 / 3.0).abs() < 1e-12, "{r:?}");
    assert!((r.acc_norm - hits_norm as f64 / 3.0).abs() < 1e-12, "{r:?}");
}

#[test]
fn validation_split_perplexity_equals_scoring_its_texts() {
    // Two independent paths: the stored (already framed) token ids of the validation split, and
    // the decoded texts written to JSONL and re-encoded by perplexity_of_texts, which scores a
    // text as lm-eval does: after BOS, without the EOS training put after it.
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut jsonl = String::new();
    for i in 0..120 {
        let text = format!("Line {i} of the fox.\nThe quick brown fox {} jumps over the lazy dog {}.", i * 7, i % 5);
        jsonl += &serde_json::json!({ "text": text }).to_string();
        jsonl.push('\n');
    }
    std::fs::write(d.join("c.jsonl"), jsonl).unwrap();
    let mut cfg = patchlm_data::DataConfig::default();
    cfg.tokenizer.vocab_size = 300;
    cfg.val_fraction = 0.2;
    patchlm_data::build_shards(&[d.join("c.jsonl")], &d.join("s"), &cfg, patchlm_data::TokenizerSource::Train, false)
        .unwrap();
    let ds = patchlm_data::Dataset::open(d.join("s")).unwrap();
    let tok = patchlm_data::tokenizer::load_tokenizer(&d.join("s/tokenizer.json")).unwrap();
    let mut mc = patchlm_model::ModelConfig::preset("tiny").unwrap();
    mc.vocab_size = 320;
    mc.max_position_embeddings = 32;
    let (model, _) = patchlm_model::init_model(&mc, &Device::Cpu, 9).unwrap();
    let w = WindowConfig { context: 32, stride: Some(8) };
    let val = patchlm_data::Split::Val;
    let a = perplexity_of_split(&model, &tok, &ds, val, &w, &Device::Cpu, None, false).unwrap();
    let docs = ds.manifest().documents(val);
    assert_eq!(a.documents, docs);
    let texts = split_texts(&tok, &ds, val).unwrap();
    let mut out = String::new();
    for t in &texts {
        out += &serde_json::json!({ "text": t }).to_string();
        out.push('\n');
    }
    std::fs::write(d.join("val.jsonl"), out).unwrap();
    let specials = ds.manifest().special_tokens;
    let bos = specials.bos.unwrap();
    let docs_of = |p: &std::path::Path| patchlm_data::Documents::open(&[p], &Default::default()).unwrap();
    let b = perplexity_of_texts(&model, &tok, bos, docs_of(&d.join("val.jsonl")), &w, &Device::Cpu, false).unwrap();
    // The stored documents without their last token (the EOS), scored one by one.
    let mut c = NllSum::default();
    for (i, t) in texts.iter().enumerate() {
        let ids = ds.split(val).document(i as u64).unwrap().to_vec();
        assert_eq!((ids[0], *ids.last().unwrap()), (bos, specials.eos));
        c.add(&score_document(&model, &ids[..ids.len() - 1], t, &w, &Device::Cpu).unwrap());
    }
    assert_eq!((b.tokens, b.bytes, b.words, b.documents), (c.tokens, c.bytes, c.words, c.documents));
    assert_eq!((a.tokens, a.bytes, a.words), (b.tokens + docs, b.bytes, b.words));
    assert!((b.nll - c.nll).abs() < 1e-6 * c.nll, "{b:?} vs {c:?}");
    assert!(a.nll > b.nll, "the split's EOS tokens add to its loss: {a:?} vs {b:?}");
    assert_eq!(a.bytes, texts.iter().map(|t| t.len() as u64).sum::<u64>());
    // Two lines of 5 and 11 words: 16 words a text, as Python's re.split(r"\s+") counts.
    assert_eq!(a.words, 16 * docs);
    // A cap on documents is honoured.
    let one = perplexity_of_split(&model, &tok, &ds, val, &w, &Device::Cpu, Some(1), false).unwrap();
    assert_eq!(one.documents, 1);
}

#[test]
fn words_are_counted_as_lm_eval_counts_them() {
    // len(re.split(r"\s+", text)) in Python 3.11, by hand: runs of whitespace + 1.
    for (text, want) in [
        ("", 1),
        ("one", 1),
        ("two  words", 2),
        (" lead and trail\n", 5),
        ("tab\tnew\nline\r\nform\x0cfeed", 5),
        ("no\u{a0}break\u{3000}ideographic", 3),
        ("unit\u{1f}separator\u{1c}file", 3),
        ("zero\u{200b}width", 1),
    ] {
        assert_eq!(count_words(text), want, "{text:?}");
    }
    let s = NllSum { tokens: 6, nll: 6.0, bytes: 10, words: 3, documents: 1 };
    assert!((s.word_perplexity() - 2f64.exp()).abs() < 1e-12);
}

/// `--text` encodes as lm-eval's HF tokenizer does: a special token's string in the text is
/// that token (the data stage's ordinary encoding would spell it out in characters).
#[test]
fn text_perplexity_encodes_special_strings_as_lm_eval_does() {
    let dir = tempfile::tempdir().unwrap();
    let texts: Vec<String> = (0..40).map(|i| format!("the cat {i} sat on the mat")).collect();
    let (tok, model) = bpe_and_untrained_model(&texts, 3);
    let text = "the cat<|eos|> sat";
    std::fs::write(dir.path().join("t.txt"), text).unwrap();
    let bos = tok.token_to_id("<|bos|>").unwrap();
    let w = WindowConfig { context: 64, stride: None };
    let docs = patchlm_data::Documents::open(&[dir.path().join("t.txt")], &Default::default()).unwrap();
    let got = perplexity_of_texts(&model, &tok, bos, docs, &w, &Device::Cpu, false).unwrap();
    let hf = tok.encode(text, false).unwrap().get_ids().to_vec();
    assert!(hf.contains(&tok.token_to_id("<|eos|>").unwrap()), "{hf:?}");
    assert_ne!(hf, patchlm_data::tokenizer::encode_text(&tok, text).unwrap());
    let want = score_document(&model, &[&[bos][..], &hf].concat(), text, &w, &Device::Cpu).unwrap();
    assert_eq!((got.tokens, got.bytes), (want.tokens, want.bytes));
    assert!((got.nll - want.nll).abs() < 1e-9 * want.nll, "{got:?} vs {want:?}");
}

fn poem(doc: usize, lines: usize) -> String {
    (0..lines).map(|l| format!("document {doc} says line number {l} with   some words")).collect::<Vec<_>>().join("\n")
}

#[test]
fn continuation_task_draws_true_next_lines_and_round_trips() {
    let texts: Vec<String> = (0..6).map(|d| poem(d, 10)).collect();
    let cfg = ContinuationConfig { examples: 30, ..Default::default() };
    let ex = continuation_task(&texts, &cfg);
    assert_eq!(ex.len(), 30);
    let mut golds = [0usize; 4];
    for e in &ex {
        assert_eq!(e.choices.len(), 4);
        golds[e.gold] += 1;
        // Context: three consecutive lines of one document (whitespace collapsed), gold: the next.
        let words: Vec<&str> = e.context.split(' ').collect();
        let doc = words[1];
        let last: usize = e.context.rsplit("line number ").next().unwrap().split(' ').next().unwrap().parse().unwrap();
        assert_eq!(e.choices[e.gold], format!(" document {doc} says line number {} with some words", last + 1));
        assert!(e.context.starts_with(&format!("document {doc} says line number {}", last - 2)), "{}", e.context);
        // Distractors come from other documents and differ from each other.
        for (i, c) in e.choices.iter().enumerate() {
            if i != e.gold {
                assert!(!c.starts_with(&format!(" document {doc} ")), "{c}");
            }
        }
        let mut u = e.choices.clone();
        u.sort();
        u.dedup();
        assert_eq!(u.len(), 4);
    }
    assert!(golds.iter().all(|&g| g > 0), "gold positions vary: {golds:?}");
    // The questions come in a Fisher-Yates order of the (document, line) places, drawn from
    // SplitMix64 (whose stream the crate's unit test checks against its published values).
    let mut state: u64 = cfg.seed;
    let mut below = |n: usize| {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        ((z ^ (z >> 31)) % n as u64) as usize
    };
    let mut places: Vec<(usize, usize)> = (0..6).flat_map(|d| (3..10).map(move |l| (d, l))).collect();
    for i in (1..places.len()).rev() {
        places.swap(i, below(i + 1));
    }
    let all = continuation_task(&texts, &ContinuationConfig { examples: 100, ..cfg.clone() });
    let order: Vec<(usize, usize)> = all
        .iter()
        .map(|e| {
            let w: Vec<&str> = e.choices[e.gold].split(' ').collect();
            (w[2].parse().unwrap(), w[6].parse().unwrap())
        })
        .collect();
    assert_eq!(order, places);
    assert_eq!(all[..30], ex[..], "the first questions of a longer task are the same");
    // Deterministic per seed, different across seeds.
    assert_eq!(ex, continuation_task(&texts, &cfg));
    assert_ne!(ex, continuation_task(&texts, &ContinuationConfig { seed: 7, ..cfg.clone() }));
    // Written as HellaSwag JSONL, it loads back to the same examples.
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("cont.jsonl");
    write_task_jsonl(&p, &ex).unwrap();
    assert_eq!(load_task(&p).unwrap(), ex);
    // Too little text: no questions rather than an error; one document alone has no distractors.
    assert!(continuation_task(&texts[..1], &cfg).is_empty());
    assert!(continuation_task(&[], &cfg).is_empty());
}

#[test]
fn continuation_distractors_are_half_to_twice_the_gold_line() {
    // Lines of many lengths (about 20 to 110 bytes), so that lengths outside a gold line's window
    // are in the pool, and choices near both ends of it exist.
    let texts: Vec<String> = (0..8)
        .map(|d| {
            (0..12)
                .map(|l| format!("doc {d} line {l}{}", " ab".repeat((l * 7 + d * 13) % 31)))
                .collect::<Vec<_>>()
                .join("\n")
        })
        .collect();
    let cfg = ContinuationConfig { examples: 60, ..Default::default() };
    let ex = continuation_task(&texts, &cfg);
    assert_eq!(ex.len(), 60);
    let (mut shorter, mut longer) = (0, 0);
    for e in &ex {
        let gold = e.choices[e.gold].len() - 1;
        for (i, c) in e.choices.iter().enumerate() {
            let n = c.len() - 1;
            if i != e.gold {
                assert!(2 * n >= gold && n <= 2 * gold, "{n}-byte choice for a {gold}-byte line: {c}");
                shorter += usize::from(4 * n < 3 * gold);
                longer += usize::from(2 * n > 3 * gold);
            }
        }
    }
    // Both ends of the window are drawn from, not only lines near the gold's length.
    assert!(shorter > 0 && longer > 0, "{shorter} shorter, {longer} longer");
}

fn sample_report() -> report::Report {
    use report::{CurvePoint, Report, ReportRun};
    let curve = |scale: f64, k: f64| -> Vec<CurvePoint> {
        (0..6)
            .map(|i| CurvePoint {
                tokens: i as f64 * 1000.0,
                compute: i as f64 * 0.2 * scale,
                secs: i as f64 * 10.0 * scale,
                loss: 5.0 - i as f64 * 0.4 + k,
            })
            .collect()
    };
    let task = |acc: f64| TaskResult {
        task: "continuation".into(),
        n: 100,
        acc,
        acc_stderr: 0.046,
        acc_norm: acc + 0.01,
        acc_norm_stderr: 0.0461,
        samples: Vec::new(),
    };
    let pc = curve(0.5, 0.1);
    Report {
        title: "Test report".into(),
        notes: vec!["A note.".into()],
        runs: vec![
            ReportRun {
                name: "baseline".into(),
                labels: vec![("K".into(), "1".into()), ("λ".into(), "0".into())],
                cost: 1.0,
                tokens: 5000,
                wall_secs: 50.0,
                val_loss: 3.0,
                val_ppl: 3f64.exp(),
                bits_per_byte: 1.25,
                tasks: vec![task(0.31)],
                curve: curve(1.0, 0.0),
                marker: None,
            },
            ReportRun {
                name: "patch K=4 λ=0.667".into(),
                labels: vec![("K".into(), "4".into()), ("λ".into(), "0.667".into())],
                cost: 0.5,
                tokens: 5000,
                wall_secs: 125.0,
                val_loss: 3.1,
                val_ppl: 3.1f64.exp(),
                bits_per_byte: 1.3,
                tasks: vec![task(0.29)],
                marker: Some(pc[3]),
                curve: pc,
            },
        ],
        marker_label: "patch → token switch".into(),
    }
}

#[test]
fn report_table_has_the_papers_columns() {
    let r = sample_report();
    let t = report::markdown_table(&r);
    let lines: Vec<&str> = t.lines().collect();
    assert_eq!(lines.len(), 4, "{t}");
    assert_eq!(
        lines[0],
        "| model | K | λ | cost | tokens | wall time | val loss | val PPL | bits/byte | continuation acc_norm |"
    );
    assert_eq!(lines[2], "| baseline | 1 | 0 | 1.000× | 5.0k | 50.0s | 3.0000 | 20.09 | 1.2500 | 32.0 |");
    assert_eq!(lines[3], "| patch K=4 λ=0.667 | 4 | 0.667 | 0.500× | 5.0k | 2m05s | 3.1000 | 22.20 | 1.3000 | 30.0 |");
    let md = report::markdown(&r);
    assert!(md.starts_with("# Test report\n\nA note.\n\n"));
    assert!(md.contains("| patch K=4 λ=0.667 | continuation | 100 | 29.0 ± 4.6 | 30.0 ± 4.6 |"), "{md}");
    for (stem, _) in report::PLOTS {
        assert!(md.contains(&format!("({stem}.png)")) && md.contains(&format!("({stem}.svg)")));
    }
}

#[test]
fn report_tables_average_several_tasks_and_skip_the_detail_without_any() {
    let mut r = sample_report();
    // One task: its column and no average; 10 columns on every line.
    let t = report::markdown_table(&r);
    assert!(t.lines().all(|l| l.matches('|').count() == 11), "{t}");
    for (run, acc_norm) in r.runs.iter_mut().zip([0.52, 0.47]) {
        let mut t = run.tasks[0].clone();
        (t.task, t.acc_norm) = ("cloze".into(), acc_norm);
        run.tasks.push(t);
    }
    let t = report::markdown_table(&r);
    let lines: Vec<&str> = t.lines().collect();
    assert!(lines[0].ends_with("| continuation acc_norm | cloze acc_norm | avg acc_norm |"), "{t}");
    // Every line has the header's columns: 12 of them, 13 bars.
    for l in &lines {
        assert_eq!(l.matches('|').count(), 13, "{l}");
    }
    // The average of 32.0 and 52.0, and of 30.0 and 47.0.
    assert!(lines[2].ends_with("| 32.0 | 52.0 | 42.0 |"), "{}", lines[2]);
    assert!(lines[3].ends_with("| 30.0 | 47.0 | 38.5 |"), "{}", lines[3]);
    let md = report::markdown(&r);
    assert!(md.contains("| baseline | cloze | 100 | 31.0 ± 4.6 | 52.0 ± 4.6 |"), "{md}");
    for run in &mut r.runs {
        run.tasks.clear();
    }
    let t = report::markdown_table(&r);
    assert!(t.lines().all(|l| l.matches('|').count() == 10), "{t}");
    assert!(!report::markdown(&r).contains("Zero-shot detail"));
}

#[test]
fn report_plots_are_written_as_png_and_svg() {
    let dir = tempfile::tempdir().unwrap();
    let r = sample_report();
    let files = report::write_report(dir.path(), &r).unwrap();
    assert_eq!(files.len(), 8);
    for (stem, title) in report::PLOTS {
        let png = std::fs::read(dir.path().join(format!("{stem}.png"))).unwrap();
        assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
        // IHDR: width and height, big-endian, after the chunk length and type.
        assert_eq!(u32::from_be_bytes(png[16..20].try_into().unwrap()), 1200);
        assert_eq!(u32::from_be_bytes(png[20..24].try_into().unwrap()), 800);
        let svg = std::fs::read_to_string(dir.path().join(format!("{stem}.svg"))).unwrap();
        assert!(svg.contains(title), "{stem}: title");
        assert!(svg.contains("validation loss (nats/token)"), "{stem}: y label");
        assert!(svg.contains("baseline") && svg.contains("patch K=4 λ=0.667"), "{stem}: legend");
        assert!(svg.contains("patch → token switch"), "{stem}: switch legend");
        // One line per run with all its points.
        let lines = svg.matches("<polyline").count();
        assert!(lines >= 2, "{stem}: {lines} polylines");
    }
    let back: report::Report =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("report.json")).unwrap()).unwrap();
    assert_eq!(back, r);
    // No temporary files are left behind.
    assert!(std::fs::read_dir(dir.path()).unwrap().all(|e| !e.unwrap().file_name().to_string_lossy().contains("tmp")));
}

#[test]
fn line_plots_draw_any_series_and_skip_gaps() {
    use report::{LinePlot, Series};
    let dir = tempfile::tempdir().unwrap();
    let plot = LinePlot {
        title: "Loss of a run".into(),
        x_label: "tokens seen".into(),
        y_label: "nats".into(),
        series: vec![
            Series {
                name: "validation".into(),
                points: vec![(0.0, 6.0), (1e4, f64::NAN), (2e4, 4.5), (3e4, 4.0)],
                dots: true,
                marker: Some((2e4, 4.5)),
            },
            Series {
                name: "training".into(),
                points: (0..30).map(|i| (i as f64 * 1e3, 6.5 - 0.08 * i as f64)).collect(),
                dots: false,
                marker: None,
            },
            Series { name: "nothing yet".into(), points: Vec::new(), dots: false, marker: None },
        ],
        marker_label: "switch".into(),
    };
    let files = report::write_plot(dir.path(), "loss", &plot).unwrap();
    assert_eq!(files, vec![dir.path().join("loss.png"), dir.path().join("loss.svg")]);
    let png = std::fs::read(&files[0]).unwrap();
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    // The PNG decodes to the drawing: a white background with the lines' colours on it.
    let img = image::load_from_memory(&png).unwrap().to_rgb8();
    assert_eq!(img.dimensions(), (1200, 800));
    assert_eq!(img.get_pixel(2, 2).0, [255, 255, 255]);
    let colours: std::collections::HashSet<[u8; 3]> = img.pixels().map(|p| p.0).collect();
    assert!(colours.len() > 10, "{} colours", colours.len());
    // Written atomically: no temp file is left.
    let names: Vec<String> =
        std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into()).collect();
    assert_eq!(names.len(), 2, "{names:?}");
    let svg = std::fs::read_to_string(&files[1]).unwrap();
    for t in [
        "Loss of a run",
        "tokens seen",
        "nats",
        "validation",
        "training",
        "nothing yet",
        "switch (ring + vertical line)",
    ] {
        assert!(svg.contains(t), "{t}");
    }
    // Circles: the validation line's 3 finite points (the NaN is a gap, not a point), the
    // marker's ring and the legend's; the x axis counts tokens in k.
    let dots = svg.matches("<circle").count();
    assert!(dots >= 5, "{dots} circles");
    assert!(svg.contains("10.0k") || svg.contains("20.0k"), "x labels in thousands");
    assert!(!svg.contains("NaN"));
    // Each series in a colour of its own: the two with points in the palette's first two.
    let polylines: Vec<&str> = svg.split("<polyline").skip(1).collect();
    for colour in ["#D62728", "#1F77B4"] {
        assert!(polylines.iter().any(|l| l.contains(&format!("stroke=\"{colour}\""))), "no line in {colour}");
    }
}

//! Model tests: HF parity, gradients reach every parameter, seeded init, HF-format round trip,
//! KV-cache decoding, sampling.

#![allow(clippy::unwrap_used)]

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor, Var, D};
use candle_nn::Module;
use patchlm_model::*;

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-llama")
}

/// A fixture directory's `golden.json` (written by the script that made the fixture) and its
/// input ids as a (B, T) tensor.
fn golden(dir: &std::path::Path) -> (serde_json::Value, Tensor) {
    let g: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("golden.json")).unwrap()).unwrap();
    let ids: Vec<Vec<u32>> = serde_json::from_value(g["ids"].clone()).unwrap();
    (g, Tensor::new(ids, &Device::Cpu).unwrap())
}

#[test]
fn logits_match_hf_transformers() {
    // Golden logits from HF transformers' LlamaForCausalLM (tests/fixtures/make_golden.py):
    // GQA (4 query heads, 2 kv heads), RoPE, SwiGLU, RMSNorm with non-trivial weights.
    let dir = fixture();
    let (golden, input) = golden(&dir);
    let want: Vec<f32> = serde_json::from_value(golden["logits"].clone()).unwrap();
    let (model, cfg) = load_pretrained(&dir, &Device::Cpu, DType::F32).unwrap();
    assert_eq!(cfg.num_key_value_heads, 2);
    let got: Vec<f32> = model.forward(&input).unwrap().flatten_all().unwrap().to_vec1().unwrap();
    assert_eq!(got.len(), want.len());
    let max_diff = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    assert!(max_diff <= 1e-4, "max abs diff {max_diff}");
    // Sanity: the logits are far from trivial, so the bound means something.
    let spread = want.iter().fold(0f32, |m, v| m.max(v.abs()));
    assert!(spread > 0.5, "{spread}");
}

#[test]
fn every_parameter_gets_a_gradient() {
    let cfg = ModelConfig::preset("tiny").unwrap();
    let (model, varmap) = init_model(&cfg, &Device::Cpu, 3).unwrap();
    let ids = Tensor::new(&[[1u32, 5, 9, 200, 7, 3, 3, 100], [4, 4, 8, 15, 16, 23, 42, 0]], &Device::Cpu).unwrap();
    let lp = log_softmax(&model.forward(&ids).unwrap()).unwrap();
    let loss = lp.mean_all().unwrap().neg().unwrap();
    let grads = loss.backward().unwrap();
    let named = named_tensors(&varmap).unwrap();
    assert_eq!(named.len(), 2 + cfg.num_hidden_layers * 9 + 1);
    for (name, t) in &named {
        let g = grads.get(t).unwrap_or_else(|| panic!("no gradient for {name}"));
        let v: Vec<f32> = g.flatten_all().unwrap().to_vec1().unwrap();
        assert!(v.iter().all(|x| x.is_finite()), "{name}: non-finite gradient");
        assert!(v.iter().any(|&x| x != 0.0), "{name}: all-zero gradient");
    }
}

#[test]
fn a_detached_model_computes_the_same_logits_and_records_no_graph() {
    let cfg = ModelConfig::preset("tiny").unwrap();
    let (model, varmap) = init_model(&cfg, &Device::Cpu, 3).unwrap();
    let ids = Tensor::new(&[[1u32, 5, 9, 200, 7, 3, 3, 100]], &Device::Cpu).unwrap();
    let detached = model.detach();
    let (a, b) = (model.forward(&ids).unwrap(), detached.forward(&ids).unwrap());
    assert_eq!(a.to_vec3::<f32>().unwrap(), b.to_vec3::<f32>().unwrap());
    assert!(!b.track_op(), "the detached forward recorded a graph");
    let grads = b.sum_all().unwrap().backward().unwrap();
    for (name, t) in named_tensors(&varmap).unwrap() {
        assert!(grads.get(&t).is_none(), "{name} got a gradient through the detached model");
    }
    // Weights are shared, not copied: an update to a variable shows through.
    let var = varmap.data().lock().unwrap()["lm_head.weight"].clone();
    var.set(&var.as_tensor().zeros_like().unwrap()).unwrap();
    let c = detached.forward(&ids).unwrap();
    assert_eq!(c.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap(), 0.0);
}

#[test]
fn gradients_match_finite_differences() {
    let cfg = ModelConfig::preset("tiny").unwrap();
    let (model, varmap) = init_model(&cfg, &Device::Cpu, 11).unwrap();
    let ids = Tensor::new(&[[3u32, 1, 4, 1, 5, 9, 2, 6]], &Device::Cpu).unwrap();
    let loss_of = |m: &Llama| -> f64 {
        let lp = log_softmax(&m.forward(&ids).unwrap()).unwrap();
        lp.narrow(2, 7, 1).unwrap().mean_all().unwrap().to_scalar::<f32>().unwrap() as f64
    };
    let lp = log_softmax(&model.forward(&ids).unwrap()).unwrap();
    let grads = lp.narrow(2, 7, 1).unwrap().mean_all().unwrap().backward().unwrap();
    let data = varmap.data().lock().unwrap().clone();
    for name in [
        "model.layers.0.input_layernorm.weight",
        "model.layers.1.self_attn.q_proj.weight",
        "model.layers.0.mlp.gate_proj.weight",
        "model.embed_tokens.weight",
    ] {
        let var: &Var = &data[name];
        let g: Vec<f32> = grads.get(var.as_tensor()).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        let orig: Vec<f32> = var.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
        // Check the coordinates with the largest analytic gradient.
        let mut idx: Vec<usize> = (0..g.len()).collect();
        idx.sort_by(|&a, &b| g[b].abs().total_cmp(&g[a].abs()));
        for &i in idx.iter().take(3) {
            let eps = 1e-2f32;
            let mut plus = orig.clone();
            plus[i] += eps;
            var.set(&Tensor::from_vec(plus, var.dims(), &Device::Cpu).unwrap()).unwrap();
            let lp_ = loss_of(&model);
            let mut minus = orig.clone();
            minus[i] -= eps;
            var.set(&Tensor::from_vec(minus, var.dims(), &Device::Cpu).unwrap()).unwrap();
            let lm_ = loss_of(&model);
            var.set(&Tensor::from_vec(orig.clone(), var.dims(), &Device::Cpu).unwrap()).unwrap();
            let fd = (lp_ - lm_) / (2.0 * eps as f64);
            // f32 loss (|loss| ~ 5, ulp ~ 5e-7) over 2·eps gives ~3e-5 of round-off in `fd`.
            assert!(g[i].abs() > 1e-4, "{name}: gradient too small to check");
            let tol = 0.05 * g[i].abs() as f64 + 3e-5;
            assert!((fd - g[i] as f64).abs() < tol, "{name}[{i}]: analytic {} vs finite difference {fd}", g[i]);
        }
    }
}

#[test]
fn splitmix64_follows_the_published_stream() {
    // SplitMix64's reference values for seed 1234567 (Vigna's splitmix64.c; the data crate's
    // fixtures/splitmix_shuffle.py checks the same three first values in Python).
    let mut r = SplitMix64(1234567);
    let got: Vec<u64> = (0..5).map(|_| r.next_u64()).collect();
    assert_eq!(
        got,
        [6457827717110365317, 3203168211198807973, 9817491932198370423, 4593380528125082431, 16408922859458223821]
    );
    assert_eq!(SplitMix64(1234567).below(10), (6457827717110365317u64 % 10) as usize);
    assert_eq!(SplitMix64(1234567).below(1000), (6457827717110365317u64 % 1000) as usize);
    assert_eq!(SplitMix64(1234567).below(0), 0, "an empty range: index 0, not a division by zero");
    // uniform() keeps the top 53 bits.
    let u = SplitMix64(1234567).uniform();
    assert_eq!(u, (6457827717110365317u64 >> 11) as f64 / (1u64 << 53) as f64);
}

#[test]
fn init_is_seeded_and_scaled() {
    let cfg = ModelConfig::preset("tiny").unwrap();
    let (_, a) = init_model(&cfg, &Device::Cpu, 5).unwrap();
    let (_, b) = init_model(&cfg, &Device::Cpu, 5).unwrap();
    let (_, c) = init_model(&cfg, &Device::Cpu, 6).unwrap();
    let (a, b, c) = (named_tensors(&a).unwrap(), named_tensors(&b).unwrap(), named_tensors(&c).unwrap());
    let vals = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    for ((n, x), (_, y)) in a.iter().zip(&b) {
        assert_eq!(vals(x), vals(y), "{n}");
    }
    assert_ne!(vals(&a[0].1), vals(&c[0].1));
    let std = |v: &[f32]| (v.iter().map(|x| (*x as f64).powi(2)).sum::<f64>() / v.len() as f64).sqrt();
    for (n, t) in &a {
        let v = vals(t);
        if n.ends_with("norm.weight") {
            assert!(v.iter().all(|&x| x == 1.0), "{n}");
        } else if n == "model.embed_tokens.weight" || n == "lm_head.weight" {
            assert!((std(&v) - 0.02).abs() < 0.002, "{n}: std {}", std(&v));
        } else if n.contains("down_proj") {
            let want = 0.02 / (2.0 * cfg.num_hidden_layers as f64).sqrt();
            assert!((std(&v) - want).abs() < 0.15 * want, "{n}: std {} want {want}", std(&v));
        }
    }
}

#[test]
fn tokenizer_config_names_the_special_tokens_by_id() {
    let tok = r#"{"added_tokens": [
        {"id": 0, "content": "<|bos|>", "special": true},
        {"id": 1, "content": "<|eos|>", "special": true},
        {"id": 2, "content": "<|pad|>", "special": true},
        {"id": 9, "content": "<|padded word|>", "special": false}],
      "model": {"vocab": {"<|bos|>": 0, "<|eos|>": 1, "<|pad|>": 2, "hello": 3}}}"#;
    let tc = patchlm_model::weights::tokenizer_config(tok, Some(0), Some(1), 128);
    let want = serde_json::json!({"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 128,
        "clean_up_tokenization_spaces": false, "bos_token": "<|bos|>", "eos_token": "<|eos|>", "pad_token": "<|pad|>"});
    assert_eq!(tc, want);
    // An id found only in the model's vocabulary; an id the tokenizer lacks is left out.
    let tc = patchlm_model::weights::tokenizer_config(tok, Some(7), Some(3), 128);
    assert_eq!((tc.get("bos_token"), &tc["eos_token"]), (None, &serde_json::json!("hello")));
}

#[test]
fn save_and_load_round_trip_in_hf_format() {
    let cfg = ModelConfig::preset("tiny").unwrap();
    let (model, varmap) = init_model(&cfg, &Device::Cpu, 9).unwrap();
    let dir = tempfile::tempdir().unwrap();
    save_pretrained(dir.path(), &cfg, &varmap, Some("{}"), Some(1), Some(2)).unwrap();
    let hf: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("config.json")).unwrap()).unwrap();
    assert_eq!(hf["architectures"][0], "LlamaForCausalLM");
    assert_eq!(hf["model_type"], "llama");
    assert_eq!(hf["tie_word_embeddings"], false);
    // AutoTokenizer's settings: a tokenizer with no tokens of those ids gets the class alone.
    let tc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("tokenizer_config.json")).unwrap()).unwrap();
    assert_eq!(tc["tokenizer_class"], "PreTrainedTokenizerFast");
    assert_eq!(tc["model_max_length"], cfg.max_position_embeddings);
    assert!(tc.get("bos_token").is_none() && tc.get("pad_token").is_none());
    // The safetensors header carries HF's names and the `format: pt` metadata.
    let bytes = std::fs::read(dir.path().join("model.safetensors")).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    assert_eq!(meta.metadata().as_ref().unwrap()["format"], "pt");
    let names: Vec<String> = meta.tensors().keys().cloned().collect();
    for n in [
        "model.embed_tokens.weight",
        "model.layers.1.self_attn.k_proj.weight",
        "model.layers.0.mlp.up_proj.weight",
        "model.layers.0.post_attention_layernorm.weight",
        "model.norm.weight",
        "lm_head.weight",
    ] {
        assert!(names.iter().any(|x| x == n), "missing {n}");
    }
    let ids = Tensor::new(&[[1u32, 2, 3, 4, 5]], &Device::Cpu).unwrap();
    let want = model.forward(&ids).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let (loaded, cfg2) = load_pretrained(dir.path(), &Device::Cpu, DType::F32).unwrap();
    assert_eq!(cfg2, cfg);
    assert_eq!(loaded.forward(&ids).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap(), want);
    let (trainable, _, _) = load_trainable(dir.path(), &Device::Cpu).unwrap();
    assert_eq!(trainable.forward(&ids).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap(), want);
    // A directory without weights is a clear error.
    std::fs::remove_file(dir.path().join("model.safetensors")).unwrap();
    let e = load_pretrained(dir.path(), &Device::Cpu, DType::F32).err().unwrap().to_string();
    assert!(e.contains("model.safetensors"), "{e}");
}

#[test]
fn sharded_bf16_checkpoint_saved_by_transformers_loads_and_matches_its_logits() {
    // tests/fixtures/make_sharded.py: transformers' save_pretrained of tiny-llama in bf16 with a
    // small max_shard_size (two shards and model.safetensors.index.json), and the logits
    // transformers computes from those bf16 weights.
    let dir = fixture().with_file_name("tiny-llama-sharded");
    assert!(!dir.join("model.safetensors").exists());
    let (golden, input) = golden(&dir);
    let want: Vec<f32> = serde_json::from_value(golden["logits"].clone()).unwrap();
    assert_eq!(weight_files(&dir).unwrap().len(), 2);
    let (inference, _) = load_pretrained(&dir, &Device::Cpu, DType::F32).unwrap();
    let (trainable, _, _) = load_trainable(&dir, &Device::Cpu).unwrap();
    for m in [&inference, &trainable] {
        let got: Vec<f32> = m.forward(&input).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(got.len(), want.len());
        let d = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(d <= 1e-4, "max abs diff {d}");
    }
}

#[test]
fn tied_embeddings_match_hf_transformers_and_save_as_hf_does() {
    // tests/fixtures/make_tied.py: a LlamaForCausalLM with tie_word_embeddings, saved by
    // transformers (no lm_head.weight in the file), and its logits.
    let dir = fixture().with_file_name("tiny-llama-tied");
    let (golden, input) = golden(&dir);
    let want: Vec<f32> = serde_json::from_value(golden["logits"].clone()).unwrap();
    let hf_names: Vec<String> = serde_json::from_value(golden["tensors"].clone()).unwrap();
    assert!(!hf_names.iter().any(|n| n == "lm_head.weight"));
    let check = |m: &Llama, what: &str| {
        let got: Vec<f32> = m.forward(&input).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        let d = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(d <= 1e-4, "{what}: max abs diff {d}");
    };
    let (model, cfg) = load_pretrained(&dir, &Device::Cpu, DType::F32).unwrap();
    assert!(cfg.tie_word_embeddings);
    check(&model, "inference");
    let (trainable, varmap, _) = load_trainable(&dir, &Device::Cpu).unwrap();
    check(&trainable, "trainable");
    // Saved by us as transformers saves it: the same tensor names, the config says tied, and
    // the parameter count is what the file holds.
    let out = tempfile::tempdir().unwrap();
    save_pretrained(out.path(), &cfg, &varmap, None, None, None).unwrap();
    let saved = candle_core::safetensors::load(out.path().join("model.safetensors"), &Device::Cpu).unwrap();
    let mut names: Vec<String> = saved.keys().cloned().collect();
    names.sort();
    assert_eq!(names, hf_names);
    assert_eq!(cfg.num_params(), saved.values().map(|t| t.elem_count() as u64).sum::<u64>());
    let hf_cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.path().join("config.json")).unwrap()).unwrap();
    assert_eq!(hf_cfg["tie_word_embeddings"], true);
    let (again, _) = load_pretrained(out.path(), &Device::Cpu, DType::F32).unwrap();
    check(&again, "saved and loaded again");
    // The untied fixture's count matches its file too.
    let (_, untied) = load_pretrained(&fixture(), &Device::Cpu, DType::F32).unwrap();
    let st = candle_core::safetensors::load(fixture().join("model.safetensors"), &Device::Cpu).unwrap();
    assert_eq!(untied.num_params(), st.values().map(|t| t.elem_count() as u64).sum::<u64>());
}

#[test]
fn rope_scaling_matches_hf_transformers() {
    // tests/fixtures/make_rope_scaling.py: llama3 RoPE scaling (config.json in transformers 5's
    // rope_parameters form) with frequencies in all three of its regimes, and the same weights'
    // logits under linear scaling; logits at every 11th of 100 positions.
    let dir = fixture().with_file_name("tiny-llama-rope");
    let (golden, input) = golden(&dir);
    let positions: Vec<u32> = serde_json::from_value(golden["positions"].clone()).unwrap();
    let at = Tensor::new(positions.as_slice(), &Device::Cpu).unwrap();
    let max_diff = |m: &Llama, key: &str| -> f32 {
        let want: Vec<f32> = serde_json::from_value(golden[key].clone()).unwrap();
        let got: Vec<f32> = m
            .forward(&input)
            .unwrap()
            .get(0)
            .unwrap()
            .index_select(&at, 0)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(got.len(), want.len());
        got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max)
    };
    let (model, cfg) = load_pretrained(&dir, &Device::Cpu, DType::F32).unwrap();
    let llama3 = RopeScaling::Llama3 {
        factor: 8.0,
        low_freq_factor: 1.0,
        high_freq_factor: 8.0,
        original_max_position_embeddings: 256,
    };
    assert_eq!(cfg.rope_scaling, Some(llama3));
    let d = max_diff(&model, "llama3");
    assert!(d <= 1e-4, "llama3: max abs diff {d}");
    let build = |c: &ModelConfig| {
        let vb = unsafe {
            candle_nn::VarBuilder::from_mmaped_safetensors(&[dir.join("model.safetensors")], DType::F32, &Device::Cpu)
        }
        .unwrap();
        Llama::new(vb, c).unwrap()
    };
    let linear = ModelConfig { rope_scaling: Some(RopeScaling::Linear { factor: 4.0 }), ..cfg.clone() };
    let d = max_diff(&build(&linear), "linear");
    assert!(d <= 1e-4, "linear: max abs diff {d}");
    // Without the scaling the logits are far off: the test sees the table.
    let plain = ModelConfig { rope_scaling: None, ..cfg.clone() };
    assert!(max_diff(&build(&plain), "llama3") > 0.05);
    // Our config.json names the scaling as transformers < 5 does (rope_scaling), and reads back.
    let hf = cfg.to_hf_json(None, None);
    assert_eq!(hf["rope_scaling"]["rope_type"], "llama3");
    assert_eq!(ModelConfig::from_hf_json(&hf).unwrap(), cfg);
    assert!(plain.to_hf_json(None, None)["rope_scaling"].is_null());
    // Scalings that change more than the frequencies, or bad factors, are refused by name.
    let mut v = hf.clone();
    v["rope_scaling"] = serde_json::json!({"rope_type": "yarn", "factor": 4.0});
    let e = ModelConfig::from_hf_json(&v).unwrap_err().to_string();
    assert!(e.contains("rope_type \"yarn\" is not supported"), "{e}");
    v["rope_scaling"] =
        serde_json::json!({"type": "llama3", "factor": 8.0, "low_freq_factor": 4.0, "high_freq_factor": 1.0});
    let e = ModelConfig::from_hf_json(&v).unwrap_err().to_string();
    assert!(e.contains("high_freq_factor > low_freq_factor"), "{e}");
    // Architecture variants with weights or math this model lacks are refused, not half-loaded.
    for (key, value, says) in [
        ("attention_bias", serde_json::json!(true), "attention_bias = true is not supported"),
        ("mlp_bias", serde_json::json!(true), "mlp_bias = true is not supported"),
        ("partial_rotary_factor", serde_json::json!(0.5), "partial_rotary_factor below 1"),
    ] {
        let mut v = hf.clone();
        v[key] = value;
        let e = ModelConfig::from_hf_json(&v).unwrap_err().to_string();
        assert!(e.contains(says), "{key}: {e}");
    }
    // A setting of the wrong type is refused by name, not replaced by its default (a string
    // num_key_value_heads made the model multi-head, a string eps was 1e-6); null is absent.
    for (key, value, says) in [
        ("num_key_value_heads", serde_json::json!("2"), "\"num_key_value_heads\" is not a whole number (it is \"2\")"),
        ("hidden_size", serde_json::json!(-1), "\"hidden_size\" is not a whole number (it is -1)"),
        ("rms_norm_eps", serde_json::json!("x"), "\"rms_norm_eps\" is not a number"),
        ("max_position_embeddings", serde_json::json!(64.5), "\"max_position_embeddings\" is not a whole number"),
        ("tie_word_embeddings", serde_json::json!("true"), "\"tie_word_embeddings\" is not true or false"),
        ("head_dim", serde_json::json!([8]), "\"head_dim\" is not a whole number"),
        ("model_type", serde_json::json!(1), "\"model_type\" is not a string"),
        ("rope_scaling", serde_json::json!({"rope_type": 3}), "rope_type is not a string"),
    ] {
        let mut v = hf.clone();
        v[key] = value;
        let e = ModelConfig::from_hf_json(&v).unwrap_err().to_string();
        assert!(e.contains(says), "{key}: {e}");
    }
    let mut v = hf.clone();
    v["num_key_value_heads"] = serde_json::Value::Null;
    v["rms_norm_eps"] = serde_json::Value::Null;
    let c = ModelConfig::from_hf_json(&v).unwrap();
    assert_eq!((c.num_key_value_heads, c.rms_norm_eps), (c.num_attention_heads, 1e-6));
}

/// Writes the fixture's tensors as two shards (in `dtype`) with an HF index into `dir`.
fn write_shards(dir: &std::path::Path, dtype: DType) {
    let st = candle_core::safetensors::load(fixture().join("model.safetensors"), &Device::Cpu).unwrap();
    let mut names: Vec<&String> = st.keys().collect();
    names.sort();
    let mut map = serde_json::Map::new();
    for (i, chunk) in names.chunks(names.len().div_ceil(2)).enumerate() {
        let file = format!("model-{:05}-of-00002.safetensors", i + 1);
        let part: std::collections::HashMap<String, Tensor> =
            chunk.iter().map(|n| (n.to_string(), st[*n].to_dtype(dtype).unwrap())).collect();
        candle_core::safetensors::save(&part, dir.join(&file)).unwrap();
        for n in chunk {
            map.insert(n.to_string(), file.clone().into());
        }
    }
    let index = serde_json::json!({"metadata": {"total_size": 0}, "weight_map": map});
    std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
    std::fs::copy(fixture().join("config.json"), dir.join("config.json")).unwrap();
}

#[test]
fn sharded_weights_load_like_one_file() {
    let ids = Tensor::new(&[[5u32, 17, 200, 3, 99, 42]], &Device::Cpu).unwrap();
    let logits = |m: &Llama| m.forward(&ids).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let (one, _) = load_pretrained(&fixture(), &Device::Cpu, DType::F32).unwrap();
    let want = logits(&one);
    let dir = tempfile::tempdir().unwrap();
    write_shards(dir.path(), DType::F32);
    assert_eq!(weight_files(dir.path()).unwrap().len(), 2);
    let (sharded, _) = load_pretrained(dir.path(), &Device::Cpu, DType::F32).unwrap();
    assert_eq!(logits(&sharded), want);
    let (trainable, varmap, _) = load_trainable(dir.path(), &Device::Cpu).unwrap();
    assert_eq!(logits(&trainable), want);
    assert!(varmap.all_vars().iter().all(|v| v.dtype() == DType::F32));

    // bf16 shards (how most hub checkpoints are stored) and f16 ones load into f32 master weights.
    for dtype in [DType::BF16, DType::F16] {
        let half = tempfile::tempdir().unwrap();
        write_shards(half.path(), dtype);
        let (trainable, _, _) = load_trainable(half.path(), &Device::Cpu).unwrap();
        let (rounded, _) = load_pretrained(half.path(), &Device::Cpu, DType::F32).unwrap();
        assert_eq!(logits(&trainable), logits(&rounded));
        let d = logits(&trainable).iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(d > 0.0 && d < 0.05, "{dtype:?} rounding moved the logits by {d}");
    }

    // A damaged shard is named by its own file (not the first), once.
    let second = dir.path().join("model-00002-of-00002.safetensors");
    let bytes = std::fs::read(&second).unwrap();
    std::fs::write(&second, &bytes[..bytes.len() / 2]).unwrap();
    for e in [
        load_pretrained(dir.path(), &Device::Cpu, DType::F32).err().unwrap().to_string(),
        load_trainable(dir.path(), &Device::Cpu).err().unwrap().to_string(),
    ] {
        assert!(e.contains("model-00002-of-00002.safetensors: incomplete metadata"), "{e}");
        assert!(!e.contains("path:"), "{e}");
    }
    // A missing shard, and an index that points outside the directory, are named.
    std::fs::remove_file(&second).unwrap();
    let e = load_pretrained(dir.path(), &Device::Cpu, DType::F32).err().unwrap().to_string();
    assert!(e.contains("model-00002-of-00002.safetensors: missing; model.safetensors.index.json names it"), "{e}");
    let index = serde_json::json!({"weight_map": {"lm_head.weight": "../elsewhere.safetensors"}});
    std::fs::write(dir.path().join("model.safetensors.index.json"), index.to_string()).unwrap();
    let e = load_trainable(dir.path(), &Device::Cpu).err().unwrap().to_string();
    assert!(e.contains("is not a file of this directory"), "{e}");
}

#[test]
fn model_directories_are_made_of_config_tokenizer_and_safetensors() {
    for yes in [
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "model.safetensors",
        "model-00001-of-00002.safetensors",
        "model.safetensors.index.json",
    ] {
        assert!(is_model_file(yes), "{yes}");
    }
    for no in ["pytorch_model.bin", "README.md", "onnx/model.safetensors", "model.gguf", ".gitattributes"] {
        assert!(!is_model_file(no), "{no}");
    }
}

#[test]
fn kv_cache_decoding_matches_full_forward() {
    let (model, _) = load_pretrained(&fixture(), &Device::Cpu, DType::F32).unwrap();
    let ids: Vec<u32> = vec![5, 17, 200, 3, 99, 42, 7, 7, 1];
    let full = model.forward(&Tensor::new(&ids[..], &Device::Cpu).unwrap().unsqueeze(0).unwrap()).unwrap();
    let mut cache = KvCache::new(model.config());
    let mut step =
        model.forward_cached(&Tensor::new(&ids[..4], &Device::Cpu).unwrap().unsqueeze(0).unwrap(), &mut cache).unwrap();
    for t in 4..=ids.len() {
        let want = full.get(0).unwrap().get(t - 1).unwrap().to_vec1::<f32>().unwrap();
        let got = step.get(0).unwrap().to_vec1::<f32>().unwrap();
        let d = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(d < 1e-4, "position {}: {d}", t - 1);
        if t < ids.len() {
            step = model
                .forward_cached(&Tensor::new(&[ids[t]], &Device::Cpu).unwrap().unsqueeze(0).unwrap(), &mut cache)
                .unwrap();
        }
    }
}

/// Temperature comes before top-p, as in HF's warpers. By hand: logits (2, 1, 0, -1) at
/// temperature 0.5 are (4, 2, 0, -2), probabilities (0.8650, 0.1171, 0.0158, 0.0021); top-p 0.9
/// keeps tokens 0 and 1 (0.8650 < 0.9 ≤ 0.9821), renormalised to (0.8808, 0.1192). Top-p before
/// temperature would keep token 2 as well (0.6439 + 0.2369 < 0.9 at temperature 1).
#[test]
fn sampling_applies_temperature_before_top_p_with_the_right_frequencies() {
    let logits = [2.0f32, 1.0, 0.0, -1.0];
    let cfg = SamplingConfig { temperature: 0.5, top_k: 0, top_p: 0.9, seed: 0 };
    let mut rng = SplitMix64(7);
    let n = 20_000;
    let mut counts = [0usize; 4];
    for _ in 0..n {
        counts[sample(&logits, &cfg, &mut rng) as usize] += 1;
    }
    assert_eq!(counts[2] + counts[3], 0, "{counts:?}");
    // Binomial standard deviation at n = 20000: 0.0023; allow about 4 of them.
    let f1 = counts[1] as f64 / n as f64;
    assert!((f1 - 0.1192).abs() < 0.01, "token 1 drawn with frequency {f1}, want 0.1192");
}

#[test]
fn generation_refuses_prompts_without_room_and_settings_out_of_range() {
    let (model, cfg) = load_pretrained(&fixture(), &Device::Cpu, DType::F32).unwrap();
    let t = cfg.max_position_embeddings;
    let s = SamplingConfig::default();
    let msg = |r: patchlm_model::Result<Vec<u32>>| r.unwrap_err().to_string();
    assert!(msg(generate(&model, &[], 4, &s, &[], &Device::Cpu)).contains("no tokens"));
    let long = vec![1u32; t + 1];
    let e = msg(generate(&model, &long, 4, &s, &[], &Device::Cpu));
    assert!(e.contains(&format!("{} tokens", t + 1)) && e.contains("shorten the prompt"), "{e}");
    // A full context predicts one more token; one position left, two: the second is predicted
    // from all t positions, and a third would need position t.
    assert_eq!(generate(&model, &long[1..], 4, &s, &[], &Device::Cpu).unwrap().len(), 1);
    assert_eq!(generate(&model, &long[2..], 4, &s, &[], &Device::Cpu).unwrap().len(), 2);
    for bad in [
        SamplingConfig { temperature: -1.0, ..Default::default() },
        SamplingConfig { temperature: f64::NAN, ..Default::default() },
        SamplingConfig { top_p: 1.5, ..Default::default() },
    ] {
        let e = msg(generate(&model, &[1, 2], 4, &bad, &[], &Device::Cpu));
        assert!(e.contains("out of range"), "{e}");
    }
    // Streaming hands over each token as it is drawn: the tokens generate returns, a stop token
    // ending both where it is first drawn.
    let s = SamplingConfig { temperature: 1.0, seed: 5, ..Default::default() };
    let all = generate(&model, &[1, 2], 12, &s, &[], &Device::Cpu).unwrap();
    assert_eq!(all.len(), 12);
    let first = all.iter().position(|&id| id == all[6]).unwrap();
    let mut seen = Vec::new();
    let out = generate_streaming(&model, &[1, 2], 12, &s, &[all[6]], &Device::Cpu, |id| seen.push(id)).unwrap();
    assert_eq!((&out[..], &seen[..]), (&all[..=first], &all[..=first]));
}

/// The distribution sampled from equals what HF transformers' own warpers leave
/// (tests/fixtures/make_sampling_golden.py): temperature, then top-k keeping every token tied
/// with the k-th, then top-p keeping the token that crosses it, ties ranked as torch ranks them.
#[test]
fn sampling_distribution_matches_hf_warpers() {
    let g: serde_json::Value = serde_json::from_str(include_str!("fixtures/sampling_golden.json")).unwrap();
    for (n, c) in g["cases"].as_array().unwrap().iter().enumerate() {
        let logits: Vec<f32> = serde_json::from_value(c["logits"].clone()).unwrap();
        let want: Vec<f64> = serde_json::from_value(c["probs"].clone()).unwrap();
        let cfg = SamplingConfig {
            temperature: c["temperature"].as_f64().unwrap(),
            top_k: c["top_k"].as_u64().unwrap() as usize,
            top_p: c["top_p"].as_f64().unwrap(),
            seed: 0,
        };
        let mut got = vec![0.0; logits.len()];
        for (id, p) in sampling_distribution(&logits, &cfg) {
            got[id as usize] = p;
        }
        for (i, (a, b)) in got.iter().zip(&want).enumerate() {
            assert_eq!(*a == 0.0, *b == 0.0, "case {n} ({cfg:?}): token {i} kept {a} vs HF {b}");
            assert!((a - b).abs() < 1e-6, "case {n} ({cfg:?}): token {i} {a} vs HF {b}");
        }
    }
}

#[test]
fn sampling_is_seeded_and_respects_top_k_top_p() {
    let logits = [0.0f32, 3.0, 1.0, 2.9, -1.0];
    let mut rng = SplitMix64(1);
    let greedy = SamplingConfig { temperature: 0.0, ..Default::default() };
    assert_eq!(sample(&logits, &greedy, &mut rng), 1);
    let top1 = SamplingConfig { temperature: 1.0, top_k: 1, top_p: 1.0, seed: 0 };
    assert!((0..50).all(|_| sample(&logits, &top1, &mut rng) == 1));
    let top2 = SamplingConfig { temperature: 1.0, top_k: 2, top_p: 1.0, seed: 0 };
    let draws: Vec<u32> = (0..200).map(|_| sample(&logits, &top2, &mut rng)).collect();
    assert!(draws.iter().all(|&d| d == 1 || d == 3) && draws.contains(&3));
    // Softmax of the logits: 0.474 for token 1, 0.429 for token 3. Top-p 0.3: token 1 alone
    // reaches it; top-p 0.5: token 1 does not, so the token that crosses (3) is kept too.
    let p = SamplingConfig { temperature: 1.0, top_k: 0, top_p: 0.3, seed: 0 };
    assert!((0..50).all(|_| sample(&logits, &p, &mut rng) == 1));
    let p = SamplingConfig { temperature: 1.0, top_k: 0, top_p: 0.5, seed: 0 };
    let draws: Vec<u32> = (0..200).map(|_| sample(&logits, &p, &mut rng)).collect();
    assert!(draws.iter().all(|&d| d == 1 || d == 3) && draws.contains(&3));
    let (model, _) = load_pretrained(&fixture(), &Device::Cpu, DType::F32).unwrap();
    let cfg = SamplingConfig { seed: 42, ..Default::default() };
    let a = generate(&model, &[1, 2, 3], 10, &cfg, &[], &Device::Cpu).unwrap();
    let b = generate(&model, &[1, 2, 3], 10, &cfg, &[], &Device::Cpu).unwrap();
    assert_eq!(a, b);
    assert_eq!(a.len(), 10);
    // Greedy generation equals argmax of the full forward, token by token.
    let g = generate(&model, &[1, 2, 3], 5, &greedy, &[], &Device::Cpu).unwrap();
    let mut seq = vec![1u32, 2, 3];
    for &tok in &g {
        let lg = model.forward(&Tensor::new(&seq[..], &Device::Cpu).unwrap().unsqueeze(0).unwrap()).unwrap();
        let last = lg.get(0).unwrap().get(seq.len() - 1).unwrap().to_vec1::<f32>().unwrap();
        let am = last.iter().enumerate().fold(0, |b, (i, &v)| if v > last[b] { i } else { b });
        assert_eq!(tok as usize, am);
        seq.push(tok);
    }
    // It stops at any of the stop ids, the stop id included; ids never drawn change nothing.
    let first_new = |i: usize| g.iter().position(|&t| t == g[i]).unwrap() == i;
    let i = (1..5).find(|&i| first_new(i)).unwrap();
    assert_eq!(generate(&model, &[1, 2, 3], 5, &greedy, &[255, g[i]], &Device::Cpu).unwrap(), g[..=i]);
    let never: Vec<u32> = (0..256).filter(|t| !g.contains(t)).take(3).collect();
    assert_eq!(generate(&model, &[1, 2, 3], 5, &greedy, &never, &Device::Cpu).unwrap(), g);
}

#[test]
fn eos_ids_are_read_as_a_number_or_a_list_as_hf_writes_them() {
    // Llama 3 Instruct: config.json's eos_token_id a list, generation_config.json another.
    let d = tempfile::tempdir().unwrap();
    let cfg = |v: serde_json::Value| std::fs::write(d.path().join("config.json"), v.to_string()).unwrap();
    cfg(serde_json::json!({ "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009] }));
    assert_eq!(special_token_ids(d.path()).unwrap(), (Some(128000), Some(128001)));
    assert_eq!(stop_token_ids(d.path()).unwrap(), vec![128001, 128008, 128009]);
    std::fs::write(d.path().join("generation_config.json"), r#"{"eos_token_id": 128009, "do_sample": true}"#).unwrap();
    assert_eq!(stop_token_ids(d.path()).unwrap(), vec![128009]);
    // A generation config without one defers to config.json; none anywhere is no stop id.
    std::fs::write(d.path().join("generation_config.json"), r#"{"do_sample": true}"#).unwrap();
    assert_eq!(stop_token_ids(d.path()).unwrap(), vec![128001, 128008, 128009]);
    cfg(serde_json::json!({ "bos_token_id": null, "eos_token_id": 2 }));
    assert_eq!(special_token_ids(d.path()).unwrap(), (None, Some(2)));
    cfg(serde_json::json!({}));
    assert_eq!((special_token_ids(d.path()).unwrap(), stop_token_ids(d.path()).unwrap()), ((None, None), vec![]));
    std::fs::write(d.path().join("generation_config.json"), "{").unwrap();
    assert!(stop_token_ids(d.path()).unwrap_err().to_string().contains("generation_config.json"));
}

#[test]
fn presets_and_param_counts() {
    // Paper sizes (hidden, layers) with vocab 32000: parameter counts land on the names.
    for (name, lo, hi) in
        [("370m", 330e6, 420e6), ("780m", 700e6, 860e6), ("1.3b", 1.2e9, 1.45e9), ("2.7b", 2.5e9, 2.9e9)]
    {
        let n = ModelConfig::preset(name).unwrap().num_params() as f64;
        assert!(n > lo && n < hi, "{name}: {n}");
    }
    // tiny by hand: emb + head 2·256·32, per layer q,o 32·32, k,v 32·16, mlp 3·32·64, norms 2·32; final norm 32.
    let t = ModelConfig::preset("tiny").unwrap();
    assert_eq!(t.num_params(), 2 * 256 * 32 + 2 * (2 * 1024 + 2 * 512 + 3 * 2048 + 64) + 32);
    let (_, vm) = init_model(&t, &Device::Cpu, 0).unwrap();
    let counted: usize = named_tensors(&vm).unwrap().iter().map(|(_, t)| t.elem_count()).sum();
    assert_eq!(counted as u64, t.num_params());
    assert!(ModelConfig::preset("nope").is_err());
    t.validate().unwrap();
    // Each size check refuses its own case, and says which sizes do not fit.
    let refused = |edit: fn(&mut ModelConfig), says: &str| {
        let mut bad = t.clone();
        edit(&mut bad);
        let e = bad.validate().unwrap_err().to_string();
        assert!(e.contains(says), "{e}");
    };
    refused(|c| c.vocab_size = 0, "must be positive");
    refused(|c| c.hidden_size = 0, "must be positive");
    refused(|c| c.intermediate_size = 0, "must be positive");
    refused(|c| c.num_hidden_layers = 0, "must be positive");
    refused(|c| c.num_attention_heads = 3, "hidden_size 32 is not divisible by num_attention_heads 3");
    // No heads at all: `32 % 0` is no remainder to Rust's `is_multiple_of`, so 0 needs its own check.
    refused(|c| c.num_attention_heads = 0, "hidden_size 32 is not divisible by num_attention_heads 0");
    refused(|c| (c.hidden_size, c.num_attention_heads, c.num_key_value_heads) = (36, 4, 2), "head dim 9 must be even");
    refused(|c| c.num_key_value_heads = 0, "num_attention_heads 4 is not a multiple of num_key_value_heads 0");
    refused(|c| c.num_key_value_heads = 3, "num_attention_heads 4 is not a multiple of num_key_value_heads 3");
    refused(|c| c.max_position_embeddings = 0, "max_position_embeddings must be positive");
    assert!(parse_device("tpu").is_err());
    assert!(parse_device("cpu").is_ok());
}

#[test]
fn training_flops_are_what_torch_flop_counter_counts_for_hf_llama() {
    // tests/fixtures/make_flops_golden.py: torch.utils.flop_counter over a training step of HF
    // LlamaForCausalLM (untied, tied, another shape). The weights' products (aten.mm) are 6 per
    // matmul weight; attention is 3× its forward (PaLM's count, without the recompute torch
    // counts in FlashAttention's backward).
    let g: serde_json::Value = serde_json::from_str(include_str!("fixtures/flops_golden.json")).unwrap();
    for row in g["rows"].as_array().unwrap() {
        let n = |k: &str| row[k].as_u64().unwrap() as usize;
        let cfg = ModelConfig {
            vocab_size: n("vocab_size"),
            hidden_size: n("hidden_size"),
            intermediate_size: n("intermediate_size"),
            num_hidden_layers: n("num_hidden_layers"),
            num_attention_heads: n("num_attention_heads"),
            num_key_value_heads: n("num_key_value_heads"),
            tie_word_embeddings: row["tie_word_embeddings"].as_bool().unwrap(),
            max_position_embeddings: n("seq_len"),
            ..ModelConfig::preset("tiny").unwrap()
        };
        assert_eq!(cfg.num_params(), row["num_params"].as_u64().unwrap(), "{row}");
        let mm = row["mm_per_position"].as_f64().unwrap();
        assert_eq!(6.0 * cfg.matmul_params() as f64, mm, "{row}");
        let want = mm + 3.0 * row["sdpa_forward_per_position"].as_f64().unwrap();
        assert_eq!(cfg.flops_per_position(n("seq_len")), want, "{row}");
    }
}

/// −mean log softmax(x)[t] from composed ops, in f64: the reference for the fused op.
fn ce_reference(x: &[f32], t: &[u32], n: usize, v: usize, k: usize) -> (f64, Vec<f64>) {
    let mut loss = 0.0;
    let mut grad = vec![0.0; n * v];
    for i in 0..n {
        let row: Vec<f64> = x[i * v..(i + 1) * v].iter().map(|&a| a as f64).collect();
        let m = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let lse = m + row.iter().map(|a| (a - m).exp()).sum::<f64>().ln();
        for j in 0..k {
            let id = t[i * k + j] as usize;
            loss += lse - row[id];
            for (c, a) in row.iter().enumerate() {
                grad[i * v + c] += (a - lse).exp() / (n * k) as f64;
            }
            grad[i * v + id] -= 1.0 / (n * k) as f64;
        }
    }
    (loss / (n * k) as f64, grad)
}

#[test]
fn fused_multi_target_cross_entropy_matches_an_f64_reference() {
    let dev = Device::Cpu;
    let mut rng = patchlm_model::SplitMix64(11);
    for (n, v, k) in [(5usize, 37usize, 1usize), (7, 300, 4), (3, 1000, 8)] {
        let x: Vec<f32> = (0..n * v).map(|_| (rng.uniform() as f32 - 0.5) * 8.0).collect();
        let t: Vec<u32> = (0..n * k).map(|_| (rng.next_u64() % v as u64) as u32).collect();
        let (want, want_grad) = ce_reference(&x, &t, n, v, k);
        let var = candle_core::Var::from_vec(x.clone(), (n, v), &dev).unwrap();
        let tt = Tensor::from_vec(t.clone(), (n, k), &dev).unwrap();
        let loss = patchlm_model::cross_entropy_multi(var.as_tensor(), &tt).unwrap();
        let got = loss.to_scalar::<f32>().unwrap() as f64;
        assert!((got - want).abs() < 1e-5 * want.abs().max(1.0), "n={n} v={v} k={k}: {got} vs {want}");
        let g = loss.backward().unwrap();
        let grad: Vec<f32> = g.get(var.as_tensor()).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        let max_err = grad.iter().zip(&want_grad).map(|(a, b)| (*a as f64 - b).abs()).fold(0.0, f64::max);
        assert!(max_err < 1e-6, "n={n} v={v} k={k}: gradient error {max_err}");
        // The log-sum-exp-keeping pair (for the hand-written backward pass): same loss, the
        // rows' log-sum-exps, and the same gradient from them (scaled by 0.5 here).
        let (l2, lse) = ops::cross_entropy_multi_lse(var.as_tensor(), &tt).unwrap();
        assert!((l2.to_scalar::<f32>().unwrap() as f64 - want).abs() < 1e-5 * want.abs().max(1.0));
        let lse: Vec<f32> = lse.to_vec1().unwrap();
        for (i, &l) in lse.iter().enumerate() {
            let row = &x[i * v..(i + 1) * v];
            let m = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
            let want_lse = m + row.iter().map(|&a| (a as f64 - m).exp()).sum::<f64>().ln();
            assert!((l as f64 - want_lse).abs() < 1e-5, "lse row {i}: {l} vs {want_lse}");
        }
        let lse_t = Tensor::new(lse.as_slice(), &dev).unwrap();
        let g2: Vec<f32> = ops::grad::cross_entropy_multi_lse(var.as_tensor(), &tt, &lse_t, 0.5)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let max_err = g2.iter().zip(&want_grad).map(|(a, b)| (*a as f64 - 0.5 * b).abs()).fold(0.0, f64::max);
        assert!(max_err < 1e-6, "n={n} v={v} k={k}: gradient from lse, error {max_err}");
        assert!(
            ops::grad::cross_entropy_multi_lse(var.as_tensor(), &tt, &lse_t.narrow(0, 1, n - 1).unwrap(), 1.0).is_err()
        );
        // bf16 and f16 logits: the same math with f32 statistics, so the loss is the reference's
        // on the rounded logits, and the gradient too up to its rounding to the logits' dtype.
        for dtype in [DType::BF16, DType::F16] {
            let xh = Var::from_tensor(&var.as_tensor().to_dtype(dtype).unwrap()).unwrap();
            let rounded: Vec<f32> = xh.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1().unwrap();
            let (want_h, want_grad_h) = ce_reference(&rounded, &t, n, v, k);
            let loss_h = patchlm_model::cross_entropy_multi(xh.as_tensor(), &tt).unwrap();
            let got_h = loss_h.to_scalar::<f32>().unwrap() as f64;
            assert!((got_h - want_h).abs() < 1e-5 * want_h.abs().max(1.0), "{dtype:?}: {got_h} vs {want_h}");
            let g = loss_h.backward().unwrap();
            let g = g.get(xh.as_tensor()).unwrap();
            assert_eq!(g.dtype(), dtype);
            let g: Vec<f32> = g.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1().unwrap();
            for (j, (a, b)) in g.iter().zip(&want_grad_h).enumerate() {
                // One rounding of an f32 result: at most 2^-8 of it for bf16 (2^-11 for f16; the
                // bf16 bound serves both), and f16's subnormals below 2^-14 (half a unit: 3e-8).
                assert!(
                    (*a as f64 - b).abs() <= b.abs() / 256.0 * (1.0 + 1e-4) + 1e-7,
                    "{dtype:?} n={n} v={v} k={k}: gradient [{j}] {a} vs {b}"
                );
            }
        }
    }
    // Logits and targets of different rows, or no targets, are refused.
    let x5 = Tensor::zeros((5, 10), DType::F32, &dev).unwrap();
    for targets in [Tensor::zeros((4, 1), DType::U32, &dev).unwrap(), Tensor::zeros((5, 0), DType::U32, &dev).unwrap()]
    {
        for e in [
            patchlm_model::cross_entropy_multi(&x5, &targets).unwrap_err(),
            ops::cross_entropy_multi_lse(&x5, &targets).unwrap_err(),
        ] {
            assert!(e.to_string().contains("disagree"), "{targets:?}: {e}");
        }
    }
    // K = 1 is candle's own cross-entropy.
    let x = Tensor::randn(0f32, 2.0, (6, 50), &dev).unwrap();
    let t = Tensor::new(&[1u32, 7, 49, 0, 3, 3], &dev).unwrap();
    let ours = patchlm_model::cross_entropy_multi(&x, &t.unsqueeze(1).unwrap()).unwrap().to_scalar::<f32>().unwrap();
    let theirs = candle_nn::loss::cross_entropy(&x, &t).unwrap().to_scalar::<f32>().unwrap();
    assert!((ours - theirs).abs() < 1e-5, "{ours} vs {theirs}");
    // Ids outside the vocabulary are an error, not a panic.
    let bad = Tensor::new(&[[50u32]], &dev).unwrap();
    let e = patchlm_model::cross_entropy_multi(&x.narrow(0, 0, 1).unwrap(), &bad).unwrap_err().to_string();
    assert!(e.contains("outside the vocabulary"), "{e}");
}

#[test]
fn fused_rms_norm_matches_composed_ops_forward_and_backward() {
    let dev = Device::Cpu;
    let eps = 1e-5;
    let composed = |x: &Tensor, w: &Tensor| -> Tensor {
        let r = (x.sqr().unwrap().mean_keepdim(1).unwrap() + eps).unwrap().sqrt().unwrap().recip().unwrap();
        x.broadcast_mul(&r).unwrap().broadcast_mul(w).unwrap()
    };
    for (n, d) in [(3usize, 8usize), (37, 256), (5, 1000)] {
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.5, (n, d), &dev).unwrap()).unwrap();
        let w = Var::from_tensor(&Tensor::randn(1f32, 0.3, d, &dev).unwrap()).unwrap();
        // A non-uniform upstream gradient, so that both terms of dx matter.
        let up = Tensor::randn(0f32, 1.0, (n, d), &dev).unwrap();
        let a = patchlm_model::ops::rms_norm(x.as_tensor(), w.as_tensor(), eps).unwrap();
        let b = composed(x.as_tensor(), w.as_tensor());
        let diff = |p: &Tensor, q: &Tensor| -> f32 {
            (p - q).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
        };
        assert!(diff(&a, &b) < 1e-5, "forward n={n} d={d}: {}", diff(&a, &b));
        let ga = (&a * &up).unwrap().sum_all().unwrap().backward().unwrap();
        let gb = (&b * &up).unwrap().sum_all().unwrap().backward().unwrap();
        for (name, v) in [("x", &x), ("weight", &w)] {
            let p = ga.get(v.as_tensor()).unwrap();
            let q = gb.get(v.as_tensor()).unwrap();
            let scale = q.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
            assert!(diff(p, q) < 1e-5 * scale.max(1.0), "d{name} n={n} d={d}: {}", diff(p, q));
        }
        // bf16 inputs: within bf16 resolution of the f32 result.
        let xb = x.as_tensor().to_dtype(DType::BF16).unwrap();
        let wb = w.as_tensor().to_dtype(DType::BF16).unwrap();
        let yb = patchlm_model::ops::rms_norm(&xb, &wb, eps).unwrap().to_dtype(DType::F32).unwrap();
        let scale = b.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
        assert!(diff(&yb, &b) < 2e-2 * scale, "bf16 n={n} d={d}");
    }
    // 3-d inputs keep their shape; a mismatched weight is an error.
    let x = Tensor::randn(0f32, 1.0, (2, 3, 4), &dev).unwrap();
    let y = patchlm_model::ops::rms_norm(&x, &Tensor::ones(4, DType::F32, &dev).unwrap(), eps).unwrap();
    assert_eq!(y.dims(), &[2, 3, 4]);
    assert!(patchlm_model::ops::rms_norm(&x, &Tensor::ones(5, DType::F32, &dev).unwrap(), eps).is_err());
}

fn max_abs(t: &Tensor) -> f32 {
    t.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
}

#[test]
fn fused_causal_softmax_matches_a_hand_reference_and_the_composed_ops() {
    let dev = Device::Cpu;
    // Hand-computed: row 0 sees only column 0; row 1 is softmax(3, 4) = (1, e) / (1 + e).
    let x = Tensor::new(&[[1f32, 2.0], [3.0, 4.0]], &dev).unwrap();
    let y: Vec<Vec<f32>> = causal_softmax(&x, 1.0).unwrap().to_vec2().unwrap();
    let e = std::f32::consts::E;
    assert_eq!(y[0], vec![1.0, 0.0]);
    assert!((y[1][0] - 1.0 / (1.0 + e)).abs() < 1e-6 && (y[1][1] - e / (1.0 + e)).abs() < 1e-6, "{y:?}");
    // One query after two cached keys sees all three: softmax(0, 1, 2) = (1, e, e²) / (1 + e + e²).
    let y: Vec<Vec<f32>> =
        causal_softmax(&Tensor::new(&[[0f32, 1.0, 2.0]], &dev).unwrap(), 1.0).unwrap().to_vec2().unwrap();
    let z = 1.0 + e + e * e;
    for (j, want) in [1.0 / z, e / z, e * e / z].into_iter().enumerate() {
        assert!((y[0][j] - want).abs() < 1e-6, "{y:?}");
    }
    // Scores far from 0 (here 600 ± 8, whose exponentials overflow f32) are shifted by their
    // row's maximum first, in f32 and bf16 alike.
    let big = (Tensor::randn(0f32, 4.0, (1, 2, 5, 7), &dev).unwrap() + 600.0).unwrap().to_dtype(DType::BF16).unwrap();
    let want = causal_softmax(&big.to_dtype(DType::F32).unwrap(), 0.5).unwrap();
    let got = causal_softmax(&big, 0.5).unwrap().to_dtype(DType::F32).unwrap();
    let sums: Vec<f32> = want.sum(D::Minus1).unwrap().flatten_all().unwrap().to_vec1().unwrap();
    assert!(sums.iter().all(|s| (s - 1.0).abs() < 1e-5), "{sums:?}");
    assert!(max_abs(&(&got - &want).unwrap()) < 1e-2, "{got}");
    // Random scores, T = S (training) and T < S (queries after cached keys): f64 loop reference
    // for the forward pass, the composed ops (scale, additive mask, softmax) for the backward pass.
    for (b, h, t, s_len) in [(2usize, 3usize, 7usize, 7usize), (1, 2, 3, 10), (2, 1, 33, 33)] {
        let scale = 0.37;
        let x = Var::from_tensor(&Tensor::randn(0f32, 2.0, (b, h, t, s_len), &dev).unwrap()).unwrap();
        let y = causal_softmax(x.as_tensor(), scale).unwrap();
        let xs: Vec<f32> = x.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
        let ys: Vec<f32> = y.flatten_all().unwrap().to_vec1().unwrap();
        for (r, (xr, yr)) in xs.chunks(s_len).zip(ys.chunks(s_len)).enumerate() {
            let lim = s_len - t + r % t;
            let m = xr[..=lim].iter().fold(f64::NEG_INFINITY, |m, &v| m.max(v as f64 * scale));
            let z: f64 = xr[..=lim].iter().map(|&v| (v as f64 * scale - m).exp()).sum();
            for j in 0..s_len {
                let want = if j <= lim { (xr[j] as f64 * scale - m).exp() / z } else { 0.0 };
                assert!((yr[j] as f64 - want).abs() < 1e-6, "row {r} col {j}: {} vs {want}", yr[j]);
            }
        }
        let mask: Vec<f32> = (0..t)
            .flat_map(|i| (0..s_len).map(move |j| if j > s_len - t + i { f32::NEG_INFINITY } else { 0.0 }))
            .collect();
        let mask = Tensor::from_vec(mask, (t, s_len), &dev).unwrap();
        let composed =
            patchlm_model::llama::softmax_last_dim(&(x.as_tensor() * scale).unwrap().broadcast_add(&mask).unwrap())
                .unwrap();
        assert!(max_abs(&(&y - &composed).unwrap()) < 1e-6);
        let up = Tensor::randn(0f32, 1.0, (b, h, t, s_len), &dev).unwrap();
        let ga = (&y * &up).unwrap().sum_all().unwrap().backward().unwrap();
        let gb = (&composed * &up).unwrap().sum_all().unwrap().backward().unwrap();
        let (ga, gb) = (ga.get(x.as_tensor()).unwrap(), gb.get(x.as_tensor()).unwrap());
        assert!(max_abs(&(ga - gb).unwrap()) < 1e-5 * max_abs(gb).max(1e-3), "dx b={b} h={h} t={t} s={s_len}");
        assert!(max_abs(gb) > 1e-3);
        // bf16 scores: within bf16 resolution of the f32 probabilities.
        let yb = causal_softmax(&x.as_tensor().to_dtype(DType::BF16).unwrap(), scale).unwrap();
        assert_eq!(yb.dtype(), DType::BF16);
        assert!(max_abs(&(yb.to_dtype(DType::F32).unwrap() - &y).unwrap()) < 1e-2);
    }
    // Fewer keys than queries, no queries, fewer than two axes: refused.
    for dims in [&[3, 2][..], &[0, 5], &[2, 0, 5], &[5]] {
        let e = causal_softmax(&Tensor::zeros(dims, DType::F32, &dev).unwrap(), 1.0).unwrap_err().to_string();
        assert!(e.contains("expected scores (..., T, S) with S ≥ T ≥ 1"), "{dims:?}: {e}");
    }
}

#[test]
fn flash_attention_matches_materialised_attention_forward_and_backward() {
    let dev = Device::Cpu;
    // T = S (training) and T < S (queries after cached keys); head sizes 16 and 64.
    for (b, h, t, s_len, hd) in [(2usize, 3usize, 9usize, 9usize, 16usize), (1, 2, 4, 11, 64), (1, 1, 70, 70, 32)] {
        let scale = 1.0 / (hd as f64).sqrt();
        let mk = |n: usize| Var::from_tensor(&Tensor::randn(0f32, 1.0, (b, h, n, hd), &dev).unwrap()).unwrap();
        let (q, k, v) = (mk(t), mk(s_len), mk(s_len));
        let y = flash_attention(q.as_tensor(), k.as_tensor(), v.as_tensor(), scale).unwrap();
        assert_eq!(y.dims(), &[b, h, t, hd]);
        // The reference: the full score matrix, an additive -inf mask, composed softmax.
        let mask: Vec<f32> = (0..t)
            .flat_map(|i| (0..s_len).map(move |j| if j > s_len - t + i { f32::NEG_INFINITY } else { 0.0 }))
            .collect();
        let mask = Tensor::from_vec(mask, (t, s_len), &dev).unwrap();
        let scores = (q.as_tensor().matmul(&k.as_tensor().t().unwrap()).unwrap() * scale).unwrap();
        let p = patchlm_model::llama::softmax_last_dim(&scores.broadcast_add(&mask).unwrap()).unwrap();
        let want = p.matmul(v.as_tensor()).unwrap();
        assert!(max_abs(&(&y - &want).unwrap()) < 1e-5, "forward {b}x{h}x{t}x{s_len}x{hd}");
        let up = Tensor::randn(0f32, 1.0, (b, h, t, hd), &dev).unwrap();
        let ga = (&y * &up).unwrap().sum_all().unwrap().backward().unwrap();
        let gb = (&want * &up).unwrap().sum_all().unwrap().backward().unwrap();
        for (name, var) in [("q", &q), ("k", &k), ("v", &v)] {
            let (x, r) = (ga.get(var.as_tensor()).unwrap(), gb.get(var.as_tensor()).unwrap());
            let scale = max_abs(r);
            assert!(scale > 1e-3, "d{name} is all zero");
            assert!(max_abs(&(x - r).unwrap()) < 1e-5 * scale.max(1.0), "d{name} {b}x{h}x{t}x{s_len}x{hd}");
        }
        // The graph-free pair the tape uses: the same output, the log-sum-exp of the masked
        // scaled scores, and gradients from it equal to the autograd ones above.
        let (q0, k0, v0) = (q.as_tensor().detach(), k.as_tensor().detach(), v.as_tensor().detach());
        let (o, lse) = patchlm_model::ops::flash_attention_lse(&q0, &k0, &v0, scale).unwrap();
        assert!(max_abs(&(&o - &want).unwrap()) < 1e-5, "flash_attention_lse output");
        let sm = scores.broadcast_add(&mask).unwrap().detach();
        let mx = sm.max_keepdim(D::Minus1).unwrap();
        let want_lse = (sm.broadcast_sub(&mx).unwrap().exp().unwrap().sum_keepdim(D::Minus1).unwrap().log().unwrap()
            + mx)
            .unwrap()
            .squeeze(3)
            .unwrap();
        assert_eq!(lse.dims(), &[b, h, t]);
        assert!(max_abs(&(&lse - &want_lse).unwrap()) < 1e-5, "log-sum-exp {b}x{h}x{t}x{s_len}x{hd}");
        // As rows (B, T, H·hd), each position's heads side by side: on the CPU the same values.
        let (rows, lse_rows) = patchlm_model::ops::flash_attention_lse_rows(&q0, &k0, &v0, scale).unwrap();
        let o_rows = o.transpose(1, 2).unwrap().reshape((b, t, h * hd)).unwrap();
        assert_eq!(rows.dims(), &[b, t, h * hd]);
        assert_eq!(max_abs(&(&rows - &o_rows).unwrap()) + max_abs(&(&lse_rows - &lse).unwrap()), 0.0);
        let (dq, dk, dv) = patchlm_model::ops::grad::flash_attention_lse(&q0, &k0, &v0, &o, &lse, &up, scale).unwrap();
        for (name, var, x) in [("q", &q, &dq), ("k", &k, &dk), ("v", &v, &dv)] {
            let r = gb.get(var.as_tensor()).unwrap();
            assert_eq!(x.dims(), r.dims());
            assert!(max_abs(&(x - r).unwrap()) < 1e-5 * max_abs(r).max(1.0), "lse path d{name}");
        }
        // From rows: the same gradients (the CPU reads rows as heads); o and dO shaped apart,
        // or a log-sum-exp of another shape, are refused.
        let up_rows = up.transpose(1, 2).unwrap().reshape((b, t, h * hd)).unwrap();
        let lse_grad = |o: &Tensor, lse: &Tensor, up: &Tensor| {
            patchlm_model::ops::grad::flash_attention_lse(&q0, &k0, &v0, o, lse, up, scale)
        };
        let (dqr, dkr, dvr) = lse_grad(&rows, &lse, &up_rows).unwrap();
        for (x, r) in [(&dqr, &dq), (&dkr, &dk), (&dvr, &dv)] {
            assert_eq!(max_abs(&(x - r).unwrap()), 0.0, "rows {b}x{h}x{t}x{s_len}x{hd}");
        }
        for (o, up) in [(&rows, &up), (&o, &up_rows)] {
            let e = lse_grad(o, &lse, up).unwrap_err().to_string();
            assert!(e.contains("are neither shaped like q"), "{e}");
        }
        let e = lse_grad(&o, &lse.unsqueeze(2).unwrap(), &up).unwrap_err().to_string();
        assert!(e.contains("is not f32 ("), "{e}");
        // bf16 and f16 inputs: within their resolution, forward and backward.
        for (dtype, tol) in [(DType::BF16, 3e-2), (DType::F16, 4e-3)] {
            let low = |x: &Var| Var::from_tensor(&x.as_tensor().to_dtype(dtype).unwrap()).unwrap();
            let (ql, kl, vl) = (low(&q), low(&k), low(&v));
            let yl = flash_attention(ql.as_tensor(), kl.as_tensor(), vl.as_tensor(), scale).unwrap();
            assert_eq!(yl.dtype(), dtype);
            let yl = yl.to_dtype(DType::F32).unwrap();
            assert!(max_abs(&(&yl - &want).unwrap()) < tol, "{dtype:?} forward");
            let gl = (yl * &up).unwrap().sum_all().unwrap().backward().unwrap();
            for (name, var, lv) in [("q", &q, &ql), ("k", &k, &kl), ("v", &v, &vl)] {
                let r = gb.get(var.as_tensor()).unwrap();
                let x = gl.get(lv.as_tensor()).unwrap();
                assert_eq!(x.dtype(), dtype);
                let d = max_abs(&(x.to_dtype(DType::F32).unwrap() - r).unwrap());
                assert!(d < tol * max_abs(r).max(1.0), "{dtype:?} d{name} {b}x{h}x{t}x{s_len}x{hd}: {d}");
            }
        }
    }
    let x = Tensor::zeros((1, 1, 5, 16), DType::F32, &dev).unwrap();
    let short = Tensor::zeros((1, 1, 4, 16), DType::F32, &dev).unwrap();
    assert!(flash_attention(&x, &short, &short, 1.0).is_err(), "fewer keys than queries");
    // The kernels scale each row's maximum once: a scale that is not positive and finite (as an
    // f32) is refused, naming the scale.
    for bad in [0.0, -0.125, f64::NAN, f64::INFINITY, 1e-60, 1e60] {
        let e = flash_attention(&x, &x, &x, bad).unwrap_err().to_string();
        assert!(e.contains("scale must be positive and finite"), "{bad}: {e}");
        assert!(patchlm_model::ops::flash_attention_lse(&x, &x, &x, bad).is_err(), "{bad}");
    }
    // So are shapes that do not fit, each alone: keys of another head size, head count or batch
    // than the queries, values shaped unlike the keys, no query; and mixed dtypes.
    let zeros = |dims: (usize, usize, usize, usize)| Tensor::zeros(dims, DType::F32, &dev).unwrap();
    let q = zeros((1, 2, 3, 16));
    assert!(flash_attention(&q, &q, &q, 0.25).is_ok());
    let cases = [
        (zeros((1, 2, 3, 32)), zeros((1, 2, 3, 32)), "key head size"),
        (zeros((1, 1, 3, 16)), zeros((1, 1, 3, 16)), "key heads"),
        (zeros((2, 2, 3, 16)), zeros((2, 2, 3, 16)), "key batch"),
        (q.clone(), zeros((1, 2, 4, 16)), "values unlike keys"),
    ];
    for (k, v, what) in cases {
        let e = flash_attention(&q, &k, &v, 0.25).unwrap_err().to_string();
        assert!(e.contains("do not fit (B, H, T, hd) / (B, H, S ≥ T, hd)"), "{what}: {e}");
    }
    let e = flash_attention(&zeros((1, 2, 0, 16)), &q, &q, 0.25).unwrap_err().to_string();
    assert!(e.contains("do not fit"), "no query: {e}");
    let bf = q.to_dtype(DType::BF16).unwrap();
    for (k, v) in [(&bf, &q), (&q, &bf)] {
        let e = flash_attention(&q, k, v, 0.25).unwrap_err().to_string();
        assert!(e.contains("q, k and v must share one dtype"), "{e}");
    }
}

#[test]
fn fused_swiglu_matches_silu_times_up_forward_and_backward() {
    let dev = Device::Cpu;
    // By hand: silu(1) * 2 = 2 / (1 + e^-1); silu(0) * 5 = 0; silu(-2) * 1 = -2 / (1 + e^2).
    let g = Tensor::new(&[1f32, 0.0, -2.0], &dev).unwrap();
    let u = Tensor::new(&[2f32, 5.0, 1.0], &dev).unwrap();
    let y: Vec<f32> = swiglu(&g, &u).unwrap().to_vec1().unwrap();
    let want = [2.0 / (1.0 + (-1f32).exp()), 0.0, -2.0 / (1.0 + 2f32.exp())];
    for (a, b) in y.iter().zip(want) {
        assert!((a - b).abs() < 1e-6, "{y:?}");
    }
    // 7 × 1300 elements: the CPU works in chunks of 4096, so three of them, the last ragged.
    let shape = (7, 1300);
    let g0 = Tensor::randn(0f32, 2.0, shape, &dev).unwrap();
    let u0 = Tensor::randn(0f32, 1.0, shape, &dev).unwrap();
    let up0 = Tensor::randn(0f32, 1.0, shape, &dev).unwrap();
    for dtype in [DType::F32, DType::BF16] {
        // The composed reference in f32 on the same (rounded) values; a bf16 result is the f32
        // one rounded once (at most 2^-8 of it).
        let round = |t: &Tensor| t.to_dtype(dtype).unwrap();
        let (g, u, up) = (Var::from_tensor(&round(&g0)).unwrap(), Var::from_tensor(&round(&u0)).unwrap(), round(&up0));
        let f32_of = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
        let (gr, ur) = (Var::from_tensor(&f32_of(&g)).unwrap(), Var::from_tensor(&f32_of(&u)).unwrap());
        let y = swiglu(g.as_tensor(), u.as_tensor()).unwrap();
        assert_eq!(y.dtype(), dtype);
        let composed = (gr.as_tensor().silu().unwrap() * ur.as_tensor()).unwrap();
        let ga = (f32_of(&y) * f32_of(&up)).unwrap().sum_all().unwrap().backward().unwrap();
        let gb = (&composed * f32_of(&up)).unwrap().sum_all().unwrap().backward().unwrap();
        let close = |name: &str, got: &Tensor, want: &Tensor| {
            let scale = max_abs(want);
            assert!(scale > 1e-2, "{name}");
            let got: Vec<f32> = f32_of(got).flatten_all().unwrap().to_vec1().unwrap();
            let want: Vec<f32> = want.flatten_all().unwrap().to_vec1().unwrap();
            let ulp = if dtype == DType::F32 { 0.0 } else { 1.0 / 256.0 };
            for (i, (a, b)) in got.iter().zip(&want).enumerate() {
                assert!((a - b).abs() <= b.abs() * ulp * 1.001 + 1e-5 * scale, "{dtype:?} {name}[{i}]: {a} vs {b}");
            }
        };
        close("y", &y, &composed);
        close("dgate", ga.get(g.as_tensor()).unwrap(), gb.get(gr.as_tensor()).unwrap());
        close("dup", ga.get(u.as_tensor()).unwrap(), gb.get(ur.as_tensor()).unwrap());
    }
    assert!(swiglu(&g0, &Tensor::zeros((7, 299), DType::F32, &dev).unwrap()).is_err());
}

#[test]
fn packed_swiglu_matches_swiglu_on_the_two_halves() {
    use patchlm_model::ops::{grad, swiglu_packed};
    let dev = Device::Cpu;
    for dtype in [DType::F32, DType::BF16] {
        let gu = Tensor::randn(0f32, 2.0, (5, 2 * 13), &dev).unwrap().to_dtype(dtype).unwrap();
        let (g, u) =
            (gu.narrow(1, 0, 13).unwrap().contiguous().unwrap(), gu.narrow(1, 13, 13).unwrap().contiguous().unwrap());
        let f = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
        let y = swiglu_packed(&gu).unwrap();
        assert_eq!(max_abs(&(f(&y) - f(&swiglu(&g, &u).unwrap())).unwrap()), 0.0, "{dtype:?} forward");
        let dy = Tensor::randn(0f32, 1.0, (5, 13), &dev).unwrap().to_dtype(dtype).unwrap();
        let dgu = grad::swiglu_packed(&gu, &dy).unwrap();
        let (dg, du) = grad::swiglu(&g, &u, &dy).unwrap();
        let want = Tensor::cat(&[dg, du], 1).unwrap();
        assert_eq!(max_abs(&(f(&dgu) - f(&want)).unwrap()), 0.0, "{dtype:?} backward");
        assert!(grad::swiglu_packed(&gu, &dy.narrow(1, 0, 12).unwrap()).is_err());
    }
    assert!(swiglu_packed(&Tensor::zeros((2, 7), DType::F32, &dev).unwrap()).is_err());
}

#[test]
fn fused_rope_matches_the_composed_rotation_and_inverts() {
    let dev = Device::Cpu;
    let mut cfg = ModelConfig::preset("tiny").unwrap();
    cfg.max_position_embeddings = 40;
    let hd = cfg.head_dim();
    let table = Rope::new(&cfg, &dev).unwrap();
    // Independent tables: angle p / theta^(2i/hd), both halves of a row alike.
    let ang = |p: usize, j: usize| p as f64 / cfg.rope_theta.powf((2 * (j % (hd / 2))) as f64 / hd as f64);
    for (t, offset) in [(9usize, 0usize), (5, 30)] {
        let cos: Vec<f32> = (0..t).flat_map(|p| (0..hd).map(move |j| ang(p + offset, j).cos() as f32)).collect();
        let sin: Vec<f32> = (0..t).flat_map(|p| (0..hd).map(move |j| ang(p + offset, j).sin() as f32)).collect();
        let (cos, sin) = (Tensor::from_vec(cos, (t, hd), &dev).unwrap(), Tensor::from_vec(sin, (t, hd), &dev).unwrap());
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (2, 3, t, hd), &dev).unwrap()).unwrap();
        let y = rope(x.as_tensor(), &cos, &sin).unwrap();
        let composed = table.apply_composed(x.as_tensor(), offset).unwrap();
        assert!(max_abs(&(&y - &composed).unwrap()) < 1e-5, "t={t} offset={offset}");
        // A rotation keeps each pair's norm; the inverse rotation (negated sin) gives x back.
        let back = rope(&y, &cos, &sin.neg().unwrap()).unwrap();
        assert!(max_abs(&(&back - x.as_tensor()).unwrap()) < 1e-5);
        let up = Tensor::randn(0f32, 1.0, y.dims(), &dev).unwrap();
        let ga = (&y * &up).unwrap().sum_all().unwrap().backward().unwrap();
        let gb = (&composed * &up).unwrap().sum_all().unwrap().backward().unwrap();
        let (ga, gb) = (ga.get(x.as_tensor()).unwrap(), gb.get(x.as_tensor()).unwrap());
        assert!(max_abs(&(ga - gb).unwrap()) < 1e-5, "dx t={t} offset={offset}");
        let yb = rope(&x.as_tensor().to_dtype(DType::BF16).unwrap(), &cos, &sin).unwrap();
        assert!(max_abs(&(yb.to_dtype(DType::F32).unwrap() - &y).unwrap()) < 2e-2);
    }
    let x = Tensor::zeros((1, 1, 4, hd), DType::F32, &dev).unwrap();
    let bad = Tensor::zeros((3, hd), DType::F32, &dev).unwrap();
    let good = Tensor::zeros((4, hd), DType::F32, &dev).unwrap();
    assert!(rope(&x, &good, &good).is_ok());
    // Either table of the wrong shape, an odd head size, either table not f32: refused.
    for (c, s) in [(&bad, &good), (&good, &bad)] {
        let e = rope(&x, c, s).unwrap_err().to_string();
        assert!(e.contains("do not match x"), "{e}");
    }
    let odd = Tensor::zeros((4, 3), DType::F32, &dev).unwrap();
    let e = rope(&Tensor::zeros((1, 1, 4, 3), DType::F32, &dev).unwrap(), &odd, &odd).unwrap_err().to_string();
    assert!(e.contains("(even head size)"), "{e}");
    let half = good.to_dtype(DType::BF16).unwrap();
    for (c, s) in [(&half, &good), (&good, &half)] {
        let e = rope(&x, c, s).unwrap_err().to_string();
        assert!(e.contains("must be f32"), "{e}");
    }
}

#[test]
fn heads_from_rows_and_back_match_the_strided_copies_and_rotation() {
    use patchlm_model::ops::{heads_from_rows, rows_from_heads, HeadsLayout};
    let dev = Device::Cpu;
    let (b, t, h, kv, hd) = (2usize, 7usize, 4usize, 2usize, 6usize);
    let cos = Tensor::randn(0f32, 1.0, (t, hd), &dev).unwrap();
    let sin = Tensor::randn(0f32, 1.0, (t, hd), &dev).unwrap();
    let rows = Tensor::randn(0f32, 1.0, (b * t, (h + 2 * kv) * hd), &dev).unwrap();
    let l = HeadsLayout { batch: b, seq: t, heads: h, kv_heads: kv, head_dim: hd };
    let (q, k_v) = heads_from_rows(&rows, l, Some((&cos, &sin))).unwrap();
    let (k, v) = k_v.unwrap();
    // The same through candle's strided copies and the fused rotation.
    let r4 = rows.reshape((b, t, h + 2 * kv, hd)).unwrap();
    let part = |from: usize, n: usize| r4.narrow(2, from, n).unwrap().transpose(1, 2).unwrap().contiguous().unwrap();
    let want_q = rope(&part(0, h), &cos, &sin).unwrap();
    let want_k = rope(&part(h, kv), &cos, &sin).unwrap();
    for (got, want) in [(&q, &want_q), (&k, &want_k), (&v, &part(h + kv, kv))] {
        assert_eq!(got.dims(), want.dims());
        assert!(max_abs(&(got - want).unwrap()) < 1e-6);
    }
    // Back: the inverse rotation and the row layout give the rows again.
    let back = rows_from_heads(&q, Some((&k, &v)), l, Some((&cos, &sin))).unwrap();
    // A rotation by cos/sin then by cos/-sin returns x only when cos^2 + sin^2 = 1: compare with
    // the composed inverse instead.
    let inv = |x: &Tensor| rope(x, &cos, &sin.neg().unwrap()).unwrap();
    let want =
        Tensor::cat(&[inv(&q), inv(&k), v.clone()], 1).unwrap().transpose(1, 2).unwrap().reshape((b * t, ())).unwrap();
    assert!(max_abs(&(&back - &want).unwrap()) < 1e-5);
    // Without rotation and key/value heads: a pure layout change, exact both ways, in bf16 too.
    let plain = HeadsLayout { kv_heads: 0, ..l };
    let x = Tensor::randn(0f32, 1.0, (b * t, h * hd), &dev).unwrap().to_dtype(DType::BF16).unwrap();
    let (heads, none) = heads_from_rows(&x, plain, None).unwrap();
    assert!(none.is_none());
    let want = x.reshape((b, t, h, hd)).unwrap().transpose(1, 2).unwrap().contiguous().unwrap();
    let diff = (heads.to_dtype(DType::F32).unwrap() - want.to_dtype(DType::F32).unwrap()).unwrap();
    assert_eq!(max_abs(&diff), 0.0);
    let again = rows_from_heads(&heads, None, plain, None).unwrap();
    assert_eq!(max_abs(&(again.to_dtype(DType::F32).unwrap() - x.to_dtype(DType::F32).unwrap()).unwrap()), 0.0);
    // Shapes that do not match the layout are errors, not panics.
    assert!(heads_from_rows(&x, l, None).is_err());
    assert!(rows_from_heads(&q, None, l, None).is_err());
    assert!(heads_from_rows(&rows, l, Some((&cos.narrow(0, 0, 3).unwrap(), &sin))).is_err());
    // Rope tables of another shape, for an odd head size, or not f32.
    let odd = HeadsLayout { head_dim: 5, ..plain };
    let (c5, s5) = (cos.narrow(1, 0, 5).unwrap(), sin.narrow(1, 0, 5).unwrap());
    let rows5 = Tensor::zeros((b * t, h * 5), DType::F32, &dev).unwrap();
    for (layout, c, s_, x) in [(l, &cos, &sin.narrow(0, 0, 3).unwrap(), &rows), (odd, &c5, &s5, &rows5)] {
        let e = heads_from_rows(x, layout, Some((c, s_))).unwrap_err().to_string();
        assert!(e.contains("do not match") && e.contains("(even head size)"), "{e}");
    }
    let half = sin.to_dtype(DType::BF16).unwrap();
    for (c, s_) in [(&cos, &half), (&half, &sin)] {
        let e = heads_from_rows(&rows, l, Some((c, s_))).unwrap_err().to_string();
        assert!(e.contains("cos and sin tables must be f32"), "{e}");
    }
    // Key and value heads where the layout has none, or either of another shape.
    let short = k.narrow(2, 0, t - 1).unwrap();
    for (layout, kk, vv) in [(plain, &k, &v), (l, &short, &v), (l, &k, &short)] {
        let e = rows_from_heads(&q, Some((kk, vv)), layout, None).unwrap_err().to_string();
        assert!(e.contains("heads do not match"), "{e}");
    }
}

#[test]
fn add_rms_norm_and_the_residual_backward_match_the_separate_ops() {
    use patchlm_model::ops::{add_rms_norm, grad, rms_norm};
    let dev = Device::Cpu;
    for dtype in [DType::F32, DType::BF16, DType::F16] {
        let r = |shape: (usize, usize)| Tensor::randn(0f32, 1.0, shape, &dev).unwrap().to_dtype(dtype).unwrap();
        let (a, b, dy, res) = (r((9, 48)), r((9, 48)), r((9, 48)), r((9, 48)));
        let w = Tensor::randn(1f32, 0.3, 48, &dev).unwrap().to_dtype(dtype).unwrap();
        let (sum, y) = add_rms_norm(&a, &b, &w, 1e-5).unwrap();
        let f = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
        // a + b in f32, rounded once to the dtype (to nearest, ties to even). Not candle's bf16
        // add: on aarch64 its NEON kernel truncates the f32 sum instead (candle 0.11), so it
        // differs from this (and from its own x86 kernels) in the last bit.
        let want_sum = (f(&a) + f(&b)).unwrap().to_dtype(dtype).unwrap();
        assert_eq!(max_abs(&(f(&sum) - f(&want_sum)).unwrap()), 0.0, "{dtype:?} sum");
        let want_y = rms_norm(&want_sum, &w, 1e-5).unwrap();
        assert_eq!(max_abs(&(f(&y) - f(&want_y)).unwrap()), 0.0, "{dtype:?} norm");
        let (dx, dw) = grad::rms_norm_residual(&sum, &w, &dy, &res, 1e-5).unwrap();
        let (dx0, dw0) = grad::rms_norm(&sum, &w, &dy, 1e-5).unwrap();
        let tol = if dtype == DType::F32 { 1e-6 } else { 2e-2 };
        let want_dx = (f(&dx0) + f(&res)).unwrap();
        assert!(max_abs(&(f(&dx) - &want_dx).unwrap()) <= tol * max_abs(&want_dx), "{dtype:?} dx + residual");
        assert_eq!(max_abs(&(f(&dw) - f(&dw0)).unwrap()), 0.0, "{dtype:?} dw");
        // b of other rows or another dtype, a weight of another size: refused.
        let other = if dtype == DType::F32 { DType::BF16 } else { DType::F32 };
        for (b, w) in
            [(&b.narrow(0, 0, 3).unwrap(), &w), (&b.to_dtype(other).unwrap(), &w), (&b, &w.narrow(0, 0, 47).unwrap())]
        {
            let e = add_rms_norm(&a, b, w, 1e-5).unwrap_err().to_string();
            assert!(e.contains("do not match"), "{e}");
        }
        assert!(grad::rms_norm_residual(&sum, &w, &dy, &res.narrow(1, 0, 5).unwrap(), 1e-5).is_err());
    }
}

#[test]
fn fused_embedding_gathers_rows_and_scatters_gradients_onto_ids() {
    let dev = Device::Cpu;
    let (v, d) = (11usize, 5usize);
    let w = Var::from_tensor(&Tensor::randn(0f32, 1.0, (v, d), &dev).unwrap()).unwrap();
    // Repeated ids (3 three times, 0 twice) and ids never used (their gradient rows stay 0).
    let ids = Tensor::new(&[[3u32, 0, 3, 7], [10, 3, 0, 1]], &dev).unwrap();
    let y = embedding(w.as_tensor(), &ids).unwrap();
    assert_eq!(y.dims(), &[2, 4, d]);
    let wv: Vec<Vec<f32>> = w.as_tensor().to_vec2().unwrap();
    let yv: Vec<Vec<Vec<f32>>> = y.to_vec3().unwrap();
    let idv: Vec<Vec<u32>> = ids.to_vec2().unwrap();
    for (yr, ir) in yv.iter().zip(&idv) {
        for (row, &id) in yr.iter().zip(ir) {
            assert_eq!(row, &wv[id as usize]);
        }
    }
    // dW[id] = sum of the upstream rows at that id, by hand; equal to candle's index_add path.
    let up = Tensor::randn(0f32, 1.0, (2, 4, d), &dev).unwrap();
    let g = (&y * &up).unwrap().sum_all().unwrap().backward().unwrap();
    let gw: Vec<Vec<f32>> = g.get(w.as_tensor()).unwrap().to_vec2().unwrap();
    let upv: Vec<Vec<f32>> = up.reshape((8, d)).unwrap().to_vec2().unwrap();
    let flat: Vec<u32> = idv.concat();
    for (id, row) in gw.iter().enumerate() {
        for (j, &got) in row.iter().enumerate() {
            let want: f32 = flat.iter().zip(&upv).filter(|(&i, _)| i as usize == id).map(|(_, u)| u[j]).sum();
            assert!((got - want).abs() < 1e-6, "id {id} col {j}: {got} vs {want}");
        }
    }
    assert!(gw[3].iter().any(|&x| x != 0.0) && gw[2].iter().all(|&x| x == 0.0));
    let reference = candle_nn::Embedding::new(w.as_tensor().clone(), d).forward(&ids).unwrap();
    let gr = (&reference * &up).unwrap().sum_all().unwrap().backward().unwrap();
    assert!(max_abs(&(g.get(w.as_tensor()).unwrap() - gr.get(w.as_tensor()).unwrap()).unwrap()) < 1e-6);
    // An id outside the vocabulary is an error naming it; non-u32 ids are refused.
    let e = embedding(w.as_tensor(), &Tensor::new(&[1u32, 11], &dev).unwrap()).unwrap_err().to_string();
    assert!(e.contains("id 11"), "{e}");
    assert!(embedding(w.as_tensor(), &Tensor::new(&[1i64], &dev).unwrap()).is_err());
}

/// The bag mean against its composition (lookup, reshape, mean; candle's autograd for the
/// gradient) in f32 and bf16, bags of 1 to 4 with repeated ids inside a bag and across bags.
#[test]
fn embedding_mean_matches_lookup_then_mean() {
    let dev = Device::Cpu;
    let (v, d) = (13usize, 6usize);
    for k in 1..=4usize {
        for dtype in [DType::F32, DType::BF16] {
            let w =
                Var::from_tensor(&Tensor::randn(0f32, 1.0, (v, d), &dev).unwrap().to_dtype(dtype).unwrap()).unwrap();
            let n = 3 * k;
            let ids: Vec<u32> = (0..2 * n as u32).map(|i| (i * i + 3 * i) % v as u32).collect();
            let ids = Tensor::from_vec(ids, (2, n), &dev).unwrap();
            let y = ops::embedding_mean(w.as_tensor(), &ids, k).unwrap();
            assert_eq!(y.dims(), &[2, 3, d]);
            assert_eq!(y.dtype(), dtype);
            let wf = w.as_tensor().to_dtype(DType::F32).unwrap();
            let want =
                wf.embedding(&ids.flatten_all().unwrap()).unwrap().reshape((2, 3, k, d)).unwrap().mean(2).unwrap();
            let tol = if dtype == DType::F32 { 1e-6 } else { 8e-3 };
            let e = max_abs(&(y.to_dtype(DType::F32).unwrap() - &want).unwrap());
            assert!(e < tol, "k {k} {dtype:?}: forward off by {e}");

            let up = Tensor::randn(0f32, 1.0, (2, 3, d), &dev).unwrap();
            let g = (y.to_dtype(DType::F32).unwrap() * &up).unwrap().sum_all().unwrap().backward().unwrap();
            let got = g.get(w.as_tensor()).unwrap().to_dtype(DType::F32).unwrap();
            let wr = Var::from_tensor(&wf).unwrap();
            let r = wr.embedding(&ids.flatten_all().unwrap()).unwrap().reshape((2, 3, k, d)).unwrap().mean(2).unwrap();
            let gr = (r * &up).unwrap().sum_all().unwrap().backward().unwrap();
            let want = gr.get(wr.as_tensor()).unwrap();
            let e = max_abs(&(&got - want).unwrap());
            assert!(e < tol * 4.0, "k {k} {dtype:?}: gradient off by {e}");
            // The hand-written backward (grad::embedding_mean) is the same computation.
            let gh = ops::grad::embedding_mean(&ids, &up.to_dtype(dtype).unwrap(), v, k).unwrap();
            let e = max_abs(&(gh.to_dtype(DType::F32).unwrap() - &got).unwrap());
            assert!(e < tol * 4.0, "k {k} {dtype:?}: grad::embedding_mean off by {e}");
        }
    }
    // Ids that are not whole bags, a gradient of the wrong size, and k = 0 are errors.
    let w = Tensor::randn(0f32, 1.0, (v, d), &dev).unwrap();
    let ids = Tensor::new(&[[1u32, 2, 3, 4, 5]], &dev).unwrap();
    let e = ops::embedding_mean(&w, &ids, 2).unwrap_err().to_string();
    assert!(e.contains("the last axis of ids (5) is not a whole number of bags of 2"), "{e}");
    // Bags are cut along the last axis: 2 × 6 ids are 12, but 6 is no whole number of 4s.
    let ids26 = Tensor::zeros((2, 6), DType::U32, &dev).unwrap();
    let e = ops::embedding_mean(&w, &ids26, 4).unwrap_err().to_string();
    assert!(e.contains("the last axis of ids (6) is not a whole number of bags of 4"), "{e}");
    assert!(ops::embedding_mean(&w, &ids, 0).is_err());
    let dy = Tensor::zeros((1, 2, d), DType::F32, &dev).unwrap();
    let e = ops::grad::embedding_mean(&ids, &dy, v, 5).unwrap_err().to_string();
    assert!(e.contains("bags of 5"), "{e}");
    // k = 0 is refused even where there are no ids (0 / 0 bags).
    let none = Tensor::zeros((1, 0), DType::U32, &dev).unwrap();
    let e = ops::grad::embedding_mean(&none, &Tensor::zeros((0, d), DType::F32, &dev).unwrap(), v, 0).unwrap_err();
    assert!(e.to_string().contains("bags of 0"), "{e}");
}

#[test]
fn bf16_compute_trains_f32_master_weights() {
    let dev = Device::Cpu;
    let cfg = ModelConfig::preset("tiny").unwrap();
    let (model, varmap) = init_model(&cfg, &dev, 3).unwrap();
    let ids: Vec<u32> = (0..2 * 24).map(|i| (i * 37 % cfg.vocab_size) as u32).collect();
    let ids = Tensor::from_vec(ids, (2, 24), &dev).unwrap();
    let targets = ids.narrow(1, 1, 23).unwrap().reshape((46, 1)).unwrap();
    let loss_of = |m: &Llama| -> Tensor {
        let logits = m.forward(&ids.narrow(1, 0, 23).unwrap()).unwrap();
        cross_entropy_multi(&logits.reshape((46, cfg.vocab_size)).unwrap(), &targets).unwrap()
    };
    let bf = model.clone().with_compute_dtype(DType::BF16);
    assert_eq!(bf.forward(&ids).unwrap().dtype(), DType::BF16);
    let (lf, lb) = (loss_of(&model), loss_of(&bf));
    assert_eq!(lb.dtype(), DType::F32, "the loss is f32");
    let (a, b) = (lf.to_scalar::<f32>().unwrap(), lb.to_scalar::<f32>().unwrap());
    assert!((a - b).abs() < 2e-2 * a.abs(), "f32 loss {a} vs bf16 loss {b}");
    let (gf, gb) = (lf.backward().unwrap(), lb.backward().unwrap());
    let vars = varmap.all_vars();
    assert_eq!(vars.len(), 2 + 9 * cfg.num_hidden_layers + 1);
    for v in &vars {
        let (x, y) = (gf.get(v.as_tensor()).unwrap(), gb.get(v.as_tensor()).unwrap());
        assert_eq!(y.dtype(), DType::F32, "gradients reach the f32 master weights");
        // Same direction up to bf16 noise.
        let dot = (x * y).unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap();
        let nx = x.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap().sqrt();
        let ny = y.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap().sqrt();
        assert!(dot / (nx * ny) > 0.98, "gradient cosine {} for a {:?} parameter", dot / (nx * ny), v.dims());
    }
    assert!(parse_dtype("bf16").is_ok() && parse_dtype("int8").is_err());
}

/// `ops::cast_groups` (its CPU path) stacks each group along the first dimension and rounds each
/// element as the `half` crate does; shapes that cannot stack are refused.
#[test]
fn cast_groups_stacks_and_rounds_each_group() {
    let dev = Device::Cpu;
    let r = |shape: &[usize]| Tensor::randn(0f32, 2.0, shape, &dev).unwrap();
    let (q, k, v, n, o) = (r(&[6, 4]), r(&[2, 4]), r(&[2, 4]), r(&[4]), r(&[3, 5]));
    let groups: [&[&Tensor]; 3] = [&[&q, &k, &v], &[&n], &[&o]];
    let flat = |ts: &[&Tensor]| -> Vec<f32> {
        ts.iter().flat_map(|t| t.flatten_all().unwrap().to_vec1::<f32>().unwrap()).collect()
    };
    let got = ops::cast_groups(&groups, DType::BF16).unwrap();
    let shapes: Vec<&[usize]> = got.iter().map(|t| t.dims()).collect();
    assert_eq!(shapes, [&[10usize, 4][..], &[4], &[3, 5]]);
    for (g, want) in got.iter().zip(&groups) {
        let want: Vec<u16> = flat(want).iter().map(|&x| half::bf16::from_f32(x).to_bits()).collect();
        let got: Vec<u16> =
            g.flatten_all().unwrap().to_vec1::<half::bf16>().unwrap().iter().map(|x| x.to_bits()).collect();
        assert_eq!(got, want);
    }
    let got = ops::cast_groups(&[&[&q, &k]], DType::F16).unwrap();
    let want: Vec<u16> = flat(&[&q, &k]).iter().map(|&x| half::f16::from_f32(x).to_bits()).collect();
    let g: Vec<u16> =
        got[0].flatten_all().unwrap().to_vec1::<half::f16>().unwrap().iter().map(|x| x.to_bits()).collect();
    assert_eq!(g, want);
    let err = ops::cast_groups(&[&[&q, &o]], DType::BF16).unwrap_err().to_string();
    assert!(err.contains("do not stack"), "{err}");
    assert!(ops::cast_groups(&[&[]], DType::BF16).unwrap_err().to_string().contains("group 0 is empty"));
    // A scalar stacks with nothing, first in its group or not.
    let scalar = Tensor::new(1f32, &Device::Cpu).unwrap();
    for group in [[&scalar, &q], [&q, &scalar]] {
        let err = ops::cast_groups(&[&group], DType::BF16).unwrap_err().to_string();
        assert!(err.contains("do not stack"), "{err}");
    }
}

/// `write_atomic` replaces a file whole; a failed write names the path and leaves no temp file;
/// threads writing one path at once each leave a whole file (the last rename wins), never a mix
/// or a stray temp file.
#[test]
fn atomic_writes_replace_whole_files_even_when_concurrent() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("f.json");
    patchlm_model::weights::write_atomic(&path, b"first").unwrap();
    patchlm_model::weights::write_atomic(&path, b"second").unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), b"second");

    let missing = dir.path().join("no-such-dir").join("g.json");
    let e = patchlm_model::weights::write_atomic(&missing, b"x").unwrap_err().to_string();
    assert!(e.contains("no-such-dir/g.json"), "{e}");

    let payloads: Vec<Vec<u8>> = (0..4u8).map(|t| vec![b'a' + t; 64 * 1024]).collect();
    std::thread::scope(|s| {
        for p in &payloads {
            let path = &path;
            s.spawn(move || {
                for _ in 0..25 {
                    patchlm_model::weights::write_atomic(path, p).unwrap();
                }
            });
        }
    });
    let got = std::fs::read(&path).unwrap();
    assert!(payloads.contains(&got), "a file mixed from several writers ({} bytes)", got.len());
    let names: Vec<String> =
        std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    assert_eq!(names, ["f.json"], "temp files left behind");
}

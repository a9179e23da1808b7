//! Patch crate tests: cost model, hand-computed loss values, K = 1 equals next-token CE, an
//! independent loop reference of the whole patch loss, finite differences, the loss and every
//! gradient against HF transformers running the paper's objective, and the datasets.

#![allow(clippy::unwrap_used)]

use candle_core::{Device, Tensor, Var};
use patchlm_model::{init_model, named_tensors, ModelConfig};
use patchlm_patch::*;

#[test]
fn config_validation_and_cost_model() {
    for (k, l, want) in [(4, 0.5, 0.625), (4, 2.0 / 3.0, 0.5), (4, 0.8, 0.4), (1, 0.5, 1.0), (8, 0.0, 1.0)] {
        let c = PatchConfig { k, lambda: l };
        c.validate().unwrap();
        assert!((c.relative_cost() - want).abs() < 1e-12, "k={k} lambda={l}");
    }
    assert!((PatchConfig::default().run_flops(1e6, 10.0) - 5e6).abs() < 1e-3);
    // A patch block is K·T tokens; the equal-compute budget is tokens · (λ/K + 1 − λ), rounded.
    assert_eq!(PatchConfig { k: 4, lambda: 0.5 }.patch_block_tokens(256), 1024);
    assert_eq!(PatchConfig { k: 1, lambda: 0.5 }.patch_block_tokens(256), 256);
    assert_eq!(PatchConfig { k: 4, lambda: 0.5 }.equal_compute_tokens(1000), 625);
    assert_eq!(PatchConfig { k: 2, lambda: 0.8 }.equal_compute_tokens(1003), 602); // 601.8
    assert_eq!(PatchConfig { k: 8, lambda: 0.0 }.equal_compute_tokens(77), 77);
    for (k, l) in [(0, 0.5), (4, 1.0), (4, -0.1), (4, f64::NAN)] {
        let e = PatchConfig { k, lambda: l }.validate().unwrap_err().to_string();
        assert!(e.contains("k must") || e.contains("lambda must"), "{e}");
    }
}

#[test]
fn loss_matches_hand_computed_value() {
    // logits [0, 0, ln 2] → p = [1/4, 1/4, 1/2]; targets of the next patch (K = 2): [2, 0].
    // loss = −(ln ½ + ln ¼)/2 = 1.5·ln 2.
    let logits = Tensor::new(&[[[0f32, 0.0, 2f32.ln()]]], &Device::Cpu).unwrap();
    let targets = Tensor::new(&[[[2u32, 0]]], &Device::Cpu).unwrap();
    let l = next_patch_loss_from_logits(&logits, &targets).unwrap().to_scalar::<f32>().unwrap();
    assert!((l as f64 - 1.5 * 2f64.ln()).abs() < 1e-6, "{l}");
    // Mean embedding by hand.
    let e = Tensor::new(&[[[1f32, 2.0], [3.0, 4.0], [5.0, 6.0], [7.0, 10.0]]], &Device::Cpu).unwrap();
    let p = patch_embeddings(&e, 2).unwrap().to_vec3::<f32>().unwrap();
    assert_eq!(p, vec![vec![vec![2.0, 3.0], vec![6.0, 8.0]]]);
    // Refused here, by this crate, with what is wrong (not by an op further down).
    for k in [3, 0] {
        let err = patch_embeddings(&e, k).unwrap_err().to_string();
        assert!(err.contains(&format!("sequence of 4 tokens is not a whole number of patches of {k}")), "{err}");
    }
}

#[test]
fn k1_is_next_token_cross_entropy() {
    let cfg = ModelConfig::preset("tiny").unwrap();
    let (model, _) = init_model(&cfg, &Device::Cpu, 1).unwrap();
    let ids = Tensor::new(&[[5u32, 9, 2, 200, 17, 3, 3, 8, 1], [0, 1, 2, 3, 4, 5, 6, 7, 8]], &Device::Cpu).unwrap();
    let ours = patch_loss(&model, &ids, 1).unwrap().to_scalar::<f32>().unwrap();
    let logits = model.forward(&ids.narrow(1, 0, 8).unwrap()).unwrap();
    let ce = candle_nn::loss::cross_entropy(
        &logits.reshape((16, cfg.vocab_size)).unwrap(),
        &ids.narrow(1, 1, 8).unwrap().reshape(16).unwrap(),
    )
    .unwrap()
    .to_scalar::<f32>()
    .unwrap();
    assert!((ours - ce).abs() < 1e-5, "{ours} vs {ce}");
}

/// The patch loss computed independently: embeddings averaged and log-softmax done with plain
/// f64 loops over vectors, only the decoder body borrowed from the model.
fn reference_patch_loss(model: &patchlm_model::Llama, ids: &[Vec<u32>], k: usize) -> f64 {
    let emb = named_tensors_of(model);
    let d = model.config().hidden_size;
    let mut total = 0.0;
    let mut count = 0usize;
    for row in ids {
        let n = row.len() / k;
        let mut x = Vec::new();
        for p in 0..n - 1 {
            let mut mean = vec![0f32; d];
            for j in 0..k {
                let t = row[p * k + j] as usize;
                for c in 0..d {
                    mean[c] += emb[t * d + c] / k as f32;
                }
            }
            x.extend(mean);
        }
        let xt = Tensor::from_vec(x, (1, n - 1, d), &Device::Cpu).unwrap();
        let logits =
            model.logits(&model.forward_embeds(&xt).unwrap()).unwrap().squeeze(0).unwrap().to_vec2::<f32>().unwrap();
        for p in 0..n - 1 {
            let l = &logits[p];
            let m = l.iter().cloned().fold(f32::MIN, f32::max) as f64;
            let lse = m + l.iter().map(|&v| (v as f64 - m).exp()).sum::<f64>().ln();
            for j in 0..k {
                total += lse - l[row[(p + 1) * k + j] as usize] as f64;
                count += 1;
            }
        }
    }
    total / count as f64
}

fn named_tensors_of(model: &patchlm_model::Llama) -> Vec<f32> {
    // The embedding matrix, read back through the model's own embed() of every id.
    let v = model.config().vocab_size as u32;
    let all = Tensor::arange(0u32, v, &Device::Cpu).unwrap().unsqueeze(0).unwrap();
    model.embed(&all).unwrap().flatten_all().unwrap().to_vec1().unwrap()
}

#[test]
fn patch_loss_matches_an_independent_reference() {
    let cfg = ModelConfig::preset("tiny").unwrap();
    let (model, _) = init_model(&cfg, &Device::Cpu, 2).unwrap();
    let rows: Vec<Vec<u32>> =
        vec![(0..24).map(|i| (i * 37 + 11) % 256).collect(), (0..24).map(|i| (i * 91 + 5) % 256).collect()];
    for k in [1usize, 2, 4, 8] {
        let len = if k == 1 { 9 } else { k * 3 };
        let ids: Vec<Vec<u32>> = rows.iter().map(|r| r[..len].to_vec()).collect();
        let t = Tensor::new(ids.clone(), &Device::Cpu).unwrap();
        let ours = patch_loss(&model, &t, k).unwrap().to_scalar::<f32>().unwrap() as f64;
        let want = reference_patch_loss(&model, &ids, k);
        assert!((ours - want).abs() < 1e-5, "k={k}: {ours} vs {want}");
    }
    // The shortest block, two patches (one input, one target), is a block.
    for k in [1usize, 4] {
        let ids: Vec<Vec<u32>> = rows.iter().map(|r| r[..2 * k].to_vec()).collect();
        let ours = patch_loss(&model, &Tensor::new(ids.clone(), &Device::Cpu).unwrap(), k).unwrap();
        let want = reference_patch_loss(&model, &ids, k);
        assert!((ours.to_scalar::<f32>().unwrap() as f64 - want).abs() < 1e-5, "k={k}");
    }
    // Blocks that are not at least two whole patches (one input, one target) are refused, by
    // this crate, saying so.
    for (len, k) in [(5, 4), (4, 4), (8, 0), (1, 1)] {
        let bad = Tensor::new(vec![rows[0][..len].to_vec()], &Device::Cpu).unwrap();
        let err = patch_loss(&model, &bad, k).unwrap_err().to_string();
        assert!(err.contains(&format!("a block of {len} tokens is not at least two whole patches of {k}")), "{err}");
        let err = patch_forward_tape(&model, &bad, k).err().unwrap().to_string();
        assert!(err.contains("is not at least two whole patches"), "{err}");
    }
}

#[test]
fn patch_loss_gradients_match_finite_differences() {
    let cfg = ModelConfig::preset("tiny").unwrap();
    let (model, varmap) = init_model(&cfg, &Device::Cpu, 4).unwrap();
    let ids = Tensor::new(&[[3u32, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7, 9, 3]], &Device::Cpu).unwrap();
    let loss = patch_loss(&model, &ids, 4).unwrap();
    let grads = loss.backward().unwrap();
    for (name, t) in named_tensors(&varmap).unwrap() {
        let g = grads.get(&t).unwrap_or_else(|| panic!("{name}: no gradient"));
        assert!(g.abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap() > 0.0, "{name}: zero gradient");
    }
    let data = varmap.data().lock().unwrap().clone();
    for name in ["model.embed_tokens.weight", "model.layers.0.self_attn.v_proj.weight", "lm_head.weight"] {
        let var: &Var = &data[name];
        let g: Vec<f32> = grads.get(var.as_tensor()).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        let orig: Vec<f32> = var.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
        let mut idx: Vec<usize> = (0..g.len()).collect();
        idx.sort_by(|&a, &b| g[b].abs().total_cmp(&g[a].abs()));
        for &i in idx.iter().take(3) {
            let eps = 1e-2f32;
            let at = |delta: f32| {
                let mut v = orig.clone();
                v[i] += delta;
                var.set(&Tensor::from_vec(v, var.dims(), &Device::Cpu).unwrap()).unwrap();
                patch_loss(&model, &ids, 4).unwrap().to_scalar::<f32>().unwrap() as f64
            };
            let fd = (at(eps) - at(-eps)) / (2.0 * eps as f64);
            var.set(&Tensor::from_vec(orig.clone(), var.dims(), &Device::Cpu).unwrap()).unwrap();
            assert!(g[i].abs() > 1e-4, "{name}: gradient too small to check");
            let tol = 0.05 * g[i].abs() as f64 + 3e-5;
            assert!((fd - g[i] as f64).abs() < tol, "{name}[{i}]: analytic {} vs fd {fd}", g[i]);
        }
    }
}

fn make_shards(dir: &std::path::Path, docs: usize) -> std::path::PathBuf {
    let mut s = String::new();
    for i in 0..docs {
        let words: Vec<String> = (0..60).map(|j| format!("w{}", (i * 7 + j * 13) % 97)).collect();
        s += &serde_json::json!({"text": words.join(" ")}).to_string();
        s.push('\n');
    }
    let input = dir.join("in.jsonl");
    std::fs::write(&input, s).unwrap();
    let mut cfg = patchlm_data::DataConfig::default();
    cfg.tokenizer.vocab_size = 300;
    cfg.val_fraction = 0.1;
    let out = dir.join("shards");
    patchlm_data::build_shards(&[&input], &out, &cfg, patchlm_data::TokenizerSource::Train, false).unwrap();
    out
}

#[test]
fn datasets_split_at_lambda_shuffle_and_resume() {
    let dir = tempfile::tempdir().unwrap();
    let shards = make_shards(dir.path(), 300);
    let ds = patchlm_data::Dataset::open(&shards).unwrap();
    let n = ds.train().len();
    let patch = PatchConfig { k: 4, lambda: 0.5 };
    let data = PatchDataConfig { context: 8, seed: 3, epochs: 1, max_val_blocks: 10, max_tokens: 0 };
    let out = dir.path().join("p");
    let m = build_patch_datasets(&shards, &out, &patch, &data).unwrap();
    // The manifest names the shards the blocks were cut from (the sha256 of theirs).
    let shards_manifest = std::fs::read(shards.join(patchlm_data::shard::MANIFEST)).unwrap();
    assert_eq!(m.shards_manifest_sha256, patchlm_data::shard::sha256_bytes(&shards_manifest));
    let pp = m.patch_phase.clone().unwrap();
    let split = (0.5 * n as f64).round() as u64;
    assert_eq!(pp.source_range, (0, split));
    assert_eq!(m.token_phase.source_range, (split, n));
    assert_eq!(pp.block_len, 32);
    assert_eq!(pp.blocks, split / 32);
    assert_eq!(m.token_phase.block_len, 9);
    assert_eq!(m.token_phase.blocks, (n - split) / 9);
    assert_eq!(m.val.blocks, 10);
    assert_eq!(m.val.source_range, (0, 90));
    // Uncapped, validation takes every whole block of the validation split.
    let uncapped = PatchDataConfig { max_val_blocks: 1 << 30, ..data };
    let mv = build_patch_datasets(&shards, &dir.path().join("all-val"), &patch, &uncapped).unwrap();
    let vblocks = ds.val().len() / 9;
    assert!(vblocks > 10 && vblocks < 1 << 30, "{vblocks}");
    assert_eq!((mv.val.blocks, mv.val.source_range), (vblocks, (0, vblocks * 9)));
    // Every patch block is one of the source blocks, each exactly once, in a shuffled order.
    let r = BlockReader::open(&out, &pp).unwrap();
    let mut all = Vec::new();
    r.read_blocks(0, pp.blocks as usize, &mut all);
    let got: Vec<&[u32]> = all.chunks(32).collect();
    let src: Vec<Vec<u32>> = (0..pp.blocks).map(|b| ds.train().tokens(b * 32, b * 32 + 32).unwrap()).collect();
    let perm = permutation(pp.blocks, 3);
    for (i, blk) in got.iter().enumerate() {
        assert_eq!(*blk, &src[perm[i] as usize][..], "block {i}");
    }
    assert_ne!(perm, (0..pp.blocks).collect::<Vec<_>>());
    // Token blocks come from the disjoint second part.
    let tr = BlockReader::open(&out, &m.token_phase).unwrap();
    let mut tb = Vec::new();
    tr.read_blocks(0, 1, &mut tb);
    let tperm = permutation(m.token_phase.blocks, 4);
    let a = split + tperm[0] * 9;
    assert_eq!(tb, ds.train().tokens(a, a + 9).unwrap());
    // Resumable from any block: a read from block 5 equals the tail of a read from 0.
    let mut from5 = Vec::new();
    r.read_blocks(5, 3, &mut from5);
    assert_eq!(from5, all[5 * 32..8 * 32]);
    // Later passes: the same blocks in another order, found from any block on.
    let nb = pp.blocks as usize;
    let mut pass1 = Vec::new();
    r.read_blocks(pp.blocks, nb, &mut pass1);
    assert_ne!(pass1, all);
    let mut a: Vec<&[u32]> = all.chunks(32).collect();
    let mut b: Vec<&[u32]> = pass1.chunks(32).collect();
    a.sort();
    b.sort();
    assert_eq!(a, b);
    let mut tail = Vec::new();
    r.read_blocks(pp.blocks + 5, 3, &mut tail);
    assert_eq!(tail, pass1[5 * 32..8 * 32]);
    let mut pass2 = Vec::new();
    r.read_blocks(2 * pp.blocks, nb, &mut pass2);
    assert_ne!(pass2, pass1);
    // Every pass an order of its own: the first nine passes are nine different orders.
    assert_eq!((r.num_blocks(), r.block_len()), (pp.blocks, 32));
    let orders: std::collections::HashSet<Vec<u32>> = (0..9)
        .map(|pass| {
            let mut v = Vec::new();
            r.read_blocks(pass * pp.blocks, nb, &mut v);
            v
        })
        .collect();
    assert_eq!(orders.len(), 9);
    // Deterministic.
    let out2 = dir.path().join("p2");
    let m2 = build_patch_datasets(&shards, &out2, &patch, &data).unwrap();
    assert_eq!(m2.patch_phase.unwrap().sha256, pp.sha256);
    // λ = 0: no patch phase; the token phase takes the whole stream.
    let m0 = build_patch_datasets(&shards, &dir.path().join("p0"), &PatchConfig { k: 4, lambda: 0.0 }, &data).unwrap();
    assert!(m0.patch_phase.is_none());
    assert_eq!(m0.token_phase.source_range, (0, n));
    // Multi-epoch: phases by epochs over the whole stream.
    let me = PatchDataConfig { epochs: 3, ..data.clone() };
    let m3 =
        build_patch_datasets(&shards, &dir.path().join("p3"), &PatchConfig { k: 4, lambda: 2.0 / 3.0 }, &me).unwrap();
    assert!((m3.patch_phase.as_ref().unwrap().epochs - 2.0).abs() < 1e-12);
    assert!((m3.token_phase.epochs - 1.0).abs() < 1e-12);
    assert_eq!(m3.token_phase.source_range, (0, n));
    // The paper's λ = 4/5 of 6 epochs: 4.8 passes at patch level, 1.2 at token level.
    let six = PatchDataConfig { epochs: 6, ..data.clone() };
    let m6 = build_patch_datasets(&shards, &dir.path().join("p6"), &PatchConfig { k: 4, lambda: 0.8 }, &six).unwrap();
    assert!((m6.patch_phase.as_ref().unwrap().epochs - 4.8).abs() < 1e-12);
    assert!((m6.token_phase.epochs - 1.2).abs() < 1e-12);
    // A token cap: λ splits only the first max_tokens.
    let capped = PatchDataConfig { max_tokens: 1000, ..data.clone() };
    let mc = build_patch_datasets(&shards, &dir.path().join("pc"), &patch, &capped).unwrap();
    assert_eq!(mc.patch_phase.unwrap().source_range, (0, 500));
    assert_eq!(mc.token_phase.source_range, (500, 1000));
}

/// A vocabulary over 65,536 ids (Llama 3's has 128,256): shards and blocks hold uint32, and ids
/// above 65,535 come through the blocks whole, each block its source's tokens.
#[test]
fn blocks_of_a_vocabulary_over_65536_ids_keep_every_id() {
    let dir = tempfile::tempdir().unwrap();
    let small = make_shards(dir.path(), 10);
    // The small tokenizer with 70,000 added tokens `<x0>`..`<x69999>` (ids 300 on).
    let mut tok: serde_json::Value =
        serde_json::from_slice(&std::fs::read(small.join("tokenizer.json")).unwrap()).unwrap();
    // (The trained model's vocabulary holds its special tokens too.)
    let base = tok["model"]["vocab"].as_object().unwrap().len();
    assert_eq!(base, 300);
    let added = tok["added_tokens"].as_array_mut().unwrap();
    for i in 0..70_000 {
        added.push(serde_json::json!({"id": base + i, "content": format!("<x{i}>"), "single_word": false,
            "lstrip": false, "rstrip": false, "normalized": false, "special": false}));
    }
    let big = dir.path().join("big.json");
    std::fs::write(&big, tok.to_string()).unwrap();
    let mut s = String::new();
    for i in 0..200 {
        let words: Vec<String> = (0..60)
            .map(|j| if j % 3 == 0 { format!("<x{}>", (i * 389 + j * 977) % 70_000) } else { format!("w{j}") })
            .collect();
        s += &serde_json::json!({"text": words.join(" ")}).to_string();
        s.push('\n');
    }
    let input = dir.path().join("big.jsonl");
    std::fs::write(&input, s).unwrap();
    let cfg = patchlm_data::DataConfig { val_fraction: 0.1, ..Default::default() };
    let shards = dir.path().join("big-shards");
    let src = patchlm_data::TokenizerSource::File(&big);
    let summary = patchlm_data::build_shards(&[&input], &shards, &cfg, src, false).unwrap();
    assert!(summary.vocab_size > 70_000, "{}", summary.vocab_size);
    let ds = patchlm_data::Dataset::open(&shards).unwrap();
    assert_eq!(ds.manifest().dtype, patchlm_data::TokenDtype::Uint32);
    let patch = PatchConfig { k: 4, lambda: 0.5 };
    let data = PatchDataConfig { context: 8, seed: 5, epochs: 1, max_val_blocks: 10, max_tokens: 0 };
    let m = build_patch_datasets(&shards, &dir.path().join("p"), &patch, &data).unwrap();
    for (phase, seed) in [(m.patch_phase.clone().unwrap(), 5), (m.token_phase.clone(), 6)] {
        let r = BlockReader::open(&dir.path().join("p"), &phase).unwrap();
        let mut all = Vec::new();
        r.read_blocks(0, phase.blocks as usize, &mut all);
        let len = phase.block_len;
        let perm = permutation(phase.blocks, seed);
        for (i, blk) in all.chunks(len).enumerate() {
            let a = phase.source_range.0 + perm[i] * len as u64;
            assert_eq!(blk, &ds.train().tokens(a, a + len as u64).unwrap()[..], "block {i}");
        }
        // About 1 token in 115 is one of the ids above 65,535 (a twentieth of the added ones).
        assert!(all.iter().filter(|&&t| t > 65_535).count() > all.len() / 200, "few large ids");
    }
}

#[test]
fn dataset_errors_are_clear() {
    let dir = tempfile::tempdir().unwrap();
    let shards = make_shards(dir.path(), 40);
    let big = PatchDataConfig { context: 100_000, ..Default::default() };
    let e =
        build_patch_datasets(&shards, &dir.path().join("x"), &PatchConfig::default(), &big).unwrap_err().to_string();
    assert!(e.contains("do not fill one block"), "{e}");
    let e = build_patch_datasets(
        &shards,
        &dir.path().join("x"),
        &PatchConfig { k: 4, lambda: 1.0 },
        &PatchDataConfig::default(),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("lambda"), "{e}");
    // A corrupted block file is refused on open.
    let data = PatchDataConfig { context: 8, ..Default::default() };
    let out = dir.path().join("ok");
    let m = build_patch_datasets(&shards, &out, &PatchConfig { k: 2, lambda: 0.5 }, &data).unwrap();
    let p = out.join("token.arrow");
    let mut bytes = std::fs::read(&p).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 1;
    std::fs::write(&p, bytes).unwrap();
    let e = BlockReader::open(&out, &m.token_phase).err().unwrap().to_string();
    assert!(e.contains("checksum mismatch"), "{e}");
}

#[test]
fn permuted_index_is_a_keyed_bijection() {
    for n in (1..=70).chain([255, 256, 257, 1000, 4097]) {
        for key in [0u64, 1, 0xdead_beef] {
            let p: Vec<u64> = (0..n).map(|i| permuted_index(i, n, key)).collect();
            let mut sorted = p.clone();
            sorted.sort();
            assert_eq!(sorted, (0..n).collect::<Vec<_>>(), "n {n} key {key}");
            if n >= 8 {
                assert_ne!(p, sorted, "n {n} key {key}: identity");
                let q: Vec<u64> = (0..n).map(|i| permuted_index(i, n, key + 1)).collect();
                assert_ne!(p, q, "n {n}: keys {key} and {} give one order", key + 1);
            }
        }
    }
    // Roughly uniform: where element 0 lands over many keys covers the range evenly.
    let n = 10u64;
    let mut hits = [0usize; 10];
    for key in 0..10_000u64 {
        hits[permuted_index(0, n, key) as usize] += 1;
    }
    assert!(hits.iter().all(|&h| (800..1200).contains(&h)), "{hits:?}");
}

/// The loss and every parameter's gradient, from the hand-written backward pass and from
/// autograd, against HF transformers' LlamaForCausalLM with the patch objective as the paper's
/// code computes it (tests/fixtures/make_patch_golden.py): mean-pooled `inputs_embeds`, fp32
/// log-softmax, K gathers. Untied at K = 1, 2, 4 (K = 1 being next-token cross-entropy) and
/// tied at K = 4, where the embedding's gradient is the sum of its two uses.
#[test]
fn patch_loss_and_gradients_match_hf_transformers() {
    let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let dev = Device::Cpu;
    let mut checked = 0;
    for name in ["patch-llama", "patch-llama-tied"] {
        let dir = fixtures.join(name);
        let golden: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("golden.json")).unwrap()).unwrap();
        let want_grads = candle_core::safetensors::load(dir.join("grads.safetensors"), &dev).unwrap();
        let (model, varmap, cfg) = patchlm_model::load_trainable(&dir, &dev).unwrap();
        assert_eq!(cfg.tie_word_embeddings, name.ends_with("tied"));
        let vars: Vec<(String, Var)> =
            varmap.data().lock().unwrap().iter().map(|(n, v)| (n.clone(), v.clone())).collect();
        let cases = ["k1", "k2", "k4"].iter().filter(|c| golden.get(**c).is_some()).count();
        assert_eq!(want_grads.len(), vars.len() * cases, "{name}: one golden gradient per parameter and K");
        for k in [1usize, 2, 4] {
            let Some(case) = golden.get(format!("k{k}")) else { continue };
            let ids: Vec<Vec<u32>> = serde_json::from_value(case["ids"].clone()).unwrap();
            let ids = Tensor::new(ids, &dev).unwrap();
            let want_loss = case["loss"].as_f64().unwrap();
            let (loss, tape_grads) = patch_loss_and_grads(&model, &ids, k, 1.0).unwrap();
            let auto_loss = patch_loss(&model, &ids, k).unwrap();
            let auto_grads = auto_loss.backward().unwrap();
            for (how, l) in [("tape", loss), ("autograd", auto_loss)] {
                let l = l.to_scalar::<f32>().unwrap() as f64;
                assert!((l - want_loss).abs() <= 1e-5 * want_loss, "{name} k={k} {how}: loss {l} vs {want_loss}");
            }
            for (pname, var) in &vars {
                let want = want_grads.get(&format!("k{k}.{pname}")).unwrap_or_else(|| panic!("no golden for {pname}"));
                let scale = want.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
                assert!(scale > 1e-4, "{name} k={k}: {pname} has a zero golden gradient");
                for (how, got) in [("tape", tape_grads.get(pname).unwrap()), ("autograd", auto_grads.get(var).unwrap())]
                {
                    let diff = (got - want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
                    assert!(diff <= 1e-5 * scale, "{name} k={k} {how}: {pname} differs by {diff} (max {scale})");
                }
                checked += 1;
            }
        }
    }
    assert_eq!(checked, 3 * 21 + 20, "every parameter of both models at every K");
}

#[test]
fn data_settings_and_manifests_are_checked() {
    let two = PatchDataConfig { context: 2, ..Default::default() };
    two.validate().unwrap();
    for context in [0, 1] {
        let e = PatchDataConfig { context, ..two.clone() }.validate().unwrap_err().to_string();
        assert!(e.contains(&format!("context length must be at least 2, got {context}")), "{e}");
    }
    let e = PatchDataConfig { epochs: 0, ..two.clone() }.validate().unwrap_err().to_string();
    assert!(e.contains("epochs must be at least 1"), "{e}");

    let dir = tempfile::tempdir().unwrap();
    let shards = make_shards(dir.path(), 40);
    let out = dir.path().join("p");
    let data = PatchDataConfig { context: 8, ..Default::default() };
    let m = build_patch_datasets(&shards, &out, &PatchConfig { k: 2, lambda: 0.5 }, &data).unwrap();
    assert_eq!(PatchManifest::load(&out).unwrap(), m);
    // Another format, another version, not JSON, no manifest: refused, each saying so.
    let path = out.join(patchlm_patch::dataset::MANIFEST);
    let text = std::fs::read_to_string(&path).unwrap();
    for (bad, want) in [
        (text.replace("\"patchlm-patch-data\"", "\"other-data\""), "unsupported format other-data v1"),
        (text.replace("\"format_version\": 1", "\"format_version\": 2"), "unsupported format patchlm-patch-data v2"),
        (text[..text.len() / 2].to_string(), "invalid manifest"),
    ] {
        assert_ne!(bad, text);
        std::fs::write(&path, &bad).unwrap();
        let e = PatchManifest::load(&out).unwrap_err().to_string();
        assert!(e.contains(want) && e.contains("patch_manifest.json"), "{e}");
    }
    let e = PatchManifest::load(&dir.path().join("none")).unwrap_err().to_string();
    assert!(e.contains("build patch datasets first"), "{e}");

    // What training reads is fingerprinted: the tokenizer and both phases' blocks, not the
    // validation blocks; the same cut gives the same fingerprint.
    let fp = m.training_data_fingerprint();
    let hex = fp.strip_prefix("sha256:").unwrap();
    assert!(hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit()), "{fp}");
    let again =
        build_patch_datasets(&shards, &dir.path().join("q"), &PatchConfig { k: 2, lambda: 0.5 }, &data).unwrap();
    assert_eq!(again.training_data_fingerprint(), fp);
    let mut val = m.clone();
    val.val.sha256 = "sha256:other".into();
    assert_eq!(val.training_data_fingerprint(), fp);
    let mut changed = [m.clone(), m.clone(), m.clone(), m.clone()];
    changed[0].token_phase.sha256 = "sha256:other".into();
    changed[1].patch_phase.as_mut().unwrap().sha256 = "sha256:other".into();
    changed[2].patch_phase = None;
    changed[3].tokenizer_fingerprint = "sha256:other".into();
    let fps: std::collections::HashSet<String> = changed.iter().map(|c| c.training_data_fingerprint()).collect();
    assert!(fps.len() == 4 && !fps.contains(&fp), "{fps:?}");
}

#[test]
fn block_shuffles_are_uniform_and_differ_by_seed() {
    // Each of the 3! orders of three blocks about equally often over 6,000 seeds (Sattolo's
    // variant, or a biased draw, would miss orders or favour some).
    let mut counts = std::collections::HashMap::new();
    for seed in 0..6000 {
        *counts.entry(permutation(3, seed)).or_insert(0usize) += 1;
    }
    assert_eq!(counts.len(), 6, "{counts:?}");
    assert!(counts.values().all(|&c| (850..1150).contains(&c)), "{counts:?}");
    // Different seeds, different shuffles.
    let orders: std::collections::HashSet<Vec<u64>> = (0..256).map(|seed| permutation(20, seed)).collect();
    assert_eq!(orders.len(), 256);
}

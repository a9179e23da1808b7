//! Seeded initialization, and weights in HF format: `model.safetensors` + `config.json`
//! (+ `tokenizer.json`) in one directory that `AutoModelForCausalLM.from_pretrained` loads.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};

use crate::config::ModelConfig;
use crate::error::{ModelError, Result};
use crate::llama::Llama;

/// The weights file name.
pub const WEIGHTS_FILE: &str = "model.safetensors";
/// The config file name.
pub const CONFIG_FILE: &str = "config.json";
/// The tokenizer file name.
pub const TOKENIZER_FILE: &str = "tokenizer.json";
/// The tokenizer's settings for HF `AutoTokenizer` (its class and special tokens).
pub const TOKENIZER_CONFIG_FILE: &str = "tokenizer_config.json";
/// The index of sharded weights (`weight_map`: tensor name → shard file), as HF writes it for
/// checkpoints too large for one file.
pub const WEIGHTS_INDEX_FILE: &str = "model.safetensors.index.json";

/// Whether a repository file (a path relative to the repository's root) is part of an HF model
/// directory as this crate reads it: `config.json`, `generation_config.json`, the tokenizer's
/// files and the safetensors weights (one file, or the index and its shards) at the top level.
/// Weights in other formats (`.bin`, `.pt`, `.gguf`, ONNX) are not.
pub fn is_model_file(path: &str) -> bool {
    if path.contains('/') {
        return false;
    }
    matches!(
        path,
        CONFIG_FILE
            | "generation_config.json"
            | TOKENIZER_FILE
            | TOKENIZER_CONFIG_FILE
            | "special_tokens_map.json"
            | WEIGHTS_INDEX_FILE
    ) || path.ends_with(".safetensors")
}

/// The weight files of a model directory: `model.safetensors`, or else the shards that
/// `model.safetensors.index.json` names (each once, sorted).
pub fn weight_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let single = dir.join(WEIGHTS_FILE);
    if single.is_file() {
        return Ok(vec![single]);
    }
    let index = dir.join(WEIGHTS_INDEX_FILE);
    if !index.is_file() {
        return Err(ModelError::File {
            path: single,
            msg: format!("missing; the model directory needs {WEIGHTS_FILE} (or {WEIGHTS_INDEX_FILE} and its shards)"),
        });
    }
    let bad = |msg: String| ModelError::File { path: index.clone(), msg };
    let text = std::fs::read_to_string(&index).map_err(|e| bad(e.to_string()))?;
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| bad(format!("invalid json: {e}")))?;
    let map = v.get("weight_map").and_then(|m| m.as_object()).ok_or_else(|| bad("no \"weight_map\" object".into()))?;
    let mut names: Vec<&str> = Vec::new();
    for (tensor, file) in map {
        let f = file.as_str().ok_or_else(|| bad(format!("weight_map[\"{tensor}\"] is not a file name")))?;
        if f.is_empty() || f.contains(['/', '\\']) || f.starts_with('.') {
            return Err(bad(format!("weight_map[\"{tensor}\"] = \"{f}\" is not a file of this directory")));
        }
        names.push(f);
    }
    names.sort_unstable();
    names.dedup();
    if names.is_empty() {
        return Err(bad("\"weight_map\" is empty".into()));
    }
    names
        .into_iter()
        .map(|n| {
            let p = dir.join(n);
            if p.is_file() {
                Ok(p)
            } else {
                Err(ModelError::File { path: p, msg: format!("missing; {WEIGHTS_INDEX_FILE} names it as a shard") })
            }
        })
        .collect()
}

/// A small, fast, seedable generator (SplitMix64) used for initialization and sampling, so that
/// results do not depend on the device or on candle's global RNG.
#[derive(Debug, Clone)]
pub struct SplitMix64(pub u64);

impl SplitMix64 {
    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// An index in `0..n` drawn as the next value modulo `n` (the draw every seeded shuffle in
    /// the workspace uses, so orders stay the same across releases); 0 when `n` is 0.
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n.max(1) as u64) as usize
    }

    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Standard normal (Box-Muller).
    pub fn normal(&mut self) -> f64 {
        let u1 = 1.0 - self.uniform();
        let u2 = self.uniform();
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }
}

fn name_seed(name: &str, seed: u64) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ seed;
    for b in name.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// The initial value of parameter `name`: norms 1; matrices normal(0, initializer_range), with
/// the residual output projections (`o_proj`, `down_proj`) scaled by 1/sqrt(2·layers). Each
/// tensor's values depend only on (seed, name), not on creation order or device.
pub fn init_tensor(name: &str, shape: &[usize], cfg: &ModelConfig, seed: u64, device: &Device) -> Result<Tensor> {
    let n: usize = shape.iter().product();
    if name.ends_with("norm.weight") {
        return Ok(Tensor::ones(shape, DType::F32, device)?);
    }
    let mut std = cfg.initializer_range;
    if name.contains("o_proj") || name.contains("down_proj") {
        std /= (2.0 * cfg.num_hidden_layers as f64).sqrt();
    }
    let mut rng = SplitMix64(name_seed(name, seed));
    let v: Vec<f32> = (0..n).map(|_| (rng.normal() * std) as f32).collect();
    Ok(Tensor::from_vec(v, shape, device)?)
}

/// A freshly initialized model whose parameters live in the returned `VarMap` (f32).
pub fn init_model(cfg: &ModelConfig, device: &Device, seed: u64) -> Result<(Llama, VarMap)> {
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, device);
    let model = Llama::new(vb, cfg)?;
    {
        let data = varmap.data().lock().map_err(|_| ModelError::Config("poisoned var map".into()))?;
        for (name, var) in data.iter() {
            var.set(&init_tensor(name, var.dims(), cfg, seed, device)?)?;
        }
    }
    Ok((model, varmap))
}

/// The parameters of `varmap` by name, sorted.
pub fn named_tensors(varmap: &VarMap) -> Result<Vec<(String, Tensor)>> {
    let data = varmap.data().lock().map_err(|_| ModelError::Config("poisoned var map".into()))?;
    let mut v: Vec<(String, Tensor)> = data.iter().map(|(k, var)| (k.clone(), var.as_tensor().clone())).collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(v)
}

/// Serializes tensors as safetensors (f32) with the `format: pt` metadata HF expects.
pub fn safetensors_bytes(tensors: &[(String, Tensor)]) -> Result<Vec<u8>> {
    let mut raw: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::with_capacity(tensors.len());
    for (name, t) in tensors {
        let v = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        raw.push((name.clone(), t.dims().to_vec(), bytes));
    }
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = raw
        .iter()
        .map(|(n, s, b)| {
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b)
                .map(|v| (n.clone(), v))
                .map_err(|e| ModelError::Config(format!("tensor {n}: {e}")))
        })
        .collect::<Result<_>>()?;
    let meta: HashMap<String, String> = [("format".to_string(), "pt".to_string())].into();
    safetensors::serialize(views, Some(meta)).map_err(|e| ModelError::Config(format!("safetensors: {e}")))
}

/// Writes `bytes` to `path` atomically (a temp file beside it, `<path>.<pid>-<n>.tmp`, fsync,
/// rename, fsync of the directory). A write that fails (a full disk) removes its temp file and
/// leaves any earlier file at `path` as it was. Each call has a temp file of its own, so
/// concurrent writers of one path, threads or processes, never write into each other's: the last
/// rename wins, whole.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".{}-{n}.tmp", std::process::id()));
    let tmp = PathBuf::from(tmp);
    let written = (|| -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        drop(f);
        std::fs::rename(&tmp, path)?;
        // The rename itself is durable once the directory is synced.
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            if let Ok(d) = std::fs::File::open(dir) {
                let _ = d.sync_all();
            }
        }
        Ok(())
    })();
    written.map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        ModelError::File { path: path.to_path_buf(), msg: e.to_string() }
    })
}

/// Saves an HF-format model directory: `model.safetensors`, `config.json`, and, when a
/// tokenizer is given, `tokenizer.json` and `tokenizer_config.json` ([`tokenizer_config`]).
/// `bos`/`eos` go into the config.
pub fn save_pretrained(
    dir: &Path,
    cfg: &ModelConfig,
    varmap: &VarMap,
    tokenizer_json: Option<&str>,
    bos: Option<u32>,
    eos: Option<u32>,
) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| ModelError::File { path: dir.to_path_buf(), msg: e.to_string() })?;
    write_atomic(&dir.join(WEIGHTS_FILE), &safetensors_bytes(&named_tensors(varmap)?)?)?;
    for (name, bytes) in model_files(cfg, tokenizer_json, bos, eos)? {
        write_atomic(&dir.join(name), &bytes)?;
    }
    Ok(())
}

/// The files of an HF model directory besides its weights, by name: `config.json` (with `bos`
/// and `eos`), and with a tokenizer, `tokenizer.json` and `tokenizer_config.json`
/// ([`tokenizer_config`]). With [`WEIGHTS_FILE`] beside them a directory loads as a model, here
/// and in HF transformers.
pub fn model_files(
    cfg: &ModelConfig,
    tokenizer_json: Option<&str>,
    bos: Option<u32>,
    eos: Option<u32>,
) -> Result<Vec<(&'static str, Vec<u8>)>> {
    let json = |name: &str, v: &serde_json::Value| {
        serde_json::to_vec_pretty(v).map_err(|e| ModelError::Config(format!("{name}: {e}")))
    };
    let mut files = vec![(CONFIG_FILE, json(CONFIG_FILE, &cfg.to_hf_json(bos, eos))?)];
    if let Some(t) = tokenizer_json {
        files.push((TOKENIZER_FILE, t.as_bytes().to_vec()));
        let tc = tokenizer_config(t, bos, eos, cfg.max_position_embeddings);
        files.push((TOKENIZER_CONFIG_FILE, json(TOKENIZER_CONFIG_FILE, &tc)?));
    }
    Ok(files)
}

/// `tokenizer_config.json` for a `tokenizer.json`: without it HF `AutoTokenizer` loads the
/// tokenizer with no BOS, EOS or padding token (so no padded batches, and `eos_token` is `None`).
/// Names the class that reads a bare `tokenizer.json` (`PreTrainedTokenizerFast`), the tokens of
/// ids `bos` and `eos`, the tokenizer's special token with "pad" in its name if it has one, and
/// the model's context as `model_max_length`. Ids the tokenizer does not hold are left out.
pub fn tokenizer_config(
    tokenizer_json: &str,
    bos: Option<u32>,
    eos: Option<u32>,
    model_max_length: usize,
) -> serde_json::Value {
    let tok: serde_json::Value = serde_json::from_str(tokenizer_json).unwrap_or_default();
    let added = tok.get("added_tokens").and_then(|a| a.as_array()).cloned().unwrap_or_default();
    let content_of = |id: u32| -> Option<String> {
        let added = added.iter().find(|t| t.get("id").and_then(|i| i.as_u64()) == Some(u64::from(id)));
        added.and_then(|t| t.get("content")?.as_str().map(str::to_string)).or_else(|| {
            let vocab = tok.get("model")?.get("vocab")?.as_object()?;
            vocab.iter().find(|(_, v)| v.as_u64() == Some(u64::from(id))).map(|(k, _)| k.clone())
        })
    };
    let pad = added.iter().find_map(|t| {
        let content = t.get("content")?.as_str()?;
        let special = t.get("special").and_then(|s| s.as_bool()) == Some(true);
        (special && content.to_lowercase().contains("pad")).then(|| content.to_string())
    });
    let mut out = serde_json::json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": model_max_length,
        "clean_up_tokenization_spaces": false,
    });
    for (key, token) in
        [("bos_token", bos.and_then(content_of)), ("eos_token", eos.and_then(content_of)), ("pad_token", pad)]
    {
        if let Some(t) = token {
            out[key] = t.into();
        }
    }
    out
}

/// Reads `dir/config.json` (HF LLaMA format).
pub fn load_config(dir: &Path) -> Result<ModelConfig> {
    let path = dir.join(CONFIG_FILE);
    ModelConfig::from_hf_json(&read_json(&path)?).map_err(|e| ModelError::File { path, msg: e.to_string() })
}

/// `bos_token_id` and `eos_token_id` from `dir/config.json`, when present. An `eos_token_id`
/// given as a list (Llama 3's) gives its first id, the one documents end with; see
/// [`stop_token_ids`] for all of them.
pub fn special_token_ids(dir: &Path) -> Result<(Option<u32>, Option<u32>)> {
    let v = read_json(&dir.join(CONFIG_FILE))?;
    Ok((token_ids(&v, "bos_token_id").first().copied(), token_ids(&v, "eos_token_id").first().copied()))
}

/// The ids that end generation, as HF `generate` takes them: `eos_token_id` of
/// `dir/generation_config.json` where that file gives one, else of `config.json`; a number or a
/// list of them (Llama 3 Instruct's end-of-turn and end-of-text). Empty when neither has one.
pub fn stop_token_ids(dir: &Path) -> Result<Vec<u32>> {
    let generation = dir.join("generation_config.json");
    if generation.is_file() {
        let ids = token_ids(&read_json(&generation)?, "eos_token_id");
        if !ids.is_empty() {
            return Ok(ids);
        }
    }
    Ok(token_ids(&read_json(&dir.join(CONFIG_FILE))?, "eos_token_id"))
}

/// A JSON file of a model directory.
fn read_json(path: &Path) -> Result<serde_json::Value> {
    let text = std::fs::read_to_string(path).map_err(|e| ModelError::File {
        path: path.into(),
        msg: format!("{e}; is this a model directory (config.json + model.safetensors)?"),
    })?;
    serde_json::from_str(&text).map_err(|e| ModelError::File { path: path.into(), msg: format!("invalid json: {e}") })
}

/// A token-id field: a number, a list of numbers, or absent / null (none).
fn token_ids(v: &serde_json::Value, key: &str) -> Vec<u32> {
    let id = |x: &serde_json::Value| x.as_u64().and_then(|x| u32::try_from(x).ok());
    match v.get(key) {
        Some(serde_json::Value::Array(xs)) => xs.iter().filter_map(id).collect(),
        Some(x) => id(x).into_iter().collect(),
        None => Vec::new(),
    }
}

/// A candle error about a weight file, named by the file candle names (a shard among several),
/// else `fallback`, without candle's own `path: "…"` prefix.
fn file_error(e: candle_core::Error, fallback: &Path) -> ModelError {
    match e {
        candle_core::Error::WithPath { inner, path } => ModelError::File { path, msg: inner.to_string() },
        e => ModelError::File { path: fallback.to_path_buf(), msg: e.to_string() },
    }
}

/// Loads an HF LLaMA directory for inference (weights memory-mapped, in `dtype`; one file or
/// shards, see [`weight_files`]).
pub fn load_pretrained(dir: &Path, device: &Device, dtype: DType) -> Result<(Llama, ModelConfig)> {
    let cfg = load_config(dir)?;
    let files = weight_files(dir)?;
    let first = files[0].clone();
    // SAFETY: the files are mapped read-only and not modified while the model lives.
    let vb =
        unsafe { VarBuilder::from_mmaped_safetensors(&files, dtype, device) }.map_err(|e| file_error(e, &first))?;
    let model = Llama::new(vb, &cfg)
        .map_err(|e| ModelError::File { path: first, msg: format!("weights do not fit config.json: {e}") })?;
    Ok((model, cfg))
}

/// Loads a directory's weights (one file or shards, in any float dtype) into a trainable model
/// (f32 `VarMap`).
pub fn load_trainable(dir: &Path, device: &Device) -> Result<(Llama, VarMap, ModelConfig)> {
    let cfg = load_config(dir)?;
    let (model, varmap) = init_model(&cfg, device, 0)?;
    let files = weight_files(dir)?;
    let err = |msg: String| ModelError::File { path: dir.to_path_buf(), msg };
    // SAFETY: as in load_pretrained.
    let st = unsafe { candle_core::safetensors::MmapedSafetensors::multi(&files) }.map_err(|e| file_error(e, dir))?;
    let vars = varmap.data().lock().map_err(|_| err("the variable map's lock is poisoned".into()))?;
    for (name, var) in vars.iter() {
        let t = st.load(name, device).map_err(|e| err(format!("{name}: {e}")))?;
        let t = t.to_dtype(var.dtype()).map_err(|e| err(format!("{name}: {e}")))?;
        var.set(&t).map_err(|e| err(format!("{name}: {e}; do the weights fit config.json?")))?;
    }
    drop(vars);
    Ok((model, varmap, cfg))
}

/// Parses a compute dtype: `f32`, `bf16` or `f16`.
pub fn parse_dtype(s: &str) -> Result<DType> {
    match s {
        "f32" | "fp32" | "float32" => Ok(DType::F32),
        "bf16" | "bfloat16" => Ok(DType::BF16),
        "f16" | "fp16" | "float16" => Ok(DType::F16),
        _ => Err(ModelError::Device(format!("dtype \"{s}\" is not f32, bf16 or f16"))),
    }
}

/// Makes the stream-ordered allocator that candle's allocations go through (cudarc calls
/// `cuMemAllocAsync` on the device's current memory pool) keep freed memory for reuse. The
/// driver's default release threshold is 0: every stream, event or context synchronisation
/// hands all unused pool memory back to the OS, so a training loop that reads its loss once
/// per step maps every activation buffer afresh on the next step, host time in each allocation
/// (PyTorch's caching allocator keeps its blocks for the same reason). `PATCHLM_CUDA_POOL_RELEASE=1`
/// keeps the driver's default.
#[cfg(feature = "cuda")]
fn keep_freed_memory(d: &candle_core::CudaDevice) -> std::result::Result<(), String> {
    use candle_core::cuda_backend::cudarc::driver::sys::CUmemPool_attribute as A;
    pool_attribute(d, A::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD, Some(u64::MAX)).map(|_| ())
}

/// Gives the cuBLAS handle that candle's matmuls run on a workspace of the size NVIDIA recommends
/// (the `cublasSetWorkspace` notes of the cuBLAS reference: 32 MiB from Hopper on, 4 MiB before), owned for the life of the process (the device is too, see
/// [`parse_device`]). Without one, cuBLAS draws on its default pool, smaller than NVIDIA's
/// recommendation for Hopper; a larger workspace lets it pick split-K and stream-K kernels for
/// products with a long reduction and few output tiles, such as the weight gradients (D×D over
/// B·T rows). PyTorch gives its handles the same 32 MiB on Hopper. `PATCHLM_CUBLAS_WORKSPACE=0`
/// leaves cuBLAS's default.
#[cfg(feature = "cuda")]
fn give_cublas_workspace(d: &candle_core::CudaDevice) -> std::result::Result<(), String> {
    use candle_core::cuda_backend::cudarc::cublas::sys;
    use candle_core::cuda_backend::cudarc::driver::DevicePtrMut;
    let stream = d.cuda_stream();
    let (major, _) = stream.context().compute_capability().map_err(|e| e.to_string())?;
    let bytes: usize = if major >= 9 { 32 << 20 } else { 4 << 20 };
    let mut buf = stream.alloc_zeros::<u8>(bytes).map_err(|e| e.to_string())?;
    let blas = d.cublas_handle();
    {
        let (ptr, _guard) = buf.device_ptr_mut(&stream);
        // SAFETY: the handle is live (the device holds it) and works on this device's one
        // stream; the buffer is on that device, `bytes` long, and is kept below for the life of
        // the process, as long as the handle can use it. cublasSetStream would reset the
        // workspace, and neither candle nor cudarc calls it after creating the handle.
        let status =
            unsafe { sys::cublasSetWorkspace_v2(*blas.handle(), ptr as usize as *mut std::ffi::c_void, bytes) };
        if status != sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS {
            return Err(format!("cublasSetWorkspace: {status:?}"));
        }
    }
    static KEPT: std::sync::Mutex<Vec<candle_core::cuda_backend::cudarc::driver::CudaSlice<u8>>> =
        std::sync::Mutex::new(Vec::new());
    KEPT.lock().unwrap_or_else(|e| e.into_inner()).push(buf);
    Ok(())
}

/// Sets (`Some`) or reads a 64-bit attribute of the memory pool that `d`'s allocations come from.
#[cfg(feature = "cuda")]
fn pool_attribute(
    d: &candle_core::CudaDevice,
    attr: candle_core::cuda_backend::cudarc::driver::sys::CUmemPool_attribute,
    set: Option<u64>,
) -> std::result::Result<u64, String> {
    use candle_core::cuda_backend::cudarc::driver::result;
    let dev = d.cuda_stream().context().cu_device();
    let mut v = set.unwrap_or(0);
    // SAFETY: `dev` is the device of a live context; every attribute this crate reads or sets
    // (release threshold, memory counters) is a cuuint64_t, which `v` is.
    unsafe {
        let pool = result::device::get_mem_pool(dev).map_err(|e| e.to_string())?;
        let p = (&mut v as *mut u64).cast();
        match set {
            Some(_) => result::mem_pool::set_attribute(pool, attr, p),
            None => result::mem_pool::get_attribute(pool, attr, p),
        }
        .map_err(|e| e.to_string())?;
    }
    Ok(v)
}

/// The most memory that `device`'s tensors have held at once since the last reset, in bytes:
/// the CUDA memory pool's high-water mark (what PyTorch's `max_memory_allocated` counts; the
/// CUDA context is outside it, the 32 MiB cuBLAS workspace on Hopper inside, as in PyTorch).
/// `reset` starts a new count from the memory in use now. None off CUDA or where the driver cannot tell.
pub fn device_memory_peak(device: &Device, reset: bool) -> Option<u64> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(d) = device {
        use candle_core::cuda_backend::cudarc::driver::sys::CUmemPool_attribute as A;
        let high = A::CU_MEMPOOL_ATTR_USED_MEM_HIGH;
        if reset {
            // Setting the high-water attribute (to 0, the only value it takes) restarts it.
            pool_attribute(d, high, Some(0)).ok()?;
        }
        let now = pool_attribute(d, A::CU_MEMPOOL_ATTR_USED_MEM_CURRENT, None).ok()?;
        return Some(pool_attribute(d, high, None).ok()?.max(now));
    }
    let _ = (device, reset);
    None
}

/// Parses `cpu`, `cuda` or `cuda:N`. On CUDA, f32 matmuls use TF32 tensor cores (as PyTorch's
/// `allow_tf32`), since training keeps f32 only where range, not mantissa, matters, and cudarc's
/// per-buffer event tracking is off (candle runs a device's work on one stream;
/// `PATCHLM_CUDA_EVENTS=1` keeps it on), and the memory pool keeps freed memory for reuse
/// instead of returning it to the OS at every synchronisation (see `keep_freed_memory`;
/// `PATCHLM_CUDA_POOL_RELEASE=1` keeps the driver's default), and cuBLAS gets the workspace
/// NVIDIA recommends (`PATCHLM_CUBLAS_WORKSPACE=0` keeps its default pool). Each GPU's device is
/// created once per process and shared by every call, so that all its work is on one stream.
pub fn parse_device(s: &str) -> Result<Device> {
    match s {
        "cpu" => Ok(Device::Cpu),
        _ => {
            let ordinal = match s.strip_prefix("cuda") {
                Some("") => 0,
                Some(rest) => rest
                    .strip_prefix(':')
                    .and_then(|n| n.parse::<usize>().ok())
                    .ok_or_else(|| ModelError::Device(format!("\"{s}\" is not cpu, cuda or cuda:N")))?,
                None => return Err(ModelError::Device(format!("\"{s}\" is not cpu, cuda or cuda:N"))),
            };
            if !candle_core::utils::cuda_is_available() {
                return Err(ModelError::Device(format!(
                    "\"{s}\" needs a build with the cuda feature (`--features cuda`: `cargo xtask-cuda`, see docs/gpu.md)"
                )));
            }
            candle_core::cuda::set_gemm_reduced_precision_f32(true);
            // One device (one stream) per GPU for the whole process.
            static DEVICES: std::sync::Mutex<Vec<(usize, Device)>> = std::sync::Mutex::new(Vec::new());
            let mut devices = DEVICES.lock().unwrap_or_else(|e| e.into_inner());
            if let Some((_, d)) = devices.iter().find(|(o, _)| *o == ordinal) {
                return Ok(d.clone());
            }
            let device = Device::new_cuda(ordinal).map_err(|e| {
                ModelError::Device(format!(
                    "{s}: the GPU could not be opened ({e}); `nvidia-smi` lists the GPUs the driver sees, \
                     numbered from 0 as cuda:N"
                ))
            })?;
            #[cfg(feature = "cuda")]
            if std::env::var_os("PATCHLM_CUDA_EVENTS").is_none_or(|v| v != "1") {
                if let Device::Cuda(d) = &device {
                    // SAFETY: candle enqueues every kernel, copy and cuBLAS call of a device on
                    // that device's one stream, and this function hands out one device per GPU,
                    // so stream order alone keeps buffers safe; the per-buffer CUDA events cudarc
                    // records for multi-stream use (two created per allocation, a wait and a
                    // record per kernel argument) only cost host time.
                    unsafe { d.disable_event_tracking() };
                }
            }
            #[cfg(feature = "cuda")]
            if std::env::var_os("PATCHLM_CUDA_POOL_RELEASE").is_none_or(|v| v != "1") {
                if let Device::Cuda(d) = &device {
                    // A speed setting, not a correctness one: a driver that refuses it leaves the
                    // default, with a warning.
                    if let Err(e) = keep_freed_memory(d) {
                        eprintln!("warning: {s}: the memory pool keeps its default release threshold ({e})");
                    }
                }
            }
            #[cfg(feature = "cuda")]
            if std::env::var_os("PATCHLM_CUBLAS_WORKSPACE").is_none_or(|v| v != "0") {
                if let Device::Cuda(d) = &device {
                    // A speed setting: a refusal leaves cuBLAS's default pool, with a warning.
                    if let Err(e) = give_cublas_workspace(d) {
                        eprintln!("warning: {s}: cuBLAS keeps its default workspace ({e})");
                    }
                }
            }
            devices.push((ordinal, device.clone()));
            Ok(device)
        }
    }
}

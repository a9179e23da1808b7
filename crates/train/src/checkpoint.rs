//! Checkpoints: weights, optimizer state, and where the run stands, written atomically, with the
//! sha256 of every file (`checksums.json`) checked when a checkpoint is loaded.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use patchlm_model::weights::{safetensors_bytes, write_atomic};

use crate::error::{io, Result, TrainError};

/// Where a run stands, saved in `state.json`.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct TrainState {
    /// Fingerprint of the run's config.
    pub config_fingerprint: String,
    /// Fingerprint of the data it trains on (`PatchManifest::training_data_fingerprint`); empty
    /// in checkpoints written before it was kept.
    #[serde(default)]
    pub data_fingerprint: String,
    /// Index of the current phase.
    pub phase: usize,
    /// Steps done in the current phase (its data position is `step · blocks_per_step`).
    pub phase_step: usize,
    /// Steps done over all phases.
    pub global_step: usize,
    /// Training tokens consumed over all phases.
    pub tokens_seen: u64,
    /// Optimizer steps of the current phase's AdamW.
    pub optimizer_step: u64,
    /// Training wall time so far, seconds.
    pub elapsed_secs: f64,
    /// The run's seed (all randomness derives from it; there is no other RNG state).
    pub seed: u64,
}

/// The file of a checkpoint that holds the sha256 of each of its other files.
pub const CHECKSUMS_FILE: &str = "checksums.json";

/// The file of a checkpoint that holds the run's config.
pub const RUN_CONFIG_FILE: &str = "run_config.json";

/// Writes `dir/checkpoints/step-NNNNNNNN/` (model.safetensors, optimizer.safetensors,
/// state.json, `files`, and [`CHECKSUMS_FILE`] with each one's sha256) via a temp directory and
/// rename, then removes all but the newest `keep`. The trainer's `files` are the run's config
/// ([`RUN_CONFIG_FILE`]) and an HF model directory's other files
/// ([`patchlm_model::weights::model_files`]), so that a checkpoint also loads as a model.
pub fn save_checkpoint(
    run_dir: &Path,
    model: &[(String, Tensor)],
    optimizer: &[(String, Tensor)],
    state: &TrainState,
    files: &[(&str, Vec<u8>)],
    keep: usize,
) -> Result<PathBuf> {
    let root = run_dir.join("checkpoints");
    std::fs::create_dir_all(&root).map_err(io(&root))?;
    let name = format!("step-{:08}", state.global_step);
    let fin = root.join(&name);
    let tmp = root.join(format!("{name}.tmp"));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(io(&tmp))?;
    }
    let written = write_checkpoint_files(&tmp, model, optimizer, state, files).and_then(|()| {
        if fin.exists() {
            std::fs::remove_dir_all(&fin).map_err(io(&fin))?;
        }
        std::fs::rename(&tmp, &fin).map_err(io(&fin))
    });
    if written.is_err() {
        // A write that fails (a full disk) leaves no partial checkpoint taking space.
        let _ = std::fs::remove_dir_all(&tmp);
    }
    written?;
    if let Ok(d) = std::fs::File::open(&root) {
        let _ = d.sync_all();
    }
    let mut all = list_checkpoints(run_dir)?;
    while all.len() > keep.max(1) {
        let old = all.remove(0);
        std::fs::remove_dir_all(&old).map_err(io(&old))?;
    }
    Ok(fin)
}

/// Writes a checkpoint's files and their [`CHECKSUMS_FILE`] into the new directory `dir`.
fn write_checkpoint_files(
    dir: &Path,
    model: &[(String, Tensor)],
    optimizer: &[(String, Tensor)],
    state: &TrainState,
    files: &[(&str, Vec<u8>)],
) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let own = [
        ("model.safetensors", safetensors_bytes(model)?),
        ("optimizer.safetensors", safetensors_bytes(optimizer)?),
        ("state.json", serde_json::to_vec_pretty(state).map_err(|e| TrainError::Config(e.to_string()))?),
    ];
    let mut sums = serde_json::Map::new();
    for (name, bytes) in own.iter().map(|(n, b)| (*n, b)).chain(files.iter().map(|(n, b)| (*n, b))) {
        write_atomic(&dir.join(name), bytes)?;
        sums.insert(name.to_string(), patchlm_data::shard::sha256_bytes(bytes).into());
    }
    let sums = serde_json::to_vec_pretty(&sums).map_err(|e| TrainError::Config(e.to_string()))?;
    write_atomic(&dir.join(CHECKSUMS_FILE), &sums)?;
    Ok(())
}

/// Removes the temp directories (`checkpoints/step-N.tmp`) of checkpoint writes that were
/// killed. Call it only while holding the run ([`crate::RunLock`]).
pub(crate) fn remove_partial_checkpoints(run_dir: &Path) -> Result<()> {
    let root = run_dir.join("checkpoints");
    let Ok(entries) = std::fs::read_dir(&root) else { return Ok(()) };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        if name.starts_with("step-") && name.ends_with(".tmp") && e.path().is_dir() {
            std::fs::remove_dir_all(e.path()).map_err(io(e.path()))?;
        }
    }
    Ok(())
}

/// Complete checkpoints of a run, oldest first.
pub fn list_checkpoints(run_dir: &Path) -> Result<Vec<PathBuf>> {
    let root = run_dir.join("checkpoints");
    if !root.is_dir() {
        return Ok(Vec::new());
    }
    let mut v: Vec<PathBuf> = std::fs::read_dir(&root)
        .map_err(io(&root))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name().is_some_and(|n| {
                let n = n.to_string_lossy();
                n.starts_with("step-") && !n.ends_with(".tmp")
            }) && p.join("state.json").is_file()
        })
        .collect();
    v.sort();
    Ok(v)
}

/// A loaded checkpoint.
pub struct Checkpoint {
    /// Its directory.
    pub path: PathBuf,
    /// Model tensors by name.
    pub model: HashMap<String, Tensor>,
    /// Optimizer tensors by name.
    pub optimizer: HashMap<String, Tensor>,
    /// Where the run stood.
    pub state: TrainState,
    /// The config of the run that wrote it ([`RUN_CONFIG_FILE`]; older checkpoints kept it as
    /// `config.json`), when it reads as one.
    pub config: Option<crate::config::RunConfig>,
}

impl Checkpoint {
    /// The fingerprint of the config that wrote it, computed by this version
    /// ([`crate::RunConfig::fingerprint`]) from its stored config: settings added since it was
    /// written take their defaults, so the run still resumes. Falls back to the fingerprint in
    /// `state.json` when no config can be read.
    pub fn config_fingerprint(&self) -> String {
        self.config.as_ref().map_or_else(|| self.state.config_fingerprint.clone(), |c| c.fingerprint())
    }
}

/// Checks every file [`CHECKSUMS_FILE`] names against its sha256 (checkpoints written before
/// checksums have no such file and pass).
pub fn verify_checkpoint(path: &Path) -> Result<()> {
    let cerr = |msg: String| TrainError::Checkpoint { path: path.to_path_buf(), msg };
    let sums = match std::fs::read(path.join(CHECKSUMS_FILE)) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(cerr(format!("{CHECKSUMS_FILE}: {e}"))),
    };
    let sums: HashMap<String, String> =
        serde_json::from_slice(&sums).map_err(|e| cerr(format!("{CHECKSUMS_FILE}: {e}")))?;
    let mut names: Vec<&String> = sums.keys().collect();
    names.sort();
    for name in names {
        // (Streamed: a large model's optimizer state need not fit in memory twice.)
        let actual = patchlm_data::shard::sha256_file(&path.join(name)).map_err(|e| cerr(format!("{name}: {e}")))?;
        if actual != sums[name] {
            return Err(cerr(format!(
                "{name}: checksum mismatch ({CHECKSUMS_FILE} {}, file {actual}); the checkpoint is corrupt",
                sums[name]
            )));
        }
    }
    Ok(())
}

/// Loads a checkpoint directory, its files checked first ([`verify_checkpoint`]).
pub fn load_checkpoint(path: &Path, device: &Device) -> Result<Checkpoint> {
    verify_checkpoint(path)?;
    let cerr = |msg: String| TrainError::Checkpoint { path: path.to_path_buf(), msg };
    let text = std::fs::read_to_string(path.join("state.json")).map_err(|e| cerr(format!("state.json: {e}")))?;
    let state: TrainState = serde_json::from_str(&text).map_err(|e| cerr(format!("state.json: {e}")))?;
    let load = |f: &str| candle_core::safetensors::load(path.join(f), device).map_err(|e| cerr(format!("{f}: {e}")));
    let config = [RUN_CONFIG_FILE, "config.json"]
        .iter()
        .find_map(|f| serde_json::from_slice(&std::fs::read(path.join(f)).ok()?).ok());
    Ok(Checkpoint {
        path: path.to_path_buf(),
        model: load("model.safetensors")?,
        optimizer: load("optimizer.safetensors")?,
        state,
        config,
    })
}

//! `score` and `generate`: thin wrappers over the model crate (and the eval crate's windows).

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::DType;
use patchlm_eval::{sequence_nlls, WindowConfig};
use patchlm_model::{
    generate_streaming, load_pretrained, parse_device, special_token_ids, stop_token_ids, SamplingConfig,
};

/// Arguments of `cargo xtask score`.
#[derive(clap::Args)]
pub struct ScoreArgs {
    /// Model directory in HF format (config.json, model.safetensors, tokenizer.json; a run's
    /// directory means its final model, and a checkpoint's directory loads too), or a Hugging
    /// Face repository (`org/name[@revision]`).
    #[arg(long)]
    model: String,
    /// Text to score.
    #[arg(long)]
    text: String,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
    /// Window length for text longer than the model's context (default: the model's context).
    #[arg(long)]
    context: Option<usize>,
    /// Sliding-window stride (default: non-overlapping windows, as in `eval`).
    #[arg(long)]
    stride: Option<usize>,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
}

/// Arguments of `cargo xtask generate`.
#[derive(clap::Args)]
pub struct GenerateArgs {
    /// Model directory in HF format (or a run's or a checkpoint's directory), or a Hugging Face
    /// repository (`org/name[@revision]`).
    #[arg(long)]
    model: String,
    /// Prompt text.
    #[arg(long)]
    prompt: String,
    /// Most tokens to generate.
    #[arg(long, default_value_t = 64)]
    max_tokens: usize,
    /// Temperature (0 = greedy).
    #[arg(long, default_value_t = 0.8)]
    temperature: f64,
    /// Top-k (0 = off).
    #[arg(long, default_value_t = 50)]
    top_k: usize,
    /// Top-p (1 = off).
    #[arg(long, default_value_t = 0.95)]
    top_p: f64,
    /// Seed.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
}

/// A model given as a local directory (a pretrain run's directory or one of its checkpoints too),
/// or as a hub repository (`org/name[@revision]`,
/// `hf://org/name[@revision]`) whose model files ([`patchlm_model::is_model_file`]) are fetched
/// into the Hugging Face cache; returns the directory to load.
pub(crate) fn model_dir(spec: &str) -> Result<PathBuf> {
    use patchlm_data::hub::{Hub, HubUrl, Repo, RepoKind};
    let local = Path::new(spec);
    if local.is_dir() {
        // A pretrain run's directory stands for its final model.
        let run_model = local.join("model");
        if !local.join(patchlm_model::weights::CONFIG_FILE).exists()
            && run_model.join(patchlm_model::weights::CONFIG_FILE).is_file()
        {
            return Ok(run_model);
        }
        return Ok(local.to_path_buf());
    }
    let repo = match HubUrl::parse(spec)? {
        Some(u) if u.path.is_empty() => u.repo,
        Some(u) => bail!("{spec}: name the model repository itself, not `{}` inside it", u.path),
        None => match Repo::parse(spec, RepoKind::Model) {
            Some(r) => r,
            None => bail!("{spec}: no such model directory (nor a hub repository id, org/name)"),
        },
    };
    Hub::from_env()
        .snapshot(&repo, patchlm_model::is_model_file)
        .with_context(|| format!("{spec} is no local directory; fetching it from the hub failed"))
}

pub(crate) fn tokenizer(dir: &Path) -> Result<patchlm_data::Tokenizer> {
    let p = dir.join("tokenizer.json");
    patchlm_data::tokenizer::load_tokenizer(&p).with_context(|| format!("the model directory needs {}", p.display()))
}

/// Scores `--text` token by token.
pub fn score(a: ScoreArgs) -> Result<()> {
    let device = parse_device(&a.device)?;
    let dir = model_dir(&a.model)?;
    let (model, cfg) = load_pretrained(&dir, &device, DType::F32)?;
    let tok = tokenizer(&dir)?;
    let (bos, _) = special_token_ids(&dir)?;
    let enc = tok.encode(a.text.as_str(), false).map_err(|e| anyhow::anyhow!("encoding failed: {e}"))?;
    let mut ids: Vec<u32> = bos.into_iter().collect();
    ids.extend_from_slice(enc.get_ids());
    if ids.len() < 2 {
        bail!("the text has no token to score (give a longer --text)");
    }
    let w = WindowConfig { context: a.context.unwrap_or(cfg.max_position_embeddings), stride: a.stride };
    let lps: Vec<f64> = sequence_nlls(&model, &ids, &w, &device)?.into_iter().map(|nll| -nll).collect();
    let nll: f64 = -lps.iter().sum::<f64>();
    let n = lps.len() as f64;
    // Each token shown as the text it adds after the tokens before it (the pieces add up to the
    // text; a character split across tokens shows at its last one).
    let mut text = patchlm_data::tokenizer::ContinuationText::new(&tok, &ids[..1])?;
    let mut rows: Vec<(u32, String, f64)> = Vec::with_capacity(lps.len());
    for (&id, &lp) in ids[1..].iter().zip(&lps) {
        rows.push((id, text.push(id)?.unwrap_or_default(), lp));
    }
    if a.json {
        let toks: Vec<_> =
            rows.iter().map(|(id, s, lp)| serde_json::json!({"id": id, "token": s, "logprob": lp})).collect();
        let out = serde_json::json!({"tokens": toks, "nll": nll, "mean_nll": nll / n, "perplexity": (nll / n).exp()});
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        println!("{:>8}  {:>9}  token", "id", "logprob");
        for (id, s, lp) in &rows {
            println!("{id:>8}  {lp:>9.4}  {s:?}");
        }
        println!(
            "total NLL {nll:.4} nats over {} tokens; mean {:.4}; perplexity {:.3}",
            rows.len(),
            nll / n,
            (nll / n).exp()
        );
    }
    Ok(())
}

/// Samples a continuation of `--prompt`.
pub fn generate(a: GenerateArgs) -> Result<()> {
    // Settings out of range are refused before anything loads or prints.
    let cfg = SamplingConfig { temperature: a.temperature, top_k: a.top_k, top_p: a.top_p, seed: a.seed };
    cfg.validate()?;
    let device = parse_device(&a.device)?;
    let dir = model_dir(&a.model)?;
    let (model, _) = load_pretrained(&dir, &device, DType::F32)?;
    let tok = tokenizer(&dir)?;
    let (bos, _) = special_token_ids(&dir)?;
    let stop = stop_token_ids(&dir)?;
    let enc = tok.encode(a.prompt.as_str(), false).map_err(|e| anyhow::anyhow!("encoding failed: {e}"))?;
    let mut ids: Vec<u32> = bos.into_iter().collect();
    ids.extend_from_slice(enc.get_ids());
    // A prompt that cannot be continued is refused before it is printed.
    patchlm_model::check_prompt(model.config(), &ids)?;
    // The continuation is printed as it is drawn, as the text it adds to the prompt's.
    let mut stdout = std::io::stdout().lock();
    write!(stdout, "{}", a.prompt)?;
    stdout.flush()?;
    let mut text = patchlm_data::tokenizer::ContinuationText::new(&tok, &ids)?;
    let mut failed: Option<anyhow::Error> = None;
    let out = generate_streaming(&model, &ids, a.max_tokens, &cfg, &stop, &device, |id| {
        if failed.is_some() {
            return;
        }
        match text.push(id) {
            Ok(Some(piece)) => failed = write!(stdout, "{piece}").and_then(|()| stdout.flush()).err().map(Into::into),
            Ok(None) => {}
            Err(e) => failed = Some(e.into()),
        }
    })?;
    if let Some(e) = failed {
        return Err(e);
    }
    writeln!(stdout)?;
    if out.len() < a.max_tokens && !out.last().is_some_and(|t| stop.contains(t)) {
        let t = model.config().max_position_embeddings;
        eprintln!("stopped after {} tokens: prompt and continuation fill the model's context of {t}", out.len());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::model_dir;
    use patchlm_model::weights::CONFIG_FILE;

    #[test]
    fn a_run_directory_stands_for_its_model_and_a_model_directory_for_itself() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let with_config = |p: &std::path::Path| {
            std::fs::create_dir_all(p).unwrap();
            std::fs::write(p.join(CONFIG_FILE), "{}").unwrap();
        };
        // A run: its final model in model/.
        with_config(&d.join("run/model"));
        // A model directory that happens to hold another model below it is itself.
        with_config(&d.join("both"));
        with_config(&d.join("both/model"));
        // Neither: itself, so that loading it names the file it lacks there.
        std::fs::create_dir(d.join("neither")).unwrap();
        for (name, want) in [("run", "run/model"), ("both", "both"), ("neither", "neither")] {
            let spec = d.join(name);
            assert_eq!(model_dir(spec.to_str().unwrap()).unwrap(), d.join(want), "{name}");
        }
    }
}

//! `cargo xtask plot`: the validation curves of runs trained apart (a baseline and a patch-level
//! run started as separate jobs, a run still training) on one set of axes, and a table of where
//! each run stands.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Args;
use patchlm_eval::report::{fmt_secs, write_plot, LinePlot, Series};
use patchlm_train::{read_metrics, EvalMetrics, RunConfig};

/// `cargo xtask plot` arguments.
#[derive(Args)]
pub struct PlotArgs {
    /// Run directories (`--out` of `pretrain`), or folders holding runs (such as `runs/`, or a
    /// compare's `--out`): each folder's runs, at any depth, in name order. A run still training
    /// is drawn as far as its metrics go.
    #[arg(required = true, num_args = 1..)]
    runs: Vec<PathBuf>,
    /// Where the plots (loss_vs_tokens, loss_vs_compute, loss_vs_time; PNG and SVG) and
    /// runs.md go; not a run directory.
    #[arg(long, default_value = "runs/plot")]
    out: PathBuf,
}

/// A run directory: it holds `metrics.jsonl` and the `config.toml` it was made with.
fn is_run(dir: &Path) -> bool {
    dir.join("metrics.jsonl").is_file() && dir.join("config.toml").is_file()
}

/// The run directories `arg` names: itself, or the runs anywhere below it, in name order (a run's
/// own folders, hidden folders and a folder reached again through a link are not searched).
fn runs_in(arg: &Path) -> Result<Vec<PathBuf>> {
    if is_run(arg) {
        return Ok(vec![arg.to_path_buf()]);
    }
    if !arg.is_dir() {
        bail!("{}: no such run directory", arg.display());
    }
    fn search(d: &Path, found: &mut Vec<PathBuf>, seen: &mut std::collections::HashSet<PathBuf>) -> Result<()> {
        if !seen.insert(d.canonicalize().with_context(|| format!("reading {}", d.display()))?) {
            return Ok(());
        }
        let mut subdirs: Vec<PathBuf> = std::fs::read_dir(d)
            .with_context(|| format!("reading {}", d.display()))?
            .flatten()
            .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
            .map(|e| e.path())
            .filter(|p| p.is_dir())
            .collect();
        subdirs.sort();
        for sub in subdirs {
            if is_run(&sub) {
                found.push(sub);
            } else {
                search(&sub, found, seen)?;
            }
        }
        Ok(())
    }
    let mut found = Vec::new();
    search(arg, &mut found, &mut Default::default())?;
    if found.is_empty() {
        bail!(
            "{} is not a run directory (no metrics.jsonl and config.toml) and holds none; give the --out of a \
             `cargo xtask pretrain` run, or a folder of them",
            arg.display()
        );
    }
    Ok(found)
}

/// One run as plotted.
struct Run {
    name: String,
    cfg: RunConfig,
    evals: Vec<EvalMetrics>,
    last_step: usize,
    state: String,
}

fn load(dir: &Path, name: String) -> Result<Run> {
    let cfg_path = dir.join("config.toml");
    let text = std::fs::read_to_string(&cfg_path).with_context(|| format!("reading {}", cfg_path.display()))?;
    let cfg: RunConfig =
        toml::from_str(&text).with_context(|| format!("{}: not a run's config", cfg_path.display()))?;
    let (steps, evals) = read_metrics(&dir.join("metrics.jsonl"))?;
    Ok(Run { name, cfg, last_step: steps.last().map_or(0, |s| s.global_step), evals, state: run_state(dir) })
}

/// Where a run is: finished, training now (a process holds its directory), or stopped (killed,
/// failed or interrupted: `--resume` continues it).
fn run_state(dir: &Path) -> String {
    if dir.join("summary.json").is_file() {
        "finished".into()
    } else if patchlm_train::is_held(dir) {
        patchlm_train::holder_pid(dir).map_or("training".into(), |p| format!("training (process {p})"))
    } else {
        "stopped (--resume continues it)".into()
    }
}

/// How a run is told apart in the legend and the table: its patch setting.
fn setting(cfg: &RunConfig) -> String {
    if cfg.patch.lambda > 0.0 {
        format!("K={} λ={:.3}", cfg.patch.k, cfg.patch.lambda)
    } else {
        "token level".into()
    }
}

/// A unit for FLOPs that puts the largest count between 1 and 1000.
fn flops_unit(max: f64) -> (f64, &'static str) {
    [(1e18, "EFLOP"), (1e15, "PFLOP"), (1e12, "TFLOP"), (1e9, "GFLOP")]
        .into_iter()
        .find(|&(u, _)| max >= u)
        .unwrap_or((1e6, "MFLOP"))
}

/// An x coordinate of a validation, given the FLOPs unit.
type XOf = fn(&EvalMetrics, f64) -> f64;

/// The plots: file stem, title.
const PLOTS: [(&str, &str); 3] = [
    ("loss_vs_compute", "Validation loss vs training compute"),
    ("loss_vs_tokens", "Validation loss vs training tokens"),
    ("loss_vs_time", "Validation loss vs wall-clock time"),
];

/// `cargo xtask plot`.
pub fn run(a: PlotArgs) -> Result<()> {
    let mut dirs = Vec::new();
    for arg in &a.runs {
        for d in runs_in(arg)? {
            if !dirs.contains(&d) {
                dirs.push(d);
            }
        }
    }
    // Every run is a run directory, so this also refuses an --out that is one of them.
    if is_run(&a.out) {
        bail!(
            "--out {} is a run directory: its plots would be foreign files there; give another --out",
            a.out.display()
        );
    }
    let mut runs = Vec::new();
    for (d, name) in dirs.iter().zip(run_names(&dirs)) {
        runs.push(load(d, name).with_context(|| format!("run {}", d.display()))?);
    }
    let max_flops = runs.iter().flat_map(|r| r.evals.iter().map(|e| e.flops)).fold(0.0, f64::max);
    let (unit, unit_name) = flops_unit(max_flops);
    let axes = axes(unit_name);
    std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    let mut files = Vec::new();
    for ((stem, title), (x_label, x_of)) in PLOTS.iter().zip(&axes) {
        let series = runs
            .iter()
            .map(|r| {
                let switch = patchlm_train::phase_switch(&r.evals);
                Series {
                    name: format!("{} ({})", r.name, setting(&r.cfg)),
                    points: r.evals.iter().map(|e| (x_of(e, unit), e.val_loss)).collect(),
                    dots: true,
                    marker: switch.map(|e| (x_of(e, unit), e.val_loss)),
                }
            })
            .collect();
        let plot = LinePlot {
            title: title.to_string(),
            x_label: x_label.clone(),
            y_label: "validation loss (nats/token)".into(),
            series,
            marker_label: "patch → token switch".into(),
        };
        files.extend(write_plot(&a.out, stem, &plot)?);
    }
    let table = table(&runs, unit, unit_name);
    let md = a.out.join("runs.md");
    let images: String = PLOTS.iter().map(|(stem, title)| format!("![{title}]({stem}.png)\n")).collect();
    let text = format!(
        "# Validation loss of {} runs\n\n{table}\nRuns: {}\n\n{images}",
        runs.len(),
        dirs.iter().map(|d| format!("`{}`", d.display())).collect::<Vec<_>>().join(", ")
    );
    patchlm_data::shard::write_atomic(&md, text.as_bytes())?;
    files.push(md);
    print!("{table}");
    for f in files {
        println!("wrote {}", f.display());
    }
    Ok(())
}

/// Each run's name in the legend and the table: its directory's name, or the path given where
/// two runs share a name.
fn run_names(dirs: &[PathBuf]) -> Vec<String> {
    let base = |d: &PathBuf| d.file_name().map_or_else(|| d.display().to_string(), |n| n.to_string_lossy().into());
    dirs.iter()
        .map(|d| if dirs.iter().filter(|o| base(o) == base(d)).count() > 1 { d.display().to_string() } else { base(d) })
        .collect()
}

/// The x axes of [`PLOTS`], in their order: label, and a validation's coordinate given the
/// FLOPs unit (compute in `unit_name`s, tokens, seconds).
fn axes(unit_name: &str) -> [(String, XOf); 3] {
    [
        (format!("training compute ({unit_name})"), |e, u| e.flops / u),
        ("training tokens".into(), |e, _| e.tokens_seen as f64),
        ("wall-clock training time (s)".into(), |e, _| e.train_secs),
    ]
}

/// Where each run stands: its setting and steps; at its last validation the tokens, compute
/// and time trained and the loss; its best validation loss.
fn table(runs: &[Run], unit: f64, unit_name: &str) -> String {
    let mut t = format!(
        "| run | setting | steps | tokens | compute ({unit_name}) | train time | val loss | best val loss | state |\n\
         |---|---|---|---|---|---|---|---|---|\n"
    );
    for r in runs {
        let last = r.evals.last();
        let best = r.evals.iter().map(|e| e.val_loss).filter(|l| l.is_finite()).fold(f64::INFINITY, f64::min);
        let or_dash = |s: Option<String>| s.unwrap_or_else(|| "—".into());
        t += &format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
            r.name,
            setting(&r.cfg),
            r.last_step,
            or_dash(last.map(|e| e.tokens_seen.to_string())),
            or_dash(last.map(|e| format!("{:.3}", e.flops / unit))),
            or_dash(last.map(|e| fmt_secs(e.train_secs))),
            or_dash(last.map(|e| format!("{:.4}", e.val_loss))),
            or_dash(best.is_finite().then(|| format!("{best:.4}"))),
            r.state,
        );
    }
    t + "\nTokens, compute, time and loss at each run's last validation; steps as far as its metrics go.\n"
}

#[cfg(test)]
mod tests {
    use super::{axes, flops_unit, run_names, runs_in};
    use std::path::PathBuf;

    #[test]
    fn flops_units_put_the_largest_count_between_1_and_1000() {
        assert_eq!(flops_unit(3.2e15), (1e15, "PFLOP"));
        assert_eq!(flops_unit(999e12), (1e12, "TFLOP"));
        assert_eq!(flops_unit(1e18), (1e18, "EFLOP"));
        assert_eq!(flops_unit(0.0), (1e6, "MFLOP"));
    }

    #[test]
    fn a_run_needs_both_its_metrics_and_its_config() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        for (name, files) in [
            ("both", &["metrics.jsonl", "config.toml"][..]),
            ("metrics", &["metrics.jsonl"]),
            ("config", &["config.toml"]),
        ] {
            std::fs::create_dir(d.join(name)).unwrap();
            for f in files {
                std::fs::write(d.join(name).join(f), "").unwrap();
            }
        }
        assert_eq!(runs_in(d).unwrap(), [d.join("both")]);
        for half in ["metrics", "config"] {
            let err = runs_in(&d.join(half)).unwrap_err().to_string();
            assert!(err.contains("is not a run directory (no metrics.jsonl and config.toml)"), "{half}: {err}");
        }
    }

    #[test]
    fn runs_are_named_by_their_folder_or_by_path_where_two_share_one() {
        let dirs: Vec<PathBuf> = ["a/base", "b/base", "c/patch", "base2"].map(PathBuf::from).into();
        assert_eq!(run_names(&dirs), ["a/base", "b/base", "patch", "base2"]);
    }

    #[test]
    fn the_axes_read_compute_in_the_unit_then_tokens_then_seconds() {
        let e = patchlm_train::EvalMetrics {
            phase: "token".into(),
            global_step: 3,
            tokens_seen: 4096,
            flops: 2.5e12,
            train_secs: 7.5,
            val_loss: 2.5,
            val_ppl: 2.5f64.exp(),
        };
        let axes = axes("TFLOP");
        let got: Vec<(String, f64)> = axes.iter().map(|(label, x)| (label.clone(), x(&e, 1e12))).collect();
        assert_eq!(
            got,
            [
                ("training compute (TFLOP)".to_string(), 2.5),
                ("training tokens".into(), 4096.0),
                ("wall-clock training time (s)".into(), 7.5)
            ]
        );
    }
}

//! Comparison reports: a Markdown table in the form of the patch-level training paper's Table 1
//! (model, cost, tokens, wall time, validation perplexity, bits per byte, zero-shot accuracies)
//! and plots of validation loss against relative compute, tokens and wall time, as PNG and SVG.
//!
//! The report knows nothing of training or patches: callers describe each run as a [`ReportRun`]
//! (summary numbers, their own label columns, a loss curve and optionally one marked point, such
//! as where a two-phase run switched phase).

use std::path::{Path, PathBuf};
use std::sync::Once;

use plotters::coord::Shift;
use plotters::prelude::*;

use crate::error::{EvalError, Result};
use crate::zeroshot::TaskResult;

/// One validation measurement of a run.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct CurvePoint {
    /// Training tokens consumed so far.
    pub tokens: f64,
    /// Training compute so far, relative to the report's reference run (1.0 = its whole budget).
    pub compute: f64,
    /// Wall-clock training seconds so far.
    pub secs: f64,
    /// Validation loss (mean token-level NLL, nats).
    pub loss: f64,
}

/// One run's row and curve.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ReportRun {
    /// Display name, e.g. `patch K=4 λ=0.667`.
    pub name: String,
    /// Extra label columns shown after the name, as (header, value), e.g. `("K", "4")`; the
    /// first run's headers are the table's.
    pub labels: Vec<(String, String)>,
    /// Training compute relative to the reference run.
    pub cost: f64,
    /// Training tokens.
    pub tokens: u64,
    /// Wall-clock training seconds.
    pub wall_secs: f64,
    /// Final validation loss (nats per token).
    pub val_loss: f64,
    /// Final validation perplexity.
    pub val_ppl: f64,
    /// Bits per UTF-8 byte of the validation text.
    pub bits_per_byte: f64,
    /// Zero-shot results, in the same task order for every run.
    pub tasks: Vec<TaskResult>,
    /// Validation loss over training.
    pub curve: Vec<CurvePoint>,
    /// A point to mark on the curves (ring + vertical line), e.g. a phase switch.
    pub marker: Option<CurvePoint>,
}

/// A whole report.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Report {
    /// Title (first heading and plot titles' prefix).
    pub title: String,
    /// Markdown paragraphs printed under the title (setup: data, model, budget).
    pub notes: Vec<String>,
    /// The runs, reference first.
    pub runs: Vec<ReportRun>,
    /// Legend text of the marked points, e.g. `patch → token switch`.
    pub marker_label: String,
}

/// Files of the plots: `<stem>.png` and `<stem>.svg` in the report directory.
pub const PLOTS: [(&str, &str); 3] = [
    ("loss_vs_compute", "Validation loss vs relative compute"),
    ("loss_vs_tokens", "Validation loss vs training tokens"),
    ("loss_vs_time", "Validation loss vs wall-clock time"),
];

fn fmt_count(n: f64) -> String {
    let a = n.abs();
    if a >= 1e9 {
        format!("{:.2}B", n / 1e9)
    } else if a >= 1e6 {
        format!("{:.2}M", n / 1e6)
    } else if a >= 1e3 {
        format!("{:.1}k", n / 1e3)
    } else {
        format!("{n:.0}")
    }
}

/// A duration for a table: "42.3s", "2m05s", "1h07m". Rounded to the unit shown before it is
/// split, so 179.8 s reads 3m00s, not 2m60s.
pub fn fmt_secs(s: f64) -> String {
    if s >= 3570.0 {
        let m = (s / 60.0).round() as u64;
        format!("{}h{:02}m", m / 60, m % 60)
    } else if s >= 59.95 {
        let t = s.round() as u64;
        format!("{}m{:02}s", t / 60, t % 60)
    } else {
        format!("{s:.1}s")
    }
}

/// The main table in Markdown: one row per run, one column per zero-shot task's `acc_norm` (in
/// %; the paper's Table 1 reports normalized accuracy) plus their average when there are several.
pub fn markdown_table(r: &Report) -> String {
    let tasks: Vec<String> =
        r.runs.first().map(|x| x.tasks.iter().map(|t| t.task.clone()).collect()).unwrap_or_default();
    let labels: Vec<&str> = r.runs.first().map(|x| x.labels.iter().map(|l| l.0.as_str()).collect()).unwrap_or_default();
    let mut s = String::from("| model |");
    for l in &labels {
        s += &format!(" {l} |");
    }
    s += " cost | tokens | wall time | val loss | val PPL | bits/byte |";
    for t in &tasks {
        s += &format!(" {t} acc_norm |");
    }
    if tasks.len() > 1 {
        s += " avg acc_norm |";
    }
    s += "\n|---|---|---|---|---|---|---|";
    s += &"---|".repeat(labels.len() + tasks.len() + usize::from(tasks.len() > 1));
    s += "\n";
    for run in &r.runs {
        s += &format!("| {} |", run.name);
        for (_, v) in &run.labels {
            s += &format!(" {v} |");
        }
        s += &format!(
            " {:.3}× | {} | {} | {:.4} | {:.2} | {:.4} |",
            run.cost,
            fmt_count(run.tokens as f64),
            fmt_secs(run.wall_secs),
            run.val_loss,
            run.val_ppl,
            run.bits_per_byte
        );
        for t in &run.tasks {
            s += &format!(" {:.1} |", 100.0 * t.acc_norm);
        }
        if tasks.len() > 1 {
            let avg = run.tasks.iter().map(|t| t.acc_norm).sum::<f64>() / run.tasks.len().max(1) as f64;
            s += &format!(" {:.1} |", 100.0 * avg);
        }
        s += "\n";
    }
    s
}

/// The report as Markdown: title, notes, the main table ([`markdown_table`]), a detail table
/// with `acc_norm` and standard errors, and the plots.
pub fn markdown(r: &Report) -> String {
    let mut s = format!("# {}\n\n", r.title);
    for n in &r.notes {
        s += n;
        s += "\n\n";
    }
    s += &markdown_table(r);
    let tasks = r.runs.first().map_or(0, |x| x.tasks.len());
    if tasks > 0 {
        s += "\nZero-shot detail (accuracy in %, ± standard error; scored as lm-evaluation-harness 0.4 \
              scores them: `acc_norm` divides each choice's log-likelihood by its length in \
              characters):\n\n| model | task | n | acc | acc_norm |\n|---|---|---|---|---|\n";
        for run in &r.runs {
            for t in &run.tasks {
                s += &format!(
                    "| {} | {} | {} | {:.1} ± {:.1} | {:.1} ± {:.1} |\n",
                    run.name,
                    t.task,
                    t.n,
                    100.0 * t.acc,
                    100.0 * t.acc_stderr,
                    100.0 * t.acc_norm,
                    100.0 * t.acc_norm_stderr
                );
            }
        }
    }
    s += "\n## Plots\n\n";
    for (stem, title) in PLOTS {
        s += &format!("### {title}\n\n![{title}]({stem}.png)\n\n([SVG]({stem}.svg))\n\n");
    }
    s
}

static FONT: Once = Once::new();

fn register_font() {
    FONT.call_once(|| {
        // DejaVu Sans, embedded: PNG text needs no system fonts.
        let _ = plotters::style::register_font("sans-serif", FontStyle::Normal, dejavu::sans::regular());
        let _ = plotters::style::register_font("sans-serif", FontStyle::Bold, dejavu::sans::bold());
    });
}

const PALETTE: [RGBColor; 8] = [
    RGBColor(0, 0, 0),
    RGBColor(214, 39, 40),
    RGBColor(31, 119, 180),
    RGBColor(44, 160, 44),
    RGBColor(255, 127, 14),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(23, 190, 207),
];

fn plot_err<E: std::fmt::Display>(path: &Path) -> impl FnOnce(E) -> EvalError + '_ {
    move |e| EvalError::Plot { path: path.to_path_buf(), msg: e.to_string() }
}

type Axis = fn(&CurvePoint) -> f64;

/// One line of a [`LinePlot`].
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    /// Legend text.
    pub name: String,
    /// `(x, y)` points in order; points with a non-finite `y` are left out.
    pub points: Vec<(f64, f64)>,
    /// Draw a dot at every point (for sparse measurements such as validations).
    pub dots: bool,
    /// A point to mark with a ring and a vertical line (e.g. a phase switch).
    pub marker: Option<(f64, f64)>,
}

/// A line plot of one or more series against a common x axis, drawn by [`write_plot`].
#[derive(Debug, Clone, PartialEq)]
pub struct LinePlot {
    /// Caption.
    pub title: String,
    /// X-axis description.
    pub x_label: String,
    /// Y-axis description.
    pub y_label: String,
    /// The lines, in legend order (colours follow the order).
    pub series: Vec<Series>,
    /// Legend text of the markers, shown when a series has one.
    pub marker_label: String,
}

/// A series' points that can be drawn (both coordinates finite).
fn finite(pts: &[(f64, f64)]) -> Vec<(f64, f64)> {
    pts.iter().copied().filter(|(x, y)| x.is_finite() && y.is_finite()).collect()
}

/// The axes' ranges for `series`: x from 0 to 4% past the largest x (to 1 without a point past
/// 0); y the finite points' range widened by 5% of it (at least 0.001) on each side, or 0 to 1
/// widened so without any finite point.
fn plot_ranges(series: &[Series]) -> (f64, (f64, f64)) {
    let (mut x1, mut y0, mut y1) = (0.0f64, f64::INFINITY, f64::NEG_INFINITY);
    for (x, y) in series.iter().flat_map(|s| finite(&s.points)) {
        x1 = x1.max(x);
        y0 = y0.min(y);
        y1 = y1.max(y);
    }
    if !y0.is_finite() {
        (y0, y1) = (0.0, 1.0);
    }
    let pad = ((y1 - y0) * 0.05).max(1e-3);
    let x1 = if x1 > 0.0 { x1 * 1.04 } else { 1.0 };
    (x1, (y0 - pad, y1 + pad))
}

fn draw<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    p: &LinePlot,
) -> std::result::Result<(), DrawingAreaErrorKind<DB::ErrorType>> {
    root.fill(&WHITE)?;
    let (x1, (y0, y1)) = plot_ranges(&p.series);
    let mut chart = ChartBuilder::on(root)
        .caption(&p.title, ("sans-serif", 26).into_font())
        .margin(16)
        .x_label_area_size(52)
        .y_label_area_size(70)
        .build_cartesian_2d(0.0..x1, y0..y1)?;
    chart
        .configure_mesh()
        .x_desc(p.x_label.as_str())
        .y_desc(p.y_label.as_str())
        .label_style(("sans-serif", 16))
        .axis_desc_style(("sans-serif", 18))
        .light_line_style(RGBColor(235, 235, 235))
        .x_label_formatter(&|x| if x1 >= 1e4 { fmt_count(*x) } else { format!("{x:.2}") })
        .draw()?;
    for (i, s) in p.series.iter().enumerate() {
        let c = PALETTE[i % PALETTE.len()];
        let pts = finite(&s.points);
        chart
            .draw_series(LineSeries::new(pts.clone(), c.stroke_width(2)))?
            .label(s.name.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 24, y)], c.stroke_width(3)));
        if s.dots {
            chart.draw_series(pts.iter().map(|&(x, y)| Circle::new((x, y), 3, c.filled())))?;
        }
        if let Some((x, y)) = s.marker {
            chart.draw_series(std::iter::once(PathElement::new(vec![(x, y0), (x, y1)], c.mix(0.5).stroke_width(1))))?;
            chart.draw_series(std::iter::once(Circle::new((x, y), 7, c.stroke_width(2))))?;
        }
    }
    if p.series.iter().any(|s| s.marker.is_some()) {
        chart
            .draw_series(std::iter::empty::<Circle<(f64, f64), i32>>())?
            .label(format!("{} (ring + vertical line)", p.marker_label))
            .legend(|(x, y)| Circle::new((x + 12, y), 6, BLACK.stroke_width(2)));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .label_font(("sans-serif", 16))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}

/// Draws `plot` as `<dir>/<stem>.png` (1200×800) and `<dir>/<stem>.svg`. Each is drawn in
/// memory and written atomically (temp file, fsync, rename): a write that fails (a full disk)
/// or is killed leaves the earlier plot in place and no partial file behind.
pub fn write_plot(dir: &Path, stem: &str, plot: &LinePlot) -> Result<Vec<PathBuf>> {
    register_font();
    let png = dir.join(format!("{stem}.png"));
    let svg = dir.join(format!("{stem}.svg"));
    let (w, h) = (1200u32, 800u32);
    let mut rgb = vec![0u8; (w * h * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut rgb, (w, h)).into_drawing_area();
        draw(&root, plot).map_err(plot_err(&png))?;
    }
    let mut png_bytes = Vec::new();
    {
        use image::ImageEncoder;
        image::codecs::png::PngEncoder::new(&mut png_bytes)
            .write_image(&rgb, w, h, image::ColorType::Rgb8)
            .map_err(plot_err(&png))?;
    }
    let mut svg_text = String::new();
    {
        let root = SVGBackend::with_string(&mut svg_text, (w, h)).into_drawing_area();
        draw(&root, plot).map_err(plot_err(&svg))?;
    }
    patchlm_data::shard::write_atomic(&png, &png_bytes)?;
    patchlm_data::shard::write_atomic(&svg, svg_text.as_bytes())?;
    Ok(vec![png, svg])
}

/// Draws one plot of the report's runs (validation loss against `x_of`) as `<dir>/<stem>.png`
/// (1200×800) and `<dir>/<stem>.svg`.
pub fn plot_runs(dir: &Path, stem: &str, title: &str, x_label: &str, x_of: Axis, r: &Report) -> Result<Vec<PathBuf>> {
    let series = r
        .runs
        .iter()
        .map(|run| Series {
            name: run.name.clone(),
            points: run.curve.iter().map(|p| (x_of(p), p.loss)).collect(),
            dots: true,
            marker: run.marker.as_ref().map(|m| (x_of(m), m.loss)),
        })
        .collect();
    let plot = LinePlot {
        title: title.to_string(),
        x_label: x_label.to_string(),
        y_label: "validation loss (nats/token)".into(),
        series,
        marker_label: r.marker_label.clone(),
    };
    write_plot(dir, stem, &plot)
}

/// Writes `report.md`, `report.json` and the three plots (PNG and SVG) into `dir`; returns the
/// files written.
pub fn write_report(dir: &Path, r: &Report) -> Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir).map_err(|e| EvalError::Io { path: dir.to_path_buf(), source: e })?;
    let axes: [(&str, Axis); 3] = [
        ("training compute (1.0 = the reference run's budget)", |p| p.compute),
        ("training tokens", |p| p.tokens),
        ("wall-clock training time (s)", |p| p.secs),
    ];
    let mut files = Vec::new();
    for ((stem, title), (x_label, x_of)) in PLOTS.iter().zip(axes) {
        files.extend(plot_runs(dir, stem, title, x_label, x_of, r)?);
    }
    let md = dir.join("report.md");
    patchlm_data::shard::write_atomic(&md, markdown(r).as_bytes())?;
    let json = dir.join("report.json");
    let text =
        serde_json::to_string_pretty(r).map_err(|e| EvalError::Plot { path: json.clone(), msg: e.to_string() })?;
    patchlm_data::shard::write_atomic(&json, text.as_bytes())?;
    files.push(md);
    files.push(json);
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::{fmt_secs, plot_ranges, Series};

    /// Durations are rounded before they are split into units: no "2m60s" or "0h60m".
    #[test]
    fn durations_never_show_sixty() {
        let cases = [
            (42.34, "42.3s"),
            (59.94, "59.9s"),
            (59.96, "1m00s"),
            (125.0, "2m05s"),
            (179.8, "3m00s"),
            (3569.0, "59m29s"),
            (3599.7, "1h00m"),
            (4020.0, "1h07m"),
            (7199.0, "2h00m"),
        ];
        for (s, want) in cases {
            assert_eq!(fmt_secs(s), want, "{s} s");
        }
    }

    #[test]
    fn axes_hold_every_finite_point_with_a_margin() {
        let line = |points: Vec<(f64, f64)>| Series { name: String::new(), points, dots: false, marker: None };
        let close = |a: f64, b: f64| (a - b).abs() < 1e-12;
        // y 3..5 over two series, padded by 5% of 2; x to 4% past 200. Non-finite points (a NaN
        // loss, an infinite x) are skipped, not stretched to.
        let (x1, (y0, y1)) = plot_ranges(&[
            line(vec![(0.0, 5.0), (100.0, f64::NAN), (200.0, 4.0)]),
            line(vec![(50.0, 3.0), (f64::INFINITY, 9.0), (150.0, f64::NEG_INFINITY)]),
        ]);
        assert!(close(x1, 208.0) && close(y0, 2.9) && close(y1, 5.1), "{x1} {y0} {y1}");
        // A flat line still gets a margin of 0.001.
        let (_, (y0, y1)) = plot_ranges(&[line(vec![(1.0, 2.0), (2.0, 2.0)])]);
        assert!(close(y0, 1.999) && close(y1, 2.001), "{y0} {y1}");
        // Nothing to draw yet (or only x = 0): 0..1 on both axes, y padded.
        for series in [vec![], vec![line(vec![(0.0, f64::NAN)])]] {
            let (x1, (y0, y1)) = plot_ranges(&series);
            assert!(close(x1, 1.0) && close(y0, -0.05) && close(y1, 1.05), "{x1} {y0} {y1}");
        }
        let (x1, _) = plot_ranges(&[line(vec![(0.0, 1.0)])]);
        assert!(close(x1, 1.0));
    }
}

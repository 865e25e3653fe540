//! `latest.png`, drawn with plotters' bitmap backend: throughput, connection rate and idle
//! memory as bars; connect and RPC latencies as distributions (share of requests finished by a
//! time, log time axis). Text uses a TrueType font read at run time (DejaVu Sans from Debian's
//! `fonts-dejavu-core`, or `BENCH_FONT`), so no font library is needed.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, Context};
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use crate::report::{num, Report};

const SIZE: (u32, u32) = (1800, 1100);
const FONT: &str = "sans-serif";
/// Points drawn per latency distribution.
const CURVE_POINTS: usize = 400;
/// Where the font is looked for when `BENCH_FONT` is not set.
const FONT_PATHS: [&str; 3] = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
];

type Area<'a> = DrawingArea<BitMapBackend<'a>, Shift>;

/// Draws the report into `path` (PNG).
pub fn draw(report: &Report, path: &Path) -> anyhow::Result<()> {
    load_font()?;
    let root = BitMapBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let title = format!(
        "eps benchmarks · {} · {} ({} cores)",
        report.date, report.machine.cpu, report.machine.cores
    );
    let body = root.titled(&title, (FONT, 28)).map_err(err)?;
    let panels = body.split_evenly((2, 3));
    bars(&panels[0], report, "throughput_1", "1 connection, MiB/s")?;
    bars(&panels[1], report, "throughput_8", "8 connections, MiB/s")?;
    bars(
        &panels[2],
        report,
        "conn_rate",
        "new connections per second",
    )?;
    curves(
        &panels[3],
        report,
        "connect",
        "connect + one request: latency (ms)",
    )?;
    curves(&panels[4], report, "rpc", "JSON-RPC call: latency (ms)")?;
    bars(
        &panels[5],
        report,
        "idle_rss_per_conn",
        "memory per idle connection, KiB",
    )?;
    root.present().map_err(err)?;
    Ok(())
}

/// One bar per system that has a value for `scenario`.
fn bars(area: &Area, report: &Report, scenario: &str, caption: &str) -> anyhow::Result<()> {
    let values: Vec<(String, f64)> = report
        .systems
        .iter()
        .filter_map(|s| report.get(scenario, s).map(|v| (s.clone(), v)))
        .collect();
    if values.is_empty() {
        return Ok(());
    }
    let top = values.iter().map(|v| v.1).fold(0.0, f64::max).max(1e-9) * 1.15;
    let last = values.len() - 1;
    let mut chart = ChartBuilder::on(area)
        .caption(caption, (FONT, 22))
        .margin(15)
        .x_label_area_size(35)
        .y_label_area_size(70)
        .build_cartesian_2d((0..last).into_segmented(), 0.0..top)
        .map_err(err)?;
    let names: Vec<String> = values.iter().map(|v| v.0.clone()).collect();
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(values.len())
        .x_label_formatter(&|x| match x {
            SegmentValue::CenterOf(i) => names.get(*i).cloned().unwrap_or_default(),
            _ => String::new(),
        })
        .y_label_formatter(&|y| num(*y))
        .label_style((FONT, 16))
        .draw()
        .map_err(err)?;
    chart
        .draw_series(
            Histogram::vertical(&chart)
                .margin(20)
                .style_func(|x, _| match x {
                    SegmentValue::Exact(i) => color(&names[*i]).filled(),
                    _ => BLACK.filled(),
                })
                .data(values.iter().enumerate().map(|(i, v)| (i, v.1))),
        )
        .map_err(err)?;
    chart
        .draw_series(values.iter().enumerate().map(|(i, (_, v))| {
            let style =
                TextStyle::from((FONT, 17).into_font()).pos(Pos::new(HPos::Center, VPos::Bottom));
            Text::new(num(*v), (SegmentValue::CenterOf(i), *v), style)
        }))
        .map_err(err)?;
    Ok(())
}

/// The share of samples at or below each latency, one curve per system.
fn curves(area: &Area, report: &Report, family: &str, caption: &str) -> anyhow::Result<()> {
    let series: Vec<(&String, Vec<f64>)> = report
        .systems
        .iter()
        .filter_map(|s| {
            let mut v = report
                .samples
                .get(&(family.to_string(), s.clone()))?
                .clone();
            v.retain(|x| *x > 0.0);
            v.sort_by(f64::total_cmp);
            (!v.is_empty()).then_some((s, v))
        })
        .collect();
    if series.is_empty() {
        return Ok(());
    }
    let lo = series.iter().map(|s| s.1[0]).fold(f64::MAX, f64::min) * 0.8;
    let hi = series
        .iter()
        .map(|s| s.1[s.1.len() - 1])
        .fold(0.0, f64::max)
        * 1.25;
    let mut chart = ChartBuilder::on(area)
        .caption(caption, (FONT, 22))
        .margin(15)
        .x_label_area_size(35)
        .y_label_area_size(70)
        .build_cartesian_2d((lo..hi).log_scale(), 0.0..100.0)
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_label_formatter(&|x| num(*x))
        .y_label_formatter(&|y| format!("{y:.0}%"))
        .label_style((FONT, 16))
        .draw()
        .map_err(err)?;
    for (name, sorted) in &series {
        let n = sorted.len();
        let step = (n / CURVE_POINTS).max(1);
        let points = (0..n)
            .step_by(step)
            .chain([n - 1])
            .map(|i| (sorted[i], 100.0 * (i + 1) as f64 / n as f64));
        let c = color(name);
        chart
            .draw_series(LineSeries::new(points, c.stroke_width(3)))
            .map_err(err)?
            .label(name.as_str())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 24, y)], c.stroke_width(3)));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .label_font((FONT, 17))
        .border_style(BLACK)
        .background_style(WHITE.mix(0.85))
        .draw()
        .map_err(err)?;
    Ok(())
}

fn color(system: &str) -> RGBColor {
    match system {
        "direct" => RGBColor(110, 110, 110),
        "haproxy" => RGBColor(31, 119, 180),
        "rathole" => RGBColor(255, 127, 14),
        "eps" => RGBColor(44, 160, 44),
        "eps-embedded" => RGBColor(23, 190, 207),
        _ => RGBColor(148, 103, 189),
    }
}

/// Registers the font plotters draws text with (it needs the bytes for the whole run).
fn load_font() -> anyhow::Result<()> {
    let candidates: Vec<PathBuf> = match std::env::var_os("BENCH_FONT") {
        Some(p) => vec![p.into()],
        None => FONT_PATHS.iter().map(PathBuf::from).collect(),
    };
    let path = candidates.iter().find(|p| p.is_file()).with_context(|| {
        format!(
            "no TrueType font for the plot at {candidates:?}: install fonts-dejavu-core \
             (make bench does) or set BENCH_FONT"
        )
    })?;
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    plotters::style::register_font(FONT, FontStyle::Normal, Box::leak(bytes.into_boxed_slice()))
        .map_err(|_| anyhow!("{} is not a font plotters can read", path.display()))
}

fn err<E: std::fmt::Debug>(e: E) -> anyhow::Error {
    anyhow!("drawing the plot: {e:?}")
}

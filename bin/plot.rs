//! PNG plots (plotters, bitmap backend). Text needs a TrueType font: the DejaVu
//! font Debian ships in `fonts-dejavu-core` (the project's scripts install it).

use plotters::coord::ranged1d::{AsRangedCoord, ValueFormatter};
use plotters::coord::Shift;
use plotters::prelude::*;
use serde::Deserialize;

use crate::benchrow::Row;

const FONTS: &[&str] = &["/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf", "/usr/share/fonts/dejavu/DejaVuSans.ttf"];

fn register_font() -> Result<(), String> {
    static DONE: std::sync::OnceLock<Result<(), String>> = std::sync::OnceLock::new();
    DONE.get_or_init(|| {
        for path in FONTS {
            if let Ok(bytes) = std::fs::read(path) {
                let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
                return plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
                    .map_err(|_| format!("{path} is not a usable font"));
            }
        }
        Err("no DejaVuSans.ttf found: apt-get install fonts-dejavu-core".into())
    })
    .clone()
}

/// Series colours, in order.
const PALETTE: [RGBColor; 14] = [
    BLUE,
    RED,
    GREEN,
    MAGENTA,
    CYAN,
    BLACK,
    RGBColor(200, 120, 0),
    RGBColor(120, 60, 160),
    RGBColor(90, 90, 90),
    RGBColor(0, 120, 90),
    RGBColor(170, 170, 0),
    RGBColor(140, 70, 40),
    RGBColor(255, 105, 180),
    RGBColor(0, 0, 120),
];

/// (value bytes, GB/s, p50 latency in us)
type Point = (f64, f64, f64);

/// Throughput and latency against value size, PS beside raw TCP.
pub fn bench_png(path: &str, rows: &[Row]) -> Result<(), String> {
    register_font()?;
    let e = |e: &dyn std::fmt::Display| e.to_string();
    let root = BitMapBackend::new(path, (1400, 560)).into_drawing_area();
    root.fill(&WHITE).map_err(|x| e(&x))?;
    let (left, right) = root.split_horizontally(700);
    let sizes: Vec<f64> = rows.iter().map(|r| r.size as f64).collect();
    let (xmin, xmax) = (sizes.iter().cloned().fold(f64::MAX, f64::min), sizes.iter().cloned().fold(1.0, f64::max));
    let series: Vec<(String, Vec<Point>)> = {
        let mut m: std::collections::BTreeMap<String, Vec<(f64, f64, f64)>> = Default::default();
        for r in rows {
            m.entry(format!("{} {}", r.layout, r.op)).or_default().push((r.size as f64, r.gb_per_s, r.p50_us));
            if let (Some(b), Some(g), Some(p)) = (&r.baseline, r.baseline_gb_per_s, r.baseline_p50_us) {
                if r.layout == "dense" {
                    let v = m.entry(format!("raw tcp {b}")).or_default();
                    if !v.iter().any(|x| x.0 == r.size as f64) {
                        v.push((r.size as f64, g, p));
                    }
                }
            }
        }
        m.into_iter().collect()
    };
    let gmax = series.iter().flat_map(|s| s.1.iter().map(|p| p.1)).fold(0.1, f64::max) * 1.15;
    let lmax = series.iter().flat_map(|s| s.1.iter().map(|p| p.2)).fold(1.0, f64::max) * 2.0;
    let lmin = series.iter().flat_map(|s| s.1.iter().map(|p| p.2)).fold(f64::MAX, f64::min).max(0.1) / 2.0;
    for (panel, title, ylog) in
        [(&left, "throughput (GB/s) vs value size", false), (&right, "p50 latency (us) vs value size", true)]
    {
        let mut chart_builder = ChartBuilder::on(panel);
        chart_builder.caption(title, ("sans-serif", 22)).margin(12).x_label_area_size(40).y_label_area_size(60);
        macro_rules! draw {
            ($chart:expr, $pick:expr) => {{
                let mut chart = $chart;
                chart
                    .configure_mesh()
                    .x_desc("bytes")
                    .x_label_formatter(&|x| crate_human(*x))
                    .draw()
                    .map_err(|x| e(&x))?;
                for (i, (name, pts)) in series.iter().enumerate() {
                    let c = &PALETTE[i % PALETTE.len()];
                    let style = if name.starts_with("raw") {
                        ShapeStyle::from(c).stroke_width(1)
                    } else {
                        ShapeStyle::from(c).stroke_width(2)
                    };
                    let mut pts = pts.clone();
                    pts.sort_by(|a, b| a.0.total_cmp(&b.0));
                    chart
                        .draw_series(LineSeries::new(pts.iter().map($pick), style))
                        .map_err(|x| e(&x))?
                        .label(name.clone())
                        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], c));
                }
                chart
                    .configure_series_labels()
                    .background_style(WHITE.mix(0.8))
                    .border_style(BLACK)
                    .position(SeriesLabelPosition::UpperLeft)
                    .draw()
                    .map_err(|x| e(&x))?;
            }};
        }
        if ylog {
            let chart = chart_builder
                .build_cartesian_2d((xmin..xmax).log_scale(), (lmin..lmax).log_scale())
                .map_err(|x| e(&x))?;
            draw!(chart, |p: &(f64, f64, f64)| (p.0, p.2));
        } else {
            let chart = chart_builder.build_cartesian_2d((xmin..xmax).log_scale(), 0.0..gmax).map_err(|x| e(&x))?;
            draw!(chart, |p: &(f64, f64, f64)| (p.0, p.1));
        }
    }
    root.present().map_err(|x| e(&x))?;
    Ok(())
}

fn crate_human(x: f64) -> String {
    let b = x as u64;
    if b >= 1 << 20 {
        format!("{}M", b >> 20)
    } else if b >= 1 << 10 {
        format!("{}K", b >> 10)
    } else {
        b.to_string()
    }
}

/// A figure for `pslab plot`: panels side by side (two columns when more than two).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Figure {
    pub title: String,
    pub panels: Vec<Panel>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Panel {
    pub title: String,
    /// x axis label
    pub x: String,
    /// y axis label
    pub y: String,
    #[serde(default)]
    pub log_y: bool,
    /// a linear y axis over the data's range instead of from 0 (lines only)
    #[serde(default)]
    pub y_fit: bool,
    #[serde(default)]
    pub kind: Kind,
    pub series: Vec<Series>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// one line with markers per series, over a numeric x axis
    #[default]
    Line,
    /// grouped bars: one group per distinct x, one bar per series
    Bar,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
}

const PANEL_PX: (u32, u32) = (700, 500);
const TITLE_PX: u32 = 40;

/// `pslab plot --json IN --out OUT`: draw the figure described in `json_path`.
pub fn figure_file(json_path: &str, png_path: &str) -> Result<(), String> {
    let text = std::fs::read_to_string(json_path).map_err(|e| format!("plot: cannot read {json_path}: {e}"))?;
    let figure: Figure =
        serde_json::from_str(&text).map_err(|e| format!("plot: {json_path} is not a figure description: {e}"))?;
    figure_png(png_path, &figure).map_err(|e| format!("plot: {json_path}: {e}"))
}

/// Check a figure before drawing: every panel has a finite point, log panels positive y.
fn validate(figure: &Figure) -> Result<(), String> {
    if figure.panels.is_empty() {
        return Err("the figure has no panels".into());
    }
    for (i, p) in figure.panels.iter().enumerate() {
        let name = format!("panel {i} ({:?})", p.title);
        if p.series.iter().all(|s| s.points.is_empty()) {
            return Err(format!("{name} has no points"));
        }
        for s in &p.series {
            if let Some((x, y)) = s.points.iter().find(|(x, y)| !x.is_finite() || !y.is_finite()) {
                return Err(format!("{name}, series {:?}: point ({x}, {y}) is not finite", s.name));
            }
            if let Some((x, y)) = s.points.iter().find(|(_, y)| p.log_y && *y <= 0.0) {
                return Err(format!("{name}, series {:?}: point ({x}, {y}) cannot go on a log y axis", s.name));
            }
        }
    }
    Ok(())
}

/// Draw `figure` into the PNG at `path`.
pub fn figure_png(path: &str, figure: &Figure) -> Result<(), String> {
    validate(figure)?;
    register_font()?;
    let n = figure.panels.len();
    let cols = n.min(2);
    let rows = n.div_ceil(cols);
    let size = (PANEL_PX.0 * cols as u32, PANEL_PX.1 * rows as u32 + TITLE_PX);
    let root = BitMapBackend::new(path, size).into_drawing_area();
    root.fill(&WHITE).map_err(|e| e.to_string())?;
    let body = root.titled(&figure.title, ("sans-serif", 26)).map_err(|e| e.to_string())?;
    for (panel, area) in figure.panels.iter().zip(body.split_evenly((rows, cols)).iter()) {
        let ys = panel.series.iter().flat_map(|s| s.points.iter().map(|p| p.1));
        let (lo, hi) = ys.fold((f64::MAX, f64::MIN), |(lo, hi), y| (lo.min(y), hi.max(y)));
        // a quarter of the height above the data for the legend
        if panel.log_y {
            let span = (hi / lo).max(10.0);
            draw_panel(area, panel, (lo / span.powf(0.05)..hi * span.powf(0.25)).log_scale())?;
        } else {
            let fit = panel.y_fit && panel.kind == Kind::Line;
            let lo = if lo >= 0.0 && !fit { 0.0 } else { lo - 0.05 * (hi - lo).max(1e-9) };
            let hi = hi + 0.25 * (hi - lo).max(1e-9);
            draw_panel(area, panel, lo..hi)?;
        }
    }
    root.present().map_err(|e| format!("writing {path}: {e}"))
}

/// One panel over the y coordinate `y` (linear or log).
fn draw_panel<Y>(area: &DrawingArea<BitMapBackend, Shift>, panel: &Panel, y: Y) -> Result<(), String>
where
    Y: AsRangedCoord<Value = f64>,
    Y::CoordDescType: ValueFormatter<f64>,
{
    let e = |e: &dyn std::fmt::Display| e.to_string();
    // bars: one slot per distinct x, at 0, 1, ...; lines: the x values themselves
    let mut slots: Vec<f64> = panel.series.iter().flat_map(|s| s.points.iter().map(|p| p.0)).collect();
    slots.sort_by(f64::total_cmp);
    slots.dedup();
    let x_range = match panel.kind {
        Kind::Bar => -0.5..slots.len() as f64 - 0.5,
        Kind::Line => {
            let (lo, hi) = (slots[0], slots[slots.len() - 1]);
            let pad = if hi > lo { 0.03 * (hi - lo) } else { 1.0 };
            lo - pad..hi + pad
        }
    };
    let mut chart = ChartBuilder::on(area)
        .caption(&panel.title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(x_range, y)
        .map_err(|x| e(&x))?;
    let slot_label = |v: &f64| {
        let i = v.round();
        match slots.get(i as usize) {
            Some(x) if (v - i).abs() < 1e-6 && i >= 0.0 => format!("{x}"),
            _ => String::new(),
        }
    };
    let mut mesh = chart.configure_mesh();
    mesh.x_desc(&panel.x).y_desc(&panel.y);
    if panel.kind == Kind::Bar {
        mesh.x_labels(slots.len()).x_label_formatter(&slot_label).disable_x_mesh();
    }
    mesh.draw().map_err(|x| e(&x))?;
    let y_base = chart.y_range().start;
    let width = 0.8 / panel.series.len() as f64;
    for (i, series) in panel.series.iter().enumerate() {
        let c = PALETTE[i % PALETTE.len()];
        match panel.kind {
            Kind::Line => {
                let mut pts = series.points.clone();
                pts.sort_by(|a, b| a.0.total_cmp(&b.0));
                chart
                    .draw_series(PointSeries::of_element(pts.clone(), 4, c.filled(), &|xy, size, style| {
                        Circle::new(xy, size, style)
                    }))
                    .map_err(|x| e(&x))?;
                chart
                    .draw_series(LineSeries::new(pts, c.stroke_width(2)))
                    .map_err(|x| e(&x))?
                    .label(series.name.clone())
                    .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], c.stroke_width(2)));
            }
            Kind::Bar => {
                let bars = series.points.iter().map(|&(x, y)| {
                    let slot = slots.iter().position(|&s| s == x).unwrap_or(0) as f64;
                    let left = slot - 0.4 + width * i as f64;
                    Rectangle::new([(left, y_base), (left + width, y)], c.filled())
                });
                chart
                    .draw_series(bars)
                    .map_err(|x| e(&x))?
                    .label(series.name.clone())
                    .legend(move |(x, y)| Rectangle::new([(x, y - 4), (x + 16, y + 4)], c.filled()));
            }
        }
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperRight)
        .draw()
        .map_err(|x| e(&x))?;
    Ok(())
}

//! PNG plots (plotters, bitmap backend). Text needs a TrueType font: the DejaVu
//! font Debian ships in `fonts-dejavu-core` (the project's scripts install it).

use plotters::prelude::*;

use crate::benchcmd::Row;

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
        let palette = [
            &BLUE,
            &RED,
            &GREEN,
            &MAGENTA,
            &CYAN,
            &BLACK,
            &RGBColor(200, 120, 0),
            &RGBColor(120, 60, 160),
            &RGBColor(90, 90, 90),
            &RGBColor(0, 120, 90),
            &RGBColor(170, 170, 0),
            &RGBColor(140, 70, 40),
            &RGBColor(255, 105, 180),
            &RGBColor(0, 0, 120),
        ];
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
                    let c = palette[i % palette.len()];
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

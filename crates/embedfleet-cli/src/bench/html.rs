//! `report.html`: the run's plots as inline SVG (drawn with plotters' SVG backend, no
//! JavaScript, no network), then the text table. Same figures in, same bytes out.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use plotters::prelude::*;

use super::report::RunReport;
use super::stats::{LoopKind, PointResult};

/// One line chart: named series of (x, y) points.
pub struct Chart {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    pub series: Vec<(String, Vec<(f64, f64)>)>,
    /// A horizontal line, e.g. the p99 target of a sweep.
    pub target: Option<(String, f64)>,
}

/// The charts of a run: latency percentiles and throughput by concurrency (at the first batch
/// size) and by batch size (at the first concurrency), per mode; open-loop latency by rate.
pub fn run_charts(report: &RunReport) -> Vec<Chart> {
    let closed: Vec<&PointResult> = report
        .points
        .iter()
        .filter(|p| p.load.kind == LoopKind::Closed)
        .collect();
    let mut charts = Vec::new();
    let first_batch = closed.first().map(|p| p.load.batch);
    let first_concurrency = closed.first().map(|p| p.load.concurrency);
    if let Some(batch) = first_batch {
        let by_c: Vec<&PointResult> = closed
            .iter()
            .copied()
            .filter(|p| p.load.batch == batch)
            .collect();
        let x = |p: &PointResult| p.load.concurrency as f64;
        charts.extend(sweep_charts(
            &by_c,
            x,
            "concurrency",
            &format!("batch {batch}"),
        ));
    }
    if let Some(concurrency) = first_concurrency {
        let by_b: Vec<&PointResult> = closed
            .iter()
            .copied()
            .filter(|p| p.load.concurrency == concurrency)
            .collect();
        let x = |p: &PointResult| p.load.batch as f64;
        let context = format!("concurrency {concurrency}");
        charts.extend(sweep_charts(&by_b, x, "batch size", &context));
    }
    let open: Vec<&PointResult> = report
        .points
        .iter()
        .filter(|p| p.load.kind == LoopKind::Open)
        .collect();
    let x = |p: &PointResult| p.load.rate.unwrap_or(0.0);
    charts.extend(sweep_charts(
        &open,
        x,
        "offered requests/s (open loop)",
        "open loop",
    ));
    charts
}

/// Latency percentiles (one chart per mode) and throughput (modes together) along `x`.
fn sweep_charts(
    points: &[&PointResult],
    x: impl Fn(&PointResult) -> f64,
    x_label: &str,
    context: &str,
) -> Vec<Chart> {
    let mut by_mode: BTreeMap<&str, Vec<&PointResult>> = BTreeMap::new();
    for p in points {
        by_mode.entry(p.mode.as_str()).or_default().push(p);
    }
    // A sweep needs two points to be a line.
    by_mode.retain(|_, ps| ps.len() >= 2);
    let mut charts = Vec::new();
    let mut throughput = Vec::new();
    for (mode, mut ps) in by_mode {
        ps.sort_by(|a, b| x(a).total_cmp(&x(b)));
        let line = |f: fn(&super::stats::Percentiles) -> f64| {
            ps.iter()
                .filter_map(|p| Some((x(p), f(p.steps.get("round_trip")?))))
                .collect::<Vec<_>>()
        };
        charts.push(Chart {
            title: format!("{mode}: round-trip latency by {x_label} ({context})"),
            x_label: x_label.to_string(),
            y_label: "ms".to_string(),
            series: vec![
                ("p50".to_string(), line(|s| s.p50_ms)),
                ("p90".to_string(), line(|s| s.p90_ms)),
                ("p99".to_string(), line(|s| s.p99_ms)),
            ],
            target: None,
        });
        let items = ps.iter().map(|p| (x(p), p.items_per_s)).collect();
        throughput.push((mode.to_string(), items));
    }
    if !throughput.is_empty() {
        charts.push(Chart {
            title: format!("throughput by {x_label} ({context})"),
            x_label: x_label.to_string(),
            y_label: "items/s".to_string(),
            series: throughput,
            target: None,
        });
    }
    charts
}

/// One chart as an SVG document.
pub fn svg(chart: &Chart) -> Result<String, String> {
    let mut out = String::new();
    draw(chart, &mut out).map_err(|e| format!("drawing `{}`: {e}", chart.title))?;
    Ok(out)
}

fn draw(chart: &Chart, out: &mut String) -> Result<(), Box<dyn std::error::Error>> {
    let all = chart.series.iter().flat_map(|(_, points)| points.iter());
    let (mut x_min, mut x_max, mut y_max) = (f64::MAX, f64::MIN, 0.0f64);
    for &(x, y) in all {
        x_min = x_min.min(x);
        x_max = x_max.max(x);
        y_max = y_max.max(y);
    }
    if let Some((_, y)) = chart.target {
        y_max = y_max.max(y);
    }
    if x_min > x_max {
        (x_min, x_max) = (0.0, 1.0);
    }
    if x_max - x_min < 1e-9 {
        x_max = x_min + 1.0;
    }
    let y_max = if y_max > 0.0 { y_max * 1.1 } else { 1.0 };

    let root = SVGBackend::with_string(out, (720, 380)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut plot = ChartBuilder::on(&root)
        .caption(&chart.title, ("sans-serif", 16))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(64)
        .build_cartesian_2d(x_min..x_max, 0.0..y_max)?;
    plot.configure_mesh()
        .x_desc(&chart.x_label)
        .y_desc(&chart.y_label)
        .draw()?;
    for (i, (name, points)) in chart.series.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        plot.draw_series(LineSeries::new(
            points.iter().copied(),
            color.stroke_width(2),
        ))?
        .label(name.as_str())
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], color));
        plot.draw_series(
            points
                .iter()
                .map(|&(x, y)| Circle::new((x, y), 3, color.filled())),
        )?;
    }
    if let Some((name, y)) = &chart.target {
        let line = vec![(x_min, *y), (x_max, *y)];
        plot.draw_series(LineSeries::new(line, RED.stroke_width(1)))?
            .label(name.as_str())
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], RED));
    }
    plot.configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}

/// A page of charts and a preformatted table.
pub fn page(title: &str, charts: &[Chart], text: &str) -> Result<String, String> {
    let mut html = String::new();
    let _ = write!(
        html,
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
         <title>{}</title>\n<style>body{{font-family:sans-serif;margin:2em;}}\
         figure{{display:inline-block;margin:0.5em;}}pre{{background:#f6f6f6;padding:1em;}}\
         </style>\n</head>\n<body>\n<h1>{}</h1>\n",
        escape(title),
        escape(title)
    );
    if charts.is_empty() {
        html.push_str(
            "<p>No sweep to plot: run two or more concurrencies, batch sizes or rates.</p>\n",
        );
    }
    for chart in charts {
        let _ = writeln!(html, "<figure>\n{}\n</figure>", svg(chart)?);
    }
    let _ = write!(html, "<pre>{}</pre>\n</body>\n</html>\n", escape(text));
    Ok(html)
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_chart_is_deterministic_svg_with_its_labels() {
        let chart = Chart {
            title: "cold: latency".into(),
            x_label: "concurrency".into(),
            y_label: "ms".into(),
            series: vec![("p99".into(), vec![(1.0, 10.0), (4.0, 25.0), (16.0, 80.0)])],
            target: Some(("target p99".into(), 50.0)),
        };
        let a = svg(&chart).expect("draws");
        assert_eq!(a, svg(&chart).expect("draws"));
        assert!(a.starts_with("<svg"), "{}", &a[..40.min(a.len())]);
        for text in ["cold: latency", "concurrency", "p99", "target p99"] {
            assert!(a.contains(text), "{text} missing");
        }
        let html = page("run <1>", &[chart], "a < b").expect("page");
        assert!(html.contains("<title>run &lt;1&gt;</title>") && html.contains("a &lt; b"));
    }

    #[test]
    fn an_empty_chart_still_draws() {
        let chart = Chart {
            title: "nothing".into(),
            x_label: "x".into(),
            y_label: "y".into(),
            series: vec![],
            target: None,
        };
        assert!(svg(&chart).expect("draws").contains("nothing"));
    }
}

//! SVG charts for BENCHMARKS.md: throughput against concurrency, and latency
//! distributions (latency against percentile, both on log scales).

use std::path::Path;

use plotters::prelude::*;

const COLORS: [RGBColor; 4] =
    [RGBColor(31, 119, 180), RGBColor(255, 127, 14), RGBColor(44, 160, 44), RGBColor(214, 39, 40)];

/// A named line of (x, y) points.
pub type Series = (String, Vec<(f64, f64)>);

fn draw(
    path: &Path,
    title: &str,
    x_desc: &str,
    y_desc: &str,
    series: &[Series],
    log_y: bool,
    x_labels: &dyn Fn(&f64) -> String,
) -> anyhow::Result<()> {
    let root = SVGBackend::new(path, (720, 420)).into_drawing_area();
    root.fill(&WHITE)?;
    let points = series.iter().flat_map(|(_, p)| p.iter());
    let (mut x_min, mut x_max, mut y_min, mut y_max) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for (x, y) in points {
        (x_min, x_max, y_min, y_max) = (x_min.min(*x), x_max.max(*x), y_min.min(*y), y_max.max(*y));
    }
    if x_min > x_max {
        return Ok(());
    }
    let x_range = x_min..x_max.max(x_min + 1e-9);
    let mut builder = ChartBuilder::on(&root);
    builder.caption(title, ("sans-serif", 18)).margin(12).x_label_area_size(40).y_label_area_size(70);
    macro_rules! finish {
        ($chart:expr) => {{
            let mut chart = $chart;
            chart.configure_mesh().x_desc(x_desc).y_desc(y_desc).x_label_formatter(x_labels).draw()?;
            for (i, (name, pts)) in series.iter().enumerate() {
                let color = COLORS[i % COLORS.len()];
                chart
                    .draw_series(LineSeries::new(pts.iter().copied(), color.stroke_width(2)))?
                    .label(name.as_str())
                    .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2)));
                chart.draw_series(pts.iter().map(|p| Circle::new(*p, 3, color.filled())))?;
            }
            chart.configure_series_labels().background_style(WHITE.mix(0.8)).border_style(BLACK).draw()?;
        }};
    }
    if log_y {
        finish!(builder.build_cartesian_2d(x_range, ((y_min * 0.8).max(1.0)..y_max * 1.25).log_scale())?);
    } else {
        finish!(builder.build_cartesian_2d(x_range, 0.0..y_max * 1.15)?);
    }
    root.present()?;
    Ok(())
}

/// Calls per second against calls in flight (x on a log2 axis).
pub fn throughput(path: &Path, title: &str, series: &[Series]) -> anyhow::Result<()> {
    let log2: Vec<Series> =
        series.iter().map(|(n, p)| (n.clone(), p.iter().map(|(x, y)| (x.log2(), *y)).collect())).collect();
    draw(path, title, "calls in flight", "calls/s", &log2, false, &|x| format!("{:.0}", 2f64.powf(*x)))
}

/// Latency (log scale) against percentile, spread as "nines".
pub fn latency(path: &Path, title: &str, series: &[Series]) -> anyhow::Result<()> {
    let nines = |q: f64| -(1.0 - q).max(1e-4).log10();
    let spread: Vec<Series> =
        series.iter().map(|(n, p)| (n.clone(), p.iter().map(|(q, us)| (nines(*q), *us)).collect())).collect();
    draw(path, title, "percentile", "latency (us)", &spread, true, &|x| format!("p{}", 100.0 - 100.0 * 10f64.powf(-x)))
}

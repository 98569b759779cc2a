//! SVG charts for BENCHMARKS.md: throughput against concurrency, and latency
//! distributions (latency in ms against the percentile, the axis marked at
//! p50, p90, p99 and p99.9).

use std::path::Path;

use plotters::prelude::*;

const COLORS: [RGBColor; 4] =
    [RGBColor(31, 119, 180), RGBColor(255, 127, 14), RGBColor(44, 160, 44), RGBColor(214, 39, 40)];

/// A named line of (x, y) points.
pub type Series = (String, Vec<(f64, f64)>);

/// The chart's axes.
#[derive(Clone, Copy)]
enum Axes<'a> {
    /// x marked evenly, each mark written by the formatter; y linear from 0.
    Even(&'a dyn Fn(&f64) -> String),
    /// x marked at its whole numbers only, named by this list; y linear from 0.
    Marks(&'a [&'a str]),
}

fn draw(
    path: &Path,
    title: &str,
    (x_desc, y_desc): (&str, &str),
    series: &[Series],
    axes: Axes<'_>,
) -> anyhow::Result<()> {
    let root = SVGBackend::new(path, (720, 420)).into_drawing_area();
    root.fill(&WHITE)?;
    let points = series.iter().flat_map(|(_, p)| p.iter());
    let (mut x_min, mut x_max, mut y_max) = (f64::MAX, f64::MIN, f64::MIN);
    for (x, y) in points {
        (x_min, x_max, y_max) = (x_min.min(*x), x_max.max(*x), y_max.max(*y));
    }
    if x_min > x_max {
        return Ok(());
    }
    let name_of = |x: &f64| match axes {
        Axes::Marks(names) => match (x.round() - x).abs() < 1e-6 {
            true => names.get(x.round() as usize).map_or_else(String::new, |name| name.to_string()),
            false => String::new(),
        },
        Axes::Even(format) => format(x),
    };
    let y_labels = |y: &f64| match *y {
        y if y >= 10.0 || y == 0.0 => format!("{y:.0}"),
        y if y >= 1.0 => format!("{y:.1}"),
        y => format!("{y:.2}"),
    };
    let mut builder = ChartBuilder::on(&root);
    builder.caption(title, ("sans-serif", 18)).margin(12).x_label_area_size(40).y_label_area_size(70);
    macro_rules! finish {
        ($chart:expr) => {{
            let mut chart = $chart;
            chart
                .configure_mesh()
                .x_desc(x_desc)
                .y_desc(y_desc)
                .x_label_formatter(&name_of)
                .y_label_formatter(&y_labels)
                .draw()?;
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
    match axes {
        Axes::Marks(names) => {
            let x_range = 0.0..(names.len() - 1) as f64;
            // Linear from 0: a log scale has no marks within one decade.
            finish!(builder.build_cartesian_2d(x_range, 0.0..y_max * 1.15)?);
        }
        Axes::Even(_) => finish!(builder.build_cartesian_2d(x_min..x_max.max(x_min + 1e-9), 0.0..y_max * 1.15)?),
    }
    root.present()?;
    Ok(())
}

/// Calls per second against calls in flight (x on a log2 axis).
pub fn throughput(path: &Path, title: &str, series: &[Series]) -> anyhow::Result<()> {
    let log2: Vec<Series> =
        series.iter().map(|(n, p)| (n.clone(), p.iter().map(|(x, y)| (x.log2(), *y)).collect())).collect();
    let in_flight = |x: &f64| format!("{:.0}", 2f64.powf(*x));
    draw(path, title, ("calls in flight", "calls/s"), &log2, Axes::Even(&in_flight))
}

/// The latency chart's marks: these percentiles sit at 0, 1, 2 and 3 on
/// its x axis.
const PERCENTILES: [(f64, &str); 4] = [(0.5, "p50"), (0.9, "p90"), (0.99, "p99"), (0.999, "p99.9")];

/// Where quantile `q` sits on the latency chart's x axis: between two marks
/// in proportion to its "nines" (-log10(1 - q)), so the tail gets room.
fn position(q: f64) -> f64 {
    let nines = |q: f64| -(1.0 - q).max(1e-4).log10();
    let marks = PERCENTILES.map(|(q, _)| nines(q));
    let n = nines(q).clamp(marks[0], marks[marks.len() - 1]);
    let i = marks.windows(2).position(|w| n <= w[1]).unwrap_or(marks.len() - 2);
    i as f64 + (n - marks[i]) / (marks[i + 1] - marks[i])
}

/// Latency in ms against percentile; `series` holds (quantile,
/// microseconds) points from p50 up.
pub fn latency(path: &Path, title: &str, series: &[Series]) -> anyhow::Result<()> {
    let spread: Vec<Series> = series
        .iter()
        .map(|(n, p)| (n.clone(), p.iter().map(|(q, us)| (position(*q), us / 1000.0)).collect()))
        .collect();
    let names = PERCENTILES.map(|(_, name)| name);
    draw(path, title, ("percentile", "latency (ms)"), &spread, Axes::Marks(&names))
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_marked_percentiles_sit_on_whole_numbers() {
        for (i, (q, _)) in super::PERCENTILES.iter().enumerate() {
            assert!((super::position(*q) - i as f64).abs() < 1e-9, "{q}");
        }
        let p95 = super::position(0.95);
        assert!(p95 > 1.0 && p95 < 2.0, "{p95}");
    }
}

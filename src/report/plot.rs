//! SVG plots drawn with `plotters` (SVG backend only: text is written as SVG `<text>`, so no
//! font files or system libraries are needed).

use anyhow::{anyhow, Result};
use plotters::prelude::*;

use crate::metrics::{ReliabilityBin, Summary};

/// Plot size in pixels.
pub const SIZE: (u32, u32) = (560, 440);

const PALETTE: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
];

fn err<E: std::fmt::Display>(e: E) -> anyhow::Error {
    anyhow!("drawing a plot: {e}")
}

/// A reliability diagram: one bar per non-empty equal-width bin (its mean accuracy), the bin's
/// mean confidence as a dot, and the diagonal of perfect calibration.
pub fn reliability_svg(bins: &[ReliabilityBin], title: &str) -> Result<String> {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, SIZE).into_drawing_area();
        root.fill(&WHITE).map_err(err)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(50)
            .build_cartesian_2d(0f64..1f64, 0f64..1f64)
            .map_err(err)?;
        chart
            .configure_mesh()
            .x_desc("confidence")
            .y_desc("accuracy (VQA)")
            .x_labels(6)
            .y_labels(6)
            .draw()
            .map_err(err)?;
        let bars = bins.iter().filter_map(|b| {
            b.accuracy
                .map(|acc| Rectangle::new([(b.lo, 0.0), (b.hi, acc)], PALETTE[0].mix(0.6).filled()))
        });
        chart
            .draw_series(bars)
            .map_err(err)?
            .label("accuracy per bin")
            .legend(|(x, y)| {
                Rectangle::new([(x, y - 5), (x + 12, y + 5)], PALETTE[0].mix(0.6).filled())
            });
        chart
            .draw_series(bins.iter().filter_map(|b| {
                Some(Circle::new(
                    (b.mean_confidence?, b.accuracy?),
                    3,
                    PALETTE[1].filled(),
                ))
            }))
            .map_err(err)?
            .label("(mean confidence, accuracy)")
            .legend(|(x, y)| Circle::new((x + 6, y), 3, PALETTE[1].filled()));
        chart
            .draw_series(LineSeries::new(
                [(0.0, 0.0), (1.0, 1.0)],
                BLACK.stroke_width(1),
            ))
            .map_err(err)?
            .label("perfect calibration")
            .legend(|(x, y)| PathElement::new([(x, y), (x + 12, y)], BLACK));
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(err)?;
        root.present().map_err(err)?;
    }
    Ok(svg)
}

/// One curve of a risk–coverage plot: (coverage, selective risk) points, sorted by coverage.
pub struct Curve {
    pub label: String,
    pub points: Vec<(f64, f64)>,
    pub dashed: bool,
}

impl Curve {
    /// The solid risk–coverage curve of a run, labelled "`name` (AURC …)".
    pub fn of_run(name: &str, s: &Summary) -> Curve {
        Curve {
            label: format!("{name} (AURC {:.3})", s.aurc),
            points: s
                .risk_coverage
                .iter()
                .map(|p| (p.coverage, p.risk))
                .collect(),
            dashed: false,
        }
    }
}

/// Risk–coverage curves as steps, with an optional marked operating point.
pub fn risk_coverage_svg(
    curves: &[Curve],
    marker: Option<(String, (f64, f64))>,
    title: &str,
) -> Result<String> {
    let max_risk = curves
        .iter()
        .flat_map(|c| c.points.iter().map(|p| p.1))
        .chain(marker.iter().map(|m| m.1 .1))
        .fold(0.0f64, f64::max);
    let top = if max_risk > 0.0 {
        (max_risk * 1.1).clamp(0.05, 1.0)
    } else {
        0.05
    };
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, SIZE).into_drawing_area();
        root.fill(&WHITE).map_err(err)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(50)
            .build_cartesian_2d(0f64..1f64, 0f64..top)
            .map_err(err)?;
        chart
            .configure_mesh()
            .x_desc("coverage")
            .y_desc("selective risk")
            .x_labels(6)
            .y_labels(6)
            .draw()
            .map_err(err)?;
        for (i, c) in curves.iter().enumerate() {
            let color = PALETTE[i % PALETTE.len()];
            // Right-endpoint steps, as AURC integrates them: coverage in (c_{j-1}, c_j] has
            // risk r_j, from coverage 0 on.
            let mut pts = Vec::with_capacity(c.points.len() * 2);
            let mut prev_cov = 0.0;
            for &(cov, risk) in &c.points {
                pts.push((prev_cov, risk));
                pts.push((cov, risk));
                prev_cov = cov;
            }
            let style = color.stroke_width(2);
            let series = if c.dashed {
                chart.draw_series(DashedLineSeries::new(pts, 6, 4, style))
            } else {
                chart.draw_series(LineSeries::new(pts, style))
            };
            series
                .map_err(err)?
                .label(c.label.clone())
                .legend(move |(x, y)| {
                    PathElement::new([(x, y), (x + 12, y)], color.stroke_width(2))
                });
        }
        if let Some((label, (cov, risk))) = marker {
            chart
                .draw_series([Cross::new((cov, risk), 6, BLACK.stroke_width(2))])
                .map_err(err)?
                .label(label)
                .legend(|(x, y)| Cross::new((x + 6, y), 4, BLACK.stroke_width(2)));
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(err)?;
        root.present().map_err(err)?;
    }
    Ok(svg)
}

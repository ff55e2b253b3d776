//! `--plot PATH`: d2l's training figure (loss, train accuracy and test accuracy per epoch on one
//! chart), as SVG or PNG by the path's extension, rewritten after every epoch.

use std::path::{Path, PathBuf};
use std::sync::Once;

use anyhow::{Context, Result, bail};
use plotters::prelude::*;

/// One epoch's point of each curve.
#[derive(Clone, Copy, Debug)]
pub struct EpochPoint {
    pub loss: f64,
    pub train_acc: f64,
    pub test_acc: f64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Format {
    Svg,
    Png,
}

/// Checks that `path` names a format the chart can be written in (before training starts).
pub fn check_path(path: &Path) -> Result<()> {
    format_of(path).map(|_| ())
}

fn format_of(path: &Path) -> Result<Format> {
    match path
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase)
        .as_deref()
    {
        Some("svg") => Ok(Format::Svg),
        Some("png") => Ok(Format::Png),
        _ => bail!(
            "--plot {}: the chart is written as SVG or PNG, chosen by the extension (.svg or .png)",
            path.display()
        ),
    }
}

/// Text is measured (both formats) and drawn (PNG) with DejaVu Sans compiled into the program,
/// so the chart looks the same on a machine without fonts (a CI box, a container).
fn register_font() {
    static FONT: Once = Once::new();
    FONT.call_once(|| {
        plotters::style::register_font("sans-serif", FontStyle::Normal, dejavu::sans::regular())
            .unwrap_or_else(|_| panic!("the bundled DejaVu Sans is a valid font"));
    });
}

/// Writes the chart of `points` (epoch 1 first) to `path`, atomically: drawn into a temporary
/// file beside it, then renamed over it, so a watcher never sees half a picture.
pub fn write(path: &Path, total_epochs: usize, points: &[EpochPoint]) -> Result<()> {
    let format = format_of(path)?;
    let tmp = temp_path(path);
    register_font();
    let drawn = match format {
        Format::Svg => draw(
            SVGBackend::new(&tmp, (640, 420)).into_drawing_area(),
            total_epochs,
            points,
        ),
        Format::Png => draw(
            BitMapBackend::new(&tmp, (640, 420)).into_drawing_area(),
            total_epochs,
            points,
        ),
    };
    if let Err(e) = drawn {
        let _ = std::fs::remove_file(&tmp);
        return Err(e).with_context(|| format!("drawing the training chart {}", path.display()));
    }
    std::fs::rename(&tmp, path).with_context(|| {
        let _ = std::fs::remove_file(&tmp);
        format!("writing the training chart {}", path.display())
    })
}

/// A sibling of `path` with the same extension (the bitmap backend picks its encoder by it).
fn temp_path(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{}.tmp-{}.{}", name, std::process::id(), {
        path.extension().and_then(|e| e.to_str()).unwrap_or("")
    }))
}

/// A curve of the chart: its legend label, colour and value at each epoch.
type Curve = (&'static str, RGBColor, fn(&EpochPoint) -> f64);

fn draw<DB: DrawingBackend>(
    root: DrawingArea<DB, plotters::coord::Shift>,
    total_epochs: usize,
    points: &[EpochPoint],
) -> Result<()>
where
    DB::ErrorType: 'static,
{
    let err = |e: DrawingAreaErrorKind<DB::ErrorType>| anyhow::anyhow!("{e}");
    root.fill(&WHITE).map_err(err)?;
    // d2l's axes: epochs 1..n across, one y axis shared by the loss and the accuracies.
    let top = points
        .iter()
        .map(|p| p.loss)
        .filter(|l| l.is_finite())
        .fold(1.0f64, f64::max)
        * 1.05;
    let last = total_epochs.max(points.len()).max(2) as f64;
    let mut chart = ChartBuilder::on(&root)
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(44)
        .build_cartesian_2d(1.0f64..last, 0.0f64..top)
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc("epoch")
        .x_labels(total_epochs.clamp(2, 11))
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_label_formatter(&|y| format!("{y:.1}"))
        .light_line_style(WHITE.mix(0.0))
        .draw()
        .map_err(err)?;
    let curves: [Curve; 3] = [
        ("train loss", RGBColor(31, 119, 180), |p| p.loss),
        ("train acc", RGBColor(148, 103, 189), |p| p.train_acc),
        ("test acc", RGBColor(44, 160, 44), |p| p.test_acc),
    ];
    for (label, color, value) in curves {
        let series: Vec<(f64, f64)> = points
            .iter()
            .enumerate()
            .map(|(k, p)| ((k + 1) as f64, value(p)))
            .filter(|(_, y)| y.is_finite())
            .collect();
        chart
            .draw_series(LineSeries::new(series.clone(), color.stroke_width(2)))
            .map_err(err)?
            .label(label)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2))
            });
        chart
            .draw_series(
                series
                    .into_iter()
                    .map(|p| Circle::new(p, 3, color.filled())),
            )
            .map_err(err)?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK.mix(0.3))
        .draw()
        .map_err(err)?;
    root.present().map_err(err)?;
    Ok(())
}

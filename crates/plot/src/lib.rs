//! The morning progress chart: every experiment's val_bpb against its index, discarded runs
//! faint, crashed ones marked on the bottom edge, kept ones labelled, the running best as a
//! step line and, once the session has measured it, a band of ± one run's seed noise around
//! it. Drawn with plotters, as SVG (for the report) or PNG (`progress.png`).

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Once;

use plotters::coord::Shift;
use plotters::prelude::*;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Keep,
    Discard,
    Crash,
}

/// One experiment as the chart sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct Point {
    pub index: usize,
    /// `None` (or NaN/inf) when the run produced no result.
    pub val_bpb: Option<f64>,
    pub status: Status,
    /// Short description, shown next to kept points.
    pub label: String,
}

#[derive(Debug, thiserror::Error)]
pub enum PlotError {
    #[error("writing chart {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("encoding chart {} as PNG: {source}", path.display())]
    Encode {
        path: PathBuf,
        #[source]
        source: png::EncodingError,
    },
    #[error(
        "a {width}x{height} chart is too small to draw: ask for at least {MIN_WIDTH}x{MIN_HEIGHT}"
    )]
    TooSmall { width: u32, height: u32 },
    #[error("drawing the chart: {0}")]
    Draw(String),
}

/// Default size of the morning chart.
pub const WIDTH: u32 = 1600;
pub const HEIGHT: u32 = 800;
const MIN_WIDTH: u32 = 320;
const MIN_HEIGHT: u32 = 200;

/// Descriptions longer than this are cut so neighbouring labels stay readable.
const LABEL_CHARS: usize = 28;

pub const BACKGROUND: RGBColor = RGBColor(255, 255, 255);
const INK: RGBColor = RGBColor(40, 40, 40);
const MUTED: RGBColor = RGBColor(110, 110, 110);
const GRID: RGBColor = RGBColor(232, 232, 232);
pub const DISCARD: RGBColor = RGBColor(120, 120, 120);
pub const CRASH: RGBColor = RGBColor(200, 40, 40);
/// Fill of kept markers; nothing else is drawn in exactly this colour.
pub const KEPT_FILL: RGBColor = RGBColor(60, 179, 113);
const KEPT_OUTLINE: RGBColor = RGBColor(20, 90, 50);
/// The running-best step line: darker than the markers so the two can be told apart.
pub const BEST_LINE: RGBColor = RGBColor(46, 139, 87);

/// A session's chart: its points, a title, and the seed noise when the session has one.
#[derive(Debug, Clone, Copy)]
pub struct Chart<'a> {
    pub points: &'a [Point],
    pub title: &'a str,
    /// One run's seed noise: the band around the running best.
    pub sigma: Option<f64>,
}

/// A chart drawn into memory: `rgb` holds `width * height` pixels, row-major, 3 bytes each,
/// and `frame` maps data to pixels.
pub struct Bitmap {
    pub width: u32,
    pub height: u32,
    pub rgb: Vec<u8>,
    pub frame: Frame,
}

impl Bitmap {
    /// The colour of pixel (x, y).
    pub fn pixel(&self, x: u32, y: u32) -> RGBColor {
        let at = (y as usize * self.width as usize + x as usize) * 3;
        RGBColor(self.rgb[at], self.rgb[at + 1], self.rgb[at + 2])
    }
}

/// Where the data went: the plotting area in pixels and the data ranges it shows.
#[derive(Debug, Clone, PartialEq)]
pub struct Frame {
    pub x_range: Range<i64>,
    pub y_range: Range<f64>,
    /// Pixels of (x_range.start, y_range.start) and (x_range.end, y_range.end).
    low: (i32, i32),
    high: (i32, i32),
}

impl Frame {
    /// The pixel of a data point; values above the range sit on the top edge, where their
    /// marker is drawn.
    pub fn to_pixel(&self, index: usize, val_bpb: f64) -> (u32, u32) {
        let fx = (index as f64 - self.x_range.start as f64)
            / (self.x_range.end - self.x_range.start) as f64;
        let v = val_bpb.clamp(self.y_range.start, self.y_range.end);
        let fy = (v - self.y_range.start) / (self.y_range.end - self.y_range.start);
        let lerp = |a: i32, b: i32, f: f64| (a as f64 + f * (b - a) as f64).round() as u32;
        (
            lerp(self.low.0, self.high.0, fx),
            lerp(self.low.1, self.high.1, fy),
        )
    }

    pub fn is_off_top(&self, val_bpb: f64) -> bool {
        val_bpb > self.y_range.end
    }
}

impl Chart<'_> {
    /// The chart as an SVG document (text as text: the viewer's sans-serif renders it).
    pub fn svg(&self, width: u32, height: u32) -> Result<String, PlotError> {
        check_size(width, height)?;
        let mut out = String::new();
        {
            let root = SVGBackend::with_string(&mut out, (width, height)).into_drawing_area();
            self.draw(&root)?;
            root.present().map_err(draw_err)?;
        }
        Ok(out)
    }

    /// The chart drawn into an RGB buffer.
    pub fn bitmap(&self, width: u32, height: u32) -> Result<Bitmap, PlotError> {
        check_size(width, height)?;
        let mut rgb = vec![0u8; width as usize * height as usize * 3];
        let frame = {
            let root = BitMapBackend::with_buffer(&mut rgb, (width, height)).into_drawing_area();
            let frame = self.draw(&root)?;
            root.present().map_err(draw_err)?;
            frame
        };
        Ok(Bitmap {
            width,
            height,
            rgb,
            frame,
        })
    }

    /// Draws at the default 1600x800 and writes a PNG to `path`.
    pub fn write_png(&self, path: &Path) -> Result<(), PlotError> {
        self.write_png_sized(path, WIDTH, HEIGHT)
    }

    pub fn write_png_sized(&self, path: &Path, width: u32, height: u32) -> Result<(), PlotError> {
        let bitmap = self.bitmap(width, height)?;
        let io = |source| PlotError::Io {
            path: path.to_path_buf(),
            source,
        };
        let encode = |source| PlotError::Encode {
            path: path.to_path_buf(),
            source,
        };
        let mut out = std::io::BufWriter::new(std::fs::File::create(path).map_err(io)?);
        let mut encoder = png::Encoder::new(&mut out, width, height);
        encoder.set_color(png::ColorType::Rgb);
        encoder.set_depth(png::BitDepth::Eight);
        let mut writer = encoder.write_header().map_err(encode)?;
        writer.write_image_data(&bitmap.rgb).map_err(encode)?;
        writer.finish().map_err(encode)?;
        std::io::Write::flush(&mut out).map_err(io)
    }

    /// The val_bpb range shown: from a little below the best to a little above the baseline.
    pub fn y_range(&self) -> Range<f64> {
        y_range(self.points)
    }

    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> Result<Frame, PlotError> {
        register_font();
        let mut sorted: Vec<&Point> = self.points.iter().collect();
        sorted.sort_by_key(|p| p.index);
        let kept: Vec<(i64, f64, &str)> = sorted
            .iter()
            .filter(|p| p.status == Status::Keep)
            .filter_map(|p| plotted_value(p).map(|v| (p.index as i64, v, p.label.as_str())))
            .collect();
        let x = x_range(self.points);
        let y = y_range(self.points);

        root.fill(&BACKGROUND).map_err(draw_err)?;
        let area = root
            .titled(self.title, ("sans-serif", 26).into_font().color(&INK))
            .map_err(draw_err)?;
        let mut chart = ChartBuilder::on(&area)
            .caption(
                summary(self.points, &kept),
                ("sans-serif", 16).into_font().color(&MUTED),
            )
            .margin(16)
            .x_label_area_size(48)
            .y_label_area_size(90)
            .build_cartesian_2d(x.clone(), y.clone())
            .map_err(draw_err)?;
        let decimals = y_decimals(y.end - y.start);
        chart
            .configure_mesh()
            .x_desc("experiment")
            .y_desc("val_bpb (lower is better)")
            .y_label_formatter(&|v| format!("{v:.decimals$}"))
            .x_labels(10)
            .y_labels(8)
            .light_line_style(BACKGROUND)
            .bold_line_style(GRID)
            .axis_desc_style(("sans-serif", 16).into_font().color(&INK))
            .label_style(("sans-serif", 14).into_font().color(&INK))
            .draw()
            .map_err(draw_err)?;

        if self.points.is_empty() {
            let (w, h) = area.dim_in_pixel();
            area.draw(&Text::new(
                "no experiments yet",
                (w as i32 / 2 - 80, h as i32 / 2),
                ("sans-serif", 20).into_font().color(&MUTED),
            ))
            .map_err(draw_err)?;
        }

        let last = sorted.last().map_or(0, |p| p.index as i64);
        let steps = best_steps(&kept, last);
        if let Some(sigma) = self.sigma.filter(|s| s.is_finite() && *s > 0.0) {
            let bands = steps
                .windows(2)
                .filter(|w| w[0].1 == w[1].1 && w[0].0 < w[1].0);
            chart
                .draw_series(bands.map(|w| {
                    let (b, top) = ((w[0].1 - sigma).max(y.start), (w[0].1 + sigma).min(y.end));
                    Rectangle::new([(w[0].0, top), (w[1].0, b)], BEST_LINE.mix(0.12).filled())
                }))
                .map_err(draw_err)?
                .label(format!("best ± σ (σ = {sigma:.4})"))
                .legend(|(x, y)| {
                    Rectangle::new([(x, y - 5), (x + 16, y + 5)], BEST_LINE.mix(0.12).filled())
                });
        }

        // Discards first and faint, so the kept story reads on top of them.
        let discards: Vec<(i64, f64)> = sorted
            .iter()
            .filter(|p| p.status == Status::Discard)
            .filter_map(|p| plotted_value(p).map(|v| (p.index as i64, v)))
            .collect();
        if !discards.is_empty() {
            chart
                .draw_series(
                    discards
                        .into_iter()
                        .map(|(i, v)| -> DynElement<DB, (i64, f64)> {
                            if v > y.end {
                                TriangleMarker::new((i, y.end), 6, DISCARD.filled()).into_dyn()
                            } else {
                                Circle::new((i, v), 3, DISCARD.mix(0.45).filled()).into_dyn()
                            }
                        }),
                )
                .map_err(draw_err)?
                .label("discarded")
                .legend(|(x, y)| Circle::new((x + 8, y), 3, DISCARD.mix(0.45).filled()));
        }

        let crashes: Vec<i64> = sorted
            .iter()
            .filter(|p| plotted_value(p).is_none())
            .map(|p| p.index as i64)
            .collect();
        if !crashes.is_empty() {
            chart
                .draw_series(
                    crashes
                        .iter()
                        .map(|&i| Cross::new((i, y.start), 5, CRASH.stroke_width(2))),
                )
                .map_err(draw_err)?
                .label("crashed (no result)")
                .legend(|(x, y)| Cross::new((x + 8, y), 5, CRASH.stroke_width(2)));
        }

        if !steps.is_empty() {
            chart
                .draw_series(LineSeries::new(steps.clone(), BEST_LINE.stroke_width(3)))
                .map_err(draw_err)?
                .label("running best")
                .legend(|(x, y)| {
                    PathElement::new([(x, y), (x + 16, y)], BEST_LINE.stroke_width(3))
                });
        }

        // Each label takes the first spot beside its point, above or below, that overlaps
        // no label placed before it and stays inside the plot; a label with no such spot is
        // left out (the report's table has every description).
        let label_font = ("sans-serif", 13).into_font().color(&INK);
        let (px, py) = chart.plotting_area().get_pixel_range();
        let mut placed: Vec<[i32; 4]> = Vec::new();
        let mut labels = Vec::new();
        for &(i, v, label) in kept.iter().filter(|k| !k.2.trim().is_empty()) {
            let text = short_label(label);
            let at = (i, v.min(y.end));
            let (x0, y0) = chart.backend_coord(&at);
            let w = 7 * text.chars().count() as i32;
            let spot = [-22, 10, -38, 26].into_iter().find_map(|dy| {
                let r = [x0 + 8, y0 + dy, x0 + 8 + w, y0 + dy + 15];
                let inside =
                    r[0] >= px.start && r[2] <= px.end && r[1] >= py.start && r[3] <= py.end;
                let free = placed
                    .iter()
                    .all(|p| r[2] <= p[0] || p[2] <= r[0] || r[3] <= p[1] || p[3] <= r[1]);
                (inside && free).then_some((r, dy))
            });
            if let Some((r, dy)) = spot {
                placed.push(r);
                labels.push(EmptyElement::at(at) + Text::new(text, (8, dy), label_font.clone()));
            }
        }
        chart.draw_series(labels).map_err(draw_err)?;
        if !kept.is_empty() {
            chart
                .draw_series(kept.iter().map(|&(i, v, _)| {
                    EmptyElement::at((i, v.min(y.end)))
                        + Circle::new((0, 0), 6, KEPT_FILL.filled())
                        + Circle::new((0, 0), 6, KEPT_OUTLINE.stroke_width(1))
                }))
                .map_err(draw_err)?
                .label("kept")
                .legend(|(x, y)| Circle::new((x + 8, y), 6, KEPT_FILL.filled()));
        }

        if !self.points.is_empty() {
            // Lower left is the emptiest corner: every result lies on or above the running
            // best, which starts at the top left.
            chart
                .configure_series_labels()
                .position(SeriesLabelPosition::LowerLeft)
                .background_style(BACKGROUND.mix(0.9))
                .border_style(MUTED)
                .label_font(("sans-serif", 14).into_font().color(&INK))
                .draw()
                .map_err(draw_err)?;
        }

        Ok(Frame {
            low: chart.backend_coord(&(x.start, y.start)),
            high: chart.backend_coord(&(x.end, y.end)),
            x_range: x,
            y_range: y,
        })
    }
}

fn check_size(width: u32, height: u32) -> Result<(), PlotError> {
    if width < MIN_WIDTH || height < MIN_HEIGHT {
        return Err(PlotError::TooSmall { width, height });
    }
    Ok(())
}

fn draw_err(e: impl std::fmt::Display) -> PlotError {
    PlotError::Draw(e.to_string())
}

/// Text is laid out with an embedded font, so the PNG is the same on every machine (and on
/// one without fonts).
fn register_font() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let registered = plotters::style::register_font(
            "sans-serif",
            FontStyle::Normal,
            dejavu::sans::regular(),
        );
        assert!(registered.is_ok(), "the embedded DejaVu Sans parses");
    });
}

/// The val_bpb of a point if it should be drawn at all: crashes and non-finite values
/// are counted but never plotted.
fn plotted_value(p: &Point) -> Option<f64> {
    match p.status {
        Status::Crash => None,
        Status::Keep | Status::Discard => p.val_bpb.filter(|v| v.is_finite()),
    }
}

/// The running best as a step line: flat at each best until the next kept result, then down
/// to it; flat out to the last experiment.
fn best_steps(kept: &[(i64, f64, &str)], last: i64) -> Vec<(i64, f64)> {
    let mut steps: Vec<(i64, f64)> = Vec::new();
    let mut best = f64::INFINITY;
    for &(i, v, _) in kept {
        if v >= best {
            continue;
        }
        if let Some(&(_, prev)) = steps.last() {
            steps.push((i, prev));
        }
        steps.push((i, v));
        best = v;
    }
    if let Some(&(i, v)) = steps.last()
        && last > i
    {
        steps.push((last, v));
    }
    steps
}

/// From a little below the best value to a little above the baseline (the first kept
/// result), so a few wildly bad discards don't squash the curve we care about; those are
/// drawn on the top edge instead.
fn y_range(points: &[Point]) -> Range<f64> {
    let mut in_order: Vec<&Point> = points.iter().collect();
    in_order.sort_by_key(|p| p.index);
    let first = |status: Option<Status>| {
        in_order
            .iter()
            .filter(|p| status.is_none_or(|s| p.status == s))
            .find_map(|p| plotted_value(p))
    };
    // Without any kept result the first plotted one plays the baseline.
    let Some(baseline) = first(Some(Status::Keep)).or_else(|| first(None)) else {
        return 0.0..1.0;
    };
    let lowest = points
        .iter()
        .filter_map(plotted_value)
        .fold(baseline, f64::min);
    let mut span = baseline - lowest;
    let (mut lo, mut hi) = (lowest, baseline);
    // Identical values: invent a span proportional to the value so ticks still work.
    if !span.is_finite() || span < lowest.abs().max(1.0) * 1e-9 {
        span = (lowest.abs() * 0.02).clamp(1e-3, 1e300);
        lo -= span / 2.0;
        hi += span / 2.0;
    }
    // Headroom on top for labels; room below for crash markers.
    let (lo, hi) = (lo - span * 0.08, hi + span * 0.12);
    if lo.is_finite() && hi.is_finite() && lo < hi {
        lo..hi
    } else {
        -1.0..1.0
    }
}

fn x_range(points: &[Point]) -> Range<i64> {
    let index = |p: &Point| p.index.min(i64::MAX as usize / 2) as i64;
    let lo = points.iter().map(index).min().unwrap_or(0);
    let hi = points.iter().map(index).max().unwrap_or(0);
    // Padding (at least one index) so edge points don't sit on the axes.
    let pad = ((hi - lo) / 50).max(1);
    lo - pad..hi + pad
}

/// Enough decimals to tell neighbouring ticks apart, and at least 3: val_bpb differences
/// that matter live in the third decimal.
fn y_decimals(span: f64) -> usize {
    let step = span / 8.0;
    ((-step.log10()).ceil() as i64 + 1).clamp(3, 8) as usize
}

/// The subtitle: "126 experiments, 23 kept, 1 crashed, best 0.969686".
fn summary(points: &[Point], kept: &[(i64, f64, &str)]) -> String {
    let n = points.len();
    let mut s = format!(
        "{n} experiment{}, {} kept",
        if n == 1 { "" } else { "s" },
        kept.len()
    );
    let crashed = points.iter().filter(|p| plotted_value(p).is_none()).count();
    if crashed > 0 {
        s += &format!(", {crashed} crashed");
    }
    if let Some(best) = kept.iter().map(|k| k.1).reduce(f64::min) {
        s += &format!(", best {best:.6}");
    }
    s
}

/// Cuts a description to `LABEL_CHARS`, marking the cut with "...".
fn short_label(label: &str) -> String {
    let label = label.trim();
    if label.chars().count() <= LABEL_CHARS {
        return label.to_string();
    }
    let mut s: String = label.chars().take(LABEL_CHARS - 3).collect();
    s.truncate(s.trim_end().len());
    s + "..."
}

#[cfg(test)]
mod tests;

//! The morning progress chart: every experiment's val_bpb against its index, with the
//! kept ones labelled and the running best drawn as a step line, rendered to a PNG.
//!
//! Drawing is done by hand on an RGB buffer (see `canvas`) so the only dependencies are
//! a PNG encoder and a bitmap font.

mod canvas;
mod layout;

use std::fmt;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use canvas::{CELL, Canvas, Rgb, text_width};
use layout::{GAP, TICK_LEN, plotted_value};
pub use layout::{Layout, layout};

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

/// A rendered chart: `rgb` holds `width * height` pixels, row-major, 3 bytes each.
#[derive(Clone, PartialEq, Eq)]
pub struct Chart {
    pub width: u32,
    pub height: u32,
    pub rgb: Vec<u8>,
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
}

/// Default size of the morning chart.
pub const WIDTH: u32 = 1600;
pub const HEIGHT: u32 = 800;

/// Descriptions longer than this are cut so neighbouring labels stay readable.
const LABEL_CHARS: usize = 28;

const BACKGROUND: Rgb = [255, 255, 255];
const INK: Rgb = [40, 40, 40];
const MUTED: Rgb = [110, 110, 110];
const AXIS: Rgb = [90, 90, 90];
const GRID: Rgb = [228, 228, 228];
const DISCARD: Rgb = [120, 120, 120];
/// Fill of kept markers; nothing else is drawn in exactly this colour.
pub const KEPT_FILL: Rgb = [60, 179, 113];
const KEPT_OUTLINE: Rgb = [20, 90, 50];
/// The running-best step line: a darker green than the markers so the two can be told apart.
pub const BEST_LINE: Rgb = [46, 139, 87];

impl Chart {
    /// The colour of pixel (x, y). Panics if the pixel is outside the chart.
    pub fn pixel(&self, x: u32, y: u32) -> [u8; 3] {
        assert!(
            x < self.width && y < self.height,
            "pixel ({x}, {y}) is outside the {}x{} chart",
            self.width,
            self.height
        );
        let at = (y as usize * self.width as usize + x as usize) * 3;
        [self.rgb[at], self.rgb[at + 1], self.rgb[at + 2]]
    }

    pub fn write_png(&self, path: &Path) -> Result<(), PlotError> {
        let io = |source| PlotError::Io {
            path: path.to_path_buf(),
            source,
        };
        let encode = |source| PlotError::Encode {
            path: path.to_path_buf(),
            source,
        };
        let mut out = BufWriter::new(File::create(path).map_err(io)?);
        let mut encoder = png::Encoder::new(&mut out, self.width, self.height);
        encoder.set_color(png::ColorType::Rgb);
        encoder.set_depth(png::BitDepth::Eight);
        let mut writer = encoder.write_header().map_err(encode)?;
        writer.write_image_data(&self.rgb).map_err(encode)?;
        writer.finish().map_err(encode)?;
        out.flush().map_err(io)
    }
}

impl fmt::Debug for Chart {
    // The pixel buffer is megabytes of noise in a debug print; show the size only.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Chart({}x{})", self.width, self.height)
    }
}

/// Renders the chart at the default 1600x800 and writes it to `path`.
pub fn render_png(points: &[Point], title: &str, path: &Path) -> Result<(), PlotError> {
    render(points, title, WIDTH, HEIGHT).write_png(path)
}

/// As [`render_png`], with the noise band: the running best ± `sigma` (one run's seed noise).
pub fn render_png_with_noise(
    points: &[Point],
    title: &str,
    sigma: Option<f64>,
    path: &Path,
) -> Result<(), PlotError> {
    render_with_noise(points, title, sigma, WIDTH, HEIGHT).write_png(path)
}

pub fn render(points: &[Point], title: &str, width: u32, height: u32) -> Chart {
    render_with_noise(points, title, None, width, height)
}

/// The chart; with `sigma`, a faint band of ± σ around the running best shows which results
/// lie within the noise of it.
pub fn render_with_noise(
    points: &[Point],
    title: &str,
    sigma: Option<f64>,
    width: u32,
    height: u32,
) -> Chart {
    let lay = layout(points, width, height);
    let mut c = Canvas::new(width, height, BACKGROUND);

    let mut sorted: Vec<&Point> = points.iter().collect();
    sorted.sort_by_key(|p| p.index);
    let kept: Vec<(&Point, f64)> = sorted
        .iter()
        .filter(|p| p.status == Status::Keep)
        .filter_map(|p| plotted_value(p).map(|v| (*p, v)))
        .collect();
    let plotted = sorted.iter().filter(|p| plotted_value(p).is_some()).count();
    let off_top = sorted
        .iter()
        .filter(|p| plotted_value(p).is_some_and(|v| lay.is_off_top(v)))
        .count();

    draw_axes(&mut c, &lay);
    draw_titles(&mut c, &lay, title, &summary(points, &kept));

    // Discards first and faint, so the kept story reads on top of them.
    for p in &sorted {
        if p.status != Status::Discard {
            continue;
        }
        if let Some(v) = plotted_value(p) {
            draw_point_or_clip_marker(&mut c, &lay, p.index, v, DISCARD, |c, x, y| {
                c.disc(x, y, 3.0, DISCARD, 0.4)
            });
        }
    }

    let steps = best_steps(&lay, &kept, sorted.last().map_or(0, |p| p.index));
    if let Some(sigma) = sigma.filter(|s| s.is_finite() && *s > 0.0) {
        let px = (sigma * lay.y_scale()).round() as i64;
        for s in &steps {
            if let Segment::H { x0, x1, y } = *s {
                c.fill_rect(x0, y - px, x1, y + px, BEST_LINE, 0.12);
            }
        }
    }
    for s in &steps {
        match *s {
            Segment::H { x0, x1, y } => c.hline(x0, x1, y, 3, BEST_LINE, 1.0),
            Segment::V { x, y0, y1 } => c.vline(x, y0, y1, 3, BEST_LINE, 1.0),
        }
    }

    let legend = (plotted > 0).then(|| {
        let ink = ink(&lay, &sorted, &steps);
        draw_legend(&mut c, &lay, off_top, &ink)
    });
    draw_labels(&mut c, &lay, &sorted, &kept, &steps, legend);

    // Kept markers last so no label or line ever hides one.
    for &(p, v) in &kept {
        draw_point_or_clip_marker(&mut c, &lay, p.index, v, KEPT_OUTLINE, |c, x, y| {
            c.disc(x, y, 6.5, KEPT_OUTLINE, 1.0);
            c.disc(x, y, 5.0, KEPT_FILL, 1.0);
        });
    }

    if plotted == 0 {
        let msg = if points.is_empty() {
            "no experiments yet".to_string()
        } else {
            format!("no results yet ({} crashed)", points.len())
        };
        let s = lay.big_text;
        let x = (lay.left + lay.right - text_width(&msg, s)) / 2.0;
        let y = (lay.top + lay.bottom - CELL * s) / 2.0;
        c.text(x, y, &msg, s, MUTED, false);
    }

    Chart {
        width,
        height,
        rgb: c.rgb,
    }
}

/// The subtitle: "126 experiments, 23 kept, 1 crashed, best 0.969686".
fn summary(points: &[Point], kept: &[(&Point, f64)]) -> String {
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
    if let Some(best) = kept.iter().map(|&(_, v)| v).reduce(f64::min) {
        s += &format!(", best {best:.6}");
    }
    s
}

/// Draws `draw` at the point's pixel, or a small triangle on the top edge when the value
/// is above the visible range.
fn draw_point_or_clip_marker(
    c: &mut Canvas,
    lay: &Layout,
    index: usize,
    v: f64,
    clip_color: Rgb,
    draw: impl FnOnce(&mut Canvas, i64, i64),
) {
    let (x, y) = lay.to_pixel(index, v);
    if lay.is_off_top(v) {
        c.up_triangle(i64::from(x), lay.top as i64 + 1, 6, clip_color, 0.8);
    } else {
        draw(c, i64::from(x), i64::from(y));
    }
}

fn draw_axes(c: &mut Canvas, lay: &Layout) {
    let (l, t, r, b) = (
        lay.left as i64,
        lay.top as i64,
        lay.right as i64,
        lay.bottom as i64,
    );
    let s = lay.big_text;

    for (v, label) in &lay.y_ticks {
        let y = lay.y_to_canvas(*v).round() as i64;
        c.hline(l + 1, r, y, 1, GRID, 1.0);
        c.hline(l - TICK_LEN as i64, l, y, 1, AXIS, 1.0);
        let x = lay.left - TICK_LEN - GAP / 2.0 - text_width(label, s);
        c.text(x, y as f64 - CELL * s / 2.0, label, s, INK, false);
    }
    for &i in &lay.x_ticks {
        let x = lay.x_to_canvas(i as f64).round() as i64;
        c.vline(x, t, b - 1, 1, GRID, 0.5);
        c.vline(x, b, b + TICK_LEN as i64, 1, AXIS, 1.0);
        let label = i.to_string();
        let tx = x as f64 - text_width(&label, s) / 2.0;
        c.text(tx, lay.bottom + TICK_LEN + GAP / 2.0, &label, s, INK, false);
    }
    c.vline(l, t, b, 1, AXIS, 1.0);
    c.hline(l, r, b, 1, AXIS, 1.0);

    let name = "experiment #";
    let x = (lay.left + lay.right - text_width(name, s)) / 2.0;
    let y = lay.bottom + TICK_LEN + GAP + CELL * s + GAP;
    c.text(x, y, name, s, INK, false);

    // The rotated name must fit the plot's height: shrink it, then shorten it.
    let height = lay.bottom - lay.top;
    let (name, s) = [s, lay.small_text, 1.0]
        .into_iter()
        .map(|s| ("val_bpb (lower is better)", s))
        .find(|&(name, s)| text_width(name, s) <= height)
        .unwrap_or(("val_bpb", 1.0));
    let y = (lay.top + lay.bottom + text_width(name, s)) / 2.0;
    c.text(GAP, y, name, s, INK, true);
}

fn draw_titles(c: &mut Canvas, lay: &Layout, title: &str, subtitle: &str) {
    let s = lay.big_text;
    let y = GAP * 1.5;
    let x = title_x(c, lay, title, s);
    // Drawn twice a pixel apart: a cheap bold for the bitmap font.
    c.text(x, y, title, s, INK, false);
    c.text(x + 1.0, y, title, s, INK, false);
    let x = title_x(c, lay, subtitle, s);
    c.text(x, y + CELL * s + GAP, subtitle, s, MUTED, false);
}

/// Centred over the plot area, but nudged left if that would run off the canvas.
fn title_x(c: &Canvas, lay: &Layout, text: &str, s: f64) -> f64 {
    let w = text_width(text, s);
    let centred = (lay.left + lay.right - w) / 2.0;
    centred.min(f64::from(c.width) - GAP - w).max(GAP)
}

#[derive(Debug, Clone, Copy)]
enum Segment {
    H { x0: i64, x1: i64, y: i64 },
    V { x: i64, y0: i64, y1: i64 },
}

/// The running best as horizontal/vertical segments: flat until a kept result beats it,
/// then a drop, extended flat to the last experiment so the current best reads at a glance.
fn best_steps(lay: &Layout, kept: &[(&Point, f64)], last_index: usize) -> Vec<Segment> {
    let mut out = Vec::new();
    let Some(&(first, v0)) = kept.first() else {
        return out;
    };
    let px = |i: usize, v: f64| {
        let (x, y) = lay.to_pixel(i, v);
        (i64::from(x), i64::from(y))
    };
    let (mut x, mut y) = px(first.index, v0);
    let mut best = v0;
    // Kept results that merely tie the best (a simplification, say) don't move the line.
    for &(p, v) in &kept[1..] {
        if v < best {
            best = v;
            let (nx, ny) = px(p.index, v);
            out.push(Segment::H { x0: x, x1: nx, y });
            out.push(Segment::V {
                x: nx,
                y0: y,
                y1: ny,
            });
            (x, y) = (nx, ny);
        }
    }
    let (end, _) = px(last_index.max(first.index), best);
    out.push(Segment::H { x0: x, x1: end, y });
    out
}

/// Axis-aligned box in canvas pixels.
#[derive(Debug, Clone, Copy)]
struct Rect {
    x0: f64,
    y0: f64,
    x1: f64,
    y1: f64,
}

impl Rect {
    fn around(x: f64, y: f64, r: f64) -> Rect {
        Rect {
            x0: x,
            y0: y,
            x1: x,
            y1: y,
        }
        .grown(r)
    }

    fn area(&self) -> f64 {
        (self.x1 - self.x0).max(0.0) * (self.y1 - self.y0).max(0.0)
    }

    fn overlap(&self, o: &Rect) -> f64 {
        let w = self.x1.min(o.x1) - self.x0.max(o.x0);
        let h = self.y1.min(o.y1) - self.y0.max(o.y0);
        w.max(0.0) * h.max(0.0)
    }

    /// Roughly how many pixels of the segment a-b lie inside the box.
    fn length_inside(&self, a: (f64, f64), b: (f64, f64)) -> f64 {
        let len = (b.0 - a.0).hypot(b.1 - a.1);
        let steps = len.ceil().max(1.0) as usize;
        (0..=steps)
            .map(|i| i as f64 / steps as f64)
            .map(|t| (a.0 + (b.0 - a.0) * t, a.1 + (b.1 - a.1) * t))
            .filter(|&(x, y)| self.contains(x, y))
            .count() as f64
            * len
            / steps as f64
    }

    fn grown(&self, by: f64) -> Rect {
        Rect {
            x0: self.x0 - by,
            y0: self.y0 - by,
            x1: self.x1 + by,
            y1: self.y1 + by,
        }
    }

    fn contains(&self, x: f64, y: f64) -> bool {
        (self.x0..=self.x1).contains(&x) && (self.y0..=self.y1).contains(&y)
    }

    /// The point of the box nearest to (x, y): where a leader line should end.
    fn nearest(&self, x: f64, y: f64) -> (f64, f64) {
        (x.clamp(self.x0, self.x1), y.clamp(self.y0, self.y1))
    }

    fn distance(&self, x: f64, y: f64) -> f64 {
        let (nx, ny) = self.nearest(x, y);
        (nx - x).hypot(ny - y)
    }
}

/// Where the data is drawn, as (x, y, weight) samples: what the legend must not hide.
fn ink(lay: &Layout, sorted: &[&Point], steps: &[Segment]) -> Vec<(f64, f64, f64)> {
    let mut out = Vec::new();
    for p in sorted {
        if let Some(v) = plotted_value(p) {
            let (x, y) = lay.to_pixel(p.index, v);
            let weight = if p.status == Status::Keep { 10.0 } else { 1.0 };
            out.push((f64::from(x), f64::from(y), weight));
        }
    }
    for seg in steps {
        let (x0, y0, x1, y1) = match *seg {
            Segment::H { x0, x1, y } => (x0, y, x1, y),
            Segment::V { x, y0, y1 } => (x, y0, x, y1),
        };
        let n = (x1 - x0).abs().max((y1 - y0).abs()) / 4 + 1;
        for i in 0..=n {
            let t = i as f64 / n as f64;
            let x = x0 as f64 + (x1 - x0) as f64 * t;
            let y = y0 as f64 + (y1 - y0) as f64 * t;
            out.push((x, y, 2.0));
        }
    }
    out
}

/// The legend, in whichever corner of the plot area hides the least data (top-right
/// when that is free, as it usually is for a falling curve); returns its box so labels
/// avoid it.
fn draw_legend(c: &mut Canvas, lay: &Layout, off_top: usize, ink: &[(f64, f64, f64)]) -> Rect {
    let s = lay.small_text;
    let line = CELL * s + GAP;
    let clipped = format!("above range ({off_top})");
    let mut entries = vec!["kept", "discarded", "running best"];
    if off_top > 0 {
        entries.push(&clipped);
    }
    let swatch = 28.0;
    let text_w = entries.iter().map(|e| text_width(e, s)).fold(0.0, f64::max);
    let w = GAP + swatch + GAP + text_w + GAP;
    let h = GAP + line * entries.len() as f64;
    let (left, right) = (lay.left + GAP, lay.right - GAP - w);
    let (top, bottom) = (lay.top + GAP, lay.bottom - GAP - h);
    let corners = [(right, top), (left, top), (right, bottom), (left, bottom)];
    // Data within a small margin of the box counts too: a point peeking out is still hidden.
    let hidden = |&(x0, y0): &(f64, f64)| -> f64 {
        let near = Rect {
            x0,
            y0,
            x1: x0 + w,
            y1: y0 + h,
        }
        .grown(GAP);
        ink.iter()
            .filter(|&&(x, y, _)| near.contains(x, y))
            .map(|&(_, _, weight)| weight)
            .sum()
    };
    let (x0, y0) = corners
        .into_iter()
        .enumerate()
        .min_by(|(i, a), (j, b)| {
            // Earlier corners win ties (and near-ties) so the legend doesn't wander.
            let (ca, cb) = (hidden(a) + *i as f64, hidden(b) + *j as f64);
            ca.total_cmp(&cb)
        })
        .map(|(_, corner)| corner)
        .unwrap_or((right, top));
    let bx = Rect {
        x0,
        y0,
        x1: x0 + w,
        y1: y0 + h,
    };
    c.fill_rect(
        x0 as i64,
        y0 as i64,
        bx.x1 as i64,
        bx.y1 as i64,
        BACKGROUND,
        0.9,
    );
    for (x, y) in [(bx.x0, bx.y0), (bx.x1, bx.y1)] {
        c.hline(bx.x0 as i64, bx.x1 as i64, y as i64, 1, GRID, 1.0);
        c.vline(x as i64, bx.y0 as i64, bx.y1 as i64, 1, GRID, 1.0);
    }
    for (k, entry) in entries.iter().enumerate() {
        let ty = y0 + GAP + k as f64 * line;
        let cy = (ty + CELL * s / 2.0) as i64;
        let cx = (x0 + GAP + swatch / 2.0) as i64;
        match k {
            0 => {
                c.disc(cx, cy, 6.5, KEPT_OUTLINE, 1.0);
                c.disc(cx, cy, 5.0, KEPT_FILL, 1.0);
            }
            1 => c.disc(cx, cy, 3.0, DISCARD, 0.4),
            2 => c.hline(cx - 12, cx + 12, cy, 3, BEST_LINE, 1.0),
            _ => c.up_triangle(cx, cy - 3, 6, DISCARD, 0.8),
        }
        c.text(x0 + GAP + swatch + GAP, ty, entry, s, INK, false);
    }
    bx
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

/// Labels the kept points. Each label tries a list of spots around its point (beside,
/// then below/above in successively further tiers) and takes the one that covers the
/// least of what is already there: other labels, markers and the legend count a lot
/// (any touch at all is penalised), the step line some, faint discarded dots a little.
/// Far-off spots get a leader line back to the point.
fn draw_labels(
    c: &mut Canvas,
    lay: &Layout,
    sorted: &[&Point],
    kept: &[(&Point, f64)],
    steps: &[Segment],
    legend: Option<Rect>,
) {
    let s = lay.small_text;
    let pad = 2.0;
    let markers: Vec<(f64, f64)> = kept
        .iter()
        .map(|&(p, v)| lay.to_pixel(p.index, v))
        .map(|(x, y)| (f64::from(x), f64::from(y)))
        .collect();
    let mut obstacles: Vec<Obstacle> = Vec::new();
    if let Some(l) = legend {
        obstacles.push(Obstacle::solid(l, 1000.0));
    }
    for &(x, y) in &markers {
        obstacles.push(Obstacle::solid(Rect::around(x, y, 7.5), 300.0));
    }
    // The step line goes in as short pieces, so hiding more of it costs more.
    const PIECE: i64 = 10;
    for seg in steps {
        let (horizontal, fixed, a, b) = match *seg {
            Segment::H { x0, x1, y } => (true, y, x0.min(x1), x0.max(x1)),
            Segment::V { x, y0, y1 } => (false, x, y0.min(y1), y0.max(y1)),
        };
        for start in (a..=b).step_by(PIECE as usize) {
            let (lo, hi, f) = (start as f64, (start + PIECE).min(b) as f64, fixed as f64);
            let r = if horizontal {
                Rect {
                    x0: lo,
                    y0: f - 1.5,
                    x1: hi,
                    y1: f + 1.5,
                }
            } else {
                Rect {
                    x0: f - 1.5,
                    y0: lo,
                    x1: f + 1.5,
                    y1: hi,
                }
            };
            obstacles.push(Obstacle::solid(r, 80.0));
        }
    }
    for p in sorted.iter().filter(|p| p.status == Status::Discard) {
        if let Some(v) = plotted_value(p).filter(|&v| !lay.is_off_top(v)) {
            let (x, y) = lay.to_pixel(p.index, v);
            obstacles.push(Obstacle {
                rect: Rect::around(f64::from(x), f64::from(y), 3.0),
                touch: 0.0,
                cover: 4.0,
            });
        }
    }

    // Placed labels (box, text) and their leader lines, drawn once all are placed.
    let mut placed: Vec<(Rect, String)> = Vec::new();
    let mut leaders: Vec<((f64, f64), (f64, f64))> = Vec::new();
    for &(p, v) in kept {
        let text = short_label(&p.label);
        if text.is_empty() || lay.is_off_top(v) {
            continue;
        }
        let (px, py) = lay.to_pixel(p.index, v);
        let (px, py) = (f64::from(px), f64::from(py));
        let w = text_width(&text, s) + 2.0 * pad;
        let h = CELL * s + 2.0 * pad;
        let near = 9.0;
        // Only spots further than this from the point need a leader line.
        let leader_for = |r: &Rect| {
            let end = r.nearest(px, py);
            ((end.0 - px).hypot(end.1 - py) > near + 4.0).then_some(((px, py), end))
        };

        let mut best: Option<(f64, Rect)> = None;
        for (k, (dx, dy)) in candidate_offsets(w, h, near).into_iter().enumerate() {
            let Some(r) = fit_inside(lay, px + dx, py + dy, w, h) else {
                continue;
            };
            let covered: f64 = obstacles.iter().map(|o| o.cost(&r)).sum();
            // Leader lines through text (ours through others' or theirs through ours).
            let crossed: f64 = leaders
                .iter()
                .map(|&(a, b)| r.length_inside(a, b))
                .sum::<f64>()
                + leader_for(&r).map_or(0.0, |(a, b)| {
                    placed.iter().map(|(o, _)| o.length_inside(a, b)).sum()
                });
            // A label nearer to another kept point than to its own reads as that one's.
            let own = r.distance(px, py);
            let misleading = markers
                .iter()
                .any(|&(mx, my)| (mx, my) != (px, py) && r.distance(mx, my) + 2.0 < own);
            let misleading = if misleading { 200.0 } else { 0.0 };
            // Otherwise prefer close spots, and earlier candidates on ties.
            let cost = covered + crossed * 10.0 + misleading + own * 0.3 + k as f64 * 0.5;
            if best.is_none_or(|(c, _)| cost < c) {
                best = Some((cost, r));
            }
        }
        let Some((_, r)) = best else { continue };
        leaders.extend(leader_for(&r));
        // Labels weigh more than anything else: two on top of each other are unreadable.
        obstacles.push(Obstacle::solid(r, 500.0));
        placed.push((r, text));
    }

    // Backings, then leaders, then text: a leader that has to pass a label stays visible
    // (so it doesn't seem to end there) while the letters stay on top.
    for (r, _) in &placed {
        // A translucent backing keeps text readable over dots and grid lines.
        let (x0, y0, x1, y1) = (r.x0 as i64, r.y0 as i64, r.x1 as i64, r.y1 as i64);
        c.fill_rect(x0, y0, x1 - 1, y1 - 1, BACKGROUND, 0.8);
    }
    for (from, to) in leaders {
        c.line(from, to, MUTED, 0.6);
    }
    for (r, text) in &placed {
        c.text(r.x0 + pad, r.y0 + pad, text, s, INK, false);
    }
}

/// Something a label would rather not cover.
struct Obstacle {
    rect: Rect,
    /// Cost of overlapping it at all.
    touch: f64,
    /// Cost of covering it entirely (partial cover costs proportionally).
    cover: f64,
}

impl Obstacle {
    /// Things that must stay visible: even a corner over them is as bad as half.
    fn solid(rect: Rect, weight: f64) -> Obstacle {
        Obstacle {
            rect,
            touch: weight,
            cover: weight,
        }
    }

    fn cost(&self, label: &Rect) -> f64 {
        let covered = label.overlap(&self.rect) / self.rect.area().max(1.0);
        if covered > 0.0 {
            self.touch + self.cover * covered.min(1.0)
        } else {
            0.0
        }
    }
}

/// Top-left offsets (relative to the point) of the spots a label may take, best first:
/// beside the point, then alternating below/above in growing tiers, each tier trying
/// the label right-aligned to the point, starting at it, and clear of it on either side
/// (so a label can sit just past a vertical drop of the step line).
fn candidate_offsets(w: f64, h: f64, near: f64) -> Vec<(f64, f64)> {
    let mut out = vec![(-near - w, -h / 2.0), (near, -h / 2.0)];
    let xs = [-w + near, -near, near / 2.0, -w - near / 2.0];
    for tier in 0..8 {
        let step = tier as f64 * (h + 2.0);
        let below = near - 4.0 + step;
        let above = -near + 4.0 - h - step;
        for x in xs {
            out.push((x, below));
            out.push((x, above));
        }
    }
    out
}

/// Shifts a label box sideways to keep it inside the plot area (labels must not run off
/// the right edge); `None` if it does not fit vertically or at all.
fn fit_inside(lay: &Layout, x: f64, y: f64, w: f64, h: f64) -> Option<Rect> {
    let (left, right) = (lay.left + 2.0, lay.right - 2.0);
    if w > right - left || y < lay.top + 2.0 || y + h > lay.bottom - 2.0 {
        return None;
    }
    let x = x.min(right - w).max(left);
    Some(Rect {
        x0: x,
        y0: y,
        x1: x + w,
        y1: y + h,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pt(index: usize, v: Option<f64>, status: Status, label: &str) -> Point {
        Point {
            index,
            val_bpb: v,
            status,
            label: label.to_string(),
        }
    }

    /// A small descending run: kept at 0, 3, 6, 9 with discards in between (all worse
    /// than the best so far, and on rows well clear of the kept points).
    /// `labelled: false` leaves the kept labels empty, for tests that probe pixels a
    /// label could land on.
    fn run_with(labelled: bool) -> Vec<Point> {
        let mut v = Vec::new();
        let kept = [(0, 1.00), (3, 0.99), (6, 0.985), (9, 0.975)];
        for (i, val) in kept {
            let label = if labelled {
                format!("idea {i}")
            } else {
                String::new()
            };
            v.push(pt(i, Some(val), Status::Keep, &label));
        }
        for i in [1, 2, 4, 5, 7, 8, 10, 11] {
            v.push(pt(i, Some(1.001 + i as f64 * 1e-4), Status::Discard, "meh"));
        }
        v.push(pt(12, None, Status::Crash, "oom"));
        v
    }

    fn run() -> Vec<Point> {
        run_with(true)
    }

    #[test]
    fn the_noise_band_shades_sigma_around_the_running_best_and_no_further() {
        let points = run_with(false);
        let lay = layout(&points, 800, 500);
        let sigma = 0.002;
        let plain = render(&points, "test", 800, 500);
        let banded = render_with_noise(&points, "test", Some(sigma), 800, 500);
        // Between kept points 6 and 9 the best is 0.985: half a σ above it is shaded, two σ
        // above it is not.
        let (x, _) = lay.to_pixel(7, 0.985);
        let (_, inside) = lay.to_pixel(7, 0.985 + sigma / 2.0);
        let (_, outside) = lay.to_pixel(7, 0.985 + 2.0 * sigma);
        assert_eq!(plain.pixel(x, inside), BACKGROUND);
        assert_ne!(banded.pixel(x, inside), BACKGROUND, "inside the band");
        assert_eq!(
            banded.pixel(x, outside),
            plain.pixel(x, outside),
            "outside the band"
        );
    }

    #[test]
    fn kept_colour_at_kept_points_and_not_at_discards() {
        let points = run();
        let chart = render(&points, "test", 800, 500);
        let lay = layout(&points, 800, 500);
        for p in &points {
            let Some(v) = p.val_bpb else { continue };
            let (x, y) = lay.to_pixel(p.index, v);
            let px = chart.pixel(x, y);
            match p.status {
                Status::Keep => assert_eq!(px, KEPT_FILL, "kept point {}", p.index),
                _ => assert_ne!(px, KEPT_FILL, "discarded point {}", p.index),
            }
        }
    }

    #[test]
    fn discards_are_faint_grey() {
        let points = run_with(false);
        let chart = render(&points, "test", 800, 500);
        let lay = layout(&points, 800, 500);
        let (x, y) = lay.to_pixel(1, 1.0011);
        let [r, g, b] = chart.pixel(x, y);
        assert!(r == g && g == b, "grey, got {:?}", [r, g, b]);
        assert!((150..240).contains(&r), "faint, got {r}");
    }

    #[test]
    fn step_line_runs_between_kept_points() {
        let points = run_with(false);
        let chart = render(&points, "test", 800, 500);
        let lay = layout(&points, 800, 500);
        // Flat at the old best between two kept points...
        let (x0, y0) = lay.to_pixel(3, 0.99);
        let (x1, _) = lay.to_pixel(6, 0.985);
        assert_eq!(chart.pixel((x0 + x1) / 2, y0), BEST_LINE);
        // ...then a drop at the next one...
        let (_, y1) = lay.to_pixel(6, 0.985);
        assert_eq!(chart.pixel(x1, (y0 + y1) / 2), BEST_LINE);
        // ...and flat at the final best out to the last experiment.
        let (x9, y9) = lay.to_pixel(9, 0.975);
        let (x12, _) = lay.to_pixel(12, 0.975);
        assert_eq!(chart.pixel((x9 + x12) / 2, y9), BEST_LINE);
        // Not above the line, where nothing is drawn at that column.
        assert_eq!(chart.pixel((x0 + x1) / 2, y0 - 12), BACKGROUND);
    }

    #[test]
    fn outlier_is_clipped_and_does_not_stretch_the_range() {
        let points = run();
        let (lo, hi) = layout(&points, 800, 500).y_range();
        let mut with_outlier = points.clone();
        with_outlier.push(pt(13, Some(3.2), Status::Discard, "lr 10x"));
        let lay = layout(&with_outlier, 800, 500);
        let (lo2, hi2) = lay.y_range();
        assert!((lo2 - lo).abs() < 1e-9 && (hi2 - hi).abs() < 1e-9);
        assert!(hi2 < 1.1, "range {lo2}..{hi2}");
        assert!(lay.is_off_top(3.2));

        // Pinned to the top edge, where a grey marker is drawn instead of a dot.
        let (x, y) = lay.to_pixel(13, 3.2);
        let (_, top, _, _) = lay.plot_area();
        assert_eq!(y, top);
        let chart = render(&with_outlier, "test", 800, 500);
        let marker = (top + 1..top + 6).map(|y| chart.pixel(x, y));
        assert!(marker.clone().any(|[r, g, b]| r == g && g == b && r < 200));
        // All in-range points still land where they did.
        assert_eq!(
            lay.to_pixel(3, 0.99).1,
            layout(&points, 800, 500).to_pixel(3, 0.99).1
        );
    }

    #[test]
    fn y_range_spans_best_to_baseline() {
        let (lo, hi) = layout(&run(), 1600, 800).y_range();
        assert!(lo < 0.975 && lo > 0.97, "{lo}");
        assert!(hi > 1.0 && hi < 1.01, "{hi}");
    }

    #[test]
    fn writes_a_png_that_decodes_to_the_right_size() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("chart.png");
        render(&run(), "decode me", 640, 360)
            .write_png(&path)
            .unwrap();
        let (w, h, rgb) = decode(&path);
        assert_eq!((w, h), (640, 360));
        assert_eq!(rgb, render(&run(), "decode me", 640, 360).rgb);

        render_png(&run(), "default size", &path).unwrap();
        assert_eq!(decode(&path).0, WIDTH);
        assert_eq!(decode(&path).1, HEIGHT);
    }

    #[test]
    fn write_error_names_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("missing-dir").join("chart.png");
        let err = render(&[], "x", 10, 10).write_png(&path).unwrap_err();
        assert!(matches!(err, PlotError::Io { .. }));
        assert!(err.to_string().contains("missing-dir"), "{err}");
    }

    fn decode(path: &Path) -> (u32, u32, Vec<u8>) {
        let file = std::io::BufReader::new(File::open(path).unwrap());
        let mut reader = png::Decoder::new(file).read_info().unwrap();
        let mut buf = vec![0; reader.output_buffer_size().unwrap()];
        let info = reader.next_frame(&mut buf).unwrap();
        assert_eq!(info.color_type, png::ColorType::Rgb);
        buf.truncate(info.buffer_size());
        (info.width, info.height, buf)
    }

    fn has_ink(chart: &Chart) -> bool {
        chart.rgb.chunks(3).any(|px| px[0] < 100)
    }

    #[test]
    fn empty_input_renders_axes_and_a_note() {
        let chart = render(&[], "nothing yet", 800, 400);
        assert_eq!(chart.rgb.len(), 800 * 400 * 3);
        assert!(has_ink(&chart));
        assert!(!chart.rgb.chunks(3).any(|px| px == KEPT_FILL));
    }

    #[test]
    fn all_crashes_render_without_points() {
        let points: Vec<Point> = (0..5).map(|i| pt(i, None, Status::Crash, "boom")).collect();
        let chart = render(&points, "crashes", 800, 400);
        assert!(has_ink(&chart));
        assert!(!chart.rgb.chunks(3).any(|px| px == KEPT_FILL));
        assert_eq!(summary(&points, &[]), "5 experiments, 0 kept, 5 crashed");
    }

    #[test]
    fn nan_and_inf_count_as_crashes() {
        let points = vec![
            pt(0, Some(1.0), Status::Keep, "baseline"),
            pt(1, Some(f64::NAN), Status::Keep, "nan"),
            pt(2, Some(f64::INFINITY), Status::Discard, "inf"),
            pt(3, Some(0.9), Status::Crash, "crash with a stale value"),
        ];
        let lay = layout(&points, 800, 400);
        let (lo, hi) = lay.y_range();
        assert!(lo.is_finite() && hi.is_finite() && lo < 1.0 && hi > 1.0);
        let chart = render(&points, "odd values", 800, 400);
        let (x, y) = lay.to_pixel(0, 1.0);
        assert_eq!(chart.pixel(x, y), KEPT_FILL);
        let kept = [(&points[0], 1.0)];
        assert_eq!(
            summary(&points, &kept),
            "4 experiments, 1 kept, 3 crashed, best 1.000000"
        );
    }

    #[test]
    fn single_point_and_equal_values_get_a_real_span() {
        for points in [
            vec![pt(0, Some(0.99), Status::Keep, "baseline")],
            (0..4)
                .map(|i| pt(i, Some(0.99), Status::Keep, "same"))
                .collect(),
        ] {
            let lay = layout(&points, 800, 400);
            let (lo, hi) = lay.y_range();
            assert!(lo < 0.99 && hi > 0.99 && hi - lo > 1e-4, "{lo}..{hi}");
            let chart = render(&points, "flat", 800, 400);
            let (x, y) = lay.to_pixel(0, 0.99);
            assert_eq!(chart.pixel(x, y), KEPT_FILL);
        }
    }

    #[test]
    fn tiny_and_zero_sized_charts_do_not_panic() {
        for (w, h) in [(0, 0), (1, 1), (30, 20), (1, 500)] {
            let chart = render(&run(), "tiny", w, h);
            assert_eq!(chart.rgb.len(), (w * h * 3) as usize);
        }
    }

    #[test]
    fn legend_moves_off_a_flat_best_line() {
        // No improvement all night: the best stays at the baseline, near the top, where
        // the legend would usually go.
        let mut points = vec![pt(0, Some(1.0), Status::Keep, "")];
        points.extend(
            (1..30).map(|i| pt(i, Some(0.995 + (i % 3) as f64 * 1e-4), Status::Discard, "")),
        );
        let lay = layout(&points, 800, 400);
        let chart = render(&points, "flat", 800, 400);
        let (x, y) = lay.to_pixel(29, 1.0);
        assert_eq!(chart.pixel(x, y), BEST_LINE);
    }

    #[test]
    fn extreme_inputs_do_not_panic() {
        let points = vec![
            pt(0, Some(1e300), Status::Keep, "huge"),
            pt(1_000_000_000_000, Some(-1e300), Status::Keep, "tiny"),
            pt(
                7,
                Some(f64::MIN_POSITIVE),
                Status::Discard,
                "\u{1F600} non-ascii \t label",
            ),
        ];
        let chart = render(&points, "extremes \u{e9}", 400, 300);
        assert_eq!(chart.rgb.len(), 400 * 300 * 3);
    }

    #[test]
    fn long_labels_are_truncated() {
        assert_eq!(short_label("short"), "short");
        let long = "a very long description of an experiment that goes on";
        let s = short_label(long);
        assert!(s.chars().count() <= LABEL_CHARS);
        assert!(s.ends_with("..."));
    }
}

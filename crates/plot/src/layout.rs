//! Where things go: the data ranges, the plot area inside the margins, and the ticks.
//! `render` draws with exactly this layout, so `Layout::to_pixel` tells callers (and
//! tests) which pixel a data point lands on.

use crate::canvas::{CELL, text_width};
use crate::{Point, Status};

/// The mapping from (experiment index, val_bpb) to canvas pixels.
#[derive(Debug, Clone)]
pub struct Layout {
    /// Plot area edges in pixels; `right`/`bottom` are the last columns/rows inside it.
    pub(crate) left: f64,
    pub(crate) top: f64,
    pub(crate) right: f64,
    pub(crate) bottom: f64,
    x_min: f64,
    x_max: f64,
    y_min: f64,
    y_max: f64,
    /// Canvas pixels per font pixel for titles, axis text and point labels.
    pub(crate) big_text: f64,
    pub(crate) small_text: f64,
    pub(crate) x_ticks: Vec<usize>,
    /// Tick values with their printed labels (all printed to the same decimals).
    pub(crate) y_ticks: Vec<(f64, String)>,
}

/// Tick marks stick this far out of the plot area.
pub(crate) const TICK_LEN: f64 = 6.0;
/// Gap between text and whatever it labels.
pub(crate) const GAP: f64 = 8.0;

pub fn layout(points: &[Point], width: u32, height: u32) -> Layout {
    let (y_min, y_max) = y_range(points);
    let (x_min, x_max) = x_range(points);

    // Text grows with the canvas: 2x (1.5x for point labels) at the 1600x800 default,
    // down to the native 8px font on small charts so margins and labels don't eat the plot.
    let (big_text, small_text) = if width >= 1200 && height >= 600 {
        (2.0, 1.5)
    } else if width >= 800 && height >= 400 {
        (1.5, 1.0)
    } else {
        (1.0, 1.0)
    };

    let y_ticks = y_ticks(y_min, y_max);
    let x_ticks = x_ticks(x_min, x_max);
    let widest_y_label = y_ticks
        .iter()
        .map(|(_, s)| text_width(s, big_text))
        .fold(0.0, f64::max);

    let line = CELL * big_text;
    // Left: rotated axis name, y tick labels, ticks. Top: title and subtitle lines.
    let left = GAP + line + GAP * 2.0 + widest_y_label + GAP + TICK_LEN;
    let top = GAP * 1.5 + line + GAP + line + GAP * 2.0;
    // Bottom: ticks, x tick labels, axis name. Right: room for the last x tick label.
    let bottom_margin = TICK_LEN + GAP + line + GAP + line + GAP * 1.5;
    let right_margin = GAP * 4.0;

    let (w, h) = (f64::from(width), f64::from(height));
    // On absurdly small canvases keep a non-empty plot area rather than inverting it.
    let right = (w - 1.0 - right_margin).max(left + 1.0);
    let bottom = (h - 1.0 - bottom_margin).max(top + 1.0);

    Layout {
        left,
        top,
        right,
        bottom,
        x_min,
        x_max,
        y_min,
        y_max,
        big_text,
        small_text,
        x_ticks,
        y_ticks,
    }
}

impl Layout {
    /// The pixel a data point is drawn at. Values outside the y range are pinned to the
    /// top/bottom edge of the plot area (that's where the clipped markers go); NaN/inf
    /// count as "off the top".
    pub fn to_pixel(&self, index: usize, val_bpb: f64) -> (u32, u32) {
        let (x, y) = self.to_canvas(index as f64, val_bpb);
        (x.round().max(0.0) as u32, y.round().max(0.0) as u32)
    }

    /// The (min, max) val_bpb shown on the y axis.
    pub fn y_range(&self) -> (f64, f64) {
        (self.y_min, self.y_max)
    }

    /// The plot area as (left, top, right, bottom) pixel coordinates, inclusive.
    pub fn plot_area(&self) -> (u32, u32, u32, u32) {
        let px = |v: f64| v.round().max(0.0) as u32;
        (px(self.left), px(self.top), px(self.right), px(self.bottom))
    }

    /// Whether `val_bpb` lies above the visible range (drawn as a marker on the top edge).
    pub fn is_off_top(&self, val_bpb: f64) -> bool {
        !val_bpb.is_finite() || val_bpb > self.y_max
    }

    pub(crate) fn x_to_canvas(&self, index: f64) -> f64 {
        self.left + (index - self.x_min) / (self.x_max - self.x_min) * (self.right - self.left)
    }

    /// Pixels per unit of val_bpb on the y axis.
    pub(crate) fn y_scale(&self) -> f64 {
        (self.bottom - self.top) / (self.y_max - self.y_min)
    }

    pub(crate) fn y_to_canvas(&self, val_bpb: f64) -> f64 {
        let v = if val_bpb.is_finite() {
            val_bpb.clamp(self.y_min, self.y_max)
        } else {
            self.y_max
        };
        self.bottom - (v - self.y_min) / (self.y_max - self.y_min) * (self.bottom - self.top)
    }

    fn to_canvas(&self, index: f64, val_bpb: f64) -> (f64, f64) {
        (self.x_to_canvas(index), self.y_to_canvas(val_bpb))
    }
}

/// The val_bpb of a point if it should be drawn at all: crashes and non-finite values
/// are counted but never plotted.
pub(crate) fn plotted_value(p: &Point) -> Option<f64> {
    match p.status {
        Status::Crash => None,
        Status::Keep | Status::Discard => p.val_bpb.filter(|v| v.is_finite()),
    }
}

/// From a little below the best value to a little above the baseline (the first kept
/// result), so a few wildly bad discards don't squash the curve we care about; those
/// get clipped to the top edge instead.
fn y_range(points: &[Point]) -> (f64, f64) {
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
        return (0.0, 1.0);
    };
    let lowest = points
        .iter()
        .filter_map(plotted_value)
        .fold(baseline, f64::min);

    let mut span = baseline - lowest;
    let (mut lo, mut hi) = (lowest, baseline);
    // Identical values: invent a span proportional to the value so ticks still work.
    if span < lowest.abs().max(1.0) * 1e-9 {
        span = (lowest.abs() * 0.02).max(1e-3);
        lo -= span / 2.0;
        hi += span / 2.0;
    }
    // More headroom on top: labels and the legend live up there.
    (lo - span * 0.08, hi + span * 0.12)
}

fn x_range(points: &[Point]) -> (f64, f64) {
    let lo = points.iter().map(|p| p.index).min().unwrap_or(0) as f64;
    let hi = points.iter().map(|p| p.index).max().unwrap_or(0) as f64;
    // Half a step of padding (at least one index) so edge points don't sit on the axes.
    let pad = ((hi - lo) * 0.02).max(1.0);
    (lo - pad, hi + pad)
}

/// A "nice" step (1, 2, 2.5 or 5 times a power of ten) giving roughly `target` ticks.
fn nice_step(span: f64, target: f64) -> f64 {
    let raw = span / target;
    let magnitude = 10f64.powf(raw.log10().floor());
    [1.0, 2.0, 2.5, 5.0, 10.0]
        .into_iter()
        .map(|m| m * magnitude)
        .find(|&s| s >= raw * (1.0 - 1e-9))
        .unwrap_or(10.0 * magnitude)
}

/// Multiples of `step` between `lo` and `hi`; empty when the range is degenerate (and
/// capped, so absurd inputs can't turn into a billion ticks).
fn ticks(lo: f64, hi: f64, step: f64) -> Vec<f64> {
    if !(step.is_finite() && step > 0.0 && lo.is_finite() && hi.is_finite()) {
        return Vec::new();
    }
    let first = (lo / step).ceil() as i64;
    let last = (hi / step).floor() as i64;
    (first..=last).take(100).map(|k| k as f64 * step).collect()
}

fn y_ticks(lo: f64, hi: f64) -> Vec<(f64, String)> {
    let step = nice_step(hi - lo, 7.0);
    // Enough decimals to tell neighbouring ticks apart, and at least 3 since val_bpb
    // differences that matter live in the third decimal.
    let mut decimals = (-step.log10()).ceil().max(0.0) as usize;
    if (step * 10f64.powi(decimals as i32)).fract().abs() > 1e-6 {
        decimals += 1;
    }
    let decimals = decimals.clamp(3, 8);
    ticks(lo, hi, step)
        .into_iter()
        .map(|v| (v, format!("{v:.decimals$}")))
        .collect()
}

fn x_ticks(lo: f64, hi: f64) -> Vec<usize> {
    // Experiment numbers are whole: a step of 2.5 becomes 2, and never below 1.
    let step = nice_step(hi - lo, 10.0).floor().max(1.0);
    ticks(lo.max(0.0), hi, step)
        .into_iter()
        .map(|v| v.round() as usize)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nice_steps() {
        assert_eq!(nice_step(0.03, 5.0), 0.01);
        assert_eq!(nice_step(10.0, 10.0), 1.0);
        assert_eq!(nice_step(126.0, 10.0), 20.0);
        assert!((nice_step(0.012, 5.0) - 0.0025).abs() < 1e-12);
    }

    #[test]
    fn y_tick_labels_have_three_or_four_decimals() {
        let ticks = y_ticks(0.966, 1.001);
        assert!(ticks.len() >= 3, "{ticks:?}");
        assert!(
            ticks.iter().all(|(_, s)| s.len() == "0.970".len()),
            "{ticks:?}"
        );
        let fine = y_ticks(0.9690, 0.9850);
        assert!(fine.iter().any(|(_, s)| s == "0.9725"), "{fine:?}");
    }

    #[test]
    fn x_ticks_are_integers_in_range() {
        assert_eq!(x_ticks(-3.0, 128.0), vec![0, 20, 40, 60, 80, 100, 120]);
        assert_eq!(x_ticks(-1.0, 1.0), vec![0, 1]);
        assert_eq!(
            x_ticks(-1.0, 21.0),
            vec![0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20]
        );
        // Far-apart indices or garbage ranges give a few ticks, not a hang.
        assert!(x_ticks(-1.0, 1e15).len() <= 12);
        assert!(y_ticks(f64::NEG_INFINITY, 1.0).is_empty());
    }
}

//! A tiny RGB raster with the handful of primitives the chart needs: alpha-blended
//! rectangles, anti-aliased discs and text from the public-domain 8x8 bitmap font.
//!
//! Every primitive clips against the canvas, so callers can draw with coordinates that
//! fall partly (or wholly) outside it without checking first.

use font8x8::legacy::BASIC_LEGACY;

pub type Rgb = [u8; 3];

/// Width and height, in font pixels, of one character cell.
pub const CELL: f64 = 8.0;

pub struct Canvas {
    pub width: u32,
    pub height: u32,
    pub rgb: Vec<u8>,
}

impl Canvas {
    pub fn new(width: u32, height: u32, background: Rgb) -> Self {
        let rgb = background
            .iter()
            .copied()
            .cycle()
            .take(width as usize * height as usize * 3)
            .collect();
        Canvas { width, height, rgb }
    }

    /// Mixes `color` into pixel (x, y) with opacity `alpha` (0..=1); off-canvas is a no-op.
    pub fn blend(&mut self, x: i64, y: i64, color: Rgb, alpha: f64) {
        if x < 0 || y < 0 || x >= i64::from(self.width) || y >= i64::from(self.height) {
            return;
        }
        let alpha = alpha.clamp(0.0, 1.0);
        if alpha <= 0.0 {
            return;
        }
        let at = (y as usize * self.width as usize + x as usize) * 3;
        for (dst, src) in self.rgb[at..at + 3].iter_mut().zip(color) {
            let mixed = f64::from(*dst) * (1.0 - alpha) + f64::from(src) * alpha;
            *dst = mixed.round() as u8;
        }
    }

    /// Fills the pixels whose index lies in `x0..=x1` by `y0..=y1`.
    pub fn fill_rect(&mut self, x0: i64, y0: i64, x1: i64, y1: i64, color: Rgb, alpha: f64) {
        let (x0, x1) = (x0.max(0), x1.min(i64::from(self.width) - 1));
        let (y0, y1) = (y0.max(0), y1.min(i64::from(self.height) - 1));
        for y in y0..=y1 {
            for x in x0..=x1 {
                self.blend(x, y, color, alpha);
            }
        }
    }

    /// Horizontal line of `thickness` pixels centred on row `y`.
    pub fn hline(&mut self, x0: i64, x1: i64, y: i64, thickness: i64, color: Rgb, alpha: f64) {
        let top = y - (thickness - 1) / 2;
        let (a, b) = (x0.min(x1), x0.max(x1));
        self.fill_rect(a, top, b, top + thickness - 1, color, alpha);
    }

    /// Vertical line of `thickness` pixels centred on column `x`.
    pub fn vline(&mut self, x: i64, y0: i64, y1: i64, thickness: i64, color: Rgb, alpha: f64) {
        let left = x - (thickness - 1) / 2;
        let (a, b) = (y0.min(y1), y0.max(y1));
        self.fill_rect(left, a, left + thickness - 1, b, color, alpha);
    }

    /// Straight one-pixel line with Wu-style anti-aliasing (used for label leader lines).
    pub fn line(&mut self, from: (f64, f64), to: (f64, f64), color: Rgb, alpha: f64) {
        let (dx, dy) = (to.0 - from.0, to.1 - from.1);
        let steps = dx.abs().max(dy.abs()).ceil().max(1.0) as i64;
        for i in 0..=steps {
            let t = i as f64 / steps as f64;
            let (x, y) = (from.0 + dx * t, from.1 + dy * t);
            // Split the sample between the two pixels it straddles across the minor axis.
            if dx.abs() >= dy.abs() {
                let (row, frac) = (y.floor(), y - y.floor());
                self.blend(x.round() as i64, row as i64, color, alpha * (1.0 - frac));
                self.blend(x.round() as i64, row as i64 + 1, color, alpha * frac);
            } else {
                let (col, frac) = (x.floor(), x - x.floor());
                self.blend(col as i64, y.round() as i64, color, alpha * (1.0 - frac));
                self.blend(col as i64 + 1, y.round() as i64, color, alpha * frac);
            }
        }
    }

    /// Disc centred on the middle of pixel (cx, cy); edge pixels get partial coverage so
    /// small markers look round rather than blocky.
    pub fn disc(&mut self, cx: i64, cy: i64, radius: f64, color: Rgb, alpha: f64) {
        let reach = radius.ceil() as i64 + 1;
        for y in cy - reach..=cy + reach {
            for x in cx - reach..=cx + reach {
                let d = (((x - cx) as f64).powi(2) + ((y - cy) as f64).powi(2)).sqrt();
                let coverage = (radius + 0.5 - d).clamp(0.0, 1.0);
                self.blend(x, y, color, alpha * coverage);
            }
        }
    }

    /// Solid triangle pointing up with its apex at (cx, top): the "off the top" marker.
    pub fn up_triangle(&mut self, cx: i64, top: i64, rows: i64, color: Rgb, alpha: f64) {
        for r in 0..rows {
            self.hline(cx - r, cx + r, top + r, 1, color, alpha);
        }
    }

    /// Draws `text` with its top-left corner at (x, y), each font pixel `scale` canvas
    /// pixels wide. Fractional scales are supersampled, which keeps them legible instead
    /// of uneven. `vertical` rotates the text 90 degrees to read bottom-to-top; (x, y) is
    /// then the bottom-left corner.
    pub fn text(&mut self, x: f64, y: f64, text: &str, scale: f64, color: Rgb, vertical: bool) {
        let (w, h) = (text_width(text, scale), CELL * scale);
        let (bw, bh) = if vertical { (h, w) } else { (w, h) };
        let (bx, by) = if vertical { (x, y - bh) } else { (x, y) };
        let glyphs: Vec<[u8; 8]> = text.chars().map(glyph).collect();
        // Integer scales hit font pixels exactly; only fractional ones need supersampling.
        let samples: i64 = if scale.fract() == 0.0 { 1 } else { 4 };
        for py in by.floor() as i64..(by + bh).ceil() as i64 + 1 {
            for px in bx.floor() as i64..(bx + bw).ceil() as i64 + 1 {
                let mut hits = 0;
                for sy in 0..samples {
                    for sx in 0..samples {
                        let sxp = px as f64 + (sx as f64 + 0.5) / samples as f64;
                        let syp = py as f64 + (sy as f64 + 0.5) / samples as f64;
                        // Map the canvas sample back into unrotated text space.
                        let (tx, ty) = if vertical {
                            (y - syp, sxp - x)
                        } else {
                            (sxp - x, syp - y)
                        };
                        if font_pixel(&glyphs, tx / scale, ty / scale) {
                            hits += 1;
                        }
                    }
                }
                if hits > 0 {
                    let coverage = hits as f64 / (samples * samples) as f64;
                    self.blend(px, py, color, coverage);
                }
            }
        }
    }
}

/// Canvas width of `text` drawn at `scale`.
pub fn text_width(text: &str, scale: f64) -> f64 {
    text.chars().count() as f64 * CELL * scale
}

/// Whether font pixel (fx, fy) of a string of glyphs is set (fx, fy in font pixels).
fn font_pixel(glyphs: &[[u8; 8]], fx: f64, fy: f64) -> bool {
    if fx < 0.0 || !(0.0..CELL).contains(&fy) {
        return false;
    }
    let (col, row) = (fx as usize, fy as usize);
    let Some(g) = glyphs.get(col / 8) else {
        return false;
    };
    // font8x8 stores each row with the leftmost pixel in the least significant bit.
    g[row] >> (col % 8) & 1 == 1
}

/// The bitmap for `c`; the basic font only covers ASCII, so anything else shows as '?'.
fn glyph(c: char) -> [u8; 8] {
    let code = if c.is_ascii() && !c.is_ascii_control() {
        c as usize
    } else {
        '?' as usize
    };
    BASIC_LEGACY[code]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drawing_off_canvas_does_not_panic() {
        let mut c = Canvas::new(10, 10, [255; 3]);
        c.fill_rect(-50, -50, 50, 50, [0; 3], 1.0);
        c.disc(-3, 200, 5.0, [0; 3], 1.0);
        c.text(-20.0, 5.0, "hello", 2.0, [0; 3], true);
        c.line((-10.0, -10.0), (30.0, 5.0), [0; 3], 1.0);
        assert!(c.rgb.iter().all(|&b| b == 0));
        let mut empty = Canvas::new(0, 0, [255; 3]);
        empty.text(0.0, 0.0, "x", 1.0, [0; 3], false);
        assert!(empty.rgb.is_empty());
    }

    #[test]
    fn text_sets_some_pixels_inside_its_box_only() {
        let mut c = Canvas::new(40, 20, [255; 3]);
        c.text(4.0, 4.0, "Ab", 1.0, [0; 3], false);
        let dark: Vec<(usize, usize)> = (0..20)
            .flat_map(|y| (0..40).map(move |x| (x, y)))
            .filter(|&(x, y)| c.rgb[(y * 40 + x) * 3] < 128)
            .collect();
        assert!(!dark.is_empty());
        assert!(
            dark.iter()
                .all(|&(x, y)| (4..20).contains(&x) && (4..12).contains(&y))
        );
    }
}

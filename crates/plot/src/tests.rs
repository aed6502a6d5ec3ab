use super::*;

fn pt(index: usize, v: Option<f64>, status: Status, label: &str) -> Point {
    Point {
        index,
        val_bpb: v,
        status,
        label: label.to_string(),
    }
}

/// A small descending run: kept at 0, 3, 6, 9 with discards in between (all worse than the
/// best so far). `labelled: false` leaves the kept labels empty, for tests that probe pixels
/// a label could land on.
fn run_with(labelled: bool) -> Vec<Point> {
    let mut v = Vec::new();
    for (i, val) in [(0, 1.00), (3, 0.99), (6, 0.985), (9, 0.975)] {
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

fn chart<'a>(points: &'a [Point], sigma: Option<f64>) -> Chart<'a> {
    Chart {
        points,
        title: "test",
        sigma,
    }
}

fn draw(points: &[Point], sigma: Option<f64>) -> Bitmap {
    chart(points, sigma).bitmap(800, 500).unwrap()
}

/// Whether any pixel within `r` of (x, y) has the colour.
fn near(b: &Bitmap, (x, y): (u32, u32), r: u32, colour: RGBColor) -> bool {
    (x.saturating_sub(r)..=x + r)
        .flat_map(|x| (y.saturating_sub(r)..=y + r).map(move |y| (x, y)))
        .any(|(x, y)| x < b.width && y < b.height && b.pixel(x, y) == colour)
}

#[test]
fn kept_colour_at_kept_points_and_not_at_discards() {
    let points = run_with(true);
    let b = draw(&points, None);
    for p in &points {
        let Some(v) = p.val_bpb else { continue };
        let at = b.frame.to_pixel(p.index, v);
        match p.status {
            Status::Keep => assert_eq!(b.pixel(at.0, at.1), KEPT_FILL, "kept point {}", p.index),
            _ => assert!(!near(&b, at, 2, KEPT_FILL), "discarded point {}", p.index),
        }
    }
}

#[test]
fn discards_are_faint_grey() {
    let points = run_with(false);
    let b = draw(&points, None);
    let (x, y) = b.frame.to_pixel(1, 1.0011);
    let RGBColor(r, g, bl) = b.pixel(x, y);
    assert!(r == g && g == bl, "grey, got {:?}", (r, g, bl));
    assert!((150..240).contains(&r), "faint, got {r}");
}

#[test]
fn crashes_are_marked_on_the_bottom_edge() {
    let points = run_with(false);
    let b = draw(&points, None);
    let (x, y) = b.frame.to_pixel(12, b.frame.y_range.start);
    assert!(near(&b, (x, y), 2, CRASH), "a crash cross at experiment 12");
    let no_crash: Vec<Point> = points
        .into_iter()
        .filter(|p| p.status != Status::Crash)
        .collect();
    assert!(!near(&draw(&no_crash, None), (x, y), 2, CRASH));
}

#[test]
fn step_line_runs_between_kept_points() {
    let points = run_with(false);
    let b = draw(&points, None);
    let f = &b.frame;
    // Flat at the old best between two kept points...
    let (x0, y0) = f.to_pixel(3, 0.99);
    let (x1, y1) = f.to_pixel(6, 0.985);
    assert!(near(&b, ((x0 + x1) / 2, y0), 1, BEST_LINE));
    // ...then a drop at the next one...
    assert!(near(&b, (x1, (y0 + y1) / 2), 1, BEST_LINE));
    // ...and flat at the final best out to the last experiment.
    let (x9, y9) = f.to_pixel(9, 0.975);
    let (x12, _) = f.to_pixel(12, 0.975);
    assert!(near(&b, ((x9 + x12) / 2, y9), 1, BEST_LINE));
    // Not above the line.
    assert!(!near(&b, ((x0 + x1) / 2, y0 - 12), 3, BEST_LINE));
}

#[test]
fn the_noise_band_shades_sigma_around_the_running_best_and_no_further() {
    let points = run_with(false);
    let sigma = 0.002;
    let plain = draw(&points, None);
    let banded = draw(&points, Some(sigma));
    let f = &banded.frame;
    // Between kept points 6 and 9 the best is 0.985: half a σ above it is shaded, two σ
    // above it is not.
    let (x, _) = f.to_pixel(7, 0.985);
    let (_, inside) = f.to_pixel(7, 0.985 + sigma / 2.0);
    let (_, outside) = f.to_pixel(7, 0.985 + 2.0 * sigma);
    assert_ne!(
        banded.pixel(x, inside),
        plain.pixel(x, inside),
        "inside the band"
    );
    assert_eq!(
        banded.pixel(x, outside),
        plain.pixel(x, outside),
        "outside the band"
    );
}

#[test]
fn an_outlier_is_pinned_to_the_top_edge_and_does_not_stretch_the_range() {
    let points = run_with(true);
    let range = chart(&points, None).y_range();
    let mut with_outlier = points.clone();
    with_outlier.push(pt(13, Some(3.2), Status::Discard, "lr 10x"));
    let range2 = chart(&with_outlier, None).y_range();
    assert!((range2.start - range.start).abs() < 1e-9 && (range2.end - range.end).abs() < 1e-9);
    assert!(range2.end < 1.1, "range {range2:?}");

    let b = draw(&with_outlier, None);
    assert!(b.frame.is_off_top(3.2));
    let (x, top) = b.frame.to_pixel(13, 3.2);
    let marker = (top.saturating_sub(6)..top + 6).map(|y| b.pixel(x, y));
    assert!(
        marker
            .clone()
            .any(|RGBColor(r, g, bl)| r == g && g == bl && r < 200),
        "a grey marker on the top edge"
    );
}

#[test]
fn y_range_spans_best_to_baseline() {
    let range = chart(&run_with(true), None).y_range();
    assert!(range.start < 0.975 && range.start > 0.97, "{range:?}");
    assert!(range.end > 1.0 && range.end < 1.01, "{range:?}");
}

#[test]
fn writes_a_png_that_decodes_to_the_same_pixels() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("chart.png");
    let points = run_with(true);
    chart(&points, Some(0.002))
        .write_png_sized(&path, 640, 360)
        .unwrap();
    let (w, h, rgb) = decode(&path);
    assert_eq!((w, h), (640, 360));
    assert_eq!(
        rgb,
        chart(&points, Some(0.002)).bitmap(640, 360).unwrap().rgb
    );

    chart(&points, None).write_png(&path).unwrap();
    assert_eq!((decode(&path).0, decode(&path).1), (WIDTH, HEIGHT));
}

#[test]
fn the_svg_holds_the_title_the_labels_and_the_legend() {
    let points = run_with(true);
    let svg = Chart {
        points: &points,
        title: "session <night> & co",
        sigma: Some(0.002),
    }
    .svg(800, 500)
    .unwrap();
    assert!(svg.starts_with("<svg"), "{}", &svg[..80]);
    // Text is escaped: the title reads back, and no stray markup got in.
    assert!(svg.contains("session &lt;night&gt; &amp; co"), "title");
    for text in [
        "idea 3",
        "idea 9",
        "running best",
        "discarded",
        "kept",
        "crashed",
    ] {
        assert!(svg.contains(text), "{text} in the svg");
    }
    assert!(svg.contains("13 experiments, 4 kept, 1 crashed, best 0.975000"));
    assert!(svg.contains("best ± σ"));
}

#[test]
fn write_error_names_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("missing-dir").join("chart.png");
    let err = chart(&[], None).write_png(&path).unwrap_err();
    assert!(matches!(err, PlotError::Io { .. }));
    assert!(err.to_string().contains("missing-dir"), "{err}");
}

fn decode(path: &Path) -> (u32, u32, Vec<u8>) {
    let file = std::io::BufReader::new(std::fs::File::open(path).unwrap());
    let mut reader = png::Decoder::new(file).read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size().unwrap()];
    let info = reader.next_frame(&mut buf).unwrap();
    assert_eq!(info.color_type, png::ColorType::Rgb);
    buf.truncate(info.buffer_size());
    (info.width, info.height, buf)
}

fn has_ink(b: &Bitmap) -> bool {
    b.rgb.chunks(3).any(|px| px[0] < 100)
}

fn has_kept_fill(b: &Bitmap) -> bool {
    b.rgb
        .chunks(3)
        .any(|px| px == [KEPT_FILL.0, KEPT_FILL.1, KEPT_FILL.2])
}

#[test]
fn empty_input_renders_axes_and_a_note() {
    let b = draw(&[], None);
    assert!(has_ink(&b));
    assert!(!has_kept_fill(&b));
    assert!(
        chart(&[], None)
            .svg(800, 500)
            .unwrap()
            .contains("no experiments yet")
    );
}

#[test]
fn all_crashes_render_without_points() {
    let points: Vec<Point> = (0..5).map(|i| pt(i, None, Status::Crash, "boom")).collect();
    let b = draw(&points, None);
    assert!(has_ink(&b));
    assert!(!has_kept_fill(&b));
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
    let range = chart(&points, None).y_range();
    assert!(range.start < 1.0 && range.end > 1.0, "{range:?}");
    let b = draw(&points, None);
    let (x, y) = b.frame.to_pixel(0, 1.0);
    assert_eq!(b.pixel(x, y), KEPT_FILL);
    assert_eq!(
        summary(&points, &[(0, 1.0, "baseline")]),
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
        let range = chart(&points, None).y_range();
        assert!(range.start < 0.99 && range.end > 0.99 && range.end - range.start > 1e-4);
        let b = draw(&points, None);
        let (x, y) = b.frame.to_pixel(0, 0.99);
        assert_eq!(b.pixel(x, y), KEPT_FILL);
    }
}

#[test]
fn too_small_a_chart_is_an_error_not_a_panic() {
    for (w, h) in [(0, 0), (1, 1), (30, 20), (1, 500)] {
        let err = chart(&run_with(true), None).bitmap(w, h).err().unwrap();
        assert!(err.to_string().contains("at least"), "{err}");
    }
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
    let b = Chart {
        points: &points,
        title: "extremes \u{e9}",
        sigma: Some(f64::NAN),
    }
    .bitmap(400, 300)
    .unwrap();
    assert_eq!(b.rgb.len(), 400 * 300 * 3);
}

#[test]
fn long_labels_are_truncated() {
    assert_eq!(short_label("short"), "short");
    let s = short_label("a very long description of an experiment that goes on");
    assert!(s.chars().count() <= LABEL_CHARS);
    assert!(s.ends_with("..."));
}

//! Renders the real overnight log from the reference H100 run (a fixture of the repository).
//!
//! Set `PLOT_REFERENCE_OUT=/some/path.png` to also keep a copy for looking at.

use std::path::Path;

use plot::{Point, Status, layout, render};

const LOG: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../tests/fixtures/results-h100-mar8.tsv"
);

/// Parses a results.tsv (commit, val_bpb, memory_gb, status, description). Crash rows
/// carry val_bpb 0.000000 as a placeholder, which is "no result", not a perfect score.
fn parse(tsv: &str) -> Vec<Point> {
    tsv.lines()
        .skip(1)
        .filter(|l| !l.trim().is_empty())
        .enumerate()
        .map(|(index, line)| {
            let cols: Vec<&str> = line.split('\t').collect();
            let status = match cols.get(3).map(|s| s.trim()) {
                Some("keep") => Status::Keep,
                Some("discard") => Status::Discard,
                _ => Status::Crash,
            };
            let val_bpb = cols
                .get(1)
                .and_then(|s| s.trim().parse::<f64>().ok())
                .filter(|v| *v > 0.0 && status != Status::Crash);
            Point {
                index,
                val_bpb,
                status,
                label: cols.get(4).unwrap_or(&"").trim().to_string(),
            }
        })
        .collect()
}

#[test]
fn reference_log_renders() {
    let tsv = std::fs::read_to_string(LOG).expect("the fixture log");
    let points = parse(&tsv);
    assert_eq!(points.len(), 126);
    let kept = points.iter().filter(|p| p.status == Status::Keep).count();
    let crashed = points.iter().filter(|p| p.val_bpb.is_none()).count();
    assert_eq!((kept, crashed), (23, 1));

    // The 3.2 blow-up must not flatten the 0.998 -> 0.970 curve.
    let (lo, hi) = layout(&points, 1600, 800).y_range();
    assert!(
        lo > 0.96 && lo < 0.9697 && hi > 0.9979 && hi < 1.01,
        "{lo}..{hi}"
    );

    let title = "autoresearch: H100 overnight run";
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("reference.png");
    plot::render_png(&points, title, &path).unwrap();

    let file = std::io::BufReader::new(std::fs::File::open(&path).unwrap());
    let mut reader = png::Decoder::new(file).read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size().unwrap()];
    let info = reader.next_frame(&mut buf).unwrap();
    assert_eq!((info.width, info.height), (1600, 800));
    assert_eq!(
        &buf[..info.buffer_size()],
        render(&points, title, 1600, 800).rgb
    );

    if let Ok(out) = std::env::var("PLOT_REFERENCE_OUT") {
        std::fs::copy(&path, Path::new(&out)).unwrap();
    }
}

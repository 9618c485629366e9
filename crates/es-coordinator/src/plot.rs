//! Training curves of a run as pictures: `curves.svg` and `curves.png` in the run directory,
//! drawn from `metrics.jsonl` with `plotters` at the end of a run and by `underflow plot`.
//!
//! Nothing here needs a system library: the PNG is plotters' RGB pixels encoded by the pure
//! Rust `png` crate, and text is drawn by `ab_glyph` with DejaVu Sans embedded in the binary
//! (the coordinator's images are `FROM scratch`: no fontconfig, no fonts to find).

use std::path::{Path, PathBuf};
use std::sync::Once;

use plotters::coord::Shift;
use plotters::prelude::*;

use crate::RunError;
use crate::run_dir::{MetricsLine, read_metrics, write_atomic};

/// DejaVu Sans (Bitstream Vera licence, `assets/DejaVuSans.LICENSE`).
const FONT: &[u8] = include_bytes!("../assets/DejaVuSans.ttf");
const FAMILY: &str = "sans-serif";

/// The picture's size in pixels (and SVG user units).
pub const SIZE: (u32, u32) = (1200, 800);

/// The curves' colours, the same as the dashboard's.
pub const FITNESS_MEAN: RGBColor = RGBColor(0x1f, 0x77, 0xb4);
pub const FITNESS_MAX: RGBColor = RGBColor(0xff, 0x7f, 0x0e);
pub const BATCH_ACCURACY: RGBColor = RGBColor(0x2c, 0xa0, 0x2c);
pub const TEST_ACCURACY: RGBColor = RGBColor(0xd6, 0x27, 0x28);

/// Writes `curves.svg` and `curves.png` into `run_dir` from its `metrics.jsonl`; returns
/// their paths.
pub fn write_curves(run_dir: &Path) -> Result<[PathBuf; 2], RunError> {
    let lines = read_metrics(&run_dir.join("metrics.jsonl"))?;
    if lines.is_empty() {
        return Err(RunError::Plot(format!(
            "{} has no generation to plot yet",
            run_dir.join("metrics.jsonl").display()
        )));
    }
    let title = run_dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let curves = Curves::new(&lines);
    let (svg, png) = (curves.svg(&title)?, curves.png(&title)?);
    write_atomic(run_dir, "curves.svg", svg.as_bytes())?;
    write_atomic(run_dir, "curves.png", &png)?;
    Ok([run_dir.join("curves.svg"), run_dir.join("curves.png")])
}

/// An axis label without float noise: `50`, not `50.0`; `0.3`, not `0.30000000000000004`.
fn tick(v: &f64) -> String {
    format!("{}", (v * 1e4).round() / 1e4)
}

fn plot_error(e: impl std::fmt::Display) -> RunError {
    RunError::Plot(e.to_string())
}

/// Makes the embedded font the one `FAMILY` names (once per process).
fn register_font() -> Result<(), RunError> {
    static REGISTER: Once = Once::new();
    let mut result = Ok(());
    REGISTER.call_once(|| {
        result = plotters::style::register_font(FAMILY, FontStyle::Normal, FONT)
            .map_err(|_| RunError::Plot("the embedded font does not load".into()));
    });
    result
}

/// The series of a run, against generations and against wall time.
struct Curves {
    /// (generation completed, wall seconds, line)
    points: Vec<(f64, f64, MetricsLine)>,
}

type Series = (&'static str, RGBColor, fn(&MetricsLine) -> Option<f64>);

const FITNESS: [Series; 2] = [
    ("fitness mean", FITNESS_MEAN, |l| Some(l.fitness_mean)),
    ("fitness max", FITNESS_MAX, |l| Some(l.fitness_max)),
];
const ACCURACY: [Series; 2] = [
    ("train (minibatch) accuracy", BATCH_ACCURACY, |l| {
        Some(l.batch_accuracy)
    }),
    ("test accuracy", TEST_ACCURACY, |l| l.test_accuracy),
];

impl Curves {
    fn new(lines: &[MetricsLine]) -> Curves {
        // A resumed run restarts its clock: later pieces go on from where the earlier ended.
        let mut offset = 0.0;
        let mut previous = 0.0;
        let points = lines
            .iter()
            .map(|l| {
                if l.wall_secs < previous {
                    offset += previous;
                }
                previous = l.wall_secs;
                (f64::from(l.generation + 1), offset + l.wall_secs, l.clone())
            })
            .collect();
        Curves { points }
    }

    fn svg(&self, title: &str) -> Result<String, RunError> {
        register_font()?;
        let mut out = String::new();
        {
            let root = SVGBackend::with_string(&mut out, SIZE).into_drawing_area();
            self.draw(&root, title)?;
            root.present().map_err(plot_error)?;
        }
        Ok(out)
    }

    fn png(&self, title: &str) -> Result<Vec<u8>, RunError> {
        register_font()?;
        let (w, h) = SIZE;
        let mut rgb = vec![0u8; (w * h * 3) as usize];
        {
            let root = BitMapBackend::with_buffer(&mut rgb, SIZE).into_drawing_area();
            self.draw(&root, title)?;
            root.present().map_err(plot_error)?;
        }
        let mut bytes = Vec::new();
        let mut encoder = png::Encoder::new(&mut bytes, w, h);
        encoder.set_color(png::ColorType::Rgb);
        encoder.set_depth(png::BitDepth::Eight);
        // Per-row filters and the best deflate level: a tenth of the default's size for
        // flat-coloured plots, for a few milliseconds more.
        encoder.set_adaptive_filter(png::AdaptiveFilterType::Adaptive);
        encoder.set_compression(png::Compression::Best);
        let mut writer = encoder.write_header().map_err(plot_error)?;
        writer.write_image_data(&rgb).map_err(plot_error)?;
        writer.finish().map_err(plot_error)?;
        Ok(bytes)
    }

    fn draw<DB: DrawingBackend>(
        &self,
        root: &DrawingArea<DB, Shift>,
        title: &str,
    ) -> Result<(), RunError> {
        root.fill(&WHITE).map_err(plot_error)?;
        let root = root
            .titled(&format!("Underflow {title}"), (FAMILY, 24))
            .map_err(plot_error)?;
        let panels = root.split_evenly((2, 2));
        let x_gen = |p: &(f64, f64, MetricsLine)| p.0;
        let x_wall = |p: &(f64, f64, MetricsLine)| p.1;
        self.panel(&panels[0], "fitness", "generation", x_gen, &FITNESS)?;
        self.panel(&panels[1], "accuracy", "generation", x_gen, &ACCURACY)?;
        self.panel(&panels[2], "fitness", "wall time (s)", x_wall, &FITNESS)?;
        self.panel(&panels[3], "accuracy", "wall time (s)", x_wall, &ACCURACY)?;
        Ok(())
    }

    fn panel<DB: DrawingBackend>(
        &self,
        area: &DrawingArea<DB, Shift>,
        y_name: &str,
        x_name: &str,
        x: fn(&(f64, f64, MetricsLine)) -> f64,
        series: &[Series],
    ) -> Result<(), RunError> {
        let data: Vec<Vec<(f64, f64)>> = series
            .iter()
            .map(|(_, _, y)| {
                self.points
                    .iter()
                    .filter_map(|p| y(&p.2).filter(|v| v.is_finite()).map(|v| (x(p), v)))
                    .collect()
            })
            .collect();
        let all = data.iter().flatten();
        let (mut x0, mut x1, mut y0, mut y1) = all.fold(
            (
                f64::INFINITY,
                f64::NEG_INFINITY,
                f64::INFINITY,
                f64::NEG_INFINITY,
            ),
            |(a, b, c, d), &(x, y)| (a.min(x), b.max(x), c.min(y), d.max(y)),
        );
        if x1 <= x0 {
            (x0, x1) = (x0.min(0.0), x0.max(0.0) + 1.0);
        }
        if y1 <= y0 {
            (y0, y1) = (y0 - 0.5, y0 + 0.5);
        }
        let pad = (y1 - y0) * 0.05;
        let mut chart = ChartBuilder::on(area)
            .margin(8)
            .caption(format!("{y_name} vs {x_name}"), (FAMILY, 18))
            .x_label_area_size(36)
            .y_label_area_size(56)
            .build_cartesian_2d(x0..x1, (y0 - pad)..(y1 + pad))
            .map_err(plot_error)?;
        chart
            .configure_mesh()
            .x_desc(x_name)
            .y_desc(y_name)
            .label_style((FAMILY, 13))
            .x_label_formatter(&tick)
            .y_label_formatter(&tick)
            .axis_desc_style((FAMILY, 14))
            .light_line_style(RGBColor(0xee, 0xee, 0xee))
            .draw()
            .map_err(plot_error)?;
        for ((name, color, _), points) in series.iter().zip(data) {
            if points.is_empty() {
                continue;
            }
            let color = *color;
            chart
                .draw_series(LineSeries::new(points, color.stroke_width(2)))
                .map_err(plot_error)?
                .label(*name)
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2))
                });
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::LowerRight)
            .label_font((FAMILY, 13))
            .background_style(WHITE.mix(0.8))
            .border_style(RGBColor(0xcc, 0xcc, 0xcc))
            .draw()
            .map_err(plot_error)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::run_dir::tests::line;

    #[test]
    fn writes_an_svg_and_a_png_with_the_curves() {
        let dir = std::env::temp_dir().join(format!("underflow-plot-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let err = write_curves(&dir).unwrap_err().to_string();
        assert!(err.contains("metrics.jsonl"), "{err}");
        let mut text = String::new();
        for g in 0..40 {
            let mut l = line(g, f64::from(g) * 0.5);
            if g % 10 == 9 {
                l.test_accuracy = Some(0.5 + f64::from(g) * 0.01);
            }
            text.push_str(&serde_json::to_string(&l).unwrap());
            text.push('\n');
        }
        text.push_str("{\"generation\":40,\"wall"); // cut short by a crash
        std::fs::write(dir.join("metrics.jsonl"), text).unwrap();
        let [svg, png] = write_curves(&dir).unwrap();

        let svg = std::fs::read_to_string(svg).unwrap();
        assert!(svg.contains("<svg"), "{}", &svg[..100]);
        for needle in [
            "fitness vs generation",
            "accuracy vs wall time (s)",
            "#D62728",
        ] {
            assert!(
                svg.to_ascii_uppercase()
                    .contains(&needle.to_ascii_uppercase()),
                "{needle} missing from the SVG"
            );
        }

        let decoder = png::Decoder::new(std::fs::File::open(png).unwrap());
        let mut reader = decoder.read_info().unwrap();
        let mut pixels = vec![0; reader.output_buffer_size()];
        let info = reader.next_frame(&mut pixels).unwrap();
        assert_eq!((info.width, info.height), SIZE);
        let count = |c: RGBColor| {
            pixels
                .chunks_exact(3)
                .filter(|p| p[0] == c.0 && p[1] == c.1 && p[2] == c.2)
                .count()
        };
        // Each curve appears in two panels, far longer than its legend sample.
        for color in [FITNESS_MEAN, FITNESS_MAX, BATCH_ACCURACY, TEST_ACCURACY] {
            assert!(count(color) > 500, "{color:?}: {} pixels", count(color));
        }
        // The title was drawn with the embedded font: dark pixels in the top band, where
        // there is nothing but the title.
        let title_band = &pixels[..(SIZE.0 * 30 * 3) as usize];
        let dark = title_band
            .chunks_exact(3)
            .filter(|p| p[0] < 80 && p[1] < 80 && p[2] < 80);
        assert!(dark.count() > 100);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_resumed_runs_clock_goes_on() {
        let lines = [line(0, 1.0), line(1, 2.0), line(2, 0.5), line(3, 1.5)];
        let walls: Vec<f64> = Curves::new(&lines).points.iter().map(|p| p.1).collect();
        assert_eq!(walls, [1.0, 2.0, 2.5, 3.5]);
    }
}

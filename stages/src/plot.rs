//! PNG plots (plotters, with an embedded DejaVu Sans so plots render on any machine):
//! loss curves, 2-D embeddings coloured by a label, bar charts and grey-level image
//! montages (sample slices).

use std::path::Path;
use std::sync::Once;

use plotters::prelude::*;
use plotters::style::FontStyle;

/// A plotting failure (the message names the file).
#[derive(Debug, thiserror::Error)]
#[error("cannot draw '{path}': {message}")]
pub struct PlotError {
    pub path: String,
    pub message: String,
}

fn err(path: &Path, e: impl std::fmt::Display) -> PlotError {
    PlotError {
        path: path.display().to_string(),
        message: e.to_string(),
    }
}

fn fonts() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let _ = plotters::style::register_font(
            "sans-serif",
            FontStyle::Normal,
            dejavu::sans::regular(),
        );
        let _ = plotters::style::register_font("sans-serif", FontStyle::Bold, dejavu::sans::bold());
    });
}

/// A named series of (x, y) points.
#[derive(Debug, Clone)]
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
}

/// A distinct colour per index (Tableau 10).
pub fn color(i: usize) -> RGBColor {
    const C: [(u8, u8, u8); 10] = [
        (31, 119, 180),
        (255, 127, 14),
        (44, 160, 44),
        (214, 39, 40),
        (148, 103, 189),
        (140, 86, 75),
        (227, 119, 194),
        (127, 127, 127),
        (188, 189, 34),
        (23, 190, 207),
    ];
    let (r, g, b) = C[i % C.len()];
    RGBColor(r, g, b)
}

fn bounds(series: &[Series], log_y: bool) -> (f64, f64, f64, f64) {
    let pts = series
        .iter()
        .flat_map(|s| s.points.iter())
        .filter(|p| p.0.is_finite() && p.1.is_finite() && (!log_y || p.1 > 0.0));
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for &(x, y) in pts {
        x0 = x0.min(x);
        x1 = x1.max(x);
        y0 = y0.min(y);
        y1 = y1.max(y);
    }
    if x0 > x1 {
        return (0.0, 1.0, if log_y { 1e-3 } else { 0.0 }, 1.0);
    }
    if x1 <= x0 {
        x1 = x0 + 1.0;
    }
    if y1 <= y0 {
        y1 = y0 + y0.abs().max(1e-6);
    }
    (x0, x1, y0, y1)
}

/// Line plot of several series (for example loss terms against steps). With `log_y`,
/// non-positive values are skipped.
pub fn line_plot(
    path: &Path,
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[Series],
    log_y: bool,
) -> Result<(), PlotError> {
    fonts();
    let root = BitMapBackend::new(path, (960, 600)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(path, e))?;
    let (x0, x1, y0, y1) = bounds(series, log_y);
    let mut builder = ChartBuilder::on(&root);
    builder
        .caption(title, ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(70);
    macro_rules! draw {
        ($chart:expr) => {{
            let mut chart = $chart;
            chart
                .configure_mesh()
                .x_desc(x_label)
                .y_desc(y_label)
                .draw()
                .map_err(|e| err(path, e))?;
            for (i, s) in series.iter().enumerate() {
                let c = color(i);
                let pts: Vec<(f64, f64)> = s
                    .points
                    .iter()
                    .copied()
                    .filter(|p| p.0.is_finite() && p.1.is_finite() && (!log_y || p.1 > 0.0))
                    .collect();
                // Sparse series (curves of a few evaluations) get a marker per point.
                if pts.len() <= 50 {
                    chart
                        .draw_series(pts.iter().map(|&p| Circle::new(p, 4, c.filled())))
                        .map_err(|e| err(path, e))?;
                }
                chart
                    .draw_series(LineSeries::new(pts, c.stroke_width(2)))
                    .map_err(|e| err(path, e))?
                    .label(s.name.clone())
                    .legend(move |(x, y)| {
                        PathElement::new(vec![(x, y), (x + 18, y)], c.stroke_width(3))
                    });
            }
            chart
                .configure_series_labels()
                .background_style(WHITE.mix(0.85))
                .border_style(BLACK)
                .draw()
                .map_err(|e| err(path, e))?;
        }};
    }
    if log_y {
        draw!(builder
            .build_cartesian_2d(x0..x1, (y0..y1 * 1.05).log_scale())
            .map_err(|e| err(path, e))?);
    } else {
        let pad = (y1 - y0) * 0.05;
        draw!(builder
            .build_cartesian_2d(x0..x1, (y0 - pad)..(y1 + pad))
            .map_err(|e| err(path, e))?);
    }
    root.present().map_err(|e| err(path, e))?;
    Ok(())
}

/// One panel of a scatter figure: points with a class index each.
#[derive(Debug, Clone)]
pub struct ScatterPanel {
    pub title: String,
    pub points: Vec<(f64, f64, usize)>,
}

/// Side-by-side scatter panels sharing one legend of class names (for example a t-SNE
/// of content vectors and one of style vectors, coloured by domain).
pub fn scatter_panels(
    path: &Path,
    title: &str,
    panels: &[ScatterPanel],
    class_names: &[String],
) -> Result<(), PlotError> {
    fonts();
    let w = 520 * panels.len().max(1) as u32;
    let root = BitMapBackend::new(path, (w, 560)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(path, e))?;
    let root = root
        .titled(title, ("sans-serif", 22))
        .map_err(|e| err(path, e))?;
    let areas = root.split_evenly((1, panels.len().max(1)));
    for (panel, area) in panels.iter().zip(areas.iter()) {
        let s = Series {
            name: String::new(),
            points: panel.points.iter().map(|p| (p.0, p.1)).collect(),
        };
        let (x0, x1, y0, y1) = bounds(std::slice::from_ref(&s), false);
        let (px, py) = ((x1 - x0) * 0.05, (y1 - y0) * 0.05);
        let mut chart = ChartBuilder::on(area)
            .caption(&panel.title, ("sans-serif", 18))
            .margin(10)
            .x_label_area_size(30)
            .y_label_area_size(40)
            .build_cartesian_2d((x0 - px)..(x1 + px), (y0 - py)..(y1 + py))
            .map_err(|e| err(path, e))?;
        chart.configure_mesh().draw().map_err(|e| err(path, e))?;
        for (ci, name) in class_names.iter().enumerate() {
            let c = color(ci);
            let pts: Vec<(f64, f64)> = panel
                .points
                .iter()
                .filter(|p| p.2 == ci)
                .map(|p| (p.0, p.1))
                .collect();
            chart
                .draw_series(pts.into_iter().map(|p| Circle::new(p, 4, c.filled())))
                .map_err(|e| err(path, e))?
                .label(name.clone())
                .legend(move |(x, y)| Circle::new((x + 6, y), 4, c.filled()));
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()
            .map_err(|e| err(path, e))?;
    }
    root.present().map_err(|e| err(path, e))?;
    Ok(())
}

/// Grouped bar chart: `values[g][s]` is the bar of series `s` in group `g`.
pub fn bar_chart(
    path: &Path,
    title: &str,
    y_label: &str,
    groups: &[String],
    series: &[String],
    values: &[Vec<f64>],
) -> Result<(), PlotError> {
    fonts();
    let root = BitMapBackend::new(path, (960, 600)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(path, e))?;
    let ymax = values
        .iter()
        .flatten()
        .copied()
        .filter(|v| v.is_finite())
        .fold(0.0f64, f64::max)
        .max(1e-6)
        * 1.35; // headroom above the bars for the legend
    let ng = groups.len().max(1);
    let ns = series.len().max(1);
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(50)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..ng as f64, 0.0..ymax)
        .map_err(|e| err(path, e))?;
    let gnames = groups.to_vec();
    chart
        .configure_mesh()
        .disable_x_mesh()
        .y_desc(y_label)
        .x_labels(ng * 2 + 1)
        .x_label_formatter(&|x| {
            let g = x.floor() as usize;
            if (x - g as f64 - 0.5).abs() < 1e-6 && g < gnames.len() {
                gnames[g].clone()
            } else {
                String::new()
            }
        })
        .draw()
        .map_err(|e| err(path, e))?;
    let width = 0.8 / ns as f64;
    for (si, sname) in series.iter().enumerate() {
        let c = color(si);
        let bars: Vec<Rectangle<(f64, f64)>> = (0..groups.len())
            .filter_map(|g| {
                values
                    .get(g)
                    .and_then(|v| v.get(si))
                    .copied()
                    .filter(|v| v.is_finite())
                    .map(|v| (g, v))
            })
            .map(|(g, v)| {
                let x = g as f64 + 0.1 + si as f64 * width;
                Rectangle::new([(x, 0.0), (x + width * 0.95, v)], c.filled())
            })
            .collect();
        chart
            .draw_series(bars)
            .map_err(|e| err(path, e))?
            .label(sname.clone())
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], c.filled()));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(|e| err(path, e))?;
    root.present().map_err(|e| err(path, e))?;
    Ok(())
}

/// A grey-level 2-D image, row-major `height x width`, values mapped from `[lo, hi]`.
#[derive(Debug, Clone)]
pub struct GrayImage {
    pub title: String,
    pub width: usize,
    pub height: usize,
    pub pixels: Vec<f32>,
    pub lo: f32,
    pub hi: f32,
}

/// `text` unchanged when `fits` it, else its longest prefix that fits with "…" appended.
fn cut_to_fit(text: &str, fits: impl Fn(&str) -> bool) -> String {
    if fits(text) {
        return text.to_string();
    }
    let mut shown = text.to_string();
    while !shown.is_empty() && !fits(&format!("{shown}…")) {
        shown.pop();
    }
    shown + "…"
}

/// A grid of grey-level images (`rows[r][c]`), each scaled to `cell` pixels.
pub fn montage(
    path: &Path,
    title: &str,
    rows: &[Vec<GrayImage>],
    cell: u32,
) -> Result<(), PlotError> {
    fonts();
    let ncols = rows.iter().map(|r| r.len()).max().unwrap_or(1).max(1) as u32;
    let nrows = rows.len().max(1) as u32;
    let (head, label) = (36u32, 20u32);
    let root =
        BitMapBackend::new(path, (ncols * cell, head + nrows * (cell + label))).into_drawing_area();
    root.fill(&BLACK).map_err(|e| err(path, e))?;
    root.draw_text(title, &("sans-serif", 20).into_font().color(&WHITE), (8, 8))
        .map_err(|e| err(path, e))?;
    for (r, row) in rows.iter().enumerate() {
        for (c, img) in row.iter().enumerate() {
            let x0 = c as u32 * cell;
            let y0 = head + r as u32 * (cell + label);
            let font = ("sans-serif", 13).into_font().color(&WHITE);
            // Titles are cut to their cell (with "…"), not drawn over the next one.
            let fits = |t: &str| {
                root.estimate_text_size(t, &font)
                    .map(|(w, _)| w + 8 <= cell)
                    .unwrap_or(true)
            };
            let shown = cut_to_fit(&img.title, fits);
            root.draw_text(&shown, &font, (x0 as i32 + 4, y0 as i32 + 2))
                .map_err(|e| err(path, e))?;
            if img.width == 0 || img.height == 0 {
                continue;
            }
            let scale = (cell as f32 / img.width.max(img.height) as f32).max(1e-6);
            let range = (img.hi - img.lo).max(1e-12);
            for py in 0..cell {
                for px in 0..cell {
                    let (sx, sy) = ((px as f32 / scale) as usize, (py as f32 / scale) as usize);
                    if sx >= img.width || sy >= img.height {
                        continue;
                    }
                    let v = ((img.pixels[sy * img.width + sx] - img.lo) / range).clamp(0.0, 1.0);
                    let g = (v * 255.0) as u8;
                    root.draw_pixel(
                        ((x0 + px) as i32, (y0 + label + py) as i32),
                        &RGBColor(g, g, g),
                    )
                    .map_err(|e| err(path, e))?;
                }
            }
        }
    }
    root.present().map_err(|e| err(path, e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn is_png(p: &Path) -> bool {
        std::fs::read(p)
            .map(|b| b.len() > 2000 && b.starts_with(&[0x89, b'P', b'N', b'G']))
            .unwrap_or(false)
    }

    #[test]
    fn long_titles_are_cut_to_their_cell() {
        let fits = |t: &str| t.chars().count() <= 10;
        assert_eq!(cut_to_fit("axial", fits), "axial");
        assert_eq!(
            cut_to_fit("synth_arterial_case_001_00 axial", fits),
            "synth_art…"
        );
        assert_eq!(cut_to_fit("abc", |_| false), "…");
    }

    #[test]
    fn draws_every_plot_kind() {
        let d = tempfile::tempdir().unwrap();
        let s = vec![
            Series {
                name: "loss".into(),
                points: (0..50)
                    .map(|i| (i as f64, 1.0 / (1.0 + i as f64)))
                    .collect(),
            },
            Series {
                name: "other".into(),
                points: (0..50).map(|i| (i as f64, 0.5)).collect(),
            },
        ];
        line_plot(&d.path().join("a.png"), "losses", "step", "loss", &s, true).unwrap();
        line_plot(&d.path().join("b.png"), "losses", "step", "loss", &s, false).unwrap();
        let panel = ScatterPanel {
            title: "content".into(),
            points: (0..30).map(|i| (i as f64, (i * i) as f64, i % 3)).collect(),
        };
        scatter_panels(
            &d.path().join("c.png"),
            "t-SNE",
            &[panel.clone(), panel],
            &["a".into(), "b".into(), "c".into()],
        )
        .unwrap();
        bar_chart(
            &d.path().join("d.png"),
            "dice",
            "Dice",
            &["1-shot".into(), "10%".into()],
            &["scratch".into(), "meduet".into()],
            &[vec![0.2, 0.3], vec![0.5, 0.6]],
        )
        .unwrap();
        let img = GrayImage {
            title: "axial".into(),
            width: 16,
            height: 12,
            pixels: (0..192).map(|i| i as f32).collect(),
            lo: 0.0,
            hi: 191.0,
        };
        montage(
            &d.path().join("e.png"),
            "samples",
            &[vec![img.clone(), img]],
            64,
        )
        .unwrap();
        for f in ["a", "b", "c", "d", "e"] {
            assert!(
                is_png(&d.path().join(format!("{f}.png"))),
                "{f}.png is a PNG"
            );
        }
    }
}

//! SVG bar charts of the results, written beside `results.json`: one grouped bar chart per
//! entry of [`CHARTS`], the section's rows (targets) along the x axis and a coloured bar per
//! listed column.
//!
//! Text is written as SVG `<text>` for the viewer to render with its own sans-serif font:
//! plotters is built without its font features, so it never looks for fonts on this machine
//! and only estimates text widths (from the character count) for the layout. A fresh machine
//! without any font package draws the same charts.

use std::path::{Path, PathBuf};

use anyhow::Context;
use plotters::{
    coord::ranged1d::{KeyPointHint, NoDefaultFormatting, Ranged, ValueFormatter},
    prelude::{
        BLACK, ChartBuilder, Color, IntoDrawingArea, IntoFont, RGBColor, Rectangle, SVGBackend,
        SeriesLabelPosition, TRANSPARENT, Text, WHITE,
    },
    style::text_anchor::{HPos, Pos, VPos},
};

use super::report::{Row, Section};

/// One chart: which section it draws, into which file, and which columns as bars.
pub struct Chart {
    /// The section's key ([`Section::key`]).
    pub section: &'static str,
    pub file: &'static str,
    pub title: &'static str,
    pub y_label: &'static str,
    /// Only the rows whose target starts with this, named without it; `""` for every row.
    pub rows: &'static str,
    /// (column key, legend label), one bar per row for each.
    pub bars: &'static [(&'static str, &'static str)],
}

const LATENCY: &[(&str, &str)] = &[
    ("p50_ms_1000", "p50 @1000/s"),
    ("p99_ms_1000", "p99 @1000/s"),
    ("p50_ms_4000", "p50 @4000/s"),
    ("p99_ms_4000", "p99 @4000/s"),
];
const CPU_PER_10K_CALLS: &[(&str, &str)] = &[("cpu_s_per_10k", "proxy CPU")];
const CALLS_PER_SECOND: &[(&str, &str)] = &[("calls_per_second", "calls/s")];
const MESSAGES_PER_SECOND: &[(&str, &str)] = &[("messages_per_second", "messages/s")];
const CPU_PER_100K_MESSAGES: &[(&str, &str)] = &[("cpu_s_per_100k", "proxy CPU")];

/// Every chart the benchmark draws; one whose section did not run, or has none of its
/// columns, is left out.
pub const CHARTS: &[Chart] = &[
    Chart {
        section: "grpc_unary",
        file: "grpc-latency.svg",
        title: "Unary gRPC: latency at a fixed rate",
        y_label: "ms",
        rows: "",
        bars: LATENCY,
    },
    Chart {
        section: "grpc_unary",
        file: "grpc-cpu.svg",
        title: "Unary gRPC: proxy CPU per call",
        y_label: "proxy CPU s per 10k calls",
        rows: "",
        bars: CPU_PER_10K_CALLS,
    },
    Chart {
        section: "grpc_unary",
        file: "grpc-throughput.svg",
        title: "Unary gRPC: calls per second, closed loop",
        y_label: "calls/s",
        rows: "",
        bars: CALLS_PER_SECOND,
    },
    Chart {
        section: "grpc_many",
        file: "grpc-many-latency.svg",
        title: "gRPC, many clients: latency at a fixed rate",
        y_label: "ms",
        rows: "",
        bars: LATENCY,
    },
    Chart {
        section: "grpc_many",
        file: "grpc-many-cpu.svg",
        title: "gRPC, many clients: proxy CPU per call",
        y_label: "proxy CPU s per 10k calls",
        rows: "",
        bars: CPU_PER_10K_CALLS,
    },
    Chart {
        section: "grpc_many",
        file: "grpc-many-throughput.svg",
        title: "gRPC, many clients: calls per second, closed loop",
        y_label: "calls/s",
        rows: "",
        bars: CALLS_PER_SECOND,
    },
    // Server streams carry some 40 times the messages bidirectional ones do: each kind has
    // its own charts, else one kind's bars would be too short to read.
    Chart {
        section: "grpc_streaming",
        file: "streaming-server-throughput.svg",
        title: "Server-streaming gRPC: messages per second",
        y_label: "messages/s",
        rows: "server streaming: ",
        bars: MESSAGES_PER_SECOND,
    },
    Chart {
        section: "grpc_streaming",
        file: "streaming-server-cpu.svg",
        title: "Server-streaming gRPC: proxy CPU per message",
        y_label: "proxy CPU s per 100k messages",
        rows: "server streaming: ",
        bars: CPU_PER_100K_MESSAGES,
    },
    Chart {
        section: "grpc_streaming",
        file: "streaming-bidi-throughput.svg",
        title: "Bidirectional streaming gRPC (ping-pong): messages per second",
        y_label: "messages/s",
        rows: "bidi streaming: ",
        bars: MESSAGES_PER_SECOND,
    },
    Chart {
        section: "grpc_streaming",
        file: "streaming-bidi-cpu.svg",
        title: "Bidirectional streaming gRPC (ping-pong): proxy CPU per message",
        y_label: "proxy CPU s per 100k messages",
        rows: "bidi streaming: ",
        bars: CPU_PER_100K_MESSAGES,
    },
];

/// Bar colours in legend order (Okabe and Ito's, told apart with most colour blindness).
const COLOURS: [RGBColor; 6] = [
    RGBColor(0x00, 0x72, 0xB2),
    RGBColor(0xE6, 0x9F, 0x00),
    RGBColor(0x00, 0x9E, 0x73),
    RGBColor(0xCC, 0x79, 0xA7),
    RGBColor(0x56, 0xB4, 0xE9),
    RGBColor(0xD5, 0x5E, 0x00),
];

const HEIGHT: u32 = 480;
const MIN_WIDTH: u32 = 640;
/// Room for the y axis's labels and description.
const Y_AREA: u32 = 75;
const X_AREA: u32 = 40;
const MARGIN: u32 = 15;
/// Pixels per character of the x labels (13 px sans-serif), with some to spare: sizes each
/// row's slot so that the targets' names do not run into each other.
const LABEL_CHAR_PX: u32 = 8;
const MIN_BAR_PX: u32 = 36;
/// As [`LABEL_CHAR_PX`], for the title (20 px).
const TITLE_CHAR_PX: u32 = 11;
/// The share of a row's slot left empty between groups of bars.
const GROUP_GAP: f64 = 0.25;

/// Writes every chart of [`CHARTS`] that has something to draw into `out_dir`, and removes
/// any other chart file of that list left there by an earlier run (so a chart never outlives
/// its figures); returns the files written.
pub fn write_all(sections: &[Section], out_dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut written = Vec::new();
    for chart in CHARTS {
        let path = out_dir.join(chart.file);
        let svg = match sections.iter().find(|s| s.key == chart.section) {
            Some(section) => {
                render(chart, section).with_context(|| format!("drawing {}", chart.file))?
            }
            None => None,
        };
        match svg {
            Some(svg) => {
                std::fs::write(&path, svg)
                    .with_context(|| format!("writing {}", path.display()))?;
                written.push(path);
            }
            None if path.exists() => std::fs::remove_file(&path)
                .with_context(|| format!("removing the stale {}", path.display()))?,
            None => {}
        }
    }
    Ok(written)
}

/// The chart as SVG text, or `None` when the section has none of its columns measured.
/// Rows not of the chart ([`Chart::rows`]) or with no value in any of its columns are left
/// out; a row missing one column's value has no bar for it.
pub fn render(chart: &Chart, section: &Section) -> anyhow::Result<Option<String>> {
    let bars: Vec<(&str, &str)> = chart
        .bars
        .iter()
        .copied()
        .filter(|(key, _)| section.has_column(key))
        .collect();
    let rows: Vec<(&str, &Row)> = section
        .rows
        .iter()
        .filter_map(|row| Some((row.target.strip_prefix(chart.rows)?, row)))
        .filter(|(_, row)| bars.iter().any(|(key, _)| value(row, key).is_some()))
        .collect();
    if rows.is_empty() {
        return Ok(None);
    }
    let mut svg = String::new();
    draw(chart, &bars, &rows, &mut svg)?;
    Ok(Some(svg))
}

/// A column's value in a row, if it is a finite number.
fn value(row: &Row, key: &str) -> Option<f64> {
    row.get(key).filter(|v| v.is_finite())
}

fn draw(
    chart: &Chart,
    bars: &[(&str, &str)],
    rows: &[(&str, &Row)],
    svg: &mut String,
) -> anyhow::Result<()> {
    let longest = rows
        .iter()
        .map(|(label, _)| label.chars().count())
        .max()
        .unwrap_or(0) as u32;
    let slot = (longest * LABEL_CHAR_PX + 16).max(MIN_BAR_PX * bars.len() as u32 + 16);
    let title = chart.title.chars().count() as u32 * TITLE_CHAR_PX + 2 * MARGIN;
    let width = (Y_AREA + 2 * MARGIN + slot * rows.len() as u32)
        .max(title)
        .max(MIN_WIDTH);
    let (y_min, y_max) = y_range(bars, rows);

    let root = SVGBackend::with_string(svg, (width, HEIGHT)).into_drawing_area();
    root.fill(&WHITE)?;
    let slots = Slots(rows.iter().map(|(label, _)| label.to_string()).collect());
    let mut plot = ChartBuilder::on(&root)
        .caption(chart.title, ("sans-serif", 20).into_font())
        .margin(MARGIN)
        .x_label_area_size(X_AREA)
        .y_label_area_size(Y_AREA)
        .build_cartesian_2d(slots, y_min..y_max)?;
    plot.configure_mesh()
        .disable_x_mesh()
        .light_line_style(TRANSPARENT)
        .x_label_style(("sans-serif", 13))
        .y_label_formatter(&|v| short(*v))
        .y_desc(chart.y_label)
        .draw()?;

    let bar_width = (1.0 - GROUP_GAP) / bars.len() as f64;
    for (j, &(key, label)) in bars.iter().enumerate() {
        let colour = COLOURS[j % COLOURS.len()];
        let left = |i: usize| i as f64 + GROUP_GAP / 2.0 + j as f64 * bar_width;
        let values: Vec<(usize, f64)> = rows
            .iter()
            .enumerate()
            .filter_map(|(i, (_, row))| value(row, key).map(|v| (i, v)))
            .collect();
        plot.draw_series(values.iter().map(|&(i, v)| {
            Rectangle::new([(left(i), 0.0), (left(i) + bar_width, v)], colour.filled())
        }))?
        .label(label)
        .legend(move |(x, y)| Rectangle::new([(x, y - 6), (x + 12, y + 6)], colour.filled()));
        // The figure above (or, for a negative one, below) its bar.
        let above = Pos::new(HPos::Center, VPos::Bottom);
        let below = Pos::new(HPos::Center, VPos::Top);
        plot.draw_series(values.iter().map(|&(i, v)| {
            let style = ("sans-serif", 11)
                .into_font()
                .color(&BLACK)
                .pos(if v < 0.0 { below } else { above });
            Text::new(short(v), (left(i) + bar_width / 2.0, v), style)
        }))?;
    }
    plot.configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .label_font(("sans-serif", 13))
        .draw()?;
    root.present()?;
    Ok(())
}

/// The x axis: one unit per row, labelled with the row's name at its middle.
struct Slots(Vec<String>);

impl Ranged for Slots {
    type FormatOption = NoDefaultFormatting;
    type ValueType = f64;

    fn map(&self, value: &f64, (from, to): (i32, i32)) -> i32 {
        let share = value / self.0.len().max(1) as f64;
        from + (share * f64::from(to - from)).round() as i32
    }

    fn key_points<Hint: KeyPointHint>(&self, _: Hint) -> Vec<f64> {
        (0..self.0.len()).map(|i| i as f64 + 0.5).collect()
    }

    fn range(&self) -> std::ops::Range<f64> {
        0.0..self.0.len() as f64
    }
}

impl ValueFormatter<f64> for Slots {
    fn format_ext(&self, value: &f64) -> String {
        self.0
            .get(value.floor() as usize)
            .cloned()
            .unwrap_or_default()
    }
}

/// The y axis's range: from 0 (or the lowest value) to the highest, with room above the bars
/// for their figures and the legend (drawn in the upper right, inside the plot).
fn y_range(bars: &[(&str, &str)], rows: &[(&str, &Row)]) -> (f64, f64) {
    let values = || {
        rows.iter()
            .flat_map(|(_, row)| bars.iter().filter_map(|(key, _)| value(row, key)))
    };
    let max = values().fold(0.0, f64::max);
    let min = values().fold(0.0, f64::min);
    // The legend takes about 20 px a line of the plot's ~380 px.
    let legend = (bars.len() as f64 * 20.0 + 30.0) / 380.0;
    let top = if max > 0.0 { max / (1.0 - legend) } else { 1.0 };
    let bottom = if min < 0.0 { min * 1.15 } else { 0.0 };
    (bottom, top)
}

/// A figure in at most 3 significant digits, with k or M for thousands and millions: short
/// enough for an axis tick or to sit above a bar.
fn short(v: f64) -> String {
    let (scaled, suffix) = match v.abs() {
        a if a >= 1e6 => (v / 1e6, "M"),
        a if a >= 1e4 => (v / 1e3, "k"),
        _ => (v, ""),
    };
    let digits = scaled.abs().max(1e-9).log10().floor() as i32;
    let decimals = (2 - digits).clamp(0, 4) as usize;
    let text = format!("{scaled:.decimals$}");
    let text = match text.contains('.') {
        true => text.trim_end_matches('0').trim_end_matches('.').to_string(),
        false => text,
    };
    format!("{text}{suffix}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::report::column;

    fn section() -> Section {
        let mut section = Section::new(
            "test_section",
            "a test",
            vec![
                column("rate", "rate", 0),
                column("cpu", "cpu", 3),
                column("name", "name", 0),
            ],
        );
        let mut direct = Row::new("direct");
        direct.set("rate", 1000.0).set("cpu", f64::NAN);
        let mut shunt = Row::new("shunt");
        shunt.set("rate", 900.0).set("cpu", 0.25);
        let mut peer = Row::new("peer & co");
        peer.set("rate", 450.5).set("cpu", 0.75);
        let mut unmeasured = Row::new("unmeasured");
        unmeasured.text("name", "text only");
        section.rows = vec![direct, shunt, peer, unmeasured];
        section
    }

    const CHART: Chart = Chart {
        section: "test_section",
        file: "test.svg",
        title: "A test chart",
        y_label: "per second",
        rows: "",
        bars: &[
            ("rate", "rate"),
            ("cpu", "CPU"),
            ("missing", "not a column"),
        ],
    };

    /// `<rect` elements filled with `colour`.
    fn rects_of(svg: &str, colour: RGBColor) -> usize {
        let fill = format!("fill=\"#{:02X}{:02X}{:02X}\"", colour.0, colour.1, colour.2);
        svg.lines()
            .filter(|l| l.trim_start().starts_with("<rect") && l.contains(&fill))
            .count()
    }

    #[test]
    fn a_chart_has_a_bar_per_measured_value_and_a_legend_entry_per_column() {
        let dir = std::env::temp_dir().join(format!("shunt-charts-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let stale = dir.join(CHARTS[0].file);
        std::fs::write(&stale, "old").unwrap();

        let svg = render(&CHART, &section())
            .unwrap()
            .expect("something to draw");
        let path = dir.join(CHART.file);
        std::fs::write(&path, &svg).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        // 3 rates and 2 CPU figures (direct's is NaN), each colour's legend swatch besides;
        // the missing column has neither.
        assert_eq!(rects_of(&svg, COLOURS[0]), 3 + 1, "{svg}");
        assert_eq!(rects_of(&svg, COLOURS[1]), 2 + 1, "{svg}");
        assert_eq!(rects_of(&svg, COLOURS[2]), 0, "{svg}");
        for text in [
            "direct",
            "shunt",
            "peer &amp; co",
            "A test chart",
            "per second",
            "CPU",
        ] {
            assert!(svg.contains(text), "no {text:?} in {svg}");
        }
        assert!(
            !svg.contains("unmeasured"),
            "a row with nothing to draw: {svg}"
        );
        assert!(!svg.contains("not a column"), "{svg}");

        // The sections given have none of CHARTS' keys: nothing is drawn, and a chart left
        // by an earlier run is removed.
        let written = write_all(&[section()], &dir).unwrap();
        assert!(written.is_empty(), "{written:?}");
        assert!(!stale.exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_chart_of_some_rows_names_them_without_their_prefix() {
        let mut section = Section::new("test_section", "a test", vec![column("rate", "rate", 0)]);
        for (target, rate) in [("a: x", 1.0), ("a: y", 2.0), ("b: x", 3.0)] {
            let mut row = Row::new(target);
            row.set("rate", rate);
            section.rows.push(row);
        }
        let chart = Chart {
            rows: "a: ",
            bars: &[("rate", "rate")],
            ..CHART
        };
        let svg = render(&chart, &section)
            .unwrap()
            .expect("something to draw");
        assert_eq!(rects_of(&svg, COLOURS[0]), 2 + 1, "{svg}");
        assert!(!svg.contains("a: ") && !svg.contains("b: "), "{svg}");
        assert!(svg.contains("\nx\n") && svg.contains("\ny\n"), "{svg}");
    }

    #[test]
    fn a_section_without_the_columns_has_no_chart() {
        let chart = Chart {
            bars: &[("missing", "missing")],
            ..CHART
        };
        assert!(render(&chart, &section()).unwrap().is_none());
    }

    #[test]
    fn figures_are_short() {
        assert_eq!(short(0.0), "0");
        assert_eq!(short(0.123_456), "0.123");
        assert_eq!(short(12.34), "12.3");
        assert_eq!(short(950.0), "950");
        assert_eq!(short(9_999.0), "9999");
        assert_eq!(short(45_678.0), "45.7k");
        assert_eq!(short(250_000.0), "250k");
        assert_eq!(short(2_500_000.0), "2.5M");
        assert_eq!(short(-1.5), "-1.5");
    }
}

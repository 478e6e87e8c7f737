//! `ftvm-bench plots`: draws the committed results (`benches/results/*.json`) as SVG plots in
//! `benches/results/plots/`: FT overhead vs vCPUs, epoch pause vs dirty pages, the failover
//! time and output-latency distributions (CDFs), and FT-link throughput vs TCP. It reads
//! only the JSON, so plots can be redrawn without rerunning anything; `ftvm-bench all` runs
//! every benchmark and then this.
use anyhow::{bail, Context, Result};
use plotters::prelude::*;
use serde_json::Value;
use std::path::{Path, PathBuf};

const SIZE: (u32, u32) = (760, 460);
const FONT: &str = "sans-serif";

fn results_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("results")
}

fn load(name: &str) -> Option<Value> {
    let p = results_dir().join(format!("{name}.json"));
    let text = std::fs::read_to_string(&p).ok()?;
    serde_json::from_str(&text).ok()
}

fn num(v: &Value) -> Option<f64> {
    v.as_f64()
}

fn nums(v: &Value) -> Vec<f64> {
    v.as_array()
        .map(|a| a.iter().filter_map(num).collect())
        .unwrap_or_default()
}

pub fn run(_args: &[String]) -> Result<()> {
    let dir = results_dir().join("plots");
    std::fs::create_dir_all(&dir)?;
    let mut drawn = Vec::new();
    if let Some(ft) = load("ft") {
        drawn.push(overhead(&ft, &dir.join("overhead-vs-vcpus.svg"))?);
        drawn.push(pause(&ft, &dir.join("pause-vs-dirty-pages.svg"))?);
        drawn.push(cdf(
            &nums(&ft["failover_ms"]),
            "Failover: SIGKILL of the primary to the next console line",
            "ms",
            Some((100.0, "target p99 100 ms")),
            &dir.join("failover-cdf.svg"),
        )?);
        let holds: Vec<f64> = nums(&ft["output_hold_us"])
            .into_iter()
            .map(|us| us / 1000.0)
            .collect();
        if !holds.is_empty() {
            drawn.push(cdf(
                &holds,
                "Output latency added by the output rule (per released epoch)",
                "ms",
                Some((5.0, "target p50 5 ms")),
                &dir.join("output-latency-cdf.svg"),
            )?);
        } else {
            eprintln!("plots: ft.json has no output_hold_us samples (rerun `ftvm-bench ft`); no output-latency CDF");
        }
    } else {
        eprintln!("plots: no benches/results/ft.json; run `ftvm-bench ft` first");
    }
    if let Some(link) = load("link") {
        drawn.push(link_plot(&link, &dir.join("link-throughput.svg"))?);
    }
    for p in &drawn {
        println!("wrote {}", p.display());
    }
    Ok(())
}

type Chart<'a, 'b> = ChartContext<
    'a,
    SVGBackend<'b>,
    Cartesian2d<plotters::coord::types::RangedCoordf64, plotters::coord::types::RangedCoordf64>,
>;

/// A titled x/y chart with its mesh and axis descriptions drawn.
fn xy_chart<'a, 'b>(
    root: &'a DrawingArea<SVGBackend<'b>, plotters::coord::Shift>,
    title: &str,
    (x, y): (std::ops::Range<f64>, std::ops::Range<f64>),
    (x_desc, y_desc): (&str, &str),
) -> Result<Chart<'a, 'b>> {
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(root)
        .caption(title, (FONT, 17))
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(55)
        .build_cartesian_2d(x, y)?;
    chart
        .configure_mesh()
        .x_desc(x_desc)
        .y_desc(y_desc)
        .draw()?;
    Ok(chart)
}

/// A labelled line through `pts` with a dot of radius `dot` on each point.
fn line(
    chart: &mut Chart,
    pts: Vec<(f64, f64)>,
    color: RGBColor,
    label: &str,
    dot: u32,
) -> Result<()> {
    chart
        .draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))?
        .label(label)
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
    chart.draw_series(pts.into_iter().map(|q| Circle::new(q, dot, color.filled())))?;
    Ok(())
}

fn legend<'a, 'b: 'a>(chart: &mut Chart<'a, 'b>, at: SeriesLabelPosition) -> Result<()> {
    chart
        .configure_series_labels()
        .position(at)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()?;
    Ok(())
}

fn overhead(ft: &Value, out: &Path) -> Result<PathBuf> {
    let rows = ft["overhead"].as_array().context("ft.json: overhead")?;
    let series = [
        (
            "FT on (defaults: 2 MiB chunks, XOR+LZ4, 50 ms epochs)",
            "ratio_ft_vs_off",
            BLACK,
        ),
        ("FT on, raw pages", "ratio_ft_raw_vs_off", RED),
        ("FT on, KVM dirty log", "ratio_ft_dirty_log_vs_off", BLUE),
        ("FT on, 20 ms epochs", "ratio_ft_epoch_20_vs_off", CYAN),
        ("KVM dirty log only", "ratio_dirty_tracking_vs_off", GREEN),
        (
            "2 MiB chunk tracking only",
            "ratio_wp_tracking_vs_off",
            MAGENTA,
        ),
    ];
    let pts = |key: &str| -> Vec<(f64, f64)> {
        rows.iter()
            .filter_map(|r| Some((num(&r["vcpus"])?, num(&r[key])?)))
            .collect()
    };
    let ymax = series
        .iter()
        .flat_map(|s| pts(s.1))
        .map(|p| p.1)
        .fold(1.2f64, f64::max)
        * 1.5; // room for the legend above the lines
    let root = SVGBackend::new(out, SIZE).into_drawing_area();
    let mut chart = xy_chart(
        &root,
        "dirtier compile-profile (kernel-compile stand-in): guest time FT on / off",
        (0.5..8.5, 0.0..ymax),
        ("vCPUs", "slowdown (×)"),
    )?;
    for (name, key, color) in series {
        line(&mut chart, pts(key), color, name, 4)?;
    }
    line(
        &mut chart,
        vec![(0.5, 1.05), (8.5, 1.05)],
        BLACK,
        "target 1.05× (vSphere 4 FT, kernel compile)",
        0,
    )?;
    legend(&mut chart, SeriesLabelPosition::UpperRight)?;
    root.present()?;
    Ok(out.into())
}

fn pause(ft: &Value, out: &Path) -> Result<PathBuf> {
    let scatter: Vec<(f64, f64)> = ft["pause_epochs"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|e| Some((num(&e[0])?, num(&e[1])? / 1000.0)))
                .collect()
        })
        .unwrap_or_default();
    let bins_of = |key: &str| -> Vec<(f64, f64, f64)> {
        ft[key]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|b| {
                        let from = num(&b["dirty_pages_from"])?;
                        let to = num(&b["dirty_pages_to"])
                            .unwrap_or(from * 2.0)
                            .min(from * 2.0 + 256.0);
                        Some((
                            (from + to) / 2.0,
                            num(&b["pause_us_p50"])? / 1000.0,
                            num(&b["pause_us_p99"])? / 1000.0,
                        ))
                    })
                    .collect()
            })
            .unwrap_or_default()
    };
    let bins = bins_of("pause_vs_dirty_pages");
    if bins.is_empty() {
        bail!("ft.json: no pause_vs_dirty_pages");
    }
    let paused = bins_of("pause_vs_dirty_pages_copy_paused");
    let xmax = scatter
        .iter()
        .map(|p| p.0)
        .chain(bins.iter().map(|b| b.0))
        .fold(4096.0f64, f64::max)
        * 1.05;
    // The axis ends above the highest bin p99: a single descheduled epoch (tens of ms) would
    // flatten everything else. Epochs above it are counted in the title.
    let ymax = bins
        .iter()
        .chain(&paused)
        .map(|b| b.2)
        .fold(2.5f64, f64::max)
        * 1.15;
    let above = scatter.iter().filter(|p| p.1 > ymax).count();
    let scatter: Vec<(f64, f64)> = scatter.into_iter().filter(|p| p.1 <= ymax).collect();
    let title = format!(
        "Epoch pause vs dirty pages (FT primary, dirtier; {above} epoch(s) above {ymax:.0} ms not drawn)"
    );
    let root = SVGBackend::new(out, SIZE).into_drawing_area();
    let mut chart = xy_chart(
        &root,
        &title,
        (0.0..xmax, 0.0..ymax),
        ("dirty pages in the epoch", "guest paused (ms)"),
    )?;
    chart
        .draw_series(
            scatter
                .iter()
                .map(|p| Circle::new(*p, 2, RGBColor(120, 120, 120).filled())),
        )?
        .label("one epoch")
        .legend(|(x, y)| Circle::new((x + 10, y), 3, RGBColor(120, 120, 120).filled()));
    let light_blue = RGBColor(140, 170, 230);
    let light_red = RGBColor(235, 150, 150);
    for (name, series, idx, color) in [
        ("bin p50", &bins, 1, BLUE),
        ("bin p99", &bins, 2, RED),
        ("bin p50, --epoch-copy paused", &paused, 1, light_blue),
        ("bin p99, --epoch-copy paused", &paused, 2, light_red),
    ] {
        if series.is_empty() {
            continue;
        }
        let p: Vec<(f64, f64)> = series
            .iter()
            .map(|b| (b.0, if idx == 1 { b.1 } else { b.2 }))
            .collect();
        line(&mut chart, p, color, name, 4)?;
    }
    chart
        .draw_series(std::iter::once(Circle::new(
            (4096.0, 2.0),
            6,
            BLACK.stroke_width(2),
        )))?
        .label("target: p99 ≤ 2 ms at 4096 pages")
        .legend(|(x, y)| Circle::new((x + 10, y), 5, BLACK.stroke_width(2)));
    legend(&mut chart, SeriesLabelPosition::UpperLeft)?;
    root.present()?;
    Ok(out.into())
}

/// An empirical CDF of `samples` with an optional vertical target line.
fn cdf(
    samples: &[f64],
    title: &str,
    unit: &str,
    target: Option<(f64, &str)>,
    out: &Path,
) -> Result<PathBuf> {
    let mut s = samples.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len().max(1) as f64;
    let pts: Vec<(f64, f64)> = s
        .iter()
        .enumerate()
        .map(|(i, v)| (*v, (i + 1) as f64 / n))
        .collect();
    let xmax = s
        .last()
        .copied()
        .unwrap_or(1.0)
        .max(target.map_or(0.0, |t| t.0))
        * 1.1;
    let root = SVGBackend::new(out, SIZE).into_drawing_area();
    let mut chart = xy_chart(
        &root,
        &format!("{title} ({} samples)", s.len()),
        (0.0..xmax, 0.0..1.02),
        (unit, "fraction ≤ x"),
    )?;
    line(&mut chart, pts, BLUE, "measured", 2)?;
    if let Some((x, label)) = target {
        line(&mut chart, vec![(x, 0.0), (x, 1.02)], RED, label, 0)?;
    }
    legend(&mut chart, SeriesLabelPosition::LowerRight)?;
    root.present()?;
    Ok(out.into())
}

/// Median goodput per path: raw TCP and every QUIC tuning measured, as bars.
fn link_plot(link: &Value, out: &Path) -> Result<PathBuf> {
    let mut bars: Vec<(String, f64, RGBColor)> = Vec::new();
    for p in link["paths"].as_array().context("link.json: paths")? {
        if !p["skipped"].is_null() {
            continue;
        }
        let path = p["path"].as_str().unwrap_or("?");
        let short = if path.starts_with("loopback") {
            "lo"
        } else if path.starts_with("delay line") {
            "delay line"
        } else {
            "veth 10G"
        };
        if let Some(t) = num(&p["tcp_median_gbit_per_s"]) {
            bars.push((format!("{short}: TCP"), t, RGBColor(90, 90, 90)));
        }
        let iperf = nums(&p["iperf3_gbit_per_s"]);
        if !iperf.is_empty() {
            let m = crate::median_f64(&iperf);
            bars.push((format!("{short}: iperf3 TCP"), m, RGBColor(150, 150, 150)));
        }
        for q in p["quic"].as_array().into_iter().flatten() {
            if let Some(g) = num(&q["median_gbit_per_s"]) {
                let name = q["name"].as_str().unwrap_or("?");
                let color = if name == "ftvm default" { RED } else { BLUE };
                bars.push((format!("{short}: {name}"), g, color));
            }
        }
    }
    let xmax = bars.iter().map(|b| b.1).fold(1.0f64, f64::max) * 1.1;
    let n = bars.len();
    let root = SVGBackend::new(out, (SIZE.0 + 100, 60 + 28 * n as u32)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "FT link goodput (pages over QUIC) vs TCP on the same path",
            (FONT, 17),
        )
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(260)
        .build_cartesian_2d(0f64..xmax, (0..n).into_segmented())?;
    let labels: Vec<String> = bars.iter().map(|b| b.0.clone()).collect();
    chart
        .configure_mesh()
        .disable_y_mesh()
        .x_desc("Gbit/s (median of the runs); red: ftvm's default tuning")
        .y_labels(n)
        .y_label_formatter(&|v| match v {
            SegmentValue::CenterOf(i) => labels.get(*i).cloned().unwrap_or_default(),
            _ => String::new(),
        })
        .draw()?;
    chart.draw_series(bars.iter().enumerate().map(|(i, (_, v, c))| {
        Rectangle::new(
            [
                (0.0, SegmentValue::Exact(i)),
                (*v, SegmentValue::Exact(i + 1)),
            ],
            c.filled(),
        )
    }))?;
    root.present()?;
    Ok(out.into())
}

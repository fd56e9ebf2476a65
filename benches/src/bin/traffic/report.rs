//! The figures of a run, and the Markdown report and SVG plots made of them.
use std::{collections::BTreeMap, fmt::Write as _, path::Path};

use anyhow::{Context, Result};

/// The direct path's "mode": no agent at all.
pub const NO_AGENT: &str = "none";

/// Where the traffic comes from; with no agent it goes straight to the pod,
/// with one through the Service (a ClusterIP from a pod, a NodePort from
/// outside).
#[derive(Copy, Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Route {
    FromPod,
    FromOutside,
}

impl Route {
    pub const ALL: [Route; 2] = [Route::FromPod, Route::FromOutside];

    fn title(self) -> &'static str {
        match self {
            Route::FromPod => "ClusterIP from a pod (direct: pod to pod)",
            Route::FromOutside => "NodePort from outside (direct: the client routed to the pod)",
        }
    }

    fn slug(self) -> &'static str {
        match self {
            Route::FromPod => "clusterip",
            Route::FromOutside => "nodeport",
        }
    }
}

/// What is measured; each one a number per repetition.
#[derive(Copy, Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Metric {
    ConnRate,
    ConnP50,
    ConnP99,
    ConnMax,
    Stalls,
    Failed,
    BusyPerConn,
    SoftirqPerConn,
    StreamGbps,
    UdpPps,
}

impl Metric {
    pub const ALL: [Metric; 10] = [
        Metric::ConnRate,
        Metric::ConnP50,
        Metric::ConnP99,
        Metric::ConnMax,
        Metric::Stalls,
        Metric::Failed,
        Metric::BusyPerConn,
        Metric::SoftirqPerConn,
        Metric::StreamGbps,
        Metric::UdpPps,
    ];

    fn title(self) -> &'static str {
        match self {
            Metric::ConnRate => "new connections/s",
            Metric::ConnP50 => "connect p50 (ms)",
            Metric::ConnP99 => "connect p99 (ms)",
            Metric::ConnMax => "connect max (ms)",
            Metric::Stalls => "connects >= 0.9 s",
            Metric::Failed => "failed connections",
            Metric::BusyPerConn => "CPU per connection (us)",
            Metric::SoftirqPerConn => "softirq per connection (us)",
            Metric::StreamGbps => "one TCP stream (Gbit/s)",
            Metric::UdpPps => "64-byte UDP received (kpps)",
        }
    }

    fn slug(self) -> &'static str {
        match self {
            Metric::ConnRate => "conn_rate",
            Metric::ConnP50 => "conn_p50",
            Metric::ConnP99 => "conn_p99",
            Metric::ConnMax => "conn_max",
            Metric::Stalls => "stalls",
            Metric::Failed => "failed",
            Metric::BusyPerConn => "cpu_per_conn",
            Metric::SoftirqPerConn => "softirq_per_conn",
            Metric::StreamGbps => "stream",
            Metric::UdpPps => "udp",
        }
    }

    /// Whether the ratio to the direct path is worth printing (counts of
    /// rare events are not).
    fn has_ratio(self) -> bool {
        !matches!(self, Metric::Stalls | Metric::Failed)
    }

    /// The metrics drawn, one plot per route each.
    const PLOTTED: [Metric; 4] = [
        Metric::ConnRate,
        Metric::ConnP99,
        Metric::StreamGbps,
        Metric::UdpPps,
    ];
}

/// Where a figure was measured.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct At {
    pub network: String,
    pub mode: String,
    pub services: u32,
    pub route: Route,
}

/// The cost of programming the table at one size.
#[derive(Clone, Debug)]
pub struct Programming {
    pub network: String,
    pub mode: String,
    pub services: u32,
    /// Agent start to every frontend programmed.
    pub seconds: f64,
    pub rss_bytes: u64,
    /// Datapath counters at the end of the phase (eBPF mode only).
    pub datapath: Vec<(&'static str, u64)>,
}

/// Every figure of a run.
#[derive(Default)]
pub struct Report {
    pub figures: BTreeMap<(At, Metric), Vec<f64>>,
    pub programming: Vec<Programming>,
    /// The run's parameters, printed at the top.
    pub setup: Vec<String>,
}

/// Median, minimum and maximum of the repetitions.
#[derive(Clone, Copy, Debug)]
pub struct Summary {
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

pub fn summarize(values: &[f64]) -> Option<Summary> {
    if values.is_empty() {
        return None;
    }
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let n = sorted.len();
    let median = if n % 2 == 1 {
        sorted[n / 2]
    } else {
        (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0
    };
    Some(Summary {
        median,
        min: sorted[0],
        max: sorted[n - 1],
    })
}

impl Report {
    pub fn add(&mut self, at: &At, metric: Metric, value: f64) {
        self.figures
            .entry((at.clone(), metric))
            .or_default()
            .push(value);
    }

    fn summary(&self, at: &At, metric: Metric) -> Option<Summary> {
        summarize(self.figures.get(&(at.clone(), metric))?)
    }

    /// The direct path's figure of `network` and `route`.
    fn direct(&self, network: &str, route: Route, metric: Metric) -> Option<Summary> {
        let at = At {
            network: network.to_string(),
            mode: NO_AGENT.to_string(),
            services: 0,
            route,
        };
        self.summary(&at, metric)
    }

    fn networks(&self) -> Vec<String> {
        let mut networks: Vec<String> = self
            .figures
            .keys()
            .map(|(at, _)| at.network.clone())
            .collect();
        networks.dedup();
        networks
    }

    fn modes_and_sizes(&self, network: &str) -> (Vec<String>, Vec<u32>) {
        let mut modes = Vec::new();
        let mut sizes = Vec::new();
        for (at, _) in self.figures.keys().filter(|(at, _)| at.network == network) {
            if at.mode != NO_AGENT && !modes.contains(&at.mode) {
                modes.push(at.mode.clone());
            }
            if at.mode != NO_AGENT && !sizes.contains(&at.services) {
                sizes.push(at.services);
            }
        }
        sizes.sort_unstable();
        (modes, sizes)
    }

    /// The Markdown report.
    pub fn markdown(&self) -> String {
        let mut md = String::from("# Traffic benchmark\n\n");
        for line in &self.setup {
            let _ = writeln!(md, "- {line}");
        }
        md.push_str(
            "\nEach cell: median of the repetitions, [min-max], and in parentheses the ratio to \
             the direct path (no agent) of the same run. Ratios above 1 are better for rates \
             and worse for latencies and CPU.\n",
        );
        for network in self.networks() {
            let (modes, sizes) = self.modes_and_sizes(&network);
            let _ = writeln!(md, "\n## Pods on a {network} network\n");
            for route in Route::ALL {
                let _ = writeln!(md, "\n### {}\n", route.title());
                self.route_table(&mut md, &network, route, &modes, &sizes);
            }
            self.programming_table(&mut md, &network);
        }
        md
    }

    fn route_table(
        &self,
        md: &mut String,
        network: &str,
        route: Route,
        modes: &[String],
        sizes: &[u32],
    ) {
        let _ = write!(md, "| figure | direct |");
        for mode in modes {
            for size in sizes {
                let _ = write!(md, " {mode} {size} |");
            }
        }
        md.push_str("\n|---|---|");
        md.push_str(&"---|".repeat(modes.len() * sizes.len()));
        md.push('\n');
        for metric in Metric::ALL {
            let direct = self.direct(network, route, metric);
            let _ = write!(
                md,
                "| {} | {} |",
                metric.title(),
                cell(direct, None, metric)
            );
            for mode in modes {
                for &services in sizes {
                    let at = At {
                        network: network.to_string(),
                        mode: mode.clone(),
                        services,
                        route,
                    };
                    let _ = write!(md, " {} |", cell(self.summary(&at, metric), direct, metric));
                }
            }
            md.push('\n');
        }
    }

    fn programming_table(&self, md: &mut String, network: &str) {
        let rows: Vec<&Programming> = self
            .programming
            .iter()
            .filter(|p| p.network == network)
            .collect();
        if rows.is_empty() {
            return;
        }
        md.push_str(
            "\n### Programming the table (agent start to every frontend programmed; agent RSS \
             then), and the eBPF datapath's masquerade counters after the phase\n\n\
             | mode | services | seconds | RSS (MiB) | datapath |\n|---|---|---|---|---|\n",
        );
        for p in rows {
            let counters: Vec<String> = p
                .datapath
                .iter()
                .map(|(reason, n)| format!("{reason} {n}"))
                .collect();
            let _ = writeln!(
                md,
                "| {} | {} | {:.2} | {:.0} | {} |",
                p.mode,
                p.services,
                p.seconds,
                p.rss_bytes as f64 / (1024.0 * 1024.0),
                if counters.is_empty() {
                    "-".to_string()
                } else {
                    counters.join(", ")
                }
            );
        }
    }

    /// One SVG per (network, route, plotted metric): the metric against the
    /// number of services, a line per mode and the direct path as a dashed
    /// line. Returns the files written.
    pub fn plots(&self, dir: &Path) -> Result<Vec<String>> {
        let mut written = Vec::new();
        for network in self.networks() {
            let (modes, sizes) = self.modes_and_sizes(&network);
            if sizes.is_empty() {
                continue;
            }
            for route in Route::ALL {
                for metric in Metric::PLOTTED {
                    let lines: Vec<(String, Vec<Option<f64>>)> = modes
                        .iter()
                        .map(|mode| {
                            let points = sizes
                                .iter()
                                .map(|&services| {
                                    let at = At {
                                        network: network.clone(),
                                        mode: mode.clone(),
                                        services,
                                        route,
                                    };
                                    self.summary(&at, metric).map(|s| s.median)
                                })
                                .collect();
                            (mode.clone(), points)
                        })
                        .collect();
                    let direct = self.direct(&network, route, metric).map(|s| s.median);
                    let title = format!("{} - {} - {network} pods", metric.title(), route.slug());
                    let svg = line_plot(&title, &sizes, &lines, direct);
                    let name = format!("traffic-{network}-{}-{}.svg", route.slug(), metric.slug());
                    let path = dir.join(&name);
                    std::fs::write(&path, svg)
                        .with_context(|| format!("writing {}", path.display()))?;
                    written.push(name);
                }
            }
        }
        Ok(written)
    }
}

fn cell(summary: Option<Summary>, direct: Option<Summary>, metric: Metric) -> String {
    let Some(s) = summary else {
        return "-".to_string();
    };
    let mut text = format!("{} [{}-{}]", num(s.median), num(s.min), num(s.max));
    if let Some(d) = direct.filter(|d| metric.has_ratio() && d.median > 0.0) {
        let _ = write!(text, " ({:.2})", s.median / d.median);
    }
    text
}

fn num(v: f64) -> String {
    if v >= 100.0 || v == v.trunc() {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

const COLOURS: [&str; 6] = [
    "#d62728", "#1f77b4", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b",
];

/// A line chart with the sizes as evenly spaced categories on x.
fn line_plot(
    title: &str,
    sizes: &[u32],
    lines: &[(String, Vec<Option<f64>>)],
    direct: Option<f64>,
) -> String {
    let (w, h, left, right, top, bottom) = (640.0, 400.0, 70.0, 130.0, 40.0, 50.0);
    let values = lines
        .iter()
        .flat_map(|(_, points)| points.iter().flatten().copied())
        .chain(direct);
    let y_max = values.fold(0.0f64, f64::max).max(1e-9) * 1.1;
    let plot_w = w - left - right;
    let plot_h = h - top - bottom;
    let x = |i: usize| {
        if sizes.len() <= 1 {
            left + plot_w / 2.0
        } else {
            left + plot_w * i as f64 / (sizes.len() - 1) as f64
        }
    };
    let y = |v: f64| top + plot_h * (1.0 - v / y_max);
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" \
         font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"{}\" y=\"22\" text-anchor=\"middle\" font-size=\"14\">{}</text>\n",
        w / 2.0,
        escape(title)
    );
    // Axes, y ticks and x categories.
    let _ = writeln!(
        svg,
        "<path d=\"M{left},{top} V{} H{}\" stroke=\"black\" fill=\"none\"/>",
        top + plot_h,
        left + plot_w
    );
    for t in 0..=4 {
        let v = y_max * f64::from(t) / 4.0;
        let _ = writeln!(
            svg,
            "<text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">{}</text><path d=\"M{left},{:.1} H{}\" stroke=\"#ddd\"/>",
            left - 6.0,
            y(v) + 4.0,
            num(v),
            y(v),
            left + plot_w
        );
    }
    for (i, size) in sizes.iter().enumerate() {
        let _ = writeln!(
            svg,
            "<text x=\"{:.1}\" y=\"{}\" text-anchor=\"middle\">{size}</text>",
            x(i),
            top + plot_h + 18.0
        );
    }
    let _ = writeln!(
        svg,
        "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">services</text>",
        left + plot_w / 2.0,
        h - 8.0
    );
    if let Some(d) = direct {
        let _ = writeln!(
            svg,
            "<path d=\"M{left},{:.1} H{}\" stroke=\"black\" stroke-dasharray=\"6,4\"/>",
            y(d),
            left + plot_w
        );
        legend(
            &mut svg,
            w - right + 10.0,
            top + 10.0,
            "black",
            "direct (no agent)",
        );
    }
    for (n, (mode, points)) in lines.iter().enumerate() {
        let colour = COLOURS[n % COLOURS.len()];
        let path: Vec<String> = points
            .iter()
            .enumerate()
            .filter_map(|(i, p)| p.map(|v| format!("{:.1},{:.1}", x(i), y(v))))
            .collect();
        if !path.is_empty() {
            let _ = writeln!(
                svg,
                "<polyline points=\"{}\" stroke=\"{colour}\" stroke-width=\"2\" fill=\"none\"/>",
                path.join(" ")
            );
            for point in &path {
                let (px, py) = point.split_once(',').unwrap_or(("0", "0"));
                let _ = writeln!(
                    svg,
                    "<circle cx=\"{px}\" cy=\"{py}\" r=\"3\" fill=\"{colour}\"/>"
                );
            }
        }
        legend(
            &mut svg,
            w - right + 10.0,
            top + 30.0 + 20.0 * n as f64,
            colour,
            mode,
        );
    }
    svg.push_str("</svg>\n");
    svg
}

fn legend(svg: &mut String, x: f64, y: f64, colour: &str, label: &str) {
    let _ = writeln!(
        svg,
        "<path d=\"M{x},{y} h20\" stroke=\"{colour}\" stroke-width=\"2\"/><text x=\"{}\" y=\"{}\">{}</text>",
        x + 26.0,
        y + 4.0,
        escape(label)
    );
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_and_even_counts() {
        let s = summarize(&[3.0, 1.0, 2.0]).unwrap();
        assert_eq!((s.median, s.min, s.max), (2.0, 1.0, 3.0));
        assert_eq!(summarize(&[4.0, 1.0, 2.0, 3.0]).unwrap().median, 2.5);
        assert!(summarize(&[]).is_none());
    }

    #[test]
    fn ratio_is_to_the_direct_path_of_the_same_network_and_route() {
        let mut report = Report::default();
        let direct = At {
            network: "bridge".into(),
            mode: NO_AGENT.into(),
            services: 0,
            route: Route::FromPod,
        };
        let ebpf = At {
            mode: "ebpf".into(),
            services: 1000,
            ..direct.clone()
        };
        report.add(&direct, Metric::ConnRate, 1000.0);
        report.add(&ebpf, Metric::ConnRate, 900.0);
        report.add(&ebpf, Metric::ConnRate, 950.0);
        report.add(&ebpf, Metric::ConnRate, 800.0);
        let md = report.markdown();
        assert!(
            md.contains("| new connections/s | 1000 [1000-1000] | 900 [800-950] (0.90) |"),
            "{md}"
        );
        let dir = tempfile::tempdir().unwrap();
        let files = report.plots(dir.path()).unwrap();
        assert!(files.contains(&"traffic-bridge-clusterip-conn_rate.svg".to_string()));
        let svg = std::fs::read_to_string(dir.path().join(&files[0])).unwrap();
        assert!(svg.starts_with("<svg") && svg.contains("polyline"), "{svg}");
    }
}

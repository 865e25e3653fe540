//! The results: `latest.json` (every value), `latest.md` (a table with ratios to `direct`, and
//! the targets marked met or missed) and, through [`crate::plot`], `latest.png`.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::Context;
use serde::Serialize;

/// One number: `scenario` measured on `system`.
#[derive(Debug, Clone, Serialize)]
pub struct Measurement {
    pub scenario: String,
    pub system: String,
    pub value: f64,
    pub unit: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    pub cores: usize,
    pub cpu: String,
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub date: String,
    pub machine: Machine,
    pub results: Vec<Measurement>,
    /// What the numbers need to be read with (sizes, failures).
    pub notes: Vec<String>,
    /// Systems in the order they were run (the table's columns).
    #[serde(skip)]
    pub systems: Vec<String>,
    /// Latency samples in ms by scenario family (`connect`, `rpc`) and system, for the plot.
    #[serde(skip)]
    pub samples: BTreeMap<(String, String), Vec<f64>>,
}

/// Scenarios in table order, with their unit and whether higher is better.
pub const SCENARIOS: [(&str, &str, bool); 26] = [
    ("throughput_1", "MiB/s", true),
    ("throughput_8", "MiB/s", true),
    ("connect_p50", "ms", false),
    ("connect_p99", "ms", false),
    ("conn_rate", "conn/s", true),
    ("connect_cpu_us", "µs", false),
    ("connect1_p50", "ms", false),
    ("connect1_p99", "ms", false),
    // eps only: the same on a domain whose TLS ends at the private proxy.
    ("throughput_1_terminated", "MiB/s", true),
    ("throughput_8_terminated", "MiB/s", true),
    ("connect_p50_terminated", "ms", false),
    ("connect_p99_terminated", "ms", false),
    ("conn_rate_terminated", "conn/s", true),
    ("connect_cpu_us_terminated", "µs", false),
    ("connect1_p50_terminated", "ms", false),
    ("connect1_p99_terminated", "ms", false),
    ("idle_rss_per_conn", "KiB", false),
    ("rpc_p50", "ms", false),
    ("rpc_p99", "ms", false),
    ("rpc_rate", "calls/s", true),
    ("refused_unknown_sni", "µs CPU", false),
    ("refused_denied", "µs CPU", false),
    ("refused_rate_limited", "µs CPU", false),
    ("refused_domain_busy", "µs CPU", false),
    ("refused_bad_proxy_header", "µs CPU", false),
    ("refused_untrusted_proxy_header", "µs CPU", false),
];

impl Report {
    pub fn new(systems: Vec<String>) -> Self {
        let now = time::OffsetDateTime::now_utc();
        let date = now
            .replace_nanosecond(0)
            .unwrap_or(now)
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default();
        Self {
            date,
            machine: machine(),
            results: Vec::new(),
            notes: Vec::new(),
            systems,
            samples: BTreeMap::new(),
        }
    }

    /// Records a value (rounded to what the measurement can tell).
    pub fn push(&mut self, scenario: &str, system: &str, value: f64) {
        let unit = SCENARIOS
            .iter()
            .find(|(s, _, _)| *s == scenario)
            .map(|(_, u, _)| *u)
            .unwrap_or_default();
        let value = if value.abs() >= 100.0 {
            (value * 10.0).round() / 10.0
        } else {
            (value * 1000.0).round() / 1000.0
        };
        self.results.push(Measurement {
            scenario: scenario.into(),
            system: system.into(),
            value,
            unit: unit.into(),
        });
    }

    pub fn get(&self, scenario: &str, system: &str) -> Option<f64> {
        self.results
            .iter()
            .find(|m| m.scenario == scenario && m.system == system)
            .map(|m| m.value)
    }

    /// Writes `latest.json`, `latest.md` and `latest.png` into `dir`; the plot is drawn in
    /// `scratch` first (the encoder picks the format by extension).
    pub fn write(&self, dir: &Path, scratch: &Path) -> anyhow::Result<()> {
        std::fs::create_dir_all(dir).with_context(|| format!("mkdir {}", dir.display()))?;
        write_atomic(&dir.join("latest.json"), &serde_json::to_vec_pretty(self)?)?;
        write_atomic(&dir.join("latest.md"), self.markdown().as_bytes())?;
        let drawn = scratch.join("latest.png");
        crate::plot::draw(self, &drawn)?;
        let png = std::fs::read(&drawn).with_context(|| format!("reading {}", drawn.display()))?;
        write_atomic(&dir.join("latest.png"), &png)
    }

    /// The table, the targets and the notes.
    pub fn markdown(&self) -> String {
        let mut md = format!(
            "# eps benchmarks\n\n{} · {} ({} cores) · `make bench`\n\n\
             Each cell: value, and in parentheses its ratio to `direct`. See bench/README.md for \
             what each row measures.\n\n",
            self.date, self.machine.cpu, self.machine.cores
        );
        md.push_str(&format!(
            "| scenario | unit | better | {} |\n|---|---|---|{}\n",
            self.systems.join(" | "),
            "---:|".repeat(self.systems.len())
        ));
        for (scenario, unit, higher) in &SCENARIOS {
            if self.systems.iter().all(|s| self.get(scenario, s).is_none()) {
                continue;
            }
            let direct = self.get(scenario, "direct");
            let cells: Vec<String> = self
                .systems
                .iter()
                .map(|system| match (self.get(scenario, system), direct) {
                    (None, _) => "–".into(),
                    (Some(v), Some(d)) if system != "direct" && d != 0.0 => {
                        format!("{} ({:.2}×)", num(v), v / d)
                    }
                    (Some(v), _) => num(v),
                })
                .collect();
            let better = if *higher { "higher" } else { "lower" };
            md.push_str(&format!(
                "| {scenario} | {unit} | {better} | {} |\n",
                cells.join(" | ")
            ));
        }
        md.push_str(
            "\n## Targets (eps)\n\n| target | form | measured | result |\n|---|---|---|---|\n",
        );
        for t in crate::targets::evaluate(self) {
            md.push_str(&format!(
                "| {} | {} | {} | {} |\n",
                t.name, t.form, t.measured, t.verdict
            ));
        }
        if !self.notes.is_empty() {
            md.push_str("\n## Notes\n\n");
            for n in &self.notes {
                md.push_str(&format!("- {n}\n"));
            }
        }
        md
    }
}

/// A number with precision that suits its size.
pub fn num(v: f64) -> String {
    match v.abs() {
        a if a >= 100.0 => format!("{v:.0}"),
        a if a >= 10.0 => format!("{v:.1}"),
        _ => format!("{v:.2}"),
    }
}

fn machine() -> Machine {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|v| v.trim_start_matches([' ', '\t', ':']).trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into());
    Machine {
        cores: std::thread::available_parallelism().map_or(0, |n| n.get()),
        cpu,
    }
}

/// Writes through `path.tmp` and a rename, so that a reader never sees half a file.
fn write_atomic(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let tmp = path.with_extension(format!(
        "{}.tmp",
        path.extension().and_then(|e| e.to_str()).unwrap_or("")
    ));
    std::fs::write(&tmp, bytes).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))
}

//! Results: one [`Section`] per workload, rendered as a markdown table and kept as JSON.

use std::{collections::BTreeMap, fmt::Write as _};

use serde::Serialize;
use serde_json::Value;

/// One workload's table. Values are numbers (formatted with the column's decimals) or text.
#[derive(Serialize)]
pub struct Section {
    pub key: &'static str,
    pub title: String,
    pub columns: Vec<Column>,
    pub rows: Vec<Row>,
    /// Rows that could not be measured and why, ratios between proxies, caveats.
    pub notes: Vec<String>,
}

#[derive(Serialize)]
pub struct Column {
    pub key: &'static str,
    pub header: &'static str,
    #[serde(skip)]
    pub decimals: usize,
}

pub const fn column(key: &'static str, header: &'static str, decimals: usize) -> Column {
    Column {
        key,
        header,
        decimals,
    }
}

#[derive(Serialize)]
pub struct Row {
    pub target: String,
    pub values: BTreeMap<&'static str, Value>,
}

impl Row {
    pub fn new(target: impl Into<String>) -> Row {
        Row {
            target: target.into(),
            values: BTreeMap::new(),
        }
    }

    /// Sets a figure; NaN and infinities (a ratio against zero) are left out.
    pub fn set(&mut self, key: &'static str, value: f64) -> &mut Row {
        if value.is_finite() {
            self.values.insert(key, Value::from(value));
        }
        self
    }

    pub fn text(&mut self, key: &'static str, value: impl Into<String>) -> &mut Row {
        self.values.insert(key, Value::from(value.into()));
        self
    }

    pub fn get(&self, key: &str) -> Option<f64> {
        self.values.get(key).and_then(Value::as_f64)
    }
}

impl Section {
    pub fn new(key: &'static str, title: impl Into<String>, columns: Vec<Column>) -> Section {
        Section {
            key,
            title: title.into(),
            columns,
            rows: Vec::new(),
            notes: Vec::new(),
        }
    }

    pub fn has_column(&self, key: &str) -> bool {
        self.columns.iter().any(|c| c.key == key)
    }

    pub fn row(&self, target: &str) -> Option<&Row> {
        self.rows.iter().find(|r| r.target == target)
    }

    /// `numerator / denominator` of one column between two rows, when both were measured.
    pub fn ratio(&self, key: &str, numerator: &str, denominator: &str) -> Option<f64> {
        let n = self.row(numerator)?.get(key)?;
        let d = self.row(denominator)?.get(key)?;
        (d != 0.0).then(|| n / d)
    }

    pub fn markdown(&self) -> String {
        let mut out = format!("### {}\n\n| target |", self.title);
        for c in &self.columns {
            let _ = write!(out, " {} |", c.header);
        }
        out.push_str("\n|---|");
        out.push_str(&"---|".repeat(self.columns.len()));
        out.push('\n');
        for row in &self.rows {
            let _ = write!(out, "| {} |", row.target);
            for c in &self.columns {
                let cell = match row.values.get(c.key) {
                    Some(Value::Number(n)) => {
                        format!("{:.*}", c.decimals, n.as_f64().unwrap_or(f64::NAN))
                    }
                    Some(Value::String(s)) => s.clone(),
                    _ => "-".to_string(),
                };
                let _ = write!(out, " {cell} |");
            }
            out.push('\n');
        }
        for note in &self.notes {
            let _ = write!(out, "\n{note}\n");
        }
        out
    }
}

/// The machine the figures were measured on.
#[derive(Serialize)]
pub struct Machine {
    pub cpu: String,
    pub cpus: usize,
    pub memory_gib: f64,
    pub kernel: String,
}

impl Machine {
    pub fn describe() -> Machine {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu = cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("model name"))
            .map(|l| l.trim_start_matches([' ', '\t', ':']).to_string())
            .unwrap_or_else(|| "unknown".into());
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let memory_kib = meminfo
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|l| l.trim().trim_end_matches(" kB").parse::<f64>().ok())
            .unwrap_or(0.0);
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
            .to_string();
        Machine {
            cpu,
            cpus: std::thread::available_parallelism().map_or(1, usize::from),
            memory_gib: (memory_kib / 1024.0 / 1024.0 * 10.0).round() / 10.0,
            kernel,
        }
    }

    pub fn summary(&self) -> String {
        format!(
            "{} × {}, {} GiB, Linux {}",
            self.cpus, self.cpu, self.memory_gib, self.kernel
        )
    }
}

#[derive(Serialize)]
pub struct Results {
    pub date: String,
    pub quick: bool,
    pub machine: Machine,
    pub sections: Vec<Section>,
}

impl Results {
    pub fn markdown(&self) -> String {
        let mut out = format!(
            "## shunt benchmarks, {}{}\n\nMachine: {}. Every ratio compares figures measured in the same run.\n\n",
            self.date,
            if self.quick { " (--quick)" } else { "" },
            self.machine.summary()
        );
        for section in &self.sections {
            out.push_str(&section.markdown());
            out.push('\n');
        }
        out
    }
}

/// The median, or NaN when nothing was measured.
pub(super) fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    match sorted.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => sorted[n / 2],
        n => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
    }
}

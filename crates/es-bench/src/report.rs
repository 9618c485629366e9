//! The one result table: rows collected from every benchmark, printed as aligned plain text
//! and, on request, written as JSON with the same rows (plus the raw numbers behind the notes).

use std::fmt::Write as _;
use std::path::Path;

use anyhow::Context;
use serde_json::{Value, json};

use crate::timing::Stats;

/// A value compared with a reference measured in the same run.
#[derive(Clone, Debug)]
pub struct Versus {
    /// This row's value divided by the reference's (both "higher is better").
    pub ratio: f64,
    /// What the reference is, e.g. "sgemm" or "read bw".
    pub of: String,
    /// Print as a percentage ("45% of read bw") instead of a factor ("0.83× sgemm").
    pub percent: bool,
}

impl Versus {
    fn render(&self) -> String {
        if self.percent {
            format!("{:.0}% of {}", self.ratio * 100.0, self.of)
        } else {
            format!("{:.2}× {}", self.ratio, self.of)
        }
    }
}

/// One line of the table.
#[derive(Clone, Debug)]
pub struct Row {
    pub section: &'static str,
    pub case: String,
    /// `None` when there is nothing to report (e.g. no trained parameters were given).
    pub value: Option<f64>,
    pub unit: &'static str,
    pub versus: Option<Versus>,
    /// (max − min) / median of the timed rounds, when the row was timed in rounds.
    pub spread: Option<f64>,
    /// For people: context that explains the value, built from `metrics` where it is numeric.
    pub notes: String,
    /// For machines: the numbers behind the notes, by name (with their unit in the name).
    pub metrics: Vec<(&'static str, f64)>,
}

impl Row {
    pub fn new(
        section: &'static str,
        case: impl Into<String>,
        value: f64,
        unit: &'static str,
    ) -> Row {
        Row {
            section,
            case: case.into(),
            value: Some(value),
            unit,
            versus: None,
            spread: None,
            notes: String::new(),
            metrics: Vec::new(),
        }
    }

    /// A row that reports why there is no number.
    pub fn absent(section: &'static str, case: impl Into<String>, notes: impl Into<String>) -> Row {
        Row {
            section,
            case: case.into(),
            value: None,
            unit: "",
            versus: None,
            spread: None,
            notes: notes.into(),
            metrics: Vec::new(),
        }
    }

    pub fn timed(mut self, stats: &Stats) -> Row {
        self.spread = Some(stats.spread());
        self.metrics.push(("median_s_per_call", stats.median));
        self.metrics.push(("calls_per_round", stats.reps as f64));
        self.metrics.push(("rounds", stats.rounds as f64));
        self
    }

    pub fn versus(mut self, ratio: f64, of: impl Into<String>, percent: bool) -> Row {
        self.versus = Some(Versus {
            ratio,
            of: of.into(),
            percent,
        });
        self
    }

    pub fn note(mut self, text: impl AsRef<str>) -> Row {
        if !self.notes.is_empty() {
            self.notes.push_str("; ");
        }
        self.notes.push_str(text.as_ref());
        self
    }

    pub fn metric(mut self, name: &'static str, value: f64) -> Row {
        self.metrics.push((name, value));
        self
    }

    fn to_json(&self) -> Value {
        let metrics: serde_json::Map<String, Value> = self
            .metrics
            .iter()
            .map(|(k, v)| ((*k).to_string(), json!(v)))
            .collect();
        json!({
            "section": self.section,
            "case": self.case,
            "value": self.value,
            "unit": self.unit,
            "versus": self.versus.as_ref().map(|v| json!({
                "ratio": v.ratio,
                "of": v.of,
                "text": v.render(),
            })),
            "spread": self.spread,
            "notes": self.notes,
            "metrics": metrics,
        })
    }
}

/// What the table was measured on, printed above it and stored with the JSON rows.
#[derive(Clone, Debug)]
pub struct Header {
    pub lines: Vec<(&'static str, String)>,
}

impl Header {
    pub fn render(&self) -> String {
        let width = self.lines.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
        let mut out = String::new();
        for (k, v) in &self.lines {
            let _ = writeln!(out, "{k:<width$}  {v}");
        }
        out
    }
}

/// Renders the rows as a plain-text table with aligned columns; numbers right-aligned.
pub fn render_table(rows: &[Row]) -> String {
    let titles = [
        "section",
        "case",
        "value",
        "unit",
        "vs reference",
        "spread",
        "notes",
    ];
    let cells: Vec<[String; 7]> = rows
        .iter()
        .map(|r| {
            [
                r.section.to_string(),
                r.case.clone(),
                r.value.map_or_else(|| "-".to_string(), human),
                r.unit.to_string(),
                r.versus.as_ref().map_or_else(String::new, Versus::render),
                r.spread
                    .map_or_else(String::new, |s| format!("{:.0}%", s * 100.0)),
                r.notes.clone(),
            ]
        })
        .collect();
    let mut widths = titles.map(|t| t.chars().count());
    for row in &cells {
        for (w, c) in widths.iter_mut().zip(row) {
            *w = (*w).max(c.chars().count());
        }
    }
    let right = [false, false, true, false, true, true, false];
    let line = |row: &[String]| {
        let mut out = String::new();
        for (i, c) in row.iter().enumerate() {
            let pad = widths[i] - c.chars().count();
            let last = i + 1 == row.len();
            if right[i] {
                out.push_str(&" ".repeat(pad));
                out.push_str(c);
            } else {
                out.push_str(c);
                if !last {
                    out.push_str(&" ".repeat(pad));
                }
            }
            if !last {
                out.push_str("  ");
            }
        }
        out.trim_end().to_string()
    };
    let mut out = String::new();
    let header: Vec<String> = titles.iter().map(|t| t.to_string()).collect();
    out.push_str(&line(&header));
    out.push('\n');
    let total: usize = widths.iter().sum::<usize>() + 2 * (widths.len() - 1);
    out.push_str(&"-".repeat(total.min(160)));
    out.push('\n');
    let mut section = "";
    for (row, r) in cells.iter().zip(rows) {
        // A blank line between sections keeps a long table readable.
        if !section.is_empty() && section != r.section {
            out.push('\n');
        }
        section = r.section;
        out.push_str(&line(row));
        out.push('\n');
    }
    out
}

/// Writes the header and rows as one JSON document to `path`.
pub fn write_json(path: &Path, header: &Header, rows: &[Row]) -> anyhow::Result<()> {
    let head: serde_json::Map<String, Value> = header
        .lines
        .iter()
        .map(|(k, v)| ((*k).to_string(), json!(v)))
        .collect();
    let doc = json!({
        "header": head,
        "rows": rows.iter().map(Row::to_json).collect::<Vec<_>>(),
    });
    let text = serde_json::to_string_pretty(&doc).context("serialising the result rows")?;
    std::fs::write(path, text + "\n")
        .with_context(|| format!("writing the JSON results to {}", path.display()))
}

/// A number for people: thousands separators from 10,000 up, else three significant digits.
pub fn human(v: f64) -> String {
    if !v.is_finite() {
        return v.to_string();
    }
    if v.abs() >= 10_000.0 {
        let digits = format!("{:.0}", v.abs());
        let mut out = String::new();
        for (i, ch) in digits.chars().enumerate() {
            if i > 0 && (digits.len() - i).is_multiple_of(3) {
                out.push(',');
            }
            out.push(ch);
        }
        if v < 0.0 {
            out.insert(0, '-');
        }
        out
    } else {
        sig3(v)
    }
}

/// Three significant digits without exponent notation (for values below 10,000).
pub fn sig3(v: f64) -> String {
    if v == 0.0 || !v.is_finite() {
        return format!("{v}");
    }
    let magnitude = v.abs().log10().floor() as i32;
    let decimals = (2 - magnitude).max(0) as usize;
    format!("{v:.decimals$}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_read_well() {
        assert_eq!(human(1_234_567.4), "1,234,567");
        assert_eq!(human(12_345.0), "12,345");
        assert_eq!(human(1234.6), "1235");
        assert_eq!(human(12.345), "12.3");
        assert_eq!(human(0.012345), "0.0123");
        assert_eq!(sig3(0.0), "0");
    }

    #[test]
    fn table_columns_align() {
        let rows = vec![
            Row::new("a", "short", 1.0, "x").note("n"),
            Row::new("a", "a longer case", 123_456.0, "samples/s").versus(0.5, "ref", true),
            Row::absent("b", "missing", "not given"),
        ];
        let text = render_table(&rows);
        let lines: Vec<&str> = text.lines().collect();
        // Title, rule, two rows, the blank line between sections, one row.
        assert_eq!(lines.len(), 6);
        // The unit column starts at the same offset on every row that has a unit.
        let unit_at = lines[0].find("unit").unwrap();
        assert_eq!(lines[2].find("x").unwrap(), unit_at);
        assert_eq!(lines[3].find("samples/s").unwrap(), unit_at);
        assert!(lines[3].contains("50% of ref"));
        assert!(lines[5].contains("not given"));
    }
}

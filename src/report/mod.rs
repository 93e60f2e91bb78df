//! Markdown and HTML reports of benchmark runs and comparisons, with SVG plots next to them.
//!
//! Both formats are rendered from one small [`Document`] so they always say the same thing.

pub mod plot;

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::Result;

use crate::bench::results::ResultsFile;

pub const REPORT_MD: &str = "report.md";
pub const REPORT_HTML: &str = "report.html";
pub const RELIABILITY_SVG: &str = "reliability.svg";
pub const RISK_COVERAGE_SVG: &str = "risk_coverage.svg";

/// A block of a report.
#[derive(Clone, Debug, PartialEq)]
pub enum Block {
    Heading(u8, String),
    Paragraph(String),
    List(Vec<String>),
    Table {
        header: Vec<String>,
        rows: Vec<Vec<String>>,
    },
    /// An image file next to the report.
    Image {
        src: String,
        alt: String,
    },
    Code(String),
}

/// A report: a title and blocks.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Document {
    pub title: String,
    pub blocks: Vec<Block>,
}

/// Text of a Markdown report as it reads: `&`, `<` and `>` written as entities, so that a split
/// name, an answer type or a run name holding HTML (`<script>`) is shown, not passed to the
/// viewer (the HTML report escapes the same text).
fn md_text(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

fn md_cell(s: &str) -> String {
    md_text(s).replace('|', "\\|").replace('\n', " ")
}

fn html_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

impl Document {
    pub fn new(title: impl Into<String>) -> Self {
        Self {
            title: title.into(),
            blocks: Vec::new(),
        }
    }

    pub fn push(&mut self, b: Block) {
        self.blocks.push(b);
    }

    pub fn heading(&mut self, level: u8, text: impl Into<String>) {
        self.push(Block::Heading(level, text.into()));
    }

    pub fn para(&mut self, text: impl Into<String>) {
        self.push(Block::Paragraph(text.into()));
    }

    pub fn table(&mut self, header: &[&str], rows: Vec<Vec<String>>) {
        self.push(Block::Table {
            header: header.iter().map(|s| s.to_string()).collect(),
            rows,
        });
    }

    pub fn to_markdown(&self) -> String {
        let mut out = format!("# {}\n", md_text(&self.title));
        for b in &self.blocks {
            out.push('\n');
            match b {
                Block::Heading(l, t) => {
                    let hashes = "#".repeat(usize::from(*l).clamp(2, 6));
                    let _ = writeln!(out, "{hashes} {}", md_text(t));
                }
                Block::Paragraph(t) => {
                    let _ = writeln!(out, "{}", md_text(t));
                }
                Block::List(items) => {
                    for i in items {
                        let _ = writeln!(out, "- {}", md_text(i));
                    }
                }
                Block::Table { header, rows } => {
                    let cells =
                        |r: &[String]| r.iter().map(|c| md_cell(c)).collect::<Vec<_>>().join(" | ");
                    let _ = writeln!(out, "| {} |", cells(header));
                    let _ = writeln!(
                        out,
                        "|{}|",
                        header.iter().map(|_| "---").collect::<Vec<_>>().join("|")
                    );
                    for r in rows {
                        let _ = writeln!(out, "| {} |", cells(r));
                    }
                }
                Block::Image { src, alt } => {
                    let _ = writeln!(out, "![{alt}]({src})");
                }
                Block::Code(text) => {
                    let _ = writeln!(out, "```json\n{}\n```", text.trim_end());
                }
            }
        }
        out
    }

    pub fn to_html(&self) -> String {
        let mut out = String::new();
        let _ = write!(
            out,
            "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n<title>{}</title>\n\
             <style>body{{font-family:sans-serif;max-width:60em;margin:2em auto;padding:0 1em;color:#222}}\
             table{{border-collapse:collapse;margin:1em 0}}th,td{{border:1px solid #bbb;padding:.25em .6em;text-align:left}}\
             th{{background:#eee}}td{{font-variant-numeric:tabular-nums}}pre{{background:#f6f6f6;padding:1em;overflow:auto}}\
             img{{max-width:100%;margin:.5em 1em .5em 0}}</style>\n</head>\n<body>\n<h1>{}</h1>\n",
            html_escape(&self.title),
            html_escape(&self.title)
        );
        for b in &self.blocks {
            match b {
                Block::Heading(l, t) => {
                    let l = l.clamp(&2, &6);
                    let _ = writeln!(out, "<h{l}>{}</h{l}>", html_escape(t));
                }
                Block::Paragraph(t) => {
                    let _ = writeln!(out, "<p>{}</p>", html_escape(t));
                }
                Block::List(items) => {
                    out.push_str("<ul>\n");
                    for i in items {
                        let _ = writeln!(out, "<li>{}</li>", html_escape(i));
                    }
                    out.push_str("</ul>\n");
                }
                Block::Table { header, rows } => {
                    out.push_str("<table>\n<tr>");
                    for h in header {
                        let _ = write!(out, "<th>{}</th>", html_escape(h));
                    }
                    out.push_str("</tr>\n");
                    for r in rows {
                        out.push_str("<tr>");
                        for c in r {
                            let _ = write!(out, "<td>{}</td>", html_escape(c));
                        }
                        out.push_str("</tr>\n");
                    }
                    out.push_str("</table>\n");
                }
                Block::Image { src, alt } => {
                    let _ = writeln!(
                        out,
                        "<img src=\"{}\" alt=\"{}\">",
                        html_escape(src),
                        html_escape(alt)
                    );
                }
                Block::Code(text) => {
                    let _ = writeln!(out, "<pre><code>{}</code></pre>", html_escape(text));
                }
            }
        }
        out.push_str("</body>\n</html>\n");
        out
    }

    /// Writes `{stem}.md` and `{stem}.html` into `dir`, atomically.
    pub fn write(&self, dir: &Path, stem: &str) -> Result<Vec<PathBuf>> {
        let md = dir.join(format!("{stem}.md"));
        let html = dir.join(format!("{stem}.html"));
        crate::io::write_bytes_atomically(&md, self.to_markdown().as_bytes())?;
        crate::io::write_bytes_atomically(&html, self.to_html().as_bytes())?;
        Ok(vec![md, html])
    }
}

/// A number for a table: 4 decimals, or "—" when undefined.
pub fn fmt(x: Option<f64>) -> String {
    match x {
        Some(v) if v != 0.0 && v.abs() < 1e-3 => format!("{v:.2e}"),
        Some(v) if v.is_finite() => format!("{v:.4}"),
        Some(v) => format!("{v}"),
        None => "—".into(),
    }
}

fn pct(x: f64) -> String {
    format!("{:.1} %", x * 100.0)
}

/// `official` or `always`.
pub fn normalize_name(m: crate::metrics::NormalizeMode) -> &'static str {
    match m {
        crate::metrics::NormalizeMode::Official => "official",
        crate::metrics::NormalizeMode::Always => "always",
    }
}

/// The value of a metric of the flat results map.
pub fn metric(r: &ResultsFile, key: &str) -> Option<f64> {
    r.results.get(key).and_then(|v| v.as_f64())
}

/// A bootstrap interval for a table: `[lo, hi]`.
pub fn interval(i: &[f64; 2]) -> String {
    format!("[{}, {}]", fmt(Some(i[0])), fmt(Some(i[1])))
}

/// A metric with its bootstrap interval when the run has one.
pub fn with_interval(r: &ResultsFile, key: &str) -> String {
    match r.intervals.get(key) {
        Some(i) => format!("{} {}", fmt(metric(r, key)), interval(i)),
        None => fmt(metric(r, key)),
    }
}

/// A one-line description of the model and particles of a run.
pub fn describe_model(r: &ResultsFile) -> String {
    let c = &r.config;
    match &c.adapters {
        Some(a) => format!(
            "{} + {} ({} particle(s), {}, rank {})",
            c.model.source, a.path, a.particles, a.method, a.rank
        ),
        None => format!("{} (base model, no particles)", c.model.source),
    }
}

/// The metrics shown in the main table (key, label, meaning).
pub const MAIN_METRICS: &[(&str, &str, &str)] = &[
    ("count", "questions", "test questions answered"),
    (
        "vqa_accuracy",
        "VQA accuracy",
        "official leave-one-out accuracy, run's normalisation",
    ),
    (
        "vqa_accuracy_official",
        "VQA accuracy (official norm.)",
        "normalise only when humans differ",
    ),
    (
        "vqa_accuracy_always",
        "VQA accuracy (always norm.)",
        "lmms-eval style",
    ),
    (
        "coverage",
        "coverage",
        "fraction answered at the run's threshold",
    ),
    (
        "answered_accuracy",
        "accuracy when answered",
        "mean VQA accuracy of the answered questions",
    ),
    (
        "selective_risk",
        "selective risk",
        "1 − accuracy when answered",
    ),
    (
        "ece",
        "ECE (15 equal-width bins)",
        "expected calibration error",
    ),
    (
        "ece_equal_mass",
        "ECE (15 equal-mass bins)",
        "adaptive-bin variant",
    ),
    ("nll", "NLL", "binary, confidence vs correctness"),
    ("brier", "Brier", "binary, (confidence − accuracy)²"),
    (
        "error_auroc",
        "error-detection AUROC",
        "confidence separating errors (acc < 0.5)",
    ),
    (
        "error_aupr",
        "error-detection AUPR",
        "average precision, errors positive",
    ),
    (
        "aurc",
        "AURC",
        "area under the risk–coverage curve (lower is better)",
    ),
    ("excess_aurc", "excess AURC", "AURC − oracle AURC"),
    (
        "coverage_at_risk_1pct",
        "coverage @ risk 1 %",
        "on the test questions",
    ),
    (
        "coverage_at_risk_5pct",
        "coverage @ risk 5 %",
        "on the test questions",
    ),
    (
        "coverage_at_risk_10pct",
        "coverage @ risk 10 %",
        "on the test questions",
    ),
    (
        "phi_1",
        "Φ₁",
        "effective reliability, threshold from `thresholds_from`",
    ),
    (
        "phi_10",
        "Φ₁₀",
        "effective reliability, threshold from `thresholds_from`",
    ),
    (
        "phi_100",
        "Φ₁₀₀",
        "effective reliability, threshold from `thresholds_from`",
    ),
];

/// Writes `report.md`, `report.html` and the two plots of a run into `dir`. `oracle` is the
/// risk–coverage curve of a perfect confidence (drawn dashed), if known.
pub fn write_report(
    dir: &Path,
    r: &ResultsFile,
    oracle: Option<&[(f64, f64)]>,
) -> Result<Vec<PathBuf>> {
    let mut written = Vec::new();
    let mut doc = Document::new(format!("Benchmark: {}", describe_model(r)));
    let c = &r.config;
    doc.para(format!(
        "Written {} by bella-vqa {} (run started {}). Normalisation: {}. Abstention threshold {} \
         ({}). Decoding: {}, at most {} new tokens.{}",
        r.written,
        c.bella_vqa_version,
        c.created,
        normalize_name(c.normalize),
        fmt(Some(c.threshold)),
        c.threshold_from,
        c.decoding,
        c.max_new_tokens,
        match (c.limit, c.shard) {
            (Some(l), Some(s)) => format!(" Limit {l} per file, shard {s}."),
            (Some(l), None) => format!(" Limit {l} per file."),
            (None, Some(s)) => format!(" Shard {s}."),
            (None, None) => String::new(),
        }
    ));
    doc.table(
        &["split", "role", "file", "format", "questions", "selected"],
        c.data
            .iter()
            .map(|d| {
                vec![
                    d.split.clone(),
                    format!("{:?}", d.role).to_lowercase(),
                    d.path.clone(),
                    d.format.to_string(),
                    d.questions.to_string(),
                    d.selected.to_string(),
                ]
            })
            .collect(),
    );
    let p = &r.progress;
    doc.para(format!(
        "Answered {} of {} questions{}{}{}.",
        p.answered,
        p.questions,
        if p.skipped > 0 {
            format!(
                ", {} skipped (could not be answered; see skipped.jsonl)",
                p.skipped
            )
        } else {
            String::new()
        },
        if p.bad_records > 0 {
            format!(
                ", {} bad records left out of the data (see bad_records.jsonl)",
                p.bad_records
            )
        } else {
            String::new()
        },
        if p.complete {
            String::new()
        } else {
            format!(
                " — INCOMPLETE, {} missing: rerun with the same --out",
                p.missing
            )
        }
    ));

    doc.heading(2, "Metrics (test questions)");
    if r.summary.is_some() {
        doc.table(
            &["metric", "value", "key", "meaning"],
            MAIN_METRICS
                .iter()
                .filter(|(k, _, _)| r.results.contains_key(*k))
                .map(|(k, label, meaning)| {
                    let v = match r.results.get(*k) {
                        Some(serde_json::Value::Number(n)) if *k == "count" => n.to_string(),
                        _ => with_interval(r, k),
                    };
                    vec![label.to_string(), v, k.to_string(), meaning.to_string()]
                })
                .collect(),
        );
    } else {
        doc.para(format!(
            "No accuracy metrics: no answered test question with human answers. {}",
            match r
                .results
                .get("coverage")
                .and_then(serde_json::Value::as_f64)
            {
                Some(c) => format!("Coverage (answered, not abstained): {:.1} %.", c * 100.0),
                None => String::new(),
            }
        ));
    }

    if let Some(s) = &r.summary {
        doc.heading(2, "Selective prediction");
        let from = match s.thresholds_from {
            crate::metrics::ThresholdSource::Validation => format!(
                "Thresholds chosen on the validation questions ({} answered), applied to the test \
                 questions.",
                r.validation.as_ref().map_or(0, |v| v.count)
            ),
            crate::metrics::ThresholdSource::EvaluatedSet => "⚠ No validation split was given \
                 (--val): the thresholds below were chosen on the test questions themselves, so \
                 these numbers are optimistic."
                .into(),
        };
        doc.para(from);
        doc.table(
            &["objective", "threshold", "Φ_c", "coverage", "risk"],
            s.effective_reliability
                .iter()
                .map(|p| {
                    vec![
                        format!("max Φ_{}", crate::bench::results::key_number(p.c)),
                        fmt(Some(p.threshold)),
                        fmt(Some(p.phi)),
                        pct(p.coverage),
                        fmt(p.risk),
                    ]
                })
                .chain(s.risk_thresholds.iter().map(|t| {
                    vec![
                        format!("risk ≤ {}", pct(t.target_risk)),
                        fmt(Some(t.threshold)),
                        "".into(),
                        pct(t.coverage),
                        fmt(t.risk),
                    ]
                }))
                .chain(std::iter::once(vec![
                    "recorded decisions (run's threshold)".into(),
                    fmt(Some(c.threshold)),
                    s.recorded_decisions
                        .phi
                        .iter()
                        .map(|p| {
                            format!("Φ_{}={:.4}", crate::bench::results::key_number(p.c), p.phi)
                        })
                        .collect::<Vec<_>>()
                        .join(", "),
                    pct(s.recorded_decisions.coverage),
                    fmt(s.recorded_decisions.risk),
                ]))
                .collect(),
        );

        doc.heading(2, "Plots");
        let rel = plot::reliability_svg(
            &s.ece.bins,
            &format!("Reliability (ECE {:.3}, 15 equal-width bins)", s.ece.ece),
        )?;
        let rel_path = dir.join(RELIABILITY_SVG);
        crate::io::write_bytes_atomically(&rel_path, rel.as_bytes())?;
        written.push(rel_path);
        doc.push(Block::Image {
            src: RELIABILITY_SVG.into(),
            alt: "Reliability diagram".into(),
        });
        let mut curves = vec![plot::Curve::of_run("model", s)];
        if let Some(o) = oracle {
            curves.push(plot::Curve {
                label: format!("oracle (AURC {:.3})", s.optimal_aurc),
                points: o.to_vec(),
                dashed: true,
            });
        }
        let marker = s.recorded_decisions.risk.map(|risk| {
            (
                format!("threshold {}", fmt(Some(c.threshold))),
                (s.recorded_decisions.coverage, risk),
            )
        });
        let rc = plot::risk_coverage_svg(&curves, marker, "Risk–coverage")?;
        let rc_path = dir.join(RISK_COVERAGE_SVG);
        crate::io::write_bytes_atomically(&rc_path, rc.as_bytes())?;
        written.push(rc_path);
        doc.push(Block::Image {
            src: RISK_COVERAGE_SVG.into(),
            alt: "Risk–coverage curve".into(),
        });
    }

    if !r.per_answer_type.is_empty() {
        doc.heading(2, "Per answer type");
        doc.table(
            &["answer type", "count", "accuracy", "mean confidence", "ECE"],
            r.per_answer_type
                .iter()
                .map(|(t, b)| {
                    vec![
                        t.clone(),
                        b.count.to_string(),
                        fmt(Some(b.accuracy)),
                        fmt(Some(b.mean_confidence)),
                        fmt(Some(b.ece)),
                    ]
                })
                .collect(),
        );
    }

    if !r.ood.is_empty() {
        doc.heading(
            2,
            "Out-of-distribution detection (each file against the test questions)",
        );
        doc.table(
            &[
                "OOD file",
                "count",
                "coverage",
                "mean confidence",
                "AUROC 1−conf",
                "AUPR 1−conf",
                "AUROC total",
                "AUPR total",
                "AUROC epistemic",
                "AUPR epistemic",
                "AUROC −selector",
            ],
            r.ood
                .iter()
                .map(|(name, o)| {
                    // The values of the flat map, with their bootstrap intervals.
                    let m = |key: &str| with_interval(r, &format!("ood.{name}.{key}"));
                    vec![
                        name.clone(),
                        o.count.to_string(),
                        pct(o.coverage),
                        fmt(Some(o.mean_confidence)),
                        m("auroc_confidence"),
                        m("aupr_confidence"),
                        m("auroc_total"),
                        m("aupr_total"),
                        m("auroc_epistemic"),
                        m("aupr_epistemic"),
                        m("auroc_selector"),
                    ]
                })
                .collect(),
        );
    }

    doc.heading(2, "Time and memory");
    let t = &r.timing;
    doc.table(
        &["quantity", "value"],
        vec![
            vec![
                "invocations".into(),
                match t.unfinished {
                    0 => t.invocations.to_string(),
                    n => format!("{} ({n} killed before their end)", t.invocations),
                },
            ],
            vec!["wall time (s)".into(), format!("{:.2}", t.wall_time_s)],
            vec![
                "answering time (s)".into(),
                format!("{:.2}", t.answering_time_s),
            ],
            vec!["answers per second".into(), fmt(t.answers_per_second)],
            vec![
                "peak memory (MiB)".into(),
                t.peak_memory_mib.map_or("—".into(), |m| format!("{m:.0}")),
            ],
        ],
    );
    doc.para(format!(
        "Wall time excludes model loading. Peak memory: {}.",
        t.peak_memory_source
    ));

    doc.heading(2, "Conventions and notes");
    doc.push(Block::List(r.notes.clone()));
    doc.heading(2, "Configuration");
    doc.push(Block::Code(
        serde_json::to_string_pretty(&r.config).unwrap_or_default(),
    ));
    written.extend(doc.write(dir, "report")?);
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markdown_shows_html_in_names_as_text_and_keeps_tables_whole() {
        let mut doc = Document {
            title: "run <b>x</b>".into(),
            blocks: Vec::new(),
        };
        doc.heading(2, "ood <script>alert(9)</script>");
        doc.para("a & b");
        doc.table(
            &["answer type", "n"],
            vec![vec!["<i>a|b\nc</i>".into(), "1".into()]],
        );
        let md = doc.to_markdown();
        assert!(!md.contains('<') && !md.contains('>'), "{md}");
        assert!(md.contains("# run &lt;b&gt;x&lt;/b&gt;"), "{md}");
        assert!(
            md.contains("## ood &lt;script&gt;alert(9)&lt;/script&gt;"),
            "{md}"
        );
        assert!(md.contains("a &amp; b"), "{md}");
        assert!(md.contains("| &lt;i&gt;a\\|b c&lt;/i&gt; | 1 |"), "{md}");
    }
}

//! `results.tsv`: the original's five tab-separated columns, so its notebook reads our logs and
//! we read its logs.

use std::path::Path;

use crate::{LedgerError, Status, io_err};

pub const HEADER: &str = "commit\tval_bpb\tmemory_gb\tstatus\tdescription";

/// One row of a results file.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct ResultRow {
    pub commit: String,
    /// `None` for crashes (written as 0.000000, as the original does).
    pub val_bpb: Option<f64>,
    pub memory_gb: f64,
    pub status: Status,
    pub description: String,
}

impl ResultRow {
    pub fn to_line(&self) -> String {
        // Tabs and newlines would break the columns.
        let description: String = self
            .description
            .chars()
            .map(|c| if c.is_control() { ' ' } else { c })
            .collect();
        format!(
            "{}\t{:.6}\t{:.1}\t{}\t{}",
            self.commit,
            self.val_bpb.unwrap_or(0.0),
            self.memory_gb,
            self.status.as_str(),
            description.trim()
        )
    }
}

/// Parses a results file; `source` names it in errors.
pub fn parse(text: &str, source: &str) -> Result<Vec<ResultRow>, LedgerError> {
    let mut rows = Vec::new();
    let mut lines = text.lines().enumerate();
    match lines.next() {
        Some((_, h)) if h.trim_end() == HEADER => {}
        _ => {
            return Err(LedgerError::Results(format!(
                "{source}: the first line must be the header `{}`",
                HEADER.replace('\t', "\\t")
            )));
        }
    }
    for (n, line) in lines {
        if line.trim().is_empty() {
            continue;
        }
        let bad = |what: &str| LedgerError::Results(format!("{source}:{}: {what}", n + 1));
        let cols: Vec<&str> = line.splitn(5, '\t').collect();
        if cols.len() < 4 {
            return Err(bad("expected 5 tab-separated columns"));
        }
        let val: f64 = cols[1]
            .trim()
            .parse()
            .map_err(|_| bad("val_bpb is not a number"))?;
        let memory_gb: f64 = cols[2]
            .trim()
            .parse()
            .map_err(|_| bad("memory_gb is not a number"))?;
        let status = Status::parse(cols[3].trim())
            .ok_or_else(|| bad("status must be keep, discard or crash"))?;
        rows.push(ResultRow {
            commit: cols[0].trim().to_string(),
            val_bpb: (status != Status::Crash && val.is_finite() && val > 0.0).then_some(val),
            memory_gb,
            status,
            description: cols.get(4).unwrap_or(&"").trim().to_string(),
        });
    }
    Ok(rows)
}

pub fn read(path: &Path) -> Result<Vec<ResultRow>, LedgerError> {
    let text =
        std::fs::read_to_string(path).map_err(io_err(format!("reading {}", path.display())))?;
    parse(&text, &path.display().to_string())
}

/// Rewrites the whole file (through a rename, so a reader never sees half of it).
pub fn write(path: &Path, rows: &[ResultRow]) -> Result<(), LedgerError> {
    let mut text = String::from(HEADER);
    text.push('\n');
    for row in rows {
        text += &row.to_line();
        text.push('\n');
    }
    let tmp = path.with_extension("tsv.partial");
    std::fs::write(&tmp, text).map_err(io_err(format!("writing {}", tmp.display())))?;
    std::fs::rename(&tmp, path).map_err(io_err(format!("writing {}", path.display())))
}

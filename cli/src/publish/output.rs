//! What `publish` shows: a progress bar on a terminal (nothing otherwise), then a summary table
//! or one JSON object.

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use palisade_idempotency::source::{Action, Plan};
use serde::Serialize;
use std::io::IsTerminal;
use std::time::Duration;

/// A progress bar on stderr when it is a terminal; hidden otherwise.
pub fn bar(total: u64, what: &str, bytes: bool) -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
    let template = if bytes {
        "palisade: {msg} [{bar:30}] {bytes}/{total_bytes} ({bytes_per_sec}, {eta})"
    } else {
        "palisade: {msg} [{bar:30}] {pos}/{len} ({eta})"
    };
    if let Ok(style) = ProgressStyle::with_template(template) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_message(what.to_string());
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
}

/// The outcome of a publish, as printed.
#[derive(Debug, Serialize)]
pub struct Summary {
    /// SRC as given.
    pub src: String,
    /// DEST as given.
    pub dest: String,
    /// Only the plan was computed.
    pub dry_run: bool,
    /// Partitions written (or that would be, with --dry-run).
    pub written: Vec<String>,
    /// Partitions left as they were.
    pub unchanged: usize,
    /// Partitions removed (or that would be).
    pub removed: Vec<String>,
    /// Committed partitions SRC does not have, kept (no --remove-missing).
    pub kept: Vec<String>,
    /// Bytes written to DEST (with --dry-run: the size of what would be written).
    pub bytes_written: u64,
    /// Bytes read to compute identities.
    pub bytes_hashed: u64,
    /// The manifest generation now committed.
    pub generation: u64,
    /// The fencing token used, if any.
    pub fencing_token: Option<u64>,
    /// Wall time, seconds.
    pub seconds: f64,
    /// The plan, per partition (with --dry-run only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub plan: Option<Plan>,
}

/// `1.5 GiB`-style sizes.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

impl Summary {
    /// What the plan says a publish of `args` does, before it writes.
    pub fn planned(
        args: &super::PublishArgs,
        plan: &Plan,
        base: &palisade_idempotency::Manifest,
        bytes_hashed: u64,
    ) -> Summary {
        Summary {
            src: args.src.display().to_string(),
            dest: args.dest.clone(),
            dry_run: args.dry_run,
            written: plan.written(),
            unchanged: plan.unchanged(),
            removed: plan.removed.clone(),
            kept: plan.kept.clone(),
            bytes_written: plan.bytes_to_write(),
            bytes_hashed,
            generation: base.generation,
            fencing_token: None,
            seconds: 0.0,
            plan: None,
        }
    }

    /// What the commit did.
    pub fn record(&mut self, report: palisade_idempotency::Report) {
        self.written = report.written;
        self.unchanged = report.unchanged.len();
        self.removed = report.removed;
        self.bytes_written = report.bytes_written;
        self.generation = report.generation;
    }

    /// The table for people.
    pub fn table(&self) -> String {
        let mut out = String::new();
        if let Some(plan) = &self.plan {
            for item in &plan.items {
                let verb = match item.action {
                    Action::New => "write (new)",
                    Action::Changed => "write (changed)",
                    Action::Unchanged => continue,
                };
                out.push_str(&format!(
                    "  {verb:<16} {}  ({} files, {})\n",
                    item.partition,
                    item.files,
                    human_bytes(item.bytes)
                ));
            }
            for p in &plan.removed {
                out.push_str(&format!("  {:<16} {p}\n", "remove"));
            }
        }
        let head = if self.dry_run {
            format!("dry run: {} -> {} (nothing written)", self.src, self.dest)
        } else {
            format!(
                "published {} -> {} (generation {}{})",
                self.src,
                self.dest,
                self.generation,
                self.fencing_token
                    .map(|t| format!(", fencing token {t}"))
                    .unwrap_or_default()
            )
        };
        let would = if self.dry_run { "would be " } else { "" };
        out.insert_str(0, &format!("{head}\n"));
        let rows = [
            (format!("{would}written"), self.written.len().to_string()),
            ("unchanged".to_string(), self.unchanged.to_string()),
            (format!("{would}removed"), self.removed.len().to_string()),
            (
                format!("bytes {would}written"),
                human_bytes(self.bytes_written),
            ),
            ("bytes hashed".to_string(), human_bytes(self.bytes_hashed)),
            ("time".to_string(), format!("{:.2} s", self.seconds)),
        ];
        for (k, v) in rows {
            out.push_str(&format!("  {k:<22} {v}\n"));
        }
        if !self.kept.is_empty() {
            out.push_str(&format!(
                "  note: {} committed partition(s) are not in SRC and were kept (use \
                 --remove-missing to remove them)\n",
                self.kept.len()
            ));
        }
        out
    }
}

/// Prints the summary as a table, or as one JSON object; the exit code.
pub fn print(summary: &Summary, json: bool) -> Result<u8, crate::exit::CliError> {
    if json {
        let line = serde_json::to_string(summary)
            .map_err(|e| crate::exit::CliError::new(crate::exit::INTERNAL, e.to_string()))?;
        println!("{line}");
    } else {
        print!("{}", summary.table());
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(human_bytes(0), "0 B");
        assert_eq!(human_bytes(1023), "1023 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(1 << 30), "1.0 GiB");
    }

    #[test]
    fn table_names_every_count() {
        let s = Summary {
            src: "out/".into(),
            dest: "file:///d".into(),
            dry_run: false,
            written: vec!["d=1".into()],
            unchanged: 3,
            removed: vec![],
            kept: vec!["d=0".into()],
            bytes_written: 2048,
            bytes_hashed: 4096,
            generation: 2,
            fencing_token: Some(7),
            seconds: 0.5,
            plan: None,
        };
        let t = s.table();
        for needle in [
            "generation 2",
            "fencing token 7",
            "written",
            "unchanged",
            "2.0 KiB",
            "4.0 KiB",
            "--remove-missing",
        ] {
            assert!(t.contains(needle), "{needle} in {t}");
        }
    }
}

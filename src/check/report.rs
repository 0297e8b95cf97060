//! The report of a check: each problem, its severity, what it affects and what a
//! repair did about it, and the exit status they make.

use std::fmt;
use std::path::PathBuf;

use crate::config::ByteSize;

/// Exit status: nothing wrong (after `--repair`: nothing left).
pub const EXIT_CLEAN: i32 = 0;
/// Exit status: the check could not run (directory in use, unreadable, newer format).
pub const EXIT_ERROR: i32 = 1;
/// Exit status: corruption (with or without leaks).
pub const EXIT_CORRUPTION: i32 = 2;
/// Exit status: leaks only.
pub const EXIT_LEAKS: i32 = 3;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Severity {
    /// Reclaimable: nothing a snapshot or volume needs is involved.
    Leak,
    /// Data is lost or damaged (or would be, by the next mount or deletion).
    Corruption,
}

/// What `--repair` did about a problem.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    Repaired(String),
    /// Left as it is: why, and what was done instead, if anything.
    NotRepaired(String),
    Failed(String),
}

#[derive(Clone, Debug)]
pub struct Problem {
    pub severity: Severity,
    /// What is damaged or leaked, e.g. `chunk 1a2b3c4d5e6f7a8b (pack 1, offset 8192)`.
    pub subject: String,
    pub detail: String,
    /// Snapshots (visible ones, by name) that read what is damaged.
    pub affects: Vec<String>,
    /// Set when repairing.
    pub outcome: Option<Outcome>,
}

impl Problem {
    pub(super) fn new(
        severity: Severity,
        subject: impl Into<String>,
        detail: impl Into<String>,
    ) -> Problem {
        Problem {
            severity,
            subject: subject.into(),
            detail: detail.into(),
            affects: Vec::new(),
            outcome: None,
        }
    }

    pub(super) fn affecting(mut self, names: impl IntoIterator<Item = String>) -> Problem {
        self.affects = names.into_iter().collect();
        self
    }

    pub(super) fn with(mut self, outcome: Option<Outcome>) -> Problem {
        self.outcome = outcome;
        self
    }

    /// Whether the problem is still there (not repaired).
    pub fn outstanding(&self) -> bool {
        !matches!(self.outcome, Some(Outcome::Repaired(_)))
    }
}

/// What the check saw.
#[derive(Clone, Debug, Default)]
pub struct Totals {
    pub volumes: usize,
    pub snapshots: usize,
    /// Deleted snapshots still kept (as the base of a volume's next capture).
    pub hidden_snapshots: usize,
    pub packs: usize,
    pub manifest_entries: u64,
    /// Chunks read back and verified, and their stored and plain bytes.
    pub chunks: u64,
    pub stored_bytes: u64,
    pub plain_bytes: u64,
}

#[derive(Clone, Debug)]
pub struct Report {
    pub data_dir: PathBuf,
    pub repair: bool,
    pub totals: Totals,
    /// Facts worth knowing that are not problems (e.g. a capture the next mount recovers).
    pub notes: Vec<String>,
    pub problems: Vec<Problem>,
}

impl Report {
    /// The worst problem still there.
    pub fn worst(&self) -> Option<Severity> {
        self.problems
            .iter()
            .filter(|p| p.outstanding())
            .map(|p| p.severity)
            .max()
    }

    pub fn exit_code(&self) -> i32 {
        match self.worst() {
            None => EXIT_CLEAN,
            Some(Severity::Leak) => EXIT_LEAKS,
            Some(Severity::Corruption) => EXIT_CORRUPTION,
        }
    }

    fn count(&self, severity: Severity, outstanding: bool) -> usize {
        self.problems
            .iter()
            .filter(|p| p.severity == severity && p.outstanding() == outstanding)
            .count()
    }
}

/// `1 volume`, `2 volumes`, `3 manifest entries`.
pub fn counted(n: u64, what: &str) -> String {
    match (n, what.strip_suffix('y')) {
        (1, _) => format!("1 {what}"),
        (_, Some(stem)) => format!("{n} {stem}ies"),
        _ => format!("{n} {what}s"),
    }
}

/// At most this many snapshot names are listed per problem.
const MAX_NAMES_SHOWN: usize = 20;

/// A problem's line: its kind, subject and detail, and the snapshots that read it.
impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match self.severity {
            Severity::Corruption => "corruption",
            Severity::Leak => "leak",
        };
        write!(f, "{kind}: {}: {}", self.subject, self.detail)?;
        if !self.affects.is_empty() {
            let shown: Vec<&str> = self
                .affects
                .iter()
                .take(MAX_NAMES_SHOWN)
                .map(String::as_str)
                .collect();
            write!(f, "; read by {}", shown.join(", "))?;
            if self.affects.len() > MAX_NAMES_SHOWN {
                write!(f, " and {} more", self.affects.len() - MAX_NAMES_SHOWN)?;
            }
        }
        Ok(())
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let t = &self.totals;
        writeln!(f, "data directory {}", self.data_dir.display())?;
        let hidden = match t.hidden_snapshots {
            0 => String::new(),
            n => format!(" (and {n} deleted, kept as a base)"),
        };
        writeln!(
            f,
            "  {}, {}{hidden}, {}, {}",
            counted(t.volumes as u64, "volume"),
            counted(t.snapshots as u64, "snapshot"),
            counted(t.packs as u64, "pack"),
            counted(t.manifest_entries, "manifest entry")
        )?;
        writeln!(
            f,
            "  {} verified: {} stored, {} plain",
            counted(t.chunks, "chunk"),
            ByteSize(t.stored_bytes),
            ByteSize(t.plain_bytes)
        )?;
        for note in &self.notes {
            writeln!(f, "  note: {note}")?;
        }
        for p in &self.problems {
            writeln!(f, "{p}")?;
            match &p.outcome {
                None => {}
                Some(Outcome::Repaired(what)) => writeln!(f, "  repaired: {what}")?,
                Some(Outcome::NotRepaired(why)) => writeln!(f, "  not repaired: {why}")?,
                Some(Outcome::Failed(why)) => writeln!(f, "  repair failed: {why}")?,
            }
        }
        let (corrupt, leaks) = (
            self.count(Severity::Corruption, true),
            self.count(Severity::Leak, true),
        );
        let repaired = self.problems.len() - corrupt - leaks;
        if self.repair && repaired > 0 {
            writeln!(f, "{} repaired", counted(repaired as u64, "problem"))?;
        }
        match (corrupt, leaks) {
            (0, 0) if repaired > 0 => writeln!(f, "no problems left"),
            (0, 0) => writeln!(f, "no problems found"),
            _ => writeln!(
                f,
                "{} and {}{} (exit status {})",
                counted(corrupt as u64, "corruption problem"),
                counted(leaks as u64, "leak"),
                if self.repair { " left" } else { "" },
                self.exit_code()
            ),
        }
    }
}

//! What a failure means to the user: an exit code and, where there is one, the fix.
//!
//! Every error type that can end a command implements [`Classify`] right after its definition,
//! so the decision sits next to the variants it covers, and each `match` there is exhaustive: a
//! new variant does not compile until someone decides its code. `cli::exit` is the only place
//! that turns a [`Classify`] error into a process exit. The codes are documented in
//! docs/exit-codes.md; a test below keeps the two in step.
//!
//! This module depends on nothing else in the crate, so that every layer may use it.

use std::fmt::Display;

/// Process exit codes. The numbers are stable: scripts and monitoring rely on them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Code {
    Ok = 0,
    /// archive-get: the repository does not have the file (end of archive).
    NotFound = 1,
    /// Bad command-line usage.
    Usage = 2,
    /// Bad input: a file that is not WAL, a malformed URL, an invalid config file.
    Input = 3,
    /// The repository refuses: another cluster's, a newer format, different content under a name.
    Conflict = 4,
    /// Storage failed (after retrying transient errors): unreachable, missing bucket, denied.
    Storage = 5,
    /// A stored object failed its checksum.
    Corrupt = 6,
    /// PostgreSQL refused or failed: connection, authentication, privileges, protocol.
    Postgres = 7,
    /// restore refused before writing anything: target outside the recoverable window,
    /// non-empty directory, no usable backup.
    RestoreRefused = 8,
    /// A backup or restore failed part-way (nothing usable was published or the directory must
    /// be emptied before retrying).
    JobFailed = 9,
    /// verify found problems that put a restore at risk (the report lists them).
    VerifyFailed = 10,
    /// stream: the server no longer has WAL the repository needs next; continuity is broken.
    WalGap = 11,
    /// check: a check failed (the report names each problem with its fix).
    CheckFailed = 12,
    /// drill: PostgreSQL did not replay to the target and promote (or did not start).
    DrillNotReached = 13,
    /// drill: the server came up but the check query failed.
    DrillCheckFailed = 14,
    /// Internal error (a bug).
    Internal = 70,
    /// archive-get: any failure other than "not found". Above 125, so PostgreSQL aborts recovery.
    RecoveryFatal = 200,
}

impl Code {
    /// Every code, in increasing order.
    pub const ALL: [Code; 17] = [
        Code::Ok,
        Code::NotFound,
        Code::Usage,
        Code::Input,
        Code::Conflict,
        Code::Storage,
        Code::Corrupt,
        Code::Postgres,
        Code::RestoreRefused,
        Code::JobFailed,
        Code::VerifyFailed,
        Code::WalGap,
        Code::CheckFailed,
        Code::DrillNotReached,
        Code::DrillCheckFailed,
        Code::Internal,
        Code::RecoveryFatal,
    ];

    /// The process exit status.
    pub fn number(self) -> u8 {
        self as u8
    }

    /// The words docs/exit-codes.md uses for this code in its "meaning" column. The match is
    /// exhaustive on purpose: a new code does not compile until it is described (and added to
    /// [`Code::ALL`] and the document, which the test below checks).
    pub fn meaning(self) -> &'static str {
        match self {
            Code::Ok => "success",
            Code::NotFound => "the repository does not have the requested file",
            Code::Usage => "bad command-line usage",
            Code::Input => "bad input",
            Code::Conflict => "the repository refuses",
            Code::Storage => "storage failure",
            Code::Corrupt => "integrity failure",
            Code::Postgres => "PostgreSQL refused or failed",
            Code::RestoreRefused => "restore refused before writing anything",
            Code::JobFailed => "a backup or restore failed part-way",
            Code::VerifyFailed => "`verify` found problems",
            Code::WalGap => "the server no longer has the WAL",
            Code::CheckFailed => "a check failed",
            Code::DrillNotReached => "PostgreSQL did not reach the target",
            Code::DrillCheckFailed => "the check query failed",
            Code::Internal => "internal error",
            Code::RecoveryFatal => "any failure other than \"not found\"",
        }
    }
}

/// An error that knows what it means to the user: the exit code and, when there is a fix the
/// user can apply, a one-line hint. Wrapping errors delegate to what they wrap.
pub trait Classify: Display {
    fn code(&self) -> Code;

    fn hint(&self) -> Option<String> {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOC: &str = include_str!("../docs/exit-codes.md");

    /// The rows of the table in docs/exit-codes.md: (code, meaning).
    fn documented() -> Vec<(u8, String)> {
        DOC.lines()
            .filter_map(|line| {
                let cells: Vec<&str> = line.trim().strip_prefix('|')?.split('|').collect();
                let number = cells.first()?.trim().parse().ok()?;
                let meaning = cells.get(1)?.replace("**", "");
                Some((number, meaning.trim().to_string()))
            })
            .collect()
    }

    #[test]
    fn all_lists_every_code_once_in_order() {
        for w in Code::ALL.windows(2) {
            assert!(w[0].number() < w[1].number(), "{:?} {:?}", w[0], w[1]);
        }
        // Exhaustive, so that a new variant stops here until it is added to ALL.
        for c in Code::ALL {
            match c {
                Code::Ok
                | Code::NotFound
                | Code::Usage
                | Code::Input
                | Code::Conflict
                | Code::Storage
                | Code::Corrupt
                | Code::Postgres
                | Code::RestoreRefused
                | Code::JobFailed
                | Code::VerifyFailed
                | Code::WalGap
                | Code::CheckFailed
                | Code::DrillNotReached
                | Code::DrillCheckFailed
                | Code::Internal
                | Code::RecoveryFatal => {}
            }
        }
    }

    #[test]
    fn every_code_is_documented_with_its_number_and_meaning() {
        let doc = documented();
        for c in Code::ALL {
            let Some((_, meaning)) = doc.iter().find(|(n, _)| *n == c.number()) else {
                panic!("docs/exit-codes.md has no row for {} ({c:?})", c.number());
            };
            assert!(
                meaning.to_lowercase().contains(&c.meaning().to_lowercase()),
                "docs/exit-codes.md describes {} as {meaning:?}; the code says {:?}",
                c.number(),
                c.meaning()
            );
        }
    }

    #[test]
    fn every_documented_code_exists() {
        let doc = documented();
        assert!(doc.len() >= Code::ALL.len(), "table not found: {doc:?}");
        for (n, meaning) in &doc {
            assert!(
                Code::ALL.iter().any(|c| c.number() == *n),
                "docs/exit-codes.md documents {n} ({meaning}), which pitr never exits with"
            );
        }
        let mut numbers: Vec<u8> = doc.iter().map(|(n, _)| *n).collect();
        numbers.sort_unstable();
        numbers.dedup();
        assert_eq!(numbers.len(), doc.len(), "a code is documented twice");
    }
}

//! The one edge where an error becomes a process exit: its code and hint come from the error
//! itself ([`Classify`], next to each error type); archive-get's rule is the only policy here.
//! The codes are documented in docs/exit-codes.md (a test in `crate::error` keeps the two in
//! step).

use std::process::ExitCode;

use crate::error::Classify;
pub use crate::error::Code;

impl From<Code> for ExitCode {
    fn from(c: Code) -> ExitCode {
        ExitCode::from(c.number())
    }
}

/// A failure as the user sees it: exit code, one message, and what to do about it.
#[derive(Debug)]
pub struct Failure {
    pub code: Code,
    pub message: String,
    pub hint: Option<String>,
}

impl<E: Classify> From<E> for Failure {
    fn from(e: E) -> Failure {
        Failure {
            code: e.code(),
            message: e.to_string(),
            hint: e.hint(),
        }
    }
}

impl Failure {
    pub fn new(code: Code, message: impl ToString, hint: Option<String>) -> Failure {
        Failure {
            code,
            message: message.to_string(),
            hint,
        }
    }

    /// archive-get: every failure other than "not found" (which is not an error but an outcome)
    /// must stop recovery, so it exits above 125 (docs/exit-codes.md, "Why archive-get uses
    /// 200"). Everything archive-get can fail with passes through here.
    pub fn for_archive_get(e: impl Into<Failure>) -> Failure {
        Failure {
            code: Code::RecoveryFatal,
            ..e.into()
        }
    }

    /// [`Failure::for_archive_get`], except for a standby: every failure is logged and exits 1.
    /// Its `restore_command` is a fallback beside streaming, "not found" never ends its
    /// recovery, and stopping it would take the standby down with the repository
    /// (docs/exit-codes.md). Nothing unverified is served either way: this only chooses the
    /// exit status.
    pub fn for_archive_get_in(
        e: impl Into<Failure>,
        mode: crate::archive::RecoveryMode,
    ) -> Failure {
        let mut f = Failure::for_archive_get(e);
        if mode == crate::archive::RecoveryMode::Standby {
            f.code = Code::NotFound;
            let standby = "this server is a standby (standby.signal): archive-get exits 1 so that it keeps streaming from its primary, but it cannot fetch WAL from the repository until this is fixed";
            f.hint = Some(match f.hint {
                Some(h) => format!("{h}; {standby}"),
                None => standby.to_string(),
            });
        }
        f
    }

    /// [`Failure::for_archive_get`] when `is_get`, else the error's own code.
    pub fn for_command(e: impl Into<Failure>, is_get: bool) -> Failure {
        if is_get {
            Failure::for_archive_get(e)
        } else {
            e.into()
        }
    }

    /// The failure of one of several repositories: its message names it.
    pub fn in_repository(mut self, name: &str) -> Failure {
        self.message = format!("repository {name}: {}", self.message);
        self
    }

    /// Bad input found by the command line itself (not by a library error).
    pub fn input(message: impl ToString) -> Failure {
        Failure::new(Code::Input, message, None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::repo::RepoError;
    use crate::storage::StorageError;

    #[test]
    fn archive_get_turns_every_failure_into_recovery_fatal_and_keeps_the_hint() {
        let e = RepoError::NotInitialized {
            location: "/nowhere".into(),
        };
        let f = Failure::for_archive_get(e);
        assert_eq!(f.code, Code::RecoveryFatal);
        assert!(f.hint.unwrap().contains("--repo"));
        let e = StorageError::NotFound { key: "k".into() };
        assert_eq!(Failure::for_command(e, false).code, Code::Storage);
    }
}

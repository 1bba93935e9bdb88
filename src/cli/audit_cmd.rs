//! The audit trail from the command line: which commands are audited, their arguments with
//! secrets removed, and `pitr audit`.

use chrono::{DateTime, Utc};
use clap::Args;
use tokio::sync::oneshot;

use super::exit::{Code, Failure};
use super::Command;
use crate::recovery;
use crate::repo::{
    AuditEntry, AuditLog, AuditOutcome, AuditRecord, RepoError, Repository, WriteOptions,
};
use crate::storage::Storage;

#[derive(Args, Debug)]
pub struct AuditArgs {
    /// Only records of commands started at or after this time (RFC 3339 or PostgreSQL's
    /// format), or within this long before now (e.g. 7d, 12h).
    #[arg(long, value_name = "T")]
    pub since: Option<String>,
    /// Print the records as JSON.
    #[arg(long)]
    pub json: bool,
}

/// What an audited command changed, filled in by the command.
#[derive(Debug, Default)]
pub struct Changes {
    pub created: Vec<String>,
    pub deleted: Vec<String>,
    pub details: Option<serde_json::Value>,
}

/// The name an audited command is recorded under; `None` for commands that change nothing
/// (dry runs, reads) or whose objects are their own record (archive-push, stream).
pub fn audited_name(command: &Command) -> Option<&'static str> {
    match command {
        Command::Backup(_) => Some("backup"),
        Command::Expire(a) if !a.dry_run => Some("expire"),
        Command::Restore(a) if !a.dry_run => Some("restore"),
        Command::Drill(_) => Some("drill"),
        Command::Key(_) => Some("key-rotate"),
        Command::Copy(_) => Some("copy"),
        _ => None,
    }
}

/// A command refused for its encryption key (missing, wrong, or set for an unencrypted
/// repository) writes nothing, its audit record included: the key is checked first.
pub async fn check_key(storage: &Storage, write: &WriteOptions) -> Result<(), Failure> {
    match Repository::open(storage.clone(), write.clone()).await {
        Err(
            e @ (RepoError::KeyRequired { .. }
            | RepoError::WrongKey { .. }
            | RepoError::NotEncrypted { .. }
            | RepoError::KeySource(_)),
        ) => Err(e.into()),
        // Anything else (a new location, storage trouble) is the command's own to report.
        _ => Ok(()),
    }
}

/// This process's arguments, secrets removed.
pub fn arguments() -> Vec<String> {
    std::env::args_os()
        .skip(1)
        .map(|a| redact(&a.to_string_lossy()))
        .collect()
}

/// Writes the command's start record: the command must not run if this fails.
pub async fn begin(storage: &Storage, command: &str) -> Result<AuditEntry, Failure> {
    let args = arguments();
    AuditLog::new(storage.clone())
        .begin(AuditRecord::starting(command, args))
        .await
        .map_err(audit_failure)
}

/// A command's permission to change anything, given once its start record is stored (and
/// withheld when that fails). A command may prepare meanwhile, as long as it changes nothing:
/// `pitr backup` reaches the server.
pub struct Gate(oneshot::Receiver<bool>);

impl Gate {
    /// A gate already open, for a command that is not recorded.
    pub fn open() -> Gate {
        let (tx, rx) = oneshot::channel();
        let _ = tx.send(true);
        Gate(rx)
    }

    /// Whether the command may go on.
    pub async fn passed(self) -> bool {
        self.0.await.unwrap_or(false)
    }

    /// Ok when the command may go on; the error is never shown: [`recorded`] reports why.
    pub async fn pass(self) -> Result<(), Failure> {
        match self.passed().await {
            true => Ok(()),
            false => Err(Failure::new(Code::JobFailed, "not recorded", None)),
        }
    }
}

/// `command` once `gate` opens: for a command with nothing to prepare.
pub async fn after(
    gate: Gate,
    command: impl std::future::Future<Output = (Result<Code, Failure>, Changes)>,
) -> (Result<Code, Failure>, Changes) {
    match gate.pass().await {
        Ok(()) => command.await,
        Err(f) => (Err(f), Changes::default()),
    }
}

/// Runs `command` recorded in `storage`'s audit trail as `name`: the key is checked and the
/// starting record written while `command` waits at its [`Gate`], its outcome and changes
/// after.
pub async fn recorded<F: std::future::Future<Output = (Result<Code, Failure>, Changes)>>(
    storage: &Storage,
    write: &WriteOptions,
    name: &str,
    command: impl FnOnce(Gate) -> F,
) -> Result<Code, Failure> {
    let (opens, gate) = oneshot::channel();
    let start = async {
        let entry = match check_key(storage, write).await {
            Ok(()) => begin(storage, name).await,
            Err(f) => Err(f),
        };
        let _ = opens.send(entry.is_ok());
        entry
    };
    let (entry, (result, changes)) = tokio::join!(start, command(Gate(gate)));
    // Refused at the gate, the command did nothing: the reason is the audit's.
    let entry = entry?;
    match (finish(entry, &result, changes).await, &result) {
        (Err(f), Ok(_)) => return Err(f),
        // The command's own failure is the one to report.
        (Err(f), Err(_)) => tracing::error!(error = %f.message, "audit record not written"),
        _ => {}
    }
    result
}

/// Writes the final record. A command that succeeded but whose record cannot be written
/// fails: the trail must not have gaps nobody hears about.
pub async fn finish(
    mut entry: AuditEntry,
    result: &Result<Code, Failure>,
    changes: Changes,
) -> Result<(), Failure> {
    entry.record.created = changes.created;
    entry.record.deleted = changes.deleted;
    entry.record.details = changes.details;
    let (code, error) = match result {
        Ok(code) => (*code as u8, None),
        Err(f) => (f.code as u8, Some(f.message.clone())),
    };
    entry
        .finish(code, error)
        .await
        .map(|_| ())
        .map_err(audit_failure)
}

fn audit_failure(e: RepoError) -> Failure {
    let mut f = Failure::from(e);
    f.message = format!("cannot write the audit record: {}", f.message);
    f.hint = Some(
        "commands that change or restore from the repository record themselves under audit/: \
         the credentials need write access there"
            .into(),
    );
    f
}

/// `arg` with the values of password, secret and token settings (conninfo `password=...`,
/// `--x-secret=...`) and URL passwords (`postgres://user:pw@host`) replaced by `***`.
pub fn redact(arg: &str) -> String {
    redact_keyed(&redact_url_password(arg))
}

fn redact_url_password(arg: &str) -> String {
    let Some(scheme_end) = arg.find("://") else {
        return arg.to_string();
    };
    let start = scheme_end + 3;
    let rest = &arg[start..];
    let authority_len = rest
        .find(|c: char| c == '/' || c == '?' || c == '#' || c.is_whitespace())
        .unwrap_or(rest.len());
    let authority = &rest[..authority_len];
    let Some(at) = authority.rfind('@') else {
        return arg.to_string();
    };
    let Some(colon) = authority[..at].find(':') else {
        return arg.to_string();
    };
    format!("{}***{}", &arg[..start + colon + 1], &arg[start + at..])
}

const SECRET_WORDS: [&str; 3] = ["password", "secret", "token"];

fn redact_keyed(arg: &str) -> String {
    let lower = arg.to_ascii_lowercase();
    let bytes = arg.as_bytes();
    let mut out = String::new();
    let mut copied = 0;
    let mut i = 0;
    while i < bytes.len() {
        let Some(word) = SECRET_WORDS.iter().find(|w| lower[i..].starts_with(**w)) else {
            i += 1;
            continue;
        };
        // The rest of the key (`password_file`, `secret-key`), spaces, then `=`.
        let mut j = i + word.len();
        while j < bytes.len()
            && (bytes[j].is_ascii_alphanumeric() || bytes[j] == b'_' || bytes[j] == b'-')
        {
            j += 1;
        }
        while j < bytes.len() && bytes[j] == b' ' {
            j += 1;
        }
        if j >= bytes.len() || bytes[j] != b'=' {
            i = j.max(i + 1);
            continue;
        }
        j += 1;
        while j < bytes.len() && bytes[j] == b' ' {
            j += 1;
        }
        let end = value_end(bytes, j);
        out.push_str(&arg[copied..j]);
        out.push_str("***");
        copied = end;
        i = end.max(j + 1);
    }
    out.push_str(&arg[copied.min(arg.len())..]);
    out
}

/// End of a conninfo value starting at `j`: a quoted string (with `\'` escapes), or up to
/// whitespace or `&` (URL query parameters).
fn value_end(bytes: &[u8], j: usize) -> usize {
    if bytes.get(j) == Some(&b'\'') {
        let mut k = j + 1;
        while k < bytes.len() {
            match bytes[k] {
                b'\\' => k += 2,
                b'\'' => return k + 1,
                _ => k += 1,
            }
        }
        return bytes.len();
    }
    let mut k = j;
    while k < bytes.len() && !bytes[k].is_ascii_whitespace() && bytes[k] != b'&' {
        k += 1;
    }
    k
}

fn parse_since(s: &str) -> Result<DateTime<Utc>, Failure> {
    if let Ok(t) = recovery::parse_target_time(s) {
        return Ok(t.with_timezone(&Utc));
    }
    let d = humantime::parse_duration(s).map_err(|_| {
        Failure::new(
            Code::Usage,
            format!("--since {s:?}: expected a time (2026-11-23T03:18:29Z) or a duration (7d)"),
            None,
        )
    })?;
    let d = chrono::Duration::from_std(d)
        .map_err(|e| Failure::new(Code::Usage, format!("--since {s:?}: {e}"), None))?;
    Ok(Utc::now() - d)
}

/// `pitr audit`: the records, oldest first (newest last).
pub async fn audit(storage: Storage, a: AuditArgs) -> Result<Code, Failure> {
    let since = a.since.as_deref().map(parse_since).transpose()?;
    let records = AuditLog::new(storage).list(since).await?;
    if a.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&records).expect("records serialize")
        );
        return Ok(Code::Ok);
    }
    if records.is_empty() {
        println!("no audit records");
    }
    for r in &records {
        let outcome = match r.outcome {
            AuditOutcome::Success => "ok".to_string(),
            AuditOutcome::Failure => format!("FAILED (exit {})", r.exit_code.unwrap_or(0)),
            AuditOutcome::Started | AuditOutcome::Unfinished => "UNFINISHED".to_string(),
        };
        println!(
            "{}  {:<17} {:<14} {}@{} (pid {}, pitr {})",
            r.started.format("%Y-%m-%d %H:%M:%S%:z"),
            r.command,
            outcome,
            r.user,
            r.host,
            r.pid,
            r.pitr_version
        );
        println!("    pitr {}", r.arguments.join(" "));
        for c in &r.created {
            println!("    created {c}");
        }
        for d in &r.deleted {
            println!("    deleted {d}");
        }
        if let Some(e) = &r.error {
            println!("    error: {}", e.lines().next().unwrap_or_default());
        }
    }
    Ok(Code::Ok)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_removed_from_arguments() {
        let cases = [
            (
                "host=db password=hunter2 user=x",
                "host=db password=*** user=x",
            ),
            ("password = 'a b\\' c' user=x", "password = *** user=x"),
            (
                "postgres://u:hunter2@db:5432/x?sslmode=require",
                "postgres://u:***@db:5432/x?sslmode=require",
            ),
            (
                "postgres://db/x?user=u&password=hunter2&a=b",
                "postgres://db/x?user=u&password=***&a=b",
            ),
            (
                "--aws-secret-access-key=hunter2",
                "--aws-secret-access-key=***",
            ),
            ("s3://bucket/prefix", "s3://bucket/prefix"),
            ("postgres://u@db/x", "postgres://u@db/x"),
            ("select 'password'", "select 'password'"),
            ("PASSWORD=x", "PASSWORD=***"),
        ];
        for (arg, want) in cases {
            assert_eq!(redact(arg), want, "{arg}");
        }
    }

    #[test]
    fn since_takes_times_and_durations() {
        let t = parse_since("2026-11-23T03:18:29Z").unwrap();
        assert_eq!(t.to_rfc3339(), "2026-11-23T03:18:29+00:00");
        let d = parse_since("1h").unwrap();
        assert!(Utc::now() - d >= chrono::Duration::minutes(59));
        assert!(parse_since("yesterday-ish").is_err());
    }
}

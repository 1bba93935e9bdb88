//! Where the encryption passphrase comes from: a file, or the output of a command (so that any
//! KMS or vault works through its own CLI, without an SDK in pitr). docs/encryption.md.
//!
//! Secrets never reach an error message, a log line or a `Debug` print: errors name the file or
//! the command and say what to fix, never the content or what the command printed (a failing
//! `vault` or `aws` call may well print the secret it was asked for, or a token, on stderr).

use std::fmt;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};

use zeroize::Zeroizing;

/// One configured key source (`--encryption-key-file` or `--encryption-key-command`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KeySource {
    /// The file's content, one trailing newline stripped, is the passphrase.
    File(PathBuf),
    /// Run through `sh -c`; its stdout, one trailing newline stripped, is the passphrase.
    Command(String),
}

/// The passphrase: zeroized on drop, redacted in `Debug` and `Display`.
pub struct Passphrase(Zeroizing<Vec<u8>>);

impl Passphrase {
    /// The bytes, for the KDF only.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Debug for Passphrase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Passphrase(<redacted>)")
    }
}

impl fmt::Display for Passphrase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KeySourceError {
    #[error("cannot read the encryption key file {}: {source}", path.display())]
    ReadFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the encryption key file {} is empty", path.display())]
    EmptyFile { path: PathBuf },
    #[error("cannot run the encryption key command `{command}`: {source}")]
    Spawn {
        command: String,
        source: std::io::Error,
    },
    /// The command's output is deliberately not part of the message.
    #[error("the encryption key command `{command}` failed ({status}); its output is not shown, since it may hold the key")]
    CommandFailed { command: String, status: String },
    #[error("the encryption key command `{command}` printed nothing on stdout")]
    EmptyOutput { command: String },
}

impl KeySourceError {
    /// What to do about it, for the `hint:` line.
    pub fn hint(&self) -> String {
        match self {
            KeySourceError::ReadFile { .. } => "check --encryption-key-file (or PITR_ENCRYPTION_KEY_FILE, [encryption] key_file): the file must exist and be readable by this user".into(),
            KeySourceError::EmptyFile { .. } => "put the passphrase in the file, e.g. `openssl rand -base64 32 > FILE`; an empty key is never accepted".into(),
            KeySourceError::Spawn { .. } => "pitr runs the key command with `sh -c`: check that sh is installed and on PATH".into(),
            KeySourceError::CommandFailed { .. } => "run the command yourself as this user to see its error (credentials, network, PATH), then retry".into(),
            KeySourceError::EmptyOutput { .. } => "the command must print the passphrase on stdout; an empty key is never accepted".into(),
        }
    }
}

impl KeySource {
    /// Reads the passphrase. Blocking: a key command may take a while (a KMS round trip), so
    /// async callers run this once at start-up, or on a blocking thread.
    pub fn resolve(&self) -> Result<Passphrase, KeySourceError> {
        match self {
            KeySource::File(path) => read_key_file(path),
            KeySource::Command(command) => run_key_command(command),
        }
    }
}

/// Strips exactly one trailing `\n`: what `echo` and editors append, and nothing more, so that
/// a passphrase that really ends in whitespace stays intact.
fn strip_one_newline(bytes: &mut Zeroizing<Vec<u8>>) {
    if bytes.last() == Some(&b'\n') {
        bytes.pop();
    }
}

fn read_key_file(path: &Path) -> Result<Passphrase, KeySourceError> {
    let read_err = |source| KeySourceError::ReadFile {
        path: path.to_path_buf(),
        source,
    };
    let mut file = std::fs::File::open(path).map_err(read_err)?;
    warn_if_readable_by_others(&file, path);
    let mut bytes = Zeroizing::new(Vec::with_capacity(256));
    file.read_to_end(&mut bytes).map_err(read_err)?;
    strip_one_newline(&mut bytes);
    if bytes.is_empty() {
        return Err(KeySourceError::EmptyFile {
            path: path.to_path_buf(),
        });
    }
    Ok(Passphrase(bytes))
}

/// A warning, not an error: the file may sit on a private volume, or group access may be how
/// the operators meant to share it.
fn warn_if_readable_by_others(file: &std::fs::File, path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(meta) = file.metadata() {
        if meta.permissions().mode() & 0o007 != 0 {
            tracing::warn!(
                path = %path.display(),
                "the encryption key file is readable by other users; chmod 600 it"
            );
        }
    }
}

fn run_key_command(command: &str) -> Result<Passphrase, KeySourceError> {
    // stdin is closed so that a command waiting for input fails instead of hanging
    // archive-push; stderr is captured (and dropped) rather than inherited, because a failing
    // KMS or vault CLI may print secrets there and this process's stderr ends up in
    // PostgreSQL's log.
    let output = Command::new("sh")
        .arg("-c")
        .arg(command)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .map_err(|source| KeySourceError::Spawn {
            command: command.to_string(),
            source,
        })?;
    let mut stdout = Zeroizing::new(output.stdout);
    drop(Zeroizing::new(output.stderr));
    if !output.status.success() {
        return Err(KeySourceError::CommandFailed {
            command: command.to_string(),
            status: describe_status(output.status),
        });
    }
    strip_one_newline(&mut stdout);
    if stdout.is_empty() {
        return Err(KeySourceError::EmptyOutput {
            command: command.to_string(),
        });
    }
    Ok(Passphrase(stdout))
}

fn describe_status(status: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(127), _) => "exit status 127: command not found".into(),
        (Some(code), _) => format!("exit status {code}"),
        (None, Some(signal)) => format!("killed by signal {signal}"),
        (None, None) => status.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "s3cr3t-passphrase-value";

    fn file_with(dir: &tempfile::TempDir, content: &[u8]) -> PathBuf {
        let path = dir.path().join("key");
        std::fs::write(&path, content).unwrap();
        path
    }

    #[test]
    fn key_file_strips_one_trailing_newline() {
        let dir = tempfile::tempdir().unwrap();
        for (content, want) in [
            (&b"secret\n"[..], &b"secret"[..]),
            (b"secret", b"secret"),
            (b"secret\n\n", b"secret\n"),
            (b"  spaced \n", b"  spaced "),
            (b"\xffbinary\x00key", b"\xffbinary\x00key"),
        ] {
            let path = file_with(&dir, content);
            let p = KeySource::File(path).resolve().unwrap();
            assert_eq!(p.as_bytes(), want);
        }
    }

    #[test]
    fn empty_or_missing_key_file_is_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        for content in [&b""[..], b"\n"] {
            let path = file_with(&dir, content);
            let e = KeySource::File(path.clone()).resolve().unwrap_err();
            assert!(matches!(e, KeySourceError::EmptyFile { .. }), "{e}");
            assert!(e.to_string().contains(&*path.to_string_lossy()));
        }
        let missing = dir.path().join("nope");
        let e = KeySource::File(missing.clone()).resolve().unwrap_err();
        assert!(matches!(e, KeySourceError::ReadFile { .. }));
        assert!(e.to_string().contains(&*missing.to_string_lossy()), "{e}");
        assert!(e.hint().contains("--encryption-key-file"));
    }

    #[test]
    fn key_command_stdout_is_the_passphrase() {
        let p = KeySource::Command(format!("echo {SECRET}"))
            .resolve()
            .unwrap();
        assert_eq!(p.as_bytes(), SECRET.as_bytes());
        // One newline only; stderr is not part of the key.
        let p = KeySource::Command("printf 'a b\\n\\n'; echo noise >&2".into())
            .resolve()
            .unwrap();
        assert_eq!(p.as_bytes(), b"a b\n");
        let p = KeySource::Command("printf key".into()).resolve().unwrap();
        assert_eq!(p.as_bytes(), b"key");
    }

    #[test]
    fn failing_key_command_never_repeats_its_output() {
        let command = format!("echo {SECRET}; echo {SECRET}-err >&2; exit 3");
        let e = KeySource::Command(command.clone()).resolve().unwrap_err();
        let text = format!("{e} {e:?} {}", e.hint());
        assert!(matches!(e, KeySourceError::CommandFailed { .. }));
        assert!(text.contains("exit status 3"), "{text}");
        // The command itself is named (it is configuration, not the key) ...
        assert!(e.to_string().contains(&command));
        // ... but what it printed is not: strip the command out and look for the secret.
        let without_command = text.replace(&command, "");
        assert!(!without_command.contains(SECRET), "{without_command}");

        let e = KeySource::Command("no-such-command-pitr-test".into())
            .resolve()
            .unwrap_err();
        assert!(e.to_string().contains("command not found"), "{e}");
        let e = KeySource::Command("kill -9 $$".into())
            .resolve()
            .unwrap_err();
        assert!(e.to_string().contains("signal 9"), "{e}");
    }

    #[test]
    fn empty_key_command_output_is_refused() {
        for command in ["true", "echo"] {
            let e = KeySource::Command(command.into()).resolve().unwrap_err();
            assert!(matches!(e, KeySourceError::EmptyOutput { .. }), "{command}");
        }
    }

    #[test]
    fn passphrase_never_prints() {
        let p = KeySource::Command(format!("echo {SECRET}"))
            .resolve()
            .unwrap();
        assert_eq!(format!("{p:?}"), "Passphrase(<redacted>)");
        assert_eq!(p.to_string(), "<redacted>");
    }
}

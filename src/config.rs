//! Settings shared by every command: flags > `PITR_*` environment > TOML file > defaults.
//!
//! Flags and environment variables are resolved by clap (each flag names its variable); this
//! module reads the file, merges, and validates everything up front, reporting every problem at
//! once rather than the first one.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::archive::prefetch;
use crate::codec::Codec;
use crate::error::{Classify, Code};
use crate::key_source::KeySource;
use crate::ops::Schedule;
use crate::repo::WriteOptions;
use crate::storage::{BackendOptions, Location};

/// The configuration file, as written by the user. Unknown keys are errors: a typo must not
/// silently fall back to a default.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub repo: Option<String>,
    pub compression: Option<String>,
    pub compression_level: Option<i32>,
    /// e.g. "60s", "5m".
    pub storage_retry_timeout: Option<String>,
    pub log_level: Option<String>,
    pub log_format: Option<String>,
    /// archive-get: segments to prefetch ahead of replay; 0 disables.
    pub prefetch: Option<u32>,
    /// `[s3]`, `[gcs]`, `[azure]`: the backend's keys.
    #[serde(flatten)]
    pub storage: crate::storage::BackendOptions,
    pub retention: Option<RetentionFile>,
    /// stream: when to take a full backup (5-field cron in UTC, @daily, "every 6h").
    pub backup_schedule: Option<String>,
    /// stream: when to take an incremental backup (not supported yet: each slot fails).
    pub backup_incremental_schedule: Option<String>,
    /// stream: when to verify the repository.
    pub verify_schedule: Option<String>,
    /// stream: when to run `pitr drill` (restore to latest, start, check, measure RTO).
    pub drill_schedule: Option<String>,
    /// stream: POST a JSON event here on job failures and recoveries, RPO and stream changes.
    pub notify_url: Option<String>,
    /// stream: run this shell command with the JSON event on stdin.
    pub notify_command: Option<String>,
    /// stream: notify when the newest recoverable transaction is older than this, e.g. "15m".
    pub rpo_alert: Option<String>,
    pub encryption: Option<EncryptionFile>,
    /// `[[repository]]` tables: several repositories (docs/repositories.md). Exclusive with
    /// `repo`, which names one.
    #[serde(default)]
    pub repository: Vec<RepositoryFile>,
}

/// One `[[repository]]` table. archive-push writes every one, archive-get and restore read the
/// first that answers and has what they need, other commands use the first (docs/repositories.md).
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RepositoryFile {
    /// How commands and messages name it (`backup --to NAME`, `copy --from A --to B`).
    pub name: String,
    /// Same forms as `--repo`.
    pub url: Option<String>,
    /// A best-effort secondary: archive-push warns instead of failing when it cannot write it.
    #[serde(default)]
    pub optional: bool,
    /// This repository's key source, instead of the top-level `[encryption]`.
    pub encryption: Option<EncryptionFile>,
    /// `[repository.s3]`, `[repository.gcs]`, `[repository.azure]`: this repository's backend
    /// keys, instead of the top-level tables (two buckets with different credentials).
    pub s3: Option<crate::storage::S3Settings>,
    pub gcs: Option<crate::storage::GcsSettings>,
    pub azure: Option<crate::storage::AzureSettings>,
    /// `[repository.retention]`: this repository's policy, instead of the top-level
    /// `[retention]` (a local repository kept for days, an offsite one for months).
    pub retention: Option<RetentionFile>,
}

impl RepositoryFile {
    /// This repository's backend tables, each falling back to the top-level one.
    fn backend(&self, top: &BackendOptions) -> BackendOptions {
        BackendOptions {
            s3: self.s3.clone().or_else(|| top.s3.clone()),
            gcs: self.gcs.clone().or_else(|| top.gcs.clone()),
            azure: self.azure.clone().or_else(|| top.azure.clone()),
        }
    }
}

/// `[encryption]`: where the passphrase of an encrypted repository comes from. One of the two;
/// the passphrase itself never goes in the configuration file.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EncryptionFile {
    /// A file whose content (one trailing newline stripped) is the passphrase.
    pub key_file: Option<PathBuf>,
    /// A command run with `sh -c` whose stdout (one trailing newline stripped) is the passphrase.
    pub key_command: Option<String>,
}

/// `[retention]`: the policy `pitr expire` applies when no flag says otherwise.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetentionFile {
    /// Keep the newest N full backups (with the incrementals built on them).
    pub full: Option<usize>,
    /// Keep what restoring to any moment of this long ago needs, e.g. "7d".
    pub window: Option<String>,
}

/// Values given on the command line or through the environment (already merged by clap).
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    pub config: Option<PathBuf>,
    pub repo: Option<String>,
    pub compression: Option<String>,
    pub compression_level: Option<i32>,
    pub storage_retry_timeout: Option<String>,
    pub prefetch: Option<u32>,
    pub retain_full: Option<usize>,
    pub retain_window: Option<String>,
    pub ops: OpsOverrides,
    pub encryption_key_file: Option<PathBuf>,
    pub encryption_key_command: Option<String>,
    /// `--repo-optional NAME`: repositories archive-push may miss (with a warning).
    pub repo_optional: Vec<String>,
    /// The repository a one-repository command uses instead of the first (`backup --to NAME`).
    pub primary: Option<String>,
}

/// `pitr stream`'s schedule and notification flags (also config file keys of the same names).
#[derive(Debug, Default, Clone)]
pub struct OpsOverrides {
    pub backup_schedule: Option<String>,
    pub backup_incremental_schedule: Option<String>,
    pub verify_schedule: Option<String>,
    pub drill_schedule: Option<String>,
    pub notify_url: Option<String>,
    pub notify_command: Option<String>,
    pub rpo_alert: Option<String>,
}

/// Validated schedules and notification settings.
#[derive(Debug, Default, Clone)]
pub struct OpsSettings {
    pub backup_schedule: Option<Schedule>,
    pub backup_incremental_schedule: Option<Schedule>,
    pub verify_schedule: Option<Schedule>,
    pub drill_schedule: Option<Schedule>,
    pub notify_url: Option<url::Url>,
    pub notify_command: Option<String>,
    pub rpo_alert: Option<Duration>,
}

/// One configured repository, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct RepositorySettings {
    /// `default` for a repository given by `--repo`, `PITR_REPO` or `repo`.
    pub name: String,
    pub location: Location,
    /// A failure to write it is a warning, not a failed archive-push.
    pub optional: bool,
    pub encryption_key: Option<KeySource>,
    /// What `pitr expire` keeps here.
    pub retention: Retention,
}

/// A retention policy, validated: flags over the repository's `[repository.retention]` over
/// the top-level `[retention]`. Both `None`: no policy.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Retention {
    /// Keep the newest N full backups (with their incrementals).
    pub full: Option<usize>,
    /// Keep what restoring to any moment of this long ago needs.
    pub window: Option<Duration>,
}

impl Retention {
    pub fn is_set(&self) -> bool {
        self.full.is_some() || self.window.is_some()
    }
}

/// The name of the one repository `--repo`, `PITR_REPO` or the `repo` key give.
pub const DEFAULT_REPOSITORY_NAME: &str = "default";

/// Validated settings.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The repository of one-repository commands: the first, or the one `primary` named.
    pub repo: Location,
    /// Every configured repository, in configuration order (at least one).
    pub repositories: Vec<RepositorySettings>,
    pub write: WriteOptions,
    pub storage_retry_timeout: Duration,
    pub config_file: Option<PathBuf>,
    /// archive-get: segments kept ahead of replay in the prefetch spool; 0 disables it.
    pub prefetch: u32,
    /// expire: keep the newest N full backups (with their incrementals).
    pub retain_full: Option<usize>,
    /// expire: keep what restoring to any moment of this long ago needs.
    pub retain_window: Option<Duration>,
    /// stream: schedules and notifications.
    pub ops: OpsSettings,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The file is not TOML at all.
    #[error("config file {path} is not valid TOML: {message} (line {line}, column {column})")]
    Syntax {
        path: PathBuf,
        message: String,
        line: usize,
        column: usize,
    },
    /// Valid TOML with an unknown key or a value of the wrong type.
    #[error("config file {path}: {message} (line {line}, column {column})")]
    Parse {
        path: PathBuf,
        message: String,
        line: usize,
        column: usize,
    },
    /// One line whatever the count: docs/exit-codes.md promises one `error:` line.
    #[error("{}", one_line(.problems))]
    Invalid { problems: Vec<String> },
}

impl Classify for ConfigError {
    fn code(&self) -> Code {
        match self {
            ConfigError::Read { .. }
            | ConfigError::Syntax { .. }
            | ConfigError::Parse { .. }
            | ConfigError::Invalid { .. } => Code::Input,
        }
    }

    fn hint(&self) -> Option<String> {
        match self {
            ConfigError::Syntax { line, column, .. } => Some(format!(
                "fix the TOML syntax at line {line}, column {column} (strings in quotes, table names in [brackets])"
            )),
            ConfigError::Parse { .. } => {
                Some("check the key names and value types against docs/configuration.md".into())
            }
            ConfigError::Read { .. } | ConfigError::Invalid { .. } => None,
        }
    }
}

fn one_line(problems: &[String]) -> String {
    match problems {
        [one] => one.clone(),
        many => {
            let numbered: Vec<String> = many
                .iter()
                .enumerate()
                .map(|(i, p)| format!("({}) {p}", i + 1))
                .collect();
            format!("{} invalid settings: {}", many.len(), numbered.join(" "))
        }
    }
}

/// The 1-based line and column of byte `offset` in `text`.
fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let before = text.get(..offset).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().unwrap_or("").chars().count() + 1;
    (line, column)
}

pub const DEFAULT_RETRY_TIMEOUT: Duration = Duration::from_secs(60);

pub fn read_file(path: &Path) -> Result<FileConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.into(),
        source,
    })?;
    // Syntax first, on its own: a typo in the syntax needs another fix than a typo in a key.
    let at = |e: &toml::de::Error| line_column(&text, e.span().map_or(0, |s| s.start));
    // toml words some messages over several lines; the `error:` line is one.
    let message = |e: &toml::de::Error| {
        let lines = e.message().lines().map(str::trim).filter(|l| !l.is_empty());
        lines.collect::<Vec<_>>().join("; ")
    };
    if let Err(e) = text.parse::<toml::Table>() {
        let (line, column) = at(&e);
        return Err(ConfigError::Syntax {
            path: path.into(),
            message: message(&e),
            line,
            column,
        });
    }
    toml::from_str(&text).map_err(|e| {
        let (line, column) = at(&e);
        ConfigError::Parse {
            path: path.into(),
            message: message(&e),
            line,
            column,
        }
    })
}

impl Settings {
    /// How this process writes repository `r`: the common settings with its own key source.
    pub fn write_for(&self, r: &RepositorySettings) -> WriteOptions {
        WriteOptions {
            encryption_key: r.encryption_key.clone(),
            ..self.write.clone()
        }
    }

    /// The repository named `name`.
    pub fn repository(&self, name: &str) -> Result<&RepositorySettings, ConfigError> {
        self.repositories
            .iter()
            .find(|r| r.name == name)
            .ok_or_else(|| ConfigError::Invalid {
                problems: vec![unknown_repository(name, &self.repositories)],
            })
    }

    pub fn resolve(o: &Overrides) -> Result<Settings, ConfigError> {
        let file = match &o.config {
            Some(p) => read_file(p)?,
            None => FileConfig::default(),
        };
        let mut problems = vec![];

        let repositories = resolve_repositories(o, &file, &mut problems);
        let primary = match &o.primary {
            None => repositories.first(),
            Some(name) => {
                let found = repositories.iter().find(|r| &r.name == name);
                if found.is_none() && !repositories.is_empty() {
                    problems.push(unknown_repository(name, &repositories));
                }
                found
            }
        }
        .cloned();

        let codec = match o
            .compression
            .as_deref()
            .or(file.compression.as_deref())
            .unwrap_or("lz4")
            .parse::<Codec>()
        {
            Ok(c) => c,
            Err(e) => {
                problems.push(e);
                Codec::Lz4
            }
        };
        let level = o.compression_level.or(file.compression_level).unwrap_or(3);
        if codec == Codec::Zstd && !(1..=19).contains(&level) {
            problems.push(format!(
                "compression level {level} is out of range: zstd takes 1 to 19"
            ));
        }

        let storage_retry_timeout = match o
            .storage_retry_timeout
            .as_deref()
            .or(file.storage_retry_timeout.as_deref())
        {
            None => DEFAULT_RETRY_TIMEOUT,
            Some(t) => humantime::parse_duration(t).unwrap_or_else(|e| {
                problems.push(format!(
                    "storage retry timeout {t:?}: {e} (use e.g. 30s or 5m)"
                ));
                DEFAULT_RETRY_TIMEOUT
            }),
        };

        let prefetch = o
            .prefetch
            .or(file.prefetch)
            .unwrap_or(prefetch::DEFAULT_AHEAD);
        if prefetch > prefetch::MAX_AHEAD {
            problems.push(format!(
                "prefetch {prefetch} is out of range: 0 (off) to {}",
                prefetch::MAX_AHEAD
            ));
        }

        let ops = resolve_ops(&o.ops, &file, &mut problems);

        if !problems.is_empty() {
            return Err(ConfigError::Invalid { problems });
        }
        let primary = primary.expect("checked above");
        Ok(Settings {
            repo: primary.location,
            repositories,
            write: WriteOptions {
                codec,
                level,
                encryption_key: primary.encryption_key,
            },
            storage_retry_timeout,
            config_file: o.config.clone(),
            prefetch,
            retain_full: primary.retention.full,
            retain_window: primary.retention.window,
            ops,
        })
    }
}

/// Schedules and notification settings: flags over the file's keys of the same names.
fn resolve_ops(o: &OpsOverrides, file: &FileConfig, problems: &mut Vec<String>) -> OpsSettings {
    let mut schedule = |flag: &Option<String>, key: &Option<String>, name: &str| {
        let spec = flag.as_ref().or(key.as_ref())?;
        spec.parse::<Schedule>()
            .map_err(|e| problems.push(format!("{name}: {e}")))
            .ok()
    };
    let backup_schedule = schedule(&o.backup_schedule, &file.backup_schedule, "backup schedule");
    let backup_incremental_schedule = schedule(
        &o.backup_incremental_schedule,
        &file.backup_incremental_schedule,
        "backup incremental schedule",
    );
    let verify_schedule = schedule(&o.verify_schedule, &file.verify_schedule, "verify schedule");
    let drill_schedule = schedule(&o.drill_schedule, &file.drill_schedule, "drill schedule");
    let notify_url = o
        .notify_url
        .as_ref()
        .or(file.notify_url.as_ref())
        .and_then(|u| {
            match url::Url::parse(u) {
                Ok(url) if matches!(url.scheme(), "http" | "https") => Some(url),
                Ok(_) => {
                    problems
                        .push("notify url: only http:// and https:// URLs can be notified".into());
                    None
                }
                // Not echoed: a webhook URL usually holds a token.
                Err(e) => {
                    problems.push(format!("notify url: not a valid URL ({e})"));
                    None
                }
            }
        });
    let rpo_alert = o
        .rpo_alert
        .as_ref()
        .or(file.rpo_alert.as_ref())
        .and_then(|d| {
            humantime::parse_duration(d)
                .map_err(|e| problems.push(format!("rpo alert {d:?}: {e} (use e.g. 15m or 1h)")))
                .ok()
        });
    OpsSettings {
        backup_schedule,
        backup_incremental_schedule,
        verify_schedule,
        drill_schedule,
        notify_url,
        notify_command: o.notify_command.clone().or(file.notify_command.clone()),
        rpo_alert,
    }
}

/// The repositories: `--repo` (or `PITR_REPO`) alone, else the file's `[[repository]]` tables,
/// else its `repo` key. Names must be unique; `--repo-optional` must name one of them.
fn resolve_repositories(
    o: &Overrides,
    file: &FileConfig,
    problems: &mut Vec<String>,
) -> Vec<RepositorySettings> {
    let single = |url: &str, problems: &mut Vec<String>| {
        let location = parse_location(url, &file.storage, problems);
        let encryption_key = key_source(o, file.encryption.as_ref(), None, problems);
        let retention = retention(o, file.retention.as_ref(), "", problems);
        let repo = location.map(|location| RepositorySettings {
            name: DEFAULT_REPOSITORY_NAME.into(),
            location,
            optional: false,
            encryption_key,
            retention,
        });
        repo.into_iter().collect::<Vec<_>>()
    };
    // One repository on the command line replaces the file's list, `--repo-optional` included.
    if let Some(url) = o.repo.as_deref() {
        return single(url, problems);
    }
    let repos = match (&file.repo, file.repository.is_empty()) {
        (None, true) => {
            problems.push(
                "no repository given: pass --repo DIR|s3://bucket/prefix, set PITR_REPO, or set `repo` (or [[repository]] tables) in the config file"
                    .to_string(),
            );
            return vec![];
        }
        (Some(url), true) => single(url, problems),
        (repo, false) => {
            if repo.is_some() {
                problems.push(
                    "the config file sets both `repo` and [[repository]] tables: keep one (a single [[repository]] table is the same as `repo`)"
                        .to_string(),
                );
            }
            repository_tables(o, file, problems)
        }
    };
    check_optional_names(o, &repos, problems);
    repos
}

fn parse_location(
    url: &str,
    backend: &BackendOptions,
    problems: &mut Vec<String>,
) -> Option<Location> {
    match Location::parse(url) {
        Ok(l) => Some(l.with_options(backend)),
        Err(e) => {
            problems.push(e.to_string());
            None
        }
    }
}

/// The `[[repository]]` tables, checked, with `--repo-optional` applied.
fn repository_tables(
    o: &Overrides,
    file: &FileConfig,
    problems: &mut Vec<String>,
) -> Vec<RepositorySettings> {
    let mut repos: Vec<RepositorySettings> = vec![];
    // Checked even when every table has its own: a mistake there must not go unreported.
    let top_retention = retention(o, file.retention.as_ref(), "", problems);
    for (i, r) in file.repository.iter().enumerate() {
        let what = format!("[[repository]] number {} ({:?})", i + 1, r.name);
        if r.name.trim().is_empty() || r.name.contains(char::is_whitespace) {
            problems.push(format!(
                "{what}: `name` must be one word, like \"primary\" or \"offsite\""
            ));
        } else if repos.iter().any(|p| p.name == r.name) {
            problems.push(format!("{what}: the name {:?} is used twice", r.name));
        }
        let Some(url) = r.url.as_deref() else {
            problems.push(format!("{what}: `url` is missing"));
            continue;
        };
        let location = parse_location(url, &r.backend(&file.storage), problems);
        let own = Some((r.name.as_str(), r.encryption.as_ref()));
        let encryption_key = key_source(o, file.encryption.as_ref(), own, problems);
        let retention = match &r.retention {
            Some(own) => retention(
                o,
                Some(own),
                &format!("{what} [repository.retention]: "),
                problems,
            ),
            None => top_retention,
        };
        if let Some(location) = location {
            repos.push(RepositorySettings {
                name: r.name.clone(),
                location,
                optional: r.optional || o.repo_optional.contains(&r.name),
                encryption_key,
                retention,
            });
        }
    }
    if !repos.is_empty() && repos.iter().all(|r| r.optional) {
        problems.push(
            "every repository is optional: archive-push would succeed having stored nothing; make at least one not optional"
                .to_string(),
        );
    }
    repos
}

/// The retention policy from `table`, each flag (or `PITR_RETAIN_*`) winning over its key.
/// `what` prefixes problems found in the table.
fn retention(
    o: &Overrides,
    table: Option<&RetentionFile>,
    what: &str,
    problems: &mut Vec<String>,
) -> Retention {
    let table = table.cloned().unwrap_or_default();
    // A problem in a flag is the same for every repository: reported once, without a prefix.
    let mut report = |from_flag: bool, problem: String| {
        let problem = match from_flag {
            true => problem,
            false => format!("{what}{problem}"),
        };
        if !problems.contains(&problem) {
            problems.push(problem);
        }
    };
    let full = o.retain_full.or(table.full);
    if full == Some(0) {
        report(
            o.retain_full.is_some(),
            "retain full 0 would remove every backup: the newest is always kept, use 1 or more"
                .to_string(),
        );
    }
    let window_spec = o.retain_window.as_deref().or(table.window.as_deref());
    let window = window_spec.and_then(|w| {
        humantime::parse_duration(w)
            .map_err(|e| {
                let problem = format!("retention window {w:?}: {e} (use e.g. 7d or 36h)");
                report(o.retain_window.is_some(), problem)
            })
            .ok()
    });
    Retention { full, window }
}

fn check_optional_names(o: &Overrides, repos: &[RepositorySettings], problems: &mut Vec<String>) {
    for name in &o.repo_optional {
        if !repos.iter().any(|r| &r.name == name) {
            problems.push(format!(
                "--repo-optional: {}",
                unknown_repository(name, repos)
            ));
        }
    }
}

fn unknown_repository(name: &str, repos: &[RepositorySettings]) -> String {
    let names: Vec<&str> = repos.iter().map(|r| r.name.as_str()).collect();
    format!(
        "no repository is named {name:?}: the configured ones are {}",
        names.join(", ")
    )
}

/// The encryption key source: a flag or variable wins over the file, as a pair (a key command
/// given on the command line replaces a key file from the file, it does not conflict with it);
/// in the file, a repository's own `[repository.encryption]` wins over `[encryption]`.
/// Both kinds at the same level are ambiguous and refused.
fn key_source(
    o: &Overrides,
    file: Option<&EncryptionFile>,
    repository: Option<(&str, Option<&EncryptionFile>)>,
    problems: &mut Vec<String>,
) -> Option<KeySource> {
    let own = repository.and_then(|(_, e)| e);
    let own_what = format!(
        "[repository.encryption] key_file and key_command of repository {:?}",
        repository.map(|(n, _)| n).unwrap_or_default()
    );
    let levels = [
        (
            o.encryption_key_file.clone(),
            o.encryption_key_command.clone(),
            "--encryption-key-file (PITR_ENCRYPTION_KEY_FILE) and --encryption-key-command (PITR_ENCRYPTION_KEY_COMMAND)",
        ),
        (
            own.and_then(|f| f.key_file.clone()),
            own.and_then(|f| f.key_command.clone()),
            own_what.as_str(),
        ),
        (
            file.and_then(|f| f.key_file.clone()),
            file.and_then(|f| f.key_command.clone()),
            "[encryption] key_file and key_command in the config file",
        ),
    ];
    for (key_file, key_command, what) in levels {
        match (key_file, key_command) {
            (Some(_), Some(_)) => {
                problems.push(format!("{what} are both set: give one key source"));
                return None;
            }
            (Some(path), None) => return Some(KeySource::File(path)),
            (None, Some(command)) => return Some(KeySource::Command(command)),
            (None, None) => {}
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(text: &str) -> (tempfile::TempDir, PathBuf) {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("pitr.toml");
        std::fs::write(&p, text).unwrap();
        (d, p)
    }

    #[test]
    fn flags_win_over_the_file() {
        let (_d, p) = write("repo = \"/from/file\"\ncompression = \"zstd\"\n");
        let s = Settings::resolve(&Overrides {
            config: Some(p.clone()),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(s.repo, Location::Local("/from/file".into()));
        assert_eq!(s.write.codec, Codec::Zstd);
        let s = Settings::resolve(&Overrides {
            config: Some(p),
            repo: Some("/from/flag".into()),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(s.repo, Location::Local("/from/flag".into()));
    }

    #[test]
    fn unknown_keys_are_refused() {
        let (_d, p) = write("repo = \"/x\"\ncompresion = \"zstd\"\n");
        let e = Settings::resolve(&Overrides {
            config: Some(p),
            ..Default::default()
        })
        .unwrap_err();
        assert!(e.to_string().contains("compresion"), "{e}");
    }

    #[test]
    fn backend_tables_reach_the_location_and_refuse_typos() {
        let (_d, p) = write(
            "repo = \"gs://b/p\"\n[gcs]\nendpoint = \"http://127.0.0.1:1\"\n[azure]\naccount = \"a\"\n",
        );
        let s = Settings::resolve(&Overrides {
            config: Some(p),
            ..Default::default()
        })
        .unwrap();
        assert!(
            matches!(&s.repo, crate::storage::Location::Gcs { settings, .. }
                if settings.endpoint.as_deref() == Some("http://127.0.0.1:1")),
            "{:?}",
            s.repo
        );
        for bad in ["[gcs]\nendpont = \"x\"\n", "[azur]\naccount = \"a\"\n"] {
            let (_d, p) = write(&format!("repo = \"/x\"\n{bad}"));
            assert!(read_file(&p).is_err(), "{bad}");
        }
    }

    #[test]
    fn each_repository_may_have_its_own_retention() {
        let (_d, p) = write(
            "[retention]\nfull = 3\n\
             [[repository]]\nname = \"local\"\nurl = \"/l\"\n\
             [repository.retention]\nwindow = \"2d\"\n\
             [[repository]]\nname = \"offsite\"\nurl = \"/o\"\n",
        );
        let file_only = Overrides {
            config: Some(p.clone()),
            ..Default::default()
        };
        let s = Settings::resolve(&file_only).unwrap();
        // A repository's own table replaces the top-level one as a whole.
        let two_days = Some(Duration::from_secs(2 * 86400));
        assert_eq!(
            s.repositories[0].retention,
            Retention {
                full: None,
                window: two_days
            }
        );
        assert_eq!(s.repositories[1].retention.full, Some(3));
        assert_eq!(s.repositories[1].retention.window, None);
        // The repository of one-repository commands (the first) is the scheduled expire's.
        assert_eq!((s.retain_full, s.retain_window), (None, two_days));
        // A flag wins over every table, field by field.
        let s = Settings::resolve(&Overrides {
            retain_full: Some(1),
            ..file_only
        })
        .unwrap();
        assert_eq!(s.repositories[0].retention.full, Some(1));
        assert_eq!(s.repositories[0].retention.window, two_days);
        assert_eq!(s.repositories[1].retention.full, Some(1));
        // A bad value is reported with the repository it is in.
        let (_d, p) = write(
            "[[repository]]\nname = \"local\"\nurl = \"/l\"\n\
             [repository.retention]\nfull = 0\nwindow = \"soon\"\n",
        );
        let e = Settings::resolve(&Overrides {
            config: Some(p),
            ..Default::default()
        })
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("(\"local\") [repository.retention]: retain full 0"),
            "{e}"
        );
        assert!(e.contains("retention window \"soon\""), "{e}");
        // The top-level table is checked even when no repository uses it; a flag's problem is
        // reported once, not once per repository.
        let (_d, p) = write(
            "[retention]\nwindow = \"a while\"\n\
             [[repository]]\nname = \"a\"\nurl = \"/a\"\n[repository.retention]\nfull = 2\n\
             [[repository]]\nname = \"b\"\nurl = \"/b\"\n[repository.retention]\nfull = 3\n",
        );
        let e = Settings::resolve(&Overrides {
            config: Some(p),
            retain_full: Some(0),
            ..Default::default()
        })
        .unwrap_err()
        .to_string();
        assert!(e.contains("retention window \"a while\""), "{e}");
        assert_eq!(e.matches("retain full 0").count(), 1, "{e}");
    }

    #[test]
    fn retention_comes_from_the_file_unless_a_flag_says_otherwise() {
        let (_d, p) = write("repo = \"/x\"\n[retention]\nfull = 3\nwindow = \"7d\"\n");
        let file_only = Overrides {
            config: Some(p.clone()),
            ..Default::default()
        };
        let s = Settings::resolve(&file_only).unwrap();
        assert_eq!(s.retain_full, Some(3));
        assert_eq!(s.retain_window, Some(Duration::from_secs(7 * 86400)));
        let s = Settings::resolve(&Overrides {
            retain_full: Some(1),
            retain_window: Some("36h".into()),
            ..file_only.clone()
        })
        .unwrap();
        assert_eq!(s.retain_full, Some(1));
        assert_eq!(s.retain_window, Some(Duration::from_secs(36 * 3600)));
        let e = Settings::resolve(&Overrides {
            retain_full: Some(0),
            retain_window: Some("a week".into()),
            ..file_only
        })
        .unwrap_err()
        .to_string();
        assert!(e.contains("retain full 0"), "{e}");
        assert!(e.contains("retention window \"a week\""), "{e}");
        let (_d, p) = write("repo = \"/x\"\n[retention]\nkeep = 3\n");
        let e = Settings::resolve(&Overrides {
            config: Some(p),
            ..Default::default()
        })
        .unwrap_err()
        .to_string();
        assert!(e.contains("keep"), "{e}");
    }

    #[test]
    fn prefetch_defaults_to_eight_and_the_flag_wins() {
        let (_d, p) = write("repo = \"/x\"\nprefetch = 3\n");
        let s = Settings::resolve(&Overrides {
            config: Some(p.clone()),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(s.prefetch, 3);
        let s = Settings::resolve(&Overrides {
            config: Some(p),
            prefetch: Some(0),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(s.prefetch, 0);
        let s = Settings::resolve(&Overrides {
            repo: Some("/x".into()),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(s.prefetch, 8);
        let e = Settings::resolve(&Overrides {
            repo: Some("/x".into()),
            prefetch: Some(65),
            ..Default::default()
        })
        .unwrap_err();
        assert!(e.to_string().contains("prefetch 65"), "{e}");
    }

    /// docs/exit-codes.md promises one `error:` line and at most one `hint:` line.
    #[test]
    fn errors_are_one_line() {
        let one_line = |e: &ConfigError| {
            let text = e.to_string();
            assert!(!text.contains('\n'), "{text:?}");
            assert!(!e.hint().unwrap_or_default().contains('\n'), "{e:?}");
            text
        };
        let (_d, p) = write("repo = \"/x\"\ncompression = zstd\n");
        let e = read_file(&p).unwrap_err();
        let text = one_line(&e);
        assert!(matches!(e, ConfigError::Syntax { line: 2, .. }), "{e:?}");
        assert!(text.contains("not valid TOML"), "{text}");
        assert!(e.hint().unwrap().contains("line 2, column 15"), "{e:?}");
        let (_d, p) = write("[s3\nregion = 1\n");
        one_line(&read_file(&p).unwrap_err());
        let (_d, p) = write("repo = \"/x\"\nprefetch = \"many\"\n");
        let e = read_file(&p).unwrap_err();
        one_line(&e);
        assert!(e.hint().unwrap().contains("docs/configuration.md"), "{e:?}");
        let e = Settings::resolve(&Overrides {
            repo: Some("ftp://host/x".into()),
            ..Default::default()
        })
        .unwrap_err();
        let text = one_line(&e);
        assert!(text.starts_with("invalid repository URL"), "{text}");
        let e = Settings::resolve(&Overrides {
            repo: Some("ftp://host/x".into()),
            compression: Some("gzip".into()),
            ..Default::default()
        })
        .unwrap_err();
        let text = one_line(&e);
        assert!(text.contains("2 invalid settings: (1)"), "{text}");
    }

    #[test]
    fn schedules_and_notifications_come_from_the_file_unless_a_flag_says_otherwise() {
        let (_d, p) = write(
            "repo = \"/x\"\nbackup_schedule = \"@daily\"\nverify_schedule = \"0 3 * * 0\"\n\
             notify_url = \"https://hooks.example/abc\"\nrpo_alert = \"15m\"\n",
        );
        let file_only = Overrides {
            config: Some(p),
            ..Default::default()
        };
        let s = Settings::resolve(&file_only).unwrap();
        assert_eq!(s.ops.backup_schedule.unwrap().to_string(), "@daily");
        assert_eq!(s.ops.verify_schedule.unwrap().to_string(), "0 3 * * 0");
        assert_eq!(s.ops.rpo_alert, Some(Duration::from_secs(900)));
        assert!(s.ops.notify_url.is_some());
        let mut o = file_only.clone();
        o.ops.backup_schedule = Some("every 6h".into());
        o.ops.rpo_alert = Some("soon".into());
        o.ops.verify_schedule = Some("* * *".into());
        let e = Settings::resolve(&o).unwrap_err().to_string();
        assert!(
            e.contains("rpo alert") && e.contains("verify schedule"),
            "{e}"
        );
        o.ops.rpo_alert = None;
        o.ops.verify_schedule = None;
        let s = Settings::resolve(&o).unwrap();
        assert_eq!(s.ops.backup_schedule.unwrap().to_string(), "every 6h");
    }

    #[test]
    fn the_key_source_comes_from_a_flag_then_the_file() {
        let (_d, p) = write("repo = \"/x\"\n[encryption]\nkey_file = \"/etc/pitr/key\"\n");
        let file_only = Overrides {
            config: Some(p),
            ..Default::default()
        };
        let s = Settings::resolve(&file_only).unwrap();
        assert_eq!(
            s.write.encryption_key,
            Some(KeySource::File("/etc/pitr/key".into()))
        );
        let s = Settings::resolve(&Overrides {
            encryption_key_command: Some("vault kv get -field=k x".into()),
            ..file_only.clone()
        })
        .unwrap();
        assert_eq!(
            s.write.encryption_key,
            Some(KeySource::Command("vault kv get -field=k x".into()))
        );
        let e = Settings::resolve(&Overrides {
            encryption_key_command: Some("cmd".into()),
            encryption_key_file: Some("/k".into()),
            ..file_only
        })
        .unwrap_err()
        .to_string();
        assert!(e.contains("both set"), "{e}");
        let s = Settings::resolve(&Overrides {
            repo: Some("/x".into()),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(s.write.encryption_key, None);
        let (_d, p) = write("repo = \"/x\"\n[encryption]\nkey = \"secret\"\n");
        let e = Settings::resolve(&Overrides {
            config: Some(p),
            ..Default::default()
        })
        .unwrap_err()
        .to_string();
        assert!(e.contains("unknown field `key`"), "{e}");
    }

    #[test]
    fn several_repositories_come_from_tables_and_repo_overrides_them() {
        let (_d, p) = write(
            "[[repository]]\nname = \"local\"\nurl = \"/a\"\n\
             [[repository]]\nname = \"offsite\"\nurl = \"s3://b/p\"\noptional = true\n\
             [repository.encryption]\nkey_file = \"/k2\"\n",
        );
        let file_only = Overrides {
            config: Some(p),
            ..Default::default()
        };
        let s = Settings::resolve(&file_only).unwrap();
        let names: Vec<_> = s.repositories.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["local", "offsite"]);
        assert_eq!(s.repo, Location::Local("/a".into()));
        assert!(!s.repositories[0].optional && s.repositories[1].optional);
        assert_eq!(s.write.encryption_key, None);
        let offsite = s.repository("offsite").unwrap();
        assert_eq!(
            s.write_for(offsite).encryption_key,
            Some(KeySource::File("/k2".into()))
        );
        let s = Settings::resolve(&Overrides {
            primary: Some("offsite".into()),
            ..file_only.clone()
        })
        .unwrap();
        assert!(matches!(s.repo, Location::S3 { .. }), "{:?}", s.repo);
        let s = Settings::resolve(&Overrides {
            repo: Some("/flag".into()),
            ..file_only.clone()
        })
        .unwrap();
        assert_eq!(s.repositories.len(), 1);
        assert_eq!(s.repositories[0].name, DEFAULT_REPOSITORY_NAME);
        assert_eq!(s.repo, Location::Local("/flag".into()));
        let e = Settings::resolve(&Overrides {
            repo_optional: vec!["local".into()],
            ..file_only.clone()
        })
        .unwrap_err()
        .to_string();
        assert!(e.contains("every repository is optional"), "{e}");
        let e = Settings::resolve(&Overrides {
            primary: Some("elsewhere".into()),
            ..file_only
        })
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("\"elsewhere\"") && e.contains("local, offsite"),
            "{e}"
        );
    }

    #[test]
    fn a_repository_table_has_its_own_backend_keys() {
        let (_d, p) = write(
            "[s3]\nendpoint = \"http://top\"\n\
             [[repository]]\nname = \"a\"\nurl = \"s3://a/p\"\n\
             [[repository]]\nname = \"b\"\nurl = \"s3://b/p\"\n\
             [repository.s3]\nendpoint = \"http://own\"\n",
        );
        let s = Settings::resolve(&Overrides {
            config: Some(p),
            ..Default::default()
        })
        .unwrap();
        let endpoint = |i: usize| match &s.repositories[i].location {
            Location::S3 { settings, .. } => settings.endpoint.clone(),
            other => panic!("{other:?}"),
        };
        assert_eq!(endpoint(0).as_deref(), Some("http://top"));
        assert_eq!(endpoint(1).as_deref(), Some("http://own"));
    }

    #[test]
    fn repository_tables_are_checked() {
        let (_d, p) = write(
            "repo = \"/x\"\n[[repository]]\nname = \"a\"\nurl = \"/a\"\n\
             [[repository]]\nname = \"a\"\nurl = \"/b\"\n[[repository]]\nname = \"c\"\n",
        );
        let e = Settings::resolve(&Overrides {
            config: Some(p),
            ..Default::default()
        })
        .unwrap_err()
        .to_string();
        assert!(e.contains("both `repo` and [[repository]]"), "{e}");
        assert!(e.contains("\"a\" is used twice"), "{e}");
        assert!(e.contains("`url` is missing"), "{e}");
        let (_d, p) = write("[[repository]]\nurl = \"/a\"\n");
        let e = read_file(&p).unwrap_err().to_string();
        assert!(e.contains("name"), "{e}");
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let o = Overrides {
            compression: Some("gzip".into()),
            storage_retry_timeout: Some("soon".into()),
            ..Default::default()
        };
        let e = Settings::resolve(&o).unwrap_err().to_string();
        assert!(
            e.contains("no repository") && e.contains("gzip") && e.contains("soon"),
            "{e}"
        );
    }
}

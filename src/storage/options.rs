//! Per-backend configuration keys: the `[s3]`, `[gcs]` and `[azure]` tables of the config file
//! (and, later, of each `[[repository]]`). Anything unset falls back to the provider's standard
//! environment variables and credential chain; a key that is set wins over the environment,
//! because it names this repository while the environment is shared by every process.
//!
//! Secrets (keys, SAS tokens) never reach a log line: each table's `Debug` redacts them.

use std::fmt;
use std::path::PathBuf;

use super::S3Settings;

/// The backend tables of one repository. Only the table of the repository's own scheme is used;
/// the others are ignored, so one file can carry the settings of several backends.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendOptions {
    pub s3: Option<S3Settings>,
    pub gcs: Option<GcsSettings>,
    pub azure: Option<AzureSettings>,
}

/// `[gcs]`: Google Cloud Storage. Without keys, `GOOGLE_SERVICE_ACCOUNT`,
/// `GOOGLE_SERVICE_ACCOUNT_KEY`, `GOOGLE_APPLICATION_CREDENTIALS` and the instance metadata
/// server apply, in object_store's order.
#[derive(Clone, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GcsSettings {
    /// A service account JSON key file.
    pub service_account_file: Option<PathBuf>,
    /// The service account JSON key itself (a secret): prefer `service_account_file`.
    pub service_account_key: Option<String>,
    /// Base URL of the JSON API, for an emulator: `http://127.0.0.1:4443`.
    pub endpoint: Option<String>,
}

/// `[azure]`: Azure Blob Storage. Without keys, `AZURE_STORAGE_ACCOUNT_NAME`,
/// `AZURE_STORAGE_ACCOUNT_KEY`, `AZURE_STORAGE_SAS_KEY` and managed identities apply.
#[derive(Clone, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AzureSettings {
    pub account: Option<String>,
    /// The storage account key (a secret).
    pub access_key: Option<String>,
    /// A SAS token, `sv=...&sig=...` with or without a leading `?` (a secret).
    pub sas_token: Option<String>,
    /// Account URL, e.g. `https://ACCOUNT.blob.core.windows.net`; with `use_emulator` the
    /// emulator's address, e.g. `http://127.0.0.1:10000`.
    pub endpoint: Option<String>,
    /// Azurite: its well-known account and key unless given, path-style URLs, http allowed.
    pub use_emulator: Option<bool>,
}

/// Azurite's documented development account and key (public, not a secret).
pub const AZURITE_ACCOUNT: &str = "devstoreaccount1";
pub const AZURITE_KEY: &str =
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";
const AZURITE_DEFAULT_URL: &str = "http://127.0.0.1:10000";

impl AzureSettings {
    /// `(account, endpoint)` to open: with `use_emulator`, the account goes into the path
    /// (`http://host:port/ACCOUNT`), which is the URL Azurite serves and signs.
    pub fn resolved_endpoint(&self) -> (Option<String>, Option<String>) {
        if self.use_emulator != Some(true) {
            return (self.account.clone(), self.endpoint.clone());
        }
        let account = self.account.as_deref().unwrap_or(AZURITE_ACCOUNT);
        let base = self.endpoint.as_deref().unwrap_or(AZURITE_DEFAULT_URL);
        (
            Some(account.to_string()),
            Some(format!("{}/{account}", base.trim_end_matches('/'))),
        )
    }

    /// The SAS token as query pairs, without a leading `?`.
    pub fn sas_pairs(&self) -> Option<Vec<(String, String)>> {
        let token = self.sas_token.as_deref()?.trim_start_matches('?');
        Some(
            url::form_urlencoded::parse(token.as_bytes())
                .into_owned()
                .collect(),
        )
    }
}

fn redacted(v: &Option<String>) -> Option<&'static str> {
    v.as_ref().map(|_| "<redacted>")
}

// Hand-written so that a secret can never reach a log line through `{:?}`.
impl fmt::Debug for GcsSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GcsSettings")
            .field("service_account_file", &self.service_account_file)
            .field("service_account_key", &redacted(&self.service_account_key))
            .field("endpoint", &self.endpoint)
            .finish()
    }
}

impl fmt::Debug for AzureSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AzureSettings")
            .field("account", &self.account)
            .field("access_key", &redacted(&self.access_key))
            .field("sas_token", &redacted(&self.sas_token))
            .field("endpoint", &self.endpoint)
            .field("use_emulator", &self.use_emulator)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_table_and_refuses_unknown_keys() {
        let o: BackendOptions = toml::from_str(
            r#"
            [s3]
            endpoint = "http://127.0.0.1:9000"
            [gcs]
            service_account_file = "/etc/pitr/gcs.json"
            endpoint = "http://127.0.0.1:4443"
            [azure]
            account = "acct"
            sas_token = "?sv=1&sig=abc%2B"
            "#,
        )
        .unwrap();
        assert_eq!(
            o.gcs.unwrap().service_account_file,
            Some("/etc/pitr/gcs.json".into())
        );
        let az = o.azure.unwrap();
        assert_eq!(
            az.sas_pairs().unwrap(),
            [("sv".into(), "1".into()), ("sig".into(), "abc+".into())]
        );
        assert!(toml::from_str::<BackendOptions>("[gcs]\nkey = 1\n").is_err());
        assert!(toml::from_str::<BackendOptions>("[azure]\naccount_key = \"x\"\n").is_err());
    }

    #[test]
    fn the_emulator_puts_the_account_in_the_path() {
        let az = AzureSettings {
            use_emulator: Some(true),
            endpoint: Some("http://127.0.0.1:12345/".into()),
            ..Default::default()
        };
        assert_eq!(
            az.resolved_endpoint(),
            (
                Some(AZURITE_ACCOUNT.into()),
                Some("http://127.0.0.1:12345/devstoreaccount1".into())
            )
        );
    }

    #[test]
    fn secrets_do_not_leak_through_debug() {
        let g = GcsSettings {
            service_account_key: Some("hunter2".into()),
            ..Default::default()
        };
        let a = AzureSettings {
            access_key: Some("hunter3".into()),
            sas_token: Some("sig=hunter4".into()),
            ..Default::default()
        };
        let shown = format!("{g:?} {a:?}");
        assert!(!shown.contains("hunter"), "{shown}");
    }
}

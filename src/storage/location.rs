//! Where a repository lives, parsed from the `--repo` URL.

use std::fmt;
use std::path::{Path, PathBuf};

use super::options::{AzureSettings, BackendOptions, GcsSettings};
use crate::error::{Classify, Code};

/// S3 settings that may come from the configuration file; anything unset falls back to the
/// standard AWS environment variables and credential chain.
#[derive(Clone, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct S3Settings {
    pub endpoint: Option<String>,
    pub region: Option<String>,
    pub access_key_id: Option<String>,
    pub secret_access_key: Option<String>,
    /// A file whose content (one trailing newline stripped) is the secret access key.
    pub secret_access_key_file: Option<PathBuf>,
    /// Allow an `http://` endpoint; implied when `endpoint` starts with `http://`.
    pub allow_http: Option<bool>,
    /// Address buckets as `bucket.endpoint` instead of `endpoint/bucket`.
    pub virtual_hosted_style: Option<bool>,
}

// Hand-written so that a secret can never reach a log line through `{:?}`.
impl fmt::Debug for S3Settings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("S3Settings")
            .field("endpoint", &self.endpoint)
            .field("region", &self.region)
            .field("access_key_id", &self.access_key_id)
            .field(
                "secret_access_key",
                &self.secret_access_key.as_ref().map(|_| "<redacted>"),
            )
            .field("secret_access_key_file", &self.secret_access_key_file)
            .field("allow_http", &self.allow_http)
            .field("virtual_hosted_style", &self.virtual_hosted_style)
            .finish()
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Location {
    /// A directory on a local or mounted file system.
    Local(PathBuf),
    S3 {
        bucket: String,
        prefix: String,
        settings: S3Settings,
    },
    Gcs {
        bucket: String,
        prefix: String,
        settings: GcsSettings,
    },
    Azure {
        container: String,
        prefix: String,
        settings: AzureSettings,
    },
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid repository URL {url:?}: {reason}")]
pub struct LocationError {
    pub url: String,
    pub reason: String,
}

impl Classify for LocationError {
    fn code(&self) -> Code {
        Code::Input
    }
}

impl Location {
    /// Parses `/abs/path`, `./relative/path`, `file:///abs/path`, `s3://bucket/prefix`,
    /// `gs://bucket/prefix` or `az://container/prefix`. Relative paths are made absolute against
    /// the current directory, because PostgreSQL runs hooks from the data directory.
    pub fn parse(url: &str) -> Result<Location, LocationError> {
        let err = |reason: &str| LocationError {
            url: url.to_string(),
            reason: reason.to_string(),
        };
        if url.trim().is_empty() {
            return Err(err(
                "it is empty; give a directory like /var/lib/pitr or a URL like s3://bucket/prefix",
            ));
        }
        if let Some((scheme, rest)) = url.split_once("://") {
            return match scheme.to_ascii_lowercase().as_str() {
                "file" => {
                    if !rest.starts_with('/') {
                        return Err(err("file:// URLs need an absolute path: file:///var/lib/pitr"));
                    }
                    Ok(Location::Local(PathBuf::from(rest)))
                }
                "s3" | "gs" | "az" => {
                    let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
                    if bucket.is_empty() {
                        return Err(err("the bucket name is missing: s3://bucket/prefix"));
                    }
                    if bucket.contains(['?', '#', ' ']) || prefix.contains(['?', '#']) {
                        return Err(err("query strings and fragments are not supported; set options in the config file or environment"));
                    }
                    let bucket = bucket.to_string();
                    let prefix = prefix.trim_matches('/').to_string();
                    Ok(match scheme {
                        "s3" => Location::S3 { bucket, prefix, settings: S3Settings::default() },
                        "gs" => Location::Gcs { bucket, prefix, settings: GcsSettings::default() },
                        _ => Location::Azure { container: bucket, prefix, settings: AzureSettings::default() },
                    })
                }
                other => Err(err(&format!(
                    "unsupported scheme {other:?}; use a directory path, file://, s3://, gs:// or az://"
                ))),
            };
        }
        if url.contains(':') && !url.starts_with(['/', '.']) {
            return Err(err(
                "looks like a URL without '://'; use s3://bucket/prefix or a directory path",
            ));
        }
        let path = Path::new(url);
        let abs = std::path::absolute(path)
            .map_err(|e| err(&format!("cannot make the path absolute: {e}")))?;
        Ok(Location::Local(abs))
    }

    pub fn with_s3_settings(self, s: S3Settings) -> Location {
        match self {
            Location::S3 { bucket, prefix, .. } => Location::S3 {
                bucket,
                prefix,
                settings: s,
            },
            other => other,
        }
    }

    /// Carries the backend table of this location's scheme from the configuration (the other
    /// tables do not apply to it).
    pub fn with_options(self, o: &BackendOptions) -> Location {
        match self {
            Location::S3 { .. } => self.with_s3_settings(o.s3.clone().unwrap_or_default()),
            Location::Gcs { bucket, prefix, .. } => Location::Gcs {
                bucket,
                prefix,
                settings: o.gcs.clone().unwrap_or_default(),
            },
            Location::Azure {
                container, prefix, ..
            } => Location::Azure {
                container,
                prefix,
                settings: o.azure.clone().unwrap_or_default(),
            },
            Location::Local(_) => self,
        }
    }
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Location::Local(p) => write!(f, "{}", p.display()),
            Location::S3 { bucket, prefix, .. } => write!(f, "s3://{bucket}/{prefix}"),
            Location::Gcs { bucket, prefix, .. } => write!(f, "gs://{bucket}/{prefix}"),
            Location::Azure {
                container, prefix, ..
            } => write!(f, "az://{container}/{prefix}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_supported_forms() {
        assert_eq!(
            Location::parse("/var/lib/pitr").unwrap(),
            Location::Local("/var/lib/pitr".into())
        );
        assert_eq!(
            Location::parse("file:///var/lib/pitr").unwrap(),
            Location::Local("/var/lib/pitr".into())
        );
        assert!(
            matches!(Location::parse("./repo").unwrap(), Location::Local(p) if p.is_absolute())
        );
        assert_eq!(
            Location::parse("s3://bkt/a/b/").unwrap(),
            Location::S3 {
                bucket: "bkt".into(),
                prefix: "a/b".into(),
                settings: S3Settings::default()
            }
        );
        assert_eq!(
            Location::parse("gs://bkt").unwrap(),
            Location::Gcs {
                bucket: "bkt".into(),
                prefix: "".into(),
                settings: GcsSettings::default()
            }
        );
        assert_eq!(
            Location::parse("az://c/p").unwrap(),
            Location::Azure {
                container: "c".into(),
                prefix: "p".into(),
                settings: AzureSettings::default()
            }
        );
    }

    #[test]
    fn rejects_malformed_urls_with_a_reason() {
        for bad in [
            "",
            "s3://",
            "s3:///prefix",
            "ftp://host/x",
            "file://relative",
            "s3:bucket",
            "s3://b?x=1",
        ] {
            let e = Location::parse(bad).unwrap_err();
            assert!(!e.reason.is_empty(), "{bad:?}");
        }
    }

    #[test]
    fn secrets_do_not_leak_through_debug() {
        let s = S3Settings {
            secret_access_key: Some("hunter2".into()),
            ..Default::default()
        };
        assert!(!format!("{s:?}").contains("hunter2"));
    }
}

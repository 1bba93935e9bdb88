//! Notifications: a JSON event POSTed to `--notify-url` and/or piped to `--notify-command`'s
//! stdin (for mail or chat CLIs). Delivered in order by one task, each retried with backoff;
//! a notification that cannot be delivered is logged and dropped, never stops the service.
//!
//! Events carry no secrets: the repository is named by its URL with any user, password and
//! query string removed, and messages are the errors pitr prints, which never hold credentials.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// Attempts per notification, and the first wait between them (doubled after each).
const ATTEMPTS: u32 = 5;
const FIRST_RETRY: Duration = Duration::from_secs(1);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Events waiting for delivery; beyond this the newest are dropped (logged).
const QUEUE: usize = 64;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    JobFailed,
    JobRecovered,
    RpoBreached,
    RpoRestored,
    StreamDown,
    StreamUp,
}

/// The JSON body, exactly these fields.
#[derive(Clone, Debug, Serialize)]
pub struct Event {
    pub event: EventKind,
    /// The scheduled job (backup, expire, verify); null for stream and RPO events.
    pub job: Option<String>,
    pub message: String,
    pub repository: String,
    pub host: String,
    pub at: DateTime<Utc>,
}

#[derive(Clone, Debug, Default)]
pub struct NotifyOptions {
    pub url: Option<url::Url>,
    pub command: Option<String>,
}

/// Hands events to the delivery task. Cheap to clone; a no-op when nothing is configured.
#[derive(Clone, Debug)]
pub struct Notifier {
    tx: Option<mpsc::Sender<Event>>,
    delivery: Arc<Mutex<Option<JoinHandle<()>>>>,
    repository: String,
    host: String,
}

impl Notifier {
    /// Starts the delivery task (when a URL or command is configured).
    pub fn start(opts: NotifyOptions, repository: &str) -> Notifier {
        let mut delivery = None;
        let tx = (opts.url.is_some() || opts.command.is_some()).then(|| {
            let (tx, rx) = mpsc::channel(QUEUE);
            delivery = Some(tokio::spawn(deliver_all(opts, rx)));
            tx
        });
        Notifier {
            tx,
            delivery: Arc::new(Mutex::new(delivery)),
            repository: public_location(repository),
            host: host_name(),
        }
    }

    pub fn disabled() -> Notifier {
        Notifier::start(NotifyOptions::default(), "")
    }

    /// Waits (at most `limit`) for the queued events to be delivered. Every other clone must
    /// be gone by then: the delivery ends when the last sender does.
    pub async fn finish(mut self, limit: Duration) {
        self.tx = None;
        let handle = self.delivery.lock().ok().and_then(|mut h| h.take());
        if let Some(h) = handle {
            if tokio::time::timeout(limit, h).await.is_err() {
                tracing::warn!("gave up waiting for notifications to be delivered");
            }
        }
    }

    pub fn send(&self, event: EventKind, job: Option<&str>, message: impl Into<String>) {
        let e = Event {
            event,
            job: job.map(str::to_string),
            message: message.into(),
            repository: self.repository.clone(),
            host: self.host.clone(),
            at: Utc::now(),
        };
        tracing::info!(event = ?e.event, job = ?e.job, message = %e.message, "notification");
        if let Some(tx) = &self.tx {
            if tx.try_send(e).is_err() {
                tracing::warn!("notification queue full or closed: dropping a notification");
            }
        }
    }
}

/// The repository location without credentials: user, password and query string removed.
pub fn public_location(location: &str) -> String {
    match url::Url::parse(location) {
        Ok(mut u) if u.scheme().len() > 1 => {
            let _ = u.set_username("");
            let _ = u.set_password(None);
            u.set_query(None);
            u.set_fragment(None);
            u.to_string()
        }
        _ => location.to_string(),
    }
}

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "unknown".into())
}

async fn deliver_all(opts: NotifyOptions, mut rx: mpsc::Receiver<Event>) {
    let client = reqwest::Client::builder()
        .timeout(REQUEST_TIMEOUT)
        .build()
        .map_err(
            |e| tracing::error!(error = %e, "cannot build the HTTP client: --notify-url disabled"),
        )
        .ok();
    while let Some(event) = rx.recv().await {
        let body = serde_json::to_vec(&event).expect("event serializes");
        if let (Some(url), Some(client)) = (&opts.url, &client) {
            let sent = with_retries("POST", || post(client, url, &body)).await;
            if let Err(e) = sent {
                tracing::error!(error = %e, "notification not delivered to --notify-url");
            }
        }
        if let Some(cmd) = &opts.command {
            if let Err(e) = with_retries("command", || run_command(cmd, &body)).await {
                tracing::error!(error = %e, "notification not delivered to --notify-command");
            }
        }
    }
}

/// An attempt's failure: retry or give up.
enum Attempt {
    Retry(String),
    GiveUp(String),
}

async fn with_retries<F, Fut>(what: &str, mut attempt: F) -> Result<(), String>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(), Attempt>>,
{
    let mut delay = FIRST_RETRY;
    for n in 1..=ATTEMPTS {
        match attempt().await {
            Ok(()) => return Ok(()),
            Err(Attempt::GiveUp(e)) => return Err(e),
            Err(Attempt::Retry(e)) if n == ATTEMPTS => {
                return Err(format!("{e} (after {ATTEMPTS} attempts)"))
            }
            Err(Attempt::Retry(e)) => {
                tracing::warn!(error = %e, retry_in = ?delay, "notification {what} failed; retrying");
                tokio::time::sleep(delay).await;
                delay *= 2;
            }
        }
    }
    Ok(())
}

async fn post(client: &reqwest::Client, url: &url::Url, body: &[u8]) -> Result<(), Attempt> {
    let resp = client
        .post(url.clone())
        .header("content-type", "application/json")
        .body(body.to_vec())
        .send()
        .await
        // reqwest's errors name the URL: strip it, it may hold a webhook token.
        .map_err(|e| Attempt::Retry(e.without_url().to_string()))?;
    let status = resp.status();
    if status.is_success() {
        return Ok(());
    }
    let msg = format!("the receiver answered HTTP {status}");
    // A request the receiver refuses will be refused again; overload and outages pass.
    if status.is_server_error() || status.as_u16() == 408 || status.as_u16() == 429 {
        Err(Attempt::Retry(msg))
    } else {
        Err(Attempt::GiveUp(msg))
    }
}

async fn run_command(cmd: &str, body: &[u8]) -> Result<(), Attempt> {
    let mut child = tokio::process::Command::new("/bin/sh")
        .arg("-c")
        .arg(cmd)
        .stdin(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| Attempt::GiveUp(format!("cannot run --notify-command: {e}")))?;
    if let Some(mut stdin) = child.stdin.take() {
        // A command that does not read its input is fine: ignore a broken pipe.
        let _ = stdin.write_all(body).await;
        let _ = stdin.write_all(b"\n").await;
    }
    let status = tokio::time::timeout(REQUEST_TIMEOUT * 6, child.wait())
        .await
        .map_err(|_| Attempt::Retry("--notify-command did not finish within 60s".into()))?
        .map_err(|e| Attempt::Retry(e.to_string()))?;
    if status.success() {
        Ok(())
    } else {
        Err(Attempt::Retry(format!(
            "--notify-command exited with {status}"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locations_lose_their_credentials() {
        assert_eq!(
            public_location("s3://AKIA:secret@bucket/prefix?token=x"),
            "s3://bucket/prefix"
        );
        assert_eq!(public_location("/var/lib/pitr"), "/var/lib/pitr");
    }

    #[test]
    fn the_event_has_exactly_the_documented_fields() {
        let e = Event {
            event: EventKind::JobRecovered,
            job: Some("backup".into()),
            message: "m".into(),
            repository: "r".into(),
            host: "h".into(),
            at: Utc::now(),
        };
        let v = serde_json::to_value(&e).unwrap();
        let mut keys: Vec<&str> = v.as_object().unwrap().keys().map(|k| k.as_str()).collect();
        keys.sort_unstable();
        assert_eq!(
            keys,
            ["at", "event", "host", "job", "message", "repository"]
        );
        assert_eq!(v["event"], "job_recovered");
    }
}

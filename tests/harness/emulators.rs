//! Cloud storage emulators per test, each on a free port of 127.0.0.1 in its own temp dir
//! (`<temp base>/emu.XXXXXX`, named on the server's command line for `.ci/run`'s leak check),
//! stopped by a watchdog if the test process dies, like [`super::S3Server`]:
//! - moto's server mode, a second S3 implementation beside s3s-fs;
//! - fake-gcs-server, for Google Cloud Storage;
//! - Azurite, for Azure Blob Storage.
//!
//! `scripts/install-test-deps.sh` installs them under `/opt/pitr-emulators` (or set
//! `PITR_EMULATORS` to another prefix). A missing emulator panics with the install hint: never
//! skip.

use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use pitr::storage::{AzureSettings, BackendOptions, GcsSettings, S3Settings, AZURITE_KEY};

use super::util::{clean_env, free_port, poll, TestDir, Watchdog};

const INSTALL_HINT: &str = "install the emulators with `bash scripts/install-test-deps.sh` \
     (as root), or set PITR_EMULATORS to where they are installed";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EmulatorKind {
    /// moto_server: S3.
    Moto,
    /// fake-gcs-server: GCS.
    FakeGcs,
    /// Azurite: Azure Blob Storage.
    Azurite,
}

/// `$PITR_EMULATORS`, else `/opt/pitr-emulators`.
fn prefix() -> PathBuf {
    std::env::var_os("PITR_EMULATORS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/opt/pitr-emulators"))
}

fn installed(rel: &str) -> PathBuf {
    let p = prefix().join(rel);
    assert!(p.exists(), "{} is missing; {INSTALL_HINT}", p.display());
    p
}

pub const BUCKET: &str = "pitr-test";
const MOTO_KEY_ID: &str = "pitr-moto-access";
const MOTO_SECRET: &str = "pitr-moto-secret-0123456789";

/// A running emulator with one bucket (container) [`BUCKET`]. Dropping it kills the server
/// and removes its data.
pub struct Emulator {
    // Field order matters for Drop: the watchdog dies first, then the dir is removed.
    watchdog: Option<Watchdog>,
    child: Option<Child>,
    dir: TestDir,
    port: u16,
    kind: EmulatorKind,
    /// fake-gcs-server only: the clients' way in (see [`GcsUploadShim`]).
    shim: Option<GcsUploadShim>,
}

impl Emulator {
    pub fn start(kind: EmulatorKind) -> Result<Emulator> {
        let dir = TestDir::without_watchdog("emu");
        let watchdog = Watchdog::spawn(
            Some(&dir.join("server.pid")),
            Some("KILL"),
            Some(dir.path()),
        );
        let mut e = Emulator {
            watchdog: Some(watchdog),
            child: None,
            dir,
            port: 0,
            kind,
            shim: None,
        };
        let mut last_err = None;
        for _ in 0..3 {
            e.port = free_port();
            match e.spawn().and_then(|()| e.create_bucket()) {
                Ok(()) => {
                    if kind == EmulatorKind::FakeGcs {
                        e.shim = Some(GcsUploadShim::start(e.port)?);
                    }
                    return Ok(e);
                }
                // Most likely another process took the port: try another one.
                Err(err) => {
                    e.stop();
                    last_err = Some(err);
                }
            }
        }
        Err(last_err
            .expect("tried")
            .context(format!("starting {kind:?} (3 tries)")))
    }

    fn command(&self) -> Command {
        let data = self.dir.join("data");
        let port = self.port.to_string();
        match self.kind {
            EmulatorKind::Moto => {
                // Through `python -c` so that the data dir is on the command line (moto keeps
                // everything in memory): the leak check finds servers by their dir.
                let mut c = Command::new(installed("venv/bin/python"));
                c.arg("-c")
                    .arg("import sys; from moto.server import main; main(sys.argv[2:])")
                    .arg(&data)
                    .args(["-H", "127.0.0.1", "-p", &port]);
                c
            }
            EmulatorKind::FakeGcs => {
                let mut c = Command::new(installed("bin/fake-gcs-server"));
                // The public host is what path-style XML API requests (`/bucket/object`) are
                // recognised by.
                c.args(["-scheme", "http", "-host", "127.0.0.1", "-port", &port])
                    .args(["-public-host", "127.0.0.1"])
                    .args(["-backend", "filesystem", "-filesystem-root"])
                    .arg(&data)
                    .args(["-log-level", "warn"]);
                c
            }
            EmulatorKind::Azurite => {
                let mut c = Command::new(installed("bin/azurite-blob"));
                c.args(["--blobHost", "127.0.0.1", "--blobPort", &port])
                    .arg("--location")
                    .arg(&data)
                    .args(["--disableTelemetry", "--silent", "--skipApiVersionCheck"]);
                c
            }
        }
    }

    fn spawn(&mut self) -> Result<()> {
        fs::create_dir_all(self.dir.join("data"))?;
        let log_path = self.dir.join("server.log");
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)?;
        let mut cmd = self.command();
        clean_env(&mut cmd);
        cmd.current_dir(self.dir.path())
            .stdin(Stdio::null())
            // A file, not our pipes: nextest waits for pipes held by leftover processes.
            .stdout(log.try_clone()?)
            .stderr(log);
        let child = cmd.spawn().with_context(|| format!("spawning {cmd:?}"))?;
        fs::write(self.dir.join("server.pid"), format!("{}\n", child.id()))?;
        self.child = Some(child);
        let port = self.port;
        let ready = poll(
            "the emulator to accept connections",
            Duration::from_secs(60),
            || {
                if let Some(status) = self.child.as_mut().expect("child").try_wait()? {
                    bail!("exited with {status}");
                }
                Ok(TcpStream::connect(("127.0.0.1", port)).ok().map(|_| ()))
            },
        );
        ready.map_err(|e| {
            let log = fs::read_to_string(&log_path).unwrap_or_default();
            e.context(format!("{:?} on port {port}; its log:\n{log}", self.kind))
        })
    }

    fn create_bucket(&self) -> Result<()> {
        match self.kind {
            EmulatorKind::Moto => http(self.port, "PUT", &format!("/{BUCKET}"), "", &[]),
            EmulatorKind::FakeGcs => http(
                self.port,
                "POST",
                "/storage/v1/b?project=pitr",
                &format!("{{\"name\":\"{BUCKET}\"}}"),
                &["content-type: application/json"],
            ),
            EmulatorKind::Azurite => azurite_create_container(self.port, BUCKET),
        }
    }

    /// Kills the server (SIGKILL).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = fs::remove_file(self.dir.join("server.pid"));
    }

    /// Where clients connect: the server, or for fake-gcs-server its [`GcsUploadShim`].
    pub fn port(&self) -> u16 {
        self.shim.as_ref().map_or(self.port, |s| s.port)
    }

    pub fn kind(&self) -> EmulatorKind {
        self.kind
    }

    /// `http://127.0.0.1:PORT` of [`Emulator::port`].
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port())
    }

    /// `s3://`, `gs://` or `az://` + bucket + `/prefix`.
    pub fn repo_url(&self, prefix: &str) -> String {
        let scheme = match self.kind {
            EmulatorKind::Moto => "s3",
            EmulatorKind::FakeGcs => "gs",
            EmulatorKind::Azurite => "az",
        };
        format!("{scheme}://{BUCKET}/{}", prefix.trim_start_matches('/'))
    }

    /// The configuration tables that reach this emulator. The files they name (a secret key
    /// file, a service account file) are written into the emulator's dir, readable by the
    /// server user.
    pub fn options(&self) -> BackendOptions {
        self.options_at(&self.endpoint())
    }

    /// [`Emulator::options`] with requests sent to `endpoint` instead, e.g. a proxy.
    pub fn options_at(&self, endpoint: &str) -> BackendOptions {
        let mut o = BackendOptions::default();
        match self.kind {
            EmulatorKind::Moto => {
                let secret = self.dir.write_file("s3-secret", format!("{MOTO_SECRET}\n"));
                o.s3 = Some(S3Settings {
                    endpoint: Some(endpoint.to_string()),
                    region: Some("us-east-1".into()),
                    access_key_id: Some(MOTO_KEY_ID.into()),
                    secret_access_key_file: Some(secret),
                    ..Default::default()
                });
            }
            EmulatorKind::FakeGcs => {
                // No OAuth: the emulator takes any request; object_store reads this switch
                // from the service account file.
                let key = r#"{"private_key": "unused", "private_key_id": "unused",
                    "client_email": "pitr@test", "disable_oauth": true}"#;
                let file = self.dir.write_file("gcs-service-account.json", key);
                o.gcs = Some(GcsSettings {
                    service_account_file: Some(file),
                    endpoint: Some(endpoint.to_string()),
                    ..Default::default()
                });
            }
            EmulatorKind::Azurite => {
                o.azure = Some(AzureSettings {
                    use_emulator: Some(true),
                    endpoint: Some(endpoint.to_string()),
                    ..Default::default()
                });
            }
        }
        o
    }

    /// [`Emulator::options`] as the TOML of a config file.
    pub fn config_toml(&self) -> String {
        let o = self.options();
        let q = |s: &str| format!("{s:?}");
        let p = |p: &Path| q(&p.display().to_string());
        match self.kind {
            EmulatorKind::Moto => {
                let s = o.s3.expect("s3");
                format!(
                    "[s3]\nendpoint = {}\nregion = \"us-east-1\"\naccess_key_id = {}\nsecret_access_key_file = {}\n",
                    q(&self.endpoint()),
                    q(MOTO_KEY_ID),
                    p(s.secret_access_key_file.as_deref().expect("file")),
                )
            }
            EmulatorKind::FakeGcs => {
                let g = o.gcs.expect("gcs");
                format!(
                    "[gcs]\nendpoint = {}\nservice_account_file = {}\n",
                    q(&self.endpoint()),
                    p(g.service_account_file.as_deref().expect("file")),
                )
            }
            EmulatorKind::Azurite => format!(
                "[azure]\nuse_emulator = true\nendpoint = {}\n",
                q(&self.endpoint())
            ),
        }
    }
}

impl Drop for Emulator {
    fn drop(&mut self) {
        self.shim.take();
        self.stop();
        self.watchdog.take();
    }
}

/// One plain HTTP/1.1 request without credentials (moto and fake-gcs-server take any); Err
/// unless the answer is 2xx.
fn http(port: u16, method: &str, path: &str, body: &str, headers: &[&str]) -> Result<()> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nhost: 127.0.0.1:{port}\r\nconnection: close\r\ncontent-length: {}\r\n",
        body.len()
    );
    for h in headers {
        req.push_str(h);
        req.push_str("\r\n");
    }
    req.push_str("\r\n");
    req.push_str(body);
    s.write_all(req.as_bytes())?;
    let mut answer = String::new();
    s.read_to_string(&mut answer)?;
    let status = answer.split(' ').nth(1).unwrap_or("");
    if !status.starts_with('2') {
        bail!("{method} {path}: {answer}");
    }
    Ok(())
}

/// Creating a container needs a Shared Key signature: node (which Azurite runs on anyway)
/// signs it with its built-in crypto, so the tests need no Azure SDK.
fn azurite_create_container(port: u16, container: &str) -> Result<()> {
    const SCRIPT: &str = r#"
const [port, container, keyB64] = process.argv.slice(1);
const crypto = require('crypto'), http = require('http');
const account = 'devstoreaccount1', version = '2021-08-06';
const date = new Date().toUTCString(), path = `/${account}/${container}`;
const toSign = ['PUT', '', '', '', '', '', '', '', '', '', '', '',
  `x-ms-date:${date}`, `x-ms-version:${version}`,
  `/${account}${path}\nrestype:container`].join('\n');
const sig = crypto.createHmac('sha256', Buffer.from(keyB64, 'base64')).update(toSign, 'utf8').digest('base64');
const req = http.request({host: '127.0.0.1', port, method: 'PUT', path: `${path}?restype=container`,
  headers: {'x-ms-date': date, 'x-ms-version': version, 'Content-Length': 0,
    Authorization: `SharedKey ${account}:${sig}`}}, res => {
  let body = ''; res.on('data', d => body += d);
  res.on('end', () => { if (res.statusCode !== 201) { console.error(res.statusCode, body); process.exit(1); } });
});
req.on('error', e => { console.error(e.message); process.exit(1); });
req.end();
"#;
    let out = Command::new("node")
        .args(["-e", SCRIPT, &port.to_string(), container, AZURITE_KEY])
        .stdin(Stdio::null())
        .output()
        .context("running node to create the Azurite container")?;
    if !out.status.success() {
        bail!(
            "creating container {container}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// fake-gcs-server has no XML API upload (`PUT /bucket/object`, its issue #331), which is how
/// object_store writes to GCS; everything else object_store sends (XML GET, HEAD, DELETE,
/// list) it serves. This shim in front of it turns each such PUT into the JSON API's media
/// multipart upload, carrying the precondition across (`x-goog-if-generation-match: N` becomes
/// `ifGenerationMatch=N`, which fake-gcs-server checks under its store's lock; the bundled
/// release ignores it on media uploads), and gives the
/// answer the `ETag` and `x-goog-generation` headers the XML API has. Every other request passes
/// through untouched. One request per connection (`connection: close` towards both sides).
struct GcsUploadShim {
    port: u16,
    stop: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<TcpStream>>>,
    accept: Option<thread::JoinHandle<()>>,
}

impl GcsUploadShim {
    fn start(upstream: u16) -> Result<GcsUploadShim> {
        let listener = TcpListener::bind(("127.0.0.1", 0))?;
        let port = listener.local_addr()?.port();
        let stop = Arc::new(AtomicBool::new(false));
        let conns = Arc::new(Mutex::new(Vec::new()));
        let (stop2, conns2) = (stop.clone(), conns.clone());
        let accept = thread::spawn(move || {
            for client in listener.incoming() {
                if stop2.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(client) = client else { continue };
                if let Ok(c) = client.try_clone() {
                    conns2.lock().unwrap().push(c);
                }
                thread::spawn(move || {
                    let _ = shim_one(client, upstream);
                });
            }
        });
        Ok(GcsUploadShim {
            port,
            stop,
            conns,
            accept: Some(accept),
        })
    }
}

impl Drop for GcsUploadShim {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wakes the accept loop, which then sees `stop`.
        let _ = TcpStream::connect(("127.0.0.1", self.port));
        for c in self.conns.lock().unwrap().drain(..) {
            let _ = c.shutdown(Shutdown::Both);
        }
        if let Some(a) = self.accept.take() {
            let _ = a.join();
        }
    }
}

/// One request: read it whole, rewrite an XML upload, forward, relay the answer.
fn shim_one(client: TcpStream, upstream: u16) -> Result<()> {
    let mut reader = BufReader::new(client.try_clone()?);
    let mut head = String::new();
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            return Ok(());
        }
        if line == "\r\n" {
            break;
        }
        head.push_str(&line);
    }
    let mut lines = head.lines();
    let request_line = lines.next().unwrap_or_default().to_string();
    let mut headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let header =
        |hs: &[(String, String)], k: &str| hs.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
    if header(&headers, "transfer-encoding").is_some() {
        bail!("chunked requests are not supported by the shim");
    }
    let len: usize = header(&headers, "content-length").map_or(Ok(0), |v| v.parse())?;
    let mut body = vec![0; len];
    reader.read_exact(&mut body)?;

    let mut parts = request_line.split(' ');
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let upload = method == "PUT" && !target.contains('?') && target.matches('/').count() >= 2;
    let (method, target) = if upload {
        let (bucket, object) = target[1..].split_once('/').expect("checked");
        let mut t = format!("/upload/storage/v1/b/{bucket}/o?uploadType=multipart&name={object}");
        if let Some(g) = header(&headers, "x-goog-if-generation-match") {
            t.push_str(&format!("&ifGenerationMatch={g}"));
        }
        let boundary = format!("pitr-shim-{:032x}", rand::random::<u128>());
        let mut framed = format!(
            "--{boundary}\r\ncontent-type: application/json\r\n\r\n{{}}\r\n\
             --{boundary}\r\ncontent-type: application/octet-stream\r\n\r\n"
        )
        .into_bytes();
        framed.extend_from_slice(&body);
        framed.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
        body = framed;
        headers.retain(|(k, _)| k != "content-type" && k != "content-length");
        headers.push((
            "content-type".into(),
            format!("multipart/related; boundary={boundary}"),
        ));
        headers.push(("content-length".into(), body.len().to_string()));
        ("POST", t)
    } else {
        (method, target.to_string())
    };
    headers.retain(|(k, _)| k != "connection");
    let mut up = TcpStream::connect(("127.0.0.1", upstream))?;
    let mut req = format!("{method} {target} HTTP/1.1\r\n");
    for (k, v) in &headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("connection: close\r\n\r\n");
    up.write_all(req.as_bytes())?;
    up.write_all(&body)?;
    let mut answer = Vec::new();
    up.read_to_end(&mut answer)?;
    let answer = if upload {
        with_xml_headers(answer)
    } else {
        answer
    };
    let mut client = client;
    client.write_all(&answer)?;
    client.shutdown(Shutdown::Both)?;
    Ok(())
}

/// A JSON API upload answer with the XML API's `ETag` and `x-goog-generation` headers, taken
/// from its JSON body; `connection: close` is kept.
fn with_xml_headers(answer: Vec<u8>) -> Vec<u8> {
    let text = String::from_utf8_lossy(&answer).into_owned();
    let Some((head, body)) = text.split_once("\r\n\r\n") else {
        return answer;
    };
    let Ok(json) = serde_json::from_str::<serde_json::Value>(body.trim()) else {
        return answer;
    };
    let field = |k: &str| json.get(k).and_then(|v| v.as_str()).map(str::to_string);
    let mut extra = String::new();
    if let Some(etag) = field("etag") {
        extra.push_str(&format!("\r\nETag: \"{etag}\""));
    }
    if let Some(generation) = field("generation") {
        extra.push_str(&format!("\r\nx-goog-generation: {generation}"));
    }
    format!("{head}{extra}\r\n\r\n{body}").into_bytes()
}

/// Dropping an emulator stops its server and removes its dir: nothing outlives its test.
#[test]
fn emulators_stop_on_drop() {
    for kind in [
        EmulatorKind::Moto,
        EmulatorKind::FakeGcs,
        EmulatorKind::Azurite,
    ] {
        let e = Emulator::start(kind).unwrap();
        let pid = fs::read_to_string(e.dir.join("server.pid")).unwrap();
        let dir = e.dir.path().to_path_buf();
        let port = e.port;
        drop(e);
        assert!(
            !Path::new("/proc").join(pid.trim()).exists(),
            "{kind:?} still running"
        );
        assert!(TcpStream::connect(("127.0.0.1", port)).is_err(), "{kind:?}");
        assert!(!dir.exists(), "{kind:?}: {} left behind", dir.display());
    }
}

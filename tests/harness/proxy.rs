//! A TCP proxy on 127.0.0.1 in front of a server of the harness, misbehaving the way networks
//! do, and counting what it did so that a test can assert its provocation happened:
//!
//! - [`Proxy::lose_first_put_response`] (HTTP/1.1, for s3s-fs): the first PUT of each object
//!   key reaches the server, which stores the object, but its answer never reaches the client:
//!   the proxy cuts both connections as the answer arrives. [`Proxy::cut_keys`] lists them.
//! - [`Proxy::dribble`]: the server's bytes reach the client in small pieces with pauses, so the
//!   client reads every larger message in several parts. [`Proxy::pieces`] counts them.
//!
//! One thread per direction and connection; dropping the proxy shuts every connection down.

use std::collections::HashSet;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::Duration;

#[derive(Clone, Copy, Debug)]
enum Mode {
    LoseFirstPutResponse,
    Dribble { piece: usize, pause: Duration },
}

pub struct Proxy {
    port: u16,
    shared: Arc<Shared>,
    accept: Option<JoinHandle<()>>,
}

struct Shared {
    mode: Mode,
    upstream: SocketAddr,
    stop: AtomicBool,
    /// Every connection's two sockets, to shut down on drop.
    conns: Mutex<Vec<TcpStream>>,
    /// PUT targets seen so far: only the first PUT of each loses its answer.
    seen_puts: Mutex<HashSet<String>>,
    cut_keys: Mutex<Vec<String>>,
    pieces: AtomicUsize,
    /// Requests the proxy could not frame (it then closes the connection).
    errors: Mutex<Vec<String>>,
}

impl Proxy {
    /// In front of the HTTP server on `127.0.0.1:upstream_port`: the first PUT of each object
    /// key is stored by the server and its answer lost.
    pub fn lose_first_put_response(upstream_port: u16) -> Proxy {
        Self::start(Mode::LoseFirstPutResponse, upstream_port)
    }

    /// In front of `127.0.0.1:upstream_port`: the server's bytes are forwarded `piece` bytes at
    /// a time with `pause` after each piece.
    pub fn dribble(upstream_port: u16, piece: usize, pause: Duration) -> Proxy {
        Self::start(Mode::Dribble { piece, pause }, upstream_port)
    }

    fn start(mode: Mode, upstream_port: u16) -> Proxy {
        // Bound here and kept: the port is ours, no window for another process to take it.
        let listener = TcpListener::bind("127.0.0.1:0").expect("binding the proxy");
        let port = listener.local_addr().unwrap().port();
        let shared = Arc::new(Shared {
            mode,
            upstream: SocketAddr::from(([127, 0, 0, 1], upstream_port)),
            stop: AtomicBool::new(false),
            conns: Mutex::new(vec![]),
            seen_puts: Mutex::new(HashSet::new()),
            cut_keys: Mutex::new(vec![]),
            pieces: AtomicUsize::new(0),
            errors: Mutex::new(vec![]),
        });
        let s = shared.clone();
        let accept = thread::spawn(move || accept_loop(listener, s));
        Proxy {
            port,
            shared,
            accept: Some(accept),
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `http://127.0.0.1:PORT`
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The request paths (`/bucket/key`) of the PUTs whose answer was lost, in order.
    pub fn cut_keys(&self) -> Vec<String> {
        self.shared.cut_keys.lock().unwrap().clone()
    }

    /// How many pieces of server bytes were forwarded in dribble mode.
    pub fn pieces(&self) -> usize {
        self.shared.pieces.load(Ordering::SeqCst)
    }

    /// What the proxy could not handle; a test asserts this is empty.
    pub fn errors(&self) -> Vec<String> {
        self.shared.errors.lock().unwrap().clone()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop, then end every connection so their threads exit.
        let _ = TcpStream::connect(("127.0.0.1", self.port));
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
        for c in self.shared.conns.lock().unwrap().drain(..) {
            let _ = c.shutdown(Shutdown::Both);
        }
    }
}

fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    for client in listener.incoming() {
        if shared.stop.load(Ordering::SeqCst) {
            return;
        }
        let Ok(client) = client else { continue };
        let Ok(server) = TcpStream::connect(shared.upstream) else {
            // The server is down: the client sees a closed connection, as it would.
            continue;
        };
        let _ = client.set_nodelay(true);
        let _ = server.set_nodelay(true);
        {
            let mut conns = shared.conns.lock().unwrap();
            conns.push(client.try_clone().unwrap());
            conns.push(server.try_clone().unwrap());
        }
        let s = shared.clone();
        thread::spawn(move || serve(client, server, s));
    }
}

fn serve(client: TcpStream, server: TcpStream, shared: Arc<Shared>) {
    match shared.mode {
        Mode::Dribble { piece, pause } => {
            let (c, s) = (client.try_clone().unwrap(), server.try_clone().unwrap());
            thread::spawn(move || copy(c, s));
            dribble(server, client, piece, pause, &shared);
        }
        Mode::LoseFirstPutResponse => {
            // The answer to the request being forwarded is lost when this holds a key.
            let losing: Arc<Mutex<Option<String>>> = Arc::default();
            let (c, s, l, sh) = (
                client.try_clone().unwrap(),
                server.try_clone().unwrap(),
                losing.clone(),
                shared.clone(),
            );
            thread::spawn(move || answers(s, c, l, sh));
            if let Err(e) = requests(client.try_clone().unwrap(), &server, &losing, &shared) {
                if e.kind() == io::ErrorKind::InvalidData {
                    shared.errors.lock().unwrap().push(e.to_string());
                }
                let _ = client.shutdown(Shutdown::Both);
                let _ = server.shutdown(Shutdown::Both);
            }
        }
    }
}

/// Plain copy until either side closes.
fn copy(mut from: TcpStream, mut to: TcpStream) {
    let _ = io::copy(&mut from, &mut to);
    let _ = to.shutdown(Shutdown::Write);
}

fn dribble(mut from: TcpStream, mut to: TcpStream, piece: usize, pause: Duration, sh: &Shared) {
    let mut buf = vec![0u8; piece];
    while let Ok(n) = from.read(&mut buf) {
        if n == 0 || to.write_all(&buf[..n]).is_err() {
            break;
        }
        sh.pieces.fetch_add(1, Ordering::SeqCst);
        thread::sleep(pause);
    }
    let _ = to.shutdown(Shutdown::Write);
}

/// Server to client. HTTP/1.1 clients send a request only once they have read the whole
/// previous answer, so whatever arrives while `losing` holds a key is that PUT's answer.
fn answers(
    mut server: TcpStream,
    mut client: TcpStream,
    losing: Arc<Mutex<Option<String>>>,
    shared: Arc<Shared>,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = server.read(&mut buf).unwrap_or(0);
        if let Some(key) = losing.lock().unwrap().take() {
            // The server has answered, so it has stored the object: the client never hears.
            if n > 0 {
                shared.cut_keys.lock().unwrap().push(key);
            }
            break;
        }
        if n == 0 || client.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = client.shutdown(Shutdown::Both);
    let _ = server.shutdown(Shutdown::Both);
}

/// Client to server, one request at a time (head, then a `Content-Length` body).
fn requests(
    client: TcpStream,
    mut server: &TcpStream,
    losing: &Mutex<Option<String>>,
    shared: &Shared,
) -> io::Result<()> {
    let mut reader = io::BufReader::new(client);
    loop {
        let Some((head, method, target, len)) = read_head(&mut reader)? else {
            return Ok(());
        };
        let mut body = vec![0u8; len];
        reader.read_exact(&mut body)?;
        let key = target.split('?').next().unwrap_or_default().to_string();
        if method == "PUT" && shared.seen_puts.lock().unwrap().insert(key.clone()) {
            *losing.lock().unwrap() = Some(key);
        }
        server.write_all(&head)?;
        server.write_all(&body)?;
    }
}

type Head = (Vec<u8>, String, String, usize);

/// One request head: its bytes, method, target and body length; `None` at a clean end.
fn read_head(reader: &mut impl io::BufRead) -> io::Result<Option<Head>> {
    let invalid = |m: String| io::Error::new(io::ErrorKind::InvalidData, m);
    let mut head = Vec::new();
    let (mut method, mut target, mut len) = (String::new(), String::new(), 0usize);
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            return if head.is_empty() {
                Ok(None)
            } else {
                Err(io::ErrorKind::UnexpectedEof.into())
            };
        }
        head.extend_from_slice(line.as_bytes());
        let l = line.trim_end();
        if method.is_empty() {
            let mut parts = l.split(' ');
            method = parts.next().unwrap_or_default().to_string();
            target = parts.next().unwrap_or_default().to_string();
            continue;
        }
        if l.is_empty() {
            return Ok(Some((head, method, target, len)));
        }
        let (name, value) = l.split_once(':').unwrap_or((l, ""));
        match name.to_ascii_lowercase().as_str() {
            "content-length" => {
                len = value
                    .trim()
                    .parse()
                    .map_err(|_| invalid(format!("bad Content-Length in {l:?}")))?;
            }
            "transfer-encoding" | "expect" => {
                return Err(invalid(format!("the proxy does not handle {l:?}")));
            }
            _ => {}
        }
    }
}

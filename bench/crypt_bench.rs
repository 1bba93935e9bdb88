//! Cost of encryption at rest on the object path, and of the passphrase KDF.
//!
//!   cargo run --release --example crypt_bench -- [FILE] [ROUNDS]
//!   cargo run --release --example crypt_bench -- kdf        (the KDF timings only)
//!
//! Frames a 16 MiB buffer (FILE's first 16 MiB, e.g. a WAL segment, or else synthetic WAL-like
//! data that lz4 compresses to about a quarter, and random bytes as the incompressible worst
//! case) with lz4 as archive-push and backup do, then the same plus `seal` of the frame's payload
//! (compress, then encrypt), and the reverse (`open_in_place` then decode) as archive-get and
//! restore would do.
//! Prints the best of ROUNDS (default 20) and the ratio encrypted / plain. Then times
//! `derive_kek` (Argon2id) at a few costs: a process pays it once, archive-push once per segment.

use std::time::{Duration, Instant};

use pitr::codec::crypt::{self, Dek, KdfParams};
use pitr::codec::{decode, encode, Codec, FRAME_HEADER_LEN};

const LEN: usize = 16 << 20;

fn main() {
    let mut args = std::env::args().skip(1);
    let file = args.next().filter(|a| a.parse::<usize>().is_err());
    let rounds: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(20);
    if file.as_deref() == Some("kdf") {
        return bench_kdf();
    }
    let dek = Dek::generate().expect("random");
    let mut inputs = vec![("synthetic WAL-like", wal_like()), ("random", random())];
    if let Some(f) = file {
        let mut b = std::fs::read(&f).expect("FILE");
        b.truncate(LEN);
        inputs.insert(0, ("FILE", b));
    }
    println!("16 MiB buffer, lz4 frame, best of {rounds}; AES-256-GCM (aws-lc-rs) + HKDF subkey");
    for (name, raw) in &inputs {
        bench_object_path(name, raw, &dek, rounds);
    }
    bench_kdf();
}

fn bench_object_path(name: &str, raw: &[u8], dek: &Dek, rounds: usize) {
    let aad = crypt::object_aad("wal/0000000100000000/000000010000000000000003", &[0; 40]);
    let framed = encode(raw, Codec::Lz4, 0);
    let stored = seal_frame(&framed, dek, &aad);
    // Plain and encrypted alternate within each round, so that a noisy neighbour (this machine
    // is shared) hits both alike; the best round of each is kept.
    let (plain_push, crypt_push) = best_pair(
        rounds,
        || encode(raw, Codec::Lz4, 0).len(),
        || seal_frame(&encode(raw, Codec::Lz4, 0), dek, &aad).len(),
    );
    // archive-get owns the bytes it read, so it decrypts them in place; the clone of the stored
    // object stands for that read and is timed on both sides.
    let (plain_get, crypt_get) = best_pair(
        rounds,
        || decode(&framed.clone()).expect("decode").len(),
        || open_frame(stored.clone(), dek, &aad).len(),
    );
    let (seal_only, open_only) = best_pair(
        rounds,
        || {
            crypt::seal(dek, &aad, &framed[FRAME_HEADER_LEN..])
                .expect("seal")
                .len()
        },
        || {
            let mut s = stored.clone();
            crypt::open_in_place(dek, &aad, &mut s[FRAME_HEADER_LEN..])
                .expect("open")
                .len()
        },
    );
    println!(
        "\n{name}: lz4 {:.3} of raw ({} -> {} bytes)",
        framed.len() as f64 / raw.len() as f64,
        raw.len(),
        framed.len()
    );
    let line = |what: &str, d: Duration, bytes: usize| {
        let mbs = bytes as f64 / 1e6 / d.as_secs_f64();
        println!("  {what:<46} {:8.3} ms {mbs:9.1} MB/s", ms(d));
    };
    line("push, plain: lz4 encode", plain_push, raw.len());
    line(
        "push, encrypted: lz4 encode + seal payload",
        crypt_push,
        raw.len(),
    );
    line("get, plain: copy + lz4 decode", plain_get, raw.len());
    line(
        "get, encrypted: copy + open + lz4 decode",
        crypt_get,
        raw.len(),
    );
    line(
        "seal of the lz4 payload alone (with its copy)",
        seal_only,
        framed.len(),
    );
    line(
        "copy + open in place of the lz4 payload",
        open_only,
        framed.len(),
    );
    println!(
        "  ratio encrypted/plain: push {:.3}x, get {:.3}x",
        ratio(crypt_push, plain_push),
        ratio(crypt_get, plain_get)
    );
}

/// The frame header stays in clear (it is part of the AAD); its payload is sealed.
fn seal_frame(framed: &[u8], dek: &Dek, aad: &[u8]) -> Vec<u8> {
    let sealed = crypt::seal(dek, aad, &framed[FRAME_HEADER_LEN..]).expect("seal");
    let mut out = Vec::with_capacity(FRAME_HEADER_LEN + sealed.len());
    out.extend_from_slice(&framed[..FRAME_HEADER_LEN]);
    out.extend_from_slice(&sealed);
    out
}

/// Reverse of `seal_frame`: opens the payload in place, moves the 40-byte header next to the
/// plaintext (no copy of the payload) and decodes that frame.
fn open_frame(mut stored: Vec<u8>, dek: &Dek, aad: &[u8]) -> Vec<u8> {
    let plain_len = crypt::open_in_place(dek, aad, &mut stored[FRAME_HEADER_LEN..])
        .expect("open")
        .len();
    let start = crypt::SEAL_HEADER_LEN;
    stored.copy_within(..FRAME_HEADER_LEN, start);
    decode(&stored[start..start + FRAME_HEADER_LEN + plain_len]).expect("decode")
}

fn bench_kdf() {
    println!("\nArgon2id derive_kek (one lane, no threads), best of 3:");
    for (m, t) in [
        (4, 1),
        (8, 1),
        (12, 1),
        (16, 1),
        (19, 2),
        (46, 1),
        (64, 1),
        (64, 3),
        (128, 2),
    ] {
        let params = KdfParams::with_cost(m * 1024, t, 1).expect("params");
        let d = best(3, || {
            crypt::derive_kek(b"correct horse battery staple", &params).expect("kdf");
            0
        });
        let default = params.m_cost_kib == KdfParams::DEFAULT_M_COST_KIB
            && params.t_cost == KdfParams::DEFAULT_T_COST;
        let mark = if default { "  (default)" } else { "" };
        println!("  m={m:>3} MiB t={t}: {:8.1} ms{mark}", ms(d));
    }
}

fn best(rounds: usize, mut f: impl FnMut() -> usize) -> Duration {
    best_pair(rounds, &mut f, || 0).0
}

fn best_pair(
    rounds: usize,
    mut a: impl FnMut() -> usize,
    mut b: impl FnMut() -> usize,
) -> (Duration, Duration) {
    let (mut best_a, mut best_b) = (Duration::MAX, Duration::MAX);
    let mut sink = 0;
    for _ in 0..rounds {
        let t0 = Instant::now();
        sink ^= a();
        best_a = best_a.min(t0.elapsed());
        let t0 = Instant::now();
        sink ^= b();
        best_b = best_b.min(t0.elapsed());
    }
    std::hint::black_box(sink);
    (best_a, best_b)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn ratio(a: Duration, b: Duration) -> f64 {
    a.as_secs_f64() / b.as_secs_f64()
}

/// Records of 64 bytes: a 16-byte varying header and a repeated body, roughly the redundancy
/// of WAL from an OLTP load (real segments compress to 0.1-0.3 with lz4).
fn wal_like() -> Vec<u8> {
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut out = Vec::with_capacity(LEN);
    while out.len() < LEN {
        for _ in 0..2 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            out.extend_from_slice(&state.to_le_bytes());
        }
        out.extend_from_slice(&[0x41; 48]);
    }
    out.truncate(LEN);
    out
}

fn random() -> Vec<u8> {
    let mut b = vec![0u8; LEN];
    aws_lc_rs::rand::fill(&mut b).expect("random");
    b
}

//! Authentication, as a state machine without I/O: the connection feeds it each Authentication
//! request from the server and sends whatever it appends to the output buffer.
//!
//! Supported: trust, cleartext password, md5, SCRAM-SHA-256 and, over TLS when the server
//! offers it, SCRAM-SHA-256-PLUS (`tls-server-end-point` channel binding). The SCRAM arithmetic
//! is `postgres_protocol::authentication::sasl::ScramSha256`; this file picks the mechanism and
//! the channel-binding flag the way libpq does.

use std::fmt;

use bytes::BytesMut;
use postgres_protocol::authentication::md5_hash;
use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};

use super::error::{Error, Result};
use super::message::{encode, AuthRequest};

/// A password. Its `Debug` and `Display` print `<redacted>` so that it cannot leak into logs
/// through a `{:?}` of a config struct.
#[derive(Clone, PartialEq, Eq)]
pub struct Password(String);

impl Password {
    pub fn new(s: impl Into<String>) -> Password {
        Password(s.into())
    }

    /// The secret itself; call only where it goes on the wire.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Password {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

impl fmt::Display for Password {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

const SCRAM: &str = "SCRAM-SHA-256";
const SCRAM_PLUS: &str = "SCRAM-SHA-256-PLUS";

/// What the caller should do after feeding a request in.
#[derive(Debug, PartialEq, Eq)]
pub enum AuthProgress {
    /// Send the bytes appended to the output buffer (if any) and read the next request.
    Continue,
    /// AuthenticationOk received; the server now sends ParameterStatus messages.
    Done,
}

/// Client side of one authentication exchange.
pub struct Authenticator {
    user: String,
    password: Option<Password>,
    /// `tls-server-end-point` hash of the server certificate when the connection is TLS and we
    /// could compute it; `Some(None)` when TLS is on but binding data is unavailable.
    tls: Option<Option<Vec<u8>>>,
    scram: Option<ScramSha256>,
    mechanism: Option<&'static str>,
}

impl Authenticator {
    pub fn new(
        user: &str,
        password: Option<Password>,
        tls_end_point: Option<Option<Vec<u8>>>,
    ) -> Authenticator {
        Authenticator {
            user: user.to_string(),
            password,
            tls: tls_end_point,
            scram: None,
            mechanism: None,
        }
    }

    /// The SASL mechanism chosen, once the server has asked for SASL.
    pub fn mechanism(&self) -> Option<&'static str> {
        self.mechanism
    }

    fn fail(&self, message: impl Into<String>) -> Error {
        Error::Auth {
            user: self.user.clone(),
            sqlstate: None,
            message: message.into(),
        }
    }

    fn password(&self, method: &str) -> Result<&Password> {
        self.password.as_ref().ok_or_else(|| {
            self.fail(format!(
                "the server requested {method} authentication but no password was supplied \
                 (set password in the connection string, PGPASSWORD, or ~/.pgpass)"
            ))
        })
    }

    /// Handles one Authentication request, appending any response message to `out`.
    pub fn step(&mut self, req: AuthRequest, out: &mut BytesMut) -> Result<AuthProgress> {
        match req {
            AuthRequest::Ok => {
                // A server that says Ok in the middle of SCRAM without a verified final
                // message could be an impostor that never knew the password.
                if self.scram.is_some() {
                    return Err(self.fail("server skipped the SCRAM server-final message"));
                }
                Ok(AuthProgress::Done)
            }
            AuthRequest::CleartextPassword => {
                let pw = self.password("password")?;
                encode::password(pw.expose().as_bytes(), out)?;
                Ok(AuthProgress::Continue)
            }
            AuthRequest::Md5Password { salt } => {
                let pw = self.password("md5")?;
                let hashed = md5_hash(self.user.as_bytes(), pw.expose().as_bytes(), salt);
                encode::password(hashed.as_bytes(), out)?;
                Ok(AuthProgress::Continue)
            }
            AuthRequest::Sasl { mechanisms } => {
                let pw = self.password("SCRAM-SHA-256")?.clone();
                let offers = |m: &str| mechanisms.iter().any(|x| x == m);
                let (mechanism, binding) = match &self.tls {
                    Some(Some(hash)) if offers(SCRAM_PLUS) => (
                        SCRAM_PLUS,
                        ChannelBinding::tls_server_end_point(hash.clone()),
                    ),
                    // Over TLS, "y" tells the server we could bind but it did not offer to,
                    // which lets a server that does support binding detect a downgrade.
                    Some(_) if !offers(SCRAM_PLUS) => (SCRAM, ChannelBinding::unrequested()),
                    _ => (SCRAM, ChannelBinding::unsupported()),
                };
                if !offers(mechanism) {
                    return Err(self.fail(format!(
                        "server offers only SASL mechanisms {mechanisms:?}; pitr supports {SCRAM}"
                    )));
                }
                let scram = ScramSha256::new(pw.expose().as_bytes(), binding);
                encode::sasl_initial_response(mechanism, scram.message(), out)?;
                self.scram = Some(scram);
                self.mechanism = Some(mechanism);
                Ok(AuthProgress::Continue)
            }
            AuthRequest::SaslContinue(data) => {
                let scram = self
                    .scram
                    .as_mut()
                    .ok_or_else(|| Error::protocol("SASL", "SASLContinue before SASL start"))?;
                scram
                    .update(&data)
                    .map_err(|e| Error::protocol("SCRAM server-first-message", e.to_string()))?;
                encode::sasl_response(scram.message(), out)?;
                Ok(AuthProgress::Continue)
            }
            AuthRequest::SaslFinal(data) => {
                let mut scram = self
                    .scram
                    .take()
                    .ok_or_else(|| Error::protocol("SASL", "SASLFinal before SASL start"))?;
                // A bad server signature means the server does not know the password's
                // verifier: refuse to talk to it.
                scram
                    .finish(&data)
                    .map_err(|e| self.fail(format!("server SCRAM signature invalid: {e}")))?;
                Ok(AuthProgress::Continue)
            }
            AuthRequest::Unsupported(code) => Err(self.fail(format!(
                "the server requested an authentication method pitr does not support \
                 (code {code}: Kerberos/GSSAPI/SSPI); use scram-sha-256 in pg_hba.conf"
            ))),
        }
    }
}

/// The `tls-server-end-point` channel-binding data (RFC 5929 §4.1) for a DER certificate: the
/// certificate hashed with its signature's hash function, SHA-256 when that is MD5 or SHA-1.
/// Returns `None` for signature algorithms without a single hash (Ed25519, RSASSA-PSS), where
/// PostgreSQL cannot bind either.
pub fn tls_server_end_point(cert_der: &[u8]) -> Option<Vec<u8>> {
    use aws_lc_rs::digest;
    let oid = signature_algorithm_oid(cert_der)?;
    // OIDs: RSA PKCS#1 1.2.840.113549.1.1.{4 md5,5 sha1,11 sha256,12 sha384,13 sha512};
    // ECDSA 1.2.840.10045.4.1 (sha1) and 1.2.840.10045.4.3.{2,3,4}.
    const RSA: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01];
    const ECDSA_SHA1: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x01];
    const ECDSA_SHA2: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03];
    let alg = if let Some(rest) = oid.strip_prefix(RSA) {
        match rest {
            [4] | [5] | [11] => &digest::SHA256,
            [12] => &digest::SHA384,
            [13] => &digest::SHA512,
            _ => return None,
        }
    } else if oid == ECDSA_SHA1 {
        &digest::SHA256
    } else if let Some(rest) = oid.strip_prefix(ECDSA_SHA2) {
        match rest {
            [2] => &digest::SHA256,
            [3] => &digest::SHA384,
            [4] => &digest::SHA512,
            _ => return None,
        }
    } else {
        return None;
    };
    Some(digest::digest(alg, cert_der).as_ref().to_vec())
}

/// Reads one DER TLV at the front of `b`: (tag, content, rest).
fn der_tlv(b: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, b) = b.split_first()?;
    let (&l0, mut b) = b.split_first()?;
    let len = if l0 < 0x80 {
        l0 as usize
    } else {
        let n = (l0 & 0x7f) as usize;
        if n == 0 || n > 4 || b.len() < n {
            return None;
        }
        let len = b[..n].iter().fold(0usize, |acc, &x| acc << 8 | x as usize);
        b = &b[n..];
        len
    };
    if b.len() < len {
        return None;
    }
    Some((tag, &b[..len], &b[len..]))
}

/// Certificate ::= SEQUENCE { tbsCertificate, signatureAlgorithm AlgorithmIdentifier, .. }
fn signature_algorithm_oid(cert: &[u8]) -> Option<&[u8]> {
    let (0x30, cert, _) = der_tlv(cert)? else {
        return None;
    };
    let (0x30, _tbs, rest) = der_tlv(cert)? else {
        return None;
    };
    let (0x30, alg, _) = der_tlv(rest)? else {
        return None;
    };
    let (0x06, oid, _) = der_tlv(alg)? else {
        return None;
    };
    Some(oid)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pg::message::parse_backend;

    #[test]
    fn password_is_redacted() {
        let p = Password::new("hunter2");
        assert_eq!(format!("{p:?}"), "<redacted>");
        assert_eq!(format!("{p}"), "<redacted>");
        assert_eq!(p.expose(), "hunter2");
    }

    #[test]
    fn trust_needs_nothing() {
        let mut a = Authenticator::new("u", None, None);
        let mut out = BytesMut::new();
        assert_eq!(
            a.step(AuthRequest::Ok, &mut out).expect("ok"),
            AuthProgress::Done
        );
        assert!(out.is_empty());
    }

    #[test]
    fn md5_response_matches_libpq() {
        // md5(md5(password || user) || salt), as computed by libpq's pg_md5_encrypt.
        let mut a = Authenticator::new("md5_user", Some(Password::new("password")), None);
        let mut out = BytesMut::new();
        a.step(
            AuthRequest::Md5Password {
                salt: [0x2a, 0x3d, 0x8f, 0xe0],
            },
            &mut out,
        )
        .expect("ok");
        assert_eq!(out[0], b'p');
        assert_eq!(
            &out[5..out.len() - 1],
            b"md562af4dd09bbb41884907a838a3233294"
        );
    }

    #[test]
    fn missing_password_is_an_auth_error() {
        let mut a = Authenticator::new("u", None, None);
        let err = a
            .step(AuthRequest::CleartextPassword, &mut BytesMut::new())
            .expect_err("no password");
        assert!(matches!(err, Error::Auth { .. }), "{err:?}");
    }

    #[test]
    fn scram_mechanism_choice() {
        let req = |m: &[&str]| AuthRequest::Sasl {
            mechanisms: m.iter().map(|s| s.to_string()).collect(),
        };
        let pw = || Some(Password::new("pw"));
        let initial = |a: &mut Authenticator, r| {
            let mut out = BytesMut::new();
            a.step(r, &mut out).expect("ok");
            out
        };
        // No TLS: plain SCRAM, gs2 flag "n".
        let mut a = Authenticator::new("u", pw(), None);
        let out = initial(&mut a, req(&[SCRAM_PLUS, SCRAM]));
        assert_eq!(a.mechanism(), Some(SCRAM));
        assert!(out.windows(4).any(|w| w == b"n,,n"));
        // TLS and binding data: PLUS.
        let mut a = Authenticator::new("u", pw(), Some(Some(vec![1; 32])));
        let out = initial(&mut a, req(&[SCRAM_PLUS, SCRAM]));
        assert_eq!(a.mechanism(), Some(SCRAM_PLUS));
        assert!(out.windows(24).any(|w| w == b"p=tls-server-end-point,,"));
        // TLS, server without PLUS: "y".
        let mut a = Authenticator::new("u", pw(), Some(Some(vec![1; 32])));
        let out = initial(&mut a, req(&[SCRAM]));
        assert!(out.windows(4).any(|w| w == b"y,,n"));
        // Unknown mechanism only.
        let mut a = Authenticator::new("u", pw(), None);
        assert!(a.step(req(&["OAUTHBEARER"]), &mut BytesMut::new()).is_err());
    }

    #[test]
    fn scram_rejects_bad_server_and_skipped_final() {
        let mut a = Authenticator::new("u", Some(Password::new("pw")), None);
        let mut out = BytesMut::new();
        a.step(
            AuthRequest::Sasl {
                mechanisms: vec![SCRAM.into()],
            },
            &mut out,
        )
        .expect("ok");
        // Server-first with a nonce that does not extend ours.
        let bad = bytes::Bytes::from_static(b"r=zzz,s=QSXCR+Q6sek8bf92,i=4096");
        assert!(a.step(AuthRequest::SaslContinue(bad), &mut out).is_err());

        let mut a = Authenticator::new("u", Some(Password::new("pw")), None);
        a.step(
            AuthRequest::Sasl {
                mechanisms: vec![SCRAM.into()],
            },
            &mut out,
        )
        .expect("ok");
        assert!(
            a.step(AuthRequest::Ok, &mut out).is_err(),
            "Ok without SASLFinal"
        );
        // The bytes we produced must be well-formed frontend messages: 'p' frames.
        let mut frames = out.clone();
        while !frames.is_empty() {
            assert_eq!(frames[0], b'p');
            let len = i32::from_be_bytes([frames[1], frames[2], frames[3], frames[4]]) as usize;
            let _ = frames.split_to(1 + len);
        }
        let _ = parse_backend; // frontend frames are not backend messages; only framing checked
    }

    #[test]
    fn end_point_hash_picks_the_signature_hash() {
        // A minimal DER skeleton: SEQ { SEQ {} , SEQ { OID sha256WithRSA } , BITSTRING }.
        let oid = [
            0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0b,
        ];
        let mut alg = vec![0x30, oid.len() as u8];
        alg.extend_from_slice(&oid);
        let mut body = vec![0x30, 0x00];
        body.extend_from_slice(&alg);
        body.extend_from_slice(&[0x03, 0x01, 0x00]);
        let mut cert = vec![0x30, body.len() as u8];
        cert.extend_from_slice(&body);
        let h = tls_server_end_point(&cert).expect("sha256");
        assert_eq!(h.len(), 32);
        assert_eq!(tls_server_end_point(b"\x30\x80garbage"), None);
        assert_eq!(tls_server_end_point(b""), None);
    }
}

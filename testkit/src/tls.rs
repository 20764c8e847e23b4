//! A throw-away PKI for TLS tests: a CA, a server and a client certificate (and the bad ones a
//! negative test needs) as PEM files, and the readiness probes of servers that speak only TLS.

use crate::Error;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, date_time_ymd,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tempfile::TempDir;

/// The common name of [`TlsFiles::client_cert`] (etcd takes it as the user name when auth is on).
pub const CLIENT_COMMON_NAME: &str = "palisade-test-client";

/// PEM files of a fresh, throw-away PKI in a temporary directory, made with `rcgen`:
///
/// - a CA ([`ca`](Self::ca)) that signed a server certificate for `127.0.0.1` and `localhost`
///   ([`server_cert`](Self::server_cert), [`server_key`](Self::server_key)) and a client
///   certificate ([`client_cert`](Self::client_cert), [`client_key`](Self::client_key));
/// - for negative tests: a client certificate of that CA that expired in 2001
///   ([`expired_client`](Self::expired_client)), another CA that signed none of the above
///   ([`wrong_ca`](Self::wrong_ca): a client trusting it does not trust the server), and a
///   client certificate signed by that other CA ([`wrong_ca_client`](Self::wrong_ca_client):
///   the servers refuse it).
///
/// Keys are ECDSA P-256, unencrypted PKCS#8. Cloning is cheap; the directory is deleted when
/// the last clone is dropped (servers started with these files keep a clone).
///
/// ```no_run
/// # fn main() -> Result<(), palisade_testkit::Error> {
/// let tls = palisade_testkit::TlsFiles::generate()?;
/// let etcd = palisade_testkit::Etcd::start_tls(&tls)?; // https://127.0.0.1:PORT, client certs required
/// println!("{} trusts {}", etcd.endpoint(), tls.ca.display());
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// The CA certificate that signed the server and client certificates.
    pub ca: PathBuf,
    /// The server certificate (SANs `127.0.0.1` and `localhost`; usable for server and client
    /// authentication, as etcd uses it for both).
    pub server_cert: PathBuf,
    /// The server certificate's private key.
    pub server_key: PathBuf,
    /// A valid client certificate signed by [`ca`](Self::ca), common name
    /// [`CLIENT_COMMON_NAME`].
    pub client_cert: PathBuf,
    /// The client certificate's private key.
    pub client_key: PathBuf,
    /// A client certificate signed by [`ca`](Self::ca) that was valid only in the year 2000.
    pub expired_client: CertFiles,
    /// A CA certificate that signed neither the server's nor the good client's certificate.
    pub wrong_ca: PathBuf,
    /// A client certificate (valid dates) signed by [`wrong_ca`](Self::wrong_ca).
    pub wrong_ca_client: CertFiles,
    dir: Arc<TempDir>,
}

/// A certificate and its private key, as PEM files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertFiles {
    /// The certificate.
    pub cert: PathBuf,
    /// Its private key.
    pub key: PathBuf,
}

impl TlsFiles {
    /// Generates the CAs, certificates and keys and writes them to a new temporary directory.
    pub fn generate() -> Result<TlsFiles, Error> {
        let dir = tempfile::Builder::new()
            .prefix("palisade-tls-")
            .tempdir()
            .map_err(Error::io("creating a directory for TLS files"))?;
        let write = |name: &str, pem: String| -> Result<PathBuf, Error> {
            let path = dir.path().join(name);
            std::fs::write(&path, pem).map_err(Error::io(format!("writing {}", path.display())))?;
            Ok(path)
        };

        let (ca_pem, ca) = new_ca("palisade test CA")?;
        let (wrong_ca_pem, wrong_ca) = new_ca("palisade wrong CA")?;

        let server = leaf(
            "127.0.0.1",
            &["127.0.0.1", "localhost"],
            &[
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ],
            false,
            &ca,
        )?;
        let client = leaf(
            CLIENT_COMMON_NAME,
            &[],
            &[ExtendedKeyUsagePurpose::ClientAuth],
            false,
            &ca,
        )?;
        let expired = leaf(
            "palisade-expired-client",
            &[],
            &[ExtendedKeyUsagePurpose::ClientAuth],
            true,
            &ca,
        )?;
        let foreign = leaf(
            "palisade-foreign-client",
            &[],
            &[ExtendedKeyUsagePurpose::ClientAuth],
            false,
            &wrong_ca,
        )?;

        Ok(TlsFiles {
            ca: write("ca.pem", ca_pem)?,
            server_cert: write("server.pem", server.0)?,
            server_key: write("server-key.pem", server.1)?,
            client_cert: write("client.pem", client.0)?,
            client_key: write("client-key.pem", client.1)?,
            expired_client: CertFiles {
                cert: write("expired-client.pem", expired.0)?,
                key: write("expired-client-key.pem", expired.1)?,
            },
            wrong_ca: write("wrong-ca.pem", wrong_ca_pem)?,
            wrong_ca_client: CertFiles {
                cert: write("wrong-ca-client.pem", foreign.0)?,
                key: write("wrong-ca-client-key.pem", foreign.1)?,
            },
            dir: Arc::new(dir),
        })
    }

    /// The directory that holds every file.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The good client certificate and key, as a pair.
    pub fn client(&self) -> CertFiles {
        CertFiles {
            cert: self.client_cert.clone(),
            key: self.client_key.clone(),
        }
    }
}

fn cert_error(what: &str) -> impl FnOnce(rcgen::Error) -> Error + '_ {
    move |e| Error::Certificate {
        detail: format!("{what}: {e}"),
    }
}

/// A self-signed CA: its PEM and the issuer that signs with it.
fn new_ca(name: &str) -> Result<(String, Issuer<'static, KeyPair>), Error> {
    let mut params = CertificateParams::new(Vec::new()).map_err(cert_error(name))?;
    params.distinguished_name.push(DnType::CommonName, name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let key = KeyPair::generate().map_err(cert_error(name))?;
    let cert = params.self_signed(&key).map_err(cert_error(name))?;
    Ok((cert.pem(), Issuer::new(params, key)))
}

/// A leaf certificate signed by `issuer`: (certificate PEM, key PEM).
fn leaf(
    common_name: &str,
    sans: &[&str],
    usages: &[ExtendedKeyUsagePurpose],
    expired: bool,
    issuer: &Issuer<'static, KeyPair>,
) -> Result<(String, String), Error> {
    let sans: Vec<String> = sans.iter().map(|s| s.to_string()).collect();
    let mut params = CertificateParams::new(sans).map_err(cert_error(common_name))?;
    params
        .distinguished_name
        .push(DnType::CommonName, common_name);
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = usages.to_vec();
    params.use_authority_key_identifier_extension = true;
    if expired {
        params.not_before = date_time_ymd(2000, 1, 1);
        params.not_after = date_time_ymd(2001, 1, 1);
    } else {
        // Not "now - a little": a server with a skewed clock would refuse a certificate that
        // starts a second in its future.
        params.not_before = date_time_ymd(2020, 1, 1);
    }
    let key = KeyPair::generate().map_err(cert_error(common_name))?;
    let cert = params
        .signed_by(&key, issuer)
        .map_err(cert_error(common_name))?;
    Ok((cert.pem(), key.serialize_pem()))
}

const PROBE_TIMEOUT: Duration = Duration::from_millis(1000);

/// Sends `request` over TLS (trusting `files.ca`, presenting the good client certificate) and
/// reads until `complete` says the answer is whole or the server closes. For readiness probes.
fn tls_exchange(
    addr: SocketAddr,
    files: &TlsFiles,
    request: &[u8],
    complete: impl Fn(&[u8]) -> bool,
) -> std::io::Result<Vec<u8>> {
    let config = client_config(files)?;
    let name = ServerName::IpAddress(addr.ip().into());
    let connection = rustls::ClientConnection::new(config, name).map_err(std::io::Error::other)?;
    let tcp = TcpStream::connect_timeout(&addr, PROBE_TIMEOUT)?;
    tcp.set_read_timeout(Some(PROBE_TIMEOUT))?;
    tcp.set_write_timeout(Some(PROBE_TIMEOUT))?;
    let mut stream = rustls::StreamOwned::new(connection, tcp);
    stream.write_all(request)?;
    stream.flush()?;
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                out.extend_from_slice(&buf[..n]);
                if complete(&out) {
                    break;
                }
            }
            // A server that closes without close_notify (Go's HTTP server may) ends the answer.
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof && !out.is_empty() => break,
            Err(e) => return Err(e),
        }
    }
    Ok(out)
}

fn client_config(files: &TlsFiles) -> std::io::Result<Arc<rustls::ClientConfig>> {
    let invalid = |e: rustls::pki_types::pem::Error| std::io::Error::other(e.to_string());
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(&files.ca).map_err(invalid)? {
        roots
            .add(cert.map_err(invalid)?)
            .map_err(std::io::Error::other)?;
    }
    let chain = CertificateDer::pem_file_iter(&files.client_cert)
        .map_err(invalid)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(invalid)?;
    let key = PrivateKeyDer::from_pem_file(&files.client_key).map_err(invalid)?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(std::io::Error::other)?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .map_err(std::io::Error::other)?;
    Ok(Arc::new(config))
}

/// Whether the etcd at `addr` answers `GET /health` over TLS with `"health":"true"`.
pub(crate) fn etcd_healthy(addr: SocketAddr, files: &TlsFiles) -> bool {
    let request =
        format!("GET /health HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").into_bytes();
    let answer = tls_exchange(addr, files, &request, |raw| {
        String::from_utf8_lossy(raw).contains("\"health\":")
    });
    matches!(answer, Ok(raw) if {
        let text = String::from_utf8_lossy(&raw);
        text.starts_with("HTTP/1.1 200") && text.contains("\"health\":\"true\"")
    })
}

/// Whether the Redis at `addr` answers `PING` over TLS (an authentication error is an answer).
pub(crate) fn redis_answers(addr: SocketAddr, files: &TlsFiles) -> bool {
    let answer = tls_exchange(addr, files, b"PING\r\n", |raw| raw.ends_with(b"\r\n"));
    matches!(answer, Ok(raw) if raw.starts_with(b"+PONG") || raw.starts_with(b"-NOAUTH"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_file_is_written_as_pem() {
        let tls = TlsFiles::generate().expect("generate");
        for path in [
            &tls.ca,
            &tls.server_cert,
            &tls.client_cert,
            &tls.expired_client.cert,
            &tls.wrong_ca,
            &tls.wrong_ca_client.cert,
        ] {
            let text = std::fs::read_to_string(path).expect("readable");
            assert!(text.starts_with("-----BEGIN CERTIFICATE-----"), "{text}");
        }
        for path in [
            &tls.server_key,
            &tls.client_key,
            &tls.expired_client.key,
            &tls.wrong_ca_client.key,
        ] {
            let text = std::fs::read_to_string(path).expect("readable");
            assert!(text.starts_with("-----BEGIN PRIVATE KEY-----"), "{text}");
        }
        assert!(tls.ca.starts_with(tls.dir()));
        let dir = tls.dir().to_path_buf();
        let clone = tls.clone();
        drop(tls);
        assert!(dir.exists(), "a clone keeps the directory");
        drop(clone);
        assert!(!dir.exists(), "the last clone removes it");
    }
}

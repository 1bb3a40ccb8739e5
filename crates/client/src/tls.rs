//! TLS for client connections (rustls on ring): the CAs a client trusts and, for brokers that
//! require client certificates (mutual TLS), its own certificate and key, from PEM files.

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use crate::error::ClientError;

/// How long a client waits for a broker to complete the TLS handshake.
const HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// How a client speaks TLS: set on a [`crate::Cluster`] (and so on producers, consumers and
/// admin clients), every connection it opens is TLS. Cheap to clone.
#[derive(Clone)]
pub struct ClientTls {
    connector: TlsConnector,
}

impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientTls").finish_non_exhaustive()
    }
}

impl ClientTls {
    /// Trusts the CA certificates in PEM file `ca`; with `identity` (certificate chain and key
    /// PEM files) presents that certificate to brokers that ask for one.
    pub fn from_pem_files(
        ca: &Path,
        identity: Option<(&Path, &Path)>,
    ) -> Result<ClientTls, ClientError> {
        let roots = pem::roots(ca).map_err(invalid)?;
        let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| invalid(e.to_string()))?
        .with_root_certificates(roots);
        let config = match identity {
            None => builder.with_no_client_auth(),
            Some((cert, key)) => {
                let chain = pem::certificates(cert).map_err(invalid)?;
                let key = pem::private_key(key).map_err(invalid)?;
                builder
                    .with_client_auth_cert(chain, key)
                    .map_err(|e| invalid(e.to_string()))?
            }
        };
        Ok(ClientTls {
            connector: TlsConnector::from(Arc::new(config)),
        })
    }

    /// The TLS handshake over `stream`, checking that the broker's certificate names `addr`'s
    /// host (a DNS name or an IP address).
    pub(crate) async fn handshake(
        &self,
        addr: &str,
        stream: TcpStream,
    ) -> Result<TlsStream<TcpStream>, ClientError> {
        let failed = |message: String| ClientError::Connection {
            addr: addr.to_string(),
            message,
        };
        let host = addr
            .rsplit_once(':')
            .map_or(addr, |(host, _)| host)
            .trim_start_matches('[')
            .trim_end_matches(']');
        let name = ServerName::try_from(host.to_string())
            .map_err(|e| failed(format!("{host:?} is not a TLS server name: {e}")))?;
        // Bounded: a paused broker completes the TCP handshake (the kernel does) but never the
        // TLS one, and nothing above bounds opening a connection.
        match tokio::time::timeout(HANDSHAKE_TIMEOUT, self.connector.connect(name, stream)).await {
            Ok(Ok(stream)) => Ok(stream),
            Ok(Err(e)) => Err(failed(format!("TLS handshake: {e}"))),
            Err(_) => Err(failed(format!(
                "TLS handshake not done within {HANDSHAKE_TIMEOUT:?}"
            ))),
        }
    }
}

/// Reading PEM files: certificates, private keys and CA sets, with errors that name the file
/// (the broker maps them to its config errors).
pub mod pem {
    use std::path::Path;

    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};

    /// The certificates of a PEM file (at least one).
    pub fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
        let certs = CertificateDer::pem_file_iter(path)
            .and_then(Iterator::collect::<Result<Vec<_>, _>>)
            .map_err(|e| format!("{}: {e}", path.display()))?;
        if certs.is_empty() {
            return Err(format!("{}: no certificate in it", path.display()));
        }
        Ok(certs)
    }

    /// The private key of a PEM file (PKCS#8, PKCS#1 or SEC1).
    pub fn private_key(path: &Path) -> Result<PrivateKeyDer<'static>, String> {
        PrivateKeyDer::from_pem_file(path).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// The CA certificates of a PEM file, as a trust store.
    pub fn roots(path: &Path) -> Result<rustls::RootCertStore, String> {
        let mut roots = rustls::RootCertStore::empty();
        for cert in certificates(path)? {
            roots
                .add(cert)
                .map_err(|e| format!("{}: {e}", path.display()))?;
        }
        Ok(roots)
    }
}

fn invalid(message: String) -> ClientError {
    ClientError::InvalidArgument(format!("TLS: {message}"))
}

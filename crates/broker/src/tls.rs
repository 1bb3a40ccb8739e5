//! TLS on the native and Kafka listeners: rustls (no OpenSSL), certificates and keys from PEM
//! files, TLS 1.2 and 1.3, optionally requiring client certificates signed by a given CA (mTLS).
//!
//! Brokers fetch from each other over TLS too, trusting `tls_ca` and presenting their own
//! certificate. The controller listener (Raft, registrations, heartbeats) is not covered yet.
//!
//! The handshake runs in the connection's own task, bounded by `frame_read_timeout_ms`, so a
//! client that connects and says nothing holds only its own connection slot.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use cairn_client::pem;
use rustls::sign::CertifiedKey;
use tokio_rustls::TlsAcceptor;

use crate::config::{BrokerConfig, ConfigError};

/// The listeners' certificate and key, read again from their files on [`ServerCert::reload`]
/// (SIGHUP for `cairn broker`): new handshakes use the new ones, connections already open keep
/// theirs.
#[derive(Debug)]
pub(crate) struct ServerCert {
    cert: PathBuf,
    key: PathBuf,
    provider: Arc<rustls::crypto::CryptoProvider>,
    current: RwLock<Arc<CertifiedKey>>,
}

impl ServerCert {
    fn load(
        cert: &Path,
        key: &Path,
        provider: &rustls::crypto::CryptoProvider,
    ) -> Result<CertifiedKey, ConfigError> {
        let chain = pem::certificates(cert).map_err(|e| invalid("tls_cert", e))?;
        let key = pem::private_key(key).map_err(|e| invalid("tls_key", e))?;
        let signing = provider
            .key_provider
            .load_private_key(key)
            .map_err(|e| invalid("tls_key", e))?;
        let certified = CertifiedKey::new(chain, signing);
        // The key must be the certificate's: a mismatch is refused here, not at a handshake.
        certified
            .keys_match()
            .map_err(|e| invalid("tls_key", format!("does not match tls_cert: {e}")))?;
        Ok(certified)
    }

    /// Reads the certificate and key files again; on error the current ones stay.
    pub(crate) fn reload(&self) -> Result<(), ConfigError> {
        let loaded = ServerCert::load(&self.cert, &self.key, &self.provider)?;
        *self
            .current
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(loaded);
        Ok(())
    }
}

impl rustls::server::ResolvesServerCert for ServerCert {
    fn resolve(&self, _hello: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(Arc::clone(
            &self
                .current
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        ))
    }
}

/// The acceptor of `config`'s listeners and its reloadable certificate: `None` without
/// `tls_cert`.
pub(crate) fn acceptor(
    config: &BrokerConfig,
) -> Result<Option<(TlsAcceptor, Arc<ServerCert>)>, ConfigError> {
    let (Some(cert), Some(key)) = (&config.tls_cert, &config.tls_key) else {
        return Ok(None);
    };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let server_cert = Arc::new(ServerCert {
        current: RwLock::new(Arc::new(ServerCert::load(cert, key, &provider)?)),
        cert: cert.clone(),
        key: key.clone(),
        provider: Arc::clone(&provider),
    });
    let builder = rustls::ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| invalid("tls_cert", e))?;
    let builder = match &config.tls_client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let roots = pem::roots(ca).map_err(|e| invalid("tls_client_ca", e))?;
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider,
            )
            .build()
            .map_err(|e| invalid("tls_client_ca", e))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let server = builder.with_cert_resolver(Arc::clone(&server_cert) as _);
    Ok(Some((TlsAcceptor::from(Arc::new(server)), server_cert)))
}

/// How this broker connects to the others' listeners (replica fetches) when they speak TLS:
/// trusting `tls_ca`, presenting its own certificate (for clusters that also require client
/// certificates). `None` without TLS.
pub(crate) fn to_peers(
    config: &BrokerConfig,
) -> Result<Option<cairn_client::ClientTls>, ConfigError> {
    let (Some(cert), Some(key), Some(ca)) = (&config.tls_cert, &config.tls_key, &config.tls_ca)
    else {
        return Ok(None);
    };
    cairn_client::ClientTls::from_pem_files(ca, Some((cert, key)))
        .map(Some)
        .map_err(|e| invalid("tls_ca", e))
}

fn invalid(field: &'static str, err: impl std::fmt::Display) -> ConfigError {
    ConfigError::Invalid {
        field,
        why: err.to_string(),
    }
}

//! TLS on the native and Kafka listeners: rustls (no OpenSSL), certificates and keys from PEM
//! files, TLS 1.2 and 1.3, optionally requiring client certificates signed by a given CA (mTLS).
//!
//! Brokers fetch from each other over TLS too, trusting `tls_ca` and presenting their own
//! certificate. The controller listener (Raft, registrations, heartbeats) is not covered yet.
//!
//! The handshake runs in the connection's own task, bounded by `frame_read_timeout_ms`, so a
//! client that connects and says nothing holds only its own connection slot.

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::TlsAcceptor;

use crate::config::{BrokerConfig, ConfigError};

/// The acceptor of `config`'s listeners: `None` without `tls_cert`.
pub(crate) fn acceptor(config: &BrokerConfig) -> Result<Option<TlsAcceptor>, ConfigError> {
    let (Some(cert), Some(key)) = (&config.tls_cert, &config.tls_key) else {
        return Ok(None);
    };
    let chain = certificates("tls_cert", cert)?;
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| ConfigError::Invalid {
        field: "tls_key",
        why: format!("{}: {e}", key.display()),
    })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| invalid("tls_cert", e))?;
    let builder = match &config.tls_client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for cert in certificates("tls_client_ca", ca)? {
                roots.add(cert).map_err(|e| invalid("tls_client_ca", e))?;
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider,
            )
            .build()
            .map_err(|e| invalid("tls_client_ca", e))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let server = builder
        .with_single_cert(chain, key)
        .map_err(|e| invalid("tls_key", e))?;
    Ok(Some(TlsAcceptor::from(Arc::new(server))))
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

/// The certificates of a PEM file (at least one).
fn certificates(
    field: &'static str,
    path: &Path,
) -> Result<Vec<CertificateDer<'static>>, ConfigError> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(Iterator::collect::<Result<Vec<_>, _>>)
        .map_err(|e| ConfigError::Invalid {
            field,
            why: format!("{}: {e}", path.display()),
        })?;
    if certs.is_empty() {
        return Err(ConfigError::Invalid {
            field,
            why: format!("{}: no certificate in it", path.display()),
        });
    }
    Ok(certs)
}

fn invalid(field: &'static str, err: impl std::fmt::Display) -> ConfigError {
    ConfigError::Invalid {
        field,
        why: err.to_string(),
    }
}

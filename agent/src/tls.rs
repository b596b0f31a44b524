//! The API's TLS on its TCP address, when the config names a certificate and a key (PEM):
//! rustls, TLS 1.2 and 1.3, no client certificates (the bearer token authenticates). Each
//! connection is accepted, its handshake done, then served by the same router as the Unix
//! socket; a failed handshake is logged and dropped.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

/// Errors loading the certificate and key.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Cannot read the TLS certificate file {path}")]
    Cert {
        path: PathBuf,
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    #[error("Cannot read the TLS key file {path}")]
    Key {
        path: PathBuf,
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    #[error("The TLS certificate {cert} and key {key} do not make a server configuration")]
    Config {
        cert: PathBuf,
        key: PathBuf,
        #[source]
        source: rustls::Error,
    },
}

/// The acceptor for `cert` (a chain, leaf first) and `key`.
pub fn acceptor(cert: &Path, key: &Path) -> Result<TlsAcceptor, Error> {
    let certs = CertificateDer::pem_file_iter(cert)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|source| Error::Cert {
            path: cert.to_owned(),
            source,
        })?;
    let private = PrivateKeyDer::from_pem_file(key).map_err(|source| Error::Key {
        path: key.to_owned(),
        source,
    })?;
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .and_then(|b| b.with_no_client_auth().with_single_cert(certs, private))
    .map_err(|source| Error::Config {
        cert: cert.to_owned(),
        key: key.to_owned(),
        source,
    })?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// Serves `router` over TLS on `listener` until `stop` turns true.
pub async fn serve(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    router: axum::Router,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = stop.wait_for(|s| *s) => return,
        };
        let (tcp, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!("API on TCP: cannot accept: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let (acceptor, router) = (acceptor.clone(), router.clone());
        tokio::spawn(async move {
            let tls = match acceptor.accept(tcp).await {
                Ok(t) => t,
                Err(e) => {
                    tracing::info!(%peer, "API on TCP: TLS handshake failed: {e}");
                    return;
                }
            };
            let service = hyper_util::service::TowerToHyperService::new(router);
            let io = hyper_util::rt::TokioIo::new(tls);
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(io, service)
                .await
            {
                tracing::debug!(%peer, "API on TCP: connection ended: {e}");
            }
        });
    }
}

//! The mutual TLS of the replication link (rustls, TLS 1.3 only, the `ring` provider). Each
//! daemon has one identity, `[replication] cert` and `key`, which it presents both as a
//! server (to peers that connect to it) and as a client (when it connects to a peer), and one
//! trust anchor set, `ca`: a peer is accepted, either way, only if its certificate chains to
//! one of those CAs. A client also checks that the server's certificate names the host it
//! dialled (an IP address or DNS name in its subject alternative names).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use tokio_rustls::{TlsAcceptor, TlsConnector};

use crate::config::ReplicationResolved;

/// Errors loading the replication's TLS files.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Cannot read {what} {path}")]
    Read {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    #[error("{what} {path} holds no certificate")]
    NoCertificate { what: &'static str, path: PathBuf },
    #[error("CA file {path} has a certificate rustls refuses")]
    BadCa {
        path: PathBuf,
        #[source]
        source: rustls::Error,
    },
    #[error("Cannot build the peer verifier")]
    Verifier(#[source] rustls::server::VerifierBuilderError),
    #[error("Cannot build the TLS configuration (does the key match the certificate?)")]
    Config(#[source] rustls::Error),
    #[error("'{0}' is not a host name or IP address a certificate can name")]
    ServerName(String),
}

/// The replication's TLS: what a listener accepts with and what a connection to a peer uses.
#[derive(Clone)]
pub struct Tls {
    server: Arc<ServerConfig>,
    client: Arc<ClientConfig>,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Tls { .. }")
    }
}

impl Tls {
    /// Loads the certificate chain, key and CA of `[replication]`.
    pub fn load(r: &ReplicationResolved) -> Result<Tls, Error> {
        let chain = certificates("certificate", &r.cert)?;
        let key = PrivateKeyDer::from_pem_file(&r.key).map_err(|source| Error::Read {
            what: "key",
            path: r.key.clone(),
            source,
        })?;
        let mut roots = RootCertStore::empty();
        for ca in certificates("CA file", &r.ca)? {
            roots.add(ca).map_err(|source| Error::BadCa {
                path: r.ca.clone(),
                source,
            })?;
        }
        let roots = Arc::new(roots);
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let versions = &[&rustls::version::TLS13];

        let client_verifier =
            WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
                .build()
                .map_err(Error::Verifier)?;
        let server = ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(versions)
            .map_err(Error::Config)?
            .with_client_cert_verifier(client_verifier)
            .with_single_cert(chain.clone(), key.clone_key())
            .map_err(Error::Config)?;

        let server_verifier = WebPkiServerVerifier::builder_with_provider(roots, provider.clone())
            .build()
            .map_err(Error::Verifier)?;
        let client = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(versions)
            .map_err(Error::Config)?
            .with_webpki_verifier(server_verifier)
            .with_client_auth_cert(chain, key)
            .map_err(Error::Config)?;
        Ok(Tls {
            server: Arc::new(server),
            client: Arc::new(client),
        })
    }

    /// Accepts peers: completes the handshake only with a client certificate the CA signed.
    pub fn acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from(self.server.clone())
    }

    /// Connects to peers, presenting this daemon's certificate.
    pub fn connector(&self) -> TlsConnector {
        TlsConnector::from(self.client.clone())
    }

    /// The name a peer at `host` (of `HOST:PORT`) must have in its certificate.
    pub fn server_name(host: &str) -> Result<ServerName<'static>, Error> {
        let bare = host.trim_start_matches('[').trim_end_matches(']');
        ServerName::try_from(bare.to_string()).map_err(|_| Error::ServerName(host.to_string()))
    }
}

/// The certificates of a PEM file, at least one.
fn certificates(what: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, Error> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|i| i.collect::<Result<Vec<_>, _>>())
        .map_err(|source| Error::Read {
            what,
            path: path.to_owned(),
            source,
        })?;
    if certs.is_empty() {
        return Err(Error::NoCertificate {
            what,
            path: path.to_owned(),
        });
    }
    Ok(certs)
}

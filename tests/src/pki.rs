//! Certificates for the replication tests: a CA of their own, and node certificates it signs
//! (ECDSA P-256, rcgen), written as PEM files the way an operator would give them to storaged.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};

/// A certificate authority.
pub struct Ca {
    cert: rcgen::Certificate,
    key: KeyPair,
}

/// The PEM files of a node: its certificate, its key, and the CA it trusts.
#[derive(Clone, Debug)]
pub struct NodeFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
}

impl NodeFiles {
    /// The `[replication]` lines naming these files.
    pub fn toml(&self) -> String {
        format!(
            "cert = \"{}\"\nkey = \"{}\"\nca = \"{}\"\n",
            self.cert.display(),
            self.key.display(),
            self.ca.display()
        )
    }
}

impl Ca {
    /// A new CA named `name`.
    pub fn new(name: &str) -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA parameters");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate().expect("CA key");
        let cert = params.self_signed(&key).expect("CA certificate");
        Ca { cert, key }
    }

    /// The CA's certificate, PEM.
    pub fn pem(&self) -> String {
        self.cert.pem()
    }

    /// A certificate for node `name` with these subject alternative names (IP addresses or
    /// DNS names), for both TLS server and client use; its files in `dir`, named after it,
    /// with this CA as the trusted one.
    pub fn issue(&self, dir: &Path, name: &str, sans: &[&str]) -> NodeFiles {
        let mut params =
            CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<String>>())
                .expect("node parameters");
        params.distinguished_name.push(DnType::CommonName, name);
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let key = KeyPair::generate().expect("node key");
        let cert = params
            .signed_by(&key, &self.cert, &self.key)
            .expect("node certificate");
        let files = NodeFiles {
            cert: dir.join(format!("{name}.pem")),
            key: dir.join(format!("{name}.key")),
            ca: dir.join(format!("{name}-ca.pem")),
        };
        std::fs::write(&files.cert, cert.pem()).expect("write certificate");
        std::fs::write(&files.key, key.serialize_pem()).expect("write key");
        std::fs::write(&files.ca, self.pem()).expect("write CA");
        files
    }
}

/// A TLS client connection to a replication listener, the handshake done.
pub type TlsStream = rustls::StreamOwned<rustls::ClientConnection, std::net::TcpStream>;

/// Connects to `addr` as a peer would: TLS 1.3, trusting the CA certificates of `trust`,
/// presenting `identity`'s certificate if given; the server must be named `server_name` in
/// its certificate. Returns the stream once the handshake is through, or why it failed.
pub fn connect(
    addr: std::net::SocketAddr,
    server_name: &str,
    identity: Option<&NodeFiles>,
    trust: &Path,
) -> Result<TlsStream, String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    use std::sync::Arc;

    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(trust).expect("CA file") {
        roots.add(c.expect("CA certificate")).expect("CA accepted");
    }
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("TLS 1.3")
        .with_root_certificates(roots);
    let config = match identity {
        Some(f) => {
            let chain = CertificateDer::pem_file_iter(&f.cert)
                .expect("certificate file")
                .collect::<Result<Vec<_>, _>>()
                .expect("certificates");
            let key = PrivateKeyDer::from_pem_file(&f.key).expect("key file");
            builder
                .with_client_auth_cert(chain, key)
                .expect("client identity")
        }
        None => builder.with_no_client_auth(),
    };
    let name = ServerName::try_from(server_name.to_string()).expect("server name");
    let mut conn =
        rustls::ClientConnection::new(Arc::new(config), name).map_err(|e| e.to_string())?;
    let mut tcp = std::net::TcpStream::connect(addr).map_err(|e| e.to_string())?;
    tcp.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    while conn.is_handshaking() {
        conn.complete_io(&mut tcp).map_err(|e| e.to_string())?;
    }
    Ok(rustls::StreamOwned::new(conn, tcp))
}

//! mTLS between proxies: TLS 1.3 only, certificates from the cluster CA
//! naming a SPIFFE identity, checked on both sides. The proxy's own
//! certificate can be replaced at any time (rotation): handshakes after the
//! swap use the new one, established connections are untouched.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};
use skiff_identity::SpiffeId;

use crate::config::IdentityFiles;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{0}: {1}")]
    File(String, String),
    #[error("TLS setup: {0}")]
    Rustls(#[from] rustls::Error),
}

/// This proxy's identity: the CA it trusts and its current certificate.
pub struct Identity {
    provider: Arc<CryptoProvider>,
    roots: Arc<RootCertStore>,
    anchors: Vec<rustls_pki_types::TrustAnchor<'static>>,
    current: RwLock<Current>,
    /// Client configs by expected peer and whether they offer
    /// [`OPAQUE_ALPN`].
    clients: Mutex<HashMap<(SpiffeId, bool), Arc<ClientConfig>>>,
    server: Mutex<Option<Arc<ServerConfig>>>,
}

#[derive(Clone)]
struct Current {
    key: Arc<CertifiedKey>,
    id: SpiffeId,
    not_after_unix: i64,
    /// The PEM it came from, to notice changes on disk.
    source: (String, String),
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("id", &self.id().to_string())
            .finish_non_exhaustive()
    }
}

impl Identity {
    /// Loads the CA and this proxy's certificate and key from files.
    pub fn load(files: &IdentityFiles) -> Result<Arc<Identity>, TlsError> {
        let ca_pem = read(&files.ca)?;
        let cert_pem = read(&files.cert)?;
        let key_pem = read(&files.key)?;
        Identity::from_pem(&ca_pem, &cert_pem, &key_pem).map_err(|e| match e {
            TlsError::File(what, msg) => TlsError::File(
                format!("{what} ({}, {})", files.cert.display(), files.key.display()),
                msg,
            ),
            other => other,
        })
    }

    pub fn from_pem(
        ca_pem: &str,
        cert_pem: &str,
        key_pem: &str,
    ) -> Result<Arc<Identity>, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let ca = skiff_identity::certs_from_pem(ca_pem)
            .map_err(|e| TlsError::File("CA".into(), e.to_string()))?;
        let mut roots = RootCertStore::empty();
        let mut anchors = Vec::new();
        for der in &ca {
            roots.add(der.clone())?;
            let anchor = webpki::anchor_from_trusted_cert(der)
                .map_err(|e| TlsError::File("CA".into(), e.to_string()))?;
            anchors.push(anchor.to_owned());
        }
        let current = current(&provider, cert_pem, key_pem)?;
        Ok(Arc::new(Identity {
            provider,
            roots: Arc::new(roots),
            anchors,
            current: RwLock::new(current),
            clients: Mutex::new(HashMap::new()),
            server: Mutex::new(None),
        }))
    }

    /// Re-reads the certificate and key; swaps them in when they changed.
    /// Returns whether they did. A bad pair is an error and the old one stays.
    pub fn reload(&self, files: &IdentityFiles) -> Result<bool, TlsError> {
        let cert_pem = read(&files.cert)?;
        let key_pem = read(&files.key)?;
        if self.lock().source == (cert_pem.clone(), key_pem.clone()) {
            return Ok(false);
        }
        let next = current(&self.provider, &cert_pem, &key_pem)?;
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = next;
        Ok(true)
    }

    pub fn id(&self) -> SpiffeId {
        self.lock().id.clone()
    }

    /// When the current certificate expires, in seconds since the epoch.
    pub fn not_after_unix(&self) -> i64 {
        self.lock().not_after_unix
    }

    fn lock(&self) -> std::sync::RwLockReadGuard<'_, Current> {
        self.current.read().unwrap_or_else(|p| p.into_inner())
    }

    /// The server side: TLS 1.3, a client certificate from the CA required;
    /// a client offering [`OPAQUE_ALPN`] gets it (its bytes are opaque).
    pub fn server_config(self: &Arc<Self>) -> Result<Arc<ServerConfig>, TlsError> {
        let mut cached = self.server.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(config) = cached.as_ref() {
            return Ok(config.clone());
        }
        let verifier =
            WebPkiClientVerifier::builder_with_provider(self.roots.clone(), self.provider.clone())
                .build()
                .map_err(|e| TlsError::File("CA".into(), e.to_string()))?;
        let config = ServerConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(verifier)
            .with_cert_resolver(Arc::new(Resolver(self.clone())));
        let mut config = config;
        config.alpn_protocols = vec![OPAQUE_ALPN.to_vec()];
        let config = Arc::new(config);
        *cached = Some(config.clone());
        Ok(config)
    }

    /// The client side toward a peer that must prove `expected`; `opaque`:
    /// offer [`OPAQUE_ALPN`], telling the peer not to wait for bytes to
    /// detect a protocol (the server may speak first).
    pub fn client_config(
        self: &Arc<Self>,
        expected: &SpiffeId,
        opaque: bool,
    ) -> Result<Arc<ClientConfig>, TlsError> {
        let mut clients = self.clients.lock().unwrap_or_else(|p| p.into_inner());
        let key = (expected.clone(), opaque);
        if let Some(config) = clients.get(&key) {
            return Ok(config.clone());
        }
        let verifier = PeerVerifier {
            provider: self.provider.clone(),
            anchors: self.anchors.clone(),
            expected: expected.clone(),
        };
        let config = ClientConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier))
            .with_client_cert_resolver(Arc::new(Resolver(self.clone())));
        let mut config = config;
        if opaque {
            config.alpn_protocols = vec![OPAQUE_ALPN.to_vec()];
        }
        let config = Arc::new(config);
        clients.insert(key, config.clone());
        Ok(config)
    }
}

/// The ALPN protocol by which one proxy tells another that the
/// connection's bytes are opaque (not HTTP).
pub const OPAQUE_ALPN: &[u8] = b"skiff.opaque/1";

/// The certificate toward clients outside the mesh (the ingress gateway's
/// HTTPS), from PEM files that are re-read by [`EdgeCert::reload`]: a
/// renewed certificate is used for new handshakes without a restart.
#[derive(Debug)]
pub struct EdgeCert {
    cert: PathBuf,
    key: PathBuf,
    /// The PEM texts it was made from, and the key rustls serves.
    current: RwLock<((String, String), Arc<CertifiedKey>)>,
    provider: Arc<CryptoProvider>,
}

impl EdgeCert {
    pub fn load(cert: &Path, key: &Path) -> Result<Arc<EdgeCert>, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let source = (read(cert)?, read(key)?);
        let certified = edge_key(&provider, cert, key, &source)?;
        Ok(Arc::new(EdgeCert {
            cert: cert.to_path_buf(),
            key: key.to_path_buf(),
            current: RwLock::new((source, certified)),
            provider,
        }))
    }

    /// Re-reads the files; swaps a changed, usable pair in. Returns
    /// whether it changed. A bad pair is an error and the old one stays.
    pub fn reload(&self) -> Result<bool, TlsError> {
        let source = (read(&self.cert)?, read(&self.key)?);
        if self.current.read().unwrap_or_else(|p| p.into_inner()).0 == source {
            return Ok(false);
        }
        let certified = edge_key(&self.provider, &self.cert, &self.key, &source)?;
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = (source, certified);
        Ok(true)
    }

    /// TLS 1.2 and 1.3, HTTP/2 and HTTP/1.1 offered by ALPN, no client
    /// certificate asked for, the current certificate at each handshake.
    pub fn server_config(self: &Arc<Self>) -> Result<Arc<ServerConfig>, TlsError> {
        let mut config = ServerConfig::builder_with_provider(self.provider.clone())
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(EdgeResolver(self.clone())));
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(Arc::new(config))
    }
}

fn edge_key(
    provider: &CryptoProvider,
    cert: &Path,
    key: &Path,
    (cert_pem, key_pem): &(String, String),
) -> Result<Arc<CertifiedKey>, TlsError> {
    let named = |path: &Path, e: String| TlsError::File(path.display().to_string(), e);
    let certs = skiff_identity::certs_from_pem(cert_pem).map_err(|e| named(cert, e.to_string()))?;
    if certs.is_empty() {
        return Err(named(cert, "no certificate in the PEM".into()));
    }
    let key_der = skiff_identity::key_from_pem(key_pem).map_err(|e| named(key, e.to_string()))?;
    let signing = provider
        .key_provider
        .load_private_key(key_der)
        .map_err(|e| named(key, e.to_string()))?;
    let certified = Arc::new(CertifiedKey::new(certs, signing));
    certified
        .keys_match()
        .map_err(|e| named(key, format!("does not match the certificate: {e}")))?;
    Ok(certified)
}

#[derive(Debug)]
struct EdgeResolver(Arc<EdgeCert>);

impl rustls::server::ResolvesServerCert for EdgeResolver {
    fn resolve(&self, _hello: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(
            self.0
                .current
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .1
                .clone(),
        )
    }
}

fn read(path: &Path) -> Result<String, TlsError> {
    std::fs::read_to_string(path)
        .map_err(|e| TlsError::File(path.display().to_string(), e.to_string()))
}

fn current(provider: &CryptoProvider, cert_pem: &str, key_pem: &str) -> Result<Current, TlsError> {
    let bad = |m: String| TlsError::File("certificate".into(), m);
    let certs = skiff_identity::certs_from_pem(cert_pem).map_err(|e| bad(e.to_string()))?;
    let leaf = certs
        .first()
        .ok_or_else(|| bad("no certificate in the PEM".into()))?;
    let id = skiff_identity::spiffe_id_of(leaf)
        .map_err(|e| bad(e.to_string()))?
        .ok_or_else(|| bad("it names no spiffe:// identity".into()))?;
    let not_after_unix = skiff_identity::not_after_unix(leaf).map_err(|e| bad(e.to_string()))?;
    let key = skiff_identity::key_from_pem(key_pem).map_err(|e| bad(e.to_string()))?;
    let signing = provider.key_provider.load_private_key(key)?;
    let key = Arc::new(CertifiedKey::new(certs, signing));
    key.keys_match()
        .map_err(|e| bad(format!("the key does not match it: {e}")))?;
    Ok(Current {
        key,
        id,
        not_after_unix,
        source: (cert_pem.to_string(), key_pem.to_string()),
    })
}

/// Hands rustls whichever certificate is current at handshake time.
#[derive(Debug)]
struct Resolver(Arc<Identity>);

impl rustls::server::ResolvesServerCert for Resolver {
    fn resolve(&self, _hello: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.lock().key.clone())
    }
}

impl rustls::client::ResolvesClientCert for Resolver {
    fn resolve(&self, _hints: &[&[u8]], _schemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.0.lock().key.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// Checks a peer proxy's certificate: a chain to the cluster CA, valid
/// now, usable for serving, naming exactly the expected identity. Host
/// names play no part: identities are SPIFFE URIs.
#[derive(Debug)]
struct PeerVerifier {
    provider: Arc<CryptoProvider>,
    anchors: Vec<rustls_pki_types::TrustAnchor<'static>>,
    expected: SpiffeId,
}

impl ServerCertVerifier for PeerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let cert = webpki::EndEntityCert::try_from(end_entity)
            .map_err(|e| rustls::Error::General(format!("peer certificate: {e}")))?;
        cert.verify_for_usage(
            self.provider.signature_verification_algorithms.all,
            &self.anchors,
            intermediates,
            now,
            webpki::KeyUsage::server_auth(),
            None,
            None,
        )
        .map_err(|e| rustls::Error::General(format!("peer certificate: {e}")))?;
        match skiff_identity::spiffe_id_of(end_entity) {
            Ok(Some(id)) if id == self.expected => Ok(ServerCertVerified::assertion()),
            Ok(Some(id)) => Err(rustls::Error::General(format!(
                "peer is {id}, expected {}",
                self.expected
            ))),
            _ => Err(rustls::Error::General(
                "peer certificate names no identity".into(),
            )),
        }
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General("TLS 1.2 is not accepted".into()))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// The SPIFFE identity of a finished server-side handshake's client.
pub fn peer_identity(conn: &rustls::ServerConnection) -> Option<SpiffeId> {
    let leaf = conn.peer_certificates()?.first()?;
    skiff_identity::spiffe_id_of(leaf).ok().flatten()
}

#[cfg(test)]
pub(crate) mod testing {
    //! A CA and workload certificates for tests, made in memory.
    use super::*;
    use std::time::Duration;

    pub struct TestPki {
        pub ca: skiff_identity::Ca,
    }

    impl TestPki {
        pub fn new() -> TestPki {
            let now = time::OffsetDateTime::now_utc();
            TestPki {
                ca: skiff_identity::Ca::generate("test", now, Duration::from_secs(86_400)).unwrap(),
            }
        }

        /// `(cert_pem, key_pem)` for `spiffe://td/ns/<ns>/sa/<sa>`.
        pub fn issue(&self, ns: &str, sa: &str, validity: Duration) -> (String, String) {
            let id = SpiffeId::new("td", ns, sa).unwrap();
            let (key, csr) = skiff_identity::workload_csr(&id).unwrap();
            let now = time::OffsetDateTime::now_utc();
            (
                self.ca.sign_workload(&csr, &id, now, validity).unwrap(),
                key,
            )
        }

        pub fn identity(&self, ns: &str, sa: &str) -> Arc<Identity> {
            let (cert, key) = self.issue(ns, sa, Duration::from_secs(3600));
            Identity::from_pem(self.ca.cert_pem(), &cert, &key).unwrap()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::testing::TestPki;
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A handshake over an in-memory pipe; returns what the server saw of
    /// the client, or the error either side hit.
    async fn handshake(
        client: &Arc<Identity>,
        server: &Arc<Identity>,
        expected: &SpiffeId,
    ) -> Result<Option<SpiffeId>, String> {
        let (a, b) = tokio::io::duplex(64 * 1024);
        let connector =
            tokio_rustls::TlsConnector::from(client.client_config(expected, false).unwrap());
        let acceptor = tokio_rustls::TlsAcceptor::from(server.server_config().unwrap());
        let name = ServerName::IpAddress(std::net::Ipv4Addr::LOCALHOST.into());
        let (c, s) = tokio::join!(connector.connect(name, a), acceptor.accept(b));
        // TLS 1.3 clients finish before the server has judged their
        // certificate: the server's verdict is what counts.
        let mut c = c.map_err(|e| e.to_string())?;
        let mut s = s.map_err(|e| e.to_string())?;
        c.write_all(b"hello").await.map_err(|e| e.to_string())?;
        c.flush().await.map_err(|e| e.to_string())?;
        let mut buf = [0u8; 5];
        s.read_exact(&mut buf).await.map_err(|e| e.to_string())?;
        Ok(peer_identity(s.get_ref().1))
    }

    #[tokio::test]
    async fn both_sides_prove_their_identity() {
        let pki = TestPki::new();
        let web = pki.identity("shop", "web");
        let db = pki.identity("shop", "db");
        let seen = handshake(&web, &db, &db.id()).await.unwrap();
        assert_eq!(seen, Some(web.id()));
    }

    #[tokio::test]
    async fn a_peer_with_another_identity_is_refused() {
        let pki = TestPki::new();
        let web = pki.identity("shop", "web");
        let db = pki.identity("shop", "db");
        let err = handshake(&web, &db, &web.id()).await.unwrap_err();
        assert!(err.contains("expected spiffe://td/ns/shop/sa/web"), "{err}");
    }

    #[tokio::test]
    async fn a_certificate_from_another_ca_is_refused_both_ways() {
        let ours = TestPki::new();
        let theirs = TestPki::new();
        let web = ours.identity("shop", "web");
        let impostor = theirs.identity("shop", "web");
        assert!(handshake(&impostor, &web, &web.id()).await.is_err());
        assert!(handshake(&web, &impostor, &web.id()).await.is_err());
    }

    #[tokio::test]
    async fn a_reloaded_certificate_is_used_for_new_handshakes() {
        let pki = TestPki::new();
        let dir = tempfile::tempdir().unwrap();
        let files = IdentityFiles {
            ca: dir.path().join("ca.crt"),
            cert: dir.path().join("tls.crt"),
            key: dir.path().join("tls.key"),
        };
        let write = |(cert, key): (String, String)| {
            std::fs::write(&files.cert, cert).unwrap();
            std::fs::write(&files.key, key).unwrap();
        };
        std::fs::write(&files.ca, pki.ca.cert_pem()).unwrap();
        write(pki.issue("shop", "web", std::time::Duration::from_secs(600)));
        let web = Identity::load(&files).unwrap();
        let first = web.not_after_unix();
        assert!(!web.reload(&files).unwrap());
        write(pki.issue("shop", "web", std::time::Duration::from_secs(7200)));
        assert!(web.reload(&files).unwrap());
        assert!(web.not_after_unix() > first + 3000);
        let db = pki.identity("shop", "db");
        assert_eq!(
            handshake(&web, &db, &db.id()).await.unwrap(),
            Some(web.id())
        );
        // A key that does not match the certificate is refused; the old pair stays.
        let (cert, _) = pki.issue("shop", "web", std::time::Duration::from_secs(7200));
        let (_, other_key) = pki.issue("shop", "web", std::time::Duration::from_secs(7200));
        write((cert, other_key));
        assert!(web.reload(&files).is_err());
        assert_eq!(
            handshake(&web, &db, &db.id()).await.unwrap(),
            Some(web.id())
        );
    }

    #[test]
    fn a_renewed_edge_certificate_is_served_and_a_bad_one_is_refused() {
        let pki = TestPki::new();
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
        let write = |(c, k): &(String, String)| {
            std::fs::write(&cert, c).unwrap();
            std::fs::write(&key, k).unwrap();
        };
        let leaf = |pem: &str| skiff_identity::certs_from_pem(pem).unwrap()[0].clone();
        let served = |edge: &Arc<EdgeCert>| edge.current.read().unwrap().1.cert[0].clone();
        let first = pki.issue("gw", "edge", std::time::Duration::from_secs(600));
        write(&first);
        let edge = EdgeCert::load(&cert, &key).unwrap();
        edge.server_config().unwrap();
        assert_eq!(served(&edge), leaf(&first.0));
        assert!(!edge.reload().unwrap());
        let renewed = pki.issue("gw", "edge", std::time::Duration::from_secs(7200));
        write(&renewed);
        assert!(edge.reload().unwrap());
        assert_eq!(served(&edge), leaf(&renewed.0));
        // A key that does not match: refused, naming the file; the renewed pair stays.
        write(&(first.0.clone(), renewed.1.clone()));
        let err = edge.reload().unwrap_err().to_string();
        assert!(
            err.contains("tls.key") && err.contains("does not match"),
            "{err}"
        );
        assert_eq!(served(&edge), leaf(&renewed.0));
        // So is a first load of such a pair.
        assert!(EdgeCert::load(&cert, &key).is_err());
    }
}

//! Mutual TLS on cluster links: the cluster CA, node certificates, and the rustls configs.
//!
//! Every link is TLS 1.3, and both ends show a certificate issued by the cluster CA whose DNS name
//! is the node's name (`bulkhead certs issue n2` makes one for `n2`). rustls checks the chain on
//! both sides; it does *not* check a name, because a dialler knows an address, not who listens
//! there. Who a peer is comes from ractor_cluster's own handshake, where each side claims a node
//! name: [`crate::gate`] reads that claim off the wire and refuses the link unless the peer's
//! certificate ([`PeerCert`]) names the node it claims, before the claim reaches ractor_cluster.
//!
//! Each link also yields a channel binding ([`binding`], a TLS exporter value both ends share and
//! nobody else knows): heartbeats carry it, so a heartbeat naming node X is believed only if it
//! came over a link whose certificate says X (see `membership`).
//!
//! Caveats: there is no revocation list; a node's certificate stays valid until it expires
//! (5 years) or the CA is replaced (docs/operations.md, "Rotation"). Validity is judged by each
//! node's wall clock: a certificate is valid from 30 days before it was made, so a node whose
//! clock runs up to 30 days behind still links; one further off is refused with the times in the
//! error.

use std::path::Path;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls13_signature, CryptoProvider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};

use crate::config::ClusterConfig;

/// The name every dial uses as its TLS server name; no node certificate carries it and no verifier
/// checks it (see the module docs).
const DIAL_NAME: &str = "bulkhead-peer";
/// The label of the TLS exporter value used as a link's channel binding.
const BINDING_LABEL: &[u8] = b"EXPORTER-bulkhead-link-binding";

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// The acceptor and connector of one node, from its CA, certificate and key files.
#[derive(Clone)]
pub struct TlsLinks {
    pub acceptor: tokio_rustls::TlsAcceptor,
    pub connector: tokio_rustls::TlsConnector,
}

impl TlsLinks {
    /// Reads the files a config names; refuses a key others may read and a certificate that does
    /// not name this node or was not issued by the CA.
    pub fn load(cfg: &ClusterConfig) -> Result<TlsLinks, String> {
        let (Some(ca), Some(cert), Some(key)) = (&cfg.tls_ca_file, &cfg.tls_cert_file, &cfg.tls_key_file) else {
            return Err("tls is on but tls_ca_file, tls_cert_file or tls_key_file is missing".into());
        };
        crate::secret::check_private(key, "tls_key_file")?;
        let read =
            |p: &Path, what: &str| std::fs::read(p).map_err(|e| format!("cannot read {what} {}: {e}", p.display()));
        Self::from_pem(&read(ca, "tls_ca_file")?, &read(cert, "tls_cert_file")?, &read(key, "tls_key_file")?, &cfg.name)
    }

    pub fn from_pem(ca: &[u8], cert: &[u8], key: &[u8], node: &str) -> Result<TlsLinks, String> {
        let roots = Arc::new(roots(ca)?);
        let chain = certs(cert, "tls_cert_file")?;
        let key =
            PrivateKeyDer::from_pem_slice(key).map_err(|e| format!("tls_key_file: not a PEM private key: {e}"))?;
        let own = chain.first().ok_or("tls_cert_file holds no certificate")?;
        let own = PeerCert(own.clone());
        own.verify_chain(&roots).map_err(|e| format!("tls_cert_file was not issued by the CA in tls_ca_file: {e}"))?;
        if !own.names(node) {
            return Err(format!(
                "tls_cert_file does not name this node `{node}`: issue one with `bulkhead certs issue DIR {node}`"
            ));
        }
        let tls13 = &[&rustls::version::TLS13];
        let client_verifier = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider())
            .build()
            .map_err(|e| format!("cannot build the peer certificate check: {e}"))?;
        let server = rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(tls13)
            .map_err(|e| e.to_string())?
            .with_client_cert_verifier(client_verifier)
            .with_single_cert(chain.clone(), key.clone_key())
            .map_err(|e| format!("tls_cert_file and tls_key_file do not match: {e}"))?;
        let client = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(tls13)
            .map_err(|e| e.to_string())?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(ChainOnly { roots }))
            .with_client_auth_cert(chain, key)
            .map_err(|e| format!("tls_cert_file and tls_key_file do not match: {e}"))?;
        Ok(TlsLinks {
            acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(server)),
            connector: tokio_rustls::TlsConnector::from(Arc::new(client)),
        })
    }

    /// The server name a dial presents (unchecked; see the module docs).
    pub fn dial_name() -> ServerName<'static> {
        ServerName::try_from(DIAL_NAME).unwrap_or_else(|_| ServerName::IpAddress(std::net::Ipv4Addr::LOCALHOST.into()))
    }
}

fn roots(pem: &[u8]) -> Result<RootCertStore, String> {
    let mut roots = RootCertStore::empty();
    for c in certs(pem, "tls_ca_file")? {
        roots.add(c).map_err(|e| format!("tls_ca_file: not a usable CA certificate: {e}"))?;
    }
    Ok(roots)
}

fn certs(pem: &[u8], what: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{what}: not PEM certificates: {e}"))?;
    if certs.is_empty() {
        return Err(format!("{what} holds no certificate"));
    }
    Ok(certs)
}

/// The certificate a peer showed on a link.
#[derive(Debug, Clone)]
pub struct PeerCert(pub CertificateDer<'static>);

impl PeerCert {
    /// Whether this certificate is valid for the DNS name `node`.
    pub fn names(&self, node: &str) -> bool {
        let Ok(name) = ServerName::try_from(node) else { return false };
        webpki::EndEntityCert::try_from(&self.0).is_ok_and(|c| c.verify_is_valid_for_subject_name(&name).is_ok())
    }

    fn verify_chain(&self, roots: &RootCertStore) -> Result<(), webpki::Error> {
        verify_chain(&self.0, &[], roots, UnixTime::now())
    }
}

/// Whether `cert` chains to one of `roots` at `now` (no name checked: see the module docs).
fn verify_chain(
    cert: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
    roots: &RootCertStore,
    now: UnixTime,
) -> Result<(), webpki::Error> {
    let algs = provider().signature_verification_algorithms;
    webpki::EndEntityCert::try_from(cert)?
        .verify_for_usage(algs.all, &roots.roots, intermediates, now, webpki::KeyUsage::server_auth(), None, None)
        .map(|_| ())
}

/// The peer certificate and channel binding of an established TLS link.
pub fn peer_and_binding<IO>(conn: &rustls::ConnectionCommon<IO>) -> Option<(PeerCert, [u8; 32])> {
    let cert = conn.peer_certificates()?.first()?.clone().into_owned();
    Some((PeerCert(cert), binding(conn)?))
}

/// This link's channel binding: a TLS exporter value (RFC 8446 §7.5), the same on both ends.
pub fn binding<IO>(conn: &rustls::ConnectionCommon<IO>) -> Option<[u8; 32]> {
    conn.export_keying_material([0u8; 32], BINDING_LABEL, None).ok()
}

/// Checks the server's chain against the cluster CA, and no name (see the module docs).
#[derive(Debug)]
struct ChainOnly {
    roots: Arc<RootCertStore>,
}

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        verify_chain(end_entity, intermediates, &self.roots, now).map(|()| ServerCertVerified::assertion()).map_err(
            |e| rustls::Error::InvalidCertificate(rustls::CertificateError::Other(rustls::OtherError(Arc::new(e)))),
        )
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        // TLS 1.3 only (both configs); a 1.2 signature is never asked for.
        Err(rustls::Error::PeerIncompatible(rustls::PeerIncompatible::Tls12NotOffered))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &provider().signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        provider().signature_verification_algorithms.supported_schemes()
    }
}

// ----- making certificates (rcgen) -----

/// A TLS acceptor no client can ever finish a handshake with: it asks for a client certificate
/// issued by a CA made here and forgotten at once (its key is dropped when this returns, and was
/// never written anywhere). For ractor_cluster's own listener, which its `NodeServer` always
/// opens (on 127.0.0.1 and a random port) and which would otherwise take sessions on the cookie
/// alone, around the certificates and the identity gate: with this, every connection to it is
/// refused in the TLS handshake, whatever the client holds. Bulkhead's links come in through its
/// own listener (`crate::link`), never through that one.
pub fn sealed_acceptor() -> Result<tokio_rustls::TlsAcceptor, String> {
    let (ca, ca_key) = new_ca()?;
    let (cert, key) = issue(&ca, &ca_key, "sealed")?;
    drop(ca_key);
    Ok(TlsLinks::from_pem(ca.as_bytes(), cert.as_bytes(), key.as_bytes(), "sealed")?.acceptor)
}

/// A new cluster CA: (certificate PEM, private key PEM). Valid 10 years.
pub fn new_ca() -> Result<(String, String), String> {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};
    let key = KeyPair::generate().map_err(|e| e.to_string())?;
    let mut params = CertificateParams::default();
    let id = format!("{:08x}", rand::random::<u32>());
    params.distinguished_name.push(DnType::CommonName, format!("Bulkhead cluster CA {id}"));
    params.distinguished_name.push(DnType::OrganizationName, "Bulkhead");
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    (params.not_before, params.not_after) = validity(3650);
    let cert = params.self_signed(&key).map_err(|e| e.to_string())?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// A certificate for node `node`, issued by the CA: (certificate PEM, private key PEM). Valid 5 years.
pub fn issue(ca_cert_pem: &str, ca_key_pem: &str, node: &str) -> Result<(String, String), String> {
    use rcgen::{CertificateParams, DnType, ExtendedKeyUsagePurpose, KeyPair, KeyUsagePurpose};
    if ServerName::try_from(node).is_err() || node.contains('_') {
        return Err(format!("`{node}` cannot be a DNS name in a certificate: use letters, digits and inner hyphens"));
    }
    let ca_key = KeyPair::from_pem(ca_key_pem).map_err(|e| format!("the CA key: {e}"))?;
    let ca_params = CertificateParams::from_ca_cert_pem(ca_cert_pem).map_err(|e| format!("the CA certificate: {e}"))?;
    let ca = ca_params.self_signed(&ca_key).map_err(|e| format!("the CA certificate and key do not match: {e}"))?;
    let key = KeyPair::generate().map_err(|e| e.to_string())?;
    let mut params = CertificateParams::new(vec![node.to_string()]).map_err(|e| e.to_string())?;
    params.distinguished_name.push(DnType::CommonName, node);
    params.distinguished_name.push(DnType::OrganizationName, "Bulkhead");
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
    (params.not_before, params.not_after) = validity(5 * 365);
    let cert = params.signed_by(&key, &ca, &ca_key).map_err(|e| e.to_string())?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// From 30 days ago to `days` from now. Both ends check the other's certificate against their own
/// wall clock: a node whose clock runs behind must still accept a certificate issued today (the
/// cluster tolerates clocks days apart: tests/clocks.rs), so validity starts well before.
fn validity(days: i64) -> (time::OffsetDateTime, time::OffsetDateTime) {
    let now = time::OffsetDateTime::now_utc();
    (now - time::Duration::days(BACKDATED_DAYS), now + time::Duration::days(days))
}

/// How far back a new certificate is valid from.
pub const BACKDATED_DAYS: i64 = 30;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_node_certificate_names_its_node_only_and_chains_to_its_ca_only() {
        let (ca, ca_key) = new_ca().unwrap();
        let (cert, key) = issue(&ca, &ca_key, "n2").unwrap();
        let der = certs(cert.as_bytes(), "t").unwrap().remove(0);
        let peer = PeerCert(der);
        assert!(peer.names("n2"));
        assert!(!peer.names("n1") && !peer.names("n22") && !peer.names(""));
        assert!(peer.verify_chain(&roots(ca.as_bytes()).unwrap()).is_ok());
        let (other_ca, _) = new_ca().unwrap();
        assert!(peer.verify_chain(&roots(other_ca.as_bytes()).unwrap()).is_err());

        assert!(TlsLinks::from_pem(ca.as_bytes(), cert.as_bytes(), key.as_bytes(), "n2").is_ok());
        let e = TlsLinks::from_pem(ca.as_bytes(), cert.as_bytes(), key.as_bytes(), "n1").err().unwrap();
        assert!(e.contains("does not name this node `n1`"), "{e}");
        let e = TlsLinks::from_pem(other_ca.as_bytes(), cert.as_bytes(), key.as_bytes(), "n2").err().unwrap();
        assert!(e.contains("not issued by the CA"), "{e}");
        assert!(issue(&ca, &ca_key, "bad_name").unwrap_err().contains("DNS name"));
    }

    #[tokio::test]
    async fn both_ends_of_a_link_see_tls13_each_others_certificate_and_one_binding() {
        let (ca, ca_key) = new_ca().unwrap();
        let links = |n: &str| {
            let (c, k) = issue(&ca, &ca_key, n).unwrap();
            TlsLinks::from_pem(ca.as_bytes(), c.as_bytes(), k.as_bytes(), n).unwrap()
        };
        let (a, b) = (links("n1"), links("n2"));
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let (dialled, accepted) = tokio::join!(
            async {
                a.connector.connect(TlsLinks::dial_name(), tokio::net::TcpStream::connect(addr).await.unwrap()).await
            },
            async { b.acceptor.accept(l.accept().await.unwrap().0).await }
        );
        let (dialled, accepted) = (dialled.unwrap(), accepted.unwrap());
        assert_eq!(dialled.get_ref().1.protocol_version(), Some(rustls::ProtocolVersion::TLSv1_3));
        let (srv_cert, b1) = peer_and_binding::<rustls::client::ClientConnectionData>(dialled.get_ref().1).unwrap();
        let (cli_cert, b2) = peer_and_binding::<rustls::server::ServerConnectionData>(accepted.get_ref().1).unwrap();
        assert!(srv_cert.names("n2") && cli_cert.names("n1"));
        assert_eq!(b1, b2);

        // A client whose certificate is from another CA is refused by the acceptor.
        let (other_ca, other_key) = new_ca().unwrap();
        let (c, k) = issue(&other_ca, &other_key, "n1").unwrap();
        let stranger = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(ChainOnly { roots: Arc::new(roots(ca.as_bytes()).unwrap()) }))
            .with_client_auth_cert(
                certs(c.as_bytes(), "t").unwrap(),
                PrivateKeyDer::from_pem_slice(k.as_bytes()).unwrap(),
            )
            .unwrap();
        let stranger = tokio_rustls::TlsConnector::from(Arc::new(stranger));
        let (dialled, accepted) = tokio::join!(
            async {
                let s =
                    stranger.connect(TlsLinks::dial_name(), tokio::net::TcpStream::connect(addr).await.unwrap()).await;
                // TLS 1.3: the client learns of the refusal on its first read.
                match s {
                    Ok(mut s) => {
                        use tokio::io::AsyncReadExt;
                        let mut buf = [0u8; 1];
                        s.read(&mut buf).await.map(|_| ())
                    }
                    Err(e) => Err(e),
                }
            },
            async { b.acceptor.accept(l.accept().await.unwrap().0).await }
        );
        assert!(accepted.is_err());
        assert!(dialled.is_err());
    }

    /// The sealed acceptor refuses a client with a certificate of a real cluster CA, one with a
    /// certificate of its own making, and plain bytes.
    #[tokio::test]
    async fn the_sealed_acceptor_refuses_every_client() {
        let sealed = sealed_acceptor().unwrap();
        let (ca, ca_key) = new_ca().unwrap();
        let (c, k) = issue(&ca, &ca_key, "n1").unwrap();
        let n1 = TlsLinks::from_pem(ca.as_bytes(), c.as_bytes(), k.as_bytes(), "n1").unwrap();
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let (dialled, accepted) = tokio::join!(
            async {
                match n1
                    .connector
                    .connect(TlsLinks::dial_name(), tokio::net::TcpStream::connect(addr).await.unwrap())
                    .await
                {
                    Ok(mut s) => {
                        use tokio::io::AsyncReadExt;
                        let mut buf = [0u8; 1];
                        s.read(&mut buf).await.map(|_| ())
                    }
                    Err(e) => Err(e),
                }
            },
            async { sealed.accept(l.accept().await.unwrap().0).await }
        );
        assert!(accepted.is_err(), "a cluster certificate does not open the sealed listener");
        assert!(dialled.is_err());
        let (plain, accepted) = tokio::join!(
            async {
                use tokio::io::AsyncWriteExt;
                let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
                s.write_all(&[0, 0, 0, 0, 0, 0, 0, 9, 10, 7, 10, 5, 110, 49, 64, 104, 0]).await
            },
            async { sealed.accept(l.accept().await.unwrap().0).await }
        );
        let _ = plain;
        assert!(accepted.is_err(), "plain ractor handshake bytes are refused");
    }
}

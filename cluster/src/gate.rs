//! The identity gate: reads a new link's first frames, finds the node name the peer claims in
//! ractor_cluster's handshake, and refuses the link unless the peer's certificate names that node.
//!
//! ractor_cluster authenticates a peer by the cookie alone and believes the name it claims. With
//! mutual TLS, the certificate is the better witness: the gate sits between the TLS stream and
//! ractor_cluster's reader, sees the same bytes ractor_cluster will, and decides on the frame that
//! carries the claim (a client's `Name`, a server's `ServerChallenge`) *before* ractor_cluster has
//! it: a refused read is an error, so the claim is never decoded and no session is made. After the
//! claim is accepted the gate steps aside (no copy, no parse).
//!
//! The claim must also name a node of the shard map ([`Gate::knowing`]): a certificate of the
//! cluster CA for a node the map does not place anywhere opens nothing.
//!
//! [`Gate`] is the pure part (bytes in, a verdict out); [`GateRead`] is the thin `AsyncRead`
//! around it. Without TLS the gate still finds the claim (and garbage), with no certificate to
//! hold it against.
//!
//! The frames are ractor_cluster 0.16's: a big-endian `u64` length and a protobuf
//! `meta.NetworkMessage`, declared below with both of its `oneof`s in full (the messages the gate
//! does not read kept as bytes), so that a frame means the same to the gate as to ractor_cluster.
//! The real-process tests fail if ractor_cluster ever changes them.

use std::collections::BTreeSet;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, ReadBuf};

use crate::tls::PeerCert;

/// The largest frame accepted before the claim: the handshake's frames are a few dozen bytes.
pub const HANDSHAKE_FRAME_MAX: u64 = 16 * 1024;

// The shapes below mirror ractor_cluster's `meta.proto` and `auth.proto` exactly where it matters:
// both `oneof`s are `oneof`s here too, so a frame decodes to the same variant for the gate as for
// ractor_cluster (protobuf keeps the last variant on the wire). Messages the gate does not read
// are kept as bytes.

#[derive(Clone, PartialEq, prost::Message)]
struct NetworkMessage {
    #[prost(oneof = "Network", tags = "1, 2, 3")]
    message: Option<Network>,
}

#[derive(Clone, PartialEq, prost::Oneof)]
enum Network {
    #[prost(message, tag = "1")]
    Auth(AuthenticationMessage),
    #[prost(bytes = "vec", tag = "2")]
    Node(Vec<u8>),
    #[prost(bytes = "vec", tag = "3")]
    Control(Vec<u8>),
}

#[derive(Clone, PartialEq, prost::Message)]
struct AuthenticationMessage {
    #[prost(oneof = "Auth", tags = "1, 2, 3, 4, 5, 6")]
    msg: Option<Auth>,
}

#[derive(Clone, PartialEq, prost::Oneof)]
enum Auth {
    /// A dialling peer's `NameMessage`: its claim.
    #[prost(message, tag = "1")]
    Name(Named),
    #[prost(bytes = "vec", tag = "2")]
    ServerStatus(Vec<u8>),
    #[prost(bytes = "vec", tag = "3")]
    ClientStatus(Vec<u8>),
    /// An accepting peer's `Challenge`: its claim.
    #[prost(message, tag = "4")]
    ServerChallenge(Named),
    #[prost(bytes = "vec", tag = "5")]
    ClientChallenge(Vec<u8>),
    #[prost(bytes = "vec", tag = "6")]
    ServerAck(Vec<u8>),
}

#[derive(Clone, PartialEq, prost::Message)]
struct Named {
    /// `node@host`.
    #[prost(string, tag = "1")]
    name: String,
}

/// Why a link was refused at the gate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// Bytes that are not ractor_cluster's handshake (or one too long).
    Garbage(String),
    /// The peer claims `claimed`; its certificate names another node.
    WrongName { claimed: String },
    /// The peer claims `claimed`, a node the shard map does not name: whatever its certificate
    /// says, it has no place in this cluster.
    Stranger { claimed: String },
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::Garbage(why) => write!(f, "not a cluster handshake: {why}"),
            Refusal::WrongName { claimed } => {
                write!(f, "the peer claims to be node `{claimed}` but its certificate names another node")
            }
            Refusal::Stranger { claimed } => {
                write!(f, "the peer claims to be node `{claimed}`, which the shard map does not name")
            }
        }
    }
}

/// What the gate holds the claim against.
#[derive(Debug, Clone)]
pub enum Expect {
    /// The certificate the peer showed (TLS on).
    Cert(PeerCert),
    /// Nothing (TLS off): any claim passes.
    Nothing,
}

/// The pure gate: feed it the link's inbound bytes in order.
///
/// ractor_cluster's handshake is strict (any message out of order closes the session), and so is
/// the gate: on an accepted link the peer's first frame must be its `Name`; on a dialled link the
/// peer's first frame must be a `ServerStatus` and its second the `ServerChallenge` that carries
/// its name. That claim is the one ractor_cluster takes, and the gate judges it.
#[derive(Debug)]
pub struct Gate {
    expect: Expect,
    /// Whether the peer dialled us (its first frame is its `Name`).
    incoming: bool,
    buf: Vec<u8>,
    frames: usize,
    /// The accepted claim; once set, the gate is open.
    claimed: Option<String>,
    /// The nodes a claim may name (the shard map's); `None`: any.
    known: Option<Arc<BTreeSet<String>>>,
}

impl Gate {
    pub fn new(expect: Expect, incoming: bool) -> Self {
        Self { expect, incoming, buf: Vec::new(), frames: 0, claimed: None, known: None }
    }

    /// Refuses a claim of any node but these (before the certificate is looked at).
    pub fn knowing(mut self, known: Arc<BTreeSet<String>>) -> Self {
        self.known = Some(known);
        self
    }

    /// The accepted claim (the peer's node name), once there is one.
    pub fn claimed(&self) -> Option<&str> {
        self.claimed.as_deref()
    }

    /// Takes the next inbound bytes. `Ok(true)` the moment the claim is accepted, `Ok(false)`
    /// while it has not come yet or after the gate opened, `Err` to refuse the link.
    pub fn feed(&mut self, bytes: &[u8]) -> Result<bool, Refusal> {
        if self.claimed.is_some() {
            return Ok(false);
        }
        self.buf.extend_from_slice(bytes);
        loop {
            let Some(head) = self.buf.get(..8) else { return Ok(false) };
            let len = u64::from_be_bytes(head.try_into().map_err(|_| Refusal::Garbage("short header".into()))?);
            if len > HANDSHAKE_FRAME_MAX {
                return Err(Refusal::Garbage(format!("a {len}-byte frame before the handshake")));
            }
            let end = 8 + len as usize;
            if self.buf.len() < end {
                return Ok(false);
            }
            let msg = <NetworkMessage as prost::Message>::decode(&self.buf[8..end])
                .map_err(|e| Refusal::Garbage(format!("undecodable frame: {e}")))?;
            self.buf.drain(..end);
            self.frames += 1;
            let auth = match msg.message {
                Some(Network::Auth(AuthenticationMessage { msg: Some(a) })) => a,
                _ => return Err(Refusal::Garbage("a message that is not the cluster handshake".into())),
            };
            let claim = match (self.incoming, self.frames, auth) {
                (true, 1, Auth::Name(n)) => n.name,
                (false, 1, Auth::ServerStatus(_)) => continue,
                (false, 2, Auth::ServerChallenge(n)) => n.name,
                _ => return Err(Refusal::Garbage("a handshake message out of order".into())),
            };
            let claimed = claim.split('@').next().unwrap_or_default().to_string();
            if self.known.as_ref().is_some_and(|k| !k.contains(&claimed)) {
                return Err(Refusal::Stranger { claimed });
            }
            if let Expect::Cert(cert) = &self.expect {
                if !cert.names(&claimed) {
                    return Err(Refusal::WrongName { claimed });
                }
            }
            self.claimed = Some(claimed);
            self.buf = Vec::new();
            return Ok(true);
        }
    }
}

/// What a link does when its gate decides (counts, records who the peer is).
pub trait GateEvents: Send + Sync + 'static {
    fn claimed(&self, node: &str);
    fn refused(&self, why: &Refusal);
}

/// A read half whose bytes pass the [`Gate`] until it opens.
pub struct GateRead<R> {
    inner: R,
    gate: Gate,
    events: Box<dyn GateEvents>,
}

impl<R> GateRead<R> {
    pub fn new(inner: R, gate: Gate, events: Box<dyn GateEvents>) -> Self {
        Self { inner, gate, events }
    }
}

impl<R: AsyncRead + Unpin> AsyncRead for GateRead<R> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) if this.gate.claimed().is_none() => {
                // The refused bytes are never handed on: the error replaces this read.
                match this.gate.feed(&buf.filled()[before..]) {
                    Ok(true) => {
                        this.events.claimed(this.gate.claimed().unwrap_or_default());
                        Poll::Ready(Ok(()))
                    }
                    Ok(false) => Poll::Ready(Ok(())),
                    Err(why) => {
                        this.events.refused(&why);
                        Poll::Ready(Err(io::Error::new(io::ErrorKind::PermissionDenied, why.to_string())))
                    }
                }
            }
            other => other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    fn frame(msg: Option<Network>) -> Vec<u8> {
        let body = NetworkMessage { message: msg }.encode_to_vec();
        let mut f = (body.len() as u64).to_be_bytes().to_vec();
        f.extend(body);
        f
    }

    fn auth(a: Auth) -> Vec<u8> {
        frame(Some(Network::Auth(AuthenticationMessage { msg: Some(a) })))
    }

    fn name_frame(name: &str) -> Vec<u8> {
        auth(Auth::Name(Named { name: format!("{name}@127.0.0.1") }))
    }

    fn cert_for(node: &str) -> PeerCert {
        use rustls::pki_types::pem::PemObject;
        let (ca, key) = crate::tls::new_ca().unwrap();
        let (cert, _) = crate::tls::issue(&ca, &key, node).unwrap();
        PeerCert(rustls::pki_types::CertificateDer::from_pem_slice(cert.as_bytes()).unwrap())
    }

    #[test]
    fn a_claim_that_the_certificate_names_opens_the_gate_byte_by_byte_too() {
        let mut g = Gate::new(Expect::Cert(cert_for("n2")), true);
        let bytes = name_frame("n2");
        let (last, rest) = bytes.split_last().unwrap();
        for b in rest {
            assert_eq!(g.feed(&[*b]), Ok(false));
        }
        assert_eq!(g.feed(&[*last]), Ok(true));
        assert_eq!(g.claimed(), Some("n2"));
        // Open: anything passes, unparsed.
        assert_eq!(g.feed(b"\xff\xff\xff\xff\xff\xff\xff\xffgarbage"), Ok(false));
    }

    #[test]
    fn a_claim_for_another_node_is_refused() {
        let mut g = Gate::new(Expect::Cert(cert_for("n3")), true);
        assert_eq!(g.feed(&name_frame("n1")), Err(Refusal::WrongName { claimed: "n1".into() }));
        assert_eq!(g.claimed(), None);
    }

    #[test]
    fn a_dialled_peer_claims_in_its_challenge_after_its_status() {
        let status = auth(Auth::ServerStatus(vec![]));
        let challenge = auth(Auth::ServerChallenge(Named { name: "n2@10.0.0.12".into() }));
        let mut g = Gate::new(Expect::Cert(cert_for("n2")), false);
        assert_eq!(g.feed(&[status.clone(), challenge.clone()].concat()), Ok(true));
        assert_eq!(g.claimed(), Some("n2"));
        // Out of order, as ractor_cluster would close it too: a challenge first, or a Name.
        assert!(Gate::new(Expect::Nothing, false).feed(&challenge).is_err());
        assert!(Gate::new(Expect::Nothing, false).feed(&name_frame("n2")).is_err());
        assert!(Gate::new(Expect::Nothing, true).feed(&status).is_err());
    }

    /// The frame a certified n3 would send to slip a claim for n2 past a gate that read fields
    /// one by one: a `Name` for n3, then a `node` field, so that ractor_cluster (whose `oneof`
    /// keeps the last field) sees a node message and waits for the real claim. The gate reads it
    /// as ractor_cluster does: a node message before the handshake, refused.
    #[test]
    fn a_frame_that_ends_in_another_variant_is_judged_by_that_variant() {
        let mut bytes = AuthenticationMessage { msg: Some(Auth::Name(Named { name: "n3@h".into() })) }.encode_to_vec();
        let mut body = Vec::new();
        prost::encoding::encode_key(1, prost::encoding::WireType::LengthDelimited, &mut body);
        prost::encoding::encode_varint(bytes.len() as u64, &mut body);
        body.append(&mut bytes);
        prost::encoding::bytes::encode(2, &Vec::<u8>::new(), &mut body);
        let mut f = (body.len() as u64).to_be_bytes().to_vec();
        f.extend(body);
        let mut g = Gate::new(Expect::Cert(cert_for("n3")), true);
        assert!(matches!(g.feed(&f), Err(Refusal::Garbage(_))));
        assert_eq!(g.claimed(), None);
    }

    #[test]
    fn garbage_an_early_message_or_a_huge_frame_is_refused() {
        let http = b"GET / HTTP/1.1\r\nhost: x\r\n\r\n";
        assert!(matches!(Gate::new(Expect::Nothing, true).feed(http), Err(Refusal::Garbage(_))));
        let huge = (HANDSHAKE_FRAME_MAX + 1).to_be_bytes();
        assert!(matches!(Gate::new(Expect::Nothing, true).feed(&huge), Err(Refusal::Garbage(_))));
        let early = frame(Some(Network::Node(vec![1, 2, 3])));
        assert!(matches!(Gate::new(Expect::Nothing, true).feed(&early), Err(Refusal::Garbage(_))));
        let bad = [&8u64.to_be_bytes()[..], &[0xff; 8]].concat();
        assert!(matches!(Gate::new(Expect::Nothing, true).feed(&bad), Err(Refusal::Garbage(_))));
        // Without TLS any well-formed claim passes.
        let mut g = Gate::new(Expect::Nothing, true);
        assert_eq!(g.feed(&name_frame("n9")), Ok(true));
    }

    /// A node the shard map does not name is refused even with a certificate that names it: a
    /// certificate of the cluster CA is not a place in the cluster. Without TLS, the same.
    #[test]
    fn a_claim_of_a_node_outside_the_shard_map_is_refused_whatever_the_certificate() {
        let known: Arc<BTreeSet<String>> = Arc::new(["n1", "n2", "n3"].map(String::from).into());
        let mut g = Gate::new(Expect::Cert(cert_for("n4")), true).knowing(known.clone());
        assert_eq!(g.feed(&name_frame("n4")), Err(Refusal::Stranger { claimed: "n4".into() }));
        let mut g = Gate::new(Expect::Nothing, true).knowing(known.clone());
        assert_eq!(g.feed(&name_frame("n4")), Err(Refusal::Stranger { claimed: "n4".into() }));
        let mut g = Gate::new(Expect::Cert(cert_for("n2")), true).knowing(known);
        assert_eq!(g.feed(&name_frame("n2")), Ok(true));
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_bytes_never_panic_and_never_open_a_certificate_gate_for_a_wrong_name(
            bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..512),
        ) {
            let _ = Gate::new(Expect::Nothing, true).feed(&bytes);
            let _ = Gate::new(Expect::Nothing, false).feed(&bytes);
            let mut g = Gate::new(Expect::Cert(cert_for("n1")), true);
            let mut all = bytes.clone();
            all.extend(name_frame("n2"));
            proptest::prop_assert!(g.feed(&all) != Ok(true));
        }
    }
}

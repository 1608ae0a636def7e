//! Cluster links: the TCP listener and dial path this node owns, and the switch that can cut them.
//!
//! A link is TCP, then TLS 1.3 with certificates on both sides (`crate::tls`, unless `tls = "off"`),
//! then the identity gate (`crate::gate`: the peer's claimed name must be the one its certificate
//! gives), then the fault switch below, then ractor_cluster's session.
//!
//! ractor_cluster can run its own listener, but then the sockets are out of our reach. Bulkhead
//! accepts and dials itself and hands ractor_cluster each connection as an external stream
//! ([`LinkStream`]). Every byte of every cluster link, in both directions, therefore passes
//! through one place where a fault can be injected: [`LinkFaults::set_cut`] stops every link of
//! this node at once, in both directions, with no FIN and no RST (see [`LinkFaults`]), which is what
//! a pulled cable or a dropped VLAN looks like to the peers: silence. It is how `bulkhead-chaos`
//! partitions a node, through `POST /admin/partition`, which exists only when the node runs with
//! `fault_injection = true`.
//!
//! Why not network namespaces: they need root (CAP_NET_ADMIN) on every machine, and CI containers
//! usually lack it. Why not a proxy process between the nodes: every node would have to dial its
//! peers at addresses other than the ones they advertise. The cut lives in the isolated node's own
//! process, so it works the same on a laptop and on bare metal, with no privileges.
//!
//! Caveat: the cut is all-or-nothing per node (this node against every peer), which is the fault
//! the chaos scenarios need; the node's HTTP port is not cut, so the partitioned node keeps
//! answering its clients with whatever it can still do alone.

use std::any::Any;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};

use ractor_cluster::{BoxRead, BoxWrite, ClusterBidiStream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use crate::gate::{Gate, GateEvents, GateRead};
use crate::tls::TlsLinks;

/// The fault switch shared by every link of one node.
///
/// While cut, reads and writes stay pending (bytes wait in the kernel's buffers, as they would
/// behind a real partition while TCP retransmits), and sockets that are dropped or accepted meanwhile
/// are kept open, unread, until the heal: a peer sees silence, never a FIN or an RST. A short cut
/// that no detector notices therefore loses nothing; a long one ends in the detectors closing the
/// sessions on both sides.
#[derive(Default)]
pub struct LinkFaults {
    cut: AtomicBool,
    /// Tasks waiting on a cut link, woken at the heal.
    wakers: Mutex<Vec<Waker>>,
    /// Socket halves dropped, and connections accepted, while cut: closed at the heal.
    held: Mutex<Vec<Box<dyn Any + Send>>>,
}

impl std::fmt::Debug for LinkFaults {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LinkFaults").field("cut", &self.is_cut()).finish()
    }
}

impl LinkFaults {
    pub fn is_cut(&self) -> bool {
        self.cut.load(Ordering::SeqCst)
    }

    /// Cuts (`true`) or heals (`false`) every link of this node, present and future.
    pub fn set_cut(&self, cut: bool) {
        self.cut.store(cut, Ordering::SeqCst);
        if !cut {
            let wakers = self.wakers.lock().map(|mut w| std::mem::take(&mut *w)).unwrap_or_default();
            wakers.into_iter().for_each(Waker::wake);
            let held = self.held.lock().map(|mut h| std::mem::take(&mut *h)).unwrap_or_default();
            drop(held);
        }
    }

    /// Keeps `thing` (a socket or half of one) open until the heal, if the links are cut; gives it
    /// back otherwise.
    pub fn hold_if_cut<T: Any + Send>(&self, thing: T) -> Option<T> {
        if !self.is_cut() {
            return Some(thing);
        }
        match self.held.lock() {
            Ok(mut h) => {
                h.push(Box::new(thing));
                None
            }
            Err(_) => Some(thing),
        }
    }

    /// Registers `cx` to be woken at the heal. Returns whether the link is (still) cut: checked
    /// again after registering, so a heal in between is not missed.
    fn park(&self, cx: &Context<'_>) -> bool {
        if !self.is_cut() {
            return false;
        }
        if let Ok(mut w) = self.wakers.lock() {
            if !w.iter().any(|k| k.will_wake(cx.waker())) {
                w.push(cx.waker().clone());
            }
        }
        self.is_cut()
    }
}

/// The transport under a link.
pub enum LinkIo {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::TlsStream<TcpStream>>),
}

type DynRead = Box<dyn AsyncRead + Send + Unpin>;
type DynWrite = Box<dyn AsyncWrite + Send + Unpin>;

/// One cluster connection as ractor_cluster sees it: TCP or TLS, behind the identity gate and the
/// fault switch.
pub struct LinkStream {
    io: LinkIo,
    faults: Arc<LinkFaults>,
    /// Unique per link: the remote socket (incoming) or the dialled address plus `#n` (outgoing).
    /// ractor_cluster reports it as the session's `peer_addr`.
    label: String,
    /// `None` only in tests of the switch itself: bytes pass unparsed.
    gate: Option<(Gate, Box<dyn GateEvents>)>,
    /// Held while the link lives (both halves): this node's connection cap.
    slot: Option<Arc<tokio::sync::OwnedSemaphorePermit>>,
}

/// Dials `tcp` as a TLS client of `tls` and wraps it as a link ractor_cluster can use, with no
/// gate and no fault switch: for tools and tests that play a peer (the node's own dialler is
/// `node`'s).
pub async fn dial_tls(tls: &TlsLinks, tcp: tokio::net::TcpStream) -> std::io::Result<LinkStream> {
    let label = tcp.peer_addr().map(|a| a.to_string()).unwrap_or_default();
    let s = tls.connector.connect(TlsLinks::dial_name(), tcp).await?;
    let io = LinkIo::Tls(Box::new(tokio_rustls::TlsStream::from(s)));
    Ok(LinkStream::new(io, Arc::new(LinkFaults::default()), label, None, None))
}

impl LinkStream {
    pub fn new(
        io: LinkIo,
        faults: Arc<LinkFaults>,
        label: String,
        gate: Option<(Gate, Box<dyn GateEvents>)>,
        slot: Option<tokio::sync::OwnedSemaphorePermit>,
    ) -> LinkStream {
        // Small frames (heartbeats, asks) must not wait for Nagle.
        let tcp = match &io {
            LinkIo::Plain(t) => t,
            LinkIo::Tls(t) => t.get_ref().0,
        };
        let _ = tcp.set_nodelay(true);
        LinkStream { io, faults, label, gate, slot: slot.map(Arc::new) }
    }
}

/// The address part of a link label (`10.0.0.12:7101#3` -> `10.0.0.12:7101`).
pub fn label_addr(label: &str) -> &str {
    label.split('#').next().unwrap_or(label)
}

impl ClusterBidiStream for LinkStream {
    fn split(self: Box<Self>) -> (BoxRead, BoxWrite) {
        let (r, w): (DynRead, DynWrite) = match self.io {
            LinkIo::Plain(t) => {
                let (r, w) = t.into_split();
                (Box::new(r), Box::new(w))
            }
            LinkIo::Tls(t) => {
                let (r, w) = tokio::io::split(*t);
                (Box::new(r), Box::new(w))
            }
        };
        let r: DynRead = match self.gate {
            Some((gate, events)) => Box::new(GateRead::new(r, gate, events)),
            None => r,
        };
        (
            Box::new(FaultRead { inner: Some(r), faults: self.faults.clone(), _slot: self.slot.clone() }),
            Box::new(FaultWrite { inner: Some(w), faults: self.faults, _slot: self.slot }),
        )
    }

    fn peer_label(&self) -> Option<String> {
        Some(self.label.clone())
    }
}

struct FaultRead<R: Any + Send> {
    /// Always `Some` until dropped.
    inner: Option<R>,
    faults: Arc<LinkFaults>,
    _slot: Option<Arc<tokio::sync::OwnedSemaphorePermit>>,
}

impl<R: AsyncRead + Unpin + Any + Send> AsyncRead for FaultRead<R> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        if self.faults.park(cx) {
            return Poll::Pending;
        }
        match self.inner.as_mut() {
            Some(r) => Pin::new(r).poll_read(cx, buf),
            None => Poll::Ready(Ok(())),
        }
    }
}

impl<R: Any + Send> Drop for FaultRead<R> {
    fn drop(&mut self) {
        if let Some(r) = self.inner.take() {
            drop(self.faults.hold_if_cut(r));
        }
    }
}

struct FaultWrite<W: Any + Send> {
    inner: Option<W>,
    faults: Arc<LinkFaults>,
    _slot: Option<Arc<tokio::sync::OwnedSemaphorePermit>>,
}

impl<W: AsyncWrite + Unpin + Any + Send> AsyncWrite for FaultWrite<W> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        if self.faults.park(cx) {
            return Poll::Pending;
        }
        match self.inner.as_mut() {
            Some(w) => Pin::new(w).poll_write(cx, buf),
            None => Poll::Ready(Err(io::ErrorKind::NotConnected.into())),
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.faults.park(cx) {
            return Poll::Pending;
        }
        match self.inner.as_mut() {
            Some(w) => Pin::new(w).poll_flush(cx),
            None => Poll::Ready(Ok(())),
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.faults.park(cx) {
            return Poll::Pending;
        }
        match self.inner.as_mut() {
            Some(w) => Pin::new(w).poll_shutdown(cx),
            None => Poll::Ready(Ok(())),
        }
    }
}

impl<W: Any + Send> Drop for FaultWrite<W> {
    fn drop(&mut self) {
        // Dropping a tokio write half sends a FIN: not while cut.
        if let Some(w) = self.inner.take() {
            drop(self.faults.hold_if_cut(w));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    async fn pair(faults: Arc<LinkFaults>) -> (BoxRead, BoxWrite, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let (a, b) = tokio::join!(TcpStream::connect(addr), l.accept());
        let link = Box::new(LinkStream::new(LinkIo::Plain(a.unwrap()), faults, addr.to_string(), None, None));
        let (r, w) = link.split();
        (r, w, b.unwrap().0)
    }

    #[tokio::test]
    async fn a_cut_holds_bytes_both_ways_without_a_fin_and_the_heal_delivers_them() {
        let faults = Arc::new(LinkFaults::default());
        let (mut r, mut w, mut peer) = pair(faults.clone()).await;
        w.write_all(b"ping").await.unwrap();
        let mut got = [0u8; 4];
        peer.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"ping");

        faults.set_cut(true);
        let quiet = std::time::Duration::from_millis(50);
        // Our writes do not leave, the peer's bytes are not delivered.
        assert!(tokio::time::timeout(quiet, w.write_all(b"held")).await.is_err());
        peer.write_all(b"pong").await.unwrap();
        assert!(tokio::time::timeout(quiet, r.read_exact(&mut got)).await.is_err());
        // Dropping our side while cut sends no FIN: the peer hears nothing.
        drop(w);
        assert!(tokio::time::timeout(quiet, peer.read(&mut got)).await.is_err(), "the peer saw data or a FIN");

        faults.set_cut(false);
        // The bytes that waited arrive intact, and the held write half closes only now.
        r.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"pong");
        let mut rest = Vec::new();
        tokio::time::timeout(std::time::Duration::from_secs(2), peer.read_to_end(&mut rest)).await.unwrap().unwrap();
        assert!(rest.is_empty(), "{rest:?}");
    }
}

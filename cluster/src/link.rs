//! Cluster links: the TCP listener and dial path this node owns, and the switch that can cut them.
//!
//! ractor_cluster can run its own listener, but then the sockets are out of our reach. Bulkhead
//! accepts and dials itself and hands ractor_cluster each connection as an external stream
//! ([`LinkStream`]). Every byte of every cluster link, in both directions, therefore passes
//! through one place where a fault can be injected: [`LinkFaults::cut`] turns all of this node's
//! links into a black hole (writes vanish, reads never deliver, no FIN, no RST), which is what a
//! pulled cable or a dropped VLAN looks like to the peers. It is how `bulkhead-chaos` partitions a
//! node, through `POST /admin/partition`, which exists only when the node runs with
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

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use ractor_cluster::{BoxRead, BoxWrite, ClusterBidiStream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// The fault switch shared by every link of one node.
#[derive(Debug, Default)]
pub struct LinkFaults {
    cut: AtomicBool,
}

impl LinkFaults {
    pub fn is_cut(&self) -> bool {
        self.cut.load(Ordering::Relaxed)
    }

    /// Cuts (`true`) or heals (`false`) every link of this node, present and future.
    pub fn set_cut(&self, cut: bool) {
        self.cut.store(cut, Ordering::Relaxed);
    }
}

/// One cluster connection as ractor_cluster sees it: a TCP stream behind the fault switch.
pub struct LinkStream {
    tcp: TcpStream,
    faults: Arc<LinkFaults>,
    /// The address dialled (outgoing) or the remote socket (incoming): what the session reports.
    label: String,
}

impl LinkStream {
    pub fn new(tcp: TcpStream, faults: Arc<LinkFaults>, label: String) -> LinkStream {
        // Small frames (heartbeats, asks) must not wait for Nagle.
        let _ = tcp.set_nodelay(true);
        LinkStream { tcp, faults, label }
    }
}

impl ClusterBidiStream for LinkStream {
    fn split(self: Box<Self>) -> (BoxRead, BoxWrite) {
        let (r, w) = self.tcp.into_split();
        (
            Box::new(FaultRead { inner: r, faults: self.faults.clone() }),
            Box::new(FaultWrite { inner: w, faults: self.faults }),
        )
    }

    fn peer_label(&self) -> Option<String> {
        Some(self.label.clone())
    }
}

struct FaultRead<R> {
    inner: R,
    faults: Arc<LinkFaults>,
}

impl<R: AsyncRead + Unpin> AsyncRead for FaultRead<R> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        loop {
            if !self.faults.is_cut() {
                return Pin::new(&mut self.inner).poll_read(cx, buf);
            }
            // Cut: drain and drop what arrives, so the peer sees a silent link rather than a full
            // window. EOF or an error is not passed on either: a partition never says goodbye. The
            // session ends when a detector declares the peer down and closes it.
            let mut scratch = [0u8; 4096];
            let mut sink = ReadBuf::new(&mut scratch);
            match Pin::new(&mut self.inner).poll_read(cx, &mut sink) {
                Poll::Ready(Ok(())) if !sink.filled().is_empty() => continue,
                Poll::Ready(_) => return Poll::Pending,
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

struct FaultWrite<W> {
    inner: W,
    faults: Arc<LinkFaults>,
}

impl<W: AsyncWrite + Unpin> AsyncWrite for FaultWrite<W> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        if self.faults.is_cut() {
            return Poll::Ready(Ok(buf.len()));
        }
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.faults.is_cut() {
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.faults.is_cut() {
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_shutdown(cx)
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
        let link = Box::new(LinkStream::new(a.unwrap(), faults, addr.to_string()));
        let (r, w) = link.split();
        (r, w, b.unwrap().0)
    }

    #[tokio::test]
    async fn passes_bytes_until_cut_then_swallows_both_ways() {
        let faults = Arc::new(LinkFaults::default());
        let (mut r, mut w, mut peer) = pair(faults.clone()).await;
        w.write_all(b"ping").await.unwrap();
        let mut got = [0u8; 4];
        peer.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"ping");
        peer.write_all(b"pong").await.unwrap();
        r.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"pong");

        faults.set_cut(true);
        w.write_all(b"lost").await.unwrap();
        peer.write_all(b"gone").await.unwrap();
        drop(peer); // even the FIN must not show
        let read = tokio::time::timeout(std::time::Duration::from_millis(50), r.read(&mut got)).await;
        assert!(read.is_err(), "a cut link delivered {read:?}");
    }
}

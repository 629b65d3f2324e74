//! The axum adapter: [`WorkerListener`] as an `axum::serve::Listener`, whose streams
//! report their first read so that a drain waits until axum has started serving them.

use std::io;

use tokio::net::TcpStream;
use tokio::sync::watch;

use super::{ClientInfo, WorkerListener};

/// A connection as axum gets it: a `TcpStream` that reports its first read, so that a
/// drain does not end before axum has started serving it.
#[cfg(feature = "axum")]
#[derive(Debug)]
pub struct WorkerStream {
    inner: TcpStream,
    unread: Option<UnreadMark>,
}

/// Counts a connection as unread until dropped.
#[cfg(feature = "axum")]
#[derive(Debug)]
struct UnreadMark(watch::Sender<usize>);

#[cfg(feature = "axum")]
impl UnreadMark {
    fn new(unread: &watch::Sender<usize>) -> UnreadMark {
        unread.send_modify(|n| *n += 1);
        UnreadMark(unread.clone())
    }
}

#[cfg(feature = "axum")]
impl Drop for UnreadMark {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n -= 1);
    }
}

#[cfg(feature = "axum")]
impl WorkerStream {
    /// The TCP stream inside.
    pub fn get_ref(&self) -> &TcpStream {
        &self.inner
    }
}

#[cfg(feature = "axum")]
impl tokio::io::AsyncRead for WorkerStream {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        let polled = std::pin::Pin::new(&mut self.inner).poll_read(cx, buf);
        if polled.is_ready() {
            self.unread = None;
        }
        polled
    }
}

#[cfg(feature = "axum")]
impl tokio::io::AsyncWrite for WorkerStream {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> std::task::Poll<io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(feature = "axum")]
impl axum::serve::Listener for WorkerListener {
    type Io = WorkerStream;
    type Addr = ClientInfo;

    async fn accept(&mut self) -> (WorkerStream, ClientInfo) {
        match WorkerListener::accept(self).await {
            Some((inner, client)) => {
                let unread = Some(UnreadMark::new(&self.unread));
                (WorkerStream { inner, unread }, client)
            }
            // Drained: axum's graceful shutdown (on `drained()`) stops calling us.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> io::Result<ClientInfo> {
        Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "a worker has no address of its own: connections arrive from the dispatcher",
        ))
    }
}

#[cfg(feature = "axum")]
impl axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, WorkerListener>>
    for ClientInfo
{
    fn connect_info(stream: axum::serve::IncomingStream<'_, WorkerListener>) -> ClientInfo {
        stream.remote_addr().clone()
    }
}

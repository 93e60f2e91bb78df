//! Connections that make no progress are closed: a client that stops sending its request (or
//! stops reading its answer) for longer than the idle limit loses the connection, and so does
//! one that trickles its request (a header line every few seconds) for longer than that limit
//! without getting an answer, so stalled or slow clients cannot hold the server's sockets
//! forever. The limit is longer than the request deadline, which every answer meets, so a
//! connection waiting for its answer is never cut. A connection that has sent nothing at all is
//! closed sooner, after [`FIRST_BYTE`] (as Apache's `RequestReadTimeout header=20`): sockets
//! opened and left silent cannot hold the server's file descriptors for the whole idle limit.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::{Instant, Sleep};

/// How long a new connection may stay silent before its first byte (at most the idle limit).
pub const FIRST_BYTE: Duration = Duration::from_secs(20);

/// A TCP listener whose connections are [`IdleLimited`].
pub struct IdleLimitListener {
    pub listener: TcpListener,
    pub idle: Duration,
}

impl axum::serve::Listener for IdleLimitListener {
    type Io = IdleLimited<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        let (io, addr) = axum::serve::Listener::accept(&mut self.listener).await;
        (IdleLimited::new(io, self.idle), addr)
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }
}

/// A connection that fails with `TimedOut` once neither a read nor a write has moved a byte
/// for `idle` while one of them was waiting, or once `idle` has passed since the first byte of a
/// request without a byte of answer written.
pub struct IdleLimited<T> {
    inner: T,
    idle: Duration,
    timer: Pin<Box<Sleep>>,
    /// Set by the first byte read after the last byte written: the request's deadline.
    request: Option<Pin<Box<Sleep>>>,
    /// A byte has been read: the idle limit applies, no longer [`FIRST_BYTE`].
    heard: bool,
}

impl<T> IdleLimited<T> {
    pub fn new(inner: T, idle: Duration) -> Self {
        Self {
            inner,
            idle,
            timer: Box::pin(tokio::time::sleep(idle.min(FIRST_BYTE))),
            request: None,
            heard: false,
        }
    }

    /// The connection inside.
    pub fn get_ref(&self) -> &T {
        &self.inner
    }

    fn progressed(&mut self) {
        let next = Instant::now() + self.idle;
        self.timer.as_mut().reset(next);
    }

    /// Bytes of a request arrived: its deadline starts with the first of them.
    fn read_progressed(&mut self) {
        self.heard = true;
        self.progressed();
        if self.request.is_none() {
            self.request = Some(Box::pin(tokio::time::sleep(self.idle)));
        }
    }

    /// Bytes of an answer left: the request is answered.
    fn write_progressed(&mut self) {
        self.progressed();
        self.request = None;
    }

    /// The request's deadline has passed without an answer.
    fn request_expired(&self) -> bool {
        self.request
            .as_ref()
            .is_some_and(|r| Instant::now() >= r.deadline())
    }

    fn timed_out(&self, what: &str) -> io::Error {
        let message = match self.heard {
            true => format!("the client {what} for {:?}", self.idle),
            false => format!(
                "the client sent nothing for {:?}",
                self.idle.min(FIRST_BYTE)
            ),
        };
        io::Error::new(io::ErrorKind::TimedOut, message)
    }

    /// The inner I/O is waiting: fails once the idle limit or the request's deadline has passed.
    fn poll_stalled<R>(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<R>> {
        if self.timer.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Err(self.timed_out("made no progress")));
        }
        if let Some(request) = &mut self.request {
            if request.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Err(self.timed_out("sent a request without completing it")));
            }
        }
        Poll::Pending
    }

    /// Passes a write's result on, resetting the timer when bytes moved.
    fn on_write(
        &mut self,
        cx: &mut Context<'_>,
        r: Poll<io::Result<usize>>,
    ) -> Poll<io::Result<usize>> {
        match r {
            Poll::Ready(Ok(n)) if n > 0 => {
                self.write_progressed();
                Poll::Ready(Ok(n))
            }
            Poll::Pending => self.poll_stalled(cx),
            other => other,
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for IdleLimited<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            // A request trickling in past its deadline: bytes keep coming, the answer never.
            Poll::Ready(Ok(())) if this.request_expired() => {
                Poll::Ready(Err(this.timed_out("sent a request without completing it")))
            }
            Poll::Ready(r) => {
                if buf.filled().len() > before {
                    this.read_progressed();
                }
                Poll::Ready(r)
            }
            Poll::Pending => this.poll_stalled(cx),
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for IdleLimited<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_write(cx, buf);
        this.on_write(cx, r)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        this.on_write(cx, r)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_flush(cx) {
            Poll::Pending => this.poll_stalled(cx),
            r => r,
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_shutdown(cx) {
            Poll::Pending => this.poll_stalled(cx),
            r => r,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test(start_paused = true)]
    async fn a_stalled_peer_times_out_and_progress_resets_the_clock() {
        let (near, mut far) = tokio::io::duplex(64);
        let mut io = IdleLimited::new(near, Duration::from_secs(10));
        let mut buf = [0u8; 8];
        // A request every 6 s, each answered, keeps it alive past 10 s in all.
        for _ in 0..3 {
            tokio::time::advance(Duration::from_secs(6)).await;
            far.write_all(b"x").await.unwrap();
            assert_eq!(io.read(&mut buf).await.unwrap(), 1);
            io.write_all(b"y").await.unwrap();
            far.read_exact(&mut buf[..1]).await.unwrap();
        }
        // Then silence: the read fails once 10 s have passed without a byte.
        let err = io.read(&mut buf).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
    }

    /// A socket opened and left silent is closed after [`FIRST_BYTE`], long before the idle
    /// limit; once it has sent a byte, the idle limit is what applies.
    #[tokio::test(start_paused = true)]
    async fn a_connection_that_sends_nothing_is_closed_after_the_first_byte_limit() {
        let idle = Duration::from_secs(125);
        let (near, _far) = tokio::io::duplex(64);
        let mut io = IdleLimited::new(near, idle);
        let mut buf = [0u8; 8];
        let start = Instant::now();
        let err = io.read(&mut buf).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert_eq!(start.elapsed(), FIRST_BYTE);
        assert!(err.to_string().contains("sent nothing for 20s"), "{err}");

        let (near, mut far) = tokio::io::duplex(64);
        let mut io = IdleLimited::new(near, idle);
        far.write_all(b"x").await.unwrap();
        assert_eq!(io.read(&mut buf).await.unwrap(), 1);
        io.write_all(b"answer").await.unwrap();
        let start = Instant::now();
        let err = io.read(&mut buf).await.unwrap_err();
        assert_eq!(start.elapsed(), idle, "between requests: the idle limit");
        assert!(err.to_string().contains("made no progress"), "{err}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_trickling_in_without_end_times_out_and_an_answer_resets_it() {
        let (near, mut far) = tokio::io::duplex(64);
        let mut io = IdleLimited::new(near, Duration::from_secs(10));
        let mut buf = [0u8; 8];
        // A byte every 4 s for 8 s, then the answer: the next request starts a new deadline.
        for _ in 0..2 {
            far.write_all(b"x").await.unwrap();
            assert_eq!(io.read(&mut buf).await.unwrap(), 1);
            tokio::time::advance(Duration::from_secs(4)).await;
        }
        io.write_all(b"answer").await.unwrap();
        // Now a byte every 4 s with no answer: cut once 10 s have passed since the first one,
        // though no single gap reached the idle limit.
        let mut cut = None;
        for i in 0..5 {
            far.write_all(b"x").await.unwrap();
            match io.read(&mut buf).await {
                Ok(n) => assert_eq!(n, 1),
                Err(e) => {
                    assert_eq!(e.kind(), io::ErrorKind::TimedOut);
                    cut = Some(i);
                    break;
                }
            }
            tokio::time::advance(Duration::from_secs(4)).await;
        }
        assert_eq!(cut, Some(3), "cut at the byte after 12 s");
    }
}

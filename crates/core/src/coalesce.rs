//! Fewer, larger writes on a busy HTTP/2 connection.
//!
//! An HTTP/2 connection task (h2's, under hyper and tonic) writes and
//! flushes whatever frames it has each time it runs, and on a busy runtime
//! it runs once per request or answer that woke it: one `writev` each. On
//! loopback and in a VM a `writev` is the most expensive thing a proxied call
//! does (the kernel runs the receiver's TCP path in the sender's context and
//! wakes the receiving thread: ~20 µs each in the 2-core VM the benchmarks
//! ran on), so a gateway at concurrency 64 spent nearly a third of its CPU in
//! them, 1.6–1.8 writes per request (docs/performance.md).
//!
//! [`Coalesce`] takes the connection's writes into a buffer and, when asked
//! to flush, first lets the runtime run every other task that is ready (the
//! connection task yields once): the requests and answers those tasks queue
//! go out in the same `writev`. With nothing else ready the task runs again
//! at once, so a lone call waits only for one trip through the scheduler.
//!
//! For connections whose user flushes when it wants bytes sent, as HTTP/2
//! does after each round of frames. Writes of [`DIRECT`] bytes or more (a
//! full HTTP/2 data frame) go straight through after what is buffered, so
//! large tensors are not copied and go out as they would without this; a
//! buffer that grew past that size is freed once sent, so an idle connection
//! holds at most [`DIRECT`] bytes.

use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Bytes buffered at most; a write that would pass it sends the buffer first.
pub const LIMIT: usize = 64 * 1024;
/// Writes this large are not buffered.
pub const DIRECT: usize = 16 * 1024;

/// A connection whose writes are gathered until a flush, and sent after the
/// runtime has run its other ready tasks once.
#[derive(Debug)]
pub struct Coalesce<T> {
    inner: T,
    buffer: Vec<u8>,
    /// Bytes at the start of `buffer` already written.
    written: usize,
    /// This flush already yielded to the other tasks once.
    yielded: bool,
}

impl<T> Coalesce<T> {
    pub fn new(inner: T) -> Self {
        Coalesce {
            inner,
            buffer: Vec::new(),
            written: 0,
            yielded: false,
        }
    }

    /// The connection.
    pub fn get_ref(&self) -> &T {
        &self.inner
    }
}

impl<T: AsyncWrite + Unpin> Coalesce<T> {
    /// Writes what is buffered.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.written < self.buffer.len() {
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &self.buffer[self.written..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.written += n;
        }
        self.buffer.clear();
        self.written = 0;
        // A connection keeps at most a data frame's worth of buffer between
        // bursts: a gateway holds one per client.
        if self.buffer.capacity() > DIRECT {
            self.buffer = Vec::new();
        }
        Poll::Ready(Ok(()))
    }

    /// Makes room for a write of `len` bytes: sends the buffer first when the
    /// write is to go straight to the connection or would pass [`LIMIT`].
    /// Ready with whether it goes straight to the connection.
    fn poll_room(&mut self, cx: &mut Context<'_>, len: usize) -> Poll<io::Result<bool>> {
        let direct = len >= DIRECT;
        if direct || self.buffer.len() + len > LIMIT {
            ready!(self.poll_drain(cx))?;
        }
        Poll::Ready(Ok(direct))
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Coalesce<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if ready!(this.poll_room(cx, data.len()))? {
            return Pin::new(&mut this.inner).poll_write(cx, data);
        }
        this.buffer.extend_from_slice(data);
        Poll::Ready(Ok(data.len()))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        slices: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let total: usize = slices.iter().map(|s| s.len()).sum();
        if ready!(this.poll_room(cx, total))? {
            return Pin::new(&mut this.inner).poll_write_vectored(cx, slices);
        }
        for slice in slices {
            this.buffer.extend_from_slice(slice);
        }
        Poll::Ready(Ok(total))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.written < this.buffer.len() {
            if !this.yielded {
                // Back of the run queue: the tasks ahead add their frames first.
                this.yielded = true;
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            ready!(this.poll_drain(cx))?;
        }
        this.yielded = false;
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Coalesce<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl tonic::transport::server::Connected for Coalesce<tokio::net::TcpStream> {
    type ConnectInfo = tonic::transport::server::TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::task::{Wake, Waker};

    use super::*;

    /// A connection that records each write it takes, takes at most `max`
    /// bytes at a time, and answers `Pending` to the next `stalls` writes.
    #[derive(Default)]
    struct Recorder {
        writes: Vec<Vec<u8>>,
        max: Option<usize>,
        stalls: usize,
        flushes: usize,
        shut: bool,
    }

    impl Recorder {
        fn bytes(&self) -> Vec<u8> {
            self.writes.concat()
        }
    }

    impl AsyncWrite for Recorder {
        fn poll_write(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            data: &[u8],
        ) -> Poll<io::Result<usize>> {
            if self.stalls > 0 {
                self.stalls -= 1;
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            let n = self.max.map_or(data.len(), |max| max.min(data.len()));
            self.writes.push(data[..n].to_vec());
            Poll::Ready(Ok(n))
        }

        fn poll_write_vectored(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            slices: &[IoSlice<'_>],
        ) -> Poll<io::Result<usize>> {
            let joined: Vec<u8> = slices.iter().flat_map(|s| s.iter().copied()).collect();
            self.poll_write(cx, &joined)
        }

        fn poll_flush(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            self.flushes += 1;
            Poll::Ready(Ok(()))
        }

        fn poll_shutdown(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            self.shut = true;
            Poll::Ready(Ok(()))
        }
    }

    #[derive(Default)]
    struct Wakes(AtomicUsize);

    impl Wake for Wakes {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    struct Harness {
        wakes: Arc<Wakes>,
        waker: Waker,
        io: Coalesce<Recorder>,
    }

    impl Harness {
        fn new(recorder: Recorder) -> Harness {
            let wakes = Arc::new(Wakes::default());
            Harness {
                waker: Waker::from(wakes.clone()),
                wakes,
                io: Coalesce::new(recorder),
            }
        }

        fn wakes(&self) -> usize {
            self.wakes.0.load(Ordering::SeqCst)
        }

        fn write(&mut self, data: &[u8]) -> Poll<io::Result<usize>> {
            let mut cx = Context::from_waker(&self.waker);
            Pin::new(&mut self.io).poll_write(&mut cx, data)
        }

        fn write_vectored(&mut self, slices: &[&[u8]]) -> Poll<io::Result<usize>> {
            let mut cx = Context::from_waker(&self.waker);
            let slices: Vec<IoSlice<'_>> = slices.iter().map(|s| IoSlice::new(s)).collect();
            Pin::new(&mut self.io).poll_write_vectored(&mut cx, &slices)
        }

        fn flush(&mut self) -> Poll<io::Result<()>> {
            let mut cx = Context::from_waker(&self.waker);
            Pin::new(&mut self.io).poll_flush(&mut cx)
        }

        fn shutdown(&mut self) -> Poll<io::Result<()>> {
            let mut cx = Context::from_waker(&self.waker);
            Pin::new(&mut self.io).poll_shutdown(&mut cx)
        }

        fn inner(&self) -> &Recorder {
            self.io.get_ref()
        }
    }

    fn ready<T>(poll: Poll<io::Result<T>>) -> T {
        match poll {
            Poll::Ready(result) => result.expect("the write failed"),
            Poll::Pending => panic!("pending"),
        }
    }

    #[test]
    fn writes_wait_for_a_flush_which_yields_once_then_sends_them_in_one_write() {
        let mut h = Harness::new(Recorder::default());
        assert_eq!(ready(h.write(b"headers")), 7);
        assert_eq!(ready(h.write_vectored(&[b" data", b" trailers"])), 14);
        assert!(
            h.inner().writes.is_empty(),
            "nothing is sent before a flush"
        );

        assert!(
            h.flush().is_pending(),
            "the first flush lets other tasks run"
        );
        assert_eq!(h.wakes(), 1, "and asks to be polled again");
        assert!(h.inner().writes.is_empty());

        // What other tasks queued meanwhile goes in the same write.
        ready(h.write(b" more"));
        ready(h.flush());
        assert_eq!(
            h.inner().writes,
            vec![b"headers data trailers more".to_vec()]
        );
        assert_eq!(h.inner().flushes, 1);
        assert_eq!(h.wakes(), 1);

        // The next round yields again.
        ready(h.write(b"next"));
        assert!(h.flush().is_pending());
        ready(h.flush());
        assert_eq!(h.inner().writes.len(), 2);
        assert_eq!(h.inner().bytes(), b"headers data trailers morenext");
    }

    #[test]
    fn a_flush_with_nothing_buffered_goes_straight_through() {
        let mut h = Harness::new(Recorder::default());
        ready(h.flush());
        assert_eq!(h.inner().flushes, 1);
        assert_eq!(h.wakes(), 0);
        assert!(h.inner().writes.is_empty());
    }

    #[test]
    fn large_writes_go_through_after_what_is_buffered_without_a_copy() {
        let mut h = Harness::new(Recorder::default());
        ready(h.write(b"small"));
        let frame = vec![7u8; DIRECT];
        assert_eq!(ready(h.write(&frame)), DIRECT);
        assert_eq!(h.inner().writes.len(), 2);
        assert_eq!(h.inner().writes[0], b"small");
        assert_eq!(h.inner().writes[1].len(), DIRECT);
        ready(h.flush());
        assert_eq!(h.wakes(), 0, "nothing was left to wait for");

        // Vectored too: an HTTP/2 data frame's header and payload.
        let payload = vec![1u8; DIRECT - 9];
        ready(h.write(b"tiny"));
        assert_eq!(ready(h.write_vectored(&[b"123456789", &payload])), DIRECT);
        assert_eq!(h.inner().writes.len(), 4);
        assert_eq!(h.inner().writes[2], b"tiny");
        assert_eq!(h.inner().writes[3].len(), DIRECT);

        // Small writes past the buffer's limit send it first.
        let mut h = Harness::new(Recorder::default());
        let piece = vec![1u8; DIRECT - 1];
        for _ in 0..5 {
            ready(h.write_vectored(&[&piece]));
        }
        assert!(
            h.io.buffer.capacity() <= DIRECT,
            "a large buffer is not kept"
        );
        assert_eq!(
            h.inner().writes.len(),
            1,
            "four pieces went out to make room"
        );
        assert_eq!(h.inner().writes[0].len(), 4 * piece.len());
        assert!(h.flush().is_pending());
        ready(h.flush());
        assert_eq!(h.inner().bytes().len(), 5 * piece.len());
    }

    #[test]
    fn a_connection_that_stalls_or_takes_part_loses_and_repeats_nothing() {
        let mut h = Harness::new(Recorder {
            max: Some(3),
            stalls: 1,
            ..Default::default()
        });
        let mut sent = Vec::new();
        for chunk in [&b"abcdefg"[..], b"hij", b"klmnop"] {
            ready(h.write(chunk));
            sent.extend_from_slice(chunk);
        }
        assert!(h.flush().is_pending(), "yield");
        assert!(h.flush().is_pending(), "the connection stalls");
        ready(h.flush());
        assert_eq!(h.inner().bytes(), sent);
        assert!(h.inner().writes.iter().all(|w| w.len() <= 3));

        // A write that must make room waits while the connection stalls.
        let mut h = Harness::new(Recorder {
            stalls: 1,
            ..Default::default()
        });
        let piece = vec![1u8; DIRECT - 1];
        for _ in 0..4 {
            ready(h.write(&piece));
        }
        assert!(h.write(&piece).is_pending());
        assert_eq!(ready(h.write(&piece)), piece.len());
        assert_eq!(h.inner().bytes().len(), 4 * piece.len());
        ready(h.shutdown());
        assert!(h.inner().shut);
        assert_eq!(
            h.inner().bytes().len(),
            5 * piece.len(),
            "shutdown sends what is buffered"
        );
    }
}

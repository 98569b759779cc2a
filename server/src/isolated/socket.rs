//! The front's end of a worker's socket, registered for readability alone.
//!
//! tokio registers a `UnixStream` for both directions, edge-triggered. The
//! writable edge then fires each time the worker reads a task: the space it
//! frees makes the front's end writable again. That woke an I/O thread for
//! nothing once per task, and at concurrency 1 the woken thread preempted
//! the worker on its CPU in the middle of the task (bench/PROFILING.md, item
//! 13). Here the socket is registered for reads only; a write that finds
//! the socket full waits on a registration of its own (a duplicate of the
//! descriptor, registered for writability), made for that wait and dropped
//! with the first write that goes through.

use std::{
    io::{self, IoSlice, Write},
    mem::MaybeUninit,
    os::{fd::AsFd, unix::net::UnixStream},
    pin::Pin,
    sync::Arc,
    task::{Context, Poll, ready},
};

use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf, unix::AsyncFd};

/// Splits a connected, non-blocking socket into its two halves.
pub fn split(stream: UnixStream) -> io::Result<(ReadHalf, WriteHalf)> {
    let socket = Arc::new(register(stream, Interest::READABLE)?);
    Ok((ReadHalf(Arc::clone(&socket)), WriteHalf { socket, waiting: None }))
}

/// Registers an owned descriptor (a socket, its duplicate, a pidfd) with
/// the runtime's reactor.
pub(super) fn register<T: std::os::fd::AsRawFd>(owned: T, interest: Interest) -> io::Result<AsyncFd<T>> {
    // SAFETY: `owned` owns its descriptor and
    // keeps it open, and the same, until the `AsyncFd` drops it.
    #[allow(unsafe_code)]
    let registered = unsafe { AsyncFd::register_with_interest(owned, interest) };
    Ok(registered?)
}

/// Reads from the worker.
#[derive(Debug)]
pub struct ReadHalf(Arc<AsyncFd<UnixStream>>);

impl AsyncRead for ReadHalf {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        loop {
            let mut guard = ready!(self.0.poll_read_ready(cx))?;
            // SAFETY: `read` only writes into the slice; the bytes it reports
            // are the only ones marked initialised below.
            #[allow(unsafe_code)]
            let unfilled = unsafe { buf.unfilled_mut() };
            match guard.try_io(|socket| read_uninit(socket.get_ref(), unfilled)) {
                Ok(Ok(n)) => {
                    // SAFETY: the kernel wrote the first `n` bytes of `unfilled`.
                    #[allow(unsafe_code)]
                    unsafe {
                        buf.assume_init(n)
                    };
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Ok(Err(err)) => return Poll::Ready(Err(err)),
                // Not readable after all; `try_io` cleared the readiness.
                Err(_would_block) => continue,
            }
        }
    }
}

/// One `read` into memory that may be uninitialised.
fn read_uninit(socket: &UnixStream, into: &mut [MaybeUninit<u8>]) -> io::Result<usize> {
    let (read, _) = rustix::io::read(socket, into)?;
    Ok(read.len())
}

/// Writes to the worker.
#[derive(Debug)]
pub struct WriteHalf {
    socket: Arc<AsyncFd<UnixStream>>,
    /// While a write waits for room: the descriptor's duplicate, registered
    /// for writability.
    waiting: Option<AsyncFd<std::os::fd::OwnedFd>>,
}

impl WriteHalf {
    fn poll_write_with(
        &mut self,
        cx: &mut Context<'_>,
        mut write: impl FnMut(&UnixStream) -> io::Result<usize>,
    ) -> Poll<io::Result<usize>> {
        loop {
            if let Some(waiter) = &self.waiting {
                let mut guard = ready!(waiter.poll_write_ready(cx))?;
                match guard.try_io(|_| write(self.socket.get_ref())) {
                    Ok(written) => {
                        self.waiting = None;
                        return Poll::Ready(written);
                    }
                    Err(_would_block) => continue,
                }
            }
            match write(self.socket.get_ref()) {
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => {
                    let duplicate = self.socket.get_ref().as_fd().try_clone_to_owned()?;
                    self.waiting = Some(register(duplicate, Interest::WRITABLE)?);
                }
                Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
                written => return Poll::Ready(written),
            }
        }
    }
}

impl AsyncWrite for WriteHalf {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        self.get_mut().poll_write_with(cx, |mut socket| socket.write(buf))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.get_mut().poll_write_with(cx, |mut socket| socket.write_vectored(bufs))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(self.socket.get_ref().shutdown(std::net::Shutdown::Write))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn pair() -> (ReadHalf, WriteHalf, UnixStream) {
        let (ours, theirs) = UnixStream::pair().expect("a socket pair");
        ours.set_nonblocking(true).expect("non-blocking");
        let (read, write) = split(ours).expect("registered");
        (read, write, theirs)
    }

    /// A write larger than the socket's buffers waits for the peer to read,
    /// then finishes; the bytes arrive whole and in order.
    #[tokio::test]
    async fn a_write_that_fills_the_socket_waits_for_room_and_completes() {
        let (_read, mut write, theirs) = pair();
        let sent: Vec<u8> = (0..8 << 20).map(|i| (i % 251) as u8).collect();
        let expected = sent.clone();
        let reader = std::thread::spawn(move || {
            let mut got = Vec::new();
            (&theirs).read_to_end(&mut got).expect("read");
            got
        });
        let written = tokio::time::timeout(std::time::Duration::from_secs(30), write.write_all(&sent)).await;
        written.expect("the write finished within 30 s").expect("written");
        write.shutdown().await.expect("shut down");
        assert!(write.waiting.is_none(), "the wait's registration is dropped once the write went through");
        assert_eq!(reader.join().expect("reader"), expected);
    }

    #[tokio::test]
    async fn reads_what_the_peer_writes_and_sees_its_close() {
        let (mut read, _write, theirs) = pair();
        let writer = std::thread::spawn(move || {
            (&theirs).write_all(b"hello").expect("write");
        });
        let mut got = Vec::new();
        read.read_to_end(&mut got).await.expect("read to the end");
        writer.join().expect("writer");
        assert_eq!(got, b"hello");
    }
}

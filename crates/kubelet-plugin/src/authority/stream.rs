//! The `AsyncRead`/`AsyncWrite` wrapper tonic serves on: it feeds the client's bytes through
//! the [`InboundRewriter`], the server's through the [`OutboundObserver`], and logs what they
//! report. Kept apart from the frame handling, which is pure and tested on byte buffers.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tonic::transport::server::Connected;

use super::{InboundRewriter, OutboundObserver, ServerSignal, error_code_name};

/// An accepted kubelet connection with the rewriting of [`InboundRewriter`]; `socket` names
/// it in the logs (`registration` or `dra`).
pub struct KubeletStream<S> {
    inner: S,
    socket: &'static str,
    inbound: InboundRewriter,
    outbound: OutboundObserver,
    /// Rewritten bytes `h2` has not read yet, from `out_pos` on.
    out: Vec<u8>,
    out_pos: usize,
    read_buf: Box<[u8]>,
    failed: bool,
}

impl<S> KubeletStream<S> {
    /// Wraps `inner`, a freshly accepted connection; `socket` names it in the logs.
    pub fn new(inner: S, socket: &'static str) -> Self {
        Self {
            inner,
            socket,
            inbound: InboundRewriter::new(),
            outbound: OutboundObserver::default(),
            out: Vec::new(),
            out_pos: 0,
            read_buf: vec![0; 16 * 1024].into_boxed_slice(),
            failed: false,
        }
    }

    fn report(&self, signals: &[ServerSignal]) {
        for signal in signals {
            let authority = self.inbound.last_authority().unwrap_or("");
            match *signal {
                ServerSignal::Reset { stream, code } if code != 0 && code != 0x8 => {
                    tracing::warn!(
                        socket = self.socket,
                        stream,
                        code = error_code_name(code),
                        authority,
                        "gRPC server reset a stream before or while a handler ran"
                    )
                }
                ServerSignal::GoAway {
                    last_stream,
                    code,
                    debug: ref detail,
                } if code != 0 => tracing::warn!(
                    socket = self.socket,
                    last_stream,
                    code = error_code_name(code),
                    detail = %detail,
                    authority,
                    "gRPC server closed the connection with an error"
                ),
                _ => {}
            }
        }
    }
}

impl<S> Drop for KubeletStream<S> {
    fn drop(&mut self) {
        if self.failed {
            return;
        }
        if self.inbound.is_raw() {
            tracing::warn!(
                socket = self.socket,
                "connection did not start with the HTTP/2 preface (not a gRPC client?)"
            );
        } else if self.inbound.header_blocks() == 0 {
            tracing::warn!(socket = self.socket, "connection closed before any request");
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for KubeletStream<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if this.out_pos < this.out.len() {
                let ready = &this.out[this.out_pos..];
                let take = ready.len().min(buf.remaining());
                buf.put_slice(&ready[..take]);
                this.out_pos += take;
                if this.out_pos == this.out.len() {
                    this.out.clear();
                    this.out_pos = 0;
                }
                return Poll::Ready(Ok(()));
            }
            let mut raw = ReadBuf::new(&mut this.read_buf);
            match Pin::new(&mut this.inner).poll_read(cx, &mut raw) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Ready(Ok(())) => {}
            }
            let filled = raw.filled();
            if filled.is_empty() {
                return Poll::Ready(Ok(()));
            }
            if let Err(error) = this.inbound.push(filled, &mut this.out) {
                this.failed = true;
                tracing::warn!(
                    socket = this.socket,
                    authority = this.inbound.last_authority().unwrap_or(""),
                    %error,
                    "closing a kubelet connection that broke HTTP/2"
                );
                return Poll::Ready(Err(io::Error::new(io::ErrorKind::InvalidData, error)));
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for KubeletStream<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let written = std::task::ready!(Pin::new(&mut this.inner).poll_write(cx, buf))?;
        let mut signals = Vec::new();
        this.outbound.push(&buf[..written], &mut signals);
        this.report(&signals);
        Poll::Ready(Ok(written))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

impl<S: Connected> Connected for KubeletStream<S> {
    type ConnectInfo = S::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

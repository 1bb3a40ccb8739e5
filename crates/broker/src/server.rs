//! The TCP listeners (native and Kafka protocols) and the HTTP endpoint (`/metrics`, `/health`, `/ready`).
//!
//! Per connection, a reader task reads frames and runs each request's ordered part (appends, topic
//! changes) before reading the next, so requests take effect in the order sent; the rest of each
//! request (durability waits, long polls) runs as its own task, and a writer task awaits those in
//! arrival order and writes their responses. Clients may pipeline; responses stay in order. Limits: `connections_max` connections (more are closed at once),
//! `inflight_requests_per_connection_max` requests per connection, and `inflight_bytes_max` request
//! bytes across all connections, acquired after a frame's length is read and before its body is:
//! past the budget the broker stops reading instead of allocating.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufWriter};
use tokio::net::TcpListener;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::handler::{Handler, Outcome};

/// Which protocol a listener speaks. Both frame requests the same way (a big-endian `u32`
/// length, then the payload) and share one set of limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Protocol {
    Native,
    Kafka,
}

/// Limits shared by every listener: `connections_max` connections and `inflight_bytes_max`
/// request bytes in total, whichever protocol they arrive over.
#[derive(Debug)]
pub(crate) struct SharedLimits {
    connections: Arc<Semaphore>,
    budget: Arc<Semaphore>,
}

impl SharedLimits {
    pub(crate) fn new(config: &crate::config::BrokerConfig) -> Arc<SharedLimits> {
        Arc::new(SharedLimits {
            connections: Arc::new(Semaphore::new(config.connections_max as usize)),
            budget: Arc::new(Semaphore::new(
                config.inflight_bytes_max.min(Semaphore::MAX_PERMITS as u64) as usize,
            )),
        })
    }
}

/// Serves `protocol` until `shutdown` fires; then stops accepting and lets each connection
/// finish the requests it already read.
pub(crate) async fn serve(
    listener: TcpListener,
    protocol: Protocol,
    tls: Option<TlsAcceptor>,
    handler: Arc<Handler>,
    limits: Arc<SharedLimits>,
    tracker: TaskTracker,
    shutdown: CancellationToken,
) {
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = shutdown.cancelled() => break,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(err) => {
                // Out of file descriptors and the like: back off instead of spinning.
                tracing::warn!(error = %err, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(permit) = Arc::clone(&limits.connections).try_acquire_owned() else {
            handler.metrics.connections_rejected.inc();
            tracing::warn!(%peer, max = handler.config.connections_max, "connection refused: connections_max reached");
            drop(stream);
            continue;
        };
        if let Err(err) = stream.set_nodelay(true) {
            tracing::debug!(%peer, error = %err, "set_nodelay");
        }
        let handler = Arc::clone(&handler);
        let budget = Arc::clone(&limits.budget);
        let shutdown = shutdown.clone();
        let tasks = tracker.clone();
        let tls = tls.clone();
        tracker.spawn(async move {
            handler.metrics.connections.inc();
            tracing::debug!(%peer, ?protocol, tls = tls.is_some(), "connection opened");
            let conn = (protocol, Arc::clone(&handler), budget, tasks, shutdown.clone());
            let served = match tls {
                None => {
                    let (reader, writer) = stream.into_split();
                    connection(reader, writer, conn).await
                }
                Some(tls) => {
                    // The handshake is bounded like a frame (a silent client holds only its own
                    // connection slot, and not for long), and ends with the broker.
                    let timeout = Duration::from_millis(handler.config.frame_read_timeout_ms);
                    let handshake = tokio::select! {
                        done = tokio::time::timeout(timeout, tls.accept(stream)) => done,
                        () = shutdown.cancelled() => Ok(Err(std::io::Error::other("shutting down"))),
                    };
                    match handshake {
                        Ok(Ok(stream)) => {
                            let (reader, writer) = tokio::io::split(stream);
                            connection(reader, writer, conn).await
                        }
                        Ok(Err(err)) => {
                            handler.metrics.tls_handshakes_failed.inc();
                            Err(format!("TLS handshake: {err}"))
                        }
                        Err(_) => {
                            handler.metrics.tls_handshakes_failed.inc();
                            Err("TLS handshake timed out".into())
                        }
                    }
                }
            };
            if let Err(reason) = served {
                tracing::debug!(%peer, %reason, "connection closed");
            }
            handler.metrics.connections.dec();
            drop(permit);
        });
    }
}

type Pending = tokio::task::JoinHandle<(Outcome, OwnedSemaphorePermit)>;

/// Serves one connection, plain TCP or TLS, from its two halves.
async fn connection<R, W>(
    mut reader: R,
    writer: W,
    (protocol, handler, budget, tasks, shutdown): (
        Protocol,
        Arc<Handler>,
        Arc<Semaphore>,
        TaskTracker,
        CancellationToken,
    ),
) -> Result<(), String>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let (queue, mut pending) =
        mpsc::channel::<Pending>(handler.config.inflight_requests_per_connection_max as usize);
    let closed = Arc::new(AtomicBool::new(false));
    let writer_closed = Arc::clone(&closed);
    let writer_task = tasks.spawn(async move {
        let mut writer = BufWriter::new(writer);
        while let Some(next) = pending.recv().await {
            // A handler that panicked dropped its budget permit as it unwound.
            let result = match next.await {
                Ok((Outcome::Respond(payload), _permit)) => {
                    write_frame(&mut writer, &[Bytes::from(payload)], pending.is_empty()).await
                }
                Ok((Outcome::RespondChunks(chunks), _permit)) => {
                    write_frame(&mut writer, &chunks, pending.is_empty()).await
                }
                Ok((Outcome::Silent, _permit)) => Ok(()),
                Ok((Outcome::Close(reason), _permit)) => Err(reason),
                Err(err) => Err(format!("request handler failed: {err}")),
            };
            if let Err(reason) = result {
                writer_closed.store(true, Ordering::Relaxed);
                let _ = writer.shutdown().await;
                return Err(reason);
            }
        }
        let _ = writer.flush().await;
        let _ = writer.shutdown().await;
        Ok(())
    });
    let frame_bytes_max = handler.config.frame_bytes_max;
    let idle_timeout = Duration::from_millis(handler.config.connection_idle_timeout_ms);
    let frame_timeout = Duration::from_millis(handler.config.frame_read_timeout_ms);
    let read_result: Result<(), String> = async {
        loop {
            if closed.load(Ordering::Relaxed) {
                return Ok(());
            }
            // Idle between requests: up to the idle timeout. Within a frame: the frame timeout.
            let mut first = [0u8; 1];
            let got = tokio::select! {
                got = tokio::time::timeout(idle_timeout, reader.read(&mut first)) => got,
                () = shutdown.cancelled() => return Ok(()),
            };
            match got {
                Err(_) => return Err("idle timeout".into()),
                Ok(Ok(0)) => return Ok(()),
                Ok(Ok(_)) => {}
                Ok(Err(err)) => return Err(format!("read: {err}")),
            }
            let mut rest = [0u8; 3];
            tokio::time::timeout(frame_timeout, reader.read_exact(&mut rest))
                .await
                .map_err(|_| "stalled frame header".to_string())?
                .map_err(|e| format!("read: {e}"))?;
            let [b1, b2, b3] = rest;
            let [b0] = first;
            let len = u32::from_be_bytes([b0, b1, b2, b3]);
            if len == 0 || len > frame_bytes_max {
                return Err(format!("frame length {len} outside 1..={frame_bytes_max}"));
            }
            // Backpressure: wait for budget before allocating the body.
            let permit = tokio::select! {
                permit = Arc::clone(&budget).acquire_many_owned(len) => permit.map_err(|e| e.to_string())?,
                () = shutdown.cancelled() => return Ok(()),
            };
            let body = tokio::time::timeout(frame_timeout, read_body(&mut reader, len as usize))
                .await
                .map_err(|_| "stalled frame body".to_string())?
                .map_err(|e| format!("read frame body: {e}"))?;
            let frame: Bytes = body.freeze();
            // In order: this request's appends happen before the next request is read.
            let deferred = match protocol {
                Protocol::Native => handler.begin(frame).await,
                Protocol::Kafka => handler.begin_kafka(frame).await,
            };
            let task = tokio::spawn(async move { (deferred.await, permit) });
            if queue.send(task).await.is_err() {
                return Ok(()); // The writer stopped.
            }
        }
    }
    .await;
    drop(queue);
    let written = writer_task.await.map_err(|e| e.to_string())?;
    read_result.and(written)
}

async fn write_frame<W: AsyncWriteExt + Unpin>(
    writer: &mut W,
    chunks: &[Bytes],
    flush: bool,
) -> Result<(), String> {
    let len: usize = chunks.iter().map(Bytes::len).sum();
    let len = u32::try_from(len).map_err(|_| "response larger than 4 GiB".to_string())?;
    writer
        .write_all(&len.to_be_bytes())
        .await
        .map_err(|e| format!("write: {e}"))?;
    for chunk in chunks {
        writer
            .write_all(chunk)
            .await
            .map_err(|e| format!("write: {e}"))?;
    }
    if flush {
        writer.flush().await.map_err(|e| format!("write: {e}"))?;
    }
    Ok(())
}

/// What the HTTP endpoint reports: a broker's or a controller-only node's.
pub(crate) trait HttpState: Send + Sync + 'static {
    /// The Prometheus text exposition.
    fn metrics(&self) -> String;
    /// Whether the node serves as the metadata says (`/ready`).
    fn ready(&self) -> bool;
}

/// A broker: its handler's metrics, ready once registered, caught up and unfenced.
pub(crate) struct BrokerHttp {
    pub(crate) handler: Arc<Handler>,
    pub(crate) ready: Arc<AtomicBool>,
}

impl HttpState for BrokerHttp {
    fn metrics(&self) -> String {
        self.handler.metrics.render(&self.handler)
    }

    fn ready(&self) -> bool {
        // The lease is checked against the time: a broker paused past its session is not ready
        // the moment it resumes, before its next heartbeat says so.
        self.ready.load(Ordering::Relaxed) && self.handler.manager.host().may_lead()
    }
}

/// Serves `/metrics`, `/health` and `/ready` until `shutdown`.
pub(crate) async fn serve_http(
    listener: TcpListener,
    state: Arc<dyn HttpState>,
    shutdown: CancellationToken,
) {
    loop {
        let (mut stream, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(_) => { tokio::time::sleep(Duration::from_millis(50)).await; continue; }
            },
            () = shutdown.cancelled() => return,
        };
        let state = Arc::clone(&state);
        tokio::spawn(async move {
            // A request line and headers, bounded in size and time.
            let mut buf = vec![0u8; 8192];
            let mut used = 0;
            let read = tokio::time::timeout(Duration::from_secs(5), async {
                while used < buf.len() {
                    let n = stream.read(buf.get_mut(used..).unwrap_or_default()).await?;
                    if n == 0 {
                        break;
                    }
                    used += n;
                    if buf
                        .get(..used)
                        .is_some_and(|b| b.windows(4).any(|w| w == b"\r\n\r\n"))
                    {
                        break;
                    }
                }
                Ok::<(), std::io::Error>(())
            })
            .await;
            if !matches!(read, Ok(Ok(()))) {
                return;
            }
            let head = String::from_utf8_lossy(buf.get(..used).unwrap_or_default()).into_owned();
            let path = head.split_whitespace().nth(1).unwrap_or("/");
            let (status, content_type, body) = match path {
                "/metrics" => ("200 OK", "text/plain; version=0.0.4", state.metrics()),
                "/health" => ("200 OK", "text/plain", "ok\n".to_string()),
                "/ready" if state.ready() => ("200 OK", "text/plain", "ready\n".to_string()),
                "/ready" => (
                    "503 Service Unavailable",
                    "text/plain",
                    "starting or stopping\n".to_string(),
                ),
                _ => (
                    "404 Not Found",
                    "text/plain",
                    "try /metrics, /health or /ready\n".to_string(),
                ),
            };
            let response = format!(
                "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = stream.write_all(response.as_bytes()).await;
            let _ = stream.shutdown().await;
        });
    }
}

/// Reads exactly `len` bytes into a fresh buffer, without zero-filling it first.
pub(crate) async fn read_body<R: AsyncReadExt + Unpin>(
    reader: &mut R,
    len: usize,
) -> std::io::Result<BytesMut> {
    let mut body = BytesMut::with_capacity(len);
    let mut limited = reader.take(len as u64);
    while body.len() < len {
        if limited.read_buf(&mut body).await? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
    }
    Ok(body)
}

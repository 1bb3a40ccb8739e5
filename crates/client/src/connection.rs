//! Connections to a broker, over TCP or in process. Requests are pipelined: many may be in
//! flight, and each takes its place in the connection's order when `call` is invoked (not when
//! its future is first polled), so a producer's batches reach the broker in the order it sent them.

use std::collections::VecDeque;
use std::future::Future;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use bytes::{Bytes, BytesMut};
use cairn_protocol::limits::FRAME_BYTES_MAX;
use cairn_protocol::native::{self, ApiKey, Request, ResponseHeader, Wire};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufWriter};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};

use crate::error::ClientError;
use crate::tls::ClientTls;

/// The response to one submitted request frame.
pub type Reply = oneshot::Receiver<Result<Bytes, ClientError>>;

/// Carries request frames to a broker and response frames back, in order.
///
/// To ensure correctness, implementations process frames in the order `submit` is called and
/// answer each with its response payload (correlation id first), or with an error if the
/// connection failed. `submit` must not block.
pub trait Transport: Send + Sync + std::fmt::Debug {
    /// Queues a request payload (header and body, no length prefix), as chunks to send back to
    /// back (a produce request's batches are chunks of their own, never copied into a frame).
    /// With `expects_response` false (acks=0 produce) no response comes and the reply resolves
    /// once the frame is queued.
    fn submit(&self, payload: Vec<Bytes>, expects_response: bool) -> Reply;
    /// Where the transport leads, for messages.
    fn peer(&self) -> &str;
}

/// A wire format other than the native protocol over the same framing (a big-endian `u32`
/// length, then the payload): it encodes native requests in its own format and decodes its
/// responses straight into the native response types, so producers, consumers and admin clients
/// work unchanged over it (the Kafka protocol, in `cairn-kafka-client`).
pub trait Dialect: Send + Sync + std::fmt::Debug {
    /// Encodes a request as a frame payload.
    fn encode_request(
        &self,
        correlation_id: u32,
        client_id: &str,
        request: &Request,
    ) -> Result<Vec<u8>, ClientError>;

    /// Decodes the response payload to a request of `api` into the native response type of that
    /// API, boxed (`call` unboxes it as the type it asked for).
    fn decode_response(
        &self,
        api: ApiKey,
        correlation_id: u32,
        payload: Bytes,
    ) -> Result<Box<dyn std::any::Any + Send>, ClientError>;
}

/// A connection to one broker. Cheap to clone; all clones share the transport.
#[derive(Debug, Clone)]
pub struct Connection {
    transport: Arc<dyn Transport>,
    next_correlation: Arc<AtomicU32>,
    client_id: Arc<str>,
    dialect: Option<Arc<dyn Dialect>>,
}

impl Connection {
    /// Connects to `addr` (`host:port`) over TCP.
    pub async fn connect(addr: &str, client_id: &str) -> Result<Connection, ClientError> {
        Connection::connect_with(addr, client_id, None, None).await
    }

    /// Connects to `addr` over TCP, with TLS when `tls` is given, speaking `dialect` (or the
    /// native protocol).
    pub async fn connect_with(
        addr: &str,
        client_id: &str,
        dialect: Option<Arc<dyn Dialect>>,
        tls: Option<&ClientTls>,
    ) -> Result<Connection, ClientError> {
        let transport = TcpTransport::connect(addr, tls).await?;
        let mut conn = Connection::from_transport(Arc::new(transport), client_id);
        conn.dialect = dialect;
        Ok(conn)
    }

    /// A connection over any transport (an embedded broker provides an in-process one).
    pub fn from_transport(transport: Arc<dyn Transport>, client_id: &str) -> Connection {
        Connection {
            transport,
            next_correlation: Arc::new(AtomicU32::new(1)),
            client_id: Arc::from(client_id),
            dialect: None,
        }
    }

    /// Connects to `addr` over TCP, speaking `dialect` instead of the native protocol.
    pub async fn connect_with_dialect(
        addr: &str,
        client_id: &str,
        dialect: Arc<dyn Dialect>,
    ) -> Result<Connection, ClientError> {
        Connection::connect_with(addr, client_id, Some(dialect), None).await
    }

    fn encode(&self, correlation_id: u32, request: &Request) -> Result<Vec<Bytes>, ClientError> {
        match &self.dialect {
            None => Ok(native::encode_request_chunks(
                correlation_id,
                &self.client_id,
                request,
            )),
            Some(dialect) => dialect
                .encode_request(correlation_id, &self.client_id, request)
                .map(|payload| vec![Bytes::from(payload)]),
        }
    }

    /// The broker address.
    pub fn addr(&self) -> &str {
        self.transport.peer()
    }

    /// The client id requests carry.
    pub fn client_id(&self) -> &str {
        &self.client_id
    }

    /// Sends a request and decodes its response body. The request is queued before this returns
    /// its future.
    pub fn call<T: Wire + Send + 'static>(
        &self,
        request: &Request,
    ) -> impl Future<Output = Result<T, ClientError>> + Send + 'static {
        let correlation_id = self.next_correlation.fetch_add(1, Ordering::Relaxed);
        let (reply, encode_error) = match self.encode(correlation_id, request) {
            Ok(payload) => (self.transport.submit(payload, true), None),
            Err(err) => (oneshot::channel().1, Some(err)),
        };
        let api = request.api_key();
        let dialect = self.dialect.clone();
        // The transport names the peer only if the reply is lost: no allocation per request.
        let transport = Arc::clone(&self.transport);
        async move {
            if let Some(err) = encode_error {
                return Err(err);
            }
            let body = reply.await.map_err(|_| closed(transport.peer()))??;
            if let Some(dialect) = dialect {
                return dialect
                    .decode_response(api, correlation_id, body)?
                    .downcast::<T>()
                    .map(|boxed| *boxed)
                    .map_err(|_| {
                        ClientError::InvalidArgument(format!(
                            "the dialect decoded a {} response as another type",
                            api.name()
                        ))
                    });
            }
            let mut body = body;
            let header = ResponseHeader::decode(&mut body, "response header")?;
            if header.correlation_id != correlation_id {
                return Err(ClientError::Decode(native::DecodeError::InvalidValue {
                    field: "correlation_id",
                    value: header.correlation_id.into(),
                }));
            }
            if header.error_code != 0 {
                return Err(ClientError::broker(
                    api.name(),
                    header.error_code,
                    header.error_message,
                ));
            }
            Ok(native::decode_exact(body)?)
        }
    }

    /// Sends a request that gets no response (produce with acks=0).
    pub fn send_only(
        &self,
        request: &Request,
    ) -> impl Future<Output = Result<(), ClientError>> + Send + 'static {
        let correlation_id = self.next_correlation.fetch_add(1, Ordering::Relaxed);
        let (reply, encode_error) = match self.encode(correlation_id, request) {
            Ok(payload) => (self.transport.submit(payload, false), None),
            Err(err) => (oneshot::channel().1, Some(err)),
        };
        let transport = Arc::clone(&self.transport);
        async move {
            if let Some(err) = encode_error {
                return Err(err);
            }
            reply
                .await
                .map_err(|_| closed(transport.peer()))?
                .map(|_| ())
        }
    }
}

fn closed(peer: &str) -> ClientError {
    ClientError::Connection {
        addr: peer.to_string(),
        message: "connection closed".into(),
    }
}

/// Where a response goes.
type ReplyTo = oneshot::Sender<Result<Bytes, ClientError>>;
/// A submitted frame: payload, reply, whether a response will come.
type Submitted = (Vec<Bytes>, ReplyTo, bool);
/// Replies awaiting responses, in request order, and why the connection failed once it has: a
/// request submitted after the failure is answered with it at once (the reader that would have
/// answered it is gone).
#[derive(Default)]
struct Inflight {
    replies: VecDeque<ReplyTo>,
    failed: Option<String>,
}
type Pending = Arc<Mutex<Inflight>>;

/// The TCP transport: a writer task sends frames in submission order; a reader task matches
/// responses to requests in the same order.
#[derive(Debug)]
struct TcpTransport {
    frames: mpsc::UnboundedSender<Submitted>,
    addr: String,
}

impl TcpTransport {
    async fn connect(addr: &str, tls: Option<&ClientTls>) -> Result<TcpTransport, ClientError> {
        let connection_error = |err: std::io::Error| ClientError::Connection {
            addr: addr.to_string(),
            message: err.to_string(),
        };
        let stream = TcpStream::connect(addr).await.map_err(connection_error)?;
        // Nagle would hold small requests back for a peer's delayed ACK (44 ms p50 measured).
        stream.set_nodelay(true).map_err(connection_error)?;
        Ok(match tls {
            None => {
                let (reader, writer) = stream.into_split();
                TcpTransport::start(addr, reader, writer)
            }
            Some(tls) => {
                let stream = tls.handshake(addr, stream).await?;
                let (reader, writer) = tokio::io::split(stream);
                TcpTransport::start(addr, reader, writer)
            }
        })
    }

    /// Runs the writer and reader tasks over a connection's two halves (plain TCP or TLS).
    fn start<R, W>(addr: &str, mut reader: R, writer: W) -> TcpTransport
    where
        R: AsyncRead + Unpin + Send + 'static,
        W: AsyncWrite + Unpin + Send + 'static,
    {
        let (frames, mut queue) = mpsc::unbounded_channel::<(
            Vec<Bytes>,
            oneshot::Sender<Result<Bytes, ClientError>>,
            bool,
        )>();
        let pending: Pending = Arc::default();
        let fail_all = {
            let pending = Arc::clone(&pending);
            let addr = addr.to_string();
            move |message: String| {
                let mut pending = pending.lock().unwrap_or_else(|e| e.into_inner());
                for reply in pending.replies.drain(..) {
                    let _ = reply.send(Err(ClientError::Connection {
                        addr: addr.clone(),
                        message: message.clone(),
                    }));
                }
                pending.failed.get_or_insert(message);
            }
        };
        let writer_pending = Arc::clone(&pending);
        let writer_addr = addr.to_string();
        let writer_fail = fail_all.clone();
        tokio::spawn(async move {
            let mut writer = BufWriter::new(writer);
            while let Some((payload, reply, expects_response)) = queue.recv().await {
                if expects_response {
                    let mut pending = writer_pending.lock().unwrap_or_else(|e| e.into_inner());
                    if let Some(message) = &pending.failed {
                        // The reader is gone: nothing would ever answer.
                        let _ = reply.send(Err(ClientError::Connection {
                            addr: writer_addr.clone(),
                            message: message.clone(),
                        }));
                        continue;
                    }
                    pending.replies.push_back(reply);
                } else {
                    let _ = reply.send(Ok(Bytes::new()));
                }
                let written = async {
                    let len: usize = payload.iter().map(Bytes::len).sum();
                    writer.write_all(&(len as u32).to_be_bytes()).await?;
                    for chunk in &payload {
                        writer.write_all(chunk).await?;
                    }
                    if queue.is_empty() {
                        writer.flush().await?;
                    }
                    Ok::<(), std::io::Error>(())
                }
                .await;
                if let Err(err) = written {
                    writer_fail(format!("write: {err}"));
                    return;
                }
            }
        });
        tokio::spawn(async move {
            let result: Result<(), String> = async {
                loop {
                    let len = match reader.read_u32().await {
                        Ok(len) => len,
                        Err(err) if err.kind() == std::io::ErrorKind::UnexpectedEof => {
                            return Err("closed by the broker".into());
                        }
                        Err(err) => return Err(format!("read: {err}")),
                    };
                    if len > FRAME_BYTES_MAX {
                        return Err(format!(
                            "response frame of {len} bytes exceeds {FRAME_BYTES_MAX}"
                        ));
                    }
                    // No zero-fill: read straight into spare capacity.
                    let mut body = BytesMut::with_capacity(len as usize);
                    let mut limited = (&mut reader).take(u64::from(len));
                    while body.len() < len as usize {
                        if limited
                            .read_buf(&mut body)
                            .await
                            .map_err(|e| format!("read: {e}"))?
                            == 0
                        {
                            return Err("closed by the broker".into());
                        }
                    }
                    let Some(reply) = pending
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .replies
                        .pop_front()
                    else {
                        return Err("response without a request".into());
                    };
                    let _ = reply.send(Ok(body.freeze()));
                }
            }
            .await;
            if let Err(message) = result {
                fail_all(message);
            }
        });
        TcpTransport {
            frames,
            addr: addr.to_string(),
        }
    }
}

impl Transport for TcpTransport {
    fn submit(&self, payload: Vec<Bytes>, expects_response: bool) -> Reply {
        let (tx, rx) = oneshot::channel();
        if let Err(mpsc::error::SendError((_, tx, _))) =
            self.frames.send((payload, tx, expects_response))
        {
            let _ = tx.send(Err(closed(&self.addr)));
        }
        rx
    }

    fn peer(&self) -> &str {
        &self.addr
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cairn_protocol::native::{ApiVersionsRequest, ApiVersionsResponse};

    #[tokio::test]
    async fn a_request_after_the_broker_closed_the_connection_fails_instead_of_hanging() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let conn = Connection::connect(&addr, "test").await.unwrap();
        // The "broker" accepts and closes; the reader sees EOF.
        drop(listener.accept().await.unwrap());
        drop(listener);
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        let request = Request::ApiVersions(ApiVersionsRequest {});
        let answer = tokio::time::timeout(
            std::time::Duration::from_secs(5),
            conn.call::<ApiVersionsResponse>(&request),
        )
        .await
        .expect("a request on a dead connection hung");
        assert!(
            matches!(answer, Err(ClientError::Connection { .. })),
            "{answer:?}"
        );
    }
}

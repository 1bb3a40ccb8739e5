//! The in-process client transport of an embedded broker: requests go straight to the handler,
//! with the same ordering as a TCP connection (each request's ordered part runs before the next
//! request's) and no sockets or frame copies.

use std::sync::Arc;

use bytes::Bytes;
use cairn_client::{ClientError, Reply, Transport};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::handler::{Handler, Outcome};

type Submitted = (Vec<Bytes>, oneshot::Sender<Result<Bytes, ClientError>>);

/// An in-process connection to a running broker.
#[derive(Debug)]
pub(crate) struct LocalTransport {
    frames: mpsc::UnboundedSender<Submitted>,
}

const PEER: &str = "in-process";

impl LocalTransport {
    pub(crate) fn new(handler: Arc<Handler>, shutdown: CancellationToken) -> LocalTransport {
        let (frames, mut queue) = mpsc::unbounded_channel::<Submitted>();
        tokio::spawn(async move {
            loop {
                let (payload, reply) = tokio::select! {
                    next = queue.recv() => match next {
                        Some(next) => next,
                        None => return,
                    },
                    () = shutdown.cancelled() => return,
                };
                // One chunk as it is; several joined (the handler reads one frame).
                let frame = match <[Bytes; 1]>::try_from(payload) {
                    Ok([only]) => only,
                    Err(chunks) => Bytes::from(chunks.concat()),
                };
                let deferred = handler.begin(frame).await;
                tokio::spawn(async move {
                    let result = match deferred.await {
                        Outcome::Respond(payload) => Ok(Bytes::from(payload)),
                        Outcome::RespondChunks(chunks) => Ok(Bytes::from(chunks.concat())),
                        Outcome::Silent => Ok(Bytes::new()),
                        Outcome::Close(reason) => Err(ClientError::Connection {
                            addr: PEER.into(),
                            message: reason,
                        }),
                    };
                    let _ = reply.send(result);
                });
            }
        });
        LocalTransport { frames }
    }
}

impl Transport for LocalTransport {
    fn submit(&self, payload: Vec<Bytes>, _expects_response: bool) -> Reply {
        let (tx, rx) = oneshot::channel();
        if let Err(mpsc::error::SendError((_, tx))) = self.frames.send((payload, tx)) {
            let _ = tx.send(Err(ClientError::Connection {
                addr: PEER.into(),
                message: "broker stopped".into(),
            }));
        }
        rx
    }

    fn peer(&self) -> &str {
        PEER
    }
}

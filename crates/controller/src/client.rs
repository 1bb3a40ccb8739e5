//! A broker's handle on the controller quorum: commands go to the active controller (in process
//! when this node is it, else over the controller wire, following NOT_CONTROLLER hints), and the
//! metadata image arrives as a feed (the local state machine's on a voter, long polls of a
//! voter's on a broker-only node).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

use crate::image::MetadataImage;
use crate::node::ControllerNode;
use crate::records::NodeId;
use crate::rpc::{Command, CommandError, QuorumStatus, Reply, Request, Response, RpcClient};

/// How long a command may take, retries included, before it fails as unavailable.
const COMMAND_DEADLINE: Duration = Duration::from_secs(15);
/// How long one call to a controller may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(3);
/// A voter that refused a connection is not asked again for this long.
const UNREACHABLE_FOR: Duration = Duration::from_millis(500);

/// The broker's view of the quorum. Cheap to clone.
#[derive(Debug, Clone)]
pub struct ControllerClient {
    inner: Arc<ClientInner>,
}

#[derive(Debug)]
struct ClientInner {
    local: Option<ControllerNode>,
    peers: BTreeMap<NodeId, RpcClient>,
    leader_hint: Mutex<Option<NodeId>>,
    image: watch::Receiver<Arc<MetadataImage>>,
}

impl ControllerClient {
    /// The client of a node that is itself a voter (`local`); `voters` are every voter's
    /// controller address.
    pub fn local(local: ControllerNode, frame_bytes_max: u32) -> ControllerClient {
        let peers = peers(
            &local.config().voters,
            Some(local.node_id()),
            frame_bytes_max,
        );
        let image = local.subscribe();
        ControllerClient {
            inner: Arc::new(ClientInner {
                local: Some(local),
                peers,
                leader_hint: Mutex::new(None),
                image,
            }),
        }
    }

    /// The client of a broker-only node: it follows the metadata by long-polling the voters.
    pub fn remote(voters: &BTreeMap<NodeId, String>, frame_bytes_max: u32) -> ControllerClient {
        let (tx, image) = watch::channel(Arc::new(MetadataImage::default()));
        let client = ControllerClient {
            inner: Arc::new(ClientInner {
                local: None,
                peers: peers(voters, None, frame_bytes_max),
                leader_hint: Mutex::new(None),
                image,
            }),
        };
        // Its own connections: a long poll must not hold up commands to the same voter.
        let pollers = peers(voters, None, frame_bytes_max);
        tokio::spawn(follow(Arc::downgrade(&client.inner), pollers, tx));
        client
    }

    /// The metadata feed.
    pub fn subscribe(&self) -> watch::Receiver<Arc<MetadataImage>> {
        self.inner.image.clone()
    }

    /// The current image.
    pub fn image(&self) -> Arc<MetadataImage> {
        Arc::clone(&self.inner.image.borrow())
    }

    /// The local controller, if this node is a voter.
    pub fn local_node(&self) -> Option<&ControllerNode> {
        self.inner.local.as_ref()
    }

    /// The active controller, as far as this node knows.
    pub fn leader(&self) -> Option<NodeId> {
        match &self.inner.local {
            Some(local) => local.leader(),
            None => *self.hint(),
        }
    }

    fn hint(&self) -> std::sync::MutexGuard<'_, Option<NodeId>> {
        self.inner
            .leader_hint
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Carries out `command` at the active controller, wherever it is; retries through leader
    /// changes until it is done, refused, or `COMMAND_DEADLINE` passes.
    pub async fn execute(&self, command: Command) -> Result<Reply, CommandError> {
        let deadline = Instant::now() + COMMAND_DEADLINE;
        let mut backoff = Duration::from_millis(20);
        let mut last_error;
        let mut rotation = 0usize;
        let mut unreachable: BTreeMap<NodeId, Instant> = BTreeMap::new();
        loop {
            let known = match &self.inner.local {
                Some(local) => local.leader(),
                None => *self.hint(),
            };
            let target = known
                .filter(|id| {
                    unreachable
                        .get(id)
                        .is_none_or(|until| *until < Instant::now())
                })
                .or_else(|| {
                    // No leader known: try the voters in turn.
                    rotation += 1;
                    let ids: Vec<NodeId> = self.voter_ids();
                    ids.get(rotation % ids.len().max(1)).copied()
                });
            let result = match (target, &self.inner.local) {
                (Some(id), Some(local)) if id == local.node_id() => local
                    .execute(command.clone())
                    .await
                    .map(|reply| (reply, local.image().offset)),
                (Some(id), _) => match self.inner.peers.get(&id) {
                    Some(peer) => {
                        let request = Request::Command(command.clone());
                        match peer.call(&request, CALL_TIMEOUT).await {
                            Ok(Response::Command(result)) => result,
                            Ok(_) => Err(CommandError::Unavailable(format!(
                                "controller {id} answered with the wrong message"
                            ))),
                            Err(err) => {
                                *self.hint() = None;
                                unreachable.insert(id, Instant::now() + UNREACHABLE_FOR);
                                Err(CommandError::Unavailable(err.to_string()))
                            }
                        }
                    }
                    None => Err(CommandError::Unavailable(format!(
                        "controller {id} is not a known voter"
                    ))),
                },
                (None, _) => Err(CommandError::Unavailable("no voters".into())),
            };
            match result {
                Err(CommandError::NotController { leader }) => {
                    // A hint naming a voter that just failed to answer is stale (its followers
                    // still name it until they elect another): ask the others meanwhile.
                    *self.hint() = leader.map(|(id, _)| id).filter(|id| {
                        unreachable
                            .get(id)
                            .is_none_or(|until| *until < Instant::now())
                    });
                    last_error = "the active controller moved".into();
                }
                Err(CommandError::Unavailable(why)) => last_error = why,
                Err(refused) => return Err(refused),
                Ok((reply, offset)) => {
                    // Whoever carried it out is the active controller (found by rotation when
                    // no hint was known).
                    if self.inner.local.is_none() {
                        *self.hint() = target;
                    }
                    // Read your writes: this node's image reaches what the controller applied.
                    let mut feed = self.subscribe();
                    let caught_up = feed.wait_for(|image| image.offset >= offset);
                    if tokio::time::timeout_at(deadline, caught_up).await.is_err() {
                        tracing::warn!(offset, "the local metadata did not catch up in time");
                    }
                    return Ok(reply);
                }
            }
            if Instant::now() + backoff >= deadline {
                return Err(CommandError::Unavailable(last_error));
            }
            tokio::time::sleep(backoff).await;
            // Commands are few: after a failover, a short fixed retry finds the new leader soon
            // after its election.
            backoff = (backoff * 2).min(Duration::from_millis(100));
        }
    }

    fn voter_ids(&self) -> Vec<NodeId> {
        let mut ids: Vec<NodeId> = self.inner.peers.keys().copied().collect();
        if let Some(local) = &self.inner.local {
            ids.push(local.node_id());
        }
        ids.sort_unstable();
        ids
    }

    /// Every voter's Raft state that answers within `timeout` (the local one at once).
    pub async fn describe_quorum(&self, timeout: Duration) -> Vec<QuorumStatus> {
        let mut out = Vec::new();
        if let Some(local) = &self.inner.local {
            out.push(local.status());
        }
        let calls = self.inner.peers.values().map(|peer| async move {
            match peer.call(&Request::DescribeQuorum, timeout).await {
                Ok(Response::Quorum(status)) => Some(status),
                _ => None,
            }
        });
        out.extend(futures::future::join_all(calls).await.into_iter().flatten());
        out.sort_by_key(|s| s.node_id);
        out
    }
}

fn peers(
    voters: &BTreeMap<NodeId, String>,
    except: Option<NodeId>,
    frame_bytes_max: u32,
) -> BTreeMap<NodeId, RpcClient> {
    voters
        .iter()
        .filter(|(id, _)| Some(**id) != except)
        .map(|(id, addr)| (*id, RpcClient::new(addr.clone(), frame_bytes_max)))
        .collect()
}

/// Long-polls the voters for images newer than ours, until the client is dropped.
async fn follow(
    client: std::sync::Weak<ClientInner>,
    pollers: BTreeMap<NodeId, RpcClient>,
    tx: watch::Sender<Arc<MetadataImage>>,
) {
    let mut rotation = 0usize;
    let ids: Vec<NodeId> = pollers.keys().copied().collect();
    loop {
        let Some(inner) = client.upgrade() else {
            return;
        };
        let after = tx.borrow().offset;
        let preferred = *inner
            .leader_hint
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        drop(inner);
        let target = preferred
            .filter(|id| pollers.contains_key(id))
            .or_else(|| ids.get(rotation % ids.len().max(1)).copied());
        let Some(peer) = target.and_then(|id| pollers.get(&id)) else {
            return;
        };
        let request = Request::FetchMetadata {
            after,
            max_wait_ms: 5_000,
        };
        match peer.call(&request, Duration::from_secs(10)).await {
            Ok(Response::Metadata(Some(image))) => {
                if image.offset > tx.borrow().offset {
                    tx.send_replace(Arc::new(image));
                }
            }
            Ok(_) => {}
            Err(err) => {
                tracing::debug!(error = %err, "metadata fetch failed; trying another voter");
                rotation += 1;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

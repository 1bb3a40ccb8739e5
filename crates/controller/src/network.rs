//! openraft's network over the controller wire: one [`RpcClient`] per peer and stream.

use openraft::BasicNode;
use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};

use crate::raft::TypeConfig;
use crate::rpc::{Request, Response, RpcClient, RpcError};

/// Makes a client per peer.
#[derive(Debug, Clone)]
pub struct Network {
    /// Largest frame sent or received.
    pub frame_bytes_max: u32,
    /// The configured voters' addresses: they win over the addresses the membership was formed
    /// with, so that a voter can move (every node's configuration changed, then restarted).
    pub voters: std::collections::BTreeMap<crate::records::NodeId, String>,
}

/// The client of one peer.
#[derive(Debug)]
pub struct Peer {
    target: u64,
    client: RpcClient,
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = Peer;

    async fn new_client(&mut self, target: u64, node: &BasicNode) -> Peer {
        let configured = crate::records::NodeId::try_from(target)
            .ok()
            .and_then(|id| self.voters.get(&id));
        let addr = configured.unwrap_or(&node.addr).clone();
        Peer {
            target,
            client: RpcClient::new(addr, self.frame_bytes_max),
        }
    }
}

type RpcResult<T, E> = Result<T, RPCError<u64, BasicNode, E>>;

impl Peer {
    async fn call<E: std::error::Error>(
        &self,
        request: Request,
        option: &RPCOption,
    ) -> RpcResult<Response, E> {
        self.client
            .call(&request, option.hard_ttl())
            .await
            .map_err(|err| match err {
                // Down or unreachable: back off before trying again.
                RpcError::Io { .. } | RpcError::Timeout { .. } => {
                    RPCError::Unreachable(Unreachable::new(&err))
                }
                RpcError::Malformed { .. } => RPCError::Network(NetworkError::new(&err)),
            })
    }

    fn unexpected<E: std::error::Error>(&self) -> RPCError<u64, BasicNode, E> {
        let err = std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("controller {} answered with the wrong message", self.target),
        );
        RPCError::Network(NetworkError::new(&err))
    }

    fn remote<E: std::error::Error>(&self, err: E) -> RPCError<u64, BasicNode, E> {
        RPCError::RemoteError(RemoteError::new(self.target, err))
    }
}

impl RaftNetwork<TypeConfig> for Peer {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> RpcResult<AppendEntriesResponse<u64>, RaftError<u64>> {
        match self.call(Request::AppendEntries(rpc), &option).await? {
            Response::AppendEntries(result) => result.map_err(|e| self.remote(e)),
            _ => Err(self.unexpected()),
        }
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> RpcResult<InstallSnapshotResponse<u64>, RaftError<u64, InstallSnapshotError>> {
        match self.call(Request::InstallSnapshot(rpc), &option).await? {
            Response::InstallSnapshot(result) => result.map_err(|e| self.remote(e)),
            _ => Err(self.unexpected()),
        }
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<u64>,
        option: RPCOption,
    ) -> RpcResult<VoteResponse<u64>, RaftError<u64>> {
        match self.call(Request::Vote(rpc), &option).await? {
            Response::Vote(result) => result.map_err(|e| self.remote(e)),
            _ => Err(self.unexpected()),
        }
    }
}

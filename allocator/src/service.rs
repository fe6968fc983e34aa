//! `svcbroker.v1.Allocator`: a thin adapter from protobuf messages to
//! [`Store`](crate::Store) calls on the store thread.

use svcbroker_proto::v1 as pb;
use svcbroker_proto::v1::allocator_server::Allocator;
use tonic::{Request, Response, Status};
use tracing::{Span, field, instrument};

use crate::store::{PortRange, PortRequest, validate_name};
use crate::{Error, StoreHandle};

/// The gRPC service over a [`StoreHandle`].
#[derive(Debug, Clone)]
pub struct AllocatorService {
    store: StoreHandle,
}

impl AllocatorService {
    /// Serves requests from `store`.
    pub fn new(store: StoreHandle) -> Self {
        Self { store }
    }
}

/// Records pool and owner on the request span, only once they are valid
/// (bounded length, no control characters), so that a client cannot forge
/// or flood log lines.
fn record(pool: Option<&str>, owner: &str) {
    let span = Span::current();
    if let Some(pool) = pool {
        span.record("pool", pool);
    }
    span.record("owner", owner);
}

#[tonic::async_trait]
impl Allocator for AllocatorService {
    #[instrument(skip_all, fields(pool = field::Empty, owner = field::Empty))]
    async fn allocate_port(
        &self,
        request: Request<pb::AllocatePortRequest>,
    ) -> Result<Response<pb::AllocatePortResponse>, Status> {
        let req = request.into_inner();
        let range = req
            .range
            .ok_or_else(|| Error::InvalidArgument("range is required".into()))?;
        let range = PortRange::new(range.start, range.end)?;
        let req = PortRequest::new(req.pool, req.owner, range, req.preferred, req.exclude)?;
        record(Some(req.pool()), req.owner());
        let lease = self.store.call(move |s| s.allocate_port(&req)).await?;
        if lease.created {
            tracing::info!(port = lease.port, "port leased");
        } else {
            tracing::debug!(port = lease.port, "port lease exists");
        }
        Ok(Response::new(pb::AllocatePortResponse {
            port: lease.port.into(),
            created: lease.created,
        }))
    }

    #[instrument(skip_all, fields(pool = field::Empty, owner = field::Empty))]
    async fn release_port(
        &self,
        request: Request<pb::ReleasePortRequest>,
    ) -> Result<Response<pb::ReleasePortResponse>, Status> {
        let pb::ReleasePortRequest { pool, owner } = request.into_inner();
        validate_name("pool", &pool)?;
        validate_name("owner", &owner)?;
        record(Some(&pool), &owner);
        let released = self
            .store
            .call(move |s| s.release_port(&pool, &owner))
            .await?;
        if !released.is_empty() {
            tracing::info!(ports = ?released, "ports released");
        }
        Ok(Response::new(pb::ReleasePortResponse {
            released: released.into_iter().map(u32::from).collect(),
        }))
    }

    #[instrument(skip_all, fields(owner = field::Empty))]
    async fn issue_credential(
        &self,
        request: Request<pb::IssueCredentialRequest>,
    ) -> Result<Response<pb::IssueCredentialResponse>, Status> {
        let pb::IssueCredentialRequest { owner, kind } = request.into_inner();
        validate_name("owner", &owner)?;
        record(None, &owner);
        let issued = self
            .store
            .call(move |s| s.issue_credential(&owner, &kind))
            .await?;
        let c = issued.credential;
        // The username is not a secret and helps match node-side errors.
        if issued.created {
            tracing::info!(username = %c.username, "credential issued");
        }
        Ok(Response::new(pb::IssueCredentialResponse {
            credential: Some(pb::Credential {
                owner: c.owner,
                kind: c.kind,
                username: c.username,
                password: c.password,
            }),
            created: issued.created,
        }))
    }

    #[instrument(skip_all, fields(owner = field::Empty))]
    async fn revoke_credential(
        &self,
        request: Request<pb::RevokeCredentialRequest>,
    ) -> Result<Response<pb::RevokeCredentialResponse>, Status> {
        let owner = request.into_inner().owner;
        validate_name("owner", &owner)?;
        record(None, &owner);
        let revoked = self
            .store
            .call(move |s| s.revoke_credential(&owner))
            .await?;
        if revoked {
            tracing::info!("credential revoked");
        }
        Ok(Response::new(pb::RevokeCredentialResponse { revoked }))
    }

    #[instrument(skip_all)]
    async fn list_allocations(
        &self,
        request: Request<pb::ListAllocationsRequest>,
    ) -> Result<Response<pb::ListAllocationsResponse>, Status> {
        let pb::ListAllocationsRequest { pool, owner } = request.into_inner();
        let list = self
            .store
            .call(move |s| s.list(pool.as_deref(), owner.as_deref()))
            .await?;
        Ok(Response::new(pb::ListAllocationsResponse {
            leases: list
                .leases
                .into_iter()
                .map(|l| pb::PortLease {
                    pool: l.pool,
                    owner: l.owner,
                    port: l.port.into(),
                    created_at: l.created_at,
                })
                .collect(),
            // `CredentialInfo` has no password field: none can slip through.
            credentials: list
                .credentials
                .into_iter()
                .map(|c| pb::CredentialInfo {
                    owner: c.owner,
                    kind: c.kind,
                    username: c.username,
                    created_at: c.created_at,
                })
                .collect(),
        }))
    }
}

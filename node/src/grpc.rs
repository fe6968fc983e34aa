//! The `svcbroker.v1.NodeAgent` gRPC service: converts requests into
//! validated domain types and errors into statuses; the work is in
//! [`crate::node`].

use std::sync::Arc;

use svcbroker_proto::v1::node_agent_server::NodeAgent;
use svcbroker_proto::v1::{
    BindRequest, BindResponse, DeprovisionRequest, DeprovisionResponse, DescribeRequest,
    ListInstancesRequest, ListInstancesResponse, NodeInfo, ProvisionRequest, ProvisionResponse,
    UnbindRequest, UnbindResponse,
};
use tonic::{Request, Response, Status};

use crate::error::Error;
use crate::node::Node;
use crate::spec::{Binding, Deprovision, Provision};

/// The NodeAgent implementation.
pub(crate) struct Agent {
    pub node: Arc<Node>,
}

/// Runs `f` on its own task: tonic drops a handler's future when the client
/// hangs up, and a Provision cut off between spawn and supervision would
/// leave an unsupervised daemon behind.
async fn detached<T: Send + 'static>(
    f: impl Future<Output = Result<T, Error>> + Send + 'static,
) -> Result<T, Status> {
    // The handler's span (method, request id, instance id) follows the work
    // into the task, so its log lines carry them.
    match tokio::spawn(tracing::Instrument::in_current_span(f)).await {
        Ok(r) => r.map_err(Status::from),
        Err(e) => Err(Status::internal(format!("node task failed: {e}"))),
    }
}

/// Puts the instance id on the handler's span once it is validated: a raw
/// id could forge log lines (a newline) or flood them (megabytes).
fn record_instance(id: &str) {
    tracing::Span::current().record("instance_id", id);
}

#[tonic::async_trait]
impl NodeAgent for Agent {
    async fn describe(&self, _req: Request<DescribeRequest>) -> Result<Response<NodeInfo>, Status> {
        Ok(Response::new(self.node.info()))
    }

    #[tracing::instrument(skip_all, fields(instance_id = tracing::field::Empty))]
    async fn provision(
        &self,
        req: Request<ProvisionRequest>,
    ) -> Result<Response<ProvisionResponse>, Status> {
        let node = self.node.clone();
        let p = Provision::from_request(req.into_inner(), |port| node.port_in_range(port))?;
        record_instance(&p.instance_id);
        let result = detached(async move {
            node.provision(p).await.inspect_err(|e| {
                tracing::warn!(error = %e.summary(), "provision failed");
            })
        })
        .await?;
        let (instance, created) = result;
        Ok(Response::new(ProvisionResponse {
            instance: Some(instance),
            created,
        }))
    }

    #[tracing::instrument(skip_all, fields(instance_id = tracing::field::Empty))]
    async fn deprovision(
        &self,
        req: Request<DeprovisionRequest>,
    ) -> Result<Response<DeprovisionResponse>, Status> {
        let node = self.node.clone();
        let d = Deprovision::from_request(req.into_inner())?;
        record_instance(&d.instance_id);
        let removed = detached(async move {
            node.deprovision(d).await.inspect_err(|e| {
                tracing::warn!(error = %e.summary(), "deprovision failed");
            })
        })
        .await?;
        Ok(Response::new(DeprovisionResponse { removed }))
    }

    #[tracing::instrument(skip_all, fields(instance_id = tracing::field::Empty))]
    async fn bind(&self, req: Request<BindRequest>) -> Result<Response<BindResponse>, Status> {
        // The request carries a password: it is never logged as a whole.
        let b = Binding::from_bind(req.into_inner())?;
        record_instance(&b.instance_id);
        let node = self.node.clone();
        detached(async move {
            node.bind(&b).await.inspect_err(|e| {
                tracing::warn!(binding_id = %b.binding_id, error = %e.summary(), "bind failed");
            })
        })
        .await?;
        Ok(Response::new(BindResponse {}))
    }

    #[tracing::instrument(skip_all, fields(instance_id = tracing::field::Empty))]
    async fn unbind(
        &self,
        req: Request<UnbindRequest>,
    ) -> Result<Response<UnbindResponse>, Status> {
        let b = Binding::from_unbind(req.into_inner())?;
        record_instance(&b.instance_id);
        let node = self.node.clone();
        detached(async move {
            node.unbind(&b).await.inspect_err(|e| {
                tracing::warn!(binding_id = %b.binding_id, error = %e.summary(), "unbind failed");
            })
        })
        .await?;
        Ok(Response::new(UnbindResponse {}))
    }

    async fn list_instances(
        &self,
        _req: Request<ListInstancesRequest>,
    ) -> Result<Response<ListInstancesResponse>, Status> {
        Ok(Response::new(ListInstancesResponse {
            instances: self.node.list(),
        }))
    }
}

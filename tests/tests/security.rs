//! The internal bearer token: every gRPC server (allocator, node, gateway
//! registry) refuses calls without it or with a wrong one, accepts the
//! right one, and answers grpc.health.v1 without one so that probes work.

use svcbroker_proto::v1::allocator_client::AllocatorClient;
use svcbroker_proto::v1::node_agent_client::NodeAgentClient;
use svcbroker_proto::v1::registry_client::RegistryClient;
use svcbroker_proto::v1::{AnnounceRequest, DescribeRequest, ListAllocationsRequest};
use svcbroker_tests::Stack;
use svcbroker_tests::stack::{TEST_TOKEN, connect_with_token};
use tokio_stream::StreamExt as _;
use tonic::Code;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

const WRONG: &str = "not-the-token";

/// The code of one representative call to the server at `url` with
/// `token`; `Ok` as `Code::Ok`.
async fn call(server: &str, url: &str, token: Option<&str>) -> Code {
    let channel = connect_with_token(url, token).await;
    let result = match server {
        "allocator" => AllocatorClient::new(channel)
            .list_allocations(ListAllocationsRequest {
                pool: None,
                owner: None,
            })
            .await
            .map(|_| ()),
        "node" => NodeAgentClient::new(channel)
            .describe(DescribeRequest {})
            .await
            .map(|_| ()),
        // An empty announcement is invalid, which is past authentication.
        "registry" => RegistryClient::new(channel)
            .announce(AnnounceRequest { node: None })
            .await
            .map(|_| ()),
        other => unreachable!("{other}"),
    };
    match result {
        Ok(()) => Code::Ok,
        Err(status) => status.code(),
    }
}

fn servers(stack: &Stack) -> Vec<(&'static str, String)> {
    vec![
        ("allocator", stack.allocator_url.clone()),
        ("node", stack.node_url.clone()),
        ("registry", stack.gateway_grpc_url.clone()),
    ]
}

#[tokio::test(flavor = "multi_thread")]
async fn calls_need_the_token() {
    let stack = Stack::start_default().await;
    for (server, url) in servers(&stack) {
        assert_eq!(
            call(server, &url, None).await,
            Code::Unauthenticated,
            "{server} without a token"
        );
        assert_eq!(
            call(server, &url, Some(WRONG)).await,
            Code::Unauthenticated,
            "{server} with a wrong token"
        );
        let with = call(server, &url, Some(TEST_TOKEN)).await;
        assert_ne!(with, Code::Unauthenticated, "{server} with the token");
        if server != "registry" {
            assert_eq!(with, Code::Ok, "{server} with the token");
        } else {
            assert_eq!(with, Code::InvalidArgument, "{server} with the token");
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn health_answers_without_a_token() {
    let stack = Stack::start_default().await;
    for (server, url) in servers(&stack) {
        for token in [None, Some(WRONG)] {
            let r = HealthClient::new(connect_with_token(&url, token).await)
                .check(HealthCheckRequest {
                    service: String::new(),
                })
                .await
                .unwrap_or_else(|e| panic!("{server} health with {token:?}: {e}"))
                .into_inner();
            assert_eq!(r.status(), ServingStatus::Serving, "{server}");
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn reflection_needs_the_token() {
    use tonic_reflection::pb::v1alpha::ServerReflectionRequest;
    use tonic_reflection::pb::v1alpha::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1alpha::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1alpha::server_reflection_response::MessageResponse;

    let stack = Stack::start_default().await;
    let list = || {
        tokio_stream::iter(vec![ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        }])
    };
    for (server, url) in servers(&stack) {
        // grpcurl's `list` path: v1alpha reflection.
        let refused = ServerReflectionClient::new(connect_with_token(&url, None).await)
            .server_reflection_info(list())
            .await;
        let refused = match refused {
            Err(status) => status.code(),
            Ok(stream) => match stream.into_inner().next().await {
                Some(Err(status)) => status.code(),
                other => panic!("{server}: reflection without a token answered {other:?}"),
            },
        };
        assert_eq!(refused, Code::Unauthenticated, "{server}");

        let mut stream =
            ServerReflectionClient::new(connect_with_token(&url, Some(TEST_TOKEN)).await)
                .server_reflection_info(list())
                .await
                .unwrap_or_else(|e| panic!("{server} reflection: {e}"))
                .into_inner();
        let response = stream
            .next()
            .await
            .expect("one response")
            .unwrap_or_else(|e| panic!("{server} reflection: {e}"));
        let Some(MessageResponse::ListServicesResponse(names)) = response.message_response else {
            panic!("{server}: not a list response");
        };
        let names: Vec<String> = names.service.into_iter().map(|s| s.name).collect();
        assert!(
            names.iter().any(|n| n.starts_with("svcbroker.v1.")),
            "{server}: {names:?}"
        );
        assert!(
            names.iter().any(|n| n == "grpc.health.v1.Health"),
            "{server}: {names:?}"
        );
    }
}

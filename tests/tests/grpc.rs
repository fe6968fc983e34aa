//! Every gRPC server (allocator, node, gateway registry) answers
//! grpc.health.v1 with SERVING and server reflection in both v1 and v1alpha,
//! so grpcurl works without proto files.

use svcbroker_tests::Stack;
use svcbroker_tests::stack::connect;
use tokio_stream::StreamExt as _;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

async fn servers(stack: &Stack) -> Vec<(&'static str, String)> {
    vec![
        ("svcbroker.v1.Allocator", stack.allocator_url.clone()),
        ("svcbroker.v1.NodeAgent", stack.node_url.clone()),
        ("svcbroker.v1.Registry", stack.gateway_grpc_url.clone()),
    ]
}

#[tokio::test(flavor = "multi_thread")]
async fn health_reports_serving_for_each_service() {
    let stack = Stack::start_default().await;
    for (service, url) in servers(&stack).await {
        let mut health = HealthClient::new(connect(&url).await);
        for name in ["", service] {
            let r = health
                .check(HealthCheckRequest {
                    service: name.to_string(),
                })
                .await
                .unwrap_or_else(|e| panic!("health check {name:?} at {url}: {e}"))
                .into_inner();
            assert_eq!(r.status(), ServingStatus::Serving, "{name:?} at {url}");
        }
        let unknown = health
            .check(HealthCheckRequest {
                service: "no.such.Service".into(),
            })
            .await
            .expect_err("unknown service");
        assert_eq!(unknown.code(), tonic::Code::NotFound);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn reflection_v1_lists_and_describes_services() {
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

    let stack = Stack::start_default().await;
    for (service, url) in servers(&stack).await {
        let mut client = ServerReflectionClient::new(connect(&url).await);
        let requests = vec![
            ServerReflectionRequest {
                host: String::new(),
                message_request: Some(MessageRequest::ListServices(String::new())),
            },
            ServerReflectionRequest {
                host: String::new(),
                message_request: Some(MessageRequest::FileContainingSymbol(service.into())),
            },
        ];
        let mut stream = client
            .server_reflection_info(tokio_stream::iter(requests))
            .await
            .unwrap_or_else(|e| panic!("reflection v1 at {url}: {e}"))
            .into_inner();
        let first = stream.next().await.expect("list answer").expect("list ok");
        let Some(MessageResponse::ListServicesResponse(list)) = first.message_response else {
            panic!("unexpected answer {first:?}");
        };
        let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
        for want in [service, "grpc.health.v1.Health"] {
            assert!(
                names.iter().any(|n| n == want),
                "{want} missing at {url}: {names:?}"
            );
        }
        let second = stream.next().await.expect("file answer").expect("file ok");
        let Some(MessageResponse::FileDescriptorResponse(files)) = second.message_response else {
            panic!("no descriptor for {service} at {url}: {second:?}");
        };
        assert!(!files.file_descriptor_proto.is_empty());
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn reflection_v1alpha_lists_services() {
    use tonic_reflection::pb::v1alpha::ServerReflectionRequest;
    use tonic_reflection::pb::v1alpha::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1alpha::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1alpha::server_reflection_response::MessageResponse;

    let stack = Stack::start_default().await;
    for (service, url) in servers(&stack).await {
        let mut client = ServerReflectionClient::new(connect(&url).await);
        let requests = vec![ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        }];
        let mut stream = client
            .server_reflection_info(tokio_stream::iter(requests))
            .await
            .unwrap_or_else(|e| panic!("reflection v1alpha at {url}: {e}"))
            .into_inner();
        let first = stream.next().await.expect("list answer").expect("list ok");
        let Some(MessageResponse::ListServicesResponse(list)) = first.message_response else {
            panic!("unexpected answer {first:?}");
        };
        let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
        assert!(
            names.iter().any(|n| n == service),
            "{service} missing at {url}: {names:?}"
        );
    }
}

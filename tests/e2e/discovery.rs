//! Health checking and server reflection, as load balancers and tools such
//! as grpcurl use them.

use offload_e2e::Server;
use prost::Message;
use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient};

#[tokio::test]
async fn health_reports_serving_for_the_server_and_the_compute_service() {
    let server = Server::start(&[]);
    let mut health = HealthClient::new(server.channel().await);
    for service in ["", "offload.v1.Compute"] {
        let status = health.check(HealthCheckRequest { service: service.into() }).await.unwrap().into_inner().status;
        assert_eq!(status, ServingStatus::Serving as i32, "{service:?}");
    }
    let err = health.check(HealthCheckRequest { service: "no.Such".into() }).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);
}

#[tokio::test]
async fn reflection_v1_and_v1alpha_describe_the_api() {
    use tonic_reflection::pb::{v1, v1alpha};
    let server = Server::start(&[]);

    let mut client = v1::server_reflection_client::ServerReflectionClient::new(server.channel().await);
    let ask =
        |message_request| v1::ServerReflectionRequest { host: String::new(), message_request: Some(message_request) };
    let requests = vec![
        ask(v1::server_reflection_request::MessageRequest::ListServices(String::new())),
        ask(v1::server_reflection_request::MessageRequest::FileContainingSymbol("offload.v1.Compute".into())),
    ];
    let mut answers = client.server_reflection_info(tokio_stream::iter(requests)).await.unwrap().into_inner();
    let listed = answers.message().await.unwrap().unwrap().message_response.unwrap();
    let v1::server_reflection_response::MessageResponse::ListServicesResponse(list) = listed else {
        panic!("expected a service list, got {listed:?}")
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for expected in ["offload.v1.Compute", "grpc.health.v1.Health", "grpc.reflection.v1.ServerReflection"] {
        assert!(names.iter().any(|n| n == expected), "{expected} missing from {names:?}");
    }
    let file = answers.message().await.unwrap().unwrap().message_response.unwrap();
    let v1::server_reflection_response::MessageResponse::FileDescriptorResponse(files) = file else {
        panic!("expected file descriptors, got {file:?}")
    };
    let compute = files
        .file_descriptor_proto
        .iter()
        .map(|bytes| prost_types::FileDescriptorProto::decode(bytes.as_slice()).unwrap())
        .find(|f| f.package() == "offload.v1")
        .expect("the offload.v1 file");
    let methods: Vec<&str> = compute.service[0].method.iter().map(|m| m.name()).collect();
    assert_eq!(methods, ["Execute", "ExecuteStream", "ExecuteBatch", "ListTasks"]);

    let mut alpha = v1alpha::server_reflection_client::ServerReflectionClient::new(server.channel().await);
    let request = v1alpha::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(v1alpha::server_reflection_request::MessageRequest::ListServices(String::new())),
    };
    let mut answers = alpha.server_reflection_info(tokio_stream::iter([request])).await.unwrap().into_inner();
    let listed = answers.message().await.unwrap().unwrap().message_response.unwrap();
    assert!(format!("{listed:?}").contains("offload.v1.Compute"));
}

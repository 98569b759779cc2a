use offload_e2e::{Server, request};

#[tokio::test]
async fn sha256_over_grpc() {
    let server = Server::start(&[]);
    let mut client = server.client().await;
    let out = client.execute(request("hash.sha256", &[], &b"abc"[..])).await.unwrap().into_inner();
    assert_eq!(hex::encode(out.output), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
}

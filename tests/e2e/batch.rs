//! ExecuteBatch: every item answered exactly once, failures per item.

use std::collections::HashMap;

use offload_e2e::{Server, request};
use offload_proto::offload::v1::ExecuteRequest;
use sha2::Digest;
use tonic::Code;

#[tokio::test]
async fn a_thousand_mixed_items_are_each_answered_once() {
    let server = Server::start(&[]);
    let mut client = server.client().await;
    let mut expected: HashMap<String, Result<Vec<u8>, Code>> = HashMap::new();
    let mut items = Vec::new();
    for i in 0..1000 {
        let id = format!("item-{i}");
        let input = format!("input {i}").into_bytes();
        let (req, want) = match i % 5 {
            0 => (request("debug.echo", &[], input.clone()), Ok(input)),
            1 => (request("hash.sha256", &[], input.clone()), Ok(sha2::Sha256::digest(&input).to_vec())),
            2 => (request("primes.count", &[("limit", "1000")], vec![]), Ok(b"168".to_vec())),
            3 => (request("no.such.task", &[], vec![]), Err(Code::NotFound)),
            _ => (request("debug.sleep", &[("ms", "1")], vec![]), Ok(Vec::new())),
        };
        expected.insert(id.clone(), want);
        items.push(ExecuteRequest { id, ..req });
    }
    let mut results = client.execute_batch(tokio_stream::iter(items)).await.unwrap().into_inner();
    let mut seen = 0;
    while let Some(item) = results.message().await.unwrap() {
        let want = expected.remove(&item.id).unwrap_or_else(|| panic!("unexpected or repeated id {:?}", item.id));
        match want {
            Ok(output) => {
                assert!(item.error.is_none(), "{}: {:?}", item.id, item.error);
                assert_eq!(item.output.as_ref(), output.as_slice(), "{}", item.id);
            }
            Err(code) => {
                let error = item.error.unwrap_or_else(|| panic!("{} should fail", item.id));
                assert_eq!(error.code, code as i32, "{}: {}", item.id, error.message);
                assert!(error.message.contains("unknown task"), "{}", error.message);
            }
        }
        seen += 1;
    }
    assert_eq!(seen, 1000);
    assert!(expected.is_empty(), "unanswered: {:?}", expected.keys().take(5).collect::<Vec<_>>());
}

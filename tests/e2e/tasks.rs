//! Every built-in task over the wire, checked against reference libraries.

use std::io::Cursor;

use offload_e2e::{Server, request};
use offload_proto::offload::v1::{ExecuteRequest, ExecutionMode, ListTasksRequest};
use sha2::Digest;
use tonic::Code;

fn pseudo_random(len: usize) -> Vec<u8> {
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

#[tokio::test]
async fn every_task_gives_the_reference_answer() {
    let server = Server::start(&[]);
    let mut client = server.client().await;
    let data = pseudo_random(3 << 20);

    let out = client.execute(request("hash.sha256", &[], data.clone())).await.unwrap().into_inner();
    assert_eq!(out.output.as_ref(), sha2::Sha256::digest(&data).as_slice());
    let out = client.execute(request("hash.blake3", &[], data.clone())).await.unwrap().into_inner();
    assert_eq!(out.output.as_ref(), blake3::hash(&data).as_bytes());

    let out = client.execute(request("primes.count", &[("limit", "10000000")], vec![])).await.unwrap().into_inner();
    assert_eq!(out.output.as_ref(), b"664579");

    let text: Vec<u8> = b"offload ".iter().copied().cycle().take(1 << 20).collect();
    let packed = client.execute(request("compress.zstd", &[("level", "7")], text.clone())).await.unwrap().into_inner();
    assert!(packed.output.len() < text.len() / 10);
    assert_eq!(zstd::decode_all(packed.output.as_ref()).unwrap(), text);
    let foreign = zstd::encode_all(&text[..], 3).unwrap();
    let unpacked = client.execute(request("decompress.zstd", &[], foreign)).await.unwrap().into_inner();
    assert_eq!(unpacked.output.as_ref(), text.as_slice());

    let out = client.execute(request("debug.echo", &[], &b"ping"[..])).await.unwrap().into_inner();
    assert_eq!(out.output.as_ref(), b"ping");
    let out = client.execute(request("debug.alloc", &[("bytes", "3000000")], vec![])).await.unwrap().into_inner();
    assert_eq!(out.output.as_ref(), b"3000000");
    for task in ["debug.sleep", "debug.spin"] {
        let out = client.execute(request(task, &[("ms", "20")], vec![])).await.unwrap().into_inner();
        assert!(out.stats.unwrap().run_us() >= 20_000, "{task} ran its full time");
    }
}

#[tokio::test]
async fn thumbnails_fit_the_box() {
    let server = Server::start(&[]);
    let mut client = server.client().await;
    let source = image::RgbImage::from_fn(300, 120, |x, y| image::Rgb([x as u8, y as u8, 7]));
    let mut png = Cursor::new(Vec::new());
    source.write_to(&mut png, image::ImageFormat::Png).unwrap();
    for (format, expected) in
        [("png", image::ImageFormat::Png), ("jpeg", image::ImageFormat::Jpeg), ("webp", image::ImageFormat::WebP)]
    {
        let params = [("width", "100"), ("height", "100"), ("format", format)];
        let out =
            client.execute(request("image.thumbnail", &params, png.get_ref().clone())).await.unwrap().into_inner();
        assert_eq!(image::guess_format(&out.output).unwrap(), expected);
        let thumb = image::load_from_memory(&out.output).unwrap();
        assert_eq!((thumb.width(), thumb.height()), (100, 40), "{format}");
    }
    let err = client
        .execute(request("image.thumbnail", &[("width", "10"), ("height", "10")], png.get_ref()[..200].to_vec()))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
}

#[tokio::test]
async fn a_decompression_bomb_is_refused_and_the_server_serves_on() {
    let server = Server::start(&["--max-decompressed-bytes", "1048576"]);
    let mut client = server.client().await;
    let bomb = zstd::encode_all(&vec![0u8; 64 << 20][..], 19).unwrap();
    let err = client.execute(request("decompress.zstd", &[], bomb)).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(err.message().contains("1048576"), "{}", err.message());
    let ok = zstd::encode_all(&vec![1u8; 1000][..], 3).unwrap();
    assert_eq!(client.execute(request("decompress.zstd", &[], ok)).await.unwrap().into_inner().output.len(), 1000);
}

#[tokio::test]
async fn responses_echo_the_id_and_say_where_they_ran() {
    let server = Server::start(&["--replica-name", "replica-7"]);
    let mut client = server.client().await;
    let body =
        ExecuteRequest { id: "call-42".into(), mode: ExecutionMode::Pool as i32, ..request("debug.echo", &[], vec![]) };
    let out = client.execute(body).await.unwrap().into_inner();
    assert_eq!(out.id, "call-42");
    assert_eq!(out.mode, ExecutionMode::Pool as i32);
    let stats = out.stats.unwrap();
    assert_eq!(stats.replica, "replica-7");
    assert_eq!(stats.worker_pid, 0);
    assert!(out.error.is_none());
}

#[tokio::test]
async fn list_tasks_describes_params_and_modes_and_hides_debug_tasks_by_default() {
    let server = Server::start_exact(&["--listen", "127.0.0.1:0"]);
    let tasks = server.client().await.list_tasks(ListTasksRequest {}).await.unwrap().into_inner().tasks;
    let names: Vec<&str> = tasks.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(
        names,
        ["compress.zstd", "decompress.zstd", "hash.blake3", "hash.sha256", "image.thumbnail", "primes.count"]
    );
    let primes = tasks.iter().find(|t| t.name == "primes.count").unwrap();
    assert_eq!(primes.default_mode, ExecutionMode::Pool as i32);
    assert_eq!(primes.allowed_modes, [ExecutionMode::Pool as i32, ExecutionMode::Isolated as i32]);
    assert_eq!(primes.params.len(), 1);
    assert!(primes.params[0].required && primes.params[0].name == "limit");
    let zstd = tasks.iter().find(|t| t.name == "compress.zstd").unwrap();
    assert_eq!((zstd.params[0].default_value.as_str(), zstd.params[0].required), ("3", false));

    let debug = Server::start(&[]);
    let tasks = debug.client().await.list_tasks(ListTasksRequest {}).await.unwrap().into_inner().tasks;
    let abort = tasks.iter().find(|t| t.name == "debug.abort").expect("debug tasks listed with --debug-tasks");
    assert_eq!(abort.allowed_modes, [ExecutionMode::Isolated as i32]);
    assert_eq!(tasks.iter().filter(|t| t.name.starts_with("debug.")).count(), 7);
    assert!(tasks.iter().any(|t| t.name == "debug.probe"));
}

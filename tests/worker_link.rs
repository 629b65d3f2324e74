//! The worker's lower-level link API (`worker::link`), as a worker that acknowledges late
//! uses it: a connection received but not acknowledged when the link breaks comes again
//! on the next link; an acknowledged one is the worker's.

mod common;

use std::io::{Read, Write};

use common::*;
use sticky_dispatch::shared::default_peer_users;
use sticky_dispatch::worker::link::LinkServer;
use sticky_dispatch::worker::WorkerOptions;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test]
async fn unacknowledged_connections_come_again_on_the_next_link() {
    let alone = Alone::start("worker-link", 1, &[]);
    let server = LinkServer::bind(&WorkerOptions {
        index: 0,
        socket_prefix: alone.prefix.clone(),
        dispatcher_users: default_peer_users(),
        drain_on_sigterm: false,
    })
    .unwrap();

    let addr = alone.addr;
    let client = std::thread::spawn(move || {
        let mut stream = std::net::TcpStream::connect(addr).unwrap();
        stream.write_all(b"ping").unwrap();
        let mut answer = String::new();
        stream.read_to_string(&mut answer).unwrap();
        answer
    });

    // The first link receives the connection and breaks before acknowledging it, as a
    // bridge does when its app crashes.
    let mut link = server.accept().await.unwrap().handshake().await.unwrap();
    let first = link.recv().await.unwrap().expect("a connection");
    assert_eq!(first.seq(), 1);
    let peer = first.client.peer;
    drop((first, link));

    let mut link = server.accept().await.unwrap().handshake().await.unwrap();
    let again = link
        .recv()
        .await
        .unwrap()
        .expect("the same connection again");
    assert_eq!((again.seq(), again.client.peer), (1, peer));
    link.ack(again.seq()).await.unwrap();
    let (mut stream, _) = again.into_tcp_stream().unwrap();
    let mut ping = [0u8; 4];
    stream.read_exact(&mut ping).await.unwrap();
    assert_eq!(&ping, b"ping");
    stream.write_all(b"pong").await.unwrap();
    drop(stream);
    assert_eq!(client.join().unwrap(), "pong");

    // Acknowledging what was not received is refused locally.
    assert!(link.ack(2).await.is_err());
    // A drain with nothing in flight ends at once; the link stays usable until dropped.
    link.drain().await.unwrap();
    assert!(link.recv().await.unwrap().is_none());
    alone
        .dispatcher
        .log
        .wait_for(&["worker is draining", "last_seq=1"]);
}

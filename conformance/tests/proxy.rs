//! The fault proxy against a local echo server: it passes bytes, drops them silently while the
//! connection stays open, passes again after the partition, and resets connections.

use std::time::Duration;

use leaselock_conformance::proxy::{Proxy, ProxyMode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// An echo server on a free port.
async fn echo_server() -> std::net::SocketAddr {
    let listener = TcpListener::bind(("127.0.0.1", 0)).await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (mut socket, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                let mut buf = [0u8; 1024];
                loop {
                    match socket.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => {
                            if socket.write_all(&buf[..n]).await.is_err() {
                                return;
                            }
                        }
                    }
                }
            });
        }
    });
    addr
}

async fn round_trip(stream: &mut TcpStream, msg: &[u8]) -> std::io::Result<Vec<u8>> {
    stream.write_all(msg).await?;
    let mut buf = vec![0u8; msg.len()];
    stream.read_exact(&mut buf).await?;
    Ok(buf)
}

#[tokio::test]
async fn passes_blackholes_and_resets() {
    let proxy = Proxy::start(echo_server().await).await.unwrap();
    let mut client = TcpStream::connect(proxy.addr()).await.unwrap();
    assert_eq!(round_trip(&mut client, b"hello").await.unwrap(), b"hello");
    assert_eq!(proxy.handle().connections(), 1);

    // A silent partition: the bytes vanish, nothing closes.
    proxy.set(ProxyMode::Blackhole);
    let lost =
        tokio::time::timeout(Duration::from_millis(500), round_trip(&mut client, b"lost")).await;
    assert!(lost.is_err(), "no answer through a blackhole: {lost:?}");
    // New connections are accepted, and silent too.
    let mut late = TcpStream::connect(proxy.addr()).await.unwrap();
    let silent =
        tokio::time::timeout(Duration::from_millis(300), round_trip(&mut late, b"x")).await;
    assert!(
        silent.is_err(),
        "a new connection is silent too: {silent:?}"
    );

    // Healed: the same connection works again (what was dropped stays dropped).
    proxy.set(ProxyMode::Pass);
    let mut fresh = TcpStream::connect(proxy.addr()).await.unwrap();
    assert_eq!(round_trip(&mut fresh, b"again").await.unwrap(), b"again");

    // Reset: open connections get an RST, new ones too.
    proxy.set(ProxyMode::Reset);
    let mut buf = [0u8; 8];
    let read = tokio::time::timeout(Duration::from_secs(5), fresh.read(&mut buf))
        .await
        .expect("the reset arrives at once");
    assert!(
        matches!(&read, Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset),
        "an open connection is reset: {read:?}"
    );
    let mut refused = TcpStream::connect(proxy.addr()).await.unwrap();
    let outcome =
        tokio::time::timeout(Duration::from_secs(5), round_trip(&mut refused, b"no")).await;
    assert!(
        matches!(outcome, Ok(Err(_))),
        "a connection made during a reset fails: {outcome:?}"
    );
}

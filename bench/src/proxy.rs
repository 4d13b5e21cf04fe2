//! A TCP proxy that counts round trips: placed between a client and its server, it counts every
//! burst of client→server bytes that follows a server reply (or opens a connection). A request
//! and its answer make one round trip, however many packets either takes; requests pipelined
//! before an answer arrives count once, since the client waits for them together.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// What the proxy has seen so far.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Snapshot {
    /// Client→server request bursts (each waits for a reply): round trips.
    pub(crate) round_trips: u64,
    /// Connections opened through the proxy.
    pub(crate) connections: u64,
}

impl std::ops::Sub for Snapshot {
    type Output = Snapshot;
    fn sub(self, earlier: Snapshot) -> Snapshot {
        Snapshot {
            round_trips: self.round_trips - earlier.round_trips,
            connections: self.connections - earlier.connections,
        }
    }
}

#[derive(Default)]
struct Counters {
    round_trips: AtomicU64,
    connections: AtomicU64,
}

/// A running counting proxy; stops (closing every connection through it) when dropped.
pub(crate) struct Proxy {
    addr: SocketAddr,
    counters: Arc<Counters>,
    task: JoinHandle<()>,
}

impl Proxy {
    /// Listens on an ephemeral port of 127.0.0.1 and forwards every connection to `upstream`.
    pub(crate) async fn start(upstream: SocketAddr) -> std::io::Result<Self> {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
        let addr = listener.local_addr()?;
        let counters = Arc::new(Counters::default());
        let task = tokio::spawn(accept(listener, upstream, Arc::clone(&counters)));
        Ok(Self {
            addr,
            counters,
            task,
        })
    }

    /// Where clients connect.
    pub(crate) fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The counts so far.
    pub(crate) fn snapshot(&self) -> Snapshot {
        Snapshot {
            round_trips: self.counters.round_trips.load(Ordering::SeqCst),
            connections: self.counters.connections.load(Ordering::SeqCst),
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        // Dropping the accept task drops its JoinSet, which aborts every connection's pump.
        self.task.abort();
    }
}

async fn accept(listener: TcpListener, upstream: SocketAddr, counters: Arc<Counters>) {
    let mut connections = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((client, _)) = accepted else { continue };
                counters.connections.fetch_add(1, Ordering::SeqCst);
                connections.spawn(forward(client, upstream, Arc::clone(&counters)));
            }
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

async fn forward(client: TcpStream, upstream: SocketAddr, counters: Arc<Counters>) {
    let Ok(server) = TcpStream::connect(upstream).await else {
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (mut client_read, mut client_write) = client.into_split();
    let (mut server_read, mut server_write) = server.into_split();
    // Whether the client has sent something the server has not answered yet.
    let awaiting = Arc::new(AtomicBool::new(false));
    let up = {
        let awaiting = Arc::clone(&awaiting);
        async move {
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                let n = match client_read.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                // Set before forwarding, so the reply cannot be seen first.
                if !awaiting.swap(true, Ordering::SeqCst) {
                    counters.round_trips.fetch_add(1, Ordering::SeqCst);
                }
                if server_write.write_all(&buf[..n]).await.is_err() {
                    break;
                }
            }
            let _ = server_write.shutdown().await;
        }
    };
    let down = async move {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match server_read.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            awaiting.store(false, Ordering::SeqCst);
            if client_write.write_all(&buf[..n]).await.is_err() {
                break;
            }
        }
        let _ = client_write.shutdown().await;
    };
    tokio::join!(up, down);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An echo server behind the proxy: three request/reply exchanges are three round trips,
    /// one connection.
    #[tokio::test]
    async fn counts_request_reply_exchanges() {
        let echo = TcpListener::bind(("127.0.0.1", 0)).await.unwrap();
        let echo_addr = echo.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut s, _) = echo.accept().await.unwrap();
            let mut buf = [0u8; 1024];
            loop {
                let n = s.read(&mut buf).await.unwrap();
                if n == 0 {
                    break;
                }
                s.write_all(&buf[..n]).await.unwrap();
            }
        });
        let proxy = Proxy::start(echo_addr).await.unwrap();
        let mut c = TcpStream::connect(proxy.addr()).await.unwrap();
        let mut buf = [0u8; 5];
        for _ in 0..3 {
            c.write_all(b"hello").await.unwrap();
            c.read_exact(&mut buf).await.unwrap();
        }
        assert_eq!(
            proxy.snapshot(),
            Snapshot {
                round_trips: 3,
                connections: 1
            }
        );
    }
}

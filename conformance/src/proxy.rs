//! A small TCP proxy for fault tests: it passes traffic, drops it silently, or resets
//! connections, so a test can cut one client off from its server while everyone else still
//! reaches it.
//!
//! Point a backend's URL at [`Proxy::addr`] instead of the server's address, then switch the
//! [`ProxyHandle`] between modes:
//!
//! - [`ProxyMode::Pass`]: bytes flow both ways (the default).
//! - [`ProxyMode::Blackhole`]: a silent partition. Connections stay open and new ones are
//!   accepted, but every byte in either direction is read and discarded; nobody sees a close or a
//!   reset, so each side learns of the partition only through its own timeouts.
//! - [`ProxyMode::Reset`]: every open connection is reset (RST) at once, and new ones are reset as
//!   soon as they are accepted.
//!
//! ```no_run
//! use leaselock_conformance::proxy::{Proxy, ProxyMode};
//! # #[tokio::main] async fn main() -> std::io::Result<()> {
//! let proxy = Proxy::start("127.0.0.1:5432".parse().unwrap()).await?;
//! let url = format!("postgres://postgres@{}/app", proxy.addr());
//! // ... connect through `url`, acquire a lock ...
//! proxy.handle().set(ProxyMode::Blackhole); // partition the holder
//! # Ok(()) }
//! ```
//!
//! Only tokio; it forwards to one upstream address and never leaves loopback unless told to.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// What the proxy does with traffic.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProxyMode {
    /// Forward bytes both ways.
    Pass,
    /// Keep connections open and discard every byte: a silent partition.
    Blackhole,
    /// Reset every open connection now, and every new one on accept.
    Reset,
}

/// Switches a running [`Proxy`] between modes. Cheap to clone.
#[derive(Clone, Debug)]
pub struct ProxyHandle {
    mode: Arc<watch::Sender<ProxyMode>>,
    connections: Arc<AtomicU64>,
}

impl ProxyHandle {
    /// Switches to `mode`. Switching to [`ProxyMode::Reset`] resets the connections open now, at
    /// once.
    pub fn set(&self, mode: ProxyMode) {
        self.mode.send_replace(mode);
    }

    /// The current mode.
    pub fn mode(&self) -> ProxyMode {
        *self.mode.borrow()
    }

    /// How many client connections the proxy has accepted so far.
    pub fn connections(&self) -> u64 {
        self.connections.load(Ordering::SeqCst)
    }
}

/// A running proxy; it stops (dropping every connection) when dropped.
#[derive(Debug)]
pub struct Proxy {
    addr: SocketAddr,
    upstream: SocketAddr,
    handle: ProxyHandle,
    accept: JoinHandle<()>,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
        // Connection tasks end when they see the proxy gone.
        self.handle.mode.send_replace(ProxyMode::Reset);
    }
}

impl Proxy {
    /// Listens on a free port of 127.0.0.1 and forwards to `upstream`, in [`ProxyMode::Pass`].
    pub async fn start(upstream: SocketAddr) -> io::Result<Self> {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
        let addr = listener.local_addr()?;
        let (tx, rx) = watch::channel(ProxyMode::Pass);
        let handle = ProxyHandle {
            mode: Arc::new(tx),
            connections: Arc::new(AtomicU64::new(0)),
        };
        let connections = Arc::clone(&handle.connections);
        let accept = tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    continue;
                };
                connections.fetch_add(1, Ordering::SeqCst);
                let rx = rx.clone();
                tokio::spawn(serve(client, upstream, rx));
            }
        });
        Ok(Self {
            addr,
            upstream,
            handle,
            accept,
        })
    }

    /// Where clients connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Where traffic goes.
    pub fn upstream(&self) -> SocketAddr {
        self.upstream
    }

    /// The switch.
    pub fn handle(&self) -> ProxyHandle {
        self.handle.clone()
    }

    /// Shorthand for `self.handle().set(mode)`.
    pub fn set(&self, mode: ProxyMode) {
        self.handle.set(mode);
    }
}

/// Drops a stream with an RST instead of a FIN.
fn reset(stream: TcpStream) {
    // SO_LINGER with a zero timeout makes close() send a reset.
    #[allow(deprecated)]
    let _ = stream.set_linger(Some(std::time::Duration::ZERO));
    drop(stream);
}

async fn serve(client: TcpStream, upstream: SocketAddr, mut mode: watch::Receiver<ProxyMode>) {
    if *mode.borrow_and_update() == ProxyMode::Reset {
        reset(client);
        return;
    }
    let server = match TcpStream::connect(upstream).await {
        Ok(server) => server,
        Err(_) => {
            reset(client);
            return;
        }
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (mut client_read, mut client_write) = client.into_split();
    let (mut server_read, mut server_write) = server.into_split();
    let mut up_buf = vec![0u8; 16 * 1024];
    let mut down_buf = vec![0u8; 16 * 1024];
    // A side that closed is not read again; in a blackhole its close is not passed on either.
    let mut client_open = true;
    let mut server_open = true;
    loop {
        let current = *mode.borrow();
        tokio::select! {
            biased;
            changed = mode.changed() => {
                let now = *mode.borrow_and_update();
                if changed.is_err() || now == ProxyMode::Reset {
                    break;
                }
                if now == ProxyMode::Pass {
                    // The partition heals: closes that happened during it arrive now.
                    if !client_open {
                        let _ = server_write.shutdown().await;
                    }
                    if !server_open {
                        let _ = client_write.shutdown().await;
                    }
                }
            }
            read = client_read.read(&mut up_buf), if client_open => match read {
                Ok(0) | Err(_) => {
                    client_open = false;
                    if current == ProxyMode::Pass {
                        let _ = server_write.shutdown().await;
                    }
                }
                Ok(n) => {
                    if current == ProxyMode::Pass
                        && server_write.write_all(&up_buf[..n]).await.is_err()
                    {
                        break;
                    }
                }
            },
            read = server_read.read(&mut down_buf), if server_open => match read {
                Ok(0) | Err(_) => {
                    server_open = false;
                    if current == ProxyMode::Pass {
                        let _ = client_write.shutdown().await;
                    }
                }
                Ok(n) => {
                    if current == ProxyMode::Pass
                        && client_write.write_all(&down_buf[..n]).await.is_err()
                    {
                        break;
                    }
                }
            },
        }
        if !client_open && !server_open {
            return;
        }
    }
    if let (Ok(client), Ok(server)) = (
        client_read.reunite(client_write),
        server_read.reunite(server_write),
    ) {
        reset(client);
        reset(server);
    }
}

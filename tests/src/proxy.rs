//! A TCP proxy whose link can be cut like a blackholed network: while cut, bytes in both
//! directions are swallowed and new connections hang; healing closes the connections that
//! were cut (their peers have given up on them by then) and forwards new ones again.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// A running proxy; dropped, it stops accepting.
pub struct Proxy {
    address: SocketAddr,
    cut: Arc<AtomicBool>,
    /// Bumped on every heal: connections of an older epoch close.
    epoch: watch::Sender<u64>,
    connections: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    /// Forwards connections to `target` from a fresh loopback port.
    pub async fn start(target: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("binding the proxy");
        let address = listener
            .local_addr()
            .expect("a bound socket has an address");
        let cut = Arc::new(AtomicBool::new(false));
        let (epoch, _) = watch::channel(0u64);
        let connections = Arc::new(AtomicU64::new(0));
        let task = {
            let (cut, epoch, connections) =
                (Arc::clone(&cut), epoch.clone(), Arc::clone(&connections));
            tokio::spawn(async move {
                while let Ok((client, _)) = listener.accept().await {
                    connections.fetch_add(1, Ordering::SeqCst);
                    let (cut, epoch) = (Arc::clone(&cut), epoch.subscribe());
                    tokio::spawn(serve(client, target, cut, epoch));
                }
            })
        };
        Proxy {
            address,
            cut,
            epoch,
            connections,
            task,
        }
    }

    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> u64 {
        self.connections.load(Ordering::SeqCst)
    }

    /// Swallows all traffic from now on.
    pub fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
    }

    /// Forwards again; connections that lived through the cut are closed.
    pub fn heal(&self) {
        self.epoch.send_modify(|e| *e += 1);
        self.cut.store(false, Ordering::SeqCst);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve(
    client: TcpStream,
    target: SocketAddr,
    cut: Arc<AtomicBool>,
    mut epoch: watch::Receiver<u64>,
) {
    let born = *epoch.borrow_and_update();
    // A connection made during a cut hangs until the heal closes it.
    if cut.load(Ordering::SeqCst) {
        let _ = epoch.changed().await;
        return;
    }
    let Ok(server) = TcpStream::connect(target).await else {
        return;
    };
    let (client_read, client_write) = client.into_split();
    let (server_read, server_write) = server.into_split();
    let was_cut = Arc::new(AtomicBool::new(false));
    let up = pump(
        client_read,
        server_write,
        Arc::clone(&cut),
        Arc::clone(&was_cut),
    );
    let down = pump(
        server_read,
        client_write,
        Arc::clone(&cut),
        Arc::clone(&was_cut),
    );
    tokio::select! {
        _ = up => {}
        _ = down => {}
        _ = async {
            // Close at the first heal after this connection saw a cut.
            loop {
                if epoch.changed().await.is_err() {
                    std::future::pending::<()>().await;
                }
                if *epoch.borrow() != born && was_cut.load(Ordering::SeqCst) {
                    return;
                }
            }
        } => {}
    }
}

/// Copies `from` to `to` until either closes, dropping the bytes read while `cut` is set.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    cut: Arc<AtomicBool>,
    was_cut: Arc<AtomicBool>,
) {
    let mut buffer = vec![0u8; 64 << 10];
    loop {
        let n = match from.read(&mut buffer).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if cut.load(Ordering::SeqCst) {
            was_cut.store(true, Ordering::SeqCst);
            continue;
        }
        if to.write_all(&buffer[..n]).await.is_err() {
            return;
        }
    }
}

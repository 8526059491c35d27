//! A TCP proxy in front of an instance, so that a test can make the instance look crashed
//! from outside: every connection reset at once and new ones reset on arrival, as when a
//! process dies and its port answers with RST. Healing it forwards new connections again.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::Context as _;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// A TCP proxy on a loopback port.
#[derive(Debug)]
pub struct TcpProxy {
    addr: SocketAddr,
    cut: watch::Sender<bool>,
    accepted: Arc<AtomicUsize>,
    listener: Mutex<Option<TcpListener>>,
    task: Mutex<Option<JoinHandle<()>>>,
}

impl TcpProxy {
    /// Binds a loopback port; nothing is forwarded until [`TcpProxy::forward_to`].
    pub async fn bind() -> anyhow::Result<TcpProxy> {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .context("bind the proxy")?;
        Ok(TcpProxy {
            addr: listener.local_addr()?,
            cut: watch::Sender::new(false),
            accepted: Arc::default(),
            listener: Mutex::new(Some(listener)),
            task: Mutex::new(None),
        })
    }

    /// The address clients connect to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Starts forwarding every connection to `upstream`.
    pub fn forward_to(&self, upstream: SocketAddr) {
        let Some(listener) = self.listener.lock().unwrap().take() else {
            return;
        };
        let cut = self.cut.clone();
        let accepted = self.accepted.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                accepted.fetch_add(1, Ordering::SeqCst);
                let _ = client.set_nodelay(true);
                if *cut.borrow() {
                    reset(client);
                    continue;
                }
                tokio::spawn(relay(client, upstream, cut.subscribe()));
            }
        });
        *self.task.lock().unwrap() = Some(task);
    }

    /// How many connections clients have opened so far, cut or not.
    pub fn connections(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    /// Resets every connection now and every new one until [`TcpProxy::heal`].
    pub fn cut(&self) {
        self.cut.send_replace(true);
    }

    /// Forwards new connections again.
    pub fn heal(&self) {
        self.cut.send_replace(false);
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.cut.send_replace(true);
        if let Some(task) = self.task.lock().unwrap().take() {
            task.abort();
        }
    }
}

/// Copies both ways until either side closes or the proxy is cut.
async fn relay(mut client: TcpStream, upstream: SocketAddr, mut cut: watch::Receiver<bool>) {
    let Ok(mut server) = TcpStream::connect(upstream).await else {
        reset(client);
        return;
    };
    let _ = server.set_nodelay(true);
    tokio::select! {
        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
        _ = cut.wait_for(|cut| *cut) => {
            reset(client);
            reset(server);
        }
    }
}

/// Closes with RST rather than FIN, as a dead process's kernel does.
fn reset(stream: TcpStream) {
    let _ = stream.set_zero_linger();
    drop(stream);
}

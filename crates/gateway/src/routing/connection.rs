//! One HTTP/2 connection per worker, shared by every request to it.
//!
//! Requests go straight to hyper's HTTP/2 client handle: no buffer task between the
//! caller and the connection (as a tonic `Channel` has), so a request costs one task hop
//! fewer each way; its writes are coalesced (`lmgrid_core::coalesce`), so the requests of
//! many callers leave in one write. The connection is made on first use, within `connect_timeout`, with
//! keep-alive pings that notice a worker gone without closing it; when it closes or fails,
//! the next request makes a new one. Errors of this layer reach callers as statuses whose
//! source is the error, which routing reads as a connection failure.

use std::pin::Pin;
use std::sync::Mutex;
use std::task::{Context, Poll};
use std::time::Duration;

use http::uri::{Authority, Scheme, Uri};
use hyper::body::Incoming;
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use lmgrid_core::coalesce::Coalesce;
use tokio::net::TcpStream;
use tonic::body::Body;

/// Why no request could be sent to a worker.
#[derive(Debug, thiserror::Error)]
pub(super) enum ConnectError {
    #[error("connect to worker at {address}: {source}")]
    Io {
        address: String,
        source: std::io::Error,
    },
    #[error("connect to worker at {address}: no connection within {timeout:?}")]
    Timeout { address: String, timeout: Duration },
    #[error("HTTP/2 handshake with worker at {address}: {source}")]
    Handshake {
        address: String,
        source: hyper::Error,
    },
    #[error("worker address {0:?} is not host:port")]
    Address(String),
}

/// The connection to one worker, made on demand.
#[derive(Debug)]
pub(super) struct Connection {
    address: String,
    authority: Authority,
    connect_timeout: Duration,
    current: Mutex<Option<SendRequest<Body>>>,
    /// One connection attempt at a time; the others wait for its outcome.
    connecting: tokio::sync::Mutex<()>,
}

impl Connection {
    pub(super) fn new(address: &str, connect_timeout: Duration) -> Result<Self, ConnectError> {
        let authority = address
            .parse::<Authority>()
            .ok()
            .filter(|a| a.port_u16().is_some())
            .ok_or_else(|| ConnectError::Address(address.to_string()))?;
        Ok(Connection {
            address: address.to_string(),
            authority,
            connect_timeout,
            current: Mutex::new(None),
            connecting: tokio::sync::Mutex::new(()),
        })
    }

    /// A client on the open connection, connecting first if there is none.
    pub(super) async fn client(&self) -> Result<Client, ConnectError> {
        if let Some(sender) = self.open() {
            return Ok(self.client_of(sender));
        }
        let _connecting = self.connecting.lock().await;
        if let Some(sender) = self.open() {
            return Ok(self.client_of(sender));
        }
        let sender = self.connect().await?;
        *self.current.lock().unwrap_or_else(|e| e.into_inner()) = Some(sender.clone());
        Ok(self.client_of(sender))
    }

    fn open(&self) -> Option<SendRequest<Body>> {
        let current = self.current.lock().unwrap_or_else(|e| e.into_inner());
        current.as_ref().filter(|s| !s.is_closed()).cloned()
    }

    fn client_of(&self, sender: SendRequest<Body>) -> Client {
        Client {
            sender,
            authority: self.authority.clone(),
        }
    }

    async fn connect(&self) -> Result<SendRequest<Body>, ConnectError> {
        let address = &self.address;
        let tcp = tokio::time::timeout(self.connect_timeout, TcpStream::connect(address))
            .await
            .map_err(|_| ConnectError::Timeout {
                address: address.clone(),
                timeout: self.connect_timeout,
            })?
            .map_err(|source| ConnectError::Io {
                address: address.clone(),
                source,
            })?;
        // Small gRPC messages must not wait for the peer's delayed ACK.
        let _ = tcp.set_nodelay(true);
        let (sender, connection) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            // Notice a worker that vanished without closing its connection.
            .keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(Duration::from_secs(5))
            .keep_alive_while_idle(true)
            .handshake(TokioIo::new(Coalesce::new(tcp)))
            .await
            .map_err(|source| ConnectError::Handshake {
                address: address.clone(),
                source,
            })?;
        let address = address.clone();
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(%address, %error, "connection to worker ended");
            }
        });
        Ok(sender)
    }
}

/// Sends requests on one HTTP/2 connection: a `tower::Service` for tonic's client.
#[derive(Debug, Clone)]
pub(super) struct Client {
    sender: SendRequest<Body>,
    authority: Authority,
}

type ResponseFuture =
    Pin<Box<dyn Future<Output = Result<http::Response<Incoming>, hyper::Error>> + Send>>;

impl tonic::codegen::Service<http::Request<Body>> for Client {
    type Response = http::Response<Incoming>;
    type Error = hyper::Error;
    type Future = ResponseFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), hyper::Error>> {
        self.sender.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<Body>) -> ResponseFuture {
        // tonic sends the path only; HTTP/2 needs the scheme and authority too.
        let mut parts = request.uri().clone().into_parts();
        parts.scheme = Some(Scheme::HTTP);
        parts.authority = Some(self.authority.clone());
        if let Ok(uri) = Uri::from_parts(parts) {
            *request.uri_mut() = uri;
        }
        Box::pin(self.sender.send_request(request))
    }
}

//! Clients that look at an instance from outside, as probes, routers and operators do: a
//! fresh gRPC connection, `grpc.health.v1`, and plain HTTP/1.0 requests.

use std::net::SocketAddr;

use anyhow::{Context as _, anyhow, bail};
use lmgrid_test_support::wait_until;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tonic::transport::{Channel, Endpoint};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use crate::{CALL_TIMEOUT, POLL_INTERVAL, SETTLE_TIMEOUT};

/// Opens a new gRPC connection to `addr`.
pub async fn connect(addr: SocketAddr) -> anyhow::Result<Channel> {
    Endpoint::from_shared(format!("http://{addr}"))?
        .connect_timeout(CALL_TIMEOUT)
        .timeout(CALL_TIMEOUT)
        .connect()
        .await
        .with_context(|| format!("connect to gRPC at {addr}"))
}

/// A `grpc.health.v1` client on a new connection to `addr`.
pub async fn health_client(addr: SocketAddr) -> anyhow::Result<HealthClient<Channel>> {
    Ok(HealthClient::new(connect(addr).await?))
}

/// Asks `grpc.health.v1` at `addr`, over a new connection, for the status of `service`
/// (`""` for the whole server).
pub async fn health_status(addr: SocketAddr, service: &str) -> anyhow::Result<ServingStatus> {
    let mut client = health_client(addr).await?;
    let response = client
        .check(HealthCheckRequest {
            service: service.to_string(),
        })
        .await
        .with_context(|| format!("health check of {service:?} at {addr}"))?;
    Ok(response.into_inner().status())
}

/// Polls `grpc.health.v1` at `addr`, each time over a new connection, until `service`
/// reports `status`. Statuses follow readiness a moment later, so tests poll them.
pub async fn wait_for_health(
    addr: SocketAddr,
    service: &str,
    status: ServingStatus,
) -> anyhow::Result<()> {
    let what = format!("{service:?} at {addr} to report {status:?}");
    wait_until(SETTLE_TIMEOUT, &what, || async move {
        matches!(health_status(addr, service).await, Ok(now) if now == status)
    })
    .await
}

/// Polls `GET path` until it answers `status`, and returns that response.
pub async fn wait_for_http(
    addr: SocketAddr,
    path: &str,
    status: u16,
) -> anyhow::Result<HttpResponse> {
    let deadline = tokio::time::Instant::now() + SETTLE_TIMEOUT;
    loop {
        let last = match http_get(addr, path).await {
            Ok(response) if response.status == status => return Ok(response),
            Ok(response) => format!("{} {:?}", response.status, response.body),
            Err(error) => format!("{error:#}"),
        };
        if tokio::time::Instant::now() >= deadline {
            bail!(
                "timed out after {SETTLE_TIMEOUT:?} waiting for GET http://{addr}{path} to \
                 answer {status}; last answer: {last}"
            );
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// An HTTP response, read whole.
#[derive(Debug, Clone)]
pub struct HttpResponse {
    pub status: u16,
    /// Header names in lower case, in the order received.
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl HttpResponse {
    /// The first header called `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(key, _)| key.eq_ignore_ascii_case(name))
            .map(|(_, value)| value.as_str())
    }
}

/// `GET path` over HTTP/1.0 on a new connection, which the server closes after answering,
/// so the body is everything after the headers.
pub async fn http_get(addr: SocketAddr, path: &str) -> anyhow::Result<HttpResponse> {
    http_request(addr, "GET", path, &[], b"").await
}

/// `POST path` with a JSON body, over HTTP/1.0 on a new connection.
pub async fn http_post_json(
    addr: SocketAddr,
    path: &str,
    body: &str,
) -> anyhow::Result<HttpResponse> {
    let headers = [("content-type", "application/json")];
    http_request(addr, "POST", path, &headers, body.as_bytes()).await
}

/// Any request over HTTP/1.0 on a new connection: `method path`, `headers`, and `body` with
/// its `Content-Length`. The server closes the connection after answering, so a streamed
/// body (server-sent events) is read whole too.
pub async fn http_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> anyhow::Result<HttpResponse> {
    let exchange = async {
        let mut stream = TcpStream::connect(addr).await?;
        let mut head = format!("{method} {path} HTTP/1.0\r\nHost: {addr}\r\n");
        for (name, value) in headers {
            head.push_str(&format!("{name}: {value}\r\n"));
        }
        if !body.is_empty() || method == "POST" {
            head.push_str(&format!("Content-Length: {}\r\n", body.len()));
        }
        head.push_str("\r\n");
        // Write and read at once: a server may answer (413) without reading a large body,
        // and then resets the connection, failing the rest of the write.
        let (mut reader, mut writer) = stream.split();
        let write = async {
            writer.write_all(head.as_bytes()).await?;
            writer.write_all(body).await
        };
        let read = async {
            let mut response = Vec::new();
            let result = reader.read_to_end(&mut response).await;
            (result, response)
        };
        let (written, (read, response)) = tokio::join!(write, read);
        if response.is_empty() {
            written?;
            read?;
        }
        Ok::<_, std::io::Error>(response)
    };
    let response = tokio::time::timeout(CALL_TIMEOUT, exchange)
        .await
        .map_err(|_| anyhow!("no answer within {CALL_TIMEOUT:?}"))
        .and_then(|result| result.map_err(anyhow::Error::from))
        .with_context(|| format!("{method} http://{addr}{path}"))?;
    parse_response(&String::from_utf8_lossy(&response))
        .with_context(|| format!("{method} http://{addr}{path}"))
}

fn parse_response(text: &str) -> anyhow::Result<HttpResponse> {
    let (head, body) = text
        .split_once("\r\n\r\n")
        .with_context(|| format!("no end of headers in {text:?}"))?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .with_context(|| format!("malformed status line {status_line:?}"))?;
    let headers = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(name, value)| (name.trim().to_ascii_lowercase(), value.trim().to_string()))
        .collect();
    Ok(HttpResponse {
        status,
        headers,
        body: body.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_status_headers_and_body() {
        let response = parse_response(
            "HTTP/1.0 503 Service Unavailable\r\nContent-Type: text/plain\r\n\r\nnot ready\n",
        )
        .unwrap();
        assert_eq!(response.status, 503);
        assert_eq!(response.header("content-type"), Some("text/plain"));
        assert_eq!(response.body, "not ready\n");
        assert!(parse_response("HTTP/1.0 200 OK\r\n").is_err());
        assert!(parse_response("garbage\r\n\r\n").is_err());
    }
}

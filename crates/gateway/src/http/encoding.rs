//! Content codings both ways: request bodies sent as gzip or deflate are
//! inflated (within the body limit) before they are parsed, and answers are
//! compressed when the client's `Accept-Encoding` asks for it.
//!
//! Answers are compressed only when they are whole in memory (JSON, and
//! JSON with binary tensors after it) and at least
//! [`MIN_COMPRESSED_BYTES`] long, and sent compressed only when that made
//! them smaller; streams (server-sent events) go as they are, so that each
//! event reaches the client when it is written.

use axum::body::{Body, Bytes};
use axum::extract::Request;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::Response;
use http_body::Body as _;
use lmgrid_core::ErrorKind;

use super::error::{ApiError, Shape};

/// Answers shorter than this go uncompressed: the few bytes saved are not
/// worth the CPU, and a small answer fits one packet either way.
pub(crate) const MIN_COMPRESSED_BYTES: usize = 1024;

/// Answers longer than this are compressed on the blocking pool (from
/// ~120 µs up at ~130 MB/s), shorter ones on the runtime's thread.
const COMPRESS_INLINE_BYTES: usize = 16 * 1024;

/// A content coding the gateway reads and writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Encoding {
    Identity,
    Gzip,
    /// HTTP's `deflate`: the zlib format.
    Deflate,
}

impl Encoding {
    /// How a request body is compressed (`Content-Encoding`).
    fn of(headers: &HeaderMap) -> Result<Encoding, ApiError> {
        let Some(value) = headers.get(header::CONTENT_ENCODING) else {
            return Ok(Encoding::Identity);
        };
        let name = String::from_utf8_lossy(value.as_bytes());
        let name = name.trim();
        match name.to_ascii_lowercase().as_str() {
            "identity" | "" => Ok(Encoding::Identity),
            "gzip" | "x-gzip" => Ok(Encoding::Gzip),
            "deflate" => Ok(Encoding::Deflate),
            _ => Err(ApiError::unsupported_encoding(name)),
        }
    }
}

/// Reads a whole body of at most `limit` bytes, decompressing a gzip or
/// deflate body (itself at most `limit` bytes, and at most `limit` once
/// decompressed). Other encodings are refused (415) rather than misread as
/// malformed JSON.
pub(crate) async fn read_body(
    request: Request,
    limit: usize,
) -> Result<axum::body::Bytes, ApiError> {
    let encoding = Encoding::of(request.headers())?;
    let body = read_raw_body(request, limit).await?;
    if encoding == Encoding::Identity {
        return Ok(body);
    }
    // Inflating up to `limit` bytes takes milliseconds: off the runtime's
    // threads.
    tokio::task::spawn_blocking(move || inflate(encoding, &body, limit))
        .await
        .map_err(|error| {
            ApiError::new(
                ErrorKind::Internal,
                format!("decompressing the body failed: {error}"),
            )
        })?
}

/// The decompressed `body`, at most `limit` bytes.
fn inflate(encoding: Encoding, body: &[u8], limit: usize) -> Result<axum::body::Bytes, ApiError> {
    use std::io::Read as _;
    let decoder: Box<dyn std::io::Read + '_> = match encoding {
        Encoding::Gzip => Box::new(flate2::read::MultiGzDecoder::new(body)),
        Encoding::Deflate => Box::new(flate2::read::ZlibDecoder::new(body)),
        Encoding::Identity => return Ok(axum::body::Bytes::copy_from_slice(body)),
    };
    let mut out = Vec::new();
    decoder
        .take(limit as u64 + 1)
        .read_to_end(&mut out)
        .map_err(|error| {
            let name = if encoding == Encoding::Gzip {
                "gzip"
            } else {
                "deflate (zlib)"
            };
            ApiError::bad_request(format!(
                "the request body is not valid {name} data: {error}"
            ))
        })?;
    if out.len() > limit {
        return Err(ApiError::too_large(limit));
    }
    Ok(out.into())
}

/// Reads a whole body of at most `limit` bytes as it came.
async fn read_raw_body(request: Request, limit: usize) -> Result<axum::body::Bytes, ApiError> {
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|length| length > limit as u64) {
        return Err(ApiError::too_large(limit));
    }
    axum::body::to_bytes(request.into_body(), limit)
        .await
        .map_err(|error| {
            let inner = error.into_inner();
            let mut source: Option<&(dyn std::error::Error + 'static)> = Some(inner.as_ref());
            while let Some(error) = source {
                if error.is::<http_body_util::LengthLimitError>() {
                    return ApiError::too_large(limit);
                }
                source = error.source();
            }
            ApiError::bad_request(format!("could not read the request body: {inner}"))
        })
}

impl Encoding {
    fn name(self) -> &'static str {
        match self {
            Encoding::Identity => "identity",
            Encoding::Gzip => "gzip",
            Encoding::Deflate => "deflate",
        }
    }
}

/// The coding to answer with: gzip or deflate, whichever the client's
/// `Accept-Encoding` weighs more (gzip on a tie; `*` stands for both), or
/// none when it names neither, or gives them `q=0`.
pub(crate) fn accepted(headers: &HeaderMap) -> Option<Encoding> {
    let (mut gzip, mut deflate, mut any) = (None::<f32>, None::<f32>, None::<f32>);
    let items = headers
        .get_all(header::ACCEPT_ENCODING)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','));
    for item in items {
        let mut parts = item.split(';');
        let coding = parts.next().unwrap_or_default().trim().to_ascii_lowercase();
        let mut weight = Some(1.0);
        for parameter in parts {
            if let Some((name, value)) = parameter.split_once('=')
                && name.trim().eq_ignore_ascii_case("q")
            {
                // A weight that is not a number from 0 to 1 leaves the item out.
                weight = value
                    .trim()
                    .parse::<f32>()
                    .ok()
                    .filter(|q| (0.0..=1.0).contains(q));
            }
        }
        let Some(weight) = weight else { continue };
        let slot = match coding.as_str() {
            "gzip" | "x-gzip" => &mut gzip,
            "deflate" => &mut deflate,
            "*" => &mut any,
            _ => continue,
        };
        *slot = Some(slot.map_or(weight, |q: f32| q.max(weight)));
    }
    let gzip = gzip.or(any).unwrap_or(0.0);
    let deflate = deflate.or(any).unwrap_or(0.0);
    if gzip > 0.0 && gzip >= deflate {
        Some(Encoding::Gzip)
    } else if deflate > 0.0 {
        Some(Encoding::Deflate)
    } else {
        None
    }
}

/// Middleware: compresses a whole answer as [`accepted`] allows, and marks
/// every answer that could have been compressed with `Vary: Accept-Encoding`.
pub(crate) async fn compress(request: Request, next: Next) -> Response {
    let encoding = accepted(request.headers());
    let shape = Shape::of_path(request.uri().path());
    let response = next.run(request).await;
    let headers = response.headers();
    let streamed = headers
        .get(header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .is_some_and(|value| value.starts_with("text/event-stream"));
    let size = response.body().size_hint().exact();
    if streamed
        || size.is_none()
        || headers.contains_key(header::CONTENT_ENCODING)
        || matches!(
            response.status(),
            StatusCode::NO_CONTENT | StatusCode::NOT_MODIFIED
        )
    {
        return response;
    }
    let (mut parts, body) = response.into_parts();
    parts
        .headers
        .append(header::VARY, HeaderValue::from_static("accept-encoding"));
    let Some(encoding) = encoding.filter(|_| size >= Some(MIN_COMPRESSED_BYTES as u64)) else {
        return Response::from_parts(parts, body);
    };
    // A body whose size is known is in memory already: this does not wait.
    let bytes = match axum::body::to_bytes(body, usize::MAX).await {
        Ok(bytes) => bytes,
        Err(error) => {
            let error = ApiError::new(
                ErrorKind::Internal,
                format!("reading the answer to compress it failed: {error}"),
            );
            tracing::error!(error = %error.message(), "answer lost before compression");
            return error.render(shape);
        }
    };
    let compressed = if bytes.len() > COMPRESS_INLINE_BYTES {
        let input = bytes.clone();
        tokio::task::spawn_blocking(move || deflate(encoding, &input))
            .await
            .ok()
            .flatten()
    } else {
        deflate(encoding, &bytes)
    };
    match compressed {
        Some(compressed) => {
            parts.headers.remove(header::CONTENT_LENGTH);
            parts.headers.insert(
                header::CONTENT_ENCODING,
                HeaderValue::from_static(encoding.name()),
            );
            Response::from_parts(parts, Body::from(compressed))
        }
        // Incompressible (binary tensors of noise), or the encoder failed:
        // the answer as it was.
        None => Response::from_parts(parts, Body::from(bytes)),
    }
}

/// `bytes` compressed as `encoding` at the fastest level (JSON numbers
/// shrink 2-3x at it; the higher levels buy a few percent for twice the
/// CPU), or `None` when that would not make it smaller.
///
/// Each thread keeps its compressors: a new one allocates and clears some
/// 300 KB of tables, which took 200 µs for an 8 KB answer where a reused
/// one takes 60 µs (docs/decisions.md).
fn deflate(encoding: Encoding, bytes: &[u8]) -> Option<Bytes> {
    use std::cell::RefCell;
    thread_local! {
        static RAW: RefCell<flate2::Compress> =
            RefCell::new(flate2::Compress::new(flate2::Compression::fast(), false));
        static ZLIB: RefCell<flate2::Compress> =
            RefCell::new(flate2::Compress::new(flate2::Compression::fast(), true));
    }
    // RFC 1952: magic, method 8 (deflate), no flags, no time, fastest, OS unknown.
    const GZIP_HEADER: [u8; 10] = [0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 4, 255];
    let (compressor, header): (&'static std::thread::LocalKey<_>, &[u8]) = match encoding {
        Encoding::Gzip => (&RAW, &GZIP_HEADER),
        Encoding::Deflate => (&ZLIB, &[]),
        Encoding::Identity => return None,
    };
    let trailer = if encoding == Encoding::Gzip { 8 } else { 0 };
    // Room for no more than the answer itself: output that does not fit is
    // output not worth sending.
    let room = bytes.len().checked_sub(header.len() + trailer)?;
    let mut out = Vec::with_capacity(header.len() + room);
    out.extend_from_slice(header);
    // Writes into the spare capacity after the header, and no further.
    let finished = compressor.with_borrow_mut(|compressor: &mut flate2::Compress| {
        compressor.reset();
        let status = compressor.compress_vec(bytes, &mut out, flate2::FlushCompress::Finish);
        matches!(status, Ok(flate2::Status::StreamEnd))
    });
    if !finished {
        return None;
    }
    if encoding == Encoding::Gzip {
        let mut crc = flate2::Crc::new();
        crc.update(bytes);
        out.extend_from_slice(&crc.sum().to_le_bytes());
        // ISIZE: the input's length modulo 2^32.
        out.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
    }
    // (An allocator may have given more room than asked.)
    (out.len() < bytes.len()).then(|| out.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn gzip_and_deflate_bodies_are_inflated_within_the_limit() {
        use std::io::Write as _;
        let request = |encoding: &str, body: Vec<u8>| {
            axum::http::Request::builder()
                .header(header::CONTENT_ENCODING, encoding)
                .body(axum::body::Body::from(body))
                .unwrap()
        };
        let json = br#"{"inputs": []}"#;
        let mut gzip = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gzip.write_all(json).unwrap();
        let gzip = gzip.finish().unwrap();
        let mut zlib = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::fast());
        zlib.write_all(json).unwrap();
        let zlib = zlib.finish().unwrap();

        for (encoding, body) in [
            ("gzip", gzip.clone()),
            ("GZIP", gzip.clone()),
            ("deflate", zlib.clone()),
            ("identity", json.to_vec()),
        ] {
            let read = read_body(request(encoding, body), 100).await.unwrap();
            assert_eq!(&read[..], json, "{encoding}");
        }
        // Decompressed, the body must still fit the limit.
        let err = read_body(request("gzip", gzip.clone()), json.len() - 1)
            .await
            .unwrap_err();
        assert_eq!(err.status(), 413);
        // A body that is not what its encoding says, or an encoding not offered.
        let err = read_body(request("deflate", gzip), 100).await.unwrap_err();
        assert_eq!(err.status(), 400);
        assert!(err.message().contains("not valid deflate"), "{err:?}");
        let err = read_body(request("br", zlib), 100).await.unwrap_err();
        assert_eq!(err.status(), 415);
        assert!(err.message().contains("\"br\""), "{err:?}");
    }

    fn accept(value: &str) -> Option<Encoding> {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::ACCEPT_ENCODING,
            HeaderValue::from_str(value).unwrap(),
        );
        accepted(&headers)
    }

    #[test]
    fn accept_encoding_picks_the_heaviest_coding_offered() {
        assert_eq!(accepted(&HeaderMap::new()), None);
        for (value, expected) in [
            ("gzip", Some(Encoding::Gzip)),
            ("GZip", Some(Encoding::Gzip)),
            ("x-gzip", Some(Encoding::Gzip)),
            ("deflate", Some(Encoding::Deflate)),
            ("gzip, deflate, br, zstd", Some(Encoding::Gzip)),
            ("deflate, gzip", Some(Encoding::Gzip)),
            ("gzip;q=0.5, deflate", Some(Encoding::Deflate)),
            ("gzip; q=1.0 , deflate;q=0.9", Some(Encoding::Gzip)),
            ("*", Some(Encoding::Gzip)),
            ("*;q=0.3, gzip;q=0", Some(Encoding::Deflate)),
            ("gzip;q=0", None),
            ("*;q=0", None),
            ("identity", None),
            ("br, zstd", None),
            ("", None),
            // A weight out of range or not a number leaves its item out.
            ("gzip;q=2, deflate;q=0.1", Some(Encoding::Deflate)),
            ("gzip;q=high", None),
        ] {
            assert_eq!(accept(value), expected, "{value:?}");
        }
        // Several header lines count together.
        let mut headers = HeaderMap::new();
        headers.append(
            header::ACCEPT_ENCODING,
            HeaderValue::from_static("gzip;q=0.1"),
        );
        headers.append(header::ACCEPT_ENCODING, HeaderValue::from_static("deflate"));
        assert_eq!(accepted(&headers), Some(Encoding::Deflate));
    }

    #[test]
    fn a_reused_compressor_starts_each_answer_afresh() {
        let first = "[1.5, 2.5, 3.5], ".repeat(200).into_bytes();
        let second = "{\"object\": \"embedding\"} ".repeat(100).into_bytes();
        for input in [&first, &second, &first] {
            let gzip = deflate(Encoding::Gzip, input).unwrap();
            let inflated = inflate(Encoding::Gzip, &gzip, 1 << 20).unwrap();
            assert_eq!(&inflated, input);
            let zlib = deflate(Encoding::Deflate, input).unwrap();
            let inflated = inflate(Encoding::Deflate, &zlib, 1 << 20).unwrap();
            assert_eq!(&inflated, input);
        }
        // What would not come out smaller is not compressed at all.
        assert_eq!(deflate(Encoding::Gzip, b"[1]"), None);
        assert_eq!(deflate(Encoding::Identity, &first), None);
    }

    /// A router answering `/json/{n}` with an `n`-byte compressible JSON body,
    /// `/noise` with 4 KiB that no coding shrinks, `/events` with a stream,
    /// behind [`compress`].
    fn app() -> axum::Router {
        use axum::routing::get;
        let json = |n: usize| {
            let mut body = String::from("[");
            while body.len() + 6 < n {
                body.push_str("0.125,");
            }
            body.push_str("1]");
            ([(header::CONTENT_TYPE, "application/json")], body)
        };
        axum::Router::new()
            .route(
                "/json/{n}",
                get(move |axum::extract::Path(n): axum::extract::Path<usize>| async move {
                    json(n)
                }),
            )
            .route(
                "/noise",
                get(|| async {
                    let mut state = 0x9e37_79b9_7f4a_7c15_u64;
                    let bytes: Vec<u8> = (0..4096)
                        .map(|_| {
                            state ^= state << 13;
                            state ^= state >> 7;
                            state ^= state << 17;
                            state as u8
                        })
                        .collect();
                    bytes
                }),
            )
            .route(
                "/events",
                get(|| async {
                    let chunk = Bytes::from(format!("data: {}\n\n", "x".repeat(4096)));
                    let stream = futures::stream::iter([Ok::<_, std::io::Error>(chunk)]);
                    ([(header::CONTENT_TYPE, "text/event-stream")], Body::from_stream(stream))
                }),
            )
            .layer(axum::middleware::from_fn(compress))
    }

    async fn get(path: &str, accept: Option<&str>) -> (Response, Bytes) {
        use tower::ServiceExt as _;
        let mut request = axum::http::Request::builder().uri(path);
        if let Some(accept) = accept {
            request = request.header(header::ACCEPT_ENCODING, accept);
        }
        let response = app()
            .oneshot(request.body(Body::empty()).unwrap())
            .await
            .unwrap();
        let (parts, body) = response.into_parts();
        let bytes = axum::body::to_bytes(body, usize::MAX).await.unwrap();
        (Response::from_parts(parts, Body::empty()), bytes)
    }

    fn header_of(response: &Response, name: header::HeaderName) -> Option<&str> {
        response.headers().get(name).and_then(|v| v.to_str().ok())
    }

    #[tokio::test]
    async fn answers_are_compressed_as_the_client_accepts() {
        let (plain, expected) = get("/json/5000", None).await;
        assert_eq!(header_of(&plain, header::CONTENT_ENCODING), None);
        assert_eq!(header_of(&plain, header::VARY), Some("accept-encoding"));
        assert!(expected.len() >= 4990, "{}", expected.len());

        let (gzip, body) = get("/json/5000", Some("gzip, deflate")).await;
        assert_eq!(header_of(&gzip, header::CONTENT_ENCODING), Some("gzip"));
        assert_eq!(header_of(&gzip, header::VARY), Some("accept-encoding"));
        assert!(body.len() < expected.len() / 4, "{} bytes", body.len());
        let inflated = inflate(Encoding::Gzip, &body, 1 << 20).unwrap();
        assert_eq!(inflated, expected);

        let (zlib, body) = get("/json/5000", Some("deflate")).await;
        assert_eq!(header_of(&zlib, header::CONTENT_ENCODING), Some("deflate"));
        let inflated = inflate(Encoding::Deflate, &body, 1 << 20).unwrap();
        assert_eq!(inflated, expected);

        // Large enough to go to the blocking pool.
        let (large, body) = get("/json/300000", Some("gzip")).await;
        assert_eq!(header_of(&large, header::CONTENT_ENCODING), Some("gzip"));
        let inflated = inflate(Encoding::Gzip, &body, 1 << 20).unwrap();
        assert!(inflated.len() >= 299_990 && inflated.ends_with(b"1]"));

        // Refused, too small, incompressible, or streamed: as it was.
        let (refused, body) = get("/json/5000", Some("gzip;q=0, br")).await;
        assert_eq!(header_of(&refused, header::CONTENT_ENCODING), None);
        assert_eq!(body, expected);
        let (small, body) = get("/json/1000", Some("gzip")).await;
        assert_eq!(header_of(&small, header::CONTENT_ENCODING), None);
        assert_eq!(header_of(&small, header::VARY), Some("accept-encoding"));
        assert!(body.len() < MIN_COMPRESSED_BYTES && body.ends_with(b"1]"));
        let (noise, body) = get("/noise", Some("gzip")).await;
        assert_eq!(header_of(&noise, header::CONTENT_ENCODING), None);
        assert_eq!(body.len(), 4096);
        let (events, body) = get("/events", Some("gzip")).await;
        assert_eq!(header_of(&events, header::CONTENT_ENCODING), None);
        assert_eq!(header_of(&events, header::VARY), None);
        assert!(body.starts_with(b"data: xxx"));
    }
}

//! Building responses: the body type every handler returns, JSON and streamed bodies. Both
//! `error` (for error bodies) and the routers use it; it uses neither.

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::StatusCode;

pub type Body = BoxBody<Bytes, std::io::Error>;
pub type Response = hyper::Response<Body>;

pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed()
}

pub fn json_response(status: StatusCode, body: &impl serde::Serialize) -> Response {
    // Serialising an in-memory value cannot fail.
    let bytes = serde_json::to_vec(body).unwrap_or_default();
    bytes_response(status, "application/json", bytes)
}

pub fn bytes_response(
    status: StatusCode,
    content_type: &'static str,
    bytes: impl Into<Bytes>,
) -> Response {
    let mut response = hyper::Response::new(full(bytes));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

/// A body fed by a channel: results produced while a request still streams in, or an upload
/// read from a file as it is sent.
pub struct ChannelBody(pub tokio::sync::mpsc::Receiver<Bytes>);

impl hyper::body::Body for ChannelBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, std::io::Error>>> {
        self.0
            .poll_recv(cx)
            .map(|chunk| chunk.map(|bytes| Ok(hyper::body::Frame::data(bytes))))
    }
}

/// A streamed NDJSON response fed by `receiver`.
pub fn ndjson_response(receiver: tokio::sync::mpsc::Receiver<Bytes>) -> Response {
    streamed_response(receiver, "application/x-ndjson")
}

/// A 200 whose body is what `receiver` yields, of type `content_type`.
pub fn streamed_response(
    receiver: tokio::sync::mpsc::Receiver<Bytes>,
    content_type: &'static str,
) -> Response {
    let mut response = hyper::Response::new(ChannelBody(receiver).boxed());
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(content_type),
    );
    response
}

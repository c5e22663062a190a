//! Reading requests, shared by the webhook and API routers: bounded bodies, line streams, media
//! types, query strings and path segments. Responses are built in `response`.

use std::borrow::Cow;

use bytes::{Bytes, BytesMut};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::header::{CONTENT_LENGTH, CONTENT_TYPE};
use percent_encoding::percent_decode_str;

use crate::error::HttpError;

pub type Request = hyper::Request<Incoming>;

/// Reads a whole request body of at most `limit` bytes; a larger one is 413. The excess is read
/// and discarded (up to [`DRAIN_LIMIT`]) rather than left unread, because closing a socket with
/// unread data resets it and the client would see a broken connection instead of the 413.
pub async fn read_body(request: Request, limit: usize) -> Result<Bytes, HttpError> {
    let declared = request
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let mut body = request.into_body();
    let too_large = declared.is_some_and(|len| len > limit as u64);
    let mut collected = BytesMut::with_capacity(if too_large {
        0
    } else {
        declared.unwrap_or(0) as usize
    });
    let mut seen: usize = 0;
    while let Some(frame) = body.frame().await {
        let frame = frame
            .map_err(|e| HttpError::bad_request(format!("cannot read the request body: {e}")))?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        seen = seen.saturating_add(data.len());
        if seen > DRAIN_LIMIT {
            break;
        }
        if !too_large && seen <= limit {
            collected.extend_from_slice(&data);
        }
    }
    if too_large || seen > limit {
        return Err(HttpError::PayloadTooLarge { limit });
    }
    Ok(collected.freeze())
}

/// How much of an unwanted body is read and thrown away before the connection is dropped.
pub const DRAIN_LIMIT: usize = 4 * 1024 * 1024;

/// Reads and drops the body of a request that is refused before its body matters (404, 405,
/// 401, 403), so the client receives the error instead of a reset connection.
pub async fn discard_body(request: Request) {
    let mut body = request.into_body();
    let mut seen: usize = 0;
    while let Some(Ok(frame)) = body.frame().await {
        seen = seen.saturating_add(frame.data_ref().map_or(0, |d| d.len()));
        if seen > DRAIN_LIMIT {
            break;
        }
    }
}

/// Reads a streamed request body line by line (LF or CRLF), holding at most one line.
pub struct LineReader {
    body: Incoming,
    buffer: Vec<u8>,
    chunk: Bytes,
    done: bool,
    max_line: usize,
}

/// One line of a streamed body, or a line that was too long to hold (its bytes are skipped).
pub enum Line {
    Text(Vec<u8>),
    TooLong,
}

impl LineReader {
    pub fn new(request: Request, max_line: usize) -> Self {
        LineReader {
            body: request.into_body(),
            buffer: Vec::new(),
            chunk: Bytes::new(),
            done: false,
            max_line,
        }
    }

    /// The next line; `Err` when the client's upload broke off.
    pub async fn next_line(&mut self) -> Option<Result<Line, HttpError>> {
        let mut too_long = false;
        loop {
            if let Some(newline) = self.chunk.iter().position(|&b| b == b'\n') {
                let head = self.chunk.split_to(newline + 1);
                if !too_long {
                    self.buffer.extend_from_slice(&head[..newline]);
                }
                let line = std::mem::take(&mut self.buffer);
                return Some(Ok(if too_long || line.len() > self.max_line {
                    Line::TooLong
                } else {
                    Line::Text(strip_cr(line))
                }));
            }
            if !too_long {
                self.buffer.extend_from_slice(&self.chunk);
                if self.buffer.len() > self.max_line {
                    too_long = true;
                    self.buffer.clear();
                }
            }
            self.chunk = Bytes::new();
            if self.done {
                if too_long {
                    return Some(Ok(Line::TooLong));
                }
                if self.buffer.is_empty() {
                    return None;
                }
                return Some(Ok(Line::Text(strip_cr(std::mem::take(&mut self.buffer)))));
            }
            match self.body.frame().await {
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        self.chunk = data;
                    }
                }
                Some(Err(e)) => {
                    return Some(Err(HttpError::bad_request(format!(
                        "cannot read the request body: {e}"
                    ))))
                }
                None => self.done = true,
            }
        }
    }
}

fn strip_cr(mut line: Vec<u8>) -> Vec<u8> {
    if line.last() == Some(&b'\r') {
        line.pop();
    }
    line
}

/// The lowercased media type of a request's `Content-Type`, without parameters.
pub fn media_type(request: &Request) -> Option<String> {
    let value = request.headers().get(CONTENT_TYPE)?.to_str().ok()?;
    Some(value.split(';').next()?.trim().to_ascii_lowercase())
}

/// The line-oriented bodies that bulk checks and imports stream, by their Content-Type.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum LineFormat {
    /// `text/plain`: one phone number per line.
    Text,
    /// `text/csv`: a phone number in the first column; the first line may be a header row.
    Csv,
    /// `application/x-ndjson` or `application/ndjson`: one JSON value per line.
    Ndjson,
}

impl LineFormat {
    pub fn of(request: &Request) -> Option<Self> {
        match media_type(request)?.as_str() {
            "text/plain" => Some(LineFormat::Text),
            "text/csv" => Some(LineFormat::Csv),
            "application/x-ndjson" | "application/ndjson" => Some(LineFormat::Ndjson),
            _ => None,
        }
    }
}

/// The percent-decoded value of the first `name=` parameter. A `+` stays a `+`: secrets and
/// signatures are often base64, and providers rarely encode them.
pub fn query_param<'a>(query: Option<&'a str>, name: &str) -> Option<Cow<'a, str>> {
    query?.split('&').find_map(|pair| {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        (percent_decode_str(key).decode_utf8_lossy() == name)
            .then(|| percent_decode_str(value).decode_utf8_lossy())
    })
}

/// A percent-decoded path segment (`%2B` is `+`; a literal `+` stays `+`).
pub fn path_segment(segment: &str) -> Result<Cow<'_, str>, HttpError> {
    percent_decode_str(segment).decode_utf8().map_err(|_| {
        HttpError::bad_request("path segment is not valid UTF-8 after percent-decoding")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_values_are_percent_decoded_but_plus_is_literal() {
        assert_eq!(
            query_param(Some("a=1&token=ab%2Fc+d"), "token").as_deref(),
            Some("ab/c+d")
        );
        assert_eq!(query_param(Some("token"), "token").as_deref(), Some(""));
        assert_eq!(query_param(Some("a=1"), "token"), None);
        assert_eq!(query_param(None, "token"), None);
    }

    #[test]
    fn path_segments_decode() {
        assert_eq!(path_segment("%2B4930").ok().as_deref(), Some("+4930"));
        assert_eq!(path_segment("+4930").ok().as_deref(), Some("+4930"));
    }
}

//! Hand-written HTTP/1.1 requests, for what a well-behaved client library
//! refuses to send: literal `..` path segments (URL parsers remove them),
//! bodies that are not what their headers say, and so on.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A response read off the wire.
#[derive(Debug, Clone)]
pub struct RawResponse {
    pub status: u16,
    /// Header names lowercased.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl RawResponse {
    /// Returns the first header named `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.as_str())
    }

    /// Converts it into the OSB client's answer type, for the same asserts.
    pub fn into_resp(self) -> crate::Resp {
        let mut headers = reqwest::header::HeaderMap::new();
        for (k, v) in &self.headers {
            if let (Ok(k), Ok(v)) = (
                reqwest::header::HeaderName::from_bytes(k.as_bytes()),
                reqwest::header::HeaderValue::from_str(v),
            ) {
                headers.append(k, v);
            }
        }
        let text = String::from_utf8_lossy(&self.body).into_owned();
        crate::Resp {
            status: reqwest::StatusCode::from_u16(self.status).expect("valid status"),
            headers,
            body: serde_json::from_str(&text).unwrap_or(serde_json::Value::Null),
            text,
        }
    }

    /// Returns the body parsed as JSON, or panics naming the status and body.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "status {} body is not JSON ({e}): {:?}",
                self.status,
                String::from_utf8_lossy(&self.body)
            )
        })
    }
}

/// Sends `head` (request line and headers, without the blank line; a
/// `Connection: close` and, when `body` is set and `head` names no
/// `Transfer-Encoding`, a `Content-Length` are added)
/// to `addr` and reads the whole response.
pub async fn request(addr: &str, head: &str, body: &[u8]) -> RawResponse {
    let mut text = head.trim_end().replace('\n', "\r\n").replace("\r\r", "\r");
    text.push_str("\r\nConnection: close");
    if !body.is_empty() && !head.to_ascii_lowercase().contains("transfer-encoding") {
        text.push_str(&format!("\r\nContent-Length: {}", body.len()));
    }
    text.push_str("\r\n\r\n");
    let fut = async {
        let mut stream = TcpStream::connect(addr).await?;
        stream.write_all(text.as_bytes()).await?;
        // A server may answer (e.g. 413) and close before reading all of a
        // large body; the answer is what matters, so a write error here is
        // not a failure of the request.
        let _ = stream.write_all(body).await;
        let mut buf = Vec::new();
        // The same goes for a reset after the response was sent.
        let _ = stream.read_to_end(&mut buf).await;
        Ok::<_, std::io::Error>(buf)
    };
    let buf = tokio::time::timeout(Duration::from_secs(30), fut)
        .await
        .expect("raw request timed out")
        .unwrap_or_else(|e| panic!("raw request to {addr}: {e}"));
    parse(&buf)
}

fn parse(buf: &[u8]) -> RawResponse {
    let end = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no complete response: {:?}", String::from_utf8_lossy(buf)));
    let head = String::from_utf8_lossy(&buf[..end]);
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad status line {status_line:?}"));
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let raw_body = &buf[end + 4..];
    let chunked = headers
        .iter()
        .any(|(k, v)| k == "transfer-encoding" && v.eq_ignore_ascii_case("chunked"));
    let body = if chunked {
        dechunk(raw_body)
    } else {
        raw_body.to_vec()
    };
    RawResponse {
        status,
        headers,
        body,
    }
}

/// Encodes `body` as HTTP/1.1 chunks of `size` bytes.
pub fn chunked(body: &[u8], size: usize) -> Vec<u8> {
    let mut out = Vec::new();
    for c in body.chunks(size) {
        out.extend_from_slice(format!("{:x}\r\n", c.len()).as_bytes());
        out.extend_from_slice(c);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"0\r\n\r\n");
    out
}

fn dechunk(mut data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(nl) = data.windows(2).position(|w| w == b"\r\n") {
        let size_text = String::from_utf8_lossy(&data[..nl]);
        let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
            .unwrap_or(0);
        data = &data[nl + 2..];
        if size == 0 || data.len() < size {
            break;
        }
        out.extend_from_slice(&data[..size]);
        data = data.get(size + 2..).unwrap_or_default();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_plain_and_chunked() {
        let r =
            parse(b"HTTP/1.1 400 Bad Request\r\nContent-Type: application/json\r\n\r\n{\"a\":1}");
        assert_eq!(r.status, 400);
        assert_eq!(r.header("content-type"), Some("application/json"));
        assert_eq!(r.json()["a"], 1);
        let r = parse(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\n{\"a\r\n4\r\n\":2}\r\n0\r\n\r\n");
        assert_eq!(r.json()["a"], 2);
    }
}

//! A raw HTTP/1.1 server on loopback for the plugins' fetch tests: each request is answered with
//! the exact bytes a route returns (status line, headers, body), optionally after a delay, or by
//! dropping the connection. Every request is recorded (method, target, headers) for assertions.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// One request as the server saw it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    pub target: String,
    /// Header lines, names lower-cased.
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Seen {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(key, _)| key == name).map(|(_, value)| value.as_str())
    }
}

/// What to answer.
pub enum Reply {
    /// These bytes, then close.
    Raw(Vec<u8>),
    /// Wait, then answer.
    After(Duration, Box<Reply>),
    /// Write the first bytes, wait, write the rest.
    Split(Vec<u8>, Duration, Vec<u8>),
    /// Close the connection without answering.
    Drop,
}

/// A complete response with `status`/reason phrase, extra header lines and a body.
pub fn response(status: &str, headers: &[(&str, &str)], body: &str) -> Reply {
    let mut out = format!("HTTP/1.1 {status}\r\ncontent-length: {}\r\nconnection: close\r\n", body.len());
    for (name, value) in headers {
        out.push_str(&format!("{name}: {value}\r\n"));
    }
    out.push_str("\r\n");
    out.push_str(body);
    Reply::Raw(out.into_bytes())
}

pub struct Routes {
    pub address: SocketAddr,
    pub seen: Arc<Mutex<Vec<Seen>>>,
}

impl Routes {
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.address)
    }
    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

/// Serves on `address` (`127.0.0.1:0` for any port).
pub async fn serve<F>(address: &str, route: F) -> Routes
where
    F: Fn(&Seen) -> Reply + Send + Sync + 'static,
{
    let listener = TcpListener::bind(address).await.unwrap_or_else(|e| panic!("bind {address}: {e}"));
    let bound = listener.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let route = Arc::new(route);
    let log = Arc::clone(&seen);
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            let (route, log) = (Arc::clone(&route), Arc::clone(&log));
            tokio::spawn(async move {
                let Some(request) = read(&mut socket).await else { return };
                log.lock().unwrap().push(request.clone());
                let mut reply = route(&request);
                loop {
                    match reply {
                        Reply::After(delay, next) => {
                            tokio::time::sleep(delay).await;
                            reply = *next;
                        }
                        Reply::Raw(bytes) => {
                            let _ = socket.write_all(&bytes).await;
                            let _ = socket.shutdown().await;
                            return;
                        }
                        Reply::Split(first, delay, rest) => {
                            let _ = socket.write_all(&first).await;
                            tokio::time::sleep(delay).await;
                            let _ = socket.write_all(&rest).await;
                            let _ = socket.shutdown().await;
                            return;
                        }
                        Reply::Drop => return,
                    }
                }
            });
        }
    });
    Routes { address: bound, seen }
}

async fn read(socket: &mut tokio::net::TcpStream) -> Option<Seen> {
    let mut buffer = Vec::new();
    let mut chunk = [0u8; 4096];
    let end = loop {
        let n = socket.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buffer.extend_from_slice(&chunk[..n]);
        if let Some(end) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
            break end + 4;
        }
    };
    let head = String::from_utf8_lossy(&buffer[..end]).to_string();
    let mut lines = head.lines();
    let mut first = lines.next()?.split(' ');
    let (method, target) = (first.next()?.to_string(), first.next()?.to_string());
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let length = headers.iter().find(|(k, _)| k == "content-length").and_then(|(_, v)| v.parse().ok()).unwrap_or(0);
    while buffer.len() < end + length {
        let n = socket.read(&mut chunk).await.ok()?;
        if n == 0 {
            break;
        }
        buffer.extend_from_slice(&chunk[..n]);
    }
    Some(Seen { method, target, headers, body: String::from_utf8_lossy(&buffer[end..]).into_owned() })
}

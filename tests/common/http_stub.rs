//! A minimal HTTP/1.1 server on a loopback address, standing in for external HTTP services
//! (webhooks, REST hooks, ClickHouse's HTTP interface), plain or over TLS: every request is answered
//! by a closure and reported on a channel, one request per connection (`connection: close`).

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::mpsc;

/// One request as the stub saw it.
#[derive(Debug, Clone)]
pub struct HttpRequest {
    pub method: String,
    /// Path and query string, as sent.
    pub target: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl HttpRequest {
    /// The first header of that name (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(key, _)| key.eq_ignore_ascii_case(name)).map(|(_, value)| value.as_str())
    }

    /// A query-string parameter, decoded.
    pub fn query_param(&self, name: &str) -> Option<String> {
        let url = url::Url::parse(&format!("http://stub{}", self.target)).ok()?;
        url.query_pairs().find(|(key, _)| key == name).map(|(_, value)| value.into_owned())
    }

    pub fn body_text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Serves on `address` (`127.0.0.1:0` for any free port) until the test's runtime ends. Binding
/// failures panic with the address, so a taken port is a clear test failure.
pub async fn http_stub<F>(address: &str, respond: F) -> (SocketAddr, mpsc::UnboundedReceiver<HttpRequest>)
where
    F: Fn(&HttpRequest) -> (u16, Vec<u8>) + Send + Sync + 'static,
{
    serve(address, None, respond).await
}

/// The same over TLS with `acceptor`'s certificate (an HTTPS endpoint).
pub async fn https_stub<F>(
    address: &str,
    acceptor: tokio_native_tls::TlsAcceptor,
    respond: F,
) -> (SocketAddr, mpsc::UnboundedReceiver<HttpRequest>)
where
    F: Fn(&HttpRequest) -> (u16, Vec<u8>) + Send + Sync + 'static,
{
    serve(address, Some(acceptor), respond).await
}

async fn serve<F>(
    address: &str,
    tls: Option<tokio_native_tls::TlsAcceptor>,
    respond: F,
) -> (SocketAddr, mpsc::UnboundedReceiver<HttpRequest>)
where
    F: Fn(&HttpRequest) -> (u16, Vec<u8>) + Send + Sync + 'static,
{
    let listener = TcpListener::bind(address).await.unwrap_or_else(|error| panic!("bind {address}: {error}"));
    let bound = listener.local_addr().expect("address");
    let (sender, receiver) = mpsc::unbounded_channel();
    let respond = Arc::new(respond);
    let tls = tls.map(Arc::new);
    tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            let (sender, respond, tls) = (sender.clone(), Arc::clone(&respond), tls.clone());
            tokio::spawn(async move {
                match tls {
                    // A failed handshake is the client's business (it sees the error).
                    Some(acceptor) => {
                        if let Ok(stream) = acceptor.accept(socket).await {
                            answer(stream, &*respond, &sender).await
                        }
                    }
                    None => answer(socket, &*respond, &sender).await,
                }
            });
        }
    });
    (bound, receiver)
}

async fn answer<S, F>(mut stream: S, respond: &F, sender: &mpsc::UnboundedSender<HttpRequest>)
where
    S: AsyncRead + AsyncWrite + Unpin,
    F: Fn(&HttpRequest) -> (u16, Vec<u8>),
{
    let Some(request) = read_request(&mut stream).await else { return };
    let (status, body) = respond(&request);
    let _ = sender.send(request);
    let head = format!("HTTP/1.1 {status} Whatever\r\ncontent-length: {}\r\nconnection: close\r\n\r\n", body.len());
    let _ = stream.write_all(head.as_bytes()).await;
    let _ = stream.write_all(&body).await;
    let _ = stream.shutdown().await;
}

async fn read_request<S: AsyncRead + Unpin>(socket: &mut S) -> Option<HttpRequest> {
    let mut buffer = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        let read = socket.read(&mut chunk).await.unwrap_or(0);
        if read == 0 {
            return None;
        }
        buffer.extend_from_slice(&chunk[..read]);
        if let Some(end) = buffer.windows(4).position(|window| window == b"\r\n\r\n") {
            break end + 4;
        }
    };
    let head = String::from_utf8_lossy(&buffer[..head_end]).to_string();
    let mut lines = head.lines();
    let mut request_line = lines.next().unwrap_or_default().split(' ');
    let (method, target) = (request_line.next().unwrap_or_default(), request_line.next().unwrap_or_default());
    let headers: Vec<(String, String)> = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(key, value)| (key.trim().to_owned(), value.trim().to_owned()))
        .collect();
    let content_length = headers
        .iter()
        .find(|(key, _)| key.eq_ignore_ascii_case("content-length"))
        .and_then(|(_, value)| value.parse::<usize>().ok())
        .unwrap_or(0);
    while buffer.len() < head_end + content_length {
        let read = socket.read(&mut chunk).await.unwrap_or(0);
        if read == 0 {
            break;
        }
        buffer.extend_from_slice(&chunk[..read]);
    }
    Some(HttpRequest {
        method: method.to_owned(),
        target: target.to_owned(),
        headers,
        body: buffer[head_end..].to_vec(),
    })
}

/// The next request the stub received (waits up to 10 s).
pub async fn next_request(receiver: &mut mpsc::UnboundedReceiver<HttpRequest>) -> HttpRequest {
    tokio::time::timeout(std::time::Duration::from_secs(10), receiver.recv())
        .await
        .expect("request in time")
        .expect("request")
}

//! The real `fetch` (reqwest) behind the sandbox, against a local HTTP server.

mod runtime_support;

use std::sync::Arc;

use async_trait::async_trait;
use plugin_server::plugins::runtime::{CallKind, MetaBindings, MetaError, PluginVmSpec, WorkerPool};
use runtime_support::options;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Meta with the default (network) fetch.
struct NetworkMeta;

#[async_trait]
impl MetaBindings for NetworkMeta {
    async fn call(&self, _name: &str, _args: Vec<Value>) -> Result<Value, MetaError> {
        Ok(Value::Null)
    }
}

/// Answers every request with a JSON echo of its request line and body.
async fn serve() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut socket, _)) = listener.accept().await else { return };
            tokio::spawn(async move {
                let mut buffer = vec![0u8; 65536];
                let mut read = 0;
                loop {
                    let n = socket.read(&mut buffer[read..]).await.unwrap_or(0);
                    read += n;
                    let text = String::from_utf8_lossy(&buffer[..read]).to_string();
                    if let Some(end) = text.find("\r\n\r\n") {
                        let length = text
                            .lines()
                            .find_map(|l| {
                                l.to_ascii_lowercase()
                                    .strip_prefix("content-length: ")
                                    .map(|v| v.trim().parse::<usize>().unwrap_or(0))
                            })
                            .unwrap_or(0);
                        if read >= end + 4 + length || n == 0 {
                            let request_line = text.lines().next().unwrap_or("").to_string();
                            let body = text[end + 4..].to_string();
                            let payload = json!({"request": request_line, "body": body}).to_string();
                            let response = format!(
                                "HTTP/1.1 201 Created\r\ncontent-type: application/json\r\nx-custom: yes\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{}",
                                payload.len(),
                                payload
                            );
                            let _ = socket.write_all(response.as_bytes()).await;
                            return;
                        }
                    }
                    if n == 0 {
                        return;
                    }
                }
            });
        }
    });
    format!("http://{address}")
}

#[tokio::test]
async fn fetch_performs_real_requests() {
    let base = serve().await;
    let pool = WorkerPool::new(options(1, 5.0)).unwrap();
    let code = format!(
        "import fetch from 'node-fetch'
        export async function runEveryMinute() {{
            const r = await fetch('{base}/path?q=1', {{ method: 'POST', body: JSON.stringify({{ a: 1 }}), headers: {{ 'Content-Type': 'application/json' }} }})
            const data = await r.json()
            const missing = await fetch('http://127.0.0.1:1/').then(() => 'connected', e => e.name)
            return [r.status, r.ok, r.headers.get('X-Custom'), data.request, data.body, missing]
        }}"
    );
    pool.load(PluginVmSpec { plugin_config_id: 1, code, meta: Arc::new(NetworkMeta) }).await.unwrap();
    let out = pool.call(1, "runEveryMinute", vec![], CallKind::Task).await.unwrap();
    assert_eq!(out, json!([201, true, "yes", "POST /path?q=1 HTTP/1.1", "{\"a\":1}", "FetchError"]));
}

//! A local statsd server: collects every line sent to its UDP port (datagrams carry several,
//! newline-separated), so tests assert on what the server really sent.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub struct StatsdListener {
    pub port: u16,
    lines: Arc<Mutex<Vec<String>>>,
}

impl StatsdListener {
    pub fn start() -> StatsdListener {
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").expect("a UDP port");
        let port = socket.local_addr().expect("local address").port();
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&lines);
        std::thread::spawn(move || {
            let mut buffer = [0u8; 65536];
            while let Ok((length, _)) = socket.recv_from(&mut buffer) {
                let text = String::from_utf8_lossy(&buffer[..length]).to_string();
                sink.lock().expect("lines").extend(text.lines().map(str::to_string));
            }
        });
        StatsdListener { port, lines }
    }

    /// Makes the process-wide statsd client send here (no prefix). Each test runs in its own
    /// process under nextest, so this is the test's client.
    pub fn install_global(&self) {
        let metrics = plugin_server::metrics::Metrics::udp("127.0.0.1", self.port, "").expect("statsd client");
        plugin_server::metrics::install(metrics);
    }

    pub fn lines(&self) -> Vec<String> {
        self.lines.lock().expect("lines").clone()
    }

    /// The metric names received (without `prefix`, tags and value).
    pub fn names(&self, prefix: &str) -> BTreeSet<String> {
        self.lines().iter().filter_map(|line| metric_name(line, prefix)).collect()
    }

    /// Waits (flushing the global client) until a line starting with `start` arrived.
    pub fn wait_for_line(&self, start: &str, within: Duration) -> String {
        let deadline = Instant::now() + within;
        loop {
            plugin_server::metrics::global().flush();
            if let Some(line) = self.lines().into_iter().find(|line| line.starts_with(start)) {
                return line;
            }
            assert!(Instant::now() < deadline, "no statsd line starting with {start}: {:?}", self.lines());
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// `prefix.name,tag=v:1|c` → `name`.
pub fn metric_name(line: &str, prefix: &str) -> Option<String> {
    let body = line.strip_prefix(prefix)?;
    let end = body.find([',', ':']).unwrap_or(body.len());
    Some(body[..end].to_string())
}

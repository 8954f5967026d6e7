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

impl StatsdListener {
    /// Flushes the global client and waits until no more lines arrive (loopback delivers in
    /// microseconds; 200 ms of quiet is plenty), so that counts read next are complete.
    pub fn settle(&self) {
        plugin_server::metrics::global().flush();
        let mut seen = self.lines().len();
        loop {
            std::thread::sleep(Duration::from_millis(200));
            let now = self.lines().len();
            if now == seen {
                return;
            }
            seen = now;
        }
    }

    /// The sum of the counter lines of `key` (`key:N|c`; the client sums a key's increments per
    /// flush, so one increment may be part of a larger line).
    pub fn total(&self, key: &str) -> i64 {
        self.lines()
            .iter()
            .filter_map(|line| line.strip_prefix(key)?.strip_prefix(':')?.strip_suffix("|c")?.parse::<i64>().ok())
            .sum()
    }

    /// Whether a line of `key` (a timing, gauge or counter, with any value) arrived.
    pub fn has_key(&self, key: &str) -> bool {
        self.lines().iter().any(|line| line.strip_prefix(key).is_some_and(|rest| rest.starts_with(':')))
    }
}

/// `prefix.name,tag=v:1|c` → `name`.
pub fn metric_name(line: &str, prefix: &str) -> Option<String> {
    let body = line.strip_prefix(prefix)?;
    let end = body.find([',', ':']).unwrap_or(body.len());
    Some(body[..end].to_string())
}

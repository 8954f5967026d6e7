//! The statsd wire: how a metric call becomes telegraf lines in UDP datagrams, cheaply.
//!
//! A call does no formatting and no allocation: the metric's key (prefix, name and sanitised
//! tags, `prefix.name,tag=value`) is registered once per client and referred to by number; a
//! [`StatsdKey`] (a fixed name and tags, in a `static`) remembers its number, a [`KeyCache`] keeps
//! the numbers of a templated family by integers (team id, plugin config, a static string's
//! address), other calls render their key into a per-thread buffer and look it up. The call then
//! appends `(key, value)` to a queue. A thread of the client's own ([`FLUSH_EVERY`], or sooner once [`WAKE_AT`] samples wait)
//! takes the queue and writes the lines: counters of the same key summed into one line per flush
//! (at the place of the first), timings and gauges one line each, exactly as called (the
//! reference's hot-shots samples nothing). Lines are packed into datagrams of at most
//! [`DATAGRAM_BYTES`], newline-separated, as statsd and telegraf accept them.

use std::cell::RefCell;
use std::collections::HashMap;
use std::fmt::Write as _;
use std::hash::Hash;
use std::net::{SocketAddr, ToSocketAddrs, UdpSocket};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError, RwLock};
use std::time::Duration;

use rustc_hash::FxBuildHasher;
use tracing::warn;

use super::handles::Handles;

/// Key numbers of a family of metrics by a key of the caller's (`client id << 32 | number`).
pub type KeyCache<K> = Handles<K, u64>;

/// Largest datagram: lines are packed into one up to this size (Ethernet's MTU less the headers,
/// statsd's advice for a local network).
pub const DATAGRAM_BYTES: usize = 1432;

/// Queued samples wait at most this long.
pub const FLUSH_EVERY: Duration = Duration::from_secs(1);

/// Samples waiting that wake the flusher before its time.
pub const WAKE_AT: usize = 8192;

/// Samples kept at most between two flushes; beyond, new ones are dropped and counted.
const MAX_PENDING: usize = 1 << 18;

/// Keys registered at most per client; a key beyond (an unbounded tag) is sent unregistered.
const MAX_KEYS: usize = 100_000;

/// One metric's value.
#[derive(Debug, Clone, Copy)]
pub enum Value {
    /// `|c`, summed per key within a flush.
    Count(i64),
    /// `|ms`, whole milliseconds.
    Millis(u64),
    /// `|g`, the number as JavaScript prints it.
    Gauge(f64),
}

/// A metric with a fixed name and tags, kept in a `static`: its key is registered at its first
/// use and found again with one atomic load.
pub struct StatsdKey {
    name: &'static str,
    tags: &'static [(&'static str, &'static str)],
    /// `client id << 32 | key number` for the client that resolved it last (0: none).
    resolved: AtomicU64,
}

impl StatsdKey {
    pub const fn new(name: &'static str) -> StatsdKey {
        StatsdKey::tagged(name, &[])
    }

    pub const fn tagged(name: &'static str, tags: &'static [(&'static str, &'static str)]) -> StatsdKey {
        StatsdKey { name, tags, resolved: AtomicU64::new(0) }
    }
}

enum KeyRef {
    Registered(u32),
    Unregistered(Box<str>),
}

struct Sample {
    key: KeyRef,
    value: Value,
}

#[derive(Default)]
struct Registry {
    index: HashMap<Arc<str>, u32, FxBuildHasher>,
    keys: Vec<Arc<str>>,
}

/// The flusher's buffers, reused from flush to flush (and the lock that serialises flushes).
#[derive(Default)]
struct FlushBuffers {
    batch: Vec<Sample>,
    sums: Vec<i64>,
    first: Vec<usize>,
    /// A gauge's number as text.
    line: String,
    datagram: Vec<u8>,
}

/// One client's registry, queue and socket.
pub struct Statsd {
    id: u32,
    prefix: String,
    registry: RwLock<Registry>,
    pending: Mutex<Vec<Sample>>,
    dropped: AtomicU64,
    buffers: Mutex<FlushBuffers>,
    socket: UdpSocket,
    target: SocketAddr,
    flusher: OnceLock<std::thread::Thread>,
}

thread_local! {
    /// Where keys are rendered for their lookup.
    static SCRATCH: RefCell<String> = RefCell::new(String::with_capacity(128));
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// hot-shots' telegraf sanitising: `:` and `|` in tag keys and values become `_`; so do `,`
/// (it would split the tag list) and newlines (they would split the line).
fn push_clean(out: &mut String, text: &str) {
    let unsafe_char = |c: char| matches!(c, ':' | '|' | ',' | '\n');
    if !text.contains(unsafe_char) {
        out.push_str(text);
        return;
    }
    out.extend(text.chars().map(|c| if unsafe_char(c) { '_' } else { c }));
}

/// `prefix` + the name parts + `,tag=value` for each tag.
fn render(out: &mut String, prefix: &str, name: &[&str], tags: &[(&str, &str)]) {
    out.clear();
    out.push_str(prefix);
    for part in name {
        out.push_str(part);
    }
    for (key, value) in tags {
        out.push(',');
        push_clean(out, key);
        out.push('=');
        push_clean(out, value);
    }
}

impl Statsd {
    /// A client sending to `host:port` (resolved now), with its flusher thread.
    pub fn udp(host: &str, port: u16, prefix: &str) -> Result<Arc<Statsd>, String> {
        let target = (host, port)
            .to_socket_addrs()
            .map_err(|error| error.to_string())?
            .next()
            .ok_or_else(|| format!("{host} has no address"))?;
        let bind = if target.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" };
        let socket = UdpSocket::bind(bind).map_err(|error| error.to_string())?;
        socket.set_nonblocking(true).map_err(|error| error.to_string())?;
        static CLIENTS: AtomicU32 = AtomicU32::new(0);
        let statsd = Arc::new(Statsd {
            id: CLIENTS.fetch_add(1, Ordering::Relaxed) + 1,
            prefix: prefix.to_string(),
            registry: RwLock::default(),
            pending: Mutex::new(Vec::with_capacity(WAKE_AT)),
            dropped: AtomicU64::new(0),
            buffers: Mutex::default(),
            socket,
            target,
            flusher: OnceLock::new(),
        });
        statsd.spawn_flusher();
        Ok(statsd)
    }

    /// Flushes every [`FLUSH_EVERY`] (sooner when woken) from a thread of its own, which ends
    /// once the client is dropped.
    fn spawn_flusher(self: &Arc<Statsd>) {
        let weak = Arc::downgrade(self);
        let spawned = std::thread::Builder::new().name("statsd-flush".into()).spawn(move || loop {
            std::thread::park_timeout(FLUSH_EVERY);
            match weak.upgrade() {
                Some(statsd) => statsd.flush(),
                None => return,
            }
        });
        match spawned {
            Ok(handle) => {
                let _ = self.flusher.set(handle.thread().clone());
            }
            Err(error) => warn!("⚠️ No StatsD flush thread: {error}"),
        }
    }

    /// Records a metric whose name is the concatenation of `name`.
    pub fn record(&self, name: &[&str], tags: &[(&str, &str)], value: Value) {
        let key = self.resolve(name, tags);
        self.push(key, value);
    }

    /// Records a [`StatsdKey`] metric.
    pub fn record_key(&self, key: &StatsdKey, value: Value) {
        let packed = key.resolved.load(Ordering::Relaxed);
        if (packed >> 32) as u32 == self.id {
            return self.push(KeyRef::Registered(packed as u32), value);
        }
        let resolved = self.resolve(&[key.name], key.tags);
        if let KeyRef::Registered(number) = resolved {
            key.resolved.store(u64::from(self.id) << 32 | u64::from(number), Ordering::Relaxed);
        }
        self.push(resolved, value);
    }

    /// Records a metric whose key number is kept in `cache` under `key` (integers, addresses of
    /// `&'static str`s: hashed without rendering the name and tags), rendered the first time.
    pub fn record_cached<K: Hash + Eq>(
        &self,
        cache: &KeyCache<K>,
        key: K,
        name: &[&str],
        tags: &[(&str, &str)],
        value: Value,
    ) {
        let id = self.id;
        let ours = |packed: &u64| (*packed >> 32) as u32 == id;
        let make = || match self.resolve(name, tags) {
            KeyRef::Registered(number) => u64::from(id) << 32 | u64::from(number),
            KeyRef::Unregistered(_) => 0,
        };
        let packed = cache.with_valid(key, ours, make, |packed| *packed);
        if ours(&packed) {
            self.push(KeyRef::Registered(packed as u32), value);
        } else {
            self.record(name, tags, value);
        }
    }

    fn resolve(&self, name: &[&str], tags: &[(&str, &str)]) -> KeyRef {
        SCRATCH.with(|scratch| match scratch.try_borrow_mut() {
            Ok(mut text) => {
                render(&mut text, &self.prefix, name, tags);
                self.lookup(&text)
            }
            // Only if a metric were recorded while rendering one (it is not): a buffer of its own.
            Err(_) => {
                let mut text = String::new();
                render(&mut text, &self.prefix, name, tags);
                self.lookup(&text)
            }
        })
    }

    fn lookup(&self, text: &str) -> KeyRef {
        let registry = self.registry.read().unwrap_or_else(PoisonError::into_inner);
        if let Some(number) = registry.index.get(text) {
            return KeyRef::Registered(*number);
        }
        drop(registry);
        let mut registry = self.registry.write().unwrap_or_else(PoisonError::into_inner);
        if let Some(number) = registry.index.get(text) {
            return KeyRef::Registered(*number);
        }
        if registry.keys.len() >= MAX_KEYS {
            return KeyRef::Unregistered(text.into());
        }
        let number = registry.keys.len() as u32;
        let key: Arc<str> = text.into();
        registry.keys.push(key.clone());
        registry.index.insert(key, number);
        KeyRef::Registered(number)
    }

    fn push(&self, key: KeyRef, value: Value) {
        let mut pending = lock(&self.pending);
        if pending.len() >= MAX_PENDING {
            drop(pending);
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        pending.push(Sample { key, value });
        let wake = pending.len() == WAKE_AT;
        drop(pending);
        if wake {
            if let Some(flusher) = self.flusher.get() {
                flusher.unpark();
            }
        }
    }

    /// Sends every queued sample now.
    pub fn flush(&self) {
        let mut buffers = lock(&self.buffers);
        let FlushBuffers { batch, sums, first, line, datagram } = &mut *buffers;
        std::mem::swap(&mut *lock(&self.pending), batch);
        let dropped = self.dropped.swap(0, Ordering::Relaxed);
        if dropped > 0 {
            warn!("⚠️ StatsD: {dropped} metrics dropped, more than {MAX_PENDING} were waiting");
        }
        if batch.is_empty() {
            return;
        }
        let registry = self.registry.read().unwrap_or_else(PoisonError::into_inner);
        // Counters: one line per key, at its first place, with the sum.
        sums.clear();
        sums.resize(registry.keys.len(), 0);
        first.clear();
        first.resize(registry.keys.len(), usize::MAX);
        for (place, sample) in batch.iter().enumerate() {
            if let (KeyRef::Registered(number), Value::Count(count)) = (&sample.key, sample.value) {
                let number = *number as usize;
                sums[number] = sums[number].wrapping_add(count);
                if first[number] == usize::MAX {
                    first[number] = place;
                }
            }
        }
        let mut failure = None;
        for (place, sample) in batch.drain(..).enumerate() {
            let text: &str = match &sample.key {
                KeyRef::Registered(number) => &registry.keys[*number as usize],
                KeyRef::Unregistered(text) => text,
            };
            let (mut integer, gauge) = (itoa::Buffer::new(), &mut *line);
            let (value, suffix): (&str, &str) = match (sample.value, &sample.key) {
                (Value::Count(_), KeyRef::Registered(number)) => {
                    let number = *number as usize;
                    if first[number] != place {
                        continue;
                    }
                    (integer.format(sums[number]), "|c")
                }
                (Value::Count(count), KeyRef::Unregistered(_)) => (integer.format(count), "|c"),
                (Value::Millis(millis), _) => (integer.format(millis), "|ms"),
                (Value::Gauge(value), _) => {
                    gauge.clear();
                    let _ = write!(gauge, "{value}");
                    (gauge.as_str(), "|g")
                }
            };
            let length = text.len() + 1 + value.len() + suffix.len();
            if !datagram.is_empty() && datagram.len() + 1 + length > DATAGRAM_BYTES {
                self.send(datagram, &mut failure);
            }
            if !datagram.is_empty() {
                datagram.push(b'\n');
            }
            datagram.extend_from_slice(text.as_bytes());
            datagram.push(b':');
            datagram.extend_from_slice(value.as_bytes());
            datagram.extend_from_slice(suffix.as_bytes());
        }
        drop(registry);
        if !datagram.is_empty() {
            self.send(datagram, &mut failure);
        }
        if let Some(error) = failure {
            warn!("⚠️ StatsD error: {error}");
        }
    }

    /// Sends one datagram (a full socket buffer drops it, as UDP would) and empties it.
    fn send(&self, datagram: &mut Vec<u8>, failure: &mut Option<std::io::Error>) {
        if let Err(error) = self.socket.send_to(datagram, self.target) {
            if error.kind() != std::io::ErrorKind::WouldBlock && failure.is_none() {
                *failure = Some(error);
            }
        }
        datagram.clear();
    }
}

impl Drop for Statsd {
    fn drop(&mut self) {
        self.flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_rendered_in_telegraf_form_and_sanitised() {
        let mut text = String::new();
        render(&mut text, "p.", &["plugin.", "geo", ".on_event"], &[("team_id", "2"), ("distinctId", "a:b|c,d\ne")]);
        assert_eq!(text, "p.plugin.geo.on_event,team_id=2,distinctId=a_b_c_d_e");
    }

    #[test]
    fn counters_are_summed_and_the_rest_kept_in_order() {
        let receiver = UdpSocket::bind("127.0.0.1:0").unwrap();
        receiver.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        let statsd = Statsd::udp("127.0.0.1", receiver.local_addr().unwrap().port(), "p.").unwrap();
        static FIXED: StatsdKey = StatsdKey::tagged("fixed", &[("a", "b")]);
        statsd.record(&["c"], &[], Value::Count(1));
        statsd.record_key(&FIXED, Value::Millis(5));
        statsd.record(&["c"], &[], Value::Count(2));
        statsd.record_key(&FIXED, Value::Millis(7));
        statsd.record(&["g"], &[], Value::Gauge(2.5));
        statsd.flush();
        let mut buffer = [0u8; 2048];
        let length = receiver.recv(&mut buffer).unwrap();
        assert_eq!(
            std::str::from_utf8(&buffer[..length]).unwrap(),
            "p.c:3|c\np.fixed,a=b:5|ms\np.fixed,a=b:7|ms\np.g:2.5|g"
        );
    }
}

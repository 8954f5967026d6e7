//! Kafka over TLS with client certificates (`KAFKA_CLIENT_CERT_B64`, `KAFKA_CLIENT_CERT_KEY_B64`,
//! `KAFKA_TRUSTED_CERT_B64`), through a real handshake: stunnel (Debian's `stunnel4`, installed by
//! scripts/services) terminates TLS and requires a client certificate signed by a CA made here with
//! `openssl`, in front of a Tansu broker of this test's own whose advertised listener is the TLS
//! port, so every connection the client makes (bootstrap and broker) is TLS.
//!
//! Events go in through our producer and out through our consumer with our rdkafka settings; a
//! client certificate from another CA is refused by the broker side, and a broker certificate that
//! does not chain to `KAFKA_TRUSTED_CERT_B64` is refused by ours.

mod queues_support;

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine;
use plugin_server::config::Config;
use plugin_server::sinks::{KafkaProducerWrapper, KafkaRecord};
use plugin_server::sources::{KafkaConsumerOptions, KafkaQueue};
use queues_support::{eventually, unique, RecordingHandler};
use serde_json::json;

/// The Tansu binary scripts/kafka installs (and caches), as that script reports it.
fn tansu_binary() -> PathBuf {
    static BINARY: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BINARY
        .get_or_init(|| {
            let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/kafka");
            let output = Command::new("bash").arg(script).arg("bin").output().expect("run scripts/kafka bin");
            assert!(output.status.success(), "scripts/kafka bin failed");
            PathBuf::from(String::from_utf8_lossy(&output.stdout).trim())
        })
        .clone()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn openssl(dir: &Path, args: &[&str]) {
    let status = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("openssl");
    assert!(status.success(), "openssl {args:?}");
}

/// A CA (`<name>.pem`, `<name>.key`) in `dir`.
fn make_ca(dir: &Path, name: &str) {
    let subject = format!("/CN={name}");
    let (key, cert) = (format!("{name}.key"), format!("{name}.pem"));
    openssl(
        dir,
        &[
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", &subject, "-keyout", &key, "-out",
            &cert,
        ],
    );
}

/// A certificate `<name>.pem` with key `<name>.key` signed by CA `ca`.
fn make_certificate(dir: &Path, name: &str, ca: &str) {
    let (key, csr, cert) = (format!("{name}.key"), format!("{name}.csr"), format!("{name}.pem"));
    let (ca_cert, ca_key) = (format!("{ca}.pem"), format!("{ca}.key"));
    openssl(
        dir,
        &["req", "-newkey", "rsa:2048", "-nodes", "-subj", &format!("/CN={name}"), "-keyout", &key, "-out", &csr],
    );
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            &ca_cert,
            "-CAkey",
            &ca_key,
            "-CAcreateserial",
            "-days",
            "1",
            "-out",
            &cert,
        ],
    );
}

fn b64_file(dir: &Path, file: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(std::fs::read(dir.join(file)).expect("read certificate"))
}

fn wait_for_port(port: u16, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "{what} did not listen on 127.0.0.1:{port}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A Tansu broker behind a TLS terminator requiring client certificates, for one test. Both
/// processes are killed when it drops.
struct TlsBroker {
    dir: tempfile::TempDir,
    /// What `KAFKA_HOSTS` points at: the TLS port.
    hosts: String,
    plain_port: u16,
    processes: Vec<Child>,
}

impl TlsBroker {
    fn start() -> TlsBroker {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path();
        make_ca(path, "ca");
        make_certificate(path, "broker", "ca");
        make_certificate(path, "client", "ca");
        make_ca(path, "other-ca");
        make_certificate(path, "stranger", "other-ca");

        let (plain_port, tls_port) = (free_port(), free_port());
        let mut processes = Vec::new();
        // The SQLite engine scripts/kafka builds, on a file of this test's own (Tansu resolves it
        // against its working directory).
        let tansu = Command::new(tansu_binary())
            .current_dir(path)
            .args(["broker", "--listener-url", &format!("tcp://127.0.0.1:{plain_port}")])
            .args(["--advertised-listener-url", &format!("tcp://127.0.0.1:{tls_port}")])
            .args(["--storage-engine", "sqlite://tansu.db"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start Tansu");
        processes.push(tansu);
        let config = format!(
            "foreground = yes\npid =\noutput = {dir}/stunnel.log\n[kafka]\naccept = 127.0.0.1:{tls_port}\n\
             connect = 127.0.0.1:{plain_port}\ncert = {dir}/broker.pem\nkey = {dir}/broker.key\n\
             CAfile = {dir}/ca.pem\nrequireCert = yes\nverifyChain = yes\n",
            dir = path.display()
        );
        std::fs::write(path.join("stunnel.conf"), config).unwrap();
        let stunnel = Command::new("stunnel")
            .arg(path.join("stunnel.conf"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start stunnel (Debian package stunnel4; scripts/services installs it)");
        processes.push(stunnel);
        let broker = TlsBroker { dir, hosts: format!("127.0.0.1:{tls_port}"), plain_port, processes };
        wait_for_port(plain_port, "Tansu");
        wait_for_port(tls_port, "stunnel");
        broker
    }

    /// Creates a topic over the plain port (test set-up, not what is under test).
    fn create_topic(&self, topic: &str) {
        let status = Command::new(tansu_binary())
            .args(["topic", "create", "--broker", &format!("tcp://127.0.0.1:{}", self.plain_port)])
            .args(["--partitions", "1", topic])
            .stdout(Stdio::null())
            .status()
            .expect("tansu topic create");
        assert!(status.success(), "create topic {topic}");
    }

    /// Server configuration over TLS with the given client certificate and trusted CA.
    fn config(&self, topic: &str, client: &str, trusted_ca: &str) -> Config {
        let path = self.dir.path();
        let (cert, key, ca) = (
            b64_file(path, &format!("{client}.pem")),
            b64_file(path, &format!("{client}.key")),
            b64_file(path, trusted_ca),
        );
        Config::from_pairs(&[
            ("KAFKA_ENABLED", "true"),
            ("KAFKA_HOSTS", self.hosts.as_str()),
            ("KAFKA_CONSUMPTION_TOPIC", topic),
            ("KAFKA_CLIENT_CERT_B64", cert.as_str()),
            ("KAFKA_CLIENT_CERT_KEY_B64", key.as_str()),
            ("KAFKA_TRUSTED_CERT_B64", ca.as_str()),
        ])
        .expect("config")
    }

    fn stunnel_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("stunnel.log")).unwrap_or_default()
    }
}

impl Drop for TlsBroker {
    fn drop(&mut self) {
        for process in &mut self.processes {
            let _ = process.kill();
            let _ = process.wait();
        }
    }
}

fn options(config: &Config, join_timeout: Duration) -> KafkaConsumerOptions {
    KafkaConsumerOptions {
        group_id: unique("tls-group"),
        offset_reset: "earliest".into(),
        session_timeout: Duration::from_secs(6),
        join_timeout,
        ..KafkaConsumerOptions::from_config(config, &uuid::Uuid::new_v4())
    }
}

fn raw_event(distinct_id: &str) -> Vec<u8> {
    let data = json!({"event": "over tls", "properties": {}, "distinct_id": distinct_id,
        "timestamp": "2021-10-28T11:59:57.792Z"});
    json!({"distinct_id": distinct_id, "ip": "127.0.0.1", "site_url": "", "team_id": 2,
        "uuid": uuid::Uuid::new_v4().to_string(), "data": data.to_string(), "now": "2021-10-28T12:00:00Z",
        "sent_at": "2021-10-28T11:59:59Z"})
    .to_string()
    .into_bytes()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_go_in_and_out_over_tls_with_a_client_certificate() {
    let broker = TlsBroker::start();
    let topic = unique("tls-in");
    broker.create_topic(&topic);
    let config = broker.config(&topic, "client", "ca.pem");

    let producer = KafkaProducerWrapper::connect(&config, "tls-test").unwrap();
    let distinct_id = unique("tls-person");
    producer.queue_message(KafkaRecord::single(&topic, None, raw_event(&distinct_id))).await.unwrap();
    tokio::time::timeout(Duration::from_secs(30), producer.flush())
        .await
        .expect("delivered in time")
        .unwrap_or_else(|error| panic!("delivery over TLS failed: {error}\n{}", broker.stunnel_log()));

    let handler = RecordingHandler::new();
    let queue =
        KafkaQueue::start(&config, options(&config, Duration::from_secs(30)), handler.clone(), producer.clone())
            .await
            .unwrap_or_else(|error| panic!("consumer over TLS: {error}\n{}", broker.stunnel_log()));
    assert!(eventually(Duration::from_secs(30), || async { handler.event_count() == 1 }).await, "event consumed");
    assert_eq!(handler.events()[0].distinct_id, distinct_id);
    queue.stop().await;
    assert!(broker.stunnel_log().contains("Certificate accepted at depth=0: CN=client"), "{}", broker.stunnel_log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_certificate_from_another_ca_is_refused() {
    let broker = TlsBroker::start();
    let topic = unique("tls-stranger");
    broker.create_topic(&topic);
    let config = broker.config(&topic, "stranger", "ca.pem");
    let producer = KafkaProducerWrapper::connect(&config, "tls-test").unwrap();
    let started =
        KafkaQueue::start(&config, options(&config, Duration::from_secs(5)), RecordingHandler::new(), producer).await;
    assert!(started.is_err(), "a consumer with a stranger's certificate must not join");
    // Refused in the handshake: OpenSSL's client does not even offer a certificate the broker's CA
    // list does not name ("peer did not return a certificate"), or the broker fails to verify it.
    let log = broker.stunnel_log();
    assert!(log.contains("SSL_accept:") && !log.contains("Certificate accepted"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_certificate_not_from_the_trusted_ca_is_refused() {
    let broker = TlsBroker::start();
    let topic = unique("tls-untrusted");
    broker.create_topic(&topic);
    let config = broker.config(&topic, "client", "other-ca.pem");
    let producer = KafkaProducerWrapper::connect(&config, "tls-test").unwrap();
    let started =
        KafkaQueue::start(&config, options(&config, Duration::from_secs(5)), RecordingHandler::new(), producer).await;
    assert!(started.is_err(), "our client must not talk to a broker outside KAFKA_TRUSTED_CERT_B64");
    // Our client ends the handshake with an "unknown CA" alert.
    let log = broker.stunnel_log();
    assert!(log.contains("alert unknown ca") && !log.contains("Certificate accepted"), "{log}");
}

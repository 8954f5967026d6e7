//! The ClickHouse client against a stand-in for ClickHouse's HTTP interface on loopback (a real
//! ClickHouse is an external service): what it sends (SQL, database, option, credentials), how
//! answers and failures come back, TLS with and without `CLICKHOUSE_CA`, and the Kafka-mode
//! start-up `SELECT 1` of the server binary, reachable or not.
//!
//! The stand-in answers like ClickHouse: a RowBinary body (`SELECT 1` is the single byte 0x01, no
//! rows is an empty body), or HTTP 500 with the exception text.

mod common;
mod queues_support;

use std::time::{Duration, Instant};

use common::http_stub::{http_stub, https_stub, next_request, HttpRequest};
use common::server_process::{run, stdout, Server};
use common::TestDb;
use plugin_server::clickhouse::{ClickHouse, ClickHouseError, ClickHouseSettings};
use queues_support::{create_topics, ensure_kafka, kafka_hosts, produce, unique};
use serde_json::json;

/// Answers like ClickHouse: `SELECT 1` → one UInt8 row; anything else → no rows.
fn clickhouse_answer(request: &HttpRequest) -> (u16, Vec<u8>) {
    let sql = request.query_param("query").unwrap_or_else(|| request.body_text());
    if sql.starts_with("SELECT 1 FORMAT") {
        (200, vec![1])
    } else {
        (200, vec![])
    }
}

fn settings(url: String, password: Option<&str>) -> ClickHouseSettings {
    ClickHouseSettings {
        url,
        database: "posthog".into(),
        user: "reader".into(),
        password: password.map(str::to_owned),
        ca: None,
    }
}

#[tokio::test]
async fn select_one_sends_the_reference_settings_in_plain_http() {
    let (address, mut requests) = http_stub("127.0.0.1:0", clickhouse_answer).await;
    let clickhouse = ClickHouse::new(&settings(format!("http://{address}"), Some("secret"))).unwrap();
    clickhouse.check_connection(Duration::from_secs(5)).await.unwrap();
    let request = next_request(&mut requests).await;
    assert_eq!(request.method, "GET", "a short read query goes in the URL");
    assert_eq!(request.query_param("query").as_deref(), Some("SELECT 1 FORMAT RowBinary"));
    assert_eq!(request.query_param("database").as_deref(), Some("posthog"));
    assert_eq!(request.query_param("output_format_json_quote_64bit_integers").as_deref(), Some("0"));
    assert_eq!(request.query_param("compress"), None, "no LZ4: answers are plain");
    assert_eq!(request.header("X-ClickHouse-User"), Some("reader"));
    assert_eq!(request.header("X-ClickHouse-Key"), Some("secret"));
}

#[tokio::test]
async fn without_a_password_no_key_is_sent() {
    let (address, mut requests) = http_stub("127.0.0.1:0", clickhouse_answer).await;
    let clickhouse = ClickHouse::new(&settings(format!("http://{address}"), None)).unwrap();
    clickhouse.check_connection(Duration::from_secs(5)).await.unwrap();
    let request = next_request(&mut requests).await;
    assert_eq!(request.header("X-ClickHouse-User"), Some("reader"));
    assert_eq!(request.header("X-ClickHouse-Key"), None);
}

#[tokio::test]
async fn rows_come_back_and_question_marks_stay_literal() {
    let (address, mut requests) = http_stub("127.0.0.1:0", |_| (200, vec![1, 0, 2])).await;
    let clickhouse = ClickHouse::new(&settings(format!("http://{address}"), None)).unwrap();
    let rows: Vec<u8> = clickhouse.fetch_all("SELECT x FROM t WHERE s = 'what?'").await.unwrap();
    assert_eq!(rows, vec![1, 0, 2]);
    let request = next_request(&mut requests).await;
    assert_eq!(request.query_param("query").as_deref(), Some("SELECT x FROM t WHERE s = 'what?' FORMAT RowBinary"));
}

#[tokio::test]
async fn an_exception_is_an_error_carrying_its_text() {
    let exception = "Code: 516. DB::Exception: reader: Authentication failed: password is incorrect";
    let (address, _requests) = http_stub("127.0.0.1:0", move |_| (500, exception.as_bytes().to_vec())).await;
    let clickhouse = ClickHouse::new(&settings(format!("http://{address}"), Some("wrong"))).unwrap();
    let error = clickhouse.check_connection(Duration::from_secs(5)).await.unwrap_err();
    assert!(matches!(error, ClickHouseError::Query(_)), "{error:?}");
    assert!(error.to_string().contains("Authentication failed"), "{error}");
}

#[tokio::test]
async fn unreachable_fails_at_once_and_silence_times_out() {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let clickhouse = ClickHouse::new(&settings(format!("http://127.0.0.1:{port}"), None)).unwrap();
    let started = Instant::now();
    let error = clickhouse.check_connection(Duration::from_secs(5)).await.unwrap_err();
    assert!(matches!(error, ClickHouseError::Query(_)), "{error:?}");
    assert!(started.elapsed() < Duration::from_secs(2), "connection refused is instant: {:?}", started.elapsed());

    // Accepts connections and never answers.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = silent.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = silent.accept().await {
            held.push(socket);
        }
    });
    let clickhouse = ClickHouse::new(&settings(format!("http://{address}"), None))
        .unwrap()
        .with_query_timeout(Duration::from_millis(300));
    let error = clickhouse.check_connection(Duration::from_millis(300)).await.unwrap_err();
    assert!(matches!(error, ClickHouseError::Timeout(_)), "{error:?}");
    let error = clickhouse.fetch_all::<u8>("SELECT 1").await.unwrap_err();
    assert!(matches!(error, ClickHouseError::Timeout(_)), "{error:?}");
}

/// A self-signed certificate for a host name that is not the one the client dials, and its key.
fn self_signed(dir: &std::path::Path, name: &str) -> (Vec<u8>, Vec<u8>) {
    let (cert, key) = (dir.join(format!("{name}.pem")), dir.join(format!("{name}.key")));
    let status = std::process::Command::new("openssl")
        .args(["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj"])
        .arg(format!("/CN={name}.invalid"))
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .stderr(std::process::Stdio::null())
        .status()
        .expect("run openssl");
    assert!(status.success(), "openssl req");
    (std::fs::read(cert).unwrap(), std::fs::read(key).unwrap())
}

/// `CLICKHOUSE_SECURE` with a `CLICKHOUSE_CA`: the reference then sets `rejectUnauthorized: false`,
/// so a certificate that does not verify (self-signed, wrong host) is accepted. Without a CA the
/// certificate is verified and the same server is refused.
#[tokio::test]
async fn https_with_a_ca_skips_verification_and_without_one_verifies() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = self_signed(dir.path(), "server");
    let (ca, _) = self_signed(dir.path(), "some-ca");
    let identity = native_tls::Identity::from_pkcs8(&cert, &key).unwrap();
    let acceptor = tokio_native_tls::TlsAcceptor::from(native_tls::TlsAcceptor::new(identity).unwrap());
    let (address, mut requests) = https_stub("127.0.0.1:0", acceptor, clickhouse_answer).await;
    let url = format!("https://{address}");

    let with_ca =
        ClickHouse::new(&ClickHouseSettings { ca: Some(ca), ..settings(url.clone(), Some("secret")) }).unwrap();
    with_ca.check_connection(Duration::from_secs(5)).await.unwrap();
    let request = next_request(&mut requests).await;
    assert_eq!(request.query_param("query").as_deref(), Some("SELECT 1 FORMAT RowBinary"));
    assert_eq!(request.header("X-ClickHouse-Key"), Some("secret"));

    let verifying = ClickHouse::new(&settings(url, Some("secret"))).unwrap();
    let error = verifying.check_connection(Duration::from_secs(5)).await.unwrap_err();
    assert!(matches!(error, ClickHouseError::Query(_)), "{error:?}");
    assert!(requests.try_recv().is_err(), "no request went through an unverified connection");
}

/// The environment of a Kafka-mode server process of these tests (Redis database `redis_db` of its
/// own, so that the health check sees this server's ping only).
fn kafka_server_env(
    db: &TestDb,
    redis_db: u8,
    topic: &str,
    queue: &str,
    clickhouse_host: &str,
) -> Vec<(String, String)> {
    [
        ("NODE_ENV", "test"),
        ("DATABASE_URL", db.url.as_str()),
        ("REDIS_URL", format!("{}/{redis_db}", common::redis_url()).as_str()),
        ("LOG_LEVEL", "info"),
        ("KAFKA_ENABLED", "true"),
        ("KAFKA_HOSTS", kafka_hosts()),
        ("KAFKA_CONSUMPTION_TOPIC", topic),
        ("PLUGINS_CELERY_QUEUE", queue),
        ("WORKER_CONCURRENCY", "1"),
        ("CLICKHOUSE_HOST", clickhouse_host),
        ("CLICKHOUSE_DATABASE", "posthog_ch"),
        ("CLICKHOUSE_USER", "ingester"),
        ("CLICKHOUSE_PASSWORD", "ch-secret"),
    ]
    .into_iter()
    .map(|(key, value)| (key.to_owned(), value.to_owned()))
    .collect()
}

fn pairs(env: &[(String, String)]) -> Vec<(&str, &str)> {
    env.iter().map(|(key, value)| (key.as_str(), value.as_str())).collect()
}

/// DELIBERATE DEVIATION from the reference (which does not start): with ClickHouse unreachable a
/// Kafka-mode server logs the failed `SELECT 1` with the URL and the cause, starts anyway, and is
/// healthy. Nothing listens on 127.77.0.2:8123 (an address of its own on loopback).
#[tokio::test(flavor = "multi_thread")]
// One Kafka-mode server at a time under `cargo test` too (nextest: the kafka-mode-server group).
#[serial_test::serial(kafka_mode_server)]
async fn kafka_mode_starts_when_clickhouse_is_unreachable() {
    const REDIS_DB: u8 = 13;
    ensure_kafka();
    let db = TestDb::with_fixture(None).await;
    let topic = unique("clickhouse-down-in");
    create_topics(&[&topic], 1).await;
    let queue = common::unique_prefix("clickhouse-down-celery");
    let env = kafka_server_env(&db, REDIS_DB, &topic, &queue, "127.77.0.2");
    let env = pairs(&env);

    let started = Instant::now();
    let mut server = Server::start(&[], &env);
    assert!(
        server
            .wait_for_line("🔴 ClickHouse at http://127.77.0.2:8123 did not answer SELECT 1", Duration::from_secs(30)),
        "{}",
        server.output()
    );
    assert!(server.wait_for_line("All systems go", Duration::from_secs(60)), "{}", server.output());
    assert!(started.elapsed() < Duration::from_secs(45), "start-up took {:?}", started.elapsed());
    let line = server.output().lines().find(|line| line.contains("did not answer SELECT 1")).unwrap().to_owned();
    assert!(line.contains("ERROR") && line.contains("Connection refused"), "the cause is in the line: {line}");

    let health = run(&["--healthcheck"], &env);
    assert_eq!(health.status.code(), Some(0), "{}", stdout(&health));

    server.signal(nix::sys::signal::Signal::SIGTERM);
    assert_eq!(server.wait_exit(Duration::from_secs(40)), Some(0), "{}", server.output());
}

/// With ClickHouse reachable, the Kafka-mode server runs the reference's `SELECT 1` at start-up with
/// its settings, and action matching then asks ClickHouse's `person_static_cohort` about a static
/// cohort before Postgres. ClickHouse's port is fixed (8123), so the stand-in listens on an address
/// of its own on loopback, 127.77.0.1:8123, which no other test uses.
#[tokio::test(flavor = "multi_thread")]
// One Kafka-mode server at a time under `cargo test` too (nextest: the kafka-mode-server group).
#[serial_test::serial(kafka_mode_server)]
async fn kafka_mode_start_up_runs_select_1_and_static_cohorts_ask_clickhouse() {
    const REDIS_DB: u8 = 14;
    ensure_kafka();
    let (_, mut requests) = http_stub("127.77.0.1:8123", clickhouse_answer).await;
    let db = TestDb::with_fixture(None).await;
    let cohort: i32 = sqlx::query_scalar(
        "INSERT INTO posthog_cohort (name, deleted, groups, team_id, created_at, created_by_id, is_calculating,
            errors_calculating, is_static) VALUES ('Static', false, '[]', $1, now(), $2, false, 0, true) RETURNING id",
    )
    .bind(common::TEAM_ID)
    .bind(common::COMMON_USER_ID)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    let action: i32 = sqlx::query_scalar(
        "INSERT INTO posthog_action (team_id, name, created_at, created_by_id, deleted, post_to_slack,
            slack_message_format, is_calculating, updated_at, last_calculated_at)
         VALUES ($1, 'In static cohort', now(), $2, false, false, '', false, now(), now()) RETURNING id",
    )
    .bind(common::TEAM_ID)
    .bind(common::COMMON_USER_ID)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    sqlx::query("INSERT INTO posthog_actionstep (action_id, properties) VALUES ($1, $2)")
        .bind(action)
        .bind(json!([{"type": "cohort", "key": "id", "value": cohort}]))
        .execute(&db.pool)
        .await
        .unwrap();
    let topic = unique("clickhouse-up-in");
    create_topics(&[&topic], 1).await;
    let queue = common::unique_prefix("clickhouse-up-celery");
    let env = kafka_server_env(&db, REDIS_DB, &topic, &queue, "127.77.0.1");
    let env = pairs(&env);

    let mut server = Server::start(&[], &env);
    let first = next_request(&mut requests).await;
    assert_eq!(first.query_param("query").as_deref(), Some("SELECT 1 FORMAT RowBinary"));
    assert_eq!(first.query_param("database").as_deref(), Some("posthog_ch"));
    assert_eq!(first.header("X-ClickHouse-User"), Some("ingester"));
    assert_eq!(first.header("X-ClickHouse-Key"), Some("ch-secret"));
    assert!(server.wait_for_line("All systems go", Duration::from_secs(60)), "{}", server.output());
    assert!(server.output().contains("Connected to ClickHouse at http://127.77.0.1:8123"), "{}", server.output());

    // The consumer starts from the latest offset: offer the event until the lookup arrives.
    let distinct_id = unique("static-cohort-person");
    let data = json!({"event": "cohort check", "properties": {}, "distinct_id": distinct_id,
        "timestamp": "2021-10-28T11:59:57.792Z"});
    let message = json!({"distinct_id": distinct_id, "ip": "127.0.0.1", "site_url": "", "team_id": common::TEAM_ID,
        "uuid": uuid::Uuid::now_v7().to_string(), "data": data.to_string(), "now": "2021-10-28T12:00:00Z",
        "sent_at": "2021-10-28T11:59:59Z"});
    let deadline = Instant::now() + Duration::from_secs(60);
    let lookup = 'found: loop {
        produce(&topic, &[message.to_string().into_bytes()]).await;
        let wait_until = Instant::now() + Duration::from_secs(2);
        while let Ok(Some(request)) = tokio::time::timeout_at(wait_until.into(), requests.recv()).await {
            if request.query_param("query").is_some_and(|sql| sql.contains("person_static_cohort")) {
                break 'found request;
            }
        }
        assert!(Instant::now() < deadline, "no static cohort lookup reached ClickHouse: {}", server.output());
    };
    let person_uuid: uuid::Uuid = sqlx::query_scalar(
        "SELECT posthog_person.uuid FROM posthog_person JOIN posthog_persondistinctid
            ON posthog_persondistinctid.person_id = posthog_person.id WHERE distinct_id = $1",
    )
    .bind(&distinct_id)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(
        lookup.query_param("query").unwrap(),
        format!(
            "SELECT 1 FROM person_static_cohort WHERE team_id = {} AND cohort_id = {cohort} AND person_id = \
             '{person_uuid}' LIMIT 1 FORMAT RowBinary",
            common::TEAM_ID
        )
    );
    assert_eq!(lookup.header("X-ClickHouse-User"), Some("ingester"));

    server.signal(nix::sys::signal::Signal::SIGTERM);
    assert_eq!(server.wait_exit(Duration::from_secs(40)), Some(0), "{}", server.output());
}

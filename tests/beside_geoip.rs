//! GeoIP (port of the reference's tests/mmdb.test.ts plus the distributed-fetch and refresh
//! rules). The database comes from the MaxMind test fixture, served by a local HTTP server when a
//! download is needed: tests never reach the internet.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::TestDb;
use plugin_server::geoip::{GeoIp, GeoIpSettings, MMDB_ATTACHMENT_KEY};
use plugin_server::hub::{connect_redis, Hub};
use redis::AsyncCommands;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const FIXTURE: &str = "/work/shared/testdata/GeoLite2-City-Test.mmdb.br";
const LINKOPING_IP: &str = "89.160.20.129";

fn fixture() -> Vec<u8> {
    let path = std::env::var("GEOIP_FIXTURE").unwrap_or_else(|_| FIXTURE.to_string());
    std::fs::read(path).expect("the GeoLite2 test fixture")
}

/// A one-route HTTP server answering every request with `status` and the fixture (as the
/// reference's endpoint does: brotli bytes, `content-disposition` naming the file).
struct MmdbServer {
    url: String,
    requests: Arc<AtomicUsize>,
}

async fn mmdb_server(status: u16) -> MmdbServer {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/", listener.local_addr().unwrap());
    let requests = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&requests);
    let body = fixture();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            counter.fetch_add(1, Ordering::SeqCst);
            let body = body.clone();
            tokio::spawn(async move {
                let mut buffer = [0u8; 4096];
                let _ = socket.read(&mut buffer).await;
                let head = format!(
                    "HTTP/1.1 {status} X\r\ncontent-type: vnd.maxmind.maxmind-db\r\n\
                     content-disposition: attachment; filename=\"GeoLite2-City-2021-03-10.mmdb\"\r\n\
                     content-length: {}\r\nconnection: close\r\n\r\n",
                    body.len()
                );
                let _ = socket.write_all(head.as_bytes()).await;
                let _ = socket.write_all(&body).await;
                let _ = socket.shutdown().await;
            });
        }
    });
    MmdbServer { url, requests }
}

struct Setup {
    db: TestDb,
    redis: deadpool_redis::Pool,
    settings: GeoIpSettings,
}

async fn setup(endpoint: &str) -> Setup {
    let db = TestDb::empty().await;
    let redis = connect_redis(&db.config(&[])).await.unwrap();
    let settings = GeoIpSettings {
        endpoint: endpoint.to_string(),
        status_key: common::unique_prefix("mmdb-status"),
        status_poll_interval: Duration::from_millis(50),
        ..GeoIpSettings::default()
    };
    Setup { db, redis, settings }
}

impl Setup {
    async fn start(&self) -> GeoIp {
        GeoIp::start_with(self.db.pool.clone(), self.redis.clone(), self.settings.clone()).await.unwrap()
    }

    async fn insert_attachment(&self, file_name: &str) {
        let contents = fixture();
        sqlx::query(
            "INSERT INTO posthog_pluginattachment (key, content_type, file_name, file_size, contents, plugin_config_id, team_id)
             VALUES ($1, 'vnd.maxmind.maxmind-db', $2, $3, $4, NULL, NULL)",
        )
        .bind(MMDB_ATTACHMENT_KEY)
        .bind(file_name)
        .bind(contents.len() as i32)
        .bind(contents)
        .execute(&self.db.pool)
        .await
        .unwrap();
    }

    async fn attachment_names(&self) -> Vec<String> {
        sqlx::query_scalar("SELECT file_name FROM posthog_pluginattachment WHERE key = $1 ORDER BY id")
            .bind(MMDB_ATTACHMENT_KEY)
            .fetch_all(&self.db.pool)
            .await
            .unwrap()
    }

    async fn status(&self) -> Option<String> {
        let mut connection = self.redis.get().await.unwrap();
        connection.get(&self.settings.status_key).await.unwrap()
    }

    async fn set_status(&self, value: &str) {
        let mut connection = self.redis.get().await.unwrap();
        let _: () = connection.set_ex(&self.settings.status_key, value, 60).await.unwrap();
    }
}

fn today_file_name() -> String {
    format!("GeoLite2-City-{}.mmdb.br", chrono::Local::now().format("%Y-%m-%d"))
}

fn assert_lookups_work(geoip: &GeoIp) {
    let city = geoip.locate(LINKOPING_IP).unwrap().expect("the test IP is in the fixture");
    assert_eq!(city["city"]["names"]["en"], "Linköping");
    assert_eq!(city["country"]["isoCode"], "SE");
    assert_eq!(city["traits"]["ipAddress"], LINKOPING_IP);
    assert_eq!(city["traits"]["isAnonymousProxy"], false);
    assert!(city["location"]["timeZone"].is_string());
    assert!(city["subdivisions"].is_array());
    assert_eq!(geoip.locate("asdfgh").unwrap(), None);
    assert_eq!(geoip.locate("10.0.0.1").unwrap(), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disabled_mmdb_means_no_reader_and_the_reference_error() {
    let db = TestDb::empty().await;
    let config = db.config(&[("DISABLE_MMDB", "true")]);
    let hub = Hub::connect(config).await.unwrap();
    let geoip = GeoIp::start(&hub).await.unwrap();
    assert!(!geoip.is_available());
    let error = geoip.locate(LINKOPING_IP).unwrap_err();
    assert_eq!(error.to_string(), "IP location capabilities are not available in this PostHog instance!");
    hub.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_database_is_downloaded_stored_and_used() {
    let server = mmdb_server(200).await;
    let setup = setup(&server.url).await;
    let geoip = setup.start().await;
    assert_eq!(server.requests.load(Ordering::SeqCst), 1);
    assert_lookups_work(&geoip);
    assert_eq!(setup.attachment_names().await, vec!["GeoLite2-City-2021-03-10.mmdb.br".to_string()]);
    assert_eq!(setup.status().await.as_deref(), Some("\"idle\""));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cached_database_is_used_without_downloading() {
    let server = mmdb_server(200).await;
    let setup = setup(&server.url).await;
    setup.insert_attachment(&today_file_name()).await;
    let geoip = setup.start().await;
    assert_lookups_work(&geoip);
    // Fresh: the 4-hourly check has nothing to do.
    assert!(!geoip.staleness_check().await.unwrap());
    assert_eq!(server.requests.load(Ordering::SeqCst), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_download_leaves_the_server_running_without_geoip() {
    let server = mmdb_server(500).await;
    let setup = setup(&server.url).await;
    let geoip = setup.start().await;
    assert_eq!(server.requests.load(Ordering::SeqCst), 1);
    assert!(!geoip.is_available());
    assert!(geoip.locate(LINKOPING_IP).is_err());
    assert_eq!(setup.status().await.as_deref(), Some("\"unavailable\""));
    // While unavailable, nobody tries again.
    let again = setup.start().await;
    assert!(!again.is_available());
    assert_eq!(server.requests.load(Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_waits_for_another_servers_download() {
    let server = mmdb_server(200).await;
    let setup = Arc::new(setup(&server.url).await);
    setup.set_status("\"fetching\"").await;
    let other = Arc::clone(&setup);
    let other_server = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        other.insert_attachment(&today_file_name()).await;
        other.set_status("\"idle\"").await;
    });
    let geoip = setup.start().await;
    other_server.await.unwrap();
    assert_lookups_work(&geoip);
    assert_eq!(server.requests.load(Ordering::SeqCst), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_database_is_used_while_a_fresh_one_downloads() {
    let server = mmdb_server(200).await;
    let setup = setup(&server.url).await;
    setup.insert_attachment("GeoLite2-City-2000-01-01.mmdb.br").await;
    let geoip = setup.start().await;
    assert_lookups_work(&geoip);
    for _ in 0..100 {
        if setup.attachment_names().await == vec!["GeoLite2-City-2021-03-10.mmdb.br".to_string()] {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(setup.attachment_names().await, vec!["GeoLite2-City-2021-03-10.mmdb.br".to_string()]);
    assert_eq!(server.requests.load(Ordering::SeqCst), 1);
    assert_lookups_work(&geoip);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_attachment_without_a_date_fails_start_up() {
    let setup = setup("http://127.0.0.1:9/").await;
    setup.insert_attachment("GeoLite2-City.mmdb.br").await;
    let error =
        GeoIp::start_with(setup.db.pool.clone(), setup.redis.clone(), setup.settings.clone()).await.err().unwrap();
    assert!(error.to_string().contains("has an invalid filename!"), "{error}");
}

/// The reference's query timers around the database's queries (`fetchGeoIpAttachment`,
/// `insertGeoIpAttachment`, `deleteGeoIpAttachment`; `query.regisGet` and `query.redisSet` for
/// the status key) and `mmdb.internal_request` per lookup, read from real UDP datagrams.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_databases_queries_and_lookups_are_timed_like_the_references() {
    let statsd = common::statsd::StatsdListener::start();
    statsd.install_global();
    let server = mmdb_server(200).await;
    let setup = setup(&server.url).await;
    let geoip = setup.start().await;
    assert_lookups_work(&geoip);

    statsd.settle();
    let lines = statsd.lines();
    for tag in ["fetchGeoIpAttachment", "insertGeoIpAttachment", "deleteGeoIpAttachment"] {
        // The stored row is read at start and again after the download.
        let total = statsd.total(&format!("query.postgres.total,queryTag={tag}"));
        assert!(if tag == "fetchGeoIpAttachment" { total >= 1 } else { total == 1 }, "{tag}: {lines:?}");
        assert!(statsd.has_key(&format!("query.postgres,queryTag={tag}")), "{tag}: {lines:?}");
    }
    // The status: read once (idle), set to fetching, then back to idle.
    assert_eq!(statsd.total("query.regisGet.total"), 1, "{lines:?}");
    assert!(statsd.has_key("query.regisGet"), "{lines:?}");
    assert_eq!(statsd.total("query.redisSet.total"), 2, "{lines:?}");
    assert!(statsd.has_key("query.redisSet"), "{lines:?}");
    assert!(statsd.has_key("mmdb.internal_request"), "{lines:?}");
}

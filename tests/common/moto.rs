//! A local S3- and Kinesis-compatible server for the `aws-sdk` facade's tests: moto's server mode
//! (`scripts/moto`, installed into its own virtualenv on first use) on a loopback port of its
//! own, stopped when the value is dropped.
//!
//! Signatures are checked, as AWS checks them: moto runs with IAM authentication on, after a
//! window of unauthenticated requests (`INITIAL_NO_AUTH_ACTION_COUNT`) in which [`Moto::start`]
//! creates an IAM user with an allow-all policy, its access key, and the buckets asked for. Every
//! later request must be signed with that key (a wrong signature is `SignatureDoesNotMatch`).

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use plugin_server::plugins::extensions::aws::Aws;
use serde_json::{json, Value};

/// Requests `start` makes before authentication starts: the IAM user, its policy, its key.
const SETUP_REQUESTS: usize = 3;
/// What the unauthenticated setup requests claim to be (moto routes them by this scope).
const IAM_SCOPE: &str =
    "AWS4-HMAC-SHA256 Credential=setup/20200101/us-east-1/iam/aws4_request, SignedHeaders=host, Signature=0";

pub struct Moto {
    child: Child,
    pub port: u16,
    /// `http://127.0.0.1:PORT`
    pub endpoint: String,
    pub access_key_id: String,
    pub secret_access_key: String,
}

/// A loopback port nobody listens on (for a server that must be down, or one to start later).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").expect("bind a free port").local_addr().expect("local address").port()
}

fn script() -> String {
    concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/moto").to_string()
}

/// Installs moto (once per machine; a no-op when it is there).
pub fn install() {
    let status = Command::new("bash").arg(script()).arg("install").status().expect("run scripts/moto install");
    assert!(status.success(), "scripts/moto install failed (moto[server] from PyPI)");
}

impl Moto {
    /// moto on a port of its own, with `buckets` created.
    pub async fn start(buckets: &[&str]) -> Moto {
        Moto::start_on(free_port(), buckets).await
    }

    /// moto on `port`, signatures checked.
    pub async fn start_on(port: u16, buckets: &[&str]) -> Moto {
        Moto::launch(port, buckets, true).await
    }

    /// moto on `port` without IAM: any key is accepted (for a server that comes up only after
    /// the plugin was configured with its key). Its key is `AKIDLOCAL` / `local-secret`.
    pub async fn start_unauthenticated_on(port: u16, buckets: &[&str]) -> Moto {
        Moto::launch(port, buckets, false).await
    }

    async fn launch(port: u16, buckets: &[&str], authenticated: bool) -> Moto {
        // The plugins' network policy of this test process: moto is on loopback (a server run
        // in process configures the same from NODE_ENV=test).
        plugin_server::plugins::runtime::configure_network(plugin_server::plugins::runtime::NetworkSettings::defaults(
            plugin_server::config::NodeEnv::Test,
        ));
        tokio::task::spawn_blocking(install).await.expect("install moto");
        let mut command = Command::new("bash");
        command.arg(script()).arg("serve").arg(port.to_string()).stdout(Stdio::null()).stderr(Stdio::null());
        if authenticated {
            command.env("INITIAL_NO_AUTH_ACTION_COUNT", (SETUP_REQUESTS + buckets.len()).to_string());
        }
        let child = command.spawn().expect("start moto");
        let endpoint = format!("http://127.0.0.1:{port}");
        let mut moto =
            Moto { child, port, endpoint, access_key_id: "AKIDLOCAL".into(), secret_access_key: "local-secret".into() };
        moto.wait_until_up().await;
        if authenticated {
            moto.set_up_iam().await;
        }
        moto.create_buckets(buckets).await;
        moto
    }

    async fn wait_until_up(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if tokio::net::TcpStream::connect(("127.0.0.1", self.port)).await.is_ok() {
                return;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("moto exited at start: {status}");
            }
            assert!(Instant::now() < deadline, "moto did not start on port {}", self.port);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn iam(&self, form: &[(&str, &str)]) -> String {
        let response = reqwest::Client::new()
            .post(format!("{}/", self.endpoint))
            .header("authorization", IAM_SCOPE)
            .form(form)
            .send()
            .await
            .expect("IAM request to moto");
        assert!(response.status().is_success(), "IAM {form:?}: {}", response.status());
        response.text().await.expect("IAM answer")
    }

    async fn set_up_iam(&mut self) {
        self.iam(&[("Action", "CreateUser"), ("UserName", "plugin"), ("Version", "2010-05-08")]).await;
        let policy = r#"{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Action":"*","Resource":"*"}]}"#;
        self.iam(&[
            ("Action", "PutUserPolicy"),
            ("UserName", "plugin"),
            ("PolicyName", "everything"),
            ("PolicyDocument", policy),
            ("Version", "2010-05-08"),
        ])
        .await;
        let answer =
            self.iam(&[("Action", "CreateAccessKey"), ("UserName", "plugin"), ("Version", "2010-05-08")]).await;
        let document = roxmltree::Document::parse(&answer).expect("CreateAccessKey XML");
        let text = |name: &str| {
            document
                .descendants()
                .find(|node| node.has_tag_name(name))
                .and_then(|node| node.text())
                .expect(name)
                .to_string()
        };
        self.access_key_id = text("AccessKeyId");
        self.secret_access_key = text("SecretAccessKey");
    }

    /// Buckets made by unauthenticated requests (within the window, when signatures are checked).
    async fn create_buckets(&self, buckets: &[&str]) {
        for bucket in buckets {
            let response =
                reqwest::Client::new().put(format!("{}/{bucket}", self.endpoint)).send().await.expect("create bucket");
            assert!(response.status().is_success(), "create bucket {bucket}: {}", response.status());
        }
    }

    /// Stops the server (a destination that is down).
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// The client options a plugin passes to `new S3(...)` for this server (path style).
    pub fn client_config(&self) -> Value {
        json!({
            "accessKeyId": self.access_key_id, "secretAccessKey": self.secret_access_key, "region": "us-east-1",
            "endpoint": self.endpoint, "s3ForcePathStyle": true,
        })
    }

    /// An S3 call made as the facade makes it (signed; moto checks the signature): the output,
    /// or the aws-sdk error's fields as `Err`.
    pub async fn s3(&self, operation: &str, params: Value) -> Result<Value, Value> {
        let answer = Aws::default()
            .call("aws.s3", &[self.client_config(), json!(operation), params], Duration::from_secs(20))
            .await
            .expect("aws.s3 call");
        match answer.get("error") {
            Some(error) => Err(error.clone()),
            None => Ok(answer["data"].clone()),
        }
    }

    /// Every object in `bucket`: `(key, bytes)`, in key order.
    pub async fn objects(&self, bucket: &str) -> Vec<(String, Vec<u8>)> {
        use base64::Engine as _;
        let listed = self.s3("listObjectsV2", json!({"Bucket": bucket})).await.expect("listObjectsV2");
        let mut out = Vec::new();
        for object in listed["Contents"].as_array().expect("Contents") {
            let key = object["Key"].as_str().expect("Key").to_string();
            let got = self.s3("getObject", json!({"Bucket": bucket, "Key": key})).await.expect("getObject");
            let body =
                base64::engine::general_purpose::STANDARD.decode(got["Body"].as_str().expect("Body")).expect("base64");
            out.push((key, body));
        }
        out
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        self.stop();
    }
}

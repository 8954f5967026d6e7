//! The `pg` facade (node-postgres 8.x) in a VM against the local PostgreSQL: results parsed as
//! node-postgres' default type parsers do, parameters prepared as it prepares them, its errors,
//! `Pool`, and the host's bounds (connections per VM, closed with the VM, the network policy).

mod common;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use common::{wait_for, TestDb};
use plugin_server::plugins::extensions::pg::{PgConnections, MAX_CONNECTIONS_PER_VM};
use plugin_server::plugins::runtime::{
    configure_network, CallKind, MetaBindings, MetaError, NetworkSettings, PluginError, PluginVmSpec, PoolOptions,
    VmId, WorkerPool,
};
use serde_json::{json, Value};

/// Meta bindings with only the `pg` facade's host side (and `console.log` for debugging).
struct PgMeta {
    pg: Arc<PgConnections>,
    config: Value,
    main: tokio::runtime::Handle,
}

#[async_trait]
impl MetaBindings for PgMeta {
    fn config(&self) -> Value {
        self.config.clone()
    }
    async fn call(&self, name: &str, args: Vec<Value>) -> Result<Value, MetaError> {
        if name.starts_with("console.") {
            eprintln!("plugin console: {args:?}");
            return Ok(Value::Null);
        }
        Err(MetaError::named("TypeError", format!("{name} is not a function")))
    }
    async fn call_from(&self, vm: VmId, name: &str, args: Vec<Value>) -> Result<Value, MetaError> {
        match name.strip_prefix("pg.") {
            Some(op) => self.pg.call(vm, op, args).await.map_err(|e| MetaError::named(e.name, e.message)),
            None => self.call(name, args).await,
        }
    }
    fn vm_closed(&self, vm: VmId) {
        let left = self.pg.close_vm(vm);
        self.main.spawn(plugin_server::plugins::extensions::pg::close_all(left));
    }
}

fn allow_internal() {
    configure_network(NetworkSettings {
        allow_internal_ips: true,
        ..NetworkSettings::defaults(plugin_server::config::NodeEnv::Test)
    });
}

struct Harness {
    pool: WorkerPool,
    pg: Arc<PgConnections>,
    db: TestDb,
}

impl Harness {
    async fn new() -> Harness {
        allow_internal();
        let db = TestDb::empty().await;
        let options = PoolOptions {
            threads: 1,
            tasks_per_worker: 4,
            task_timeout: Duration::from_secs(10),
            test_env: true,
            ..PoolOptions::default()
        };
        let pool = WorkerPool::new(options).unwrap();
        Harness { pool, pg: Arc::new(PgConnections::new(Duration::from_secs(10))), db }
    }

    /// Loads `code` (which gets `DB` = the connection config of the test database) and runs its
    /// `runEveryMinute`.
    async fn run(&self, id: i64, code: &str) -> Result<Value, PluginError> {
        let config = json!({"host": "127.0.0.1", "port": 5432, "user": "postgres", "database": self.db.name});
        let code = format!("const DB = {config};\n{code}");
        let meta = Arc::new(PgMeta { pg: self.pg.clone(), config: json!({}), main: tokio::runtime::Handle::current() });
        self.pool.load(PluginVmSpec { plugin_config_id: id, code, meta }).await?;
        self.pool.call(id, "runEveryMinute", vec![], CallKind::Task).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn results_are_parsed_as_node_postgres_parses_them() {
    let h = Harness::new().await;
    let out = h
        .run(
            1,
            r#"
        const { Client, types } = require('pg')
        async function runEveryMinute() {
            const client = new Client(DB)
            await client.connect()
            const r = await client.query(`SELECT 1::int4 AS a, 9007199254740993::int8 AS b, 1.50::numeric AS c,
                2.5::float8 AS d, true AS e, '{"x": [1, "y"]}'::jsonb AS f, '2021-11-01 10:00:00.123+00'::timestamptz AS g,
                ARRAY['a', 'b c', NULL, 'q"u\\ote'] AS h, NULL::text AS i, '\\x0102ff'::bytea AS j,
                '1 day 02:03:04.5'::interval AS k, ARRAY[1, 2]::int4[] AS l, '2021-11-01'::date AS m,
                '5bd5b3a4-2a94-4a35-8b7b-6f0a1d5f0b0c'::uuid AS o, 2::int2 AS p, 'hi'::varchar AS q,
                '{"k": "v"}'::json AS s, ARRAY[1.5, 2]::float8[] AS t, '2021-11-01 10:00:00'::timestamp AS u`)
            const row = r.rows[0]
            const typed = Object.fromEntries(Object.entries(row).map(([k, v]) => [k, [typeof v, v === null ? null : v instanceof Date ? v.toISOString() : Buffer.isBuffer(v) ? v.toString('hex') : v]]))
            const fields = r.fields.map((f) => [f.name, f.dataTypeID, f.format])
            const params = await client.query('SELECT $1::text AS t, $2::int AS n, $3::jsonb AS j, $4::timestamptz AS d, $5::text[] AS arr, $6::text AS nul, $7::bytea AS buf, $8::bool AS b',
                ['x', 42, { a: [1, 'b'] }, new Date('2021-11-01T10:00:00.000Z'), ['a', 'b"c', null], null, Buffer.from([1, 2]), false])
            const p = params.rows[0]
            await client.query('CREATE TABLE facade_rows (id int, name text)')
            const inserted = await client.query('INSERT INTO facade_rows VALUES ($1, $2), ($3, $4)', [1, 'one', 2, 'two'])
            const multi = await client.query('UPDATE facade_rows SET name = name; SELECT count(*) FROM facade_rows')
            const asArray = await client.query({ text: 'SELECT id, name FROM facade_rows ORDER BY id', rowMode: 'array' })
            const viaCallback = await new Promise((resolve) => client.query('SELECT $1::int + 1 AS n', [1], (err, res) => resolve([err, res.rows[0].n])))
            types.setTypeParser(20, (v) => parseInt(v, 10))
            const overridden = (await client.query('SELECT 5::int8 AS big')).rows[0].big
            types.setTypeParser(20, (v) => v)
            await client.end()
            return {
                typed, fields, command: r.command, rowCount: r.rowCount,
                params: [p.t, p.n, p.j, p.d.toISOString(), p.arr, p.nul, p.buf.toString('hex'), p.b],
                inserted: [inserted.command, inserted.rowCount, inserted.oid],
                multi: Array.isArray(multi) ? multi.map((m) => [m.command, m.rowCount, m.rows]) : 'not an array',
                asArray: asArray.rows, viaCallback, overridden,
            }
        }
    "#,
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let typed = &out["typed"];
    assert_eq!(typed["a"], json!(["number", 1]));
    assert_eq!(typed["b"], json!(["string", "9007199254740993"]));
    assert_eq!(typed["c"], json!(["string", "1.50"]));
    assert_eq!(typed["d"], json!(["number", 2.5]));
    assert_eq!(typed["e"], json!(["boolean", true]));
    assert_eq!(typed["f"], json!(["object", {"x": [1, "y"]}]));
    assert_eq!(typed["g"], json!(["object", "2021-11-01T10:00:00.123Z"]));
    assert_eq!(typed["h"], json!(["object", ["a", "b c", null, "q\"u\\ote"]]));
    assert_eq!(typed["i"], json!(["object", null]));
    assert_eq!(typed["j"], json!(["object", "0102ff"]));
    assert_eq!(typed["k"], json!(["object", {"days": 1, "hours": 2, "minutes": 3, "seconds": 4, "milliseconds": 500}]));
    assert_eq!(typed["l"], json!(["object", [1, 2]]));
    // A date is local midnight (the test process runs in UTC).
    assert_eq!(typed["m"], json!(["object", "2021-11-01T00:00:00.000Z"]));
    assert_eq!(typed["o"], json!(["string", "5bd5b3a4-2a94-4a35-8b7b-6f0a1d5f0b0c"]));
    assert_eq!(typed["p"], json!(["number", 2]));
    assert_eq!(typed["q"], json!(["string", "hi"]));
    assert_eq!(typed["s"], json!(["object", {"k": "v"}]));
    assert_eq!(typed["t"], json!(["object", [1.5, 2]]));
    assert_eq!(typed["u"], json!(["object", "2021-11-01T10:00:00.000Z"]));
    assert_eq!(out["fields"][0], json!(["a", 23, "text"]));
    assert_eq!(out["fields"][1], json!(["b", 20, "text"]));
    assert_eq!(out["command"], "SELECT");
    assert_eq!(out["rowCount"], 1);
    assert_eq!(
        out["params"],
        json!(["x", 42, {"a": [1, "b"]}, "2021-11-01T10:00:00.000Z", ["a", "b\"c", null], null, "0102", false])
    );
    assert_eq!(out["inserted"], json!(["INSERT", 2, 0]));
    assert_eq!(out["multi"], json!([["UPDATE", 2, []], ["SELECT", 1, [{"count": "2"}]]]));
    assert_eq!(out["asArray"], json!([[1, "one"], [2, "two"]]));
    assert_eq!(out["viaCallback"], json!([null, 2]));
    assert_eq!(out["overridden"], json!(5));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_carry_node_postgres_fields() {
    let h = Harness::new().await;
    let out = h
        .run(
            1,
            r#"
        import { Client } from 'pg'
        const caught = async (promise) => {
            try { await promise; return 'no error' } catch (e) {
                return { string: String(e), name: e.name, message: e.message, code: e.code, detail: e.detail,
                    constraint: e.constraint, severity: e.severity, position: e.position, isError: e instanceof Error,
                    syscall: e.syscall, address: e.address, port: e.port }
            }
        }
        export async function runEveryMinute() {
            const client = new Client(DB)
            await client.connect()
            const missing = await caught(client.query('SELECT * FROM no_such_table'))
            await client.query('CREATE TABLE uniq (id int PRIMARY KEY)')
            await client.query('INSERT INTO uniq VALUES (1)')
            const duplicate = await caught(client.query('INSERT INTO uniq VALUES ($1)', [1]))
            const stillWorks = (await client.query('SELECT 7 AS n')).rows[0].n
            const reuse = await caught(client.connect())
            await client.end()
            const closed = await caught(client.query('SELECT 1'))
            const refused = await caught(new Client({ ...DB, port: 1 }).connect())
            // The certificate (Debian's snakeoil, trusted by this machine) names `localhost`.
            const wrongName = await caught(new Client({ ...DB, ssl: true }).connect())
            const tls = new Client({ ...DB, ssl: { rejectUnauthorized: false } })
            await tls.connect()
            const overTls = (await tls.query('SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()')).rows[0].ssl
            await tls.end()
            const badDb = await caught(new Client({ ...DB, database: 'no_such_database_here' }).connect())
            const viaString = new Client(`postgres://postgres@127.0.0.1:5432/${DB.database}?sslmode=disable`)
            await viaString.connect()
            const fromString = (await viaString.query('SELECT current_database() AS db')).rows[0].db === DB.database
            await viaString.end()
            return { missing, duplicate, stillWorks, reuse, closed, refused, wrongName, overTls, badDb, fromString }
        }
    "#,
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(out["missing"]["string"], "error: relation \"no_such_table\" does not exist");
    assert_eq!(out["missing"]["name"], "error");
    assert_eq!(out["missing"]["code"], "42P01");
    assert_eq!(out["missing"]["severity"], "ERROR");
    assert_eq!(out["missing"]["position"], "15");
    assert_eq!(out["missing"]["isError"], true);
    assert_eq!(out["duplicate"]["code"], "23505");
    assert_eq!(out["duplicate"]["detail"], "Key (id)=(1) already exists.");
    assert_eq!(out["duplicate"]["constraint"], "uniq_pkey");
    assert_eq!(out["stillWorks"], 7);
    assert_eq!(out["reuse"]["message"], "Client has already been connected. You cannot reuse a client.");
    assert_eq!(out["closed"]["message"], "Client was closed and is not queryable");
    assert_eq!(out["refused"]["message"], "connect ECONNREFUSED 127.0.0.1:1");
    assert_eq!(out["refused"]["code"], "ECONNREFUSED");
    assert_eq!(out["refused"]["syscall"], "connect");
    assert_eq!(out["refused"]["address"], "127.0.0.1");
    assert_eq!(out["refused"]["port"], 1);
    assert_eq!(out["wrongName"]["code"], "ERR_TLS_CERT_ALTNAME_INVALID");
    assert!(out["wrongName"]["message"]
        .as_str()
        .unwrap()
        .starts_with("Hostname/IP does not match certificate's altnames"));
    assert_eq!(out["overTls"], true);
    assert_eq!(out["badDb"]["code"], "3D000");
    assert_eq!(out["fromString"], true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pool_queries_connects_releases_and_ends() {
    let h = Harness::new().await;
    let out = h
        .run(
            1,
            r#"
        import { Pool } from 'pg'
        export async function runEveryMinute() {
            const pool = new Pool({ ...DB, max: 2 })
            const results = await Promise.all([1, 2, 3, 4, 5].map((n) => pool.query('SELECT $1::int * 2 AS n', [n])))
            const total = pool.totalCount
            const client = await pool.connect()
            const inTransaction = await client.query('BEGIN; SELECT 1 AS one; COMMIT')
            client.release()
            let doubleRelease
            try { client.release() } catch (e) { doubleRelease = e.message }
            const viaCallback = await new Promise((resolve) => pool.query('SELECT 3 AS n', (err, res) => resolve(res.rows[0].n)))
            await pool.end()
            let afterEnd
            try { await pool.query('SELECT 1') } catch (e) { afterEnd = e.message }
            return { doubled: results.map((r) => r.rows[0].n), total, statements: inTransaction.length, doubleRelease, viaCallback, afterEnd, ended: pool.ended }
        }
    "#,
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(out["doubled"], json!([2, 4, 6, 8, 10]));
    assert!(out["total"].as_u64().unwrap() <= 2, "{out}");
    assert_eq!(out["statements"], 3);
    assert_eq!(out["doubleRelease"], "Release called on client which has already been released to the pool.");
    assert_eq!(out["viaCallback"], 3);
    assert_eq!(out["afterEnd"], "Cannot use a pool after calling end on the pool");
    assert_eq!(out["ended"], true);
    // `pool.end()` resolves once its clients are told to end, as pg-pool does.
    wait_for("the pool's connections to close", || async { (h.pg.open_count() == 0).then_some(()) }).await;
}

async fn connections_named(pool: &sqlx::PgPool, name: &str) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM pg_stat_activity WHERE application_name = $1")
        .bind(name)
        .fetch_one(pool)
        .await
        .unwrap()
}

/// A VM holds at most `MAX_CONNECTIONS_PER_VM` connections, and they close when the VM goes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_are_bounded_per_vm_and_closed_with_it() {
    let h = Harness::new().await;
    let name = format!("facade-{}", uuid::Uuid::new_v4().simple());
    let out = h
        .run(
            1,
            &format!(
                r#"
        const {{ Client }} = require('pg')
        async function runEveryMinute() {{
            const clients = []
            for (let i = 0; i < {max}; i++) {{
                const client = new Client({{ ...DB, application_name: '{name}' }})
                await client.connect()
                clients.push(client)
            }}
            try {{ await new Client(DB).connect(); return 'connected' }} catch (e) {{ return e.message }}
        }}
    "#,
                max = MAX_CONNECTIONS_PER_VM
            ),
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        out,
        json!(format!(
            "too many PostgreSQL connections open ({MAX_CONNECTIONS_PER_VM} per plugin VM): end() clients you no longer use"
        ))
    );
    assert_eq!(connections_named(&h.db.pool, &name).await, MAX_CONNECTIONS_PER_VM as i64);
    h.pool.unload(1).await;
    wait_for("the VM's connections to close", || async {
        (connections_named(&h.db.pool, &name).await == 0).then_some(())
    })
    .await;
    assert_eq!(h.pg.open_count(), 0);
}

/// The plugins' network policy applies to pg hosts: without `ALLOW_INTERNAL_IPS` a loopback
/// database is refused, by address and by name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn internal_hosts_are_refused_without_allow_internal_ips() {
    let h = Harness::new().await;
    configure_network(NetworkSettings::defaults(plugin_server::config::NodeEnv::Production));
    let out = h
        .run(
            1,
            r#"
        const { Client } = require('pg')
        async function runEveryMinute() {
            const out = []
            for (const host of ['127.0.0.1', 'localhost']) {
                try { await new Client({ ...DB, host }).connect(); out.push('connected') } catch (e) { out.push([e.message, e.code]) }
            }
            return out
        }
    "#,
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    allow_internal();
    let refused = |what: &str| {
        json!([
            format!("refused to connect to {what}: loopback addresses are not allowed for plugins (set ALLOW_INTERNAL_IPS=true to allow them)"),
            "ERR_PLUGIN_FETCH_REFUSED"
        ])
    };
    assert_eq!(out, json!([refused("127.0.0.1"), refused("localhost (127.0.0.1)")]));
}

/// A PostgreSQL cluster of this test's own (Debian's binaries, run as the `postgres` user) that
/// asks for passwords: SCRAM-SHA-256 for `postgres`, MD5 for `md5user`, cleartext for
/// `clearuser`. Stopped when dropped.
struct PasswordCluster {
    dir: tempfile::TempDir,
    bin: std::path::PathBuf,
    port: u16,
}

impl PasswordCluster {
    fn as_postgres(&self, program: &str, args: &[&str]) {
        let status = std::process::Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(self.bin.join(program))
            .args(args)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .unwrap();
        assert!(status.success(), "{program} {args:?}");
    }

    async fn start() -> PasswordCluster {
        let bin = std::fs::read_dir("/usr/lib/postgresql")
            .expect("Debian's PostgreSQL server binaries")
            .flatten()
            .map(|entry| entry.path().join("bin"))
            .find(|bin| bin.join("initdb").exists())
            .expect("initdb");
        let dir = tempfile::tempdir().unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let cluster = PasswordCluster { dir, bin, port };
        let root = cluster.dir.path().to_str().unwrap().to_string();
        std::fs::write(cluster.dir.path().join("pw"), "secret\n").unwrap();
        let chown = std::process::Command::new("chown").args(["-R", "postgres:postgres", &root]).status().unwrap();
        assert!(chown.success());
        let data = format!("{root}/data");
        cluster.as_postgres(
            "initdb",
            &["-D", &data, "-U", "postgres", "--auth=scram-sha-256", &format!("--pwfile={root}/pw")],
        );
        let hba = format!("{data}/pg_hba.conf");
        let rules = std::fs::read_to_string(&hba).unwrap();
        std::fs::write(
            &hba,
            format!("host all md5user 127.0.0.1/32 md5\nhost all clearuser 127.0.0.1/32 password\n{rules}"),
        )
        .unwrap();
        let options = format!("-p {} -k {root} -c listen_addresses=127.0.0.1", cluster.port);
        cluster.as_postgres("pg_ctl", &["-D", &data, "-o", &options, "-w", "start"]);
        let admin = sqlx::postgres::PgConnectOptions::new()
            .host("127.0.0.1")
            .port(cluster.port)
            .username("postgres")
            .password("secret");
        let pool = sqlx::PgPool::connect_with(admin).await.unwrap();
        sqlx::raw_sql(
            "SET password_encryption = 'md5'; CREATE ROLE md5user LOGIN PASSWORD 'md5secret';
             SET password_encryption = 'scram-sha-256'; CREATE ROLE clearuser LOGIN PASSWORD 'clearsecret';",
        )
        .execute(&pool)
        .await
        .unwrap();
        pool.close().await;
        cluster
    }
}

impl Drop for PasswordCluster {
    fn drop(&mut self) {
        let data = format!("{}/data", self.dir.path().display());
        self.as_postgres("pg_ctl", &["-D", &data, "-m", "immediate", "stop"]);
    }
}

/// Authentication as node-postgres does it: SCRAM-SHA-256, MD5 and cleartext passwords; a wrong
/// password is the server's `28P01`; none at all is node-postgres' SASL message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passwords_scram_md5_and_cleartext() {
    let h = Harness::new().await;
    let cluster = PasswordCluster::start().await;
    let out = h
        .run(
            1,
            &format!(
                r#"
        const {{ Client }} = require('pg')
        const login = async (user, password) => {{
            const client = new Client({{ host: '127.0.0.1', port: {port}, user, password, database: 'postgres' }})
            try {{
                await client.connect()
                const who = (await client.query('SELECT current_user AS u')).rows[0].u
                await client.end()
                return who
            }} catch (e) {{ return [e.message, e.code] }}
        }}
        async function runEveryMinute() {{
            return [
                await login('postgres', 'secret'),
                await login('md5user', 'md5secret'),
                await login('clearuser', 'clearsecret'),
                await login('postgres', 'wrong'),
                await login('postgres', undefined),
                (await new Promise((resolve) => new Client(`postgres://md5user:md5secret@127.0.0.1:{port}/postgres`).connect((e) => resolve(e ? e.message : 'ok')))),
            ]
        }}
    "#,
                port = cluster.port
            ),
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        out,
        json!([
            "postgres",
            "md5user",
            "clearuser",
            ["password authentication failed for user \"postgres\"", "28P01"],
            ["SASL: SCRAM-SERVER-FIRST-MESSAGE: client password must be a string", null],
            "ok"
        ])
    );
}

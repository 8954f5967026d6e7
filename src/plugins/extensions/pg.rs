//! The host side of the `pg` facade (`runtime/modules/pg.js`): PostgreSQL connections a plugin
//! opens with node-postgres' `Client` / `Pool`, kept per VM.
//!
//! Owns: the operations behind `hostCall('pg.connect' | 'pg.query' | 'pg.end', ...)`, what a VM
//! may hold ([`MAX_CONNECTIONS_PER_VM`] connections, each closed with the VM: `close_vm`), the
//! bounds of a call (the plugin's `TASK_TIMEOUT`, [`MAX_RESULT_BYTES`] of rows per query), the
//! network policy (the hosts plugins may reach are those `fetch` may: `ALLOW_INTERNAL_IPS`), and
//! how errors cross to the facade (name `PgError`, message a JSON record of node-postgres'
//! fields, which the facade turns back into a `DatabaseError` or a Node system error).
//!
//! Not here: the wire protocol (`pg/wire.rs`), node-postgres' JavaScript surface and type
//! parsing (the facade).

pub mod wire;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Map, Value};

use self::wire::{ConnectOptions, Connection, TlsOptions, WireError};
use crate::plugins::runtime::{resolve_for_plugin, VmId};
use crate::plugins::vm_boundary::JsError;

/// Connections one VM may have open (a node-postgres `Pool` defaults to 10).
pub const MAX_CONNECTIONS_PER_VM: usize = 20;
/// Row data one query may return.
pub const MAX_RESULT_BYTES: usize = 32 * 1024 * 1024;
/// Longest host name, user, database or password accepted.
const MAX_NAME_BYTES: usize = 1024;
/// Startup parameters accepted beyond user and database.
const MAX_PARAMETERS: usize = 16;

type Shared = Arc<tokio::sync::Mutex<Connection>>;

/// One VM's connections.
#[derive(Default)]
struct VmConnections {
    next_id: u64,
    open: HashMap<u64, Shared>,
    /// Connections being made (they count against the limit).
    opening: usize,
    /// The VM is gone: connections that finish opening are closed at once.
    closed: bool,
}

/// The connections of every VM of one plugin config.
pub struct PgConnections {
    vms: Mutex<HashMap<VmId, VmConnections>>,
    timeout: Duration,
}

/// Releases a connection slot reserved by `connect`, whatever happens to the attempt.
struct Reservation<'a> {
    owner: &'a PgConnections,
    vm: VmId,
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        self.owner.with_vms(|vms| {
            if let Some(entry) = vms.get_mut(&self.vm) {
                entry.opening = entry.opening.saturating_sub(1);
                if entry.closed && entry.opening == 0 && entry.open.is_empty() {
                    vms.remove(&self.vm);
                }
            }
        });
    }
}

fn pg_error(record: Value) -> JsError {
    JsError::new("PgError", record.to_string())
}

fn from_wire(error: WireError) -> JsError {
    match error {
        WireError::Server(fields) => {
            let fields: Map<String, Value> =
                fields.into_iter().map(|(name, value)| (name.to_string(), Value::String(value))).collect();
            pg_error(json!({"kind": "database", "fields": fields}))
        }
        WireError::Network { message, code, syscall } => {
            pg_error(json!({"kind": "system", "message": message, "code": code, "syscall": syscall}))
        }
        WireError::Other(message) => pg_error(json!({"kind": "error", "message": message})),
    }
}

fn plain(message: impl Into<String>) -> JsError {
    pg_error(json!({"kind": "error", "message": message.into()}))
}

fn text(config: &Map<String, Value>, key: &str) -> Result<Option<String>, JsError> {
    match config.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(value)) if value.len() <= MAX_NAME_BYTES => Ok(Some(value.clone())),
        Some(Value::String(_)) => Err(plain(format!("pg: \"{key}\" is longer than {MAX_NAME_BYTES} bytes"))),
        Some(Value::Number(number)) => Ok(Some(number.to_string())),
        Some(_) => Err(plain(format!("pg: \"{key}\" must be a string"))),
    }
}

/// The facade's connection record: `{host, port, user, password, database, ssl, parameters,
/// connectTimeoutMs}` (defaults already applied by the facade, as node-postgres does).
fn connect_options(config: &Value) -> Result<(ConnectOptions, Option<Duration>), JsError> {
    let Some(config) = config.as_object() else { return Err(plain("pg: connection options must be an object")) };
    let host = text(config, "host")?.unwrap_or_else(|| "localhost".to_string());
    if host.starts_with('/') {
        return Err(plain(format!("pg: connecting to the Unix socket {host} is not allowed for plugins")));
    }
    let port = match config.get("port") {
        None | Some(Value::Null) => 5432,
        Some(value) => value
            .as_f64()
            .or_else(|| value.as_str().and_then(|s| s.trim().parse().ok()))
            .filter(|p| p.fract() == 0.0 && (1.0..=65535.0).contains(p))
            .map(|p| p as u16)
            .ok_or_else(|| plain(format!("pg: invalid port {value}")))?,
    };
    let user = text(config, "user")?.unwrap_or_else(|| "postgres".to_string());
    let database = text(config, "database")?.unwrap_or_else(|| user.clone());
    let password = text(config, "password")?;
    let tls = match config.get("ssl") {
        None | Some(Value::Null) | Some(Value::Bool(false)) => None,
        Some(Value::Bool(true)) => Some(TlsOptions { verify: true, ca: Vec::new() }),
        Some(Value::Object(ssl)) => {
            let verify = ssl.get("rejectUnauthorized").and_then(Value::as_bool).unwrap_or(true);
            let ca = match ssl.get("ca") {
                Some(Value::String(pem)) => vec![pem.clone()],
                Some(Value::Array(list)) => list.iter().filter_map(Value::as_str).map(str::to_string).collect(),
                _ => Vec::new(),
            };
            Some(TlsOptions { verify, ca })
        }
        Some(_) => Some(TlsOptions { verify: true, ca: Vec::new() }),
    };
    let mut parameters = Vec::new();
    if let Some(Value::Object(extra)) = config.get("parameters") {
        for name in extra.keys().take(MAX_PARAMETERS) {
            if let Some(value) = text(extra, name)? {
                if name.len() <= 64 && !name.is_empty() {
                    parameters.push((name.clone(), value));
                }
            }
        }
    }
    let connect_timeout = config
        .get("connectTimeoutMs")
        .and_then(Value::as_f64)
        .filter(|ms| ms.is_finite() && *ms > 0.0)
        .map(|ms| Duration::from_secs_f64(ms / 1000.0));
    Ok((ConnectOptions { host, port, user, password, database, tls, parameters }, connect_timeout))
}

fn id_arg(args: &[Value]) -> Result<u64, JsError> {
    args.first().and_then(Value::as_u64).ok_or_else(|| plain("pg: invalid connection id"))
}

fn result_json(result: wire::StatementResult) -> Value {
    let fields: Vec<Value> = result
        .fields
        .into_iter()
        .map(|f| json!([f.name, f.table_id, f.column_id, f.type_id, f.type_size, f.type_modifier]))
        .collect();
    json!({"command": result.tag, "fields": fields, "rows": result.rows})
}

impl PgConnections {
    /// Connections whose calls each end within `timeout` (the plugin's `TASK_TIMEOUT`).
    pub fn new(timeout: Duration) -> PgConnections {
        PgConnections { vms: Mutex::default(), timeout }
    }

    fn with_vms<R>(&self, f: impl FnOnce(&mut HashMap<VmId, VmConnections>) -> R) -> R {
        let mut vms = self.vms.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        f(&mut vms)
    }

    /// `pg.<op>` made by VM `vm`: `connect [options]` → `{id, processID}`, `query [id, text,
    /// params | null]` → `[{command, fields, rows}]` (one per statement; `params` null runs the
    /// simple protocol), `end [id]`.
    pub async fn call(&self, vm: VmId, op: &str, args: Vec<Value>) -> Result<Value, JsError> {
        match op {
            "connect" => self.connect(vm, args.first().unwrap_or(&Value::Null)).await,
            "query" => {
                let id = id_arg(&args)?;
                let text =
                    args.get(1).and_then(Value::as_str).ok_or_else(|| plain("pg: the query must be a string"))?;
                let params = match args.get(2) {
                    None | Some(Value::Null) => None,
                    Some(Value::Array(values)) => Some(
                        values
                            .iter()
                            .map(|value| match value {
                                Value::Null => Ok(None),
                                Value::String(text) => Ok(Some(text.clone())),
                                _ => Err(plain("pg: parameters must arrive as text")),
                            })
                            .collect::<Result<Vec<_>, _>>()?,
                    ),
                    Some(_) => return Err(plain("pg: parameters must be an array")),
                };
                self.query(vm, id, text, params).await
            }
            "end" => {
                let id = id_arg(&args)?;
                let connection = self.with_vms(|vms| vms.get_mut(&vm).and_then(|entry| entry.open.remove(&id)));
                if let Some(connection) = connection {
                    close(connection).await;
                }
                Ok(Value::Null)
            }
            _ => Err(JsError::new("TypeError", format!("pg.{op} is not a function"))),
        }
    }

    async fn connect(&self, vm: VmId, config: &Value) -> Result<Value, JsError> {
        let (options, connect_timeout) = connect_options(config)?;
        self.with_vms(|vms| {
            let entry = vms.entry(vm).or_default();
            if entry.closed {
                return Err(plain("the plugin VM is gone"));
            }
            if entry.open.len() + entry.opening >= MAX_CONNECTIONS_PER_VM {
                return Err(plain(format!(
                    "too many PostgreSQL connections open ({MAX_CONNECTIONS_PER_VM} per plugin VM): end() clients you no longer use"
                )));
            }
            entry.opening += 1;
            Ok(())
        })?;
        let reservation = Reservation { owner: self, vm };
        let addresses = resolve_for_plugin(&options.host, options.port).await.map_err(|(message, code)| {
            pg_error(json!({"kind": "system", "message": message, "code": code, "syscall": "getaddrinfo"}))
        })?;
        let timeout = connect_timeout.map_or(self.timeout, |limit| limit.min(self.timeout));
        let connection = Connection::connect(&options, &addresses, timeout).await.map_err(from_wire)?;
        let process_id = connection.process_id;
        let shared = Arc::new(tokio::sync::Mutex::new(connection));
        let kept = self.with_vms(|vms| {
            let entry = vms.get_mut(&vm)?;
            if entry.closed {
                return None;
            }
            entry.next_id += 1;
            entry.open.insert(entry.next_id, shared.clone());
            Some(entry.next_id)
        });
        drop(reservation);
        match kept {
            Some(id) => Ok(json!({"id": id, "processID": process_id})),
            None => {
                close(shared).await;
                Err(plain("the plugin VM is gone"))
            }
        }
    }

    async fn query(
        &self,
        vm: VmId,
        id: u64,
        text: &str,
        params: Option<Vec<Option<String>>>,
    ) -> Result<Value, JsError> {
        let connection = self
            .with_vms(|vms| vms.get(&vm).and_then(|entry| entry.open.get(&id).cloned()))
            .ok_or_else(|| plain("Client was closed and is not queryable"))?;
        let run = async {
            let mut connection = connection.lock().await;
            connection.query(text, params.as_deref(), MAX_RESULT_BYTES).await
        };
        match tokio::time::timeout(self.timeout, run).await {
            Ok(Ok(results)) => Ok(Value::Array(results.into_iter().map(result_json).collect())),
            Ok(Err(error)) => Err(from_wire(error)),
            Err(_) => Err(plain("Query read timeout")),
        }
    }

    /// Forgets VM `vm`'s connections and hands them back to be closed (the caller spawns
    /// [`close_all`] on the async runtime). Connections still opening are closed when they open.
    pub fn close_vm(&self, vm: VmId) -> Vec<Arc<tokio::sync::Mutex<Connection>>> {
        self.with_vms(|vms| {
            let Some(entry) = vms.get_mut(&vm) else { return Vec::new() };
            let open: Vec<Shared> = entry.open.drain().map(|(_, connection)| connection).collect();
            if entry.opening == 0 {
                vms.remove(&vm);
            } else {
                entry.closed = true;
            }
            open
        })
    }

    /// Connections open now, over all VMs (for tests and stats).
    pub fn open_count(&self) -> usize {
        self.with_vms(|vms| vms.values().map(|entry| entry.open.len()).sum())
    }
}

/// Closes a connection once no query holds it (a query still running keeps it until it ends,
/// within its timeout).
async fn close(connection: Shared) {
    if let Ok(connection) = Arc::try_unwrap(connection) {
        connection.into_inner().terminate().await;
    }
}

/// Closes what [`PgConnections::close_vm`] handed back.
pub async fn close_all(connections: Vec<Arc<tokio::sync::Mutex<Connection>>>) {
    for connection in connections {
        close(connection).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_options_follow_node_postgres() {
        let (options, timeout) = connect_options(&json!({
            "host": "db.example.com", "port": "6543", "user": "u", "password": "p",
            "ssl": {"rejectUnauthorized": false}, "parameters": {"application_name": "x"}, "connectTimeoutMs": 500
        }))
        .unwrap();
        assert_eq!(options.host, "db.example.com");
        assert_eq!(options.port, 6543);
        assert_eq!(options.database, "u");
        assert_eq!(options.tls, Some(TlsOptions { verify: false, ca: vec![] }));
        assert_eq!(options.parameters, vec![("application_name".to_string(), "x".to_string())]);
        assert_eq!(timeout, Some(Duration::from_millis(500)));
        assert!(connect_options(&json!({"host": "/var/run/postgresql"})).is_err());
        assert!(connect_options(&json!({"port": 70000})).is_err());
        assert_eq!(connect_options(&json!({})).unwrap().0.tls, None);
    }
}

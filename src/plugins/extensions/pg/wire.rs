//! One PostgreSQL connection speaking the wire protocol the way node-postgres does, for the `pg`
//! facade: startup with cleartext, MD5 or SCRAM-SHA-256 authentication, optional TLS after an
//! SSLRequest, the simple query protocol when a query has no parameters and the extended one
//! (unnamed statement, every parameter and every result column in text format) when it has, so
//! the facade parses results from their text form exactly as node-postgres' type parsers do.
//!
//! Owns: the socket, message framing (`postgres-protocol`), reading a query's results within a
//! byte budget, and the errors as node-postgres reports them (server error fields; Node's
//! `connect ECONNREFUSED host:port`, TLS and "Connection terminated" messages).
//!
//! Not here: which addresses may be reached (the caller resolves them under the plugins' network
//! policy), how many connections a VM may hold (`extensions/pg.rs`).

use std::net::SocketAddr;
use std::pin::Pin;
use std::time::Duration;

use bytes::BytesMut;
use fallible_iterator::FallibleIterator;
use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256, SCRAM_SHA_256};
use postgres_protocol::message::{backend, frontend};
use postgres_protocol::IsNull;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

/// How a connection is made.
#[derive(Debug, Clone, PartialEq)]
pub struct ConnectOptions {
    /// The name the plugin gave (TLS server name, error messages).
    pub host: String,
    pub port: u16,
    pub user: String,
    pub password: Option<String>,
    pub database: String,
    /// `None`: plain TCP (node-postgres' `ssl: false`).
    pub tls: Option<TlsOptions>,
    /// Extra startup parameters (`application_name`, `options`, `statement_timeout`, ...).
    pub parameters: Vec<(String, String)>,
}

/// node-postgres' `ssl` object.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct TlsOptions {
    /// `rejectUnauthorized` (default true): the certificate chain and host name are verified.
    pub verify: bool,
    /// `ca`: PEM certificates trusted besides the system's.
    pub ca: Vec<String>,
}

/// A failure as node-postgres reports it.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum WireError {
    /// An `ErrorResponse` from the server: its fields by node-postgres' names (`severity`,
    /// `code`, `detail`, `hint`, `position`, ..., `message`).
    #[error("{}", field(.0, "message"))]
    Server(Vec<(&'static str, String)>),
    /// A socket-level failure as Node words it (`connect ECONNREFUSED 127.0.0.1:5432`), with
    /// Node's `code` and `syscall` when there is one.
    #[error("{message}")]
    Network { message: String, code: Option<String>, syscall: Option<&'static str> },
    /// Anything else (protocol surprises, refused results): a plain `Error`.
    #[error("{0}")]
    Other(String),
}

fn field(fields: &[(&'static str, String)], name: &str) -> String {
    fields.iter().find(|(key, _)| *key == name).map(|(_, value)| value.clone()).unwrap_or_default()
}

impl WireError {
    fn terminated() -> WireError {
        WireError::Other("Connection terminated unexpectedly".to_string())
    }

    fn io(error: std::io::Error) -> WireError {
        match error.kind() {
            std::io::ErrorKind::UnexpectedEof => WireError::terminated(),
            std::io::ErrorKind::ConnectionReset => WireError::Network {
                message: "read ECONNRESET".into(),
                code: Some("ECONNRESET".into()),
                syscall: Some("read"),
            },
            _ => WireError::Network { message: error.to_string(), code: None, syscall: None },
        }
    }
}

/// One column of a result, as node-postgres' `FieldDef`.
#[derive(Debug, Clone, PartialEq)]
pub struct Field {
    pub name: String,
    pub table_id: u32,
    pub column_id: i16,
    pub type_id: u32,
    pub type_size: i16,
    pub type_modifier: i32,
}

/// The result of one statement: its command tag (`INSERT 0 3`), columns and rows (text form,
/// `None` for NULL).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct StatementResult {
    pub tag: String,
    pub fields: Vec<Field>,
    pub rows: Vec<Vec<Option<String>>>,
}

trait Socket: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Socket for T {}

/// An open connection. Queries run one at a time (`&mut self`); a query abandoned half-way (its
/// future dropped) leaves the connection unusable, and every later call says so.
pub struct Connection {
    socket: Pin<Box<dyn Socket>>,
    read: BytesMut,
    write: BytesMut,
    busy: bool,
    /// `BackendKeyData`'s process id (node-postgres' `client.processID`).
    pub process_id: i32,
}

fn encode_error(error: std::io::Error) -> WireError {
    WireError::Other(format!("could not encode a message: {error}"))
}

/// The connect error Node reports for `address`.
fn connect_error(error: &std::io::Error, address: SocketAddr) -> WireError {
    let code = match error.kind() {
        std::io::ErrorKind::ConnectionRefused => "ECONNREFUSED",
        std::io::ErrorKind::TimedOut => "ETIMEDOUT",
        std::io::ErrorKind::ConnectionReset => "ECONNRESET",
        _ if error.raw_os_error() == Some(113) => "EHOSTUNREACH",
        _ if error.raw_os_error() == Some(101) => "ENETUNREACH",
        _ => {
            return WireError::Network {
                message: format!("connect {error} {}:{}", address.ip(), address.port()),
                code: None,
                syscall: Some("connect"),
            }
        }
    };
    WireError::Network {
        message: format!("connect {code} {}:{}", address.ip(), address.port()),
        code: Some(code.to_string()),
        syscall: Some("connect"),
    }
}

/// A TLS failure in Node's words where there is an equivalent (the same texts as `fetch`).
fn tls_error(error: &native_tls::Error, host: &str) -> WireError {
    let text = error.to_string();
    match crate::plugins::runtime::node_tls_error(&text, host) {
        Some((message, code)) => WireError::Network { message, code: Some(code.to_string()), syscall: None },
        None => WireError::Network { message: text, code: None, syscall: None },
    }
}

impl Connection {
    /// Connects to the first of `addresses` that answers, negotiates TLS when asked, and
    /// authenticates. `timeout` bounds all of it (node-postgres' `connectionTimeoutMillis`
    /// message when it passes).
    pub async fn connect(
        options: &ConnectOptions,
        addresses: &[SocketAddr],
        timeout: Duration,
    ) -> Result<Connection, WireError> {
        match tokio::time::timeout(timeout, Self::connect_now(options, addresses)).await {
            Ok(result) => result,
            Err(_) => Err(WireError::Other("Connection terminated due to connection timeout".to_string())),
        }
    }

    async fn connect_now(options: &ConnectOptions, addresses: &[SocketAddr]) -> Result<Connection, WireError> {
        let socket = match Self::open(options, addresses, true).await {
            // OpenSSL names a wrong host name before a bad chain; Node checks the chain first. A
            // second handshake that skips the name check tells which one the plugin must hear.
            Err(WireError::Network { code: Some(code), message, syscall })
                if code == "ERR_TLS_CERT_ALTNAME_INVALID" =>
            {
                match Self::open(options, addresses, false).await {
                    Err(chain @ WireError::Network { code: Some(_), .. }) => return Err(chain),
                    Ok(socket) => {
                        drop(socket);
                        return Err(WireError::Network { code: Some(code), message, syscall });
                    }
                    Err(_) => return Err(WireError::Network { code: Some(code), message, syscall }),
                }
            }
            other => other?,
        };
        let mut connection = Connection {
            socket,
            read: BytesMut::with_capacity(8192),
            write: BytesMut::new(),
            busy: false,
            process_id: 0,
        };
        connection.startup(options).await?;
        Ok(connection)
    }

    /// A socket to the first address that answers, TLS negotiated when asked (`check_names`:
    /// the certificate must also name the host, when it is verified at all).
    async fn open(
        options: &ConnectOptions,
        addresses: &[SocketAddr],
        check_names: bool,
    ) -> Result<Pin<Box<dyn Socket>>, WireError> {
        let mut last = WireError::Other(format!("getaddrinfo ENOTFOUND {}", options.host));
        let mut tcp = None;
        for address in addresses {
            match TcpStream::connect(address).await {
                Ok(stream) => {
                    tcp = Some(stream);
                    break;
                }
                Err(error) => last = connect_error(&error, *address),
            }
        }
        let Some(mut tcp) = tcp else { return Err(last) };
        let _ = tcp.set_nodelay(true);
        let Some(tls) = &options.tls else { return Ok(Box::pin(tcp)) };
        let mut request = BytesMut::new();
        frontend::ssl_request(&mut request);
        tcp.write_all(&request).await.map_err(WireError::io)?;
        let answer = tcp.read_u8().await.map_err(WireError::io)?;
        if answer != b'S' {
            return Err(WireError::Other("The server does not support SSL connections".to_string()));
        }
        let mut builder = native_tls::TlsConnector::builder();
        builder.danger_accept_invalid_certs(!tls.verify).danger_accept_invalid_hostnames(!tls.verify || !check_names);
        for pem in &tls.ca {
            let certificate = native_tls::Certificate::from_pem(pem.as_bytes())
                .map_err(|error| WireError::Other(format!("invalid ssl.ca certificate: {error}")))?;
            builder.add_root_certificate(certificate);
        }
        let connector = builder.build().map_err(|error| WireError::Other(error.to_string()))?;
        let stream = tokio_native_tls::TlsConnector::from(connector)
            .connect(&options.host, tcp)
            .await
            .map_err(|error| tls_error(&error, &options.host))?;
        Ok(Box::pin(stream))
    }

    async fn flush(&mut self) -> Result<(), WireError> {
        let data = self.write.split();
        self.socket.write_all(&data).await.map_err(WireError::io)?;
        self.socket.flush().await.map_err(WireError::io)
    }

    async fn next_message(&mut self) -> Result<backend::Message, WireError> {
        loop {
            if let Some(message) =
                backend::Message::parse(&mut self.read).map_err(|e| WireError::Other(e.to_string()))?
            {
                return Ok(message);
            }
            let read = self.socket.read_buf(&mut self.read).await.map_err(WireError::io)?;
            if read == 0 {
                return Err(WireError::terminated());
            }
        }
    }

    async fn startup(&mut self, options: &ConnectOptions) -> Result<(), WireError> {
        let mut parameters: Vec<(&str, &str)> =
            vec![("user", options.user.as_str()), ("database", options.database.as_str()), ("client_encoding", "UTF8")];
        for (name, value) in &options.parameters {
            parameters.push((name.as_str(), value.as_str()));
        }
        frontend::startup_message(parameters, &mut self.write).map_err(encode_error)?;
        self.flush().await?;
        let password = || {
            options.password.clone().ok_or_else(|| {
                WireError::Other("SASL: SCRAM-SERVER-FIRST-MESSAGE: client password must be a string".to_string())
            })
        };
        let mut scram: Option<ScramSha256> = None;
        loop {
            match self.next_message().await? {
                backend::Message::AuthenticationOk => {}
                backend::Message::AuthenticationCleartextPassword => {
                    frontend::password_message(password()?.as_bytes(), &mut self.write).map_err(encode_error)?;
                    self.flush().await?;
                }
                backend::Message::AuthenticationMd5Password(body) => {
                    let hash = postgres_protocol::authentication::md5_hash(
                        options.user.as_bytes(),
                        password()?.as_bytes(),
                        body.salt(),
                    );
                    frontend::password_message(hash.as_bytes(), &mut self.write).map_err(encode_error)?;
                    self.flush().await?;
                }
                backend::Message::AuthenticationSasl(body) => {
                    let mut mechanisms = body.mechanisms();
                    let mut scram_offered = false;
                    while let Some(mechanism) = mechanisms.next().map_err(|e| WireError::Other(e.to_string()))? {
                        scram_offered |= mechanism == SCRAM_SHA_256;
                    }
                    if !scram_offered {
                        return Err(WireError::Other(
                            "SASL: Only mechanism SCRAM-SHA-256 is currently supported".to_string(),
                        ));
                    }
                    let state = ScramSha256::new(password()?.as_bytes(), ChannelBinding::unsupported());
                    frontend::sasl_initial_response(SCRAM_SHA_256, state.message(), &mut self.write)
                        .map_err(encode_error)?;
                    scram = Some(state);
                    self.flush().await?;
                }
                backend::Message::AuthenticationSaslContinue(body) => {
                    let state = scram.as_mut().ok_or_else(|| WireError::Other("unexpected SASL message".into()))?;
                    state.update(body.data()).map_err(|e| WireError::Other(format!("SASL: {e}")))?;
                    frontend::sasl_response(state.message(), &mut self.write).map_err(encode_error)?;
                    self.flush().await?;
                }
                backend::Message::AuthenticationSaslFinal(body) => {
                    let state = scram.as_mut().ok_or_else(|| WireError::Other("unexpected SASL message".into()))?;
                    state.finish(body.data()).map_err(|e| WireError::Other(format!("SASL: {e}")))?;
                }
                backend::Message::BackendKeyData(body) => self.process_id = body.process_id(),
                backend::Message::ParameterStatus(_) | backend::Message::NoticeResponse(_) => {}
                backend::Message::ReadyForQuery(_) => return Ok(()),
                backend::Message::ErrorResponse(body) => return Err(server_error(&body)),
                _ => return Err(WireError::Other("unexpected message during startup".to_string())),
            }
        }
    }

    /// Runs `text` with the simple protocol (`params` is `None`: node-postgres does so for a query
    /// without values; several statements give several results) or the extended one with text
    /// parameters. Results beyond `max_bytes` of row data are read and dropped, and the query
    /// fails with the reason (the connection stays usable).
    pub async fn query(
        &mut self,
        text: &str,
        params: Option<&[Option<String>]>,
        max_bytes: usize,
    ) -> Result<Vec<StatementResult>, WireError> {
        if self.busy {
            return Err(WireError::terminated());
        }
        self.busy = true;
        match params {
            None => frontend::query(text, &mut self.write).map_err(encode_error)?,
            Some(params) => {
                frontend::parse("", text, std::iter::empty(), &mut self.write).map_err(encode_error)?;
                let bound = frontend::bind(
                    "",
                    "",
                    std::iter::once(0i16),
                    params.iter(),
                    |param, buf| match param {
                        Some(text) => {
                            buf.extend_from_slice(text.as_bytes());
                            Ok(IsNull::No)
                        }
                        None => Ok(IsNull::Yes),
                    },
                    std::iter::once(0i16),
                    &mut self.write,
                );
                if let Err(error) = bound {
                    self.write.clear();
                    self.busy = false;
                    return Err(WireError::Other(match error {
                        frontend::BindError::Conversion(e) => e.to_string(),
                        frontend::BindError::Serialization(e) => e.to_string(),
                    }));
                }
                frontend::describe(b'P', "", &mut self.write).map_err(encode_error)?;
                frontend::execute("", 0, &mut self.write).map_err(encode_error)?;
                frontend::sync(&mut self.write);
            }
        }
        self.flush().await?;
        let mut results = Vec::new();
        let mut current = StatementResult::default();
        let mut error: Option<WireError> = None;
        let mut bytes = 0usize;
        loop {
            match self.next_message().await? {
                backend::Message::RowDescription(body) => {
                    current.fields = body
                        .fields()
                        .map(|f| {
                            Ok(Field {
                                name: f.name().to_string(),
                                table_id: f.table_oid(),
                                column_id: f.column_id(),
                                type_id: f.type_oid(),
                                type_size: f.type_size(),
                                type_modifier: f.type_modifier(),
                            })
                        })
                        .collect()
                        .map_err(|e| WireError::Other(e.to_string()))?;
                }
                backend::Message::DataRow(body) => {
                    let buffer = body.buffer();
                    bytes = bytes.saturating_add(buffer.len() + 16);
                    if bytes > max_bytes {
                        if error.is_none() {
                            error = Some(WireError::Other(format!(
                                "The plugin server refused a query result over {max_bytes} bytes"
                            )));
                        }
                        current.rows.clear();
                        continue;
                    }
                    let row = body
                        .ranges()
                        .map(|range| Ok(range.map(|r| String::from_utf8_lossy(&buffer[r.start..r.end]).into_owned())))
                        .collect()
                        .map_err(|e| WireError::Other(e.to_string()))?;
                    current.rows.push(row);
                }
                backend::Message::CommandComplete(body) => {
                    current.tag = body.tag().map_err(|e| WireError::Other(e.to_string()))?.to_string();
                    results.push(std::mem::take(&mut current));
                }
                backend::Message::EmptyQueryResponse => results.push(std::mem::take(&mut current)),
                backend::Message::ErrorResponse(body) => {
                    error.get_or_insert(server_error(&body));
                }
                backend::Message::ReadyForQuery(_) => break,
                backend::Message::CopyInResponse(_) => {
                    // node-postgres without pg-copy-streams fails a COPY FROM STDIN too.
                    frontend::copy_fail("COPY FROM STDIN is not supported in plugins", &mut self.write)
                        .map_err(encode_error)?;
                    self.flush().await?;
                }
                _ => {}
            }
        }
        self.busy = false;
        // A large result grew the read buffer: give the memory back.
        if self.read.capacity() > 1 << 20 && self.read.is_empty() {
            self.read = BytesMut::with_capacity(8192);
        }
        match error {
            Some(error) => Err(error),
            None => Ok(results),
        }
    }

    /// Says goodbye (`Terminate`) and closes the socket.
    pub async fn terminate(mut self) {
        frontend::terminate(&mut self.write);
        let _ = tokio::time::timeout(Duration::from_secs(1), self.flush()).await;
        let _ = tokio::time::timeout(Duration::from_secs(1), self.socket.shutdown()).await;
    }
}

/// node-postgres' names for the `ErrorResponse` field codes.
fn server_error(body: &backend::ErrorResponseBody) -> WireError {
    let mut fields = Vec::new();
    let mut iter = body.fields();
    while let Ok(Some(item)) = iter.next() {
        let name = match item.type_() {
            b'S' => "severity",
            b'V' => continue,
            b'C' => "code",
            b'M' => "message",
            b'D' => "detail",
            b'H' => "hint",
            b'P' => "position",
            b'p' => "internalPosition",
            b'q' => "internalQuery",
            b'W' => "where",
            b's' => "schema",
            b't' => "table",
            b'c' => "column",
            b'd' => "dataType",
            b'n' => "constraint",
            b'F' => "file",
            b'L' => "line",
            b'R' => "routine",
            _ => continue,
        };
        fields.push((name, String::from_utf8_lossy(item.value_bytes()).into_owned()));
    }
    WireError::Server(fields)
}

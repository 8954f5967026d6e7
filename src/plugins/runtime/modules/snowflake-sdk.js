// `snowflake-sdk` (1.6, the version PostHog's Snowflake export plugin pins) for plugins:
// `createConnection({account, username, password, database, schema, warehouse, role, region,
// accessUrl, ...})`, `configure`, and a `Connection` with `connect(cb)`, `execute({sqlText, binds,
// parameters, fetchAsString, complete})` → `Statement`, `destroy(cb)`, `getId`, `isUp`, as
// snowflake-sdk speaks Snowflake's REST protocol: a login request (`/session/v1/login-request`,
// the session and master tokens), query requests (`/queries/v1/query-request`, binds as
// snowflake-sdk's `bindings` map), a result still running followed on its `getResultUrl`, the
// session token renewed with the master token when Snowflake says it expired (`390112`), and
// a logout request on `destroy`. Rows are the result's `rowset` read by its `rowtype` as
// snowflake-sdk reads them (numbers, booleans, JSON for VARIANT/OBJECT/ARRAY, Dates, Buffers for
// BINARY, strings for the rest and for `fetchAsString` types); errors are snowflake-sdk's
// (`OperationFailedError` with Snowflake's `code`, `sqlState`, `data`; `NetworkError` 401001;
// `RequestFailedError` 401002/401004; `UnexpectedContentError` 401003; `ClientError`).
//
// Every request is made by the host (`hostCall('snowflake.request')`,
// plugins/extensions/snowflake.rs: the account's host only, the plugins' network policy, retries,
// at most 8 requests in flight per config). Not here: result chunks (large results that Snowflake
// hands out as separate files), key-pair/OAuth/SSO authentication, `PUT`/`GET` file transfer,
// streaming rows from the server (`streamRows` serves the rows already read).
(function (internals) {
    'use strict';
    const { hostCall, Buffer, setTimeout } = internals;
    const crypto = internals.require('crypto');

    // ---------------------------------------------------------------- errors
    const MESSAGES = {
        401001: 'Network error. Could not reach Snowflake.',
        401002: 'Request to Snowflake failed.',
        401003: 'Snowflake responded with non-JSON content.',
        401004: 'Request to Snowflake failed.  Invalid token',
        404001: 'Connection options must be specified.',
        404002: 'Invalid connection options. The specified value must be an object.',
        404003: 'A user name must be specified.',
        404004: 'Invalid user name. The specified value must be a string.',
        404005: 'A password must be specified.',
        404006: 'Invalid password. The specified value must be a string.',
        404007: 'An account must be specified.',
        404008: 'Invalid account. The specified value must be a string.',
        404010: 'Invalid accessUrl. The specified value must be a string.',
        405001: 'Invalid callback. The specified value must be a function.',
        405501: 'Connection already in progress.',
        405502: 'Already connected.',
        405503: 'Connection already terminated. Cannot connect again.',
        406001: 'Invalid callback. The specified value must be a function.',
        406501: 'Not connected, so nothing to destroy.',
        406502: 'Already disconnected.',
        407001: 'Unable to perform operation because a connection was never established.',
        407002: 'Unable to perform operation using terminated connection.',
        409001: 'Execute options must be specified.',
        409002: 'Invalid execute options. The specified value must be an object.',
        409003: 'A sqlText value must be specified.',
        409004: 'Invalid sqlText. The specified value must be a string.',
        409006: 'Invalid parameters. The specified value must be an object.',
        409007: 'Invalid binds. The specified value must be an array.',
        409009: 'Invalid complete callback. The specified value must be a function.',
        409011: 'Invalid fetchAsString value. The specified value must be an Array.',
        410003: 'A statement id must be specified.',
    };
    // A code's SQL state, as snowflake-sdk's errCodeToSqlState.
    const SQL_STATES = { 405501: '08002', 405502: '08002', 405503: '08002' };

    const createError = (name, options) => {
        const error = new Error(options.message || MESSAGES[options.code] || '');
        error.name = name;
        error.code = options.code;
        const sqlState = options.sqlState || SQL_STATES[options.code];
        if (sqlState !== undefined) error.sqlState = sqlState;
        for (const key of ['data', 'response', 'responseBody', 'cause', 'isFatal']) {
            if (options[key] !== undefined && options[key] !== null) error[key] = options[key];
        }
        return error;
    };
    const clientError = (code, isFatal) => createError('ClientError', { code, isFatal });
    // Thrown at once for a bad argument, as snowflake-sdk's checkArgument*.
    const checkArgument = (ok, code, missing) => {
        if (!ok) throw createError(missing ? 'MissingParameterError' : 'InvalidParameterError', { code });
    };

    // The host's failure as snowflake-sdk's error.
    const hostError = (error) => {
        if (error.kind === 'network') {
            const cause = new Error(String(error.message));
            if (error.code) cause.code = error.code;
            return createError('NetworkError', { code: 401001, cause });
        }
        return createError('ClientError', { code: 401002, message: String(error.message) });
    };

    // An answer as snowflake-sdk's request callback reads it: the body, or its error.
    const readAnswer = (answer) => {
        if (answer.error) return { error: hostError(answer.error) };
        const { status, body } = answer;
        const response = { statusCode: status, body: typeof body === 'string' ? body : JSON.stringify(body) };
        if (status !== 200) {
            if (status === 401 && body && typeof body === 'object' && body.code === '390104') {
                return { error: createError('RequestFailedError', { code: 401004, response }) };
            }
            return { error: createError('RequestFailedError', { code: 401002, response }) };
        }
        if (!body || typeof body !== 'object') {
            return { error: createError('UnexpectedContentError', { code: 401003, responseBody: response.body }) };
        }
        if (!body.success) {
            const data = body.data;
            return {
                error: createError('OperationFailedError', {
                    code: body.code,
                    data,
                    message: body.message,
                    sqlState: data && data.sqlState ? data.sqlState : undefined,
                }),
                body,
            };
        }
        return { body };
    };

    const SESSION_TOKEN_EXPIRED = '390112';
    const GONE_SESSION = '390111';
    const QUERY_IN_PROGRESS = '333333';
    const QUERY_IN_PROGRESS_ASYNC = '333334';

    // ---------------------------------------------------------------- values
    // snowflake-sdk's buildBindsMap: `{ "1": {type, value}, ... }`, one row or arrays of rows.
    const bindType = (value) => {
        if (typeof value === 'boolean') return 'BOOLEAN';
        if (value !== null && typeof value === 'object' && !(value instanceof Date)) return 'VARIANT';
        if (typeof value === 'number') return Number.isInteger(value) ? 'FIXED' : 'REAL';
        return 'TEXT';
    };
    const bindText = (value) => {
        if (value === null || value === undefined || typeof value === 'string') return value === undefined ? null : value;
        if (value instanceof Date) return value.toJSON();
        return JSON.stringify(value);
    };
    const buildBindsMap = (binds) => {
        const arrayBinding = binds.length > 0 && Array.isArray(binds[0]);
        const first = arrayBinding ? binds[0] : binds;
        const map = {};
        for (let index = 0; index < first.length; index++) {
            const value = arrayBinding ? binds.map((row) => bindText(row[index])) : bindText(first[index]);
            map[index + 1] = { type: bindType(first[index]), value };
        }
        return map;
    };

    // A column of the result, as snowflake-sdk's Column.
    const TIMESTAMPS = new Set(['timestamp_ltz', 'timestamp_ntz', 'timestamp_tz']);
    const VARIANTS = new Set(['variant', 'object', 'array']);
    const fetchAsStringOf = (type) => {
        if (type === 'fixed' || type === 'real') return 'Number';
        if (type === 'boolean') return 'Boolean';
        if (type === 'date' || TIMESTAMPS.has(type)) return 'Date';
        if (VARIANTS.has(type)) return 'JSON';
        if (type === 'binary') return 'Buffer';
        return 'String';
    };
    class Column {
        constructor(meta, index) {
            this._meta = meta || {};
            this._index = index;
            this._type = String(this._meta.type || 'text').toLowerCase();
        }
        getName() { return this._meta.name; }
        getIndex() { return this._index; }
        getId() { return this._index; }
        getType() { return this._type; }
        getScale() { return this._meta.scale; }
        getPrecision() { return this._meta.precision; }
        isNullable() { return !!this._meta.nullable; }
        isString() { return this._type === 'text'; }
        isBinary() { return this._type === 'binary'; }
        isNumber() { return this._type === 'fixed' || this._type === 'real'; }
        isBoolean() { return this._type === 'boolean'; }
        isDate() { return this._type === 'date'; }
        isTime() { return this._type === 'time'; }
        isTimestamp() { return TIMESTAMPS.has(this._type); }
        isTimestampLtz() { return this._type === 'timestamp_ltz'; }
        isTimestampNtz() { return this._type === 'timestamp_ntz'; }
        isTimestampTz() { return this._type === 'timestamp_tz'; }
        isVariant() { return VARIANTS.has(this._type); }
        isObject() { return this._type === 'object'; }
        isArray() { return this._type === 'array'; }
        // The value of a raw rowset cell.
        _convert(raw, asString) {
            if (raw === null || raw === undefined) return null;
            const text = String(raw);
            if (asString && asString.has(fetchAsStringOf(this._type))) return text;
            switch (this._type) {
                case 'fixed':
                case 'real':
                    return Number(text);
                case 'boolean':
                    if (text === '1' || text === 'TRUE') return true;
                    if (text === '0' || text === 'FALSE') return false;
                    return undefined;
                case 'date':
                    return new Date(Number(text) * 86400000);
                case 'timestamp_ltz':
                case 'timestamp_ntz':
                case 'timestamp_tz': {
                    // `<epoch seconds>.<fraction>` (and, for TZ, ` <offset minutes + 1440>`).
                    const seconds = Number(text.split(' ')[0]);
                    return new Date(Math.round(seconds * 1000));
                }
                case 'variant':
                case 'object':
                case 'array':
                    if (text === '') return undefined;
                    return JSON.parse(text);
                case 'binary':
                    return Buffer.from(text, 'hex');
                default:
                    return text;
            }
        }
    }

    // ---------------------------------------------------------------- statement
    const STATUS = { Fetching: 'fetching', Complete: 'complete' };

    class Statement {
        constructor(connection, options) {
            this._connection = connection;
            this._options = options;
            this._requestId = typeof options.requestId === 'string' ? options.requestId : crypto.randomUUID();
            this._status = STATUS.Fetching;
            this._columns = undefined;
            this._rows = undefined;
            this._statementId = undefined;
            this._result = undefined;
        }
        getSqlText() { return this._options.sqlText; }
        getStatus() { return this._status; }
        getColumns() { return this._columns; }
        getColumn(columnIdentifier) {
            if (!this._columns) return undefined;
            if (typeof columnIdentifier === 'number') return this._columns[columnIdentifier];
            return this._columns.find((column) => column.getName() === columnIdentifier);
        }
        getNumRows() { return this._result ? Number(this._result.total) || 0 : undefined; }
        getNumUpdatedRows() {
            if (!this._result || !this._rows || !this._columns) return undefined;
            const counted = this._columns.filter((column) => /^number of rows (inserted|updated|deleted)/i.test(String(column.getName())));
            if (!counted.length) return undefined;
            return this._rows.reduce((sum, row) => sum + counted.reduce((s, column) => s + (Number(row[column.getName()]) || 0), 0), 0);
        }
        getSessionState() { return undefined; }
        getRequestId() { return this._requestId; }
        getStatementId() { return this._statementId; }
        getQueryId() { return this._statementId; }
        cancel(callback) {
            const statement = this;
            const connection = this._connection;
            connection
                ._sessionRequest({ method: 'POST', path: '/queries/v1/abort-request', json: { sqlText: this._options.sqlText, requestId: this._requestId } })
                .then(
                    ({ error }) => typeof callback === 'function' && callback(error, statement),
                    (error) => typeof callback === 'function' && callback(error, statement)
                );
        }
        // The rows already read, as a readable stream of row objects.
        streamRows(options) {
            const { Readable } = internals.require('stream');
            const rows = (this._rows || []).slice((options && options.start) || 0, options && options.end !== undefined ? options.end + 1 : undefined);
            let next = 0;
            return new Readable({
                objectMode: true,
                read() {
                    this.push(next < rows.length ? rows[next++] : null);
                },
            });
        }

        async _run() {
            const options = this._options;
            const json = { disableOfflineChunks: false, sqlText: options.sqlText };
            if (options.binds !== undefined && options.binds !== null) json.bindings = buildBindsMap(options.binds);
            if (options.parameters) json.parameters = options.parameters;
            const query = { requestId: this._requestId };
            let { error, body } = await this._connection._sessionRequest({
                method: 'POST',
                path: '/queries/v1/query-request',
                query,
                json,
                accept: 'application/snowflake',
            });
            // A result that is not ready yet is fetched again from its result URL.
            while (!error && body && (body.code === QUERY_IN_PROGRESS || body.code === QUERY_IN_PROGRESS_ASYNC)) {
                this._statementId = body.data && body.data.queryId;
                const url = body.data && body.data.getResultUrl;
                if (typeof url !== 'string') break;
                await new Promise((resolve) => setTimeout(resolve, 200));
                ({ error, body } = await this._connection._sessionRequest({ method: 'GET', path: url, accept: 'application/snowflake' }));
            }
            if (body && body.data && body.data.queryId) this._statementId = body.data.queryId;
            if (error) throw error;
            return this._read(body);
        }

        // The rows of a result body, read by its rowtype.
        _read(body) {
            const data = (body && body.data) || {};
            this._result = data;
            this._columns = (Array.isArray(data.rowtype) ? data.rowtype : []).map((meta, index) => new Column(meta, index));
            const fetchAsString = this._options.fetchAsString;
            const asString = Array.isArray(fetchAsString) ? new Set(fetchAsString.map(String)) : null;
            const rowset = Array.isArray(data.rowset) ? data.rowset : [];
            this._rows = rowset.map((raw) => {
                const row = {};
                this._columns.forEach((column, index) => {
                    row[column.getName()] = column._convert(Array.isArray(raw) ? raw[index] : undefined, asString);
                });
                return row;
            });
            this._status = STATUS.Complete;
            return this._rows;
        }
    }

    // ---------------------------------------------------------------- connection
    const clientOf = (options) => {
        const client = {};
        if (typeof options.account === 'string') client.account = options.account;
        if (typeof options.region === 'string') client.region = options.region;
        if (typeof options.accessUrl === 'string') client.accessUrl = options.accessUrl;
        return client;
    };

    class Connection {
        constructor(options) {
            checkArgument(options !== undefined && options !== null, 404001, true);
            checkArgument(typeof options === 'object', 404002);
            checkArgument(options.username !== undefined && options.username !== null, 404003, true);
            checkArgument(typeof options.username === 'string', 404004);
            checkArgument(options.password !== undefined && options.password !== null, 404005, true);
            checkArgument(typeof options.password === 'string', 404006);
            checkArgument(options.account !== undefined || options.accessUrl !== undefined, 404007, true);
            checkArgument(options.account === undefined || typeof options.account === 'string', 404008);
            checkArgument(options.accessUrl === undefined || typeof options.accessUrl === 'string', 404010);
            this._options = Object.assign({}, options);
            this._client = clientOf(options);
            this._id = crypto.randomUUID();
            this._state = 'pristine';
            this._tokens = null;
            this._renewing = null;
            this._connecting = null;
        }
        getId() { return this._id; }
        isUp() { return this._state === 'connected'; }
        getServiceName() { return ''; }
        getClientSessionKeepAlive() { return !!this._options.clientSessionKeepAlive; }
        isValidAsync() { return Promise.resolve(this.isUp()); }

        async _request(request) {
            return readAnswer(await hostCall('snowflake.request', [this._client, request]));
        }

        // A request with the session token; an expired token is renewed with the master token
        // (once for all requests that saw it expire) and the request sent again.
        async _sessionRequest(request) {
            if (this._connecting) await this._connecting.catch(() => undefined);
            if (this._state === 'pristine') return { error: clientError(407001) };
            if (this._state !== 'connected' || !this._tokens) return { error: clientError(407002, true) };
            let tokens = this._tokens;
            let outcome = await this._request(Object.assign({ token: tokens.sessionToken }, request));
            if (outcome.error && outcome.error.code === SESSION_TOKEN_EXPIRED) {
                await this._renew(tokens);
                if (this._tokens && this._tokens !== tokens) {
                    tokens = this._tokens;
                    outcome = await this._request(Object.assign({}, request, { token: tokens.sessionToken }));
                }
            }
            return outcome;
        }

        _renew(expired) {
            if (this._tokens !== expired) return Promise.resolve();
            if (!this._renewing) {
                this._renewing = this._request({
                    method: 'POST',
                    path: '/session/token-request',
                    query: { requestId: crypto.randomUUID() },
                    token: expired.masterToken,
                    json: { REQUEST_TYPE: 'RENEW', oldSessionToken: expired.sessionToken },
                })
                    .then(({ error, body }) => {
                        if (!error) {
                            const data = body.data || {};
                            this._tokens = {
                                sessionToken: data.sessionToken || data.token || expired.sessionToken,
                                masterToken: data.masterToken || expired.masterToken,
                            };
                        } else if (error.name !== 'NetworkError') {
                            this._state = 'disconnected';
                            this._tokens = null;
                        }
                    })
                    .finally(() => {
                        this._renewing = null;
                    });
            }
            return this._renewing;
        }

        connect(callback) {
            checkArgument(callback === undefined || typeof callback === 'function', 405001);
            const done = (error) => {
                if (typeof callback === 'function') callback(error, this);
            };
            if (this._state === 'connecting') {
                Promise.resolve().then(() => done(clientError(405501)));
                return this;
            }
            if (this._state === 'connected') {
                Promise.resolve().then(() => done(clientError(405502)));
                return this;
            }
            if (this._state === 'disconnected') {
                Promise.resolve().then(() => done(clientError(405503)));
                return this;
            }
            this._state = 'connecting';
            const options = this._options;
            const query = { requestId: crypto.randomUUID() };
            if (options.warehouse) query.warehouse = String(options.warehouse);
            if (options.database) query.databaseName = String(options.database);
            if (options.schema) query.schemaName = String(options.schema);
            if (options.role) query.roleName = String(options.role);
            const sessionParameters = {};
            if (options.clientSessionKeepAlive !== undefined) sessionParameters.CLIENT_SESSION_KEEP_ALIVE = !!options.clientSessionKeepAlive;
            const json = {
                data: {
                    ACCOUNT_NAME: String(options.account || '').split('.')[0],
                    LOGIN_NAME: options.username,
                    PASSWORD: options.password,
                    CLIENT_APP_ID: 'JavaScript',
                    CLIENT_APP_VERSION: '1.6.23',
                    CLIENT_ENVIRONMENT: { OS: 'Linux', NODE_VERSION: '14.21.3', APPLICATION: options.application || 'plugin-server' },
                    SESSION_PARAMETERS: sessionParameters,
                },
            };
            this._connecting = this._request({ method: 'POST', path: '/session/v1/login-request', query, json }).then(({ error, body }) => {
                this._connecting = null;
                if (error) {
                    this._state = 'disconnected';
                    throw error;
                }
                const data = body.data || {};
                this._tokens = { sessionToken: data.token, masterToken: data.masterToken };
                this._sessionId = data.sessionId;
                this._state = 'connected';
            });
            this._connecting.then(() => done(undefined), (error) => done(error));
            return this;
        }

        connectAsync(callback) {
            return new Promise((resolve, reject) =>
                this.connect((error, connection) => {
                    if (typeof callback === 'function') callback(error, connection);
                    if (error) reject(error);
                    else resolve(connection);
                })
            );
        }

        execute(options) {
            checkArgument(options !== undefined && options !== null, 409001, true);
            checkArgument(typeof options === 'object', 409002);
            checkArgument(options.sqlText !== undefined && options.sqlText !== null, 409003, true);
            checkArgument(typeof options.sqlText === 'string', 409004);
            checkArgument(options.binds === undefined || options.binds === null || Array.isArray(options.binds), 409007);
            checkArgument(options.parameters === undefined || (options.parameters !== null && typeof options.parameters === 'object'), 409006);
            checkArgument(options.complete === undefined || typeof options.complete === 'function', 409009);
            checkArgument(options.fetchAsString === undefined || Array.isArray(options.fetchAsString), 409011);
            const statement = new Statement(this, options);
            statement._run().then(
                (rows) => options.complete && options.complete(undefined, statement, rows),
                (error) => options.complete && options.complete(error, statement, undefined)
            );
            return statement;
        }

        fetchResult(options) {
            checkArgument(options && typeof options.queryId === 'string', 410003, true);
            const statement = new Statement(this, { sqlText: '', complete: options.complete, fetchAsString: options.fetchAsString });
            statement._statementId = options.queryId;
            statement._run = async function () {
                const { error, body } = await this._connection._sessionRequest({ method: 'GET', path: `/queries/${encodeURIComponent(options.queryId)}/result`, accept: 'application/snowflake' });
                if (error) throw error;
                return this._read(body);
            };
            statement._run().then(
                (rows) => options.complete && options.complete(undefined, statement, rows),
                (error) => options.complete && options.complete(error, statement, undefined)
            );
            return statement;
        }

        destroy(callback) {
            checkArgument(callback === undefined || typeof callback === 'function', 406001);
            const done = (error) => {
                if (typeof callback === 'function') callback(error, this);
            };
            if (this._state === 'pristine') {
                Promise.resolve().then(() => done(clientError(406501)));
                return this;
            }
            if (this._state === 'disconnected') {
                Promise.resolve().then(() => done(clientError(406502)));
                return this;
            }
            const logout = async () => {
                if (this._connecting) await this._connecting.catch(() => undefined);
                if (this._state !== 'connected' || !this._tokens) return undefined;
                const { error } = await this._request({
                    method: 'POST',
                    path: '/session/logout-request',
                    query: { requestId: crypto.randomUUID() },
                    token: this._tokens.masterToken,
                });
                if (!error || error.code === GONE_SESSION) {
                    this._state = 'disconnected';
                    this._tokens = null;
                    return undefined;
                }
                return error;
            };
            logout().then(done, done);
            return this;
        }
    }

    // ---------------------------------------------------------------- module
    const createConnection = (options) => new Connection(options);
    // Logging, OCSP and the rest of snowflake-sdk's process settings do not apply here.
    const configure = (options) => {
        if (options !== undefined && (options === null || typeof options !== 'object')) {
            throw createError('InvalidParameterError', { code: 403001, message: 'Configuration options must be specified.' });
        }
    };
    const ocspModes = { FAIL_CLOSED: 'FAIL_CLOSED', FAIL_OPEN: 'FAIL_OPEN', INSECURE: 'INSECURE' };

    const snowflake = {
        createConnection,
        configure,
        ocspModes,
        STRING: 'String',
        BOOLEAN: 'Boolean',
        NUMBER: 'Number',
        DATE: 'Date',
        JSON: 'JSON',
        BUFFER: 'Buffer',
    };
    snowflake.default = snowflake;
    return snowflake;
})

// `pg` (node-postgres 8.x) as PostHog's export and import plugins use it: `Client` (connect,
// query with values, callbacks or promises, end, events), `Pool` (pg-pool 3: query,
// connect/release, end, idle timeout), results `{command, rowCount, oid, rows, fields}` parsed
// from the text format by pg-types' default parsers (int8 and numeric as strings, int2/int4/oid
// and floats as numbers, bool, json/jsonb parsed, date/timestamp/timestamptz as Date, bytea as
// Buffer, intervals, arrays of these), `types.setTypeParser`, connection strings
// (pg-connection-string), node-postgres' values preparation (Date, arrays, objects, toPostgres)
// and its errors (`DatabaseError` with `code`, `detail`, ...; Node's system errors).
//
// The connection itself is the host's (`hostCall('pg.connect' | 'pg.query' | 'pg.end')`,
// plugins/extensions/pg.rs): one per Client, closed with the VM, bounded per VM, under the
// plugins' network policy. Written for this sandbox after node-postgres' documented behaviour.
(function (internals) {
    'use strict';
    const EventEmitter = internals.require('events');
    const { Buffer, hostCall, setTimeout, clearTimeout } = internals;

    // ------------------------------------------------------------ defaults
    const defaults = {
        host: 'localhost',
        user: 'postgres',
        database: undefined,
        password: null,
        connectionString: undefined,
        port: 5432,
        rows: 0,
        binary: false,
        max: 10,
        idleTimeoutMillis: 30000,
        client_encoding: '',
        ssl: false,
        application_name: undefined,
        fallback_application_name: undefined,
        options: undefined,
        parseInputDatesAsUTC: false,
        statement_timeout: false,
        lock_timeout: false,
        idle_in_transaction_session_timeout: false,
        query_timeout: false,
        connect_timeout: 0,
        keepalives: 1,
        keepalives_idle: 0,
    };

    // ------------------------------------------------------------ type parsing (pg-types)
    const parseInteger = (value) => parseInt(value, 10);
    const parseBool = (value) =>
        value === 'TRUE' || value === 't' || value === 'true' || value === 'y' || value === 'yes' || value === 'on' || value === '1';
    const parseJson = (value) => JSON.parse(value);
    const pad = (n, width) => String(n).padStart(width, '0');

    // postgres-date: a date or timestamp in Postgres' ISO output; without a zone it is local time.
    const DATE_TIME = /^(\d{1,})-(\d{2})-(\d{2})( |T)(\d{2}):(\d{2}):(\d{2})(\.\d{1,})?((Z|[+-])(\d{2})?:?(\d{2})?:?(\d{2})?)?( BC)?$/;
    const DATE_ONLY = /^(\d{1,})-(\d{2})-(\d{2})( BC)?$/;
    const parseDate = (value) => {
        if (value === 'infinity') return Infinity;
        if (value === '-infinity') return -Infinity;
        const dateTime = DATE_TIME.exec(value);
        if (!dateTime) {
            const dateOnly = DATE_ONLY.exec(value);
            if (!dateOnly) return null;
            let year = parseInt(dateOnly[1], 10);
            if (dateOnly[4]) year = -year + 1;
            const date = new Date(year, parseInt(dateOnly[2], 10) - 1, parseInt(dateOnly[3], 10));
            if (year >= 0 && year < 100) date.setFullYear(year);
            return date;
        }
        let year = parseInt(dateTime[1], 10);
        if (dateTime[14]) year = -year + 1;
        const month = parseInt(dateTime[2], 10) - 1;
        const day = parseInt(dateTime[3], 10);
        const hour = parseInt(dateTime[5], 10);
        const minute = parseInt(dateTime[6], 10);
        const second = parseInt(dateTime[7], 10);
        const ms = dateTime[8] ? Math.floor(parseFloat(dateTime[8]) * 1000 + 1e-6) : 0;
        let date;
        if (dateTime[9]) {
            let offset = 0;
            if (dateTime[10] !== 'Z') {
                const sign = dateTime[10] === '-' ? -1 : 1;
                offset = sign * ((parseInt(dateTime[11] || '0', 10) * 3600) + (parseInt(dateTime[12] || '0', 10) * 60) + parseInt(dateTime[13] || '0', 10)) * 1000;
            }
            date = new Date(Date.UTC(year, month, day, hour, minute, second, ms) - offset);
            if (year >= 0 && year < 100) date.setUTCFullYear(year);
        } else {
            date = new Date(year, month, day, hour, minute, second, ms);
            if (year >= 0 && year < 100) date.setFullYear(year);
        }
        return date;
    };

    // postgres-interval
    class PostgresInterval {
        toPostgres() {
            const parts = [];
            for (const [key, unit] of [['years', 'years'], ['months', 'months'], ['days', 'days'], ['hours', 'hours'], ['minutes', 'minutes']]) {
                if (this[key]) parts.push(this[key] + ' ' + unit);
            }
            const seconds = (this.seconds || 0) + (this.milliseconds || 0) / 1000;
            if (seconds) parts.push(String(Number(seconds.toFixed(6))) + ' seconds');
            return parts.length === 0 ? '0' : parts.join(' ');
        }
        toISOString() {
            const seconds = ((this.seconds || 0) + (this.milliseconds || 0) / 1000).toFixed(6).replace(/\.?0+$/, '');
            return 'P' + (this.years || 0) + 'Y' + (this.months || 0) + 'M' + (this.days || 0) + 'DT' + (this.hours || 0) + 'H' + (this.minutes || 0) + 'M' + seconds + 'S';
        }
        toISO() {
            return this.toISOString();
        }
    }
    const INTERVAL_UNITS = { year: 'years', years: 'years', mon: 'months', mons: 'months', day: 'days', days: 'days' };
    const parseInterval = (value) => {
        const interval = new PostgresInterval();
        const text = String(value);
        const unitPattern = /(-?\d+) (years?|mons?|days?)/g;
        let match;
        while ((match = unitPattern.exec(text)) !== null) {
            const amount = parseInt(match[1], 10);
            if (amount) interval[INTERVAL_UNITS[match[2]]] = amount;
        }
        const time = /(-)?(\d+):(\d{2}):(\d{2})(\.\d{1,6})?/.exec(text);
        if (time) {
            const sign = time[1] ? -1 : 1;
            const hours = parseInt(time[2], 10);
            const minutes = parseInt(time[3], 10);
            const seconds = parseInt(time[4], 10);
            const ms = time[5] ? parseFloat(time[5]) * 1000 : 0;
            if (hours) interval.hours = sign * hours;
            if (minutes) interval.minutes = sign * minutes;
            if (seconds) interval.seconds = sign * seconds;
            if (ms) interval.milliseconds = sign * ms;
        }
        return interval;
    };

    // postgres-bytea (hex and escape formats)
    const parseBytea = (value) => {
        if (/^\\x/.test(value)) return Buffer.from(value.substr(2), 'hex');
        const out = [];
        let i = 0;
        while (i < value.length) {
            if (value[i] !== '\\') {
                out.push(value.charCodeAt(i) & 255);
                i++;
            } else if (/[0-7]{3}/.test(value.substr(i + 1, 3))) {
                out.push(parseInt(value.substr(i + 1, 3), 8));
                i += 4;
            } else {
                let backslashes = 1;
                while (i + backslashes < value.length && value[i + backslashes] === '\\') backslashes++;
                for (let k = 0; k < Math.floor(backslashes / 2); k++) out.push(92);
                i += Math.floor(backslashes / 2) * 2;
            }
        }
        return Buffer.from(out);
    };

    // postgres-array: `{a,"b c",NULL,{1,2}}` with a parser for the elements.
    const parseArray = (source, transform) => {
        transform = transform || ((x) => x);
        let position = 0;
        if (source[0] === '[') {
            position = source.indexOf('=') + 1; // bounds decoration: [0:1]={...}
        }
        const parse = (nested) => {
            const entries = [];
            let recorded = '';
            let quoted = false;
            let character;
            const newEntry = (includeEmpty) => {
                let entry = recorded;
                if (entry.length > 0 || includeEmpty) {
                    if (entry === 'NULL' && !includeEmpty) entry = null;
                    if (entry !== null) entry = transform(entry);
                    entries.push(entry);
                    recorded = '';
                }
            };
            position++; // the opening brace
            for (; position < source.length; position++) {
                character = source[position];
                if (character === '\\') {
                    position++;
                    recorded += source[position];
                } else if (quoted) {
                    if (character === '"') {
                        newEntry(true);
                        quoted = false;
                    } else {
                        recorded += character;
                    }
                } else if (character === '"') {
                    quoted = true;
                } else if (character === '{') {
                    entries.push(parse(true));
                } else if (character === '}') {
                    newEntry(false);
                    return entries;
                } else if (character === ',') {
                    newEntry(false);
                } else {
                    recorded += character;
                }
            }
            if (nested) throw new Error('array dimension not balanced');
            return entries;
        };
        return parse(false);
    };
    const arrayOf = (parser) => (value) => (value === null ? null : parseArray(value, parser));
    const parsePoint = (value) => {
        if (value[0] !== '(') return null;
        const [x, y] = value.substring(1, value.length - 1).split(',');
        return { x: parseFloat(x), y: parseFloat(y) };
    };
    const parseCircle = (value) => {
        if (value[0] !== '<' && value[1] !== '(') return null;
        const [x, y, radius] = value.replace(/[<>()]/g, '').split(',');
        return { x: parseFloat(x), y: parseFloat(y), radius: parseFloat(radius) };
    };
    const noParse = (value) => String(value);

    const textParsers = new Map([
        [20, (value) => String(value)], // int8: a string, as pg-types leaves it
        [21, parseInteger],
        [23, parseInteger],
        [26, parseInteger],
        [700, parseFloat],
        [701, parseFloat],
        [16, parseBool],
        [1082, parseDate],
        [1114, parseDate],
        [1184, parseDate],
        [600, parsePoint],
        [651, arrayOf(null)],
        [718, parseCircle],
        [1000, arrayOf(parseBool)],
        [1001, arrayOf(parseBytea)],
        [1005, arrayOf(parseInteger)],
        [1007, arrayOf(parseInteger)],
        [1028, arrayOf(parseInteger)],
        [1016, arrayOf(null)],
        [1017, arrayOf(parsePoint)],
        [1021, arrayOf(parseFloat)],
        [1022, arrayOf(parseFloat)],
        [1231, arrayOf(parseFloat)],
        [1014, arrayOf(null)],
        [1015, arrayOf(null)],
        [1008, arrayOf(null)],
        [1009, arrayOf(null)],
        [1040, arrayOf(null)],
        [1041, arrayOf(null)],
        [1115, arrayOf(parseDate)],
        [1182, arrayOf(parseDate)],
        [1185, arrayOf(parseDate)],
        [1186, parseInterval],
        [1187, arrayOf(parseInterval)],
        [17, parseBytea],
        [114, parseJson],
        [3802, parseJson],
        [199, arrayOf(parseJson)],
        [3807, arrayOf(parseJson)],
        [3907, arrayOf(null)],
        [2951, arrayOf(null)],
        [791, arrayOf(null)],
        [1183, arrayOf(null)],
        [1270, arrayOf(null)],
    ]);
    const binaryParsers = new Map();
    const builtins = {
        BOOL: 16, BYTEA: 17, CHAR: 18, INT8: 20, INT2: 21, INT4: 23, REGPROC: 24, TEXT: 25, OID: 26, TID: 27, XID: 28, CID: 29,
        JSON: 114, XML: 142, PG_NODE_TREE: 194, SMGR: 210, PATH: 602, POLYGON: 604, CIDR: 650, FLOAT4: 700, FLOAT8: 701,
        ABSTIME: 702, RELTIME: 703, TINTERVAL: 704, CIRCLE: 718, MACADDR8: 774, MONEY: 790, MACADDR: 829, INET: 869,
        ACLITEM: 1033, BPCHAR: 1042, VARCHAR: 1043, DATE: 1082, TIME: 1083, TIMESTAMP: 1114, TIMESTAMPTZ: 1184,
        INTERVAL: 1186, TIMETZ: 1266, BIT: 1560, VARBIT: 1562, NUMERIC: 1700, REFCURSOR: 1790, REGPROCEDURE: 2202,
        REGOPER: 2203, REGOPERATOR: 2204, REGCLASS: 2205, REGTYPE: 2206, UUID: 2950, TXID_SNAPSHOT: 2970,
        PG_LSN: 3220, PG_NDISTINCT: 3361, PG_DEPENDENCIES: 3402, TSVECTOR: 3614, TSQUERY: 3615, GTSVECTOR: 3642,
        REGCONFIG: 3734, REGDICTIONARY: 3769, JSONB: 3802, REGNAMESPACE: 4089, REGROLE: 4096,
    };
    const parsersOf = (format) => (format === 'binary' ? binaryParsers : textParsers);
    const types = {
        getTypeParser(oid, format) {
            return parsersOf(format || 'text').get(Number(oid)) || noParse;
        },
        setTypeParser(oid, format, parser) {
            if (typeof format === 'function') {
                parser = format;
                format = 'text';
            }
            parsersOf(format).set(Number(oid), parser);
        },
        arrayParser: { create: (source, transform) => ({ parse: () => parseArray(source, transform) }) },
        builtins,
    };
    class TypeOverrides {
        constructor(userTypes) {
            this._types = userTypes || types;
            this.text = {};
            this.binary = {};
        }
        setTypeParser(oid, format, parser) {
            if (typeof format === 'function') {
                parser = format;
                format = 'text';
            }
            (format === 'binary' ? this.binary : this.text)[oid] = parser;
        }
        getTypeParser(oid, format) {
            format = format || 'text';
            const own = (format === 'binary' ? this.binary : this.text)[oid];
            return own || this._types.getTypeParser(oid, format);
        }
    }

    // ------------------------------------------------------------ values going in (utils.js)
    const dateToString = (date) => {
        let offset = -date.getTimezoneOffset();
        let year = date.getFullYear();
        const bc = year < 1;
        if (bc) year = Math.abs(year) + 1;
        let text =
            pad(year, 4) + '-' + pad(date.getMonth() + 1, 2) + '-' + pad(date.getDate(), 2) + 'T' + pad(date.getHours(), 2) + ':' +
            pad(date.getMinutes(), 2) + ':' + pad(date.getSeconds(), 2) + '.' + pad(date.getMilliseconds(), 3);
        if (offset < 0) {
            text += '-';
            offset *= -1;
        } else {
            text += '+';
        }
        text += pad(Math.floor(offset / 60), 2) + ':' + pad(offset % 60, 2);
        if (bc) text += ' BC';
        return text;
    };
    const dateToStringUTC = (date) => {
        let year = date.getUTCFullYear();
        const bc = year < 1;
        if (bc) year = Math.abs(year) + 1;
        let text =
            pad(year, 4) + '-' + pad(date.getUTCMonth() + 1, 2) + '-' + pad(date.getUTCDate(), 2) + 'T' + pad(date.getUTCHours(), 2) + ':' +
            pad(date.getUTCMinutes(), 2) + ':' + pad(date.getUTCSeconds(), 2) + '.' + pad(date.getUTCMilliseconds(), 3) + '+00:00';
        if (bc) text += ' BC';
        return text;
    };
    const escapeElement = (text) => '"' + text.replace(/\\/g, '\\\\').replace(/"/g, '\\"') + '"';
    const arrayString = (values) => {
        let out = '{';
        for (let i = 0; i < values.length; i++) {
            if (i > 0) out += ',';
            const value = values[i];
            if (value === null || typeof value === 'undefined') out += 'NULL';
            else if (Array.isArray(value)) out += arrayString(value);
            else if (value instanceof Uint8Array) out += '\\\\x' + Buffer.from(value).toString('hex');
            else out += escapeElement(prepareValue(value));
        }
        return out + '}';
    };
    const prepareValue = (value, seen) => {
        if (value === null || value === undefined) return null;
        if (value instanceof Uint8Array || ArrayBuffer.isView(value)) {
            // node-postgres sends a Buffer as a binary parameter; as text, bytea's hex form.
            return '\\x' + Buffer.from(value.buffer, value.byteOffset, value.byteLength).toString('hex');
        }
        if (value instanceof Date) return defaults.parseInputDatesAsUTC ? dateToStringUTC(value) : dateToString(value);
        if (Array.isArray(value)) return arrayString(value);
        if (typeof value === 'object') {
            if (typeof value.toPostgres === 'function') {
                seen = seen || [];
                if (seen.indexOf(value) !== -1) throw new Error('circular reference detected while preparing "' + value + '" for query');
                seen.push(value);
                return prepareValue(value.toPostgres(prepareValue), seen);
            }
            return JSON.stringify(value);
        }
        return value.toString();
    };
    const escapeIdentifier = (text) => '"' + String(text).replace(/"/g, '""') + '"';
    const escapeLiteral = (text) => {
        let backslash = false;
        let escaped = "'";
        for (const c of String(text)) {
            if (c === "'") escaped += c + c;
            else if (c === '\\') {
                escaped += c + c;
                backslash = true;
            } else escaped += c;
        }
        escaped += "'";
        return backslash ? ' E' + escaped : escaped;
    };

    // ------------------------------------------------------------ connection strings
    const parseConnectionString = (text) => {
        let source = String(text);
        if (source.charAt(0) === '/') {
            const parts = source.split(' ');
            return { host: parts[0], database: parts[1] };
        }
        const config = {};
        let url;
        let dummyHost = false;
        if (/ |%[^a-f0-9]|%[a-f0-9][^a-f0-9]/i.test(source)) source = encodeURI(source).replace(/%25(\d\d)/g, '%$1');
        try {
            url = new URL(source, 'postgres://base');
        } catch (e) {
            url = new URL(source.replace('@/', '@___DUMMY___/'), 'postgres://base');
            dummyHost = true;
        }
        for (const [key, value] of url.searchParams.entries()) config[key] = value;
        config.user = config.user || decodeURIComponent(url.username);
        config.password = config.password || decodeURIComponent(url.password);
        if (url.protocol === 'socket:') {
            config.host = decodeURI(url.pathname);
            config.database = url.searchParams.get('db');
            config.client_encoding = url.searchParams.get('encoding');
            return config;
        }
        const hostname = dummyHost ? '' : url.hostname;
        if (!config.host) config.host = decodeURIComponent(hostname);
        if (!config.port) config.port = url.port;
        const pathname = url.pathname.slice(1) || null;
        config.database = pathname ? decodeURI(pathname) : null;
        if (config.ssl === 'true' || config.ssl === '1') config.ssl = true;
        if (config.ssl === '0') config.ssl = false;
        if (config.sslcert || config.sslkey || config.sslrootcert || config.sslmode) config.ssl = {};
        switch (config.sslmode) {
            case 'disable':
                config.ssl = false;
                break;
            case 'no-verify':
                config.ssl.rejectUnauthorized = false;
                break;
            default:
                break;
        }
        return config;
    };

    // ConnectionParameters: `config[key] || defaults[key]` (node-postgres reads PG* variables
    // in between; a plugin has no environment).
    const val = (key, config) => config[key] || defaults[key];
    class ConnectionParameters {
        constructor(config) {
            config = typeof config === 'string' ? parseConnectionString(config) : config || {};
            if (config.connectionString) config = Object.assign({}, config, parseConnectionString(config.connectionString));
            this.user = val('user', config);
            this.database = val('database', config);
            if (this.database === undefined) this.database = this.user;
            this.port = parseInt(val('port', config), 10);
            this.host = val('host', config);
            Object.defineProperty(this, 'password', { configurable: true, enumerable: false, writable: true, value: val('password', config) });
            this.binary = val('binary', config);
            this.options = val('options', config);
            this.ssl = typeof config.ssl === 'undefined' ? defaults.ssl : config.ssl;
            if (typeof this.ssl === 'string' && this.ssl === 'true') this.ssl = true;
            if (this.ssl === 'no-verify') this.ssl = { rejectUnauthorized: false };
            this.client_encoding = val('client_encoding', config);
            this.replication = val('replication', config);
            this.application_name = val('application_name', config) || val('fallback_application_name', config);
            this.statement_timeout = val('statement_timeout', config);
            this.lock_timeout = val('lock_timeout', config);
            this.idle_in_transaction_session_timeout = val('idle_in_transaction_session_timeout', config);
            this.query_timeout = val('query_timeout', config);
            this.connect_timeout = config.connectionTimeoutMillis || (config.connect_timeout ? config.connect_timeout * 1000 : 0);
        }
        // What the host connects with.
        _record() {
            const parameters = {};
            if (this.application_name) parameters.application_name = String(this.application_name);
            if (this.options) parameters.options = String(this.options);
            if (this.statement_timeout) parameters.statement_timeout = String(this.statement_timeout);
            if (this.lock_timeout) parameters.lock_timeout = String(this.lock_timeout);
            if (this.idle_in_transaction_session_timeout) parameters.idle_in_transaction_session_timeout = String(this.idle_in_transaction_session_timeout);
            let ssl = null;
            if (this.ssl === true) ssl = { rejectUnauthorized: true };
            else if (this.ssl && typeof this.ssl === 'object') {
                ssl = { rejectUnauthorized: this.ssl.rejectUnauthorized !== false };
                if (this.ssl.ca) ssl.ca = Array.isArray(this.ssl.ca) ? this.ssl.ca.map(String) : String(this.ssl.ca);
            }
            return {
                host: this.host === undefined || this.host === null ? null : String(this.host),
                port: Number.isNaN(this.port) ? null : this.port,
                user: this.user === undefined || this.user === null ? null : String(this.user),
                password: this.password === undefined || this.password === null ? null : String(this.password),
                database: this.database === undefined || this.database === null ? null : String(this.database),
                ssl,
                parameters,
                connectTimeoutMs: this.connect_timeout || null,
            };
        }
    }

    // ------------------------------------------------------------ errors
    class DatabaseError extends Error {
        constructor(message, length, name) {
            super(message);
            this.length = length;
            this.name = name;
        }
    }
    const DATABASE_FIELDS = ['severity', 'code', 'detail', 'hint', 'position', 'internalPosition', 'internalQuery', 'where', 'schema', 'table', 'column', 'dataType', 'constraint', 'file', 'line', 'routine'];
    const ERRNO = { ECONNREFUSED: -111, ECONNRESET: -104, ETIMEDOUT: -110, EHOSTUNREACH: -113, ENETUNREACH: -101, ENOTFOUND: -3008, EAI_AGAIN: -3001 };
    // The host's `PgError` (a JSON record) as node-postgres would have thrown it.
    const fromHost = (error) => {
        if (!error || error.name !== 'PgError') return error;
        let record;
        try {
            record = JSON.parse(error.message);
        } catch (e) {
            return new Error(error.message);
        }
        if (record.kind === 'database') {
            const fields = record.fields || {};
            const out = new DatabaseError(fields.message || '', 0, 'error');
            for (const key of DATABASE_FIELDS) out[key] = fields[key];
            return out;
        }
        const out = new Error(record.message);
        if (record.kind === 'system') {
            if (record.code) {
                out.errno = ERRNO[record.code] !== undefined ? ERRNO[record.code] : record.code;
                out.code = record.code;
            }
            if (record.syscall) out.syscall = record.syscall;
            const target = /^connect \S+ (.*):(\d+)$/.exec(record.message);
            if (target) {
                out.address = target[1];
                out.port = parseInt(target[2], 10);
            }
            if (record.syscall === 'getaddrinfo' && record.code === 'ENOTFOUND') out.hostname = record.message.split(' ').pop();
        }
        return out;
    };
    const connectionLost = (error) =>
        error && (error.message === 'Connection terminated unexpectedly' || error.code === 'ECONNRESET' || error.message === 'Query read timeout');

    // ------------------------------------------------------------ results
    const TAG = /^([A-Za-z]+)(?: (\d+))?(?: (\d+))?/;
    class Result {
        constructor(rowMode, types) {
            this.command = null;
            this.rowCount = null;
            this.oid = null;
            this.rows = [];
            this.fields = [];
            this._parsers = undefined;
            this._types = types;
            this.RowCtor = null;
            this.rowAsArray = rowMode === 'array';
        }
        addCommandComplete(tag) {
            const match = TAG.exec(tag || '');
            if (match) {
                this.command = match[1];
                if (match[3]) {
                    this.oid = parseInt(match[2], 10);
                    this.rowCount = parseInt(match[3], 10);
                } else if (match[2]) {
                    this.rowCount = parseInt(match[2], 10);
                }
            }
        }
        addFields(fields) {
            this.fields = fields.map(([name, tableID, columnID, dataTypeID, dataTypeSize, dataTypeModifier]) => ({
                name, tableID, columnID, dataTypeID, dataTypeSize, dataTypeModifier, format: 'text',
            }));
            this._parsers = this.fields.map((field) => (this._types || types).getTypeParser(field.dataTypeID, 'text'));
        }
        parseRow(values) {
            if (this.rowAsArray) return values.map((value, i) => (value === null ? null : this._parsers[i](value)));
            const row = {};
            for (let i = 0; i < values.length; i++) {
                row[this.fields[i].name] = values[i] === null ? null : this._parsers[i](values[i]);
            }
            return row;
        }
        addRow(row) {
            this.rows.push(row);
        }
    }
    const toResult = (raw, rowMode, typeParsers) => {
        const result = new Result(rowMode, typeParsers);
        result.addFields(raw.fields || []);
        result.addCommandComplete(raw.command);
        for (const values of raw.rows || []) result.addRow(result.parseRow(values));
        return result;
    };

    // ------------------------------------------------------------ Query
    class Query extends EventEmitter {
        constructor(config, values, callback) {
            super();
            if (typeof config === 'string') config = { text: config };
            else config = Object.assign({}, config);
            if (values !== undefined && values !== null) {
                if (typeof values === 'function') callback = values;
                else config.values = values;
            }
            if (callback) config.callback = callback;
            this.text = config.text;
            this.values = config.values;
            this.rows = config.rows;
            this.types = config.types;
            this.name = config.name;
            this.binary = config.binary;
            this.rowMode = config.rowMode;
            this.callback = config.callback;
        }
        // node-postgres uses the extended protocol only when there is something to bind.
        requiresPreparation() {
            if (this.name || this.rows) return true;
            if (!this.text || !this.values) return false;
            return this.values.length > 0;
        }
    }

    // ------------------------------------------------------------ Client
    class Client extends EventEmitter {
        constructor(config) {
            super();
            const parameters = new ConnectionParameters(config);
            Object.defineProperty(this, 'connectionParameters', { value: parameters, enumerable: false, writable: true, configurable: true });
            this.user = parameters.user;
            this.database = parameters.database;
            this.port = parameters.port;
            this.host = parameters.host;
            Object.defineProperty(this, 'password', { configurable: true, enumerable: false, writable: true, value: parameters.password });
            this.replication = parameters.replication;
            this._types = new TypeOverrides((config && typeof config === 'object' && config.types) || undefined);
            this._ending = false;
            this._ended = false;
            this._connecting = false;
            this._connected = false;
            this._connectionError = false;
            this._queryable = true;
            this._id = null;
            this.queryQueue = [];
            this.activeQuery = null;
            this.ssl = parameters.ssl || false;
            this.processID = null;
            this.secretKey = null;
            this.binary = parameters.binary || defaults.binary;
        }
        connect(callback) {
            if (callback) {
                this._connect(callback);
                return undefined;
            }
            return new Promise((resolve, reject) => this._connect((error) => (error ? reject(error) : resolve())));
        }
        _connect(callback) {
            if (this._connecting || this._connected) {
                const error = new Error('Client has already been connected. You cannot reuse a client.');
                Promise.resolve().then(() => callback(error));
                return;
            }
            this._connecting = true;
            hostCall('pg.connect', [this.connectionParameters._record()]).then(
                (opened) => {
                    if (this._ending) {
                        // end() was called while connecting: close at once.
                        hostCall('pg.end', [opened.id]).catch(() => {});
                        this._connecting = false;
                        const error = new Error('Connection terminated');
                        callback(error);
                        this._finishEnd();
                        return;
                    }
                    this._id = opened.id;
                    this.processID = opened.processID;
                    this._connecting = false;
                    this._connected = true;
                    callback(null, this);
                    this.emit('connect');
                    this._pulseQueryQueue();
                },
                (error) => {
                    this._connecting = false;
                    this._connectionError = true;
                    this._queryable = false;
                    const failure = fromHost(error);
                    this._errorAllQueries(failure);
                    callback(failure);
                },
            );
        }
        query(config, values, callback) {
            if (config === null || config === undefined) throw new TypeError('Client was passed a null or undefined query');
            if (typeof config.submit === 'function') {
                throw new TypeError('Submittable queries (pg-cursor, pg-query-stream) are not available in plugins');
            }
            const query = new Query(config, values, callback);
            let result;
            if (!query.callback) {
                result = new Promise((resolve, reject) => {
                    query.callback = (error, res) => (error ? reject(error) : resolve(res));
                });
            }
            if (!this._queryable) {
                Promise.resolve().then(() => query.callback(new Error('Client has encountered a connection error and is not queryable')));
                return result;
            }
            if (this._ending) {
                Promise.resolve().then(() => query.callback(new Error('Client was closed and is not queryable')));
                return result;
            }
            this.queryQueue.push(query);
            this._pulseQueryQueue();
            return result;
        }
        _pulseQueryQueue() {
            if (!this._connected || this.activeQuery || this.queryQueue.length === 0) {
                if (this._connected && !this.activeQuery && this.queryQueue.length === 0) this.emit('drain');
                return;
            }
            const query = this.queryQueue.shift();
            this.activeQuery = query;
            let params = null;
            try {
                if (query.requiresPreparation()) params = (query.values || []).map((value) => prepareValue(value));
            } catch (error) {
                this.activeQuery = null;
                Promise.resolve().then(() => query.callback(error));
                this._pulseQueryQueue();
                return;
            }
            const typeParsers = query.types || this._types;
            hostCall('pg.query', [this._id, String(query.text), params]).then(
                (raw) => {
                    this.activeQuery = null;
                    const results = raw.map((one) => toResult(one, query.rowMode, typeParsers));
                    const result = results.length === 1 ? results[0] : results.length === 0 ? toResult({}, query.rowMode, typeParsers) : results;
                    for (const one of results) for (const row of one.rows) query.emit('row', row, one);
                    query.emit('end', result);
                    query.callback(null, result);
                    this._pulseQueryQueue();
                },
                (error) => {
                    this.activeQuery = null;
                    const failure = fromHost(error);
                    // node-postgres' Query emits 'error' only when it has no callback (it always
                    // has one here), so a listener is told without an unhandled 'error' throwing.
                    if (query.listenerCount('error') > 0) query.emit('error', failure);
                    query.callback(failure);
                    if (connectionLost(failure)) {
                        this._queryable = false;
                        this._errorAllQueries(failure);
                        if (this.listenerCount('error') > 0) this.emit('error', failure);
                        return;
                    }
                    this._pulseQueryQueue();
                },
            );
        }
        _errorAllQueries(error) {
            const queued = this.queryQueue.splice(0);
            for (const query of queued) Promise.resolve().then(() => query.callback(error));
        }
        _finishEnd() {
            if (this._ended) return;
            this._ended = true;
            this._errorAllQueries(new Error('Connection terminated'));
            this.emit('end');
        }
        end(callback) {
            this._ending = true;
            let done;
            if (this._connected && this._id !== null) {
                const id = this._id;
                this._connected = false;
                done = hostCall('pg.end', [id]).then(
                    () => this._finishEnd(),
                    () => this._finishEnd(),
                );
            } else {
                if (!this._connecting) this._ended = true;
                done = Promise.resolve();
            }
            if (callback) {
                done.then(() => callback());
                return undefined;
            }
            return done;
        }
        escapeIdentifier(text) {
            return escapeIdentifier(text);
        }
        escapeLiteral(text) {
            return escapeLiteral(text);
        }
        setTypeParser(oid, format, parser) {
            return this._types.setTypeParser(oid, format, parser);
        }
        getTypeParser(oid, format) {
            return this._types.getTypeParser(oid, format);
        }
        ref() {}
        unref() {}
    }
    Client.Query = Query;

    // ------------------------------------------------------------ Pool (pg-pool 3)
    class Pool extends EventEmitter {
        constructor(options) {
            super();
            options = Object.assign({}, options);
            this.options = Object.assign({}, options);
            if (options.password) {
                Object.defineProperty(this.options, 'password', { configurable: true, enumerable: false, writable: true, value: options.password });
            }
            this.options.max = this.options.max || this.options.poolSize || 10;
            this.options.maxUses = this.options.maxUses || Infinity;
            this.options.allowExitOnIdle = this.options.allowExitOnIdle || false;
            this.options.idleTimeoutMillis = this.options.idleTimeoutMillis === undefined ? 10000 : this.options.idleTimeoutMillis;
            this.Client = this.options.Client || Client;
            this._clients = [];
            this._idle = [];
            this._pendingQueue = [];
            this._endCallback = undefined;
            this.ending = false;
            this.ended = false;
        }
        get waitingCount() {
            return this._pendingQueue.length;
        }
        get idleCount() {
            return this._idle.length;
        }
        get expiredCount() {
            return 0;
        }
        get totalCount() {
            return this._clients.length;
        }
        _isFull() {
            return this._clients.length >= this.options.max;
        }
        _pulseQueue() {
            if (this.ending) {
                if (this._idle.length) this._idle.splice(0).forEach((item) => this._remove(item.client));
                if (!this._clients.length) {
                    this.ended = true;
                    if (this._endCallback) this._endCallback();
                }
                return;
            }
            if (!this._pendingQueue.length) return;
            if (!this._idle.length && this._isFull()) return;
            const pending = this._pendingQueue.shift();
            if (this._idle.length) {
                const idle = this._idle.pop();
                clearTimeout(idle.timeoutId);
                this._acquireClient(idle.client, pending, true);
                return;
            }
            this._newClient(pending);
        }
        _remove(client) {
            const idle = this._idle.findIndex((item) => item.client === client);
            if (idle !== -1) {
                clearTimeout(this._idle[idle].timeoutId);
                this._idle.splice(idle, 1);
            }
            this._clients = this._clients.filter((c) => c !== client);
            client.end();
            this.emit('remove', client);
        }
        connect(callback) {
            if (this.ending) {
                const error = new Error('Cannot use a pool after calling end on the pool');
                if (callback) {
                    callback(error);
                    return undefined;
                }
                return Promise.reject(error);
            }
            let result;
            if (!callback) {
                result = new Promise((resolve, reject) => {
                    callback = (error, client) => (error ? reject(error) : resolve(client));
                });
            }
            const pending = { callback, timedOut: false };
            if (this._isFull() || this._idle.length) {
                if (this._idle.length) Promise.resolve().then(() => this._pulseQueue());
                if (this.options.connectionTimeoutMillis) {
                    pending.timer = setTimeout(() => {
                        const index = this._pendingQueue.indexOf(pending);
                        if (index !== -1) {
                            this._pendingQueue.splice(index, 1);
                            pending.timedOut = true;
                            callback(new Error('timeout exceeded when trying to connect'));
                        }
                    }, this.options.connectionTimeoutMillis);
                }
                this._pendingQueue.push(pending);
                return result;
            }
            this._newClient(pending);
            return result;
        }
        _newClient(pending) {
            const client = new this.Client(this.options);
            this._clients.push(client);
            const onIdleError = (error) => {
                error.client = client;
                client.removeListener('error', onIdleError);
                this._remove(client);
                this.emit('error', error, client);
            };
            client.on('error', onIdleError);
            client._poolIdleListener = onIdleError;
            let timedOut = false;
            let timer;
            if (this.options.connectionTimeoutMillis) {
                timer = setTimeout(() => {
                    timedOut = true;
                    client.end();
                }, this.options.connectionTimeoutMillis);
            }
            client.connect((error) => {
                if (timer) clearTimeout(timer);
                if (error) {
                    this._clients = this._clients.filter((c) => c !== client);
                    if (timedOut) error = new Error('Connection terminated due to connection timeout');
                    this._pulseQueue();
                    if (!pending.timedOut) pending.callback(error, undefined, () => {});
                    return;
                }
                this.emit('connect', client);
                this._acquireClient(client, pending, false);
            });
        }
        _acquireClient(client, pending, isExisting) {
            if (pending.timer) clearTimeout(pending.timer);
            this.emit('acquire', client);
            client.release = this._releaseOnce(client);
            client.removeListener('error', client._poolIdleListener);
            if (pending.timedOut) {
                client.release();
                return;
            }
            pending.callback(undefined, client, client.release);
            void isExisting;
        }
        _releaseOnce(client) {
            let released = false;
            return (error) => {
                if (released) throw new Error('Release called on client which has already been released to the pool.');
                released = true;
                this._release(client, error);
            };
        }
        _release(client, error) {
            client.on('error', client._poolIdleListener);
            client._poolUseCount = (client._poolUseCount || 0) + 1;
            this.emit('release', error, client);
            if (error || this.ending || !client._queryable || client._ending || client._poolUseCount >= this.options.maxUses) {
                this._remove(client);
                this._pulseQueue();
                return;
            }
            const item = { client, timeoutId: undefined };
            if (this.options.idleTimeoutMillis) {
                item.timeoutId = setTimeout(() => this._remove(client), this.options.idleTimeoutMillis);
            }
            this._idle.push(item);
            this._pulseQueue();
        }
        query(text, values, callback) {
            if (typeof text === 'function') {
                const error = new Error('Passing a function as the first parameter to pool.query is not supported');
                Promise.resolve().then(() => text(error));
                return undefined;
            }
            if (typeof values === 'function') {
                callback = values;
                values = undefined;
            }
            let result;
            if (!callback) {
                result = new Promise((resolve, reject) => {
                    callback = (error, res) => (error ? reject(error) : resolve(res));
                });
            }
            this.connect((error, client) => {
                if (error) {
                    callback(error);
                    return;
                }
                let released = false;
                const release = (err) => {
                    if (released) return;
                    released = true;
                    client.release(err);
                };
                try {
                    client.query(text, values, (err, res) => {
                        release(err);
                        if (err) callback(err);
                        else callback(undefined, res);
                    });
                } catch (err) {
                    release(err);
                    callback(err);
                }
            });
            return result;
        }
        end(callback) {
            if (this.ending) {
                const error = new Error('Called end on pool more than once');
                if (callback) {
                    callback(error);
                    return undefined;
                }
                return Promise.reject(error);
            }
            this.ending = true;
            const promise = new Promise((resolve) => {
                this._endCallback = () => {
                    resolve();
                    if (callback) callback();
                };
            });
            this._pulseQueue();
            return callback ? undefined : promise;
        }
    }

    const pg = {
        Client,
        Pool,
        Query,
        Connection: undefined,
        native: null,
        types,
        defaults,
        DatabaseError,
        escapeIdentifier,
        escapeLiteral,
        _pools: [],
    };
    pg.default = pg;
    return pg;
})

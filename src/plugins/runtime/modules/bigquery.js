// `@google-cloud/bigquery` (v5, the reference's 5.x) for plugins: `BigQuery` (`dataset`,
// `request`), `Dataset` (`table`, `createTable`, `get`/`getMetadata`, `exists`) and `Table`
// (`getMetadata`, `setMetadata`, `get`, `exists`, `create`, `delete`, `insert` with its
// `raw`/`createInsertId`/`partialRetries`/`skipInvalidRows`/`ignoreUnknownValues` options and its
// `PartialFailureError`), each with a promise of the library's result array or a callback.
// Every request is made by the host (plugins/extensions/google.rs: the service account's RS256 JWT
// exchanged for an access token, the API root, retries when `autoRetry`, the network policy);
// this file gives them the library's REST bodies and its error shapes: `ApiError` (`code`,
// `errors`, `response`, the message of `createMultiErrorMessage`) for API errors, node-fetch's
// `FetchError` for network failures (as teeny-request/gaxios surface them). Credentials come from
// the client's `credentials` option only: never from the environment, files or a metadata server.
// Written for this sandbox after the library's documented behaviour.
(function (internals) {
    'use strict';
    const { Buffer, require } = internals;
    const crypto = require('crypto');

    const SCOPES = ['https://www.googleapis.com/auth/bigquery'];

    const common = require('@google-cloud/common');
    const { ApiError, PartialFailureError, apiError, callbackOf, optionsOf, settle, segment, pick } = common;

    // Deep copy through JSON (what the library's `extend(true, ...)` leaves for plain data).
    const plain = (value) => (value === undefined ? undefined : JSON.parse(JSON.stringify(value)));

    // `Table.encodeValue_`: Buffers as base64, Dates as JSON, nested values likewise.
    const encodeValue = (value) => {
        if (value === null || value === undefined) return null;
        if (Buffer.isBuffer(value)) return value.toString('base64');
        if (value instanceof Date) return value.toJSON();
        if (Array.isArray(value)) return value.map(encodeValue);
        if (typeof value === 'object') {
            if (typeof value.value !== 'undefined' && value.constructor && /^BigQuery(Date|Datetime|Time|Timestamp)$|^Geography$/.test(value.constructor.name)) return value.value;
            const out = {};
            for (const key of Object.keys(value)) out[key] = encodeValue(value[key]);
            return out;
        }
        return value;
    };

    // `Table.formatMetadata_`.
    const formatMetadata = (options) => {
        const body = plain(options || {});
        if (body.name) {
            body.friendlyName = body.name;
            delete body.name;
        }
        if (typeof body.schema === 'string') {
            body.schema = {
                fields: body.schema.split(/\s*,\s*/).map((pair) => {
                    const [name, type] = pair.split(':');
                    return { name, type: (type || 'STRING').toUpperCase().trim() };
                }),
            };
        }
        if (Array.isArray(body.schema)) body.schema = { fields: body.schema };
        if (body.schema && Array.isArray(body.schema.fields)) {
            body.schema.fields = body.schema.fields.map((field) => {
                if (field && field.fields) field.type = 'RECORD';
                return field;
            });
        }
        if (typeof body.partitioning === 'string') {
            body.timePartitioning = { type: body.partitioning.toUpperCase() };
            delete body.partitioning;
        }
        if (typeof body.view === 'string') body.view = { query: body.view, useLegacySql: false };
        return body;
    };

    // ---------------------------------------------------------------- classes
    class BigQuery {
        constructor(options) {
            options = optionsOf(options);
            this._credentials = pick(options.credentials);
            this.projectId = options.projectId || (options.credentials && options.credentials.project_id) || '{{projectId}}';
            this.location = options.location;
            this.apiEndpoint = typeof options.apiEndpoint === 'string' ? options.apiEndpoint : undefined;
            this._maxRetries = options.autoRetry === false ? 0 : typeof options.maxRetries === 'number' ? options.maxRetries : 3;
            this.baseUrl = '/bigquery/v2';
            this.scopes = SCOPES.slice();
        }
        dataset(id, options) {
            if (typeof id !== 'string') throw new TypeError('A dataset ID is required.');
            return new Dataset(this, id, options);
        }
        // One REST call: resolves the parsed body of a 2xx answer, rejects with the library's error.
        async _request(method, path, json, query) {
            const answer = await common.call(this, 'bigquery', method, this.baseUrl + '/projects/' + segment(this.projectId) + path, { query, json });
            if (answer.status < 200 || answer.status >= 300) throw apiError(answer.status, answer.body);
            return answer.body === '' ? {} : answer.body;
        }
    }

    class Dataset {
        constructor(bigQuery, id, options) {
            this.bigQuery = bigQuery;
            this.id = id;
            this.location = optionsOf(options).location || bigQuery.location;
            this.metadata = {};
        }
        get _path() {
            return '/datasets/' + segment(this.id);
        }
        table(id, options) {
            if (typeof id !== 'string') throw new TypeError('A table ID is required.');
            return new Table(this, id, options);
        }
        createTable(id, ...args) {
            const callback = callbackOf(args);
            const body = formatMetadata(optionsOf(args[0]));
            body.tableReference = { datasetId: this.id, projectId: this.bigQuery.projectId, tableId: id };
            const promise = this.bigQuery._request('POST', this._path + '/tables', body).then((response) => {
                const table = this.table(response.tableReference ? response.tableReference.tableId : id);
                table.metadata = response;
                return [table, response];
            });
            return settle(promise, callback);
        }
        getMetadata(...args) {
            const promise = this.bigQuery._request('GET', this._path).then((response) => {
                this.metadata = response;
                return [response, response];
            });
            return settle(promise, callbackOf(args));
        }
        get(...args) {
            return settle(this.getMetadata().then(([metadata]) => [this, metadata]), callbackOf(args));
        }
        exists(...args) {
            return settle(existsOf(this), callbackOf(args));
        }
    }

    const existsOf = (object) =>
        object.getMetadata().then(
            () => [true],
            (error) => {
                if (error && error.code === 404) return [false];
                throw error;
            }
        );

    class Table {
        constructor(dataset, id, options) {
            this.dataset = dataset;
            this.bigQuery = dataset.bigQuery;
            this.id = id;
            this.location = optionsOf(options).location || dataset.location;
            this.metadata = {};
        }
        get _path() {
            return this.dataset._path + '/tables/' + segment(this.id);
        }
        getMetadata(...args) {
            const promise = this.bigQuery._request('GET', this._path).then((response) => {
                this.metadata = response;
                return [response, response];
            });
            return settle(promise, callbackOf(args));
        }
        setMetadata(metadata, ...args) {
            const promise = this.bigQuery._request('PATCH', this._path, formatMetadata(metadata)).then((response) => {
                this.metadata = response;
                return [response, response];
            });
            return settle(promise, callbackOf(args));
        }
        get(...args) {
            return settle(this.getMetadata().then(([metadata]) => [this, metadata]), callbackOf(args));
        }
        exists(...args) {
            return settle(existsOf(this), callbackOf(args));
        }
        create(...args) {
            return settle(this.dataset.createTable(this.id, optionsOf(args[0])), callbackOf(args));
        }
        delete(...args) {
            return settle(this.bigQuery._request('DELETE', this._path).then((response) => [response]), callbackOf(args));
        }
        insert(rows, ...args) {
            const options = optionsOf(args[0]);
            return settle(this._insertWithRetry(rows, options), callbackOf(args));
        }
        async _insertWithRetry(rows, options) {
            const partialRetries = typeof options.partialRetries === 'number' ? options.partialRetries : 3;
            const attempts = Math.max(partialRetries, 0) + 1;
            let error;
            for (let attempt = 0; attempt < attempts; attempt++) {
                try {
                    return await this._insert(rows, options);
                } catch (e) {
                    error = e;
                    rows = (e.errors || []).filter((err) => !!err.row).map((err) => err.row);
                    if (!rows.length) break;
                }
            }
            throw error;
        }
        async _insert(rows, options) {
            rows = Array.isArray(rows) ? rows : rows === undefined || rows === null ? [] : [rows];
            if (!rows.length) throw new Error('You must provide at least 1 row to be inserted.');
            const json = Object.assign(plain(options) || {}, { rows });
            if (!options.raw) {
                json.rows = rows.map((row) => {
                    const encoded = { json: encodeValue(row) };
                    if (options.createInsertId !== false) encoded.insertId = crypto.randomUUID();
                    return encoded;
                });
            }
            delete json.createInsertId;
            delete json.partialRetries;
            delete json.raw;
            delete json.schema;
            const response = await this.bigQuery._request('POST', this._path + '/insertAll', json);
            const insertErrors = Array.isArray(response.insertErrors) ? response.insertErrors : [];
            const failures = insertErrors.map((insertError) => ({
                errors: (Array.isArray(insertError.errors) ? insertError.errors : []).map((error) => ({ message: error.message, reason: error.reason })),
                row: rows[insertError.index],
            }));
            if (failures.length > 0) throw new PartialFailureError({ errors: failures, response });
            return [response];
        }
    }

    const util = { ApiError, PartialFailureError };
    const exports = { BigQuery, Dataset, Table, ApiError, PartialFailureError, util };
    exports.default = exports;
    return exports;
})

// `@google-cloud/bigquery` (v5, the reference's 5.x) for plugins: `BigQuery` (`dataset`, `job`,
// `createDataset`, `getDatasets`, `createQueryJob`/`createJob`, `query`, the value wrappers
// `date`/`datetime`/`time`/`timestamp`/`int`/`geography`), `Dataset` (`table`, `create`, `delete`,
// `createTable`, `getTables`, `get`/`getMetadata`, `exists`, `createQueryJob`/`query`), `Table`
// (`getMetadata`, `setMetadata`, `get`, `exists`, `create`, `delete`, `query`, `insert` with its
// `raw`/`createInsertId`/`partialRetries`/`skipInvalidRows`/`ignoreUnknownValues`/`schema` options
// and its `PartialFailureError`) and `Job` (`getQueryResults`, `getMetadata`, `get`, `exists`,
// `cancel`, `promise` and the `complete`/`error` events of @google-cloud/common's `Operation`), each
// with a promise of the library's result array or a callback; list methods paginate as
// @google-cloud/paginator does (`autoPaginate`, `maxResults`, `maxApiCalls`).
// Every request is made by the host (plugins/extensions/google.rs: the service account's RS256 JWT
// exchanged for an access token, the API root, retries when `autoRetry`, the network policy);
// this file gives them the library's REST bodies (query parameters typed as
// `BigQuery.valueToQueryParameter_` types them), reads query results as `mergeSchemaWithRows_`
// does, and makes its error shapes: `ApiError` (`code`, `errors`, `response`, the message of
// `createMultiErrorMessage`) for API errors, node-fetch's `FetchError` for network failures (as
// teeny-request/gaxios surface them). Credentials come from the client's `credentials` option only:
// never from the environment, files or a metadata server.
// Written for this sandbox after the library's published code (5.9.1).
(function (internals) {
    'use strict';
    const { Buffer, require, setTimeout } = internals;
    const crypto = require('crypto');
    const EventEmitter = require('events');

    const SCOPES = ['https://www.googleapis.com/auth/bigquery'];
    // `Table.insert` with a `schema` waits this long after creating the missing table.
    const CREATE_TABLE_WAIT_MS = 60000;
    // @google-cloud/common's `Operation` polls this often.
    const POLL_INTERVAL_MS = 500;

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


    const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
    // The `is` package's checks, which the library's type inference uses.
    const tag = (value) => Object.prototype.toString.call(value);
    const isObject = (value) => tag(value) === '[object Object]';

    // ---------------------------------------------------------------- values
    // big.js 6's `Big` as far as the library's NUMERIC values use it: the coefficient's digits `c`,
    // the exponent `e` and the sign `s` (big.js' `parse`), and the text (`toString`, `toJSON`,
    // `valueOf`: big.js' `stringify`, exponential below 1e-7 and from 1e21) and `toNumber`. No
    // arithmetic.
    const DECIMAL = /^-?(\d+(\.\d*)?|\.\d+)(e[+-]?\d+)?$/i;
    class Big {
        constructor(value) {
            if (value instanceof Big) {
                this.s = value.s;
                this.e = value.e;
                this.c = value.c.slice();
                return;
            }
            let text = typeof value === 'number' && value === 0 && 1 / value < 0 ? '-0' : String(value);
            if (!DECIMAL.test(text)) throw new Error('[big.js] Invalid number');
            this.s = text.charAt(0) === '-' ? -1 : 1;
            if (this.s < 0) text = text.slice(1);
            let e = text.indexOf('.');
            if (e > -1) text = text.replace('.', '');
            let i = text.search(/e/i);
            if (i > 0) {
                if (e < 0) e = i;
                e += +text.slice(i + 1);
                text = text.substring(0, i);
            } else if (e < 0) {
                e = text.length;
            }
            let last = text.length;
            for (i = 0; i < last && text.charAt(i) === '0'; ) ++i;
            if (i === last) {
                this.c = [0];
                this.e = 0;
                return;
            }
            while (last > 0 && text.charAt(--last) === '0');
            this.e = e - i - 1;
            this.c = [];
            for (let k = 0; i <= last; ) this.c[k++] = +text.charAt(i++);
        }
        _text(exponential, nonzero) {
            let e = this.e;
            let s = this.c.join('');
            const n = s.length;
            if (exponential) {
                s = s.charAt(0) + (n > 1 ? '.' + s.slice(1) : '') + (e < 0 ? 'e' : 'e+') + e;
            } else if (e < 0) {
                for (; ++e; ) s = '0' + s;
                s = '0.' + s;
            } else if (e > 0) {
                if (++e > n) {
                    for (e -= n; e--; ) s += '0';
                } else if (e < n) {
                    s = s.slice(0, e) + '.' + s.slice(e);
                }
            } else if (n > 1) {
                s = s.charAt(0) + '.' + s.slice(1);
            }
            return this.s < 0 && nonzero ? '-' + s : s;
        }
        toString() {
            return this._text(this.e <= -7 || this.e >= 21, !!this.c[0]);
        }
        toJSON() {
            return this.toString();
        }
        valueOf() {
            return this._text(this.e <= -7 || this.e >= 21, true);
        }
        toNumber() {
            return Number(this._text(true, true));
        }
    }

    class BigQueryDate {
        constructor(value) {
            if (typeof value === 'object') value = BigQuery.datetime(value).value;
            this.value = value;
        }
    }
    class Geography {
        constructor(value) {
            this.value = value;
        }
    }
    class BigQueryTimestamp {
        constructor(value) {
            this.value = new Date(value).toJSON();
        }
    }
    class BigQueryDatetime {
        constructor(value) {
            if (typeof value === 'object') {
                const time = value.hours ? ' ' + BigQuery.time(value).value : '';
                value = `${value.year}-${value.month}-${value.day}${time}`;
            } else {
                value = String(value).replace(/^(.*)T(.*)Z$/, '$1 $2');
            }
            this.value = value;
        }
    }
    class BigQueryTime {
        constructor(value) {
            if (typeof value === 'object') {
                const fractional = value.fractional !== undefined ? '.' + value.fractional : '';
                value = `${value.hours}:${value.minutes || 0}:${value.seconds || 0}${fractional}`;
            }
            this.value = value;
        }
    }
    class BigQueryInt extends Number {
        constructor(value, typeCastOptions) {
            super(typeof value === 'object' ? value.integerValue : value);
            this._schemaFieldName = typeof value === 'object' ? value.schemaFieldName : undefined;
            this.value = typeof value === 'object' ? String(value.integerValue) : String(value);
            this.type = 'BigQueryInt';
            if (typeCastOptions) {
                if (typeof typeCastOptions.integerTypeCastFunction !== 'function') {
                    throw new Error('integerTypeCastFunction is not a function or was not provided.');
                }
                const fields = typeCastOptions.fields === undefined ? undefined : [].concat(typeCastOptions.fields);
                const custom = fields ? !!this._schemaFieldName && fields.includes(this._schemaFieldName) : true;
                if (custom) this.typeCastFunction = typeCastOptions.integerTypeCastFunction;
            }
        }
        valueOf() {
            if (this.typeCastFunction) {
                try {
                    return this.typeCastFunction(this.value);
                } catch (error) {
                    error.message = `integerTypeCastFunction threw an error:\n\n  - ${error.message}`;
                    throw error;
                }
            }
            return BigQuery.decodeIntegerValue_({ integerValue: this.value, schemaFieldName: this._schemaFieldName });
        }
        toJSON() {
            return { type: this.type, value: this.value };
        }
    }

    // `BigQuery.getTypeDescriptorFromProvidedType_`.
    const VALID_TYPES = ['DATE', 'DATETIME', 'TIME', 'TIMESTAMP', 'BYTES', 'NUMERIC', 'BIGNUMERIC', 'BOOL', 'INT64', 'FLOAT64', 'STRING', 'GEOGRAPHY', 'ARRAY', 'STRUCT'];
    const typeOfProvided = (provided) => {
        if (Array.isArray(provided)) return { type: 'ARRAY', arrayType: typeOfProvided(provided[0]) };
        if (isObject(provided)) {
            return { type: 'STRUCT', structTypes: Object.keys(provided).map((name) => ({ name, type: typeOfProvided(provided[name]) })) };
        }
        const upper = String(provided).toUpperCase();
        if (!VALID_TYPES.includes(upper)) throw new Error(`Invalid type provided: "${upper}"`);
        return { type: upper };
    };

    // `BigQuery.getTypeDescriptorFromValue_`.
    const typeOfValue = (value) => {
        let typeName;
        if (value === null) throw new Error("Parameter types must be provided for null values via the 'types' field in query options.");
        if (value instanceof BigQueryDate) typeName = 'DATE';
        else if (value instanceof BigQueryDatetime) typeName = 'DATETIME';
        else if (value instanceof BigQueryTime) typeName = 'TIME';
        else if (value instanceof BigQueryTimestamp) typeName = 'TIMESTAMP';
        else if (Buffer.isBuffer(value)) typeName = 'BYTES';
        else if (value instanceof Big) typeName = value.c.length - value.e >= 10 ? 'BIGNUMERIC' : 'NUMERIC';
        else if (value instanceof BigQueryInt) typeName = 'INT64';
        else if (value instanceof Geography) typeName = 'GEOGRAPHY';
        else if (Array.isArray(value)) {
            if (value.length === 0) throw new Error("Parameter types must be provided for empty arrays via the 'types' field in query options.");
            return { type: 'ARRAY', arrayType: typeOfValue(value[0]) };
        } else if (tag(value) === '[object Boolean]') typeName = 'BOOL';
        else if (tag(value) === '[object Number]') typeName = value % 1 === 0 ? 'INT64' : 'FLOAT64';
        else if (isObject(value)) {
            return { type: 'STRUCT', structTypes: Object.keys(value).map((name) => ({ name, type: typeOfValue(value[name]) })) };
        } else if (tag(value) === '[object String]') typeName = 'STRING';
        if (!typeName) throw new Error(['This value could not be translated to a BigQuery data type.', value].join('\n'));
        return { type: typeName };
    };

    // `BigQuery._getValue`: the wrappers' (and BigQueryInt's) text.
    const isCustomType = ({ type }) => type.indexOf('TIME') > -1 || type.indexOf('DATE') > -1 || type.indexOf('GEOGRAPHY') > -1 || type.indexOf('BigQueryInt') > -1;
    const parameterValueOf = (value, type) => {
        if (value === null) return null;
        if (value.type) type = value;
        return isCustomType(type) ? value.value : value;
    };

    // `BigQuery.valueToQueryParameter_`: `{parameterType, parameterValue}`.
    const toQueryParameter = (value, providedType) => {
        if (tag(value) === '[object Date]') value = new BigQueryTimestamp(value);
        const parameterType = providedType ? typeOfProvided(providedType) : typeOfValue(value);
        const parameter = { parameterType, parameterValue: {} };
        const typeName = parameterType.type;
        if (typeName === 'ARRAY') {
            parameter.parameterValue.arrayValues = value.map((item) => {
                const itemValue = parameterValueOf(item, parameterType.arrayType);
                if (isObject(itemValue) || Array.isArray(itemValue)) {
                    return (Array.isArray(providedType) ? toQueryParameter(itemValue, providedType[0]) : toQueryParameter(itemValue)).parameterValue;
                }
                return { value: itemValue };
            });
        } else if (typeName === 'STRUCT') {
            parameter.parameterValue.structValues = Object.keys(value).reduce((structValues, name) => {
                structValues[name] = (providedType ? toQueryParameter(value[name], providedType[name]) : toQueryParameter(value[name])).parameterValue;
                return structValues;
            }, {});
        } else {
            parameter.parameterValue.value = parameterValueOf(value, parameterType);
        }
        return parameter;
    };

    // `BigQuery.mergeSchemaWithRows_`: rows of `{f: [{v}]}` as objects, each value read by its
    // schema field's type.
    const mergeSchemaWithRows = (schema, rows, wrapIntegers) => {
        const convert = (field, value) => {
            if (value === null) return value;
            switch (field.type) {
                case 'BOOLEAN':
                case 'BOOL':
                    return value.toLowerCase() === 'true';
                case 'BYTES':
                    return Buffer.from(value, 'base64');
                case 'FLOAT':
                case 'FLOAT64':
                    return Number(value);
                case 'INTEGER':
                case 'INT64':
                    if (!wrapIntegers) return Number(value);
                    return typeof wrapIntegers === 'object'
                        ? new BigQueryInt({ integerValue: value, schemaFieldName: field.name }, wrapIntegers).valueOf()
                        : new BigQueryInt(value);
                case 'NUMERIC':
                case 'BIGNUMERIC':
                    return new Big(value);
                case 'RECORD':
                    return mergeSchemaWithRows(field, value, wrapIntegers).pop();
                case 'DATE':
                    return new BigQueryDate(value);
                case 'DATETIME':
                    return new BigQueryDatetime(value);
                case 'TIME':
                    return new BigQueryTime(value);
                case 'TIMESTAMP':
                    return new BigQueryTimestamp(new Date(value * 1000));
                case 'GEOGRAPHY':
                    return new Geography(value);
                default:
                    return value;
            }
        };
        const list = Array.isArray(rows) ? rows : rows === null || rows === undefined ? [] : [rows];
        return list.map((row) => {
            const merged = {};
            row.f.forEach((cell, index) => {
                const field = schema.fields[index];
                merged[field.name] = field.mode === 'REPEATED' ? cell.v.map((item) => convert(field, item.v)) : convert(field, cell.v);
            });
            return merged;
        });
    };

    // @google-cloud/paginator 3's `run_` over `page(query)`, a promise of `[results, nextQuery,
    // response]`: every page's results concatenated (`[results]`), or the one page when the query
    // has `autoPaginate: false` or `maxResults` (`pageSize`); at most `maxApiCalls` pages.
    const paginate = (page, args) => {
        const callback = callbackOf(args);
        let query = isObject(args[0]) ? Object.assign({}, args[0]) : {};
        let maxResults = -1;
        let maxApiCalls = -1;
        if (query.maxResults && typeof query.maxResults === 'number') maxResults = query.maxResults;
        else if (typeof query.pageSize === 'number') maxResults = query.pageSize;
        if (query.maxApiCalls && typeof query.maxApiCalls === 'number') {
            maxApiCalls = query.maxApiCalls;
            delete query.maxApiCalls;
        }
        if (maxResults !== -1 || query.autoPaginate === false) return settle(page(query), callback);
        const all = async () => {
            let results = [];
            for (let calls = 1; query; calls++) {
                const [pageResults, nextQuery] = await page(query);
                results = results.concat(pageResults);
                query = maxApiCalls !== -1 && calls >= maxApiCalls ? null : nextQuery;
            }
            return [results];
        };
        return settle(all(), callback);
    };
    // A page's `nextQuery`: `query` with the answer's `nextPageToken`, or null on the last page.
    const nextPageOf = (query, response) => (response.nextPageToken ? Object.assign({}, query, { pageToken: response.nextPageToken }) : null);

    // `BigQuery.createQueryJob`'s job body for `opts` (a query or its options).
    const queryJobOf = (opts) => {
        const options = isObject(opts) ? opts : { query: opts };
        if (!options.query && !options.pageToken) throw new Error('A SQL query string is required.');
        const query = Object.assign({ useLegacySql: false }, options);
        if (options.destination) {
            if (!(options.destination instanceof Table)) throw new Error('Destination must be a Table object.');
            query.destinationTable = { datasetId: options.destination.dataset.id, projectId: options.destination.dataset.bigQuery.projectId, tableId: options.destination.id };
            delete query.destination;
        }
        if (query.params) {
            const { params, types } = query;
            query.parameterMode = Array.isArray(params) ? 'positional' : 'named';
            if (query.parameterMode === 'named') {
                if (types && !isObject(types)) throw new Error('Provided types must match the value type passed to `params`');
                query.queryParameters = Object.keys(params).map((name) => {
                    const parameter = toQueryParameter(params[name], types ? types[name] : undefined);
                    parameter.name = name;
                    return parameter;
                });
            } else {
                if (types && !Array.isArray(types)) throw new Error('Provided types must match the value type passed to `params`');
                if (types && params.length !== types.length) throw new Error('Incorrect number of parameter types provided.');
                query.queryParameters = params.map((value, i) => toQueryParameter(value, types ? types[i] : undefined));
            }
            delete query.params;
        }
        const body = { configuration: { query } };
        if (typeof query.jobTimeoutMs === 'number') {
            body.configuration.jobTimeoutMs = query.jobTimeoutMs;
            delete query.jobTimeoutMs;
        }
        for (const [name, target] of [['dryRun', body.configuration], ['labels', body.configuration], ['jobPrefix', body], ['location', body], ['jobId', body]]) {
            if (query[name]) {
                target[name] = query[name];
                delete query[name];
            }
        }
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
        job(id, options) {
            return new Job(this, id, this.location ? Object.assign({ location: this.location }, options) : options);
        }
        createDataset(id, ...args) {
            const options = plain(optionsOf(args[0])) || {};
            const body = Object.assign({ location: this.location }, options, {
                datasetReference: Object.assign({}, options.datasetReference, { datasetId: id }),
            });
            const promise = this._request('POST', '/datasets', body).then((response) => {
                const dataset = this.dataset(id);
                dataset.metadata = response;
                return [dataset, response];
            });
            return settle(promise, callbackOf(args));
        }
        getDatasets(...args) {
            const page = (query) =>
                this._request('GET', '/datasets', undefined, query).then((response) => {
                    const datasets = (Array.isArray(response.datasets) ? response.datasets : []).map((metadata) => {
                        const dataset = this.dataset(String((metadata.datasetReference || {}).datasetId), { location: metadata.location });
                        dataset.metadata = metadata;
                        return dataset;
                    });
                    return [datasets, nextPageOf(query, response), response];
                });
            return paginate(page, args);
        }
        createJob(options, ...args) {
            return settle(this._createJob(optionsOf(options)), callbackOf(args));
        }
        // `createJob`: jobs.insert with a new job id (`jobPrefix` + a UUID) unless one is given;
        // a 409 for a job id of its own is a retried insert whose job is read back.
        async _createJob(options) {
            const jobIdProvided = options.jobId !== undefined;
            const dryRun = !!(options.configuration && options.configuration.dryRun);
            const body = Object.assign({}, options);
            let jobId = jobIdProvided ? body.jobId : crypto.randomUUID();
            delete body.jobId;
            if (body.jobPrefix) {
                jobId = body.jobPrefix + jobId;
                delete body.jobPrefix;
            }
            body.jobReference = { projectId: this.projectId, jobId, location: this.location };
            if (options.location) {
                body.jobReference.location = options.location;
                delete body.location;
            }
            const job = this.job(jobId, { location: body.jobReference.location });
            let response;
            try {
                response = await this._request('POST', '/jobs', body);
            } catch (error) {
                if (!(error && error.code === 409 && !jobIdProvided && !dryRun)) throw error;
                [response] = await job.getMetadata();
            }
            if (response.jobReference) job.location = response.jobReference.location;
            job.metadata = response;
            if (response.status && response.status.errors) {
                throw new ApiError({ errors: response.status.errors, response });
            }
            return [job, response];
        }
        createQueryJob(opts, ...args) {
            const callback = callbackOf(args);
            let body;
            try {
                body = queryJobOf(opts);
            } catch (error) {
                if (callback) throw error;
                return Promise.reject(error);
            }
            return settle(this._createJob(body), callback);
        }
        // `query`: the query job, then its results (`getQueryResults`, paginated) once complete.
        query(query, ...args) {
            const callback = callbackOf(args);
            const options = isObject(args[0]) ? args[0] : {};
            const run = async () => {
                const [job, response] = await this.createQueryJob(query);
                if (isObject(query) && query.dryRun) return [[], response];
                return job.getQueryResults(Object.assign({ job }, options));
            };
            return settle(run(), callback);
        }
        static date(value) {
            return new BigQueryDate(value);
        }
        static datetime(value) {
            return new BigQueryDatetime(value);
        }
        static time(value) {
            return new BigQueryTime(value);
        }
        static timestamp(value) {
            return new BigQueryTimestamp(value);
        }
        static int(value, typeCastOptions) {
            return new BigQueryInt(value, typeCastOptions);
        }
        static geography(value) {
            return new Geography(value);
        }
        date(value) {
            return BigQuery.date(value);
        }
        datetime(value) {
            return BigQuery.datetime(value);
        }
        time(value) {
            return BigQuery.time(value);
        }
        timestamp(value) {
            return BigQuery.timestamp(value);
        }
        int(value, typeCastOptions) {
            return BigQuery.int(value, typeCastOptions);
        }
        geography(value) {
            return BigQuery.geography(value);
        }
        static decodeIntegerValue_(value) {
            const number = Number(value.integerValue);
            if (!Number.isSafeInteger(number)) {
                throw new Error(
                    'We attempted to return all of the numeric values, but ' +
                        (value.schemaFieldName ? value.schemaFieldName + ' ' : '') +
                        'value ' +
                        value.integerValue +
                        " is out of bounds of 'Number.MAX_SAFE_INTEGER'.\n" +
                        "To prevent this error, please consider passing 'options.wrapNumbers' as\n" +
                        '{\n' +
                        '  integerTypeCastFunction: provide <your_custom_function>\n' +
                        '  fields: optionally specify field name(s) to be custom casted\n' +
                        '}\n'
                );
            }
            return number;
        }
        static mergeSchemaWithRows_(schema, rows, wrapIntegers) {
            return mergeSchemaWithRows(schema, rows, wrapIntegers);
        }
        static valueToQueryParameter_(value, providedType) {
            return toQueryParameter(value, providedType);
        }
        static getTypeDescriptorFromValue_(value) {
            return typeOfValue(value);
        }
        static getTypeDescriptorFromProvidedType_(providedType) {
            return typeOfProvided(providedType);
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
        create(...args) {
            const options = Object.assign({}, optionsOf(args[0]));
            if (this.location !== undefined) options.location = this.location;
            const promise = this.bigQuery.createDataset(this.id, options).then(([dataset, response]) => {
                this.metadata = dataset.metadata;
                return [this, response];
            });
            return settle(promise, callbackOf(args));
        }
        delete(...args) {
            const query = { deleteContents: !!optionsOf(args[0]).force };
            return settle(this.bigQuery._request('DELETE', this._path, undefined, query).then((response) => [response]), callbackOf(args));
        }
        getTables(...args) {
            const page = (query) =>
                this.bigQuery._request('GET', this._path + '/tables', undefined, query).then((response) => {
                    const tables = (Array.isArray(response.tables) ? response.tables : []).map((metadata) => {
                        const table = this.table(String((metadata.tableReference || {}).tableId), { location: metadata.location });
                        table.metadata = metadata;
                        return table;
                    });
                    return [tables, nextPageOf(query, response), response];
                });
            return paginate(page, args);
        }
        // The query's options with this dataset as the default one (and its location).
        _queryOptions(options) {
            const query = Object.assign({}, typeof options === 'string' ? { query: options } : optionsOf(options));
            query.defaultDataset = Object.assign({}, query.defaultDataset, { datasetId: this.id });
            if (this.location !== undefined) query.location = this.location;
            return query;
        }
        createQueryJob(options, ...args) {
            return this.bigQuery.createQueryJob(this._queryOptions(options), ...args);
        }
        query(options, ...args) {
            return this.bigQuery.query(this._queryOptions(options), ...args);
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
        setMetadata(metadata, ...args) {
            const promise = this.bigQuery._request('PATCH', this._path, formatMetadata(metadata)).then((response) => {
                this.metadata = response;
                return [response, response];
            });
            return settle(promise, callbackOf(args));
        }
        create(...args) {
            return settle(this.dataset.createTable(this.id, optionsOf(args[0])), callbackOf(args));
        }
        delete(...args) {
            return settle(this.bigQuery._request('DELETE', this._path).then((response) => [response]), callbackOf(args));
        }
        query(query, ...args) {
            return this.dataset.query(query, ...args);
        }
        insert(rows, ...args) {
            const options = optionsOf(args[0]);
            return settle(this._insertAndCreateTable(rows, options), callbackOf(args));
        }
        // With a `schema`, a table that is not there (404) is created (one another made meanwhile,
        // 409, will do) and the insert tried again a minute later, as long as it takes.
        async _insertAndCreateTable(rows, options) {
            for (;;) {
                try {
                    return await this._insertWithRetry(rows, options);
                } catch (error) {
                    if (!error || error.code !== 404 || !options.schema) throw error;
                }
                try {
                    await this.create({ schema: options.schema });
                } catch (error) {
                    if (!error || error.code !== 409) throw error;
                }
                await sleep(CREATE_TABLE_WAIT_MS);
            }
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


    // A job (@google-cloud/common's `Operation`): its metadata, its query results, and the
    // `complete`/`error` events (polled every 500 ms while a `complete` listener waits).
    class Job extends EventEmitter {
        constructor(bigQuery, id, options) {
            super();
            this.bigQuery = bigQuery;
            this.id = id;
            this.metadata = {};
            this.location = optionsOf(options).location;
            this._polling = false;
            this.on('newListener', (event) => {
                if (event === 'complete' && !this._polling) {
                    this._polling = true;
                    // After the listener is added (`newListener` comes first).
                    Promise.resolve().then(() => this._startPolling());
                }
            });
        }
        get _path() {
            return '/jobs/' + segment(this.id);
        }
        get _metadataQuery() {
            return { location: this.location };
        }
        cancel(...args) {
            const query = this.location ? { location: this.location } : undefined;
            return settle(this.bigQuery._request('POST', this._path + '/cancel', undefined, query).then((response) => [response]), callbackOf(args));
        }
        getQueryResults(...args) {
            return paginate((query) => this._queryResults(query), args);
        }
        // One `jobs.getQueryResults` page: `[rows, nextQuery, response]`; an incomplete job's next
        // query is the same one (polling), unless `timeoutMs` was given.
        async _queryResults(options) {
            const query = Object.assign({ location: this.location }, options);
            const wrapIntegers = query.wrapIntegers ? query.wrapIntegers : false;
            delete query.wrapIntegers;
            delete query.job;
            delete query.autoPaginate;
            const timeoutOverride = typeof query.timeoutMs === 'number' ? query.timeoutMs : false;
            const response = await this.bigQuery._request('GET', '/queries/' + segment(this.id), undefined, query);
            const rows = response.schema && response.rows ? mergeSchemaWithRows(response.schema, response.rows, wrapIntegers) : [];
            let nextQuery = null;
            if (response.jobComplete === false) {
                nextQuery = Object.assign({}, options);
                if (timeoutOverride) throw new Error(`The query did not complete before ${timeoutOverride}ms`);
            } else if (response.pageToken) {
                nextQuery = Object.assign({}, options, { pageToken: response.pageToken });
            }
            return [rows, nextQuery, response];
        }
        // `Job.poll_`: the metadata once the job is `DONE`, null before; its `errorResult` as an
        // `ApiError` of its status.
        async _poll() {
            const [metadata] = await this.getMetadata();
            const status = metadata && metadata.status;
            if (status && status.errorResult) throw new ApiError(status);
            return status && status.state === 'DONE' ? metadata : null;
        }
        async _startPolling() {
            try {
                while (this.listenerCount('complete') > 0) {
                    const metadata = await this._poll();
                    if (metadata) {
                        this._polling = false;
                        this.emit('complete', metadata);
                        return;
                    }
                    await sleep(POLL_INTERVAL_MS);
                }
                this._polling = false;
            } catch (error) {
                this._polling = false;
                if (this.listenerCount('error') > 0) this.emit('error', error);
            }
        }
        promise() {
            return new Promise((resolve, reject) => {
                this.on('error', reject).on('complete', (metadata) => resolve([metadata]));
            });
        }
    }

    // `getMetadata`, `get` and `exists` of a resource at `this._path` (the library's ServiceObject),
    // read with the query `this._metadataQuery` when the class has one; methods as a class's own
    // (not enumerable).
    const serviceObjectMethods = {
        getMetadata(...args) {
            const promise = this.bigQuery._request('GET', this._path, undefined, this._metadataQuery).then((response) => {
                this.metadata = response;
                return [response, response];
            });
            return settle(promise, callbackOf(args));
        },
        get(...args) {
            return settle(this.getMetadata().then(([metadata]) => [this, metadata]), callbackOf(args));
        },
        exists(...args) {
            return settle(existsOf(this), callbackOf(args));
        },
    };
    for (const Class of [Dataset, Table, Job]) {
        for (const [name, method] of Object.entries(serviceObjectMethods)) {
            Object.defineProperty(Class.prototype, name, { value: method, writable: true, configurable: true });
        }
    }

    const util = { ApiError, PartialFailureError };
    const exports = {
        BigQuery,
        Dataset,
        Table,
        Job,
        BigQueryDate,
        BigQueryDatetime,
        BigQueryTime,
        BigQueryTimestamp,
        BigQueryInt,
        Geography,
        ApiError,
        PartialFailureError,
        util,
    };
    exports.default = exports;
    return exports;
})

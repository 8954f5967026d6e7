// `aws-sdk` (v2, as the reference's 2.927.0) for plugins: `S3` (putObject, getObject, headObject,
// deleteObject, listObjects(V2), listBuckets, create/head/deleteBucket, the multipart calls and
// `upload`, aws-sdk's ManagedUpload) and `Kinesis` (describeStream, getShardIterator, getRecords,
// putRecord(s), listShards, listStreams, create/deleteStream), with `AWS.config`, `Credentials`
// and `Endpoint`. Every request is made by the host (plugins/extensions/aws.rs: endpoints,
// Signature V4, aws-sdk's retries, the network policy); this file gives them aws-sdk's shape:
// `AWS.Request` (callback, `.send()`, `.promise()`, `on('success' | 'error' | 'complete')`),
// outputs with `Date`s and `Buffer`s, and errors with `code`, `statusCode`, `retryable`, ….
// Credentials come from the client's or `AWS.config`'s options only: never from the environment,
// files or a metadata service. Written for this sandbox after aws-sdk's documented behaviour.
(function (internals) {
    'use strict';
    const { hostCall, Buffer } = internals;

    // ---------------------------------------------------------------- errors
    // As `AWS.util.error` makes them: enumerable `message` (null when the service gave none) and
    // `code`, `name` (= code) not enumerable, `time`.
    const awsError = (fields) => {
        const e = new Error(fields.message === null || fields.message === undefined ? '' : String(fields.message));
        Object.defineProperty(e, 'message', { value: fields.message === undefined ? null : fields.message, enumerable: true, writable: true, configurable: true });
        for (const key of Object.keys(fields)) {
            if (key === 'message') continue;
            e[key] = key === 'originalError' && fields[key] && typeof fields[key] === 'object' ? awsError(fields[key]) : fields[key];
        }
        Object.defineProperty(e, 'name', { value: String(fields.code || 'Error'), enumerable: false, writable: true, configurable: true });
        e.time = new Date();
        return e;
    };
    const paramError = (code, message) => awsError({ message, code });

    // ---------------------------------------------------------------- configuration
    class Credentials {
        constructor(accessKeyId, secretAccessKey, sessionToken) {
            if (accessKeyId && typeof accessKeyId === 'object') {
                const options = accessKeyId.credentials || accessKeyId;
                accessKeyId = options.accessKeyId;
                secretAccessKey = options.secretAccessKey;
                sessionToken = options.sessionToken;
            }
            this.expired = false;
            this.expireTime = null;
            this.refreshCallbacks = [];
            this.accessKeyId = accessKeyId;
            this.secretAccessKey = secretAccessKey;
            this.sessionToken = sessionToken;
        }
        needsRefresh() {
            return false;
        }
        get(callback) {
            if (typeof callback === 'function') callback(null);
        }
        getPromise() {
            return Promise.resolve();
        }
        refresh(callback) {
            this.expired = false;
            if (typeof callback === 'function') callback(null);
        }
        refreshPromise() {
            return Promise.resolve();
        }
    }

    class Endpoint {
        constructor(endpoint, config) {
            let text = String(endpoint);
            if (!/^[a-z][a-z0-9+.-]*:\/\//i.test(text)) {
                const ssl = !config || config.sslEnabled === undefined || config.sslEnabled;
                text = (ssl ? 'https' : 'http') + '://' + text;
            }
            const url = new URL(text);
            this.protocol = url.protocol;
            this.hostname = url.hostname;
            this.port = url.port ? Number(url.port) : url.protocol === 'https:' ? 443 : 80;
            this.host = url.port ? url.hostname + ':' + url.port : url.hostname;
            this.path = url.pathname;
            this.pathname = url.pathname;
            this.href = url.href;
        }
    }

    const CONFIG_KEYS = [
        'credentials', 'region', 'endpoint', 'sslEnabled', 's3ForcePathStyle', 's3BucketEndpoint', 'maxRetries',
        'retryDelayOptions', 'httpOptions', 'signatureVersion', 'apiVersion', 'apiVersions', 'params', 'logger',
        'computeChecksums', 'paramValidation', 'correctClockSkew', 'convertResponseTypes', 'maxRedirects',
        's3DisableBodySigning', 's3UsEast1RegionalEndpoint', 'useAccelerateEndpoint', 'useDualstack',
        'useDualstackEndpoint', 'useFipsEndpoint', 'customUserAgent', 'systemClockOffset', 'hostPrefixEnabled',
        'stsRegionalEndpoints', 'endpointDiscoveryEnabled', 'signatureCache', 'dynamoDbCrc32', 'accessKeyId',
        'secretAccessKey', 'sessionToken', 's3', 'kinesis',
    ];
    class Config {
        constructor(options) {
            this.credentials = null;
            this.region = undefined;
            this.sslEnabled = true;
            this.maxRetries = undefined;
            this.update(options || {});
        }
        update(options, allowUnknownKeys) {
            options = options || {};
            for (const key of Object.keys(options)) {
                if (key === 'accessKeyId' || key === 'secretAccessKey' || key === 'sessionToken') continue;
                if (allowUnknownKeys || CONFIG_KEYS.includes(key)) this[key] = options[key];
            }
            if (options.accessKeyId !== undefined || options.secretAccessKey !== undefined || options.sessionToken !== undefined) {
                this.credentials = new Credentials(options.accessKeyId, options.secretAccessKey, options.sessionToken);
            }
        }
        getCredentials(callback) {
            const c = this.credentials;
            const error = c && c.accessKeyId && c.secretAccessKey ? null : missingCredentials();
            if (typeof callback === 'function') callback(error, error ? null : c);
        }
        loadFromPath() {
            throw new Error('AWS.config.loadFromPath is not available in plugins: pass the credentials in the client options');
        }
        setPromisesDependency() {}
        getPromisesDependency() {
            return Promise;
        }
    }
    const missingCredentials = () =>
        awsError({ message: 'Missing credentials in config, if using AWS_CONFIG_FILE, set AWS_SDK_LOAD_CONFIG=1', code: 'CredentialsError' });
    // `AWS.config`: shared by the clients this plugin makes (one per VM, as a module is).
    const globalConfig = new Config();

    // ---------------------------------------------------------------- values crossing to the host
    const toBytes = (value) => {
        if (typeof value === 'string') return Buffer.from(value, 'utf8');
        if (value instanceof Uint8Array) return value;
        if (value instanceof ArrayBuffer) return new Uint8Array(value);
        if (ArrayBuffer.isView(value)) return new Uint8Array(value.buffer, value.byteOffset, value.byteLength);
        return null;
    };
    const base64 = (bytes) => (bytes instanceof Buffer ? bytes : Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength)).toString('base64');
    const isStream = (value) => value && typeof value === 'object' && typeof value.on === 'function' && (typeof value.pipe === 'function' || typeof value.read === 'function');
    // A readable stream's bytes (aws-sdk reads a stream Body to its end).
    const readStream = (stream) =>
        new Promise((resolve, reject) => {
            const chunks = [];
            stream.on('data', (chunk) => {
                const bytes = toBytes(chunk);
                if (bytes) chunks.push(bytes);
            });
            stream.on('end', () => resolve(Buffer.concat(chunks)));
            stream.on('error', reject);
            if (typeof stream.resume === 'function') stream.resume();
        });
    const bodyBytes = async (body) => {
        if (body === undefined || body === null) return null;
        const bytes = toBytes(body);
        if (bytes) return bytes;
        if (isStream(body)) return readStream(body);
        throw paramError('InvalidParameterType', 'Expected params.Body to be a string, Buffer, Stream, Blob, or typed array object');
    };
    // Output members that are dates (ISO strings or, from JSON services, epoch seconds) or bytes.
    const DATE_KEYS = new Set(['LastModified', 'Expires', 'CreationDate', 'AbortDate', 'ObjectLockRetainUntilDate', 'Initiated', 'StreamCreationTimestamp', 'ApproximateArrivalTimestamp']);
    const revive = (value, blobKeys) => {
        if (Array.isArray(value)) return value.map((item) => revive(item, blobKeys));
        if (!value || typeof value !== 'object') return value;
        for (const key of Object.keys(value)) {
            const member = value[key];
            if (DATE_KEYS.has(key) && (typeof member === 'string' || typeof member === 'number')) {
                value[key] = new Date(typeof member === 'number' ? member * 1000 : member);
            } else if (blobKeys.has(key) && typeof member === 'string') {
                value[key] = Buffer.from(member, 'base64');
            } else {
                value[key] = revive(member, blobKeys);
            }
        }
        return value;
    };
    // Params as JSON for the host: Dates as ISO strings (their toJSON), nothing a plugin could
    // not have sent to aws-sdk.
    const plainParams = (params) => {
        if (params === undefined || params === null) return {};
        if (typeof params !== 'object' || Array.isArray(params)) throw paramError('InvalidParameterType', 'Expected params to be a structure');
        return params;
    };

    // ---------------------------------------------------------------- AWS.Request
    class Response {
        constructor(request) {
            this.request = request;
            this.data = null;
            this.error = null;
            this.retryCount = 0;
            this.redirectCount = 0;
            this.httpResponse = { statusCode: undefined, headers: {}, body: undefined };
        }
    }
    class Request {
        constructor(service, operation, params, perform) {
            this.service = service;
            this.operation = operation;
            this.params = params;
            this.httpRequest = { endpoint: null, path: '/', method: undefined };
            this.response = new Response(this);
            this._perform = perform;
            this._promise = null;
            this._listeners = {};
        }
        on(event, listener) {
            (this._listeners[event] = this._listeners[event] || []).push(listener);
            return this;
        }
        _emit(event, args) {
            for (const listener of this._listeners[event] || []) listener.apply(this.response, args);
        }
        _start() {
            if (!this._promise) {
                this._promise = Promise.resolve()
                    .then(() => this._perform(this))
                    .then(
                        (data) => {
                            this.response.data = data;
                            this._emit('success', [this.response]);
                            this._emit('complete', [this.response]);
                            return data;
                        },
                        (error) => {
                            this.response.error = error;
                            this._emit('error', [error, this.response]);
                            this._emit('complete', [this.response]);
                            throw error;
                        },
                    );
                internals.quiet(this._promise);
            }
            return this._promise;
        }
        send(callback) {
            const done = this._start();
            if (typeof callback === 'function') {
                done.then(
                    (data) => callback.call(this.response, null, data),
                    (error) => callback.call(this.response, error, null),
                );
            }
            return this.response;
        }
        promise() {
            return this._start().then((data) => {
                if (data && typeof data === 'object') Object.defineProperty(data, '$response', { value: this.response, enumerable: false, configurable: true });
                return data;
            });
        }
        abort() {
            this._aborted = true;
            return this;
        }
        createReadStream() {
            throw new Error("request.createReadStream() is not available in plugins: use getObject(...).promise() and the Body Buffer");
        }
        eachPage() {
            throw new Error('request.eachPage() is not available in plugins: page with the output tokens');
        }
    }

    // ---------------------------------------------------------------- services
    const hostConfig = (config) => {
        const credentials = config.credentials || {};
        const options = {
            accessKeyId: credentials.accessKeyId,
            secretAccessKey: credentials.secretAccessKey,
            sessionToken: credentials.sessionToken,
            region: config.region,
            endpoint: config.endpoint === undefined || config.endpoint === null ? undefined : config.endpoint instanceof Endpoint ? config.endpoint.href : String(config.endpoint),
            sslEnabled: config.sslEnabled,
            s3ForcePathStyle: !!config.s3ForcePathStyle,
            s3BucketEndpoint: !!config.s3BucketEndpoint,
            maxRetries: config.maxRetries,
            retryBase: config.retryDelayOptions && config.retryDelayOptions.base,
        };
        for (const key of Object.keys(options)) if (options[key] === undefined) delete options[key];
        return options;
    };

    class Service {
        constructor(name, options) {
            options = options || {};
            // The global config, its per-service section (`AWS.config.s3`), then the options.
            this.config = new Config();
            this.config.update(globalConfig, true);
            if (globalConfig[name] && typeof globalConfig[name] === 'object') this.config.update(globalConfig[name]);
            this.config.update(options);
            if (!this.config.credentials && globalConfig.credentials) this.config.credentials = globalConfig.credentials;
            this.serviceIdentifier = name;
            this.endpoint = this.config.endpoint ? new Endpoint(this.config.endpoint, this.config) : null;
        }
        makeRequest(operation, params, callback) {
            if (typeof params === 'function') {
                callback = params;
                params = null;
            }
            const bound = this.config.params && typeof this.config.params === 'object' ? this.config.params : {};
            const merged = Object.assign({}, bound, plainParams(params));
            const request = new Request(this, operation, merged, (req) => this._perform(req));
            if (typeof callback === 'function') request.send(callback);
            return request;
        }
        _checkCredentials() {
            const c = this.config.credentials;
            if (!c || !c.accessKeyId || !c.secretAccessKey) throw missingCredentials();
        }
        _answer(answer, request, blobKeys) {
            if (answer && answer.error) throw awsError(answer.error);
            if (answer && answer.url) {
                const url = new URL(answer.url);
                request.httpRequest.endpoint = new Endpoint(url.origin);
                request.httpRequest.path = url.pathname;
            }
            return revive(answer ? answer.data : {}, blobKeys);
        }
    }

    const S3_OPERATIONS = [
        'putObject', 'getObject', 'headObject', 'deleteObject', 'listObjects', 'listObjectsV2', 'listBuckets',
        'createBucket', 'headBucket', 'deleteBucket', 'createMultipartUpload', 'uploadPart',
        'completeMultipartUpload', 'abortMultipartUpload',
    ];
    const WITH_BODY = new Set(['putObject', 'uploadPart']);
    const S3_BLOBS = new Set(['Body']);
    class S3 extends Service {
        constructor(options) {
            super('s3', options);
        }
        async _perform(request) {
            this._checkCredentials();
            const params = Object.assign({}, request.params);
            let body = null;
            if (WITH_BODY.has(request.operation) && params.Body !== undefined) {
                const bytes = await bodyBytes(params.Body);
                body = bytes === null ? null : base64(bytes);
                delete params.Body;
            }
            const answer = await hostCall('aws.s3', [hostConfig(this.config), request.operation, params, body]);
            return this._answer(answer, request, S3_BLOBS);
        }
        // `s3.upload(params, [options], [callback])`: aws-sdk's ManagedUpload.
        upload(params, options, callback) {
            if (typeof options === 'function' && callback === undefined) {
                callback = options;
                options = null;
            }
            const upload = new ManagedUpload(Object.assign({}, options || {}, { service: this, params }));
            if (typeof callback === 'function') upload.send(callback);
            return upload;
        }
        getSignedUrl() {
            throw new Error('s3.getSignedUrl() is not available in plugins');
        }
    }
    for (const operation of S3_OPERATIONS) {
        S3.prototype[operation] = function (params, callback) {
            return this.makeRequest(operation, params, callback);
        };
    }

    const MIN_PART_SIZE = 5 * 1024 * 1024;
    class ManagedUpload {
        constructor(options) {
            options = options || {};
            this.service = options.service || new S3();
            this.params = Object.assign({}, options.params || {});
            this.partSize = Number(options.partSize) || MIN_PART_SIZE;
            if (this.partSize < MIN_PART_SIZE) throw new Error('partSize must be greater than ' + MIN_PART_SIZE);
            this.queueSize = Math.max(1, Number(options.queueSize) || 4);
            this.leavePartsOnError = !!options.leavePartsOnError;
            this.tags = options.tags;
            this._promise = null;
            this._listeners = {};
            this._aborted = false;
        }
        on(event, listener) {
            (this._listeners[event] = this._listeners[event] || []).push(listener);
            return this;
        }
        abort() {
            this._aborted = true;
        }
        send(callback) {
            const done = this._start();
            if (typeof callback === 'function') done.then((data) => callback(null, data), (error) => callback(error));
        }
        promise() {
            return this._start();
        }
        _start() {
            if (!this._promise) {
                this._promise = this._run();
                internals.quiet(this._promise);
            }
            return this._promise;
        }
        _progress(loaded, total, part) {
            for (const listener of this._listeners.httpUploadProgress || []) listener.call(this, { loaded, total, part, key: this.params.Key });
        }
        async _run() {
            const { Body, ...rest } = this.params;
            if (Body === undefined || Body === null) throw paramError('MissingRequiredParameter', 'params.Body is required');
            const body = await bodyBytes(Body);
            const service = this.service;
            const tagging = Array.isArray(this.tags) && this.tags.length > 0
                ? this.tags.map((t) => encodeURIComponent(t.Key) + '=' + encodeURIComponent(t.Value)).join('&')
                : undefined;
            if (body.length <= this.partSize) {
                const params = Object.assign({}, rest, { Body: body });
                if (tagging) params.Tagging = tagging;
                const request = service.putObject(params);
                const data = await request.promise();
                this._progress(body.length, body.length, 1);
                data.Location = request.httpRequest.endpoint.protocol + '//' + request.httpRequest.endpoint.host + request.httpRequest.path;
                data.key = rest.Key;
                data.Key = rest.Key;
                data.Bucket = rest.Bucket;
                return data;
            }
            const created = await service.createMultipartUpload(rest).promise();
            const uploadId = created.UploadId;
            const parts = [];
            const total = Math.ceil(body.length / this.partSize);
            let next = 0;
            let loaded = 0;
            const worker = async () => {
                while (next < total && !this._aborted) {
                    const index = next++;
                    const chunk = body.subarray(index * this.partSize, Math.min(body.length, (index + 1) * this.partSize));
                    const data = await service
                        .uploadPart({ Bucket: rest.Bucket, Key: rest.Key, UploadId: uploadId, PartNumber: index + 1, Body: chunk })
                        .promise();
                    parts[index] = { ETag: data.ETag, PartNumber: index + 1 };
                    loaded += chunk.length;
                    this._progress(loaded, body.length, index + 1);
                }
            };
            try {
                const workers = [];
                for (let i = 0; i < Math.min(this.queueSize, total); i++) workers.push(worker());
                await Promise.all(workers);
                if (this._aborted) throw awsError({ message: 'Request aborted by user', code: 'RequestAbortedError', retryable: false });
            } catch (error) {
                if (!this.leavePartsOnError) {
                    await service.abortMultipartUpload({ Bucket: rest.Bucket, Key: rest.Key, UploadId: uploadId }).promise().catch(() => {});
                }
                throw error;
            }
            const data = await service
                .completeMultipartUpload({ Bucket: rest.Bucket, Key: rest.Key, UploadId: uploadId, MultipartUpload: { Parts: parts } })
                .promise();
            if (data && typeof data.Location === 'string') data.Location = data.Location.replace(/%2F/g, '/');
            return data;
        }
    }
    S3.ManagedUpload = ManagedUpload;

    const KINESIS_OPERATIONS = [
        'createStream', 'deleteStream', 'describeStream', 'describeStreamSummary', 'getRecords', 'getShardIterator',
        'listShards', 'listStreams', 'putRecord', 'putRecords',
    ];
    const KINESIS_BLOBS = new Set(['Data']);
    // Blobs go as base64 in the JSON protocol (strings as their UTF-8 bytes).
    const encodeBlob = (value, path) => {
        const bytes = toBytes(value);
        if (!bytes) throw paramError('InvalidParameterType', 'Expected ' + path + ' to be a string, Buffer, Stream, Blob, or typed array object');
        return base64(bytes);
    };
    class Kinesis extends Service {
        constructor(options) {
            super('kinesis', options);
        }
        async _perform(request) {
            this._checkCredentials();
            const params = Object.assign({}, request.params);
            if (request.operation === 'putRecord' && params.Data !== undefined) params.Data = encodeBlob(params.Data, 'params.Data');
            if (request.operation === 'putRecords' && Array.isArray(params.Records)) {
                params.Records = params.Records.map((record, i) =>
                    record && record.Data !== undefined ? Object.assign({}, record, { Data: encodeBlob(record.Data, 'params.Records[' + i + '].Data') }) : record,
                );
            }
            const answer = await hostCall('aws.kinesis', [hostConfig(this.config), request.operation, params]);
            return this._answer(answer, request, KINESIS_BLOBS);
        }
    }
    for (const operation of KINESIS_OPERATIONS) {
        Kinesis.prototype[operation] = function (params, callback) {
            return this.makeRequest(operation, params, callback);
        };
    }

    // Services the reference's aws-sdk has and this one does not: constructing one says so.
    const missingService = (name) =>
        function () {
            throw new Error('AWS.' + name + ' is not available in plugins (the plugin server\'s aws-sdk has S3 and Kinesis)');
        };
    const AWS = {
        S3,
        Kinesis,
        Config,
        config: globalConfig,
        Credentials,
        Endpoint,
        Request,
        Response,
        Service,
        VERSION: '2.927.0',
    };
    for (const name of ['DynamoDB', 'SQS', 'SNS', 'Firehose', 'Lambda', 'STS', 'EC2', 'CloudWatch', 'CloudWatchLogs', 'SES', 'Athena', 'Glue', 'Redshift', 'RedshiftData']) {
        AWS[name] = missingService(name);
    }
    AWS.default = AWS;
    return AWS;
})

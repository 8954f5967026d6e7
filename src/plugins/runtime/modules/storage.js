// `@google-cloud/storage` (v5, as the reference's 5.x) for plugins: `Storage` (`bucket`), `Bucket`
// (`file`, `getMetadata`, `exists`) and `File` (`save`, `createWriteStream` — a `stream.Writable`
// that uploads what was written when it ends and emits `finish` once the object is stored, or
// `error` — `getMetadata`, `exists`, `download`, `delete`), with promises of the library's result
// arrays or callbacks. Uploads are single-request media uploads (`resumable` and `validation` are
// accepted and not needed: one request, checked by its answer). Requests are made by the host
// (plugins/extensions/google.rs: the service account's token, the network policy); errors are
// @google-cloud/common's `ApiError`, or node-fetch's `FetchError` for the network. Credentials come
// from the client's `credentials` option only. Written after the library's documented behaviour.
(function (internals) {
    'use strict';
    const { Buffer, require } = internals;
    const common = require('@google-cloud/common');
    const { apiError, callbackOf, optionsOf, settle, segment, pick } = common;
    const { Writable } = require('stream');

    const SCOPES = ['https://www.googleapis.com/auth/iam', 'https://www.googleapis.com/auth/cloud-platform', 'https://www.googleapis.com/auth/devstorage.full_control'];

    class Storage {
        constructor(options) {
            options = optionsOf(options);
            this._credentials = pick(options.credentials);
            this.projectId = options.projectId || (options.credentials && options.credentials.project_id);
            this.apiEndpoint = typeof options.apiEndpoint === 'string' ? options.apiEndpoint : undefined;
            this._maxRetries = options.autoRetry === false ? 0 : typeof options.maxRetries === 'number' ? options.maxRetries : 3;
            this.scopes = SCOPES.slice();
        }
        bucket(name) {
            if (!name) throw new Error('A bucket name is needed to use Cloud Storage.');
            return new Bucket(this, String(name));
        }
        async _request(method, path, extra) {
            const answer = await common.call(this, 'storage', method, path, extra);
            if (answer.status < 200 || answer.status >= 300) throw apiError(answer.status, answer.body);
            return answer.body === '' ? {} : answer.body;
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

    class Bucket {
        constructor(storage, name) {
            this.storage = storage;
            this.name = name.replace(/^gs:\/\//, '').replace(/\/+$/, '');
            this.id = this.name;
            this.metadata = {};
        }
        file(name, options) {
            if (!name) throw new Error('A file name must be specified.');
            return new File(this, String(name), options);
        }
        getMetadata(...args) {
            const promise = this.storage._request('GET', '/storage/v1/b/' + segment(this.name)).then((response) => {
                this.metadata = response;
                return [response, response];
            });
            return settle(promise, callbackOf(args));
        }
        exists(...args) {
            return settle(existsOf(this), callbackOf(args));
        }
    }

    const bytesOf = (data) => {
        if (Buffer.isBuffer(data)) return data;
        if (data instanceof Uint8Array) return Buffer.from(data);
        if (typeof data === 'string') return Buffer.from(data);
        throw new TypeError('The "chunk" argument must be of type string or an instance of Buffer or Uint8Array.');
    };

    class File {
        constructor(bucket, name, options) {
            this.bucket = bucket;
            this.storage = bucket.storage;
            this.name = name.replace(/^\/+/, '');
            this.id = encodeURIComponent(this.name);
            this.generation = optionsOf(options).generation;
            this.metadata = {};
        }
        get _path() {
            return '/storage/v1/b/' + segment(this.bucket.name) + '/o/' + segment(this.name);
        }
        async _upload(bytes, options) {
            const metadata = optionsOf(options.metadata);
            const query = { uploadType: 'media', name: this.name };
            if (options.predefinedAcl) query.predefinedAcl = String(options.predefinedAcl);
            else if (options.public) query.predefinedAcl = 'publicRead';
            else if (options.private) query.predefinedAcl = 'private';
            if (options.gzip === true) throw new Error('The plugin server does not gzip uploads: compress the data (zlib) and set metadata.contentEncoding');
            const contentType = options.contentType || metadata.contentType || 'application/octet-stream';
            const response = await this.storage._request('POST', '/upload/storage/v1/b/' + segment(this.bucket.name) + '/o', {
                query,
                bodyBase64: bytes.toString('base64'),
                contentType: String(contentType),
            });
            this.metadata = response;
            return response;
        }
        save(data, ...args) {
            const callback = callbackOf(args);
            let promise;
            try {
                const bytes = bytesOf(data);
                promise = this._upload(bytes, optionsOf(args[0])).then(() => []);
            } catch (error) {
                promise = Promise.reject(error);
            }
            return settle(promise, callback);
        }
        createWriteStream(options) {
            options = optionsOf(options);
            const chunks = [];
            const file = this;
            return new Writable({
                write(chunk, encoding, callback) {
                    try {
                        chunks.push(typeof chunk === 'string' ? Buffer.from(chunk, encoding) : bytesOf(chunk));
                        callback();
                    } catch (error) {
                        callback(error);
                    }
                },
                final(callback) {
                    file._upload(Buffer.concat(chunks), options).then(() => callback(), (error) => callback(error));
                },
            });
        }
        getMetadata(...args) {
            const promise = this.storage._request('GET', this._path).then((response) => {
                this.metadata = response;
                return [response, response];
            });
            return settle(promise, callbackOf(args));
        }
        exists(...args) {
            return settle(existsOf(this), callbackOf(args));
        }
        download(...args) {
            const promise = common
                .call(this.storage, 'storage', 'GET', this._path, { query: { alt: 'media' }, raw: true })
                .then((answer) => {
                    if (answer.status < 200 || answer.status >= 300) throw apiError(answer.status, answer.body);
                    return [Buffer.from(answer.bodyBase64 || '', 'base64')];
                });
            return settle(promise, callbackOf(args));
        }
        delete(...args) {
            return settle(this.storage._request('DELETE', this._path).then((response) => [response]), callbackOf(args));
        }
    }

    const exports = { Storage, Bucket, File, ApiError: common.ApiError };
    exports.default = exports;
    return exports;
})

// `@google-cloud/pubsub` (v2, as the reference's 2.x) for plugins: `PubSub` (`topic`,
// `createTopic`) and `Topic` (`getMetadata`, `get`, `exists`, `create`, `delete`, `publish`,
// `publishMessage`, `publishJSON`), with promises of the library's results or callbacks. The
// library speaks gRPC; here the same calls go over Pub/Sub's REST API (`projects.topics.get`,
// `create`, `publish`), made by the host (plugins/extensions/google.rs: the service account's
// token, the network policy), and errors read as google-gax's: `5 NOT_FOUND: Resource not found
// (resource=t).` with the numeric gRPC `code` and `details`; node-fetch's `FetchError` for the
// network. Each publish is sent at once (the library batches for up to 10 ms: the same messages
// in more requests). Credentials come from the client's `credentials` option only.
(function (internals) {
    'use strict';
    const { Buffer, require } = internals;
    const common = require('@google-cloud/common');
    const { callbackOf, optionsOf, settle, pick } = common;

    const SCOPES = ['https://www.googleapis.com/auth/cloud-platform', 'https://www.googleapis.com/auth/pubsub'];
    const GRPC_CODES = {
        OK: 0, CANCELLED: 1, UNKNOWN: 2, INVALID_ARGUMENT: 3, DEADLINE_EXCEEDED: 4, NOT_FOUND: 5, ALREADY_EXISTS: 6,
        PERMISSION_DENIED: 7, RESOURCE_EXHAUSTED: 8, FAILED_PRECONDITION: 9, ABORTED: 10, OUT_OF_RANGE: 11,
        UNIMPLEMENTED: 12, INTERNAL: 13, UNAVAILABLE: 14, DATA_LOSS: 15, UNAUTHENTICATED: 16,
    };
    const STATUS_OF_HTTP = { 400: 'INVALID_ARGUMENT', 401: 'UNAUTHENTICATED', 403: 'PERMISSION_DENIED', 404: 'NOT_FOUND', 409: 'ALREADY_EXISTS', 429: 'RESOURCE_EXHAUSTED', 499: 'CANCELLED', 500: 'INTERNAL', 501: 'UNIMPLEMENTED', 503: 'UNAVAILABLE', 504: 'DEADLINE_EXCEEDED' };

    // google-gax's `GoogleError` for a REST error answer.
    const grpcError = (status, body) => {
        const e = body && typeof body === 'object' && body.error && typeof body.error === 'object' ? body.error : {};
        const name = typeof e.status === 'string' && e.status in GRPC_CODES ? e.status : STATUS_OF_HTTP[status] || 'UNKNOWN';
        const details = typeof e.message === 'string' ? e.message : typeof body === 'string' ? body : `HTTP ${status}`;
        const error = new Error(`${GRPC_CODES[name]} ${name}: ${details}`);
        error.code = GRPC_CODES[name];
        error.details = details;
        error.metadata = {};
        return error;
    };

    class PubSub {
        constructor(options) {
            options = optionsOf(options);
            this._credentials = pick(options.credentials);
            this.projectId = options.projectId || (options.credentials && options.credentials.project_id) || '{{projectId}}';
            this.apiEndpoint = typeof options.apiEndpoint === 'string' ? options.apiEndpoint : undefined;
            this._maxRetries = typeof options.maxRetries === 'number' ? options.maxRetries : 3;
            this.scopes = SCOPES.slice();
        }
        topic(name, options) {
            if (!name) throw new Error('A name must be specified for a topic.');
            return new Topic(this, String(name), options);
        }
        createTopic(name, ...args) {
            const topic = this.topic(name);
            return settle(topic.create(), callbackOf(args));
        }
        async _request(method, name, json) {
            const answer = await common.call(this, 'pubsub', method, '/v1/' + name.split('/').map(encodeURIComponent).join('/').replace(/%3A/g, ':'), { json });
            if (answer.status < 200 || answer.status >= 300) throw grpcError(answer.status, answer.body);
            return answer.body === '' ? {} : answer.body;
        }
    }

    class Topic {
        constructor(pubsub, name) {
            this.pubsub = pubsub;
            this.parent = pubsub;
            this.name = name.indexOf('/') === -1 ? `projects/${pubsub.projectId}/topics/${name}` : name;
            this.metadata = undefined;
        }
        getMetadata(...args) {
            const promise = this.pubsub._request('GET', this.name).then((response) => {
                this.metadata = response;
                return [response];
            });
            return settle(promise, callbackOf(args));
        }
        get(...args) {
            return settle(this.getMetadata().then(([metadata]) => [this, metadata]), callbackOf(args));
        }
        exists(...args) {
            const promise = this.getMetadata().then(
                () => [true],
                (error) => {
                    if (error && error.code === GRPC_CODES.NOT_FOUND) return [false];
                    throw error;
                }
            );
            return settle(promise, callbackOf(args));
        }
        create(...args) {
            const options = optionsOf(args[0]);
            const body = Object.assign({}, options.gaxOpts ? {} : options);
            const promise = this.pubsub._request('PUT', this.name, body).then((response) => {
                this.metadata = response;
                return [this, response];
            });
            return settle(promise, callbackOf(args));
        }
        delete(...args) {
            return settle(this.pubsub._request('DELETE', this.name).then((response) => [response]), callbackOf(args));
        }
        publishMessage(message, ...args) {
            const callback = callbackOf(args);
            let promise;
            message = optionsOf(message);
            if (message.json !== undefined && message.data === undefined) message = Object.assign({}, message, { data: Buffer.from(JSON.stringify(message.json)) });
            if (!(message.data instanceof Uint8Array)) {
                promise = Promise.reject(new TypeError('Data must be in the form of a Buffer.'));
            } else {
                const out = { data: Buffer.from(message.data).toString('base64') };
                if (message.attributes && typeof message.attributes === 'object') {
                    out.attributes = {};
                    for (const key of Object.keys(message.attributes)) {
                        if (typeof message.attributes[key] !== 'string') {
                            promise = Promise.reject(new TypeError(`All attributes must be in the form of a string.\n\nInvalid value of type "${typeof message.attributes[key]}" provided for "${key}".`));
                        }
                        out.attributes[key] = message.attributes[key];
                    }
                }
                if (typeof message.orderingKey === 'string' && message.orderingKey) out.orderingKey = message.orderingKey;
                promise =
                    promise ||
                    this.pubsub._request('POST', this.name + ':publish', { messages: [out] }).then((response) => {
                        const ids = Array.isArray(response.messageIds) ? response.messageIds : [];
                        return ids[0];
                    });
            }
            if (!callback) return promise;
            promise.then((id) => callback(null, id), (error) => callback(error));
        }
        publish(data, ...args) {
            const attributes = args.length && typeof args[0] === 'object' && args[0] !== null && typeof args[0] !== 'function' ? args[0] : undefined;
            return this.publishMessage({ data, attributes }, ...args.filter((arg) => typeof arg === 'function'));
        }
        publishJSON(json, ...args) {
            if (!json || typeof json !== 'object') throw new Error('First parameter should be an object.');
            return this.publish(Buffer.from(JSON.stringify(json)), ...args);
        }
    }

    const exports = { PubSub, Topic };
    exports.default = exports;
    return exports;
})

// What the `@google-cloud/*` facades share (not importable by plugins, as in the original):
// @google-cloud/common's `ApiError` and `PartialFailureError` with its `createMultiErrorMessage`,
// the host's failures as the libraries' errors (node-fetch's `FetchError` for the network), and
// one authenticated REST call through `hostCall('google.request')` (plugins/extensions/google.rs).
(function (internals) {
    'use strict';
    const { hostCall, require } = internals;
    const { FetchError } = require('node-fetch');

    // ---------------------------------------------------------------- errors
    // @google-cloud/common's `createMultiErrorMessage`.
    const multiErrorMessage = (err, errors) => {
        const messages = new Set();
        if (err.message) messages.add(err.message);
        if (errors && errors.length) {
            errors.forEach(({ message }) => messages.add(message));
        } else if (err.response && err.response.body) {
            messages.add(typeof err.response.body === 'string' ? err.response.body : JSON.stringify(err.response.body));
        } else if (!err.message) {
            messages.add('A failure occurred during this request.');
        }
        let list = Array.from(messages);
        if (list.length > 1) {
            list = list.map((message, i) => `    ${i + 1}. ${message}`);
            list.unshift('Multiple errors occurred during the request. Please see the `errors` array for complete details.\n');
            list.push('\n');
        }
        return list.join('\n');
    };

    class ApiError extends Error {
        constructor(errorBody) {
            super();
            if (typeof errorBody !== 'object') errorBody = { message: errorBody || '' };
            this.code = errorBody.code;
            this.errors = errorBody.errors;
            this.response = errorBody.response;
            this.message = multiErrorMessage(errorBody, this.errors);
        }
    }

    class PartialFailureError extends Error {
        constructor(b) {
            super();
            this.errors = b.errors;
            this.name = 'PartialFailureError';
            this.response = b.response;
            this.message = multiErrorMessage(b, this.errors);
        }
    }

    // The host's failure as the library's error.
    const hostError = (error) => {
        if (error.kind === 'fetch') {
            return error.type ? new FetchError(String(error.message), error.type, error.code ? { code: error.code } : undefined) : new TypeError(String(error.message));
        }
        const e = new Error(String(error.message));
        if (error.kind === 'auth' && error.status) {
            e.code = String(error.status);
            e.response = { status: error.status };
        }
        return e;
    };

    // An API answer that is not 2xx, as @google-cloud/common's `util.parseHttpRespBody` makes it.
    const apiError = (status, body) => {
        const response = { statusCode: status, body: typeof body === 'string' ? body : JSON.stringify(body) };
        if (body && typeof body === 'object' && body.error && typeof body.error === 'object') {
            const e = body.error;
            return new ApiError({ code: e.code === undefined ? status : e.code, message: e.message, errors: Array.isArray(e.errors) ? e.errors : [], response });
        }
        return new ApiError({ code: status, message: typeof body === 'string' && body ? body : `HTTP ${status}`, errors: [], response });
    };

    // ---------------------------------------------------------------- plumbing
    const callbackOf = (args) => (args.length && typeof args[args.length - 1] === 'function' ? args[args.length - 1] : null);
    const optionsOf = (value) => (value && typeof value === 'object' && typeof value !== 'function' ? value : {});
    // The library's promisified method: a promise of its result array, or the callback.
    const settle = (promise, callback) => {
        if (!callback) return promise;
        promise.then((result) => callback(null, ...result), (error) => callback(error, null, error && error.response));
    };
    const segment = (value) => encodeURIComponent(String(value));

    const pick = (credentials) => {
        if (!credentials || typeof credentials !== 'object') return null;
        const out = {};
        for (const key of ['client_email', 'private_key', 'private_key_id', 'token_uri']) {
            if (typeof credentials[key] === 'string') out[key] = credentials[key];
        }
        return out;
    };

    // One REST call of `client` (`{_credentials, apiEndpoint, scopes, _maxRetries}`) to `service`:
    // `{status, body}` of any HTTP answer; rejects with the library's error for the rest.
    const call = async (client, service, method, path, extra) => {
        if (!client._credentials) {
            throw new Error('Could not load the default credentials. Browse to https://cloud.google.com/docs/authentication/getting-started for more information.');
        }
        const answer = await hostCall('google.request', [
            client._credentials,
            Object.assign({ service, apiEndpoint: client.apiEndpoint, method, path, scopes: client.scopes, maxRetries: client._maxRetries }, extra || {}),
        ]);
        if (answer.error) throw hostError(answer.error);
        return answer;
    };

    return { ApiError, PartialFailureError, multiErrorMessage, hostError, apiError, callbackOf, optionsOf, settle, segment, pick, call };
})

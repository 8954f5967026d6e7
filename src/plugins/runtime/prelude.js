// The sandbox's JS surface, evaluated once per VM before the plugin code. It receives the host
// functions (Rust) as `host` and defines the frozen globals of reference 30 §5.1, the allow-listed
// modules of §5.2 and the `meta` object of §5.3. `host` itself never becomes reachable from plugin
// code. Returns the helpers the runtime needs after the plugin code ran.
(function (host, config, attachments, testEnv, testConsole) {
    'use strict';
    const G = globalThis;
    // Read-only, but configurable: a plugin's own top-level `const fetch = require('node-fetch')`
    // must still be allowed to shadow the global (it is with the reference's vm2 sandbox).
    const define = (obj, name, value) =>
        Object.defineProperty(obj, name, { value, writable: false, enumerable: false, configurable: true });
    const trimArgs = (args) => {
        let n = args.length;
        while (n > 0 && args[n - 1] === undefined) n--;
        return Array.prototype.slice.call(args, 0, n);
    };
    // Counted against the host calls in flight (set up with `fetch` below).
    let hostCall;
    const quiet = (promise) => {
        promise.catch(() => {});
        return promise;
    };
    const namedError = (name, message) => {
        const e = new Error(message);
        e.name = name;
        return e;
    };

    // ---------------------------------------------------------------- bytes
    const HEX = '0123456789abcdef';
    function toBytes(data, encoding) {
        if (data instanceof Uint8Array) return data;
        if (data instanceof ArrayBuffer) return new Uint8Array(data);
        if (ArrayBuffer.isView(data)) return new Uint8Array(data.buffer, data.byteOffset, data.byteLength);
        if (Array.isArray(data)) return Uint8Array.from(data, (x) => x & 255);
        const s = String(data);
        switch ((encoding || 'utf8').toLowerCase()) {
            case 'utf8':
            case 'utf-8':
                return new Uint8Array(host.utf8Encode(s));
            case 'hex': {
                const out = new Uint8Array(s.length >> 1);
                for (let i = 0; i < out.length; i++) {
                    const v = parseInt(s.substr(i * 2, 2), 16);
                    if (Number.isNaN(v)) return out.subarray(0, i);
                    out[i] = v;
                }
                return out;
            }
            case 'base64':
            case 'base64url':
                return new Uint8Array(host.base64Decode(s));
            case 'latin1':
            case 'binary':
            case 'ascii':
                return Uint8Array.from(s, (c) => c.charCodeAt(0) & 255);
            default:
                throw new TypeError('Unknown encoding: ' + encoding);
        }
    }
    function bytesToString(bytes, encoding) {
        switch ((encoding || 'utf8').toLowerCase()) {
            case 'utf8':
            case 'utf-8':
                return host.utf8Decode(bytes);
            case 'hex': {
                let s = '';
                for (let i = 0; i < bytes.length; i++) s += HEX[bytes[i] >> 4] + HEX[bytes[i] & 15];
                return s;
            }
            case 'base64':
                return host.base64Encode(bytes, false);
            case 'base64url':
                return host.base64Encode(bytes, true);
            case 'latin1':
            case 'binary':
            case 'ascii': {
                let s = '';
                for (let i = 0; i < bytes.length; i++) s += String.fromCharCode(bytes[i]);
                return s;
            }
            default:
                throw new TypeError('Unknown encoding: ' + encoding);
        }
    }

    class Buffer extends Uint8Array {
        static from(value, encodingOrOffset, length) {
            if (value instanceof ArrayBuffer) return new Buffer(value, encodingOrOffset || 0, length);
            const bytes = toBytes(value, encodingOrOffset);
            const out = new Buffer(bytes.length);
            out.set(bytes);
            return out;
        }
        static alloc(size, fill) {
            const out = new Buffer(size);
            if (fill !== undefined) out.fill(typeof fill === 'number' ? fill : toBytes(fill)[0] || 0);
            return out;
        }
        static allocUnsafe(size) {
            return new Buffer(size);
        }
        static isBuffer(value) {
            return value instanceof Buffer;
        }
        static byteLength(value, encoding) {
            return typeof value === 'string' ? toBytes(value, encoding).length : value.byteLength;
        }
        static concat(list, totalLength) {
            const total = totalLength === undefined ? list.reduce((n, b) => n + b.length, 0) : totalLength;
            const out = new Buffer(total);
            let offset = 0;
            for (const b of list) {
                if (offset >= total) break;
                const part = b.length > total - offset ? b.subarray(0, total - offset) : b;
                out.set(part, offset);
                offset += part.length;
            }
            return out;
        }
        toString(encoding, start, end) {
            const view = start !== undefined || end !== undefined ? this.subarray(start || 0, end) : this;
            return bytesToString(view, encoding);
        }
        toJSON() {
            return { type: 'Buffer', data: Array.from(this) };
        }
        equals(other) {
            if (this.length !== other.length) return false;
            for (let i = 0; i < this.length; i++) if (this[i] !== other[i]) return false;
            return true;
        }
        slice(start, end) {
            return this.subarray(start, end);
        }
        write(string, offset, encoding) {
            const bytes = toBytes(string, encoding);
            this.set(bytes.subarray(0, this.length - (offset || 0)), offset || 0);
            return Math.min(bytes.length, this.length - (offset || 0));
        }
    }

    class TextEncoder {
        get encoding() {
            return 'utf-8';
        }
        encode(input = '') {
            return new Uint8Array(host.utf8Encode(String(input)));
        }
    }
    class TextDecoder {
        constructor(label = 'utf-8') {
            if (!/^utf-?8$/i.test(label)) throw new RangeError('The "' + label + '" encoding is not supported');
        }
        get encoding() {
            return 'utf-8';
        }
        decode(input) {
            return input === undefined ? '' : host.utf8Decode(toBytes(input));
        }
    }

    // ---------------------------------------------------------------- URL
    // WHATWG URL and URLSearchParams as Node has them; parsing, the setters and the
    // x-www-form-urlencoded parser are the `url` crate's (host.urlParse / urlSet / formParse).
    const formEncode = (s) =>
        encodeURIComponent(s.replace(/[\uD800-\uDBFF](?![\uDC00-\uDFFF])|(?<![\uD800-\uDBFF])[\uDC00-\uDFFF]/g, '\uFFFD'))
            .replace(/[!'()~]/g, (c) => '%' + c.charCodeAt(0).toString(16).toUpperCase())
            .replace(/%20/g, '+');
    // Node's ERR_INVALID_URL: message "Invalid URL", `code` and `input` own properties, and
    // (as in the Node of the reference) `TypeError [ERR_INVALID_URL]: Invalid URL` for
    // toString() and the stack's first line.
    const invalidUrl = (input) => {
        const e = new TypeError('Invalid URL');
        e.code = 'ERR_INVALID_URL';
        e.input = input;
        const header = 'TypeError [ERR_INVALID_URL]: Invalid URL';
        Object.defineProperty(e, 'stack', { value: header + '\n' + String(e.stack || ''), writable: true, configurable: true });
        Object.defineProperty(e, 'toString', {
            value: function () {
                return this.name + ' [' + this.code + ']: ' + this.message;
            },
            writable: true,
            configurable: true,
        });
        return e;
    };
    const sameName = (p, k) => p[0] === k;
    class URLSearchParams {
        constructor(init) {
            this._list = [];
            this._url = null;
            if (init === undefined || init === null) return;
            if (typeof init === 'object' || typeof init === 'function') {
                if (typeof init[Symbol.iterator] === 'function') {
                    for (const pair of init) {
                        const items = [...pair];
                        if (items.length !== 2) throw new TypeError('Each query pair must be an iterable [name, value] tuple');
                        this._list.push([String(items[0]), String(items[1])]);
                    }
                } else {
                    for (const k of Object.keys(init)) this._list.push([k, String(init[k])]);
                }
            } else {
                this._parse(String(init));
            }
        }
        _parse(s) {
            this._list = host.formParse(s.startsWith('?') ? s.slice(1) : s);
        }
        _update() {
            if (this._url) this._url._setSearch(this.toString());
        }
        get size() {
            return this._list.length;
        }
        append(k, v) {
            this._list.push([String(k), String(v)]);
            this._update();
        }
        delete(k, v) {
            k = String(k);
            this._list = v === undefined ? this._list.filter((p) => !sameName(p, k)) : this._list.filter((p) => !(sameName(p, k) && p[1] === String(v)));
            this._update();
        }
        get(k) {
            const p = this._list.find((p) => sameName(p, String(k)));
            return p ? p[1] : null;
        }
        getAll(k) {
            return this._list.filter((p) => sameName(p, String(k))).map((p) => p[1]);
        }
        has(k, v) {
            k = String(k);
            return this._list.some((p) => sameName(p, k) && (v === undefined || p[1] === String(v)));
        }
        set(k, v) {
            k = String(k);
            const i = this._list.findIndex((p) => sameName(p, k));
            if (i < 0) this._list.push([k, String(v)]);
            else {
                this._list[i] = [k, String(v)];
                this._list = this._list.filter((p, j) => j <= i || !sameName(p, k));
            }
            this._update();
        }
        sort() {
            // Stable, by UTF-16 code units, as the standard says.
            this._list = this._list
                .map((p, i) => [p, i])
                .sort((a, b) => (a[0][0] < b[0][0] ? -1 : a[0][0] > b[0][0] ? 1 : a[1] - b[1]))
                .map((x) => x[0]);
            this._update();
        }
        forEach(fn, thisArg) {
            for (let i = 0; i < this._list.length; i++) fn.call(thisArg, this._list[i][1], this._list[i][0], this);
        }
        keys() {
            return this._list.map((p) => p[0])[Symbol.iterator]();
        }
        values() {
            return this._list.map((p) => p[1])[Symbol.iterator]();
        }
        entries() {
            return this._list.map((p) => [p[0], p[1]])[Symbol.iterator]();
        }
        [Symbol.iterator]() {
            return this.entries();
        }
        toString() {
            return this._list.map((p) => formEncode(p[0]) + '=' + formEncode(p[1])).join('&');
        }
        get [Symbol.toStringTag]() {
            return 'URLSearchParams';
        }
    }
    const URL_FIELDS = ['href', 'protocol', 'username', 'password', 'host', 'hostname', 'port', 'pathname', 'search', 'hash'];
    const parseUrl = (url, base) => {
        const input = String(url);
        const r = base === undefined ? host.urlParse(input) : host.urlParse(input, String(base));
        if (r === null) throw invalidUrl(input);
        return r;
    };
    class URL {
        constructor(url, base) {
            this._r = parseUrl(url, base);
            this._params = null;
        }
        static canParse(url, base) {
            return (base === undefined ? host.urlParse(String(url)) : host.urlParse(String(url), String(base))) !== null;
        }
        _setSearch(search) {
            this._r = host.urlSet(this._r.href, 'search', search);
        }
        get origin() {
            return this._r.origin;
        }
        get searchParams() {
            if (!this._params) {
                this._params = new URLSearchParams(this._r.search);
                this._params._url = this;
            }
            return this._params;
        }
        toString() {
            return this._r.href;
        }
        toJSON() {
            return this._r.href;
        }
        get [Symbol.toStringTag]() {
            return 'URL';
        }
    }
    for (const field of URL_FIELDS) {
        Object.defineProperty(URL.prototype, field, {
            get() {
                return this._r[field];
            },
            set(value) {
                this._r = field === 'href' ? parseUrl(value) : host.urlSet(this._r.href, field, String(value));
                if (this._params) this._params._parse(this._r.search);
            },
        });
    }
    const legacyUrlParse = (s, parseQuery) => {
        const u = new URL(s);
        const query = u.search.slice(1);
        return {
            protocol: u.protocol, slashes: true, auth: u.username ? u.username + (u.password ? ':' + u.password : '') : null,
            host: u.host, port: u.port || null, hostname: u.hostname, hash: u.hash || null, search: u.search || null,
            query: parseQuery ? Object.fromEntries(new URLSearchParams(query)) : query || null,
            pathname: u.pathname, path: u.pathname + u.search, href: u.href,
        };
    };

    // ---------------------------------------------------------------- fetch (node-fetch v2)
    // Errors as node-fetch makes them: `FetchError` with `type` (and `errno`/`code` for system
    // errors) as own enumerable properties, `name` on the prototype; `AbortError` likewise.
    function FetchError(message, type, systemError) {
        Error.call(this, message);
        this.message = message;
        this.type = type;
        if (systemError) this.code = this.errno = systemError.code;
        Object.defineProperty(this, 'stack', { value: 'FetchError: ' + message + '\n' + (new Error().stack || ''), writable: true, configurable: true });
    }
    FetchError.prototype = Object.create(Error.prototype);
    FetchError.prototype.constructor = FetchError;
    FetchError.prototype.name = 'FetchError';
    function AbortError(message) {
        Error.call(this, message);
        this.type = 'aborted';
        this.message = message;
        Object.defineProperty(this, 'stack', { value: 'AbortError: ' + message + '\n' + (new Error().stack || ''), writable: true, configurable: true });
    }
    AbortError.prototype = Object.create(Error.prototype);
    AbortError.prototype.constructor = AbortError;
    AbortError.prototype.name = 'AbortError';
    // The host reports fetch failures as `FetchError[type,code]` (the VM boundary carries a name
    // and a message); anything else passes through.
    const fromHostError = (e) => {
        const m = e && typeof e.name === 'string' && /^FetchError\[([^,\]]*),([^\]]*)\]$/.exec(e.name);
        if (!m) return e;
        return new FetchError(e.message, m[1] || undefined, m[2] ? { code: m[2] } : undefined);
    };

    // Host calls in flight per VM: a plugin that starts calls without awaiting them (a loop of
    // 100,000 fetches) is refused beyond the limit instead of exhausting sockets and memory.
    const limits = host.limits();
    let inFlight = 0;
    const tooManyMessage = () =>
        'too many host calls in flight (' + limits.maxHostCallsInFlight + ', PLUGIN_MAX_HOST_CALLS_IN_FLIGHT): await earlier calls before starting more';
    const track = (start, refuse) => {
        if (inFlight >= limits.maxHostCallsInFlight) return Promise.reject(refuse());
        inFlight++;
        let promise;
        try {
            promise = start();
        } catch (e) {
            inFlight--;
            return Promise.reject(e);
        }
        const done = () => {
            inFlight--;
        };
        promise.then(done, done);
        return promise;
    };
    hostCall = (name, args) => track(() => host.call(name, trimArgs(args)), () => new Error(tooManyMessage()));

    const INVALID_TOKEN = /[^\^_`a-zA-Z\-0-9!#$%&'*+.|~]/;
    const INVALID_HEADER_CHAR = /[^\t\x20-\x7e\x80-\xff]/;
    const validateName = (name) => {
        name = String(name);
        if (INVALID_TOKEN.test(name) || name === '') throw new TypeError(name + ' is not a legal HTTP header name');
        return name.toLowerCase();
    };
    const validateValue = (value) => {
        value = String(value);
        if (INVALID_HEADER_CHAR.test(value)) throw new TypeError(value + ' is not a legal HTTP header value');
        return value;
    };
    class Headers {
        constructor(init) {
            this._map = new Map();
            if (init === undefined || init === null) return;
            if (init instanceof Headers) {
                for (const [k, values] of init._map) this._map.set(k, values.slice());
                return;
            }
            if (typeof init !== 'object') throw new TypeError('Provided initializer must be an object');
            if (typeof init[Symbol.iterator] === 'function') {
                for (const pair of init) {
                    if (typeof pair !== 'object' || typeof pair[Symbol.iterator] !== 'function') throw new TypeError('Each header pair must be iterable');
                    const p = Array.from(pair);
                    if (p.length !== 2) throw new TypeError('Each header pair must be a name/value tuple');
                    this.append(p[0], p[1]);
                }
            } else {
                for (const k of Object.keys(init)) this.append(k, init[k]);
            }
        }
        append(k, v) {
            const key = validateName(k);
            const value = validateValue(v);
            const prev = this._map.get(key);
            if (prev) prev.push(value);
            else this._map.set(key, [value]);
        }
        set(k, v) {
            this._map.set(validateName(k), [validateValue(v)]);
        }
        get(k) {
            const v = this._map.get(validateName(k));
            return v === undefined ? null : v.join(', ');
        }
        has(k) {
            return this._map.has(validateName(k));
        }
        delete(k) {
            this._map.delete(validateName(k));
        }
        // node-fetch v2 iterates in name order.
        _pairs() {
            return Array.from(this._map.keys()).sort().map((k) => [k, this._map.get(k).join(', ')]);
        }
        forEach(fn, thisArg) {
            for (const [k, v] of this._pairs()) fn.call(thisArg, v, k, this);
        }
        keys() {
            return this._pairs().map((p) => p[0])[Symbol.iterator]();
        }
        values() {
            return this._pairs().map((p) => p[1])[Symbol.iterator]();
        }
        entries() {
            return this._pairs()[Symbol.iterator]();
        }
        [Symbol.iterator]() {
            return this.entries();
        }
        get [Symbol.toStringTag]() {
            return 'Headers';
        }
        raw() {
            const out = {};
            for (const [k, v] of this._map) out[k] = v.slice();
            return out;
        }
    }
    const bodyBytes = (body) => {
        if (body === undefined || body === null) return null;
        if (typeof body === 'string') return host.utf8Encode(body);
        if (body instanceof URLSearchParams) return host.utf8Encode(body.toString());
        if (body instanceof ArrayBuffer || ArrayBuffer.isView(body)) return toBytes(body);
        return host.utf8Encode(String(body));
    };
    class Response {
        constructor(body, init) {
            init = init || {};
            const bytes = bodyBytes(body);
            this._body = bytes === null ? Buffer.alloc(0) : Buffer.from(bytes);
            this.url = init.url || '';
            this.status = init.status || 200;
            this.statusText = init.statusText || '';
            this.headers = new Headers(init.headers);
            this.ok = this.status >= 200 && this.status < 300;
            this.redirected = !!init.redirected;
            this.bodyUsed = false;
            this.size = 0;
            this.timeout = 0;
        }
        _consume() {
            if (this.bodyUsed) return Promise.reject(new TypeError('body used already for: ' + this.url));
            this.bodyUsed = true;
            return Promise.resolve(this._body);
        }
        buffer() {
            return this._consume();
        }
        arrayBuffer() {
            return this._consume().then((b) => b.buffer.slice(b.byteOffset, b.byteOffset + b.length));
        }
        text() {
            return this._consume().then((b) => b.toString('utf8'));
        }
        textConverted() {
            return this.text();
        }
        json() {
            return this._consume().then((b) => {
                const text = b.toString('utf8');
                try {
                    return JSON.parse(text);
                } catch (e) {
                    const reason = host.jsonError(text) || e.message;
                    throw new FetchError('invalid json response body at ' + this.url + ' reason: ' + reason, 'invalid-json');
                }
            });
        }
        clone() {
            if (this.bodyUsed) throw new Error('cannot clone body after it is used');
            return new Response(this._body, { url: this.url, status: this.status, statusText: this.statusText, headers: this.headers, redirected: this.redirected });
        }
    }
    const fromHostResponse = (r, requested) => {
        let requestedHref = requested;
        try {
            requestedHref = host.urlParse(requested).href;
        } catch (e) {
            // the host accepted it, so this does not happen
        }
        return new Response(r.body, { url: r.url, status: r.status, statusText: r.statusText, headers: r.headers, redirected: r.url !== requestedHref });
    };
    const OPTIONS_HEADER = 'x-plugin-server-fetch-options';
    function fetch(url, init) {
        return new Promise((resolve, reject) => {
            init = init || {};
            const isRequest = url && typeof url === 'object' && !(url instanceof URL) && typeof url.url === 'string';
            const target = isRequest ? url.url : String(url);
            const method = String(init.method || (isRequest && url.method) || 'GET').toUpperCase();
            const headers = new Headers(init.headers || (isRequest ? url.headers : undefined));
            let body = init.body !== undefined ? init.body : isRequest ? url.body : undefined;
            if (body !== undefined && body !== null && (method === 'GET' || method === 'HEAD')) {
                throw new TypeError('Request with GET/HEAD method cannot have body');
            }
            if (body !== undefined && body !== null && !headers.has('content-type')) {
                if (typeof body === 'string') headers.set('content-type', 'text/plain;charset=UTF-8');
                else if (body instanceof URLSearchParams) headers.set('content-type', 'application/x-www-form-urlencoded;charset=UTF-8');
            }
            const options = {};
            for (const k of ['redirect', 'follow', 'timeout', 'size']) if (init[k] !== undefined) options[k] = init[k];
            headers.delete(OPTIONS_HEADER);
            if (Object.keys(options).length > 0) headers.set(OPTIONS_HEADER, JSON.stringify(options));
            const pairs = Array.from(headers._map).map(([k, v]) => [k, v.join(', ')]);
            const bytes = bodyBytes(body);
            const signal = init.signal;
            const aborted = () => new AbortError('The user aborted a request.');
            if (signal && signal.aborted) throw aborted();
            if (signal && typeof signal.addEventListener === 'function') signal.addEventListener('abort', () => reject(aborted()));
            track(
                () => host.fetch(target, method, pairs, bytes),
                () => new FetchError('request to ' + target + ' failed, reason: ' + tooManyMessage(), 'system', { code: 'ERR_PLUGIN_TOO_MANY_IN_FLIGHT' }),
            ).then(
                (r) => resolve(fromHostResponse(r, target)),
                (e) => reject(fromHostError(e)),
            );
        });
    }
    fetch.isRedirect = (code) => code === 301 || code === 302 || code === 303 || code === 307 || code === 308;

    // ---------------------------------------------------------------- crypto, zlib, jwt
    class Hash {
        constructor(make, algorithm, key) {
            this._make = make;
            this._algorithm = algorithm;
            this._key = key;
            this._chunks = [];
            make(algorithm, key, new Uint8Array(0)); // fails early on an unknown algorithm, like Node
        }
        update(data, encoding) {
            this._chunks.push(toBytes(data, encoding));
            return this;
        }
        digest(encoding) {
            const out = Buffer.from(this._make(this._algorithm, this._key, Buffer.concat(this._chunks)));
            return encoding ? out.toString(encoding) : out;
        }
    }
    // `createSign` / `createVerify` keys: a PEM string or Buffer, or `{ key, passphrase }`.
    const keyOf = (key) => {
        if (key && typeof key === 'object' && !(key instanceof Uint8Array) && key.key !== undefined) {
            return [toBytes(key.key), key.passphrase === undefined ? '' : String(key.passphrase)];
        }
        if (typeof key !== 'string' && !(key instanceof Uint8Array)) {
            throw new TypeError('The "key" argument must be of type string or an instance of Buffer, TypedArray, DataView, or KeyObject.');
        }
        return [toBytes(key), ''];
    };
    const signOf = (algorithm, data, key, outputEncoding) => {
        const [pem, passphrase] = keyOf(key);
        const out = Buffer.from(host.sign(String(algorithm), pem, passphrase, data));
        return outputEncoding ? out.toString(outputEncoding) : out;
    };
    const verifyOf = (algorithm, data, key, signature, signatureEncoding) => {
        const [pem, passphrase] = keyOf(key);
        return host.verify(String(algorithm), pem, passphrase, data, toBytes(signature, signatureEncoding));
    };
    class Sign {
        constructor(algorithm) {
            this._algorithm = String(algorithm);
            this._chunks = [];
            // An unknown digest fails here, as in Node (the empty key fails after the digest check).
            try {
                host.sign(this._algorithm, new Uint8Array(0), '', new Uint8Array(0));
            } catch (e) {
                if (e && e.message === 'Invalid digest') throw e;
            }
        }
        update(data, encoding) {
            this._chunks.push(toBytes(data, encoding));
            return this;
        }
        sign(key, outputEncoding) {
            return signOf(this._algorithm, Buffer.concat(this._chunks), key, outputEncoding);
        }
    }
    class Verify {
        constructor(algorithm) {
            this._algorithm = String(algorithm);
            this._chunks = [];
        }
        update(data, encoding) {
            this._chunks.push(toBytes(data, encoding));
            return this;
        }
        verify(key, signature, signatureEncoding) {
            return verifyOf(this._algorithm, Buffer.concat(this._chunks), key, signature, signatureEncoding);
        }
    }
    const hashOf = (algorithm, _key, data) => host.hash(String(algorithm), data);
    const hmacOf = (algorithm, key, data) => host.hmac(String(algorithm), key, data);
    const crypto = {
        createHash: (algorithm) => new Hash(hashOf, algorithm, null),
        createHmac: (algorithm, key) => new Hash(hmacOf, algorithm, toBytes(key)),
        createSign: (algorithm) => new Sign(algorithm),
        createVerify: (algorithm) => new Verify(algorithm),
        sign: (algorithm, data, key) => signOf(algorithm || 'sha256', toBytes(data), key),
        verify: (algorithm, data, key, signature) => verifyOf(algorithm || 'sha256', toBytes(data), key, signature),
        randomBytes: (size) => Buffer.from(host.randomBytes(size)),
        randomUUID: () => host.randomUUID(),
        getRandomValues: (array) => {
            const bytes = new Uint8Array(host.randomBytes(array.byteLength));
            new Uint8Array(array.buffer, array.byteOffset, array.byteLength).set(bytes);
            return array;
        },
        timingSafeEqual: (a, b) => {
            if (a.length !== b.length) throw new RangeError('Input buffers must have the same byte length');
            let diff = 0;
            for (let i = 0; i < a.length; i++) diff |= a[i] ^ b[i];
            return diff === 0;
        },
    };
    // Brotli takes Node's `{ params: { [zlib.constants.BROTLI_PARAM_QUALITY]: 4, ... } }`.
    const zlibSync = (op) => (data, options) => {
        const params = options && typeof options === 'object' && options.params && typeof options.params === 'object' ? options.params : undefined;
        return Buffer.from(params ? host.zlib(op, toBytes(data), params) : host.zlib(op, toBytes(data)));
    };
    const zlibAsync = (op) => (data, optionsOrCallback, maybeCallback) => {
        const callback = typeof optionsOrCallback === 'function' ? optionsOrCallback : maybeCallback;
        Promise.resolve().then(() => {
            let result;
            try {
                result = zlibSync(op)(data, typeof optionsOrCallback === 'function' ? undefined : optionsOrCallback);
            } catch (e) {
                callback(e);
                return;
            }
            callback(null, result);
        });
    };
    // The constants plugins pass in options (Node's values).
    const zlibConstants = Object.freeze({
        Z_NO_FLUSH: 0, Z_PARTIAL_FLUSH: 1, Z_SYNC_FLUSH: 2, Z_FULL_FLUSH: 3, Z_FINISH: 4, Z_BLOCK: 5,
        Z_OK: 0, Z_STREAM_END: 1, Z_NEED_DICT: 2, Z_ERRNO: -1, Z_STREAM_ERROR: -2, Z_DATA_ERROR: -3, Z_MEM_ERROR: -4, Z_BUF_ERROR: -5, Z_VERSION_ERROR: -6,
        Z_NO_COMPRESSION: 0, Z_BEST_SPEED: 1, Z_BEST_COMPRESSION: 9, Z_DEFAULT_COMPRESSION: -1,
        Z_FILTERED: 1, Z_HUFFMAN_ONLY: 2, Z_RLE: 3, Z_FIXED: 4, Z_DEFAULT_STRATEGY: 0,
        BROTLI_OPERATION_PROCESS: 0, BROTLI_OPERATION_FLUSH: 1, BROTLI_OPERATION_FINISH: 2, BROTLI_OPERATION_EMIT_METADATA: 3,
        BROTLI_PARAM_MODE: 0, BROTLI_MODE_GENERIC: 0, BROTLI_MODE_TEXT: 1, BROTLI_MODE_FONT: 2, BROTLI_DEFAULT_MODE: 0,
        BROTLI_PARAM_QUALITY: 1, BROTLI_MIN_QUALITY: 0, BROTLI_MAX_QUALITY: 11, BROTLI_DEFAULT_QUALITY: 11,
        BROTLI_PARAM_LGWIN: 2, BROTLI_MIN_WINDOW_BITS: 10, BROTLI_MAX_WINDOW_BITS: 24, BROTLI_LARGE_MAX_WINDOW_BITS: 30, BROTLI_DEFAULT_WINDOW: 22,
        BROTLI_PARAM_LGBLOCK: 3, BROTLI_MIN_INPUT_BLOCK_BITS: 16, BROTLI_MAX_INPUT_BLOCK_BITS: 24,
        BROTLI_PARAM_DISABLE_LITERAL_CONTEXT_MODELING: 4, BROTLI_PARAM_SIZE_HINT: 5, BROTLI_PARAM_LARGE_WINDOW: 6,
        BROTLI_PARAM_NPOSTFIX: 7, BROTLI_PARAM_NDIRECT: 8,
    });
    const zlib = { constants: zlibConstants };
    for (const [name, op] of [['gzip', 'gzip'], ['gunzip', 'gunzip'], ['deflate', 'deflate'], ['inflate', 'inflate'], ['deflateRaw', 'deflateRaw'], ['inflateRaw', 'inflateRaw'], ['unzip', 'unzip'], ['brotliCompress', 'brotliCompress'], ['brotliDecompress', 'brotliDecompress']]) {
        zlib[name + 'Sync'] = zlibSync(op);
        zlib[name] = zlibAsync(op);
    }

    const b64url = (bytes) => bytesToString(bytes, 'base64url');
    const JWT_ALGORITHMS = { HS256: 'sha256', HS384: 'sha384', HS512: 'sha512' };
    class JsonWebTokenError extends Error {
        constructor(message) {
            super(message);
            this.name = 'JsonWebTokenError';
        }
    }
    const jwtDecode = (token, options) => {
        const parts = String(token).split('.');
        if (parts.length !== 3) return null;
        try {
            const header = JSON.parse(bytesToString(toBytes(parts[0], 'base64url')));
            const payload = JSON.parse(bytesToString(toBytes(parts[1], 'base64url')));
            return options && options.complete ? { header, payload, signature: parts[2] } : payload;
        } catch (e) {
            return null;
        }
    };
    const jwtSign = (payload, secret, options) => {
        options = options || {};
        const alg = options.algorithm || 'HS256';
        const digest = JWT_ALGORITHMS[alg];
        if (!digest) throw new Error('"algorithm" ' + alg + ' is not supported in plugins');
        const body = typeof payload === 'object' ? Object.assign({}, payload) : payload;
        if (typeof body === 'object') {
            const now = Math.floor(Date.now() / 1000);
            if (!options.noTimestamp && body.iat === undefined) body.iat = now;
            if (options.expiresIn !== undefined) body.exp = now + Number(options.expiresIn);
            for (const [opt, claim] of [['audience', 'aud'], ['issuer', 'iss'], ['subject', 'sub'], ['jwtid', 'jti']]) {
                if (options[opt] !== undefined) body[claim] = options[opt];
            }
        }
        const header = Object.assign({ alg, typ: 'JWT' }, options.header || {});
        const input = b64url(toBytes(JSON.stringify(header))) + '.' + b64url(toBytes(typeof body === 'string' ? body : JSON.stringify(body)));
        return input + '.' + b64url(new Uint8Array(hmacOf(digest, toBytes(secret), toBytes(input))));
    };
    const jwtVerify = (token, secret, options) => {
        const decoded = jwtDecode(token, { complete: true });
        if (!decoded) throw new JsonWebTokenError('jwt malformed');
        const digest = JWT_ALGORITHMS[decoded.header.alg];
        if (!digest) throw new JsonWebTokenError('invalid algorithm');
        const input = String(token).split('.').slice(0, 2).join('.');
        const expected = b64url(new Uint8Array(hmacOf(digest, toBytes(secret), toBytes(input))));
        if (expected !== decoded.signature) throw new JsonWebTokenError('invalid signature');
        const payload = decoded.payload;
        if (payload && typeof payload.exp === 'number' && !(options && options.ignoreExpiration) && Date.now() / 1000 >= payload.exp) {
            const e = new JsonWebTokenError('jwt expired');
            e.name = 'TokenExpiredError';
            e.expiredAt = new Date(payload.exp * 1000);
            throw e;
        }
        return payload;
    };
    const jsonwebtoken = { sign: jwtSign, verify: jwtVerify, decode: jwtDecode, JsonWebTokenError };

    // ---------------------------------------------------------------- scaffold, contrib
    // Its `name` stays `Error`, as in @posthog/plugin-scaffold; a hidden mark lets the host tell it
    // apart (the reference checks `instanceof RetryError`).
    class RetryError extends Error {
        constructor(...args) {
            super(...args);
            Object.defineProperty(this, '__posthogRetryError', { value: true });
        }
    }
    // createBuffer of @posthog/plugin-contrib 0.0.5 (reference 30 §6.5).
    function createBuffer(opts) {
        const buffer = {
            _buffer: [], _timeout: null, _lastFlushTriggered: new Date(), _points: 0,
            _timerToken: 0,
            add(object, points = 1) {
                if (points + buffer._points > opts.limit && buffer._points > 0) buffer.flush();
                buffer._points += points;
                buffer._buffer.push(object);
                if (buffer._points > opts.limit) {
                    buffer.flush();
                } else if (!buffer._timeout) {
                    const token = ++buffer._timerToken;
                    buffer._timeout = host.sleep((opts.timeoutSeconds || 0) * 1000).then(() => {
                        if (buffer._timerToken === token) return buffer.flush();
                    });
                    buffer._timeout.catch(() => {});
                }
            },
            async flush() {
                buffer._timerToken++;
                buffer._timeout = null;
                if (buffer._buffer.length > 0 || opts.flushEmpty) {
                    const oldBuffer = buffer._buffer;
                    const oldPoints = buffer._points;
                    buffer._buffer = [];
                    buffer._points = 0;
                    buffer._lastFlushTriggered = new Date();
                    await opts.onFlush(oldBuffer, oldPoints);
                }
            },
        };
        return buffer;
    }

    // ---------------------------------------------------------------- console, posthog, meta
    const renderArg = (arg) => {
        let text;
        try {
            text = String(arg);
        } catch (e) {
            text = '[object Object]';
        }
        if (text === '[object Object]' || Array.isArray(arg)) {
            try {
                return JSON.stringify(arg);
            } catch (e) {
                return text;
            }
        }
        return text;
    };
    const consoleObject = {};
    for (const level of ['debug', 'log', 'info', 'warn', 'error']) {
        consoleObject[level] = function () {
            return quiet(host.call('console.' + level, [Array.prototype.map.call(arguments, renderArg).join(' ')]));
        };
    }
    const apiRequest = async (method, path, options) => {
        const request = await hostCall('posthog.api', [method, path, options]);
        return fetch(request.url, request);
    };
    const posthog = {
        capture: (event, properties) => hostCall('posthog.capture', [event, properties]),
        api: {
            get: (path, options) => apiRequest('GET', path, options),
            post: (path, options) => apiRequest('POST', path, options),
            put: (path, options) => apiRequest('PUT', path, options),
            delete: (path, options) => apiRequest('DELETE', path, options),
        },
    };
    const namespace = (prefix, names) => {
        const out = {};
        for (const name of names) out[name] = (...args) => hostCall(prefix + name, args);
        return out;
    };
    const toAttachment = (a) => ({ content_type: a.content_type, file_name: a.file_name, contents: Buffer.from(a.contents) });
    const meta = {
        cache: namespace('cache.', ['set', 'get', 'incr', 'expire', 'lpush', 'lrange', 'llen', 'lrem', 'lpop']),
        config,
        attachments: Object.fromEntries(attachments.map((a) => [a.key, toAttachment(a)])),
        storage: namespace('storage.', ['get', 'set', 'del']),
        // The reference's City model (`@maxmind/geoip2-node` 3.0, passed through v8.serialize)
        // keeps the fields the database lacks as `undefined` properties; JSON carries them as null.
        geoip: {
            locate: (ip) =>
                hostCall('geoip.locate', [ip]).then((city) => {
                    if (city && typeof city === 'object') {
                        for (const key of Object.keys(city)) if (city[key] === null) city[key] = undefined;
                    }
                    return city;
                }),
        },
        jobs: new Proxy({}, {
            get(_, name) {
                if (typeof name !== 'string') return undefined;
                return (payload) => ({
                    runNow: () => hostCall('jobs.runNow', [name, payload]),
                    runIn: (duration, unit) => hostCall('jobs.runIn', [name, payload, duration, unit]),
                    runAt: (date) => hostCall('jobs.runAt', [name, payload, date]),
                });
            },
        }),
        metrics: new Proxy({}, {
            get(_, name) {
                if (typeof name !== 'string') return undefined;
                const kind = host.metricKind(name);
                const op = { sum: 'increment', max: 'max', min: 'min' }[kind];
                if (!op) throw namedError('IllegalOperationError', 'Invalid metric name');
                return {
                    [op]: (value) => {
                        if (typeof value !== 'number') throw namedError('IllegalOperationError', 'Only numbers are allowed for operations on metrics');
                        quiet(host.call('metrics.' + op, [name, value]));
                    },
                };
            },
        }),
        utils: { cursor: namespace('utils.cursor.', ['init', 'increment']) },
        global: {},
    };

    // ---------------------------------------------------------------- globals
    const freeze = (o) => Object.freeze(o);
    const testModules = testConsole
        ? {
              'test-utils/write-to-file': freeze({
                  console: freeze({
                      log: (...args) => host.testConsoleWrite(JSON.stringify(args) + '\n', true),
                      reset: () => host.testConsoleWrite('', false),
                      read: () => host.testConsoleRead().split('\n').filter((line) => !!line).map((line) => JSON.parse(line)),
                  }),
              }),
          }
        : {};
    const modules = {
        ...testModules,
        'node-fetch': freeze(Object.assign(fetch, { default: fetch, Headers, Response, FetchError, AbortError })),
        '@posthog/plugin-scaffold': freeze({ RetryError }),
        '@posthog/plugin-contrib': freeze({ createBuffer }),
        crypto: freeze(crypto),
        url: freeze({ URL, URLSearchParams, parse: legacyUrlParse }),
        zlib: freeze(zlib),
        jsonwebtoken: freeze(jsonwebtoken),
    };

    // ---------------------------------------------------------------- facade modules (modules/mod.rs)
    let facade;
    const loadFacade = (name) => (facade || (facade = host.facade('@loader')({ host, hostCall, Buffer, namedError, quiet, RetryError, modules, forbidden: (n) => forbidden(n) })))(name);
    for (const [name, importable] of host.facade()) if (importable) Object.defineProperty(modules, name, { get: () => loadFacade(name), enumerable: true });
    freeze(modules);
    for (const cls of [Buffer, TextEncoder, TextDecoder, URL, URLSearchParams, Headers, Response, FetchError, AbortError, RetryError, JsonWebTokenError, Hash]) {
        freeze(cls);
        freeze(cls.prototype);
    }
    const forbidden = (name) =>
        new Error("Cannot import '" + name + "'! This package is not provided by PostHog in plugins.");
    const require = (name) => {
        if (Object.prototype.hasOwnProperty.call(modules, name)) return modules[name];
        throw forbidden(name);
    };
    // No stack-trace hooks: a plugin's `Error.prepareStackTrace` would run inside the engine
    // while it builds errors for host functions (and could inspect their frames). The setter
    // accepts and ignores assignments, so plugins that set it keep working.
    Object.defineProperty(Error, 'prepareStackTrace', { get: () => undefined, set: () => {}, configurable: false });
    define(G, 'console', freeze(consoleObject));
    define(G, 'posthog', freeze({ capture: posthog.capture, api: freeze(posthog.api) }));
    define(G, 'fetch', fetch);
    define(G, 'RetryError', RetryError);
    define(G, 'URL', URL);
    define(G, 'URLSearchParams', URLSearchParams);
    define(G, 'Buffer', Buffer);
    define(G, 'TextEncoder', TextEncoder);
    define(G, 'TextDecoder', TextDecoder);
    define(G, 'require', require);
    define(G, '__pluginHostImports', modules);
    if (testEnv) define(G, '__jestSetTimeout', (fn, ms) => quiet(host.sleep(Number(ms) || 0).then(() => fn())));
    G.module = { exports: {} };
    G.exports = G.module.exports;
    const baseline = new Set(Object.getOwnPropertyNames(G));

    // Export discovery (reference 30 §5.3), run after the plugin code.
    function discover(namespaceObject) {
        const main = namespaceObject || G.exports;
        const destinations = [main, main && main.default, G.module && G.module.exports].filter(
            (d, i, all) => d && typeof d === 'object' && all.indexOf(d) === i,
        );
        let names;
        if (!destinations.some((d) => Object.keys(d).length > 0)) {
            destinations.push(G);
            names = Object.getOwnPropertyNames(G).filter((n) => !baseline.has(n));
        } else {
            names = [];
            for (const d of destinations) for (const n of Object.keys(d)) if (!names.includes(n)) names.push(n);
        }
        const get = (name) => {
            for (const d of destinations) {
                try {
                    if (d[name]) return d[name];
                } catch (e) {
                    // a throwing getter hides that export
                }
            }
            return undefined;
        };
        const functions = {};
        for (const n of names) {
            const f = get(n);
            if (typeof f === 'function') functions[n] = f;
        }
        if (!functions.processEvent && typeof functions.processEventBatch === 'function') {
            const batch = functions.processEventBatch;
            functions.processEvent = function (event, m) {
                const r = batch([event], m);
                return r && typeof r.then === 'function' ? r.then((x) => x && x[0]) : r && r[0];
            };
        }
        const jobsObject = get('jobs');
        const jobs = {};
        if (jobsObject && typeof jobsObject === 'object') {
            for (const n of Object.keys(jobsObject)) if (typeof jobsObject[n] === 'function') jobs[n] = jobsObject[n];
        }
        const metrics = get('metrics');
        // For the server's processEvent chain: the result and whether it is the very object the
        // plugin was given (the reference adds `$plugins_*` to that object only).
        const internal = {};
        if (typeof functions.processEvent === 'function') {
            const processEvent = functions.processEvent;
            internal['@processEvent.tracked'] = function (event, m) {
                const pair = (r) => [r, r === event];
                const r = processEvent(event, m);
                return r && typeof r.then === 'function' ? r.then(pair) : pair(r);
            };
        }
        return { functions, jobs, internal, metrics: metrics && typeof metrics === 'object' ? metrics : undefined };
    }

    return { meta, discover, modules };
});

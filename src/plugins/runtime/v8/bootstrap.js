// The V8 VM's side of the engine boundary (v8/vm.rs), run once per isolate as a function body
// with one parameter, `exports`: what it assigns there is what Rust calls. It takes the shim's
// `__pst_compile` and the host functions (`__pst_*` globals, host/v8.rs) off the global object
// before any plugin code runs, builds the same `host` object QuickJS hands `prelude.js` (bytes
// cross the JSON boundary as binary strings, one char per byte), runs the prelude and the plugin
// code, and calls plugin functions with `meta`.
'use strict';
const G = globalThis;
const compile = G.__pst_compile;
delete G.__pst_compile;
const raw = {};
for (const name of Object.getOwnPropertyNames(G)) {
    if (name.startsWith('__pst_')) {
        raw[name.slice(6)] = G[name];
        delete G[name];
    }
}
const P = Promise;
const then = (promise, onFulfilled, onRejected) => P.prototype.then.call(promise, onFulfilled, onRejected);
const noop = () => {};
const fromCharCode = String.fromCharCode;
const U8 = Uint8Array;
const AB = ArrayBuffer;

// Node's and QuickJS's `queueMicrotask`, which a bare V8 context lacks.
Object.defineProperty(G, 'queueMicrotask', {
    value: function queueMicrotask(callback) {
        if (typeof callback !== 'function') {
            throw new TypeError('The "callback" argument must be of type function. Received ' + typeof callback);
        }
        then(P.resolve(), () => callback());
    },
    writable: true,
    enumerable: true,
    configurable: true,
});

// Bytes ↔ binary strings.
const toBin = (bytes) => {
    const view = new U8(bytes.buffer, bytes.byteOffset, bytes.byteLength);
    let out = '';
    for (let i = 0; i < view.length; i += 8192) out += fromCharCode.apply(null, view.subarray(i, i + 8192));
    return out;
};
const fromBin = (text) => {
    const out = new U8(text.length);
    for (let i = 0; i < text.length; i++) out[i] = text.charCodeAt(i);
    return out.buffer;
};
const bytesOf = (value) => {
    if (value instanceof U8) return toBin(value);
    if (value instanceof AB) return toBin(new U8(value));
    if (AB.isView(value)) return toBin(value);
    throw new TypeError('expected a Buffer, Uint8Array or ArrayBuffer');
};
const typeName = (v) => (v === null ? 'object' : typeof v);

const host = {
    limits: () => raw.limits(),
    jsonError: (text) => raw.jsonError(String(text)),
    utf8Encode: (s) => fromBin(raw.utf8Encode(String(s))),
    utf8Decode: (bytes) => raw.utf8Decode(bytesOf(bytes)),
    base64Encode: (bytes, urlSafe) => raw.base64Encode(bytesOf(bytes), !!urlSafe),
    base64Decode: (s) => fromBin(raw.base64Decode(String(s))),
    hash: (algorithm, data) => fromBin(raw.hash(String(algorithm), bytesOf(data))),
    hmac: (algorithm, key, data) => fromBin(raw.hmac(String(algorithm), bytesOf(key), bytesOf(data))),
    sign: (algorithm, key, passphrase, data) => fromBin(raw.sign(String(algorithm), bytesOf(key), String(passphrase), bytesOf(data))),
    verify: (algorithm, key, passphrase, data, signature) =>
        raw.verify(String(algorithm), bytesOf(key), String(passphrase), bytesOf(data), bytesOf(signature)),
    randomBytes: (size) => fromBin(raw.randomBytes(size)),
    randomUUID: () => raw.randomUUID(),
    zlib: (op, data, params) => {
        let entries = null;
        if (params && typeof params === 'object') {
            entries = {};
            for (const key of Object.keys(params)) {
                const v = params[key];
                entries[key] = typeof v === 'number' ? v : typeName(v);
            }
        }
        return fromBin(raw.zlib(String(op), bytesOf(data), entries));
    },
    urlParse: (href, base) => (base === undefined ? raw.urlParse(String(href)) : raw.urlParse(String(href), String(base))),
    urlSet: (href, field, value) => raw.urlSet(String(href), String(field), String(value)),
    formParse: (text) => raw.formParse(String(text)),
    metricKind: (name) => raw.metricKind(String(name)),
    facade: (name) => {
        if (name === undefined) return raw.facades();
        const [source, file] = raw.facadeSource(String(name));
        return compile('script', "'use strict';(" + source + '\n)', file);
    },
    call: (name, args) => raw.call(String(name), args),
    fetch: (url, method, pairs, body) => {
        const text = typeof body === 'string';
        const sent = body === null || body === undefined ? null : text ? body : bytesOf(body);
        return then(raw.fetch(String(url), String(method), pairs, sent, !text), (response) => {
            response.body = fromBin(response.body);
            return response;
        });
    },
    sleep: (ms) => raw.sleep(ms),
    testConsoleWrite: (text, append) => raw.testConsoleWrite(String(text), !!append),
    testConsoleRead: () => raw.testConsoleRead(),
};

let helpers;
let meta;
const functions = {};
const jobs = {};
const after = new Map();

// The prelude (its source, evaluated as `prelude`), then `meta` and the sandbox's globals.
exports.setup = (prelude, config, attachments, testEnv, testConsole) => {
    const setup = compile('script', prelude, 'prelude');
    const list = attachments.map((a) => ({
        key: a.key,
        content_type: a.content_type,
        file_name: a.file_name,
        contents: fromBin(a.contents),
    }));
    helpers = setup(host, config, list, testEnv, testConsole);
    meta = helpers.meta;
    return null;
};

// A module importing `name`: the prelude's module, re-exported name by name.
const resolve = (name) => {
    const modules = helpers.modules;
    if (!Object.prototype.hasOwnProperty.call(modules, name)) throw new Error(raw.importMessage(name));
    const module = modules[name];
    const keys = Object.keys(module).filter((k) => k !== 'default' && /^[A-Za-z_$][\w$]*$/.test(k));
    let source = 'const m = globalThis.__pluginHostImports[' + JSON.stringify(name) + '];\nexport default m;\n';
    for (const key of keys) source += 'export const ' + key + ' = m.' + key + ';\n';
    return source;
};

let namespace;
// Runs the plugin code (strict, as QuickJS runs it); answers the module's evaluation promise.
exports.load = (code, isModule, filename) => {
    if (isModule) {
        const [ns, evaluation] = compile('module', code, filename, 0, resolve);
        namespace = ns;
        return evaluation;
    }
    compile('script', "'use strict';\n" + code, filename, -1);
    return null;
};

// The exports found (reference 30 §5.3): names, for Rust; the functions stay here.
exports.discover = () => {
    const found = helpers.discover(namespace);
    for (const key of Object.keys(functions)) delete functions[key];
    for (const key of Object.keys(jobs)) delete jobs[key];
    Object.assign(functions, found.functions, found.internal);
    Object.assign(jobs, found.jobs);
    return {
        functions: Object.keys(found.functions),
        internal: Object.keys(found.internal),
        jobs: Object.keys(found.jobs),
        metrics: found.metrics === undefined ? null : found.metrics,
        hasMetrics: found.metrics !== undefined,
    };
};

// Calls a plugin function with `meta`. A throw or rejection keeps the arguments as they were then
// (`argsAfter(id)`); a pending result is handled here, so its rejection is never "unhandled".
exports.call = (id, method, args) => {
    const f = method.startsWith('jobs.') ? jobs[method.slice(5)] : functions[method];
    if (typeof f !== 'function') throw new TypeError(method + ' is not a function');
    args.push(meta);
    let result;
    try {
        result = Reflect.apply(f, undefined, args);
    } catch (e) {
        after.set(id, args.slice(0, -1));
        throw e;
    }
    if (result instanceof P) {
        const tracked = then(result, undefined, (e) => {
            after.set(id, args.slice(0, -1));
            throw e;
        });
        then(tracked, undefined, noop);
        return tracked;
    }
    return result;
};

exports.argsAfter = (id) => {
    const args = after.get(id);
    after.delete(id);
    return args === undefined ? null : args;
};

exports.metaGlobal = (set, key, value) => {
    if (!meta) return null;
    if (!set) return meta.global;
    meta.global[key] = value;
    return null;
};

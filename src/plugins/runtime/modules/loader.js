// The facade loader: compiled into a VM the first time its plugin requires a facade module (see
// mod.rs), with the prelude's private pieces. It keeps `host` to itself and gives each facade the
// internals below, compiling each facade once, on first require.
(function (prelude) {
    'use strict';
    const { host, modules, forbidden } = prelude;
    const timer = (repeat) => (fn, ms, ...args) => {
        const handle = { active: true, ref: () => handle, unref: () => handle, hasRef: () => false, refresh: () => handle };
        const delay = Math.max(0, Number(ms) || 0);
        const tick = () =>
            host.sleep(delay).then(() => {
                if (!handle.active) return;
                if (!repeat) handle.active = false;
                fn(...args);
                if (repeat && handle.active) return tick();
            });
        tick();
        return handle;
    };
    const clearTimer = (handle) => {
        if (handle && typeof handle === 'object') handle.active = false;
    };
    const names = new Set(host.facade().map((entry) => entry[0]));
    // Exports plugins are meant to change: faker's object is its state (`faker.locale = 'de'`,
    // `faker.seed(n)` replaces `faker.random`), mutable in the reference too (and here one per VM).
    const mutable = new Set(['faker']);
    const loaded = new Map();
    const load = (name) => {
        let exports = loaded.get(name);
        if (exports === undefined) {
            loaded.set(name, null); // a facade requiring itself while it loads gets null
            exports = host.facade(name)(internals);
            if (!mutable.has(name)) Object.freeze(exports);
            loaded.set(name, exports);
        }
        return exports;
    };
    const internals = Object.freeze({
        hostCall: prelude.hostCall,
        Buffer: prelude.Buffer,
        namedError: prelude.namedError,
        quiet: prelude.quiet,
        RetryError: prelude.RetryError,
        setTimeout: timer(false),
        setInterval: timer(true),
        setImmediate: (fn, ...args) => timer(false)(fn, 0, ...args),
        clearTimeout: clearTimer,
        clearInterval: clearTimer,
        clearImmediate: clearTimer,
        // Other facades, and the prelude's own modules (crypto, zlib, url, node-fetch, ...).
        require: (name) => {
            if (names.has(name)) return load(name);
            if (Object.prototype.hasOwnProperty.call(modules, name)) return modules[name];
            throw forbidden(name);
        },
    });
    return load;
})

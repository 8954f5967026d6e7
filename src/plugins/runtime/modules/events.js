// Node's `events` (EventEmitter) for the other facades (pg's Client and Pool, stream). Not
// importable by plugin code, as in the reference. Written for this sandbox after Node's API.
(function (internals) {
    'use strict';
    const listenersOf = (emitter) => {
        if (!Object.prototype.hasOwnProperty.call(emitter, '_events') || !emitter._events) {
            Object.defineProperty(emitter, '_events', { value: new Map(), writable: true, configurable: true });
        }
        return emitter._events;
    };
    class EventEmitter {
        constructor() {
            listenersOf(this);
            this._maxListeners = undefined;
        }
        _add(name, listener, prepend, once) {
            if (typeof listener !== 'function') {
                throw new TypeError('The "listener" argument must be of type function. Received ' + (listener === null ? 'null' : typeof listener));
            }
            const events = listenersOf(this);
            if (events.has('newListener')) this.emit('newListener', name, listener);
            const list = events.get(name) || [];
            const entry = { listener, once };
            if (prepend) list.unshift(entry);
            else list.push(entry);
            events.set(name, list);
            return this;
        }
        on(name, listener) {
            return this._add(name, listener, false, false);
        }
        addListener(name, listener) {
            return this.on(name, listener);
        }
        prependListener(name, listener) {
            return this._add(name, listener, true, false);
        }
        once(name, listener) {
            return this._add(name, listener, false, true);
        }
        prependOnceListener(name, listener) {
            return this._add(name, listener, true, true);
        }
        off(name, listener) {
            const events = listenersOf(this);
            const list = events.get(name);
            if (!list) return this;
            for (let i = list.length - 1; i >= 0; i--) {
                if (list[i].listener === listener) {
                    list.splice(i, 1);
                    if (list.length === 0) events.delete(name);
                    if (events.has('removeListener')) this.emit('removeListener', name, listener);
                    break;
                }
            }
            return this;
        }
        removeListener(name, listener) {
            return this.off(name, listener);
        }
        removeAllListeners(name) {
            const events = listenersOf(this);
            if (name === undefined) events.clear();
            else events.delete(name);
            return this;
        }
        emit(name, ...args) {
            const list = listenersOf(this).get(name);
            if (!list || list.length === 0) {
                if (name === 'error') {
                    const error = args[0];
                    if (error instanceof Error) throw error;
                    const wrapped = new Error('Unhandled error.' + (error === undefined ? '' : ' (' + String(error) + ')'));
                    wrapped.code = 'ERR_UNHANDLED_ERROR';
                    wrapped.context = error;
                    throw wrapped;
                }
                return false;
            }
            for (const entry of list.slice()) {
                if (entry.once) this.off(name, entry.listener);
                entry.listener.apply(this, args);
            }
            return true;
        }
        listeners(name) {
            return (listenersOf(this).get(name) || []).map((e) => e.listener);
        }
        rawListeners(name) {
            return this.listeners(name);
        }
        listenerCount(name) {
            return (listenersOf(this).get(name) || []).length;
        }
        eventNames() {
            return Array.from(listenersOf(this).keys());
        }
        setMaxListeners(n) {
            this._maxListeners = n;
            return this;
        }
        getMaxListeners() {
            return this._maxListeners === undefined ? EventEmitter.defaultMaxListeners : this._maxListeners;
        }
        static once(emitter, name) {
            return new Promise((resolve, reject) => {
                const onError = (error) => {
                    emitter.off(name, onEvent);
                    reject(error);
                };
                const onEvent = (...args) => {
                    if (name !== 'error') emitter.off('error', onError);
                    resolve(args);
                };
                emitter.once(name, onEvent);
                if (name !== 'error') emitter.once('error', onError);
            });
        }
        static listenerCount(emitter, name) {
            return emitter.listenerCount(name);
        }
    }
    EventEmitter.defaultMaxListeners = 10;
    EventEmitter.EventEmitter = EventEmitter;
    EventEmitter.default = EventEmitter;
    return EventEmitter;
})

// Node's `stream` as the reference offers it to plugins (`PassThrough`), with the classes it is
// built from (Readable, Writable, Duplex, Transform) for the other facades. Written for this
// sandbox after Node's stream API (events, backpressure through `write()`'s return value and
// 'drain', object mode, `pipe`, async iteration); `highWaterMark` counts bytes or objects.
(function (internals) {
    'use strict';
    const EventEmitter = internals.require('events');
    const { Buffer } = internals;
    const later = (fn, ...args) => {
        Promise.resolve().then(() => fn(...args));
    };
    const toChunk = (chunk, encoding, objectMode) => {
        if (objectMode) return chunk;
        if (typeof chunk === 'string') return Buffer.from(chunk, encoding);
        if (chunk instanceof Uint8Array) return chunk instanceof Buffer ? chunk : Buffer.from(chunk);
        throw new TypeError('The "chunk" argument must be of type string or an instance of Buffer or Uint8Array');
    };
    const sizeOf = (chunk, objectMode) => (objectMode ? 1 : chunk.length);

    class Stream extends EventEmitter {}

    class Readable extends Stream {
        constructor(options) {
            super();
            options = options || {};
            const objectMode = !!(options.objectMode || options.readableObjectMode);
            this._readableState = {
                objectMode,
                highWaterMark: options.readableHighWaterMark || options.highWaterMark || (objectMode ? 16 : 16384),
                buffer: [],
                length: 0,
                flowing: null,
                ended: false,
                endEmitted: false,
                reading: false,
                scheduled: false,
                encoding: null,
            };
            this.readable = true;
            this.destroyed = false;
            if (typeof options.read === 'function') this._read = options.read;
            if (typeof options.destroy === 'function') this._destroy = options.destroy;
        }
        _read() {}
        push(chunk, encoding) {
            const state = this._readableState;
            if (chunk === null) {
                state.ended = true;
                this._schedule();
                return false;
            }
            if (state.ended) {
                this.emit('error', new Error('stream.push() after EOF'));
                return false;
            }
            const value = toChunk(chunk, encoding, state.objectMode);
            state.buffer.push(value);
            state.length += sizeOf(value, state.objectMode);
            state.reading = false;
            this._schedule();
            return state.length < state.highWaterMark;
        }
        unshift(chunk) {
            const state = this._readableState;
            const value = toChunk(chunk, undefined, state.objectMode);
            state.buffer.unshift(value);
            state.length += sizeOf(value, state.objectMode);
        }
        _decode(chunk) {
            const encoding = this._readableState.encoding;
            return encoding && !this._readableState.objectMode ? chunk.toString(encoding) : chunk;
        }
        _schedule() {
            const state = this._readableState;
            if (state.scheduled) return;
            state.scheduled = true;
            later(() => {
                state.scheduled = false;
                this._flow();
            });
        }
        _flow() {
            const state = this._readableState;
            if (this.destroyed) return;
            if (state.flowing) {
                while (state.flowing && state.buffer.length > 0) {
                    const chunk = state.buffer.shift();
                    state.length -= sizeOf(chunk, state.objectMode);
                    this.emit('data', this._decode(chunk));
                }
            } else if (state.buffer.length > 0 || state.ended) {
                this.emit('readable');
            }
            if (state.ended && state.buffer.length === 0) {
                if (!state.endEmitted && state.flowing !== false) {
                    state.endEmitted = true;
                    this.readable = false;
                    this.emit('end');
                    if (this._autoClose !== false) later(() => this.emit('close'));
                }
                return;
            }
            if (!state.ended && !state.reading && state.length < state.highWaterMark) {
                state.reading = true;
                this._read(state.highWaterMark);
            }
        }
        read() {
            const state = this._readableState;
            if (state.buffer.length === 0) {
                if (state.ended) this._schedule();
                else if (!state.reading) {
                    state.reading = true;
                    this._read(state.highWaterMark);
                }
                return null;
            }
            let out;
            if (state.objectMode) out = state.buffer.shift();
            else out = Buffer.concat(state.buffer.splice(0));
            state.length -= sizeOf(out, state.objectMode);
            this._schedule();
            return this._decode(out);
        }
        on(name, listener) {
            super.on(name, listener);
            if (name === 'data' && this._readableState.flowing !== false) this.resume();
            if (name === 'readable' || name === 'end') this._schedule();
            return this;
        }
        addListener(name, listener) {
            return this.on(name, listener);
        }
        resume() {
            this._readableState.flowing = true;
            this._schedule();
            return this;
        }
        pause() {
            this._readableState.flowing = false;
            return this;
        }
        isPaused() {
            return this._readableState.flowing === false;
        }
        setEncoding(encoding) {
            this._readableState.encoding = encoding;
            return this;
        }
        pipe(destination, options) {
            this.on('data', (chunk) => {
                if (destination.write(chunk) === false) {
                    this.pause();
                    destination.once('drain', () => this.resume());
                }
            });
            if (!options || options.end !== false) this.on('end', () => destination.end());
            destination.emit('pipe', this);
            return destination;
        }
        unpipe() {
            this.removeAllListeners('data');
            return this;
        }
        destroy(error) {
            if (this.destroyed) return this;
            this.destroyed = true;
            const finish = (e) => {
                if (e) this.emit('error', e);
                this.emit('close');
            };
            if (typeof this._destroy === 'function') this._destroy(error || null, (e) => later(finish, e));
            else later(finish, error);
            return this;
        }
        [Symbol.asyncIterator]() {
            const chunks = [];
            const waiting = [];
            let done = false;
            let failure = null;
            const settle = () => {
                while (waiting.length > 0 && (chunks.length > 0 || done || failure)) {
                    const { resolve, reject } = waiting.shift();
                    if (chunks.length > 0) resolve({ value: chunks.shift(), done: false });
                    else if (failure) reject(failure);
                    else resolve({ value: undefined, done: true });
                }
            };
            this.on('data', (chunk) => {
                chunks.push(chunk);
                settle();
            });
            this.on('end', () => {
                done = true;
                settle();
            });
            this.on('error', (error) => {
                failure = error;
                settle();
            });
            return {
                next: () => new Promise((resolve, reject) => {
                    waiting.push({ resolve, reject });
                    settle();
                }),
                return: () => {
                    this.destroy();
                    return Promise.resolve({ value: undefined, done: true });
                },
                [Symbol.asyncIterator]() {
                    return this;
                },
            };
        }
    }

    // The writable half, shared by Writable and Duplex (Duplex extends Readable).
    const writableMethods = {
        _initWritable(options) {
            options = options || {};
            const objectMode = !!(options.objectMode || options.writableObjectMode);
            this._writableState = {
                objectMode,
                highWaterMark: options.writableHighWaterMark || options.highWaterMark || (objectMode ? 16 : 16384),
                queue: [],
                length: 0,
                writing: false,
                ending: false,
                finished: false,
                needDrain: false,
                decodeStrings: options.decodeStrings !== false,
            };
            this.writable = true;
            if (typeof options.write === 'function') this._write = options.write;
            if (typeof options.writev === 'function') this._writev = options.writev;
            if (typeof options.final === 'function') this._final = options.final;
        },
        write(chunk, encoding, callback) {
            if (typeof encoding === 'function') {
                callback = encoding;
                encoding = undefined;
            }
            const state = this._writableState;
            if (state.ending) {
                const error = new Error('write after end');
                error.code = 'ERR_STREAM_WRITE_AFTER_END';
                later(() => {
                    if (callback) callback(error);
                    this.emit('error', error);
                });
                return false;
            }
            if (chunk === null) throw new TypeError('May not write null values to stream');
            const value = state.objectMode || !state.decodeStrings ? chunk : toChunk(chunk, encoding, false);
            state.queue.push({ chunk: value, encoding: typeof value === 'string' ? encoding || 'utf8' : 'buffer', callback });
            state.length += state.objectMode ? 1 : value.length;
            const ok = state.length < state.highWaterMark;
            if (!ok) state.needDrain = true;
            this._drainQueue();
            return ok;
        },
        _drainQueue() {
            const state = this._writableState;
            if (state.writing) return;
            const next = state.queue.shift();
            if (!next) {
                if (state.needDrain) {
                    state.needDrain = false;
                    later(() => this.emit('drain'));
                }
                if (state.ending && !state.finished) this._finishWritable();
                return;
            }
            state.writing = true;
            let called = false;
            this._write(next.chunk, next.encoding, (error) => {
                if (called) return;
                called = true;
                state.writing = false;
                state.length -= state.objectMode ? 1 : next.chunk.length;
                later(() => {
                    if (next.callback) next.callback(error || null);
                    if (error) {
                        this.emit('error', error);
                        return;
                    }
                    this._drainQueue();
                });
            });
        },
        _finishWritable() {
            const state = this._writableState;
            state.finished = true;
            const done = (error) => {
                if (error) {
                    this.emit('error', error);
                    return;
                }
                this.writable = false;
                this.emit('finish');
                this._afterFinish();
            };
            if (typeof this._final === 'function') this._final((error) => later(done, error));
            else later(done);
        },
        _afterFinish() {
            later(() => this.emit('close'));
        },
        end(chunk, encoding, callback) {
            if (typeof chunk === 'function') {
                callback = chunk;
                chunk = undefined;
            } else if (typeof encoding === 'function') {
                callback = encoding;
                encoding = undefined;
            }
            if (chunk !== undefined && chunk !== null) this.write(chunk, encoding);
            const state = this._writableState;
            if (callback) this.once('finish', callback);
            if (!state.ending) {
                state.ending = true;
                this._drainQueue();
            }
            return this;
        },
        cork() {},
        uncork() {},
        setDefaultEncoding() {
            return this;
        },
    };

    class Writable extends Stream {
        constructor(options) {
            super();
            this._initWritable(options);
            this.destroyed = false;
        }
        _write(chunk, encoding, callback) {
            callback(new Error('The _write() method is not implemented'));
        }
        destroy(error) {
            if (this.destroyed) return this;
            this.destroyed = true;
            later(() => {
                if (error) this.emit('error', error);
                this.emit('close');
            });
            return this;
        }
    }
    Object.assign(Writable.prototype, writableMethods);

    class Duplex extends Readable {
        constructor(options) {
            super(options);
            this._initWritable(options);
            this._autoClose = false;
            if (options && options.allowHalfOpen === false) this.once('end', () => this.end());
        }
        _write(chunk, encoding, callback) {
            callback(new Error('The _write() method is not implemented'));
        }
        _afterFinish() {}
    }
    Object.assign(Duplex.prototype, writableMethods);

    class Transform extends Duplex {
        constructor(options) {
            super(options);
            if (options && typeof options.transform === 'function') this._transform = options.transform;
            if (options && typeof options.flush === 'function') this._flush = options.flush;
            this.once('end', () => later(() => this.emit('close')));
        }
        _transform(chunk, encoding, callback) {
            callback(new Error('The _transform() method is not implemented'));
        }
        _write(chunk, encoding, callback) {
            this._transform(chunk, encoding, (error, data) => {
                if (error) {
                    callback(error);
                    return;
                }
                if (data !== undefined && data !== null) this.push(data);
                callback();
            });
        }
        _final(callback) {
            const close = (error, data) => {
                if (error) {
                    callback(error);
                    return;
                }
                if (data !== undefined && data !== null) this.push(data);
                this.push(null);
                callback();
            };
            if (typeof this._flush === 'function') this._flush(close);
            else close();
        }
    }

    class PassThrough extends Transform {
        _transform(chunk, encoding, callback) {
            callback(null, chunk);
        }
    }

    Stream.Stream = Stream;
    return { Stream, Readable, Writable, Duplex, Transform, PassThrough };
})

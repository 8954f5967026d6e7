//! The JavaScript runtime: a fixed pool of worker threads, each owning one sandboxed QuickJS VM per plugin config.

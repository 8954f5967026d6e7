//! Sentry: initialised when `SENTRY_DSN` is set, and the two capture helpers every module uses.
//! Without a DSN (or before `init`) captures are dropped by the Sentry SDK itself, so callers
//! never check.

use sentry::protocol::{Map, Value};
use sentry::{ClientInitGuard, Level};

use crate::config::Config;

/// Initialises Sentry when `SENTRY_DSN` is set. Keep the guard alive for the whole process: it
/// flushes pending reports when dropped.
pub fn init(config: &Config) -> Option<ClientInitGuard> {
    let dsn = config.SENTRY_DSN.as_deref()?;
    let options = sentry::ClientOptions { release: Some(crate::VERSION.into()), ..Default::default() };
    let guard = sentry::init((dsn, options));
    if guard.is_enabled() {
        Some(guard)
    } else {
        tracing::warn!("⚠️ SENTRY_DSN is set but is not a valid Sentry DSN; Sentry stays off");
        None
    }
}

/// Reports an error message (the reference's `captureException`).
pub fn capture_error_message(message: &str) {
    sentry::capture_message(message, Level::Error);
}

/// Reports a message with `extra` context (the reference's `captureMessage(message, {extra})`).
pub fn capture_message_with_extra(message: &str, level: Level, extra: Map<String, Value>) {
    sentry::with_scope(
        |scope| {
            for (key, value) in extra {
                scope.set_extra(&key, value);
            }
        },
        || sentry::capture_message(message, level),
    );
}

//! Log output: the `tracing` subscriber, filtered by `LOG_LEVEL`, printing lines in the
//! reference's shape `[PREFIX] HH:MM:SS LEVEL message`.
//!
//! The prefix is `MAIN` for the server's own threads, the mode code for alternative CLI modes
//! (`HELP`, `VRSN`, `HLTH`, `IDLE`, `MGRT`), and the worker number left-padded with `_` to four
//! characters (`___3`) on JavaScript worker threads, which call [`set_thread_prefix`].
//! This module owns nothing else: what gets logged is decided by each component.

use std::cell::RefCell;
use std::fmt;
use std::sync::OnceLock;

use tracing::{Event, Level, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::EnvFilter;

use crate::config::LogLevel;

static PROCESS_PREFIX: OnceLock<String> = OnceLock::new();

thread_local! {
    static THREAD_PREFIX: RefCell<Option<String>> = const { RefCell::new(None) };
}

/// Marks the current thread as JavaScript worker `number` for log prefixes (`___3`).
pub fn set_thread_prefix(number: usize) {
    THREAD_PREFIX.with(|prefix| *prefix.borrow_mut() = Some(format!("{number:_>4}")));
}

fn current_prefix() -> String {
    THREAD_PREFIX
        .with(|prefix| prefix.borrow().clone())
        .unwrap_or_else(|| PROCESS_PREFIX.get().cloned().unwrap_or_else(|| "MAIN".to_string()))
}

/// The `tracing` directive for a reference log level. The reference's `log` level sits between
/// info and warn; `tracing` has no such level, so it behaves as info.
fn directive(level: LogLevel) -> &'static str {
    match level {
        LogLevel::Debug => "debug",
        LogLevel::Info | LogLevel::Log => "info",
        LogLevel::Warn => "warn",
        LogLevel::Error => "error",
        LogLevel::None => "off",
    }
}

struct ReferenceFormat;

impl<S, N> FormatEvent<S, N> for ReferenceFormat
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(&self, ctx: &FmtContext<'_, S, N>, mut writer: Writer<'_>, event: &Event<'_>) -> fmt::Result {
        let level = match *event.metadata().level() {
            Level::ERROR => "ERROR",
            Level::WARN => "WARN ",
            Level::INFO => "INFO ",
            Level::DEBUG => "DEBUG",
            Level::TRACE => "TRACE",
        };
        let time = chrono::Local::now().format("%H:%M:%S");
        write!(writer, "[{}] {} {} ", current_prefix(), time, level)?;
        ctx.field_format().format_fields(writer.by_ref(), event)?;
        writeln!(writer)
    }
}

/// Installs the global subscriber. `prefix` is `MAIN` or an alternative mode's code. Lines go to
/// stdout, as the reference's do. Our own crates log at `level`; dependencies only at warn and
/// above so they do not drown the server's lines. Safe to call more than once (later calls are
/// ignored), which tests rely on.
pub fn init(level: LogLevel, prefix: &str) {
    let _ = PROCESS_PREFIX.set(prefix.to_string());
    let ours = directive(level);
    let dependencies = if level == LogLevel::None {
        "off"
    } else if level >= LogLevel::Warn {
        ours
    } else {
        "warn"
    };
    let filter = EnvFilter::new(format!("{dependencies},plugin_server={ours},plugin-server={ours}"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stdout)
        .event_format(ReferenceFormat)
        .try_init();
}

//! The texts of the errors every engine gives for timeouts and refusals, as the reference words
//! them (30 §4b, §4c), so QuickJS and V8 VMs fail alike.

use std::time::Duration;

use super::convert::Refused;
use super::JsError;
use crate::plugins::transform::{TransformedCode, VIRTUAL_FILENAME};

/// `30`, `1`, `0.5`: how the reference prints `TASK_TIMEOUT` in messages.
pub fn seconds_text(timeout: Duration) -> String {
    let secs = timeout.as_secs_f64();
    let number = if secs.fract() == 0.0 { format!("{}", secs as u64) } else { format!("{secs}") };
    format!("{number} second{}", if secs == 1.0 { "" } else { "s" })
}

/// `Script execution timed out after promise waited for T second(s)` (reference 30 §4c).
pub fn promise_timeout_error(timeout: Duration, caller: &str) -> JsError {
    JsError {
        name: "TimeoutError".to_string(),
        message: format!("Script execution timed out after promise waited for {}", seconds_text(timeout)),
        stack: None,
        caller: Some(caller.to_string()),
        ..JsError::default()
    }
}

/// The error of a value refused at the VM → host boundary (see `convert.rs`).
pub fn refused_error(what: &str, refused: &Refused) -> JsError {
    JsError {
        name: "RangeError".to_string(),
        message: format!("The plugin server refused {what}: {refused}"),
        ..JsError::default()
    }
}

/// The error of calls still waiting on a VM that was discarded because promise jobs kept running
/// past a call's deadline.
pub fn discarded_error(timeout: Duration) -> JsError {
    JsError {
        name: "TimeoutError".to_string(),
        message: format!(
            "Script execution timed out after promise jobs ran for {}; the plugin VM was discarded",
            seconds_text(timeout)
        ),
        ..JsError::default()
    }
}

/// Stack frames of plugin code: QuickJS evaluates scripts as `eval_script`, modules as `index.ts`
/// (V8 runs both as `index.ts`; the prelude is `prelude`, so its frames never count).
const PLUGIN_FRAMES: &[&str] = &["eval_script", VIRTUAL_FILENAME];

/// `Script execution timed out after looping for T second(s) on line L:C` (reference 30 §4b):
/// the position is the start of the innermost loop around where plugin code was interrupted;
/// `stack` is where it was (`    at f (file:line:column)` lines, 1-based).
pub fn loop_timeout_error(timeout: Duration, code: &TransformedCode, stack: Option<String>) -> JsError {
    let position = stack.as_deref().and_then(first_position).map(|(line, column)| {
        let (l, c) =
            crate::plugins::transform::enclosing_loop_start(&code.code, line, column).unwrap_or((line, column));
        format!(" on line {l}:{c}")
    });
    JsError {
        name: "Error".to_string(),
        message: format!(
            "Script execution timed out after looping for {}{}",
            seconds_text(timeout),
            position.unwrap_or_default()
        ),
        stack,
        ..JsError::default()
    }
}

/// `(line, column)` of the first plugin-code frame of a stack; column made 0-based.
pub fn first_position(stack: &str) -> Option<(u32, u32)> {
    for line in stack.lines() {
        let inner = line.rsplit_once('(').map(|(_, r)| r.trim_end_matches(')')).unwrap_or(line.trim());
        let mut parts = inner.rsplitn(3, ':');
        let (Some(col), Some(row), Some(file)) = (parts.next(), parts.next(), parts.next()) else { continue };
        if !PLUGIN_FRAMES.contains(&file) {
            continue;
        }
        if let (Ok(row), Ok(col)) = (row.parse::<u32>(), col.parse::<u32>()) {
            return Some((row, col.saturating_sub(1)));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages() {
        assert_eq!(seconds_text(Duration::from_secs(1)), "1 second");
        assert_eq!(seconds_text(Duration::from_secs(30)), "30 seconds");
        assert_eq!(seconds_text(Duration::from_millis(500)), "0.5 seconds");
        assert_eq!(first_position("    at f (prelude:3:1)\n    at processEvent (index.ts:3:17)\n"), Some((3, 16)));
        assert_eq!(first_position("    at <eval> (eval_script:4:17)\n"), Some((4, 16)));
    }
}

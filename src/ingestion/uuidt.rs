//! UUIDT: the time-sortable UUID the reference uses for event, person and definition ids
//! (6 bytes of Unix milliseconds, a 2-byte per-millisecond series, 8 random bytes).
//!
//! Owns only id generation; parsing/validating incoming uuids lives in `process_event`.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use once_cell::sync::Lazy;
use rand::RngCore;
use uuid::Uuid;

/// The reference clears its per-millisecond map once it holds more than this many entries.
const MAX_TRACKED_MILLISECONDS: usize = 10_000;

static SERIES_PER_MS: Lazy<Mutex<HashMap<u64, u16>>> = Lazy::new(|| Mutex::new(HashMap::new()));

fn next_series(unix_ms: u64) -> u16 {
    // A poisoned lock only means another thread panicked mid-update; the map is still usable.
    let mut series_per_ms = SERIES_PER_MS.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    let series = series_per_ms.get(&unix_ms).copied().unwrap_or(0);
    if series_per_ms.len() > MAX_TRACKED_MILLISECONDS {
        series_per_ms.clear();
    }
    series_per_ms.insert(unix_ms, series.wrapping_add(1));
    series
}

/// A new UUIDT for the current time.
pub fn new_uuidt() -> Uuid {
    let unix_ms = SystemTime::now().duration_since(UNIX_EPOCH).map(|elapsed| elapsed.as_millis() as u64).unwrap_or(0);
    uuidt_at(unix_ms)
}

/// A new UUIDT for the given Unix time in milliseconds.
pub fn uuidt_at(unix_ms: u64) -> Uuid {
    let mut bytes = [0u8; 16];
    bytes[..6].copy_from_slice(&unix_ms.to_be_bytes()[2..]);
    bytes[6..8].copy_from_slice(&next_series(unix_ms).to_be_bytes());
    rand::rng().fill_bytes(&mut bytes[8..]);
    Uuid::from_bytes(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn time_prefix_and_first_series_of_a_millisecond() {
        let unix_ms = 1_600_000_000_123u64;
        let id = uuidt_at(unix_ms).to_string();
        let expected_prefix = format!("{unix_ms:012x}");
        assert_eq!(&id[..8], &expected_prefix[..8]);
        assert_eq!(&id[9..13], &expected_prefix[8..12]);
        assert_eq!(&id[14..18], "0000");
        assert_eq!(&uuidt_at(unix_ms).to_string()[14..18], "0001");
    }
}

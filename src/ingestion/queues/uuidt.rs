//! UUIDT: the reference's time-ordered UUIDs (`UUIDT` in `src/utils/utils.ts`, itself a port of
//! PostHog's Python `UUIDT`): 48 bits of Unix time in milliseconds, a 16-bit per-millisecond series
//! counter, then 64 random bits. Used for event uuids the server makes up, dead-letter ids and
//! plugin log entry ids. Owns only the generator.

use std::sync::Mutex;

use chrono::Utc;
use uuid::Uuid;

/// The last millisecond a UUIDT was made in and the next series number for it. The reference keeps
/// a map of milliseconds; only the current one matters for uniqueness within this process.
static SERIES: Mutex<(i64, u16)> = Mutex::new((i64::MIN, 0));

/// A new UUIDT for the current time.
pub fn new_uuidt() -> Uuid {
    uuidt_at(Utc::now().timestamp_millis())
}

/// A new UUIDT for the given Unix time in milliseconds.
pub fn uuidt_at(unix_time_ms: i64) -> Uuid {
    let series = {
        // A poisoned lock only means another thread panicked mid-update; the counter is still usable.
        let mut state = SERIES.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if state.0 != unix_time_ms {
            *state = (unix_time_ms, 0);
        }
        let series = state.1;
        state.1 = state.1.wrapping_add(1);
        series
    };
    let mut bytes = [0u8; 16];
    bytes[..6].copy_from_slice(&(unix_time_ms as u64).to_be_bytes()[2..]);
    bytes[6..8].copy_from_slice(&series.to_be_bytes());
    bytes[8..].copy_from_slice(&rand::random::<[u8; 8]>());
    Uuid::from_bytes(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn time_then_series_then_random() {
        let first = uuidt_at(1_635_422_400_000);
        let second = uuidt_at(1_635_422_400_000);
        assert!(first.to_string().starts_with("017cc6c5-6e00-"));
        assert_eq!(&first.as_bytes()[..6], &second.as_bytes()[..6]);
        let series = |id: &Uuid| u16::from_be_bytes([id.as_bytes()[6], id.as_bytes()[7]]);
        assert_eq!(series(&second), series(&first).wrapping_add(1));
        assert!(new_uuidt() > first);
    }
}

//! The job as every queue stores it: `{type, payload, timestamp, pluginConfigId,
//! pluginConfigTeam}` (the reference's `EnqueuedJob`), serialized with exactly those keys in that
//! order (graphile payload, file queue line).

use serde::{Deserialize, Deserializer, Serialize};
use serde_json::Value;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EnqueuedJob {
    /// The plugin's job name (`meta.jobs.<type>`).
    #[serde(rename = "type")]
    pub job_type: String,
    pub payload: Value,
    /// When to run, epoch milliseconds.
    #[serde(deserialize_with = "epoch_millis")]
    pub timestamp: i64,
    #[serde(rename = "pluginConfigId")]
    pub plugin_config_id: i64,
    #[serde(rename = "pluginConfigTeam")]
    pub plugin_config_team: i64,
}

impl EnqueuedJob {
    /// The run time as a UTC instant (out-of-range timestamps clamp to the epoch).
    pub fn run_at(&self) -> chrono::DateTime<chrono::Utc> {
        chrono::DateTime::from_timestamp_millis(self.timestamp).unwrap_or_default()
    }
}

/// JavaScript numbers: a fractional millisecond count (`Date.now() + 1.5`) is accepted and
/// truncated as `new Date(x)` does.
fn epoch_millis<'de, D: Deserializer<'de>>(deserializer: D) -> Result<i64, D::Error> {
    let number = serde_json::Number::deserialize(deserializer)?;
    number
        .as_i64()
        .or_else(|| number.as_f64().filter(|value| value.is_finite()).map(|value| value.trunc() as i64))
        .ok_or_else(|| serde::de::Error::custom(format!("invalid job timestamp {number}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serializes_with_the_reference_keys_in_order() {
        let job = EnqueuedJob {
            job_type: "pluginJob".into(),
            payload: serde_json::json!({"key": "value"}),
            timestamp: 1000000000,
            plugin_config_id: 2,
            plugin_config_team: 3,
        };
        let text = serde_json::to_string(&job).unwrap();
        assert_eq!(
            text,
            r#"{"type":"pluginJob","payload":{"key":"value"},"timestamp":1000000000,"pluginConfigId":2,"pluginConfigTeam":3}"#
        );
        let fractional: EnqueuedJob = serde_json::from_str(&text.replace("1000000000", "1000000000.7")).unwrap();
        assert_eq!(fractional, job);
    }
}

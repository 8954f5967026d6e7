//! What the REST facades' host sides share (google.rs, snowflake.rs): the retry schedule
//! (retry-request's and snowflake-sdk's: an attempt, then after `2^n` s plus up to 1 s of jitter
//! another, while the outcome is retryable, retries are left and the next attempt still fits
//! before the deadline), a request's query parameters from the facade's JSON, and the bounds
//! every request meets before it is sent (body size, a turn among the config's requests).

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Map, Value};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::super::runtime::network_settings;

/// Refuses a request body over the plugins' fetch limit (`PLUGIN_FETCH_MAX_RESPONSE_BYTES`);
/// the refusal's text.
pub fn check_body_size(body: Option<&[u8]>) -> Result<(), String> {
    let limit = network_settings().max_response_bytes;
    match body {
        Some(body) if body.len() > limit => Err(format!(
            "The plugin server refused a request body over {limit} bytes (PLUGIN_FETCH_MAX_RESPONSE_BYTES)"
        )),
        _ => Ok(()),
    }
}

/// Waits for a turn among the config's requests in flight; fails only once the `client`'s
/// semaphore is closed (the config is going away).
pub async fn take_turn(in_flight: &Arc<Semaphore>, client: &str) -> Result<OwnedSemaphorePermit, String> {
    in_flight.clone().acquire_owned().await.map_err(|_| format!("the plugin's {client} client is shut down"))
}

/// An attempt is not started with less time than this left.
pub const MIN_ATTEMPT_TIME: Duration = Duration::from_millis(100);

/// Runs `attempt` until its outcome is not `retryable`, `max_retries` retries are spent, or the
/// next pause would leave less than [`MIN_ATTEMPT_TIME`] before `deadline`; the last outcome.
pub async fn with_retries<T, E, F, Fut>(
    max_retries: u32,
    deadline: Instant,
    retryable: impl Fn(&Result<T, E>) -> bool,
    mut attempt: F,
) -> Result<T, E>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let mut retries = 0u32;
    loop {
        let outcome = attempt().await;
        if retryable(&outcome) && retries < max_retries {
            let pause = Duration::from_secs(1 << retries.min(16)) + Duration::from_millis(rand::random::<u64>() % 1000);
            if Instant::now() + pause + MIN_ATTEMPT_TIME < deadline {
                retries += 1;
                tokio::time::sleep(pause).await;
                continue;
            }
        }
        return outcome;
    }
}

/// Appends `query`'s parameters to `url`: strings as they are, `null`s left out, other values as
/// their JSON text.
pub fn append_query(url: &mut url::Url, query: &Map<String, Value>) {
    if query.values().all(Value::is_null) {
        // Nothing to add: no bare `?` either.
        return;
    }
    let mut pairs = url.query_pairs_mut();
    for (name, value) in query {
        match value {
            Value::Null => {}
            Value::String(text) => {
                pairs.append_pair(name, text);
            }
            other => {
                pairs.append_pair(name, &other.to_string());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_parameters_are_appended_as_text_without_a_bare_question_mark() {
        let mut url = url::Url::parse("https://bigquery.googleapis.com/bigquery/v2/projects/p/queries/j").unwrap();
        append_query(&mut url, serde_json::json!({"location": null}).as_object().unwrap());
        assert_eq!(url.as_str(), "https://bigquery.googleapis.com/bigquery/v2/projects/p/queries/j");
        append_query(
            &mut url,
            serde_json::json!({"location": "EU", "maxResults": 10, "deleteContents": false, "skip": null})
                .as_object()
                .unwrap(),
        );
        assert_eq!(url.query(), Some("location=EU&maxResults=10&deleteContents=false"));
    }
}

//! Shared support for the actions tests: the reference's `createTestPerson`, person rows in
//! Postgres (create and `fetchPerson`), and an HTTP listener (over `common::http_stub`) standing in
//! for webhook and REST hook endpoints.
#![allow(dead_code)]

use plugin_server::model::Person;
use serde_json::{json, Value};
use sqlx::PgPool;
use tokio::sync::mpsc;
use uuid::Uuid;

use crate::common::http_stub::http_stub;
use crate::common::TEAM_ID;

/// `createTestPerson({properties})`: a person that is not in the database.
pub fn test_person(properties: Value) -> Person {
    Person {
        id: 2,
        created_at: chrono::DateTime::from_timestamp(18_000_000, 0).expect("time"),
        properties: properties.as_object().cloned().unwrap_or_default(),
        properties_last_updated_at: Some(json!({})),
        properties_last_operation: None,
        team_id: TEAM_ID,
        is_user_id: Some(0),
        is_identified: true,
        uuid: Uuid::parse_str("F99FA0A1-E0C2-4CFE-A09A-4C3C4327A4C8").expect("uuid"),
    }
}

/// A person row with one distinct id in team 2.
pub async fn create_person(pool: &PgPool, distinct_id: &str, is_identified: bool) -> Person {
    let person: Person = sqlx::query_as(&format!(
        "INSERT INTO posthog_person (created_at, properties, properties_last_updated_at, team_id, is_user_id,
            is_identified, uuid) VALUES (now(), '{{}}', '{{}}', $1, NULL, $2, $3) RETURNING {}",
        Person::COLUMNS
    ))
    .bind(TEAM_ID)
    .bind(is_identified)
    .bind(Uuid::now_v7())
    .fetch_one(pool)
    .await
    .expect("create person");
    sqlx::query("INSERT INTO posthog_persondistinctid (distinct_id, person_id, team_id) VALUES ($1, $2, $3)")
        .bind(distinct_id)
        .bind(person.id)
        .bind(TEAM_ID)
        .execute(pool)
        .await
        .expect("add distinct id");
    person
}

/// The reference's `fetchPerson(team 2, distinct_id)`.
pub async fn fetch_person(pool: &PgPool, distinct_id: &str) -> Option<Person> {
    let columns =
        Person::COLUMNS.split(',').map(|c| format!("posthog_person.{}", c.trim())).collect::<Vec<_>>().join(", ");
    sqlx::query_as::<_, Person>(&format!(
        "SELECT {columns} FROM posthog_person
         JOIN posthog_persondistinctid ON (posthog_persondistinctid.person_id = posthog_person.id)
         WHERE posthog_person.team_id = $1 AND posthog_persondistinctid.team_id = $1
            AND posthog_persondistinctid.distinct_id = $2"
    ))
    .bind(TEAM_ID)
    .bind(distinct_id)
    .fetch_optional(pool)
    .await
    .expect("fetch person")
}

/// One request as the listener saw it.
#[derive(Debug)]
pub struct Received {
    pub method: String,
    pub path: String,
    pub content_type: Option<String>,
    pub authorization: Option<String>,
    pub body: String,
}

/// An HTTP stub on 127.0.0.1 answering every request with `status` and `body`.
pub async fn listener(status: u16, body: &'static str) -> (String, mpsc::UnboundedReceiver<Received>) {
    let (address, mut requests) = http_stub("127.0.0.1:0", move |_| (status, body.as_bytes().to_vec())).await;
    let (sender, receiver) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(request) = requests.recv().await {
            let received = Received {
                method: request.method.clone(),
                path: request.target.clone(),
                content_type: request.header("content-type").map(str::to_owned),
                authorization: request.header("authorization").map(str::to_owned),
                body: request.body_text(),
            };
            if sender.send(received).is_err() {
                break;
            }
        }
    });
    (format!("http://{address}"), receiver)
}

/// The next request the listener received (waits up to 10 s).
pub async fn next(receiver: &mut mpsc::UnboundedReceiver<Received>) -> Received {
    tokio::time::timeout(std::time::Duration::from_secs(10), receiver.recv())
        .await
        .expect("request in time")
        .expect("request")
}

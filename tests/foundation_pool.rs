//! The server's PostgreSQL pool (`hub::connect_postgres_with`): connections are not pinged at
//! every checkout (the reference's node-postgres pool never pings), but one that died while idle
//! is noticed and replaced before a statement is sent on it.

mod common;

use std::time::Duration;

use sqlx::Connection;

#[tokio::test]
async fn a_connection_that_died_while_idle_is_replaced_before_it_is_used() {
    let url = common::database_url("postgres");
    let pool = plugin_server::hub::connect_postgres_with(url.parse().unwrap(), 1).await.unwrap();
    let first: i32 = sqlx::query_scalar("SELECT pg_backend_pid()").fetch_one(&pool).await.unwrap();
    // Busy: the same connection again, without a ping in between.
    let again: i32 = sqlx::query_scalar("SELECT pg_backend_pid()").fetch_one(&pool).await.unwrap();
    assert_eq!(again, first);
    // PostgreSQL drops it while the pool holds it idle (a restart, an idle-session timeout).
    let mut admin = sqlx::PgConnection::connect(&url).await.unwrap();
    let _: bool =
        sqlx::query_scalar("SELECT pg_terminate_backend($1)").bind(first).fetch_one(&mut admin).await.unwrap();
    tokio::time::sleep(Duration::from_secs(6)).await;
    let replaced: i32 = sqlx::query_scalar("SELECT pg_backend_pid()").fetch_one(&pool).await.unwrap();
    assert_ne!(replaced, first);
}

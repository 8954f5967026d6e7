//! Static cohorts in ClickHouse (`person_static_cohort`), which the matcher consults before
//! Postgres in the ClickHouse pipeline (`KAFKA_ENABLED`), as the reference's
//! `doesPersonBelongToCohort` does. Owns only this lookup; the connection is `crate::clickhouse`'s,
//! the query's text `db::actions`'.

use async_trait::async_trait;
use uuid::Uuid;

use super::StaticCohortLookup;
use crate::clickhouse::{ClickHouse, ClickHouseError};
use crate::infra::BoxError;

/// A failed lookup, with the ClickHouse it asked.
#[derive(Debug, thiserror::Error)]
#[error("ClickHouse at {url}: {source}")]
struct StaticCohortError {
    url: String,
    source: ClickHouseError,
}

/// `StaticCohortLookup` against ClickHouse.
pub struct ClickHouseStaticCohorts {
    clickhouse: ClickHouse,
}

impl ClickHouseStaticCohorts {
    pub fn new(clickhouse: ClickHouse) -> ClickHouseStaticCohorts {
        ClickHouseStaticCohorts { clickhouse }
    }
}

#[async_trait]
impl StaticCohortLookup for ClickHouseStaticCohorts {
    /// A row means the person is in the static cohort; a failed query is an error (the reference throws).
    async fn is_in_static_cohort(&self, team_id: i64, cohort_id: i64, person_uuid: Uuid) -> Result<bool, BoxError> {
        let rows = self
            .clickhouse
            .fetch_all::<u8>(&crate::db::actions::static_cohort_query(team_id, cohort_id, person_uuid))
            .await
            .map_err(|source| StaticCohortError { url: self.clickhouse.url().to_string(), source })?;
        Ok(!rows.is_empty())
    }
}

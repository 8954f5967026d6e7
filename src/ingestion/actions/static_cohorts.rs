//! Static cohorts in ClickHouse (`person_static_cohort`), which the matcher consults before
//! Postgres in the ClickHouse pipeline (`KAFKA_ENABLED`), as the reference's
//! `doesPersonBelongToCohort` does. Owns only this lookup; the connection is `crate::clickhouse`'s.

use async_trait::async_trait;
use uuid::Uuid;

use super::StaticCohortLookup;
use crate::clickhouse::ClickHouse;

/// `StaticCohortLookup` against ClickHouse.
pub struct ClickHouseStaticCohorts {
    clickhouse: ClickHouse,
}

/// ClickHouse string literal escaping (the reference's `escapeClickHouseString`).
fn escape_string(text: &str) -> String {
    text.replace('\\', "\\\\").replace('\'', "\\'")
}

impl ClickHouseStaticCohorts {
    pub fn new(clickhouse: ClickHouse) -> ClickHouseStaticCohorts {
        ClickHouseStaticCohorts { clickhouse }
    }

    /// The query the reference runs (on one line; the client appends the output format).
    pub fn query(team_id: i64, cohort_id: i64, person_uuid: Uuid) -> String {
        format!(
            "SELECT 1 FROM person_static_cohort WHERE team_id = {team_id} AND cohort_id = {cohort_id} \
             AND person_id = '{}' LIMIT 1",
            escape_string(&person_uuid.to_string())
        )
    }
}

#[async_trait]
impl StaticCohortLookup for ClickHouseStaticCohorts {
    /// A row means the person is in the static cohort; a failed query is an error (the reference throws).
    async fn is_in_static_cohort(&self, team_id: i64, cohort_id: i64, person_uuid: Uuid) -> Result<bool, String> {
        let rows = self
            .clickhouse
            .fetch_all::<u8>(&Self::query(team_id, cohort_id, person_uuid))
            .await
            .map_err(|error| format!("ClickHouse at {}: {error}", self.clickhouse.url()))?;
        Ok(!rows.is_empty())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_escapes_the_person_id() {
        assert_eq!(escape_string(r"a'b\c"), r"a\'b\\c");
        assert_eq!(
            ClickHouseStaticCohorts::query(2, 7, Uuid::nil()),
            "SELECT 1 FROM person_static_cohort WHERE team_id = 2 AND cohort_id = 7 \
             AND person_id = '00000000-0000-0000-0000-000000000000' LIMIT 1"
        );
    }
}

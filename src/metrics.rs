//! Observability: statsd metrics (cadence), Sentry, status reports and internal metrics.

//! The scheduler: runEveryMinute/Hour/Day of every loaded plugin config on the reference's cron boundaries, on exactly one server of a cluster (Redis lock).

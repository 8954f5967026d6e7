//! GeoIP: the MaxMind database kept as a brotli attachment, its refresh, and the shared reader behind `geoip.locate`.

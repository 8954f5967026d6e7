//! Pub/sub: plugin reloads and action reloads/drops announced on Redis channels.

//! Pub/sub: plugin reloads and action reloads/drops announced by Django on Redis channels.
//!
//! | channel | message | action |
//! |---|---|---|
//! | `PLUGINS_RELOAD_PUBSUB_CHANNEL` (`reload-plugins`) | ignored | reload plugins, then the schedule |
//! | `reload-action` | `{"teamId": n, "actionId": n}` | reload that action |
//! | `drop-action` | `{"teamId": n, "actionId": n}` | drop that action |
//!
//! One dedicated Redis connection subscribes; messages are handled one at a time in arrival order.
//! What a reload means is the [`ReloadHandler`]'s business (the plugin pool and the action
//! manager). Unlike the reference, a lost connection is re-established (with a short back-off)
//! instead of leaving the server deaf to reloads, and a malformed action message is logged and
//! skipped.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;
use serde::Deserialize;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::infra::BoxError;
use crate::metrics::sentry::capture_error_message;
use crate::schedule::Scheduler;

pub const RELOAD_ACTION_CHANNEL: &str = "reload-action";
pub const DROP_ACTION_CHANNEL: &str = "drop-action";

/// How long to wait before reconnecting after the subscription broke.
pub const RECONNECT_DELAY: Duration = Duration::from_secs(1);

/// What reload messages trigger (implemented over the plugin pool and the action manager).
#[async_trait]
pub trait ReloadHandler: Send + Sync + 'static {
    /// Reload every plugin config from the database (the reference's `reloadPlugins` broadcast).
    async fn reload_plugins(&self) -> Result<(), BoxError>;
    async fn reload_action(&self, team_id: i64, action_id: i64) -> Result<(), BoxError>;
    async fn drop_action(&self, team_id: i64, action_id: i64) -> Result<(), BoxError>;
}

/// A `reload-action` / `drop-action` message.
#[derive(Debug, Deserialize, PartialEq)]
pub struct ActionMessage {
    #[serde(rename = "teamId")]
    pub team_id: i64,
    #[serde(rename = "actionId")]
    pub action_id: i64,
}

/// The subscriber component.
pub struct PubSub {
    client: redis::Client,
    reload_channel: String,
    handler: Arc<dyn ReloadHandler>,
    scheduler: Option<Arc<Scheduler>>,
}

impl PubSub {
    /// `reload_channel` is `PLUGINS_RELOAD_PUBSUB_CHANNEL`; `scheduler`, when given, reloads its
    /// schedule after every plugin reload.
    pub fn new(
        client: redis::Client,
        reload_channel: &str,
        handler: Arc<dyn ReloadHandler>,
        scheduler: Option<Arc<Scheduler>>,
    ) -> PubSub {
        PubSub { client, reload_channel: reload_channel.to_string(), handler, scheduler }
    }

    fn channels(&self) -> [&str; 3] {
        [self.reload_channel.as_str(), RELOAD_ACTION_CHANNEL, DROP_ACTION_CHANNEL]
    }

    /// Subscribes and handles messages until `shutdown`.
    pub async fn run(self, shutdown: CancellationToken) {
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                ended = self.subscribe_and_handle() => {
                    if let Err(error) = ended {
                        error!("🔴 Pub-sub connection failed: {error}");
                    } else {
                        warn!("⚠️ Pub-sub connection closed");
                    }
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(RECONNECT_DELAY) => {}
            }
        }
        info!("🛑 Pub-sub stopped for channels: {}", self.channels().join(", "));
    }

    /// One subscription's life: returns when the connection ends.
    async fn subscribe_and_handle(&self) -> Result<(), redis::RedisError> {
        let mut pubsub = self.client.get_async_pubsub().await?;
        for channel in self.channels() {
            pubsub.subscribe(channel).await?;
        }
        info!("👀 Pub-sub started for channels: {}", self.channels().join(", "));
        let mut messages = pubsub.on_message();
        while let Some(message) = messages.next().await {
            let channel = message.get_channel_name().to_string();
            let payload: String = message.get_payload().unwrap_or_default();
            self.handle(&channel, &payload).await;
        }
        Ok(())
    }

    /// Handles one message.
    pub async fn handle(&self, channel: &str, payload: &str) {
        if channel == self.reload_channel {
            info!("⚡ Reloading plugins!");
            if let Err(error) = self.handler.reload_plugins().await {
                error!("🔴 Reloading plugins failed: {error}");
            }
            if let Some(scheduler) = &self.scheduler {
                if let Err(error) = scheduler.reload().await {
                    error!("🔴 Reloading the plugin schedule failed: {error}");
                }
            }
        } else if channel == RELOAD_ACTION_CHANNEL || channel == DROP_ACTION_CHANNEL {
            let message = match serde_json::from_str::<ActionMessage>(payload) {
                Ok(message) => message,
                Err(parse_error) => {
                    error!("🔴 Ignoring a malformed {channel} message {payload:?}: {parse_error}");
                    return;
                }
            };
            let result = if channel == RELOAD_ACTION_CHANNEL {
                self.handler.reload_action(message.team_id, message.action_id).await
            } else {
                self.handler.drop_action(message.team_id, message.action_id).await
            };
            if let Err(error) = result {
                error!(
                    "🔴 Handling {channel} for action {} of team {} failed: {error}",
                    message.action_id, message.team_id
                );
            }
        } else {
            capture_error_message(&format!(
                "Received a pubsub message for unassociated channel {channel}! Associated channels are: {}",
                self.channels().join(", ")
            ));
        }
    }
}

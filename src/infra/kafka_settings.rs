//! librdkafka client settings shared by the consumer and the producer: brokers (`KAFKA_HOSTS`),
//! client id, timeouts and TLS from `KAFKA_CLIENT_CERT_B64` / `KAFKA_CLIENT_CERT_KEY_B64` /
//! `KAFKA_TRUSTED_CERT_B64` (used only when all three are set, as in the reference).
//!
//! TLS: the reference disables certificate verification entirely (`rejectUnauthorized: false`)
//! while its comment says the intent is only to skip the hostname check (Heroku Kafka has no stable
//! hostnames) and to trust the given CA. We do what the comment says: the broker's certificate must
//! chain to `KAFKA_TRUSTED_CERT_B64`, and the hostname is not checked.

use base64::Engine;
use rdkafka::config::ClientConfig;
use thiserror::Error;

use crate::config::Config;
use crate::infra::BoxError;

#[derive(Debug, Error)]
pub enum KafkaSetupError {
    #[error("You must set KAFKA_HOSTS to process events from Kafka!")]
    MissingHosts,
    #[error("Invalid value for {0}: not base64-encoded PEM ({1})")]
    InvalidCertificate(&'static str, #[source] BoxError),
    #[error("Cannot create Kafka client: {0}")]
    Client(#[from] rdkafka::error::KafkaError),
    #[error("Cannot start the Kafka polling thread: {0}")]
    Poller(#[from] std::io::Error),
    #[error("Kafka consumer did not join its group within {0:?}")]
    JoinTimeout(std::time::Duration),
}

/// The reference's client id: `plugin-server-v<version>-<instance id>`.
pub fn client_id(instance_id: &uuid::Uuid) -> String {
    format!("plugin-server-v{}-{instance_id}", crate::VERSION)
}

fn decode_pem(name: &'static str, value: &str) -> Result<String, KafkaSetupError> {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(value.trim())
        .map_err(|error| KafkaSetupError::InvalidCertificate(name, error.into()))?;
    String::from_utf8(bytes).map_err(|error| KafkaSetupError::InvalidCertificate(name, error.into()))
}

/// Settings every client gets: brokers, client id, connection timeout and TLS.
pub fn base_config(config: &Config, client_id: &str) -> Result<ClientConfig, KafkaSetupError> {
    let hosts =
        config.KAFKA_HOSTS.as_deref().filter(|hosts| !hosts.trim().is_empty()).ok_or(KafkaSetupError::MissingHosts)?;
    let mut client = ClientConfig::new();
    client
        .set("bootstrap.servers", hosts)
        .set("client.id", client_id)
        .set("socket.connection.setup.timeout.ms", "3000")
        .set("log_level", "4");
    if let (Some(cert), Some(key), Some(ca)) =
        (&config.KAFKA_CLIENT_CERT_B64, &config.KAFKA_CLIENT_CERT_KEY_B64, &config.KAFKA_TRUSTED_CERT_B64)
    {
        client
            .set("security.protocol", "ssl")
            .set("ssl.certificate.pem", decode_pem("KAFKA_CLIENT_CERT_B64", cert)?)
            .set("ssl.key.pem", decode_pem("KAFKA_CLIENT_CERT_KEY_B64", key)?)
            .set("ssl.ca.pem", decode_pem("KAFKA_TRUSTED_CERT_B64", ca)?)
            .set("ssl.endpoint.identification.algorithm", "none");
    }
    Ok(client)
}

/// Producer settings: acks from all in-sync replicas (the kafkajs default), idempotence so
/// librdkafka's own retries cannot duplicate or reorder.
pub fn producer_config(config: &Config, client_id: &str) -> Result<ClientConfig, KafkaSetupError> {
    let mut client = base_config(config, client_id)?;
    client
        .set("acks", "all")
        .set("enable.idempotence", "true")
        .set("linger.ms", "5")
        .set("message.max.bytes", crate::sinks::kafka_producer::KAFKA_MESSAGE_MAX_BYTES.to_string())
        .set("message.timeout.ms", "120000");
    Ok(client)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn get(client: &ClientConfig, key: &str) -> Option<String> {
        client.get(key).map(str::to_string)
    }

    #[test]
    fn tls_only_when_all_three_certificates_are_set() {
        let b64 = |text: &str| base64::engine::general_purpose::STANDARD.encode(text);
        let (cert, key, ca) = (b64("CERT"), b64("KEY"), b64("CA"));
        let config = Config::from_pairs(&[
            ("KAFKA_HOSTS", "a:9092,b:9092"),
            ("KAFKA_CLIENT_CERT_B64", &cert),
            ("KAFKA_CLIENT_CERT_KEY_B64", &key),
            ("KAFKA_TRUSTED_CERT_B64", &ca),
        ])
        .unwrap();
        let client = base_config(&config, "id").unwrap();
        assert_eq!(get(&client, "bootstrap.servers").as_deref(), Some("a:9092,b:9092"));
        assert_eq!(get(&client, "security.protocol").as_deref(), Some("ssl"));
        assert_eq!(get(&client, "ssl.certificate.pem").as_deref(), Some("CERT"));
        assert_eq!(get(&client, "ssl.key.pem").as_deref(), Some("KEY"));
        assert_eq!(get(&client, "ssl.ca.pem").as_deref(), Some("CA"));
        assert_eq!(get(&client, "ssl.endpoint.identification.algorithm").as_deref(), Some("none"));

        let partial = Config::from_pairs(&[("KAFKA_HOSTS", "a:9092"), ("KAFKA_CLIENT_CERT_B64", &cert)]).unwrap();
        assert_eq!(get(&base_config(&partial, "id").unwrap(), "security.protocol"), None);

        let invalid = Config::from_pairs(&[
            ("KAFKA_HOSTS", "a:9092"),
            ("KAFKA_CLIENT_CERT_B64", "%%%"),
            ("KAFKA_CLIENT_CERT_KEY_B64", &key),
            ("KAFKA_TRUSTED_CERT_B64", &ca),
        ])
        .unwrap();
        assert!(matches!(
            base_config(&invalid, "id"),
            Err(KafkaSetupError::InvalidCertificate("KAFKA_CLIENT_CERT_B64", _))
        ));
    }

    #[test]
    fn hosts_are_required() {
        let error = base_config(&Config::from_pairs(&[]).unwrap(), "id").unwrap_err();
        assert_eq!(error.to_string(), "You must set KAFKA_HOSTS to process events from Kafka!");
        assert_eq!(
            client_id(&uuid::Uuid::nil()),
            format!("plugin-server-v{}-00000000-0000-0000-0000-000000000000", crate::VERSION)
        );
    }
}

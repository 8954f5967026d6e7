//! Actions: loading each team's actions, matching events against their steps, and firing REST hooks and webhooks.

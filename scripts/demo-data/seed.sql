-- Demo rows for `scripts/demo`: an organization, a user, team 2 (api token `demo-token`) and one
-- source plugin enabled for it. Idempotent.
INSERT INTO posthog_organization (id, name, plugins_access_level)
VALUES ('018c0000-0000-7000-8000-000000000001', 'Demo organization', 9) ON CONFLICT DO NOTHING;
INSERT INTO posthog_user (id, uuid, password, first_name, email, distinct_id)
VALUES (1, '018c0000-0000-7000-8000-000000000002', 'unusable', 'Demo', 'demo@example.com', 'demo-user')
ON CONFLICT DO NOTHING;
INSERT INTO posthog_team (id, organization_id, name, api_token, uuid, anonymize_ips, ingested_event)
VALUES (2, '018c0000-0000-7000-8000-000000000001', 'Demo project', 'demo-token',
        '018c0000-0000-7000-8000-000000000003', false, false) ON CONFLICT DO NOTHING;
INSERT INTO posthog_plugin (id, organization_id, plugin_type, name, description, source, config_schema)
VALUES (1, '018c0000-0000-7000-8000-000000000001', 'source', 'demo-greeter',
        'Adds a greeting and the hour of day to every event',
        $js$
// A plugin as a PostHog user writes them: ES module, meta API, a scheduled task.
export async function setupPlugin({ config, global }) {
    global.greeting = config.greeting || 'hello'
}

export async function processEvent(event, { global, cache }) {
    const seen = await cache.incr('events_seen')
    event.properties = { ...event.properties, greeting: global.greeting, seen_by_plugin: seen }
    return event
}

export function onEvent(event) {
    if (event.event === 'demo signup') {
        console.log(`new signup from ${event.distinct_id}`)
    }
}

export async function runEveryMinute({ cache }) {
    console.info(`events seen so far: ${await cache.get('events_seen')}`)
}
$js$, '[{"key": "greeting", "name": "Greeting", "type": "string", "default": "hello"}]')
ON CONFLICT DO NOTHING;
INSERT INTO posthog_pluginconfig (id, team_id, plugin_id, enabled, "order", config)
VALUES (1, 2, 1, true, 0, '{"greeting": "hello from the demo plugin"}') ON CONFLICT DO NOTHING;
SELECT setval('posthog_plugin_id_seq', GREATEST((SELECT max(id) FROM posthog_plugin), 1));
SELECT setval('posthog_pluginconfig_id_seq', GREATEST((SELECT max(id) FROM posthog_pluginconfig), 1));

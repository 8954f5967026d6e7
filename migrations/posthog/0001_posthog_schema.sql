-- The standalone PostHog schema: every table and column the plugin server (and its tests) read or
-- write, with PostHog's (Django's, autumn 2021) names and types. In production PostHog's Django
-- migrations own these tables and the server never applies this file; tests and the demo do.
-- Idempotent (IF NOT EXISTS everywhere) so `scripts/demo` can apply it again.
-- Foreign keys are DEFERRABLE INITIALLY DEFERRED as Django creates them: FK violations inside
-- explicit transactions surface at COMMIT, which the merge/race handling relies on.

CREATE EXTENSION IF NOT EXISTS pgcrypto;

CREATE TABLE IF NOT EXISTS posthog_organization (
    id uuid PRIMARY KEY,
    name varchar(64) NOT NULL,
    slug varchar(48) UNIQUE,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    available_features varchar(64)[] NOT NULL DEFAULT '{}',
    plugins_access_level smallint NOT NULL DEFAULT 9,
    for_internal_metrics boolean NOT NULL DEFAULT false,
    personalization jsonb NOT NULL DEFAULT '{}',
    setup_section_2_completed boolean NOT NULL DEFAULT true,
    domain_whitelist varchar(256)[] NOT NULL DEFAULT '{}',
    is_member_join_email_enabled boolean NOT NULL DEFAULT true
);

CREATE TABLE IF NOT EXISTS posthog_user (
    id serial PRIMARY KEY,
    password varchar(128) NOT NULL,
    last_login timestamptz,
    first_name varchar(150) NOT NULL,
    last_name varchar(150) NOT NULL DEFAULT '',
    is_staff boolean NOT NULL DEFAULT false,
    is_active boolean NOT NULL DEFAULT true,
    date_joined timestamptz NOT NULL DEFAULT now(),
    uuid uuid NOT NULL UNIQUE,
    email varchar(254) NOT NULL UNIQUE,
    distinct_id varchar(200) UNIQUE,
    events_column_config jsonb NOT NULL DEFAULT '{"active": "DEFAULT"}',
    temporary_token varchar(200),
    email_opt_in boolean,
    anonymize_data boolean DEFAULT false,
    toolbar_mode varchar(200),
    current_organization_id uuid,
    current_team_id integer
);

CREATE TABLE IF NOT EXISTS posthog_organizationmembership (
    id uuid PRIMARY KEY,
    organization_id uuid NOT NULL REFERENCES posthog_organization (id) DEFERRABLE INITIALLY DEFERRED,
    user_id integer NOT NULL REFERENCES posthog_user (id) DEFERRABLE INITIALLY DEFERRED,
    level smallint NOT NULL DEFAULT 1,
    joined_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    UNIQUE (organization_id, user_id)
);

CREATE TABLE IF NOT EXISTS posthog_team (
    id serial PRIMARY KEY,
    organization_id uuid NOT NULL REFERENCES posthog_organization (id) DEFERRABLE INITIALLY DEFERRED,
    api_token varchar(200) UNIQUE,
    app_urls varchar(200)[] NOT NULL DEFAULT '{}',
    name varchar(200),
    slack_incoming_webhook varchar(500),
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    anonymize_ips boolean NOT NULL DEFAULT false,
    completed_snippet_onboarding boolean NOT NULL DEFAULT false,
    ingested_event boolean NOT NULL DEFAULT false,
    uuid uuid NOT NULL UNIQUE,
    session_recording_opt_in boolean NOT NULL DEFAULT false,
    opt_out_capture boolean NOT NULL DEFAULT false,
    plugins_opt_in boolean NOT NULL DEFAULT false,
    is_demo boolean NOT NULL DEFAULT false,
    event_names jsonb NOT NULL DEFAULT '[]',
    event_names_with_usage jsonb NOT NULL DEFAULT '[]',
    event_properties jsonb NOT NULL DEFAULT '[]',
    event_properties_with_usage jsonb NOT NULL DEFAULT '[]',
    event_properties_numerical jsonb NOT NULL DEFAULT '[]',
    test_account_filters jsonb NOT NULL DEFAULT '[]',
    timezone varchar(240) NOT NULL DEFAULT 'UTC',
    data_attributes jsonb NOT NULL DEFAULT '["data-attr"]',
    access_control boolean NOT NULL DEFAULT false,
    signup_token varchar(200),
    session_recording_retention_period_days integer,
    correlation_config jsonb,
    primary_dashboard_id integer
);

CREATE TABLE IF NOT EXISTS posthog_personalapikey (
    id varchar(50) PRIMARY KEY,
    user_id integer NOT NULL REFERENCES posthog_user (id) DEFERRABLE INITIALLY DEFERRED,
    label varchar(40) NOT NULL,
    value varchar(50) NOT NULL UNIQUE,
    created_at timestamptz NOT NULL DEFAULT now(),
    last_used_at timestamptz,
    team_id integer REFERENCES posthog_team (id) DEFERRABLE INITIALLY DEFERRED
);

-- Persons ------------------------------------------------------------------------------------------

-- Exact column set (asserted by the reference's parity test): do not add columns.
CREATE TABLE IF NOT EXISTS posthog_person (
    id serial PRIMARY KEY,
    created_at timestamptz NOT NULL,
    properties jsonb NOT NULL DEFAULT '{}',
    properties_last_updated_at jsonb DEFAULT '{}',
    properties_last_operation jsonb,
    team_id integer NOT NULL REFERENCES posthog_team (id) DEFERRABLE INITIALLY DEFERRED,
    is_user_id integer REFERENCES posthog_user (id) DEFERRABLE INITIALLY DEFERRED,
    is_identified boolean NOT NULL DEFAULT false,
    uuid uuid NOT NULL
);
CREATE INDEX IF NOT EXISTS posthog_person_team_id ON posthog_person (team_id);
CREATE INDEX IF NOT EXISTS posthog_person_uuid ON posthog_person (uuid);

CREATE TABLE IF NOT EXISTS posthog_persondistinctid (
    id serial PRIMARY KEY,
    team_id integer NOT NULL REFERENCES posthog_team (id) DEFERRABLE INITIALLY DEFERRED,
    person_id integer NOT NULL REFERENCES posthog_person (id) DEFERRABLE INITIALLY DEFERRED,
    distinct_id varchar(400) NOT NULL,
    CONSTRAINT "unique distinct_id for team" UNIQUE (team_id, distinct_id)
);
CREATE INDEX IF NOT EXISTS posthog_persondistinctid_person_id ON posthog_persondistinctid (person_id);

CREATE TABLE IF NOT EXISTS posthog_cohort (
    id serial PRIMARY KEY,
    name varchar(400),
    description varchar(1000) NOT NULL DEFAULT '',
    deleted boolean NOT NULL DEFAULT false,
    groups jsonb NOT NULL DEFAULT '[]',
    team_id integer NOT NULL REFERENCES posthog_team (id) DEFERRABLE INITIALLY DEFERRED,
    created_at timestamptz,
    created_by_id integer REFERENCES posthog_user (id) DEFERRABLE INITIALLY DEFERRED,
    is_calculating boolean NOT NULL DEFAULT false,
    last_calculation timestamptz,
    errors_calculating integer NOT NULL DEFAULT 0,
    is_static boolean NOT NULL DEFAULT false
);

CREATE TABLE IF NOT EXISTS posthog_cohortpeople (
    id bigserial PRIMARY KEY,
    cohort_id integer NOT NULL REFERENCES posthog_cohort (id) DEFERRABLE INITIALLY DEFERRED,
    person_id integer NOT NULL REFERENCES posthog_person (id) DEFERRABLE INITIALLY DEFERRED
);
CREATE INDEX IF NOT EXISTS posthog_cohortpeople_cohort_person ON posthog_cohortpeople (cohort_id, person_id);

-- Events (Postgres pipeline) -----------------------------------------------------------------------

CREATE TABLE IF NOT EXISTS posthog_event (
    id serial PRIMARY KEY,
    created_at timestamptz,
    event varchar(200),
    distinct_id varchar(200) NOT NULL,
    properties jsonb NOT NULL DEFAULT '{}',
    team_id integer NOT NULL REFERENCES posthog_team (id) DEFERRABLE INITIALLY DEFERRED,
    timestamp timestamptz NOT NULL,
    elements jsonb DEFAULT '[]',
    elements_hash varchar(200),
    site_url varchar(200)
);
CREATE INDEX IF NOT EXISTS posthog_event_team_timestamp ON posthog_event (team_id, timestamp);
CREATE INDEX IF NOT EXISTS posthog_event_team_id_id ON posthog_event (team_id, id);

CREATE TABLE IF NOT EXISTS posthog_elementgroup (
    id serial PRIMARY KEY,
    team_id integer NOT NULL REFERENCES posthog_team (id) DEFERRABLE INITIALLY DEFERRED,
    hash varchar(400),
    UNIQUE (team_id, hash)
);

CREATE TABLE IF NOT EXISTS posthog_element (
    id serial PRIMARY KEY,
    text varchar(10000),
    tag_name varchar(1000),
    href varchar(10000),
    attr_id varchar(10000),
    attr_class varchar(200)[],
    nth_child integer,
    nth_of_type integer,
    attributes jsonb NOT NULL DEFAULT '{}',
    event_id integer REFERENCES posthog_event (id) DEFERRABLE INITIALLY DEFERRED,
    "order" integer,
    group_id integer REFERENCES posthog_elementgroup (id) DEFERRABLE INITIALLY DEFERRED
);
CREATE INDEX IF NOT EXISTS posthog_element_group_id ON posthog_element (group_id);

CREATE TABLE IF NOT EXISTS posthog_sessionrecordingevent (
    id serial PRIMARY KEY,
    created_at timestamptz,
    timestamp timestamptz NOT NULL,
    session_id varchar(200) NOT NULL,
    window_id varchar(200),
    distinct_id varchar(200) NOT NULL,
    snapshot_data jsonb NOT NULL,
    team_id integer NOT NULL REFERENCES posthog_team (id) DEFERRABLE INITIALLY DEFERRED
);
CREATE INDEX IF NOT EXISTS posthog_sessionrecordingevent_team_session ON posthog_sessionrecordingevent (team_id, session_id);

-- Definitions and groups ---------------------------------------------------------------------------

-- Exact column set: do not add columns.
CREATE TABLE IF NOT EXISTS posthog_eventdefinition (
    id uuid PRIMARY KEY,
    team_id integer NOT NULL REFERENCES posthog_team (id) DEFERRABLE INITIALLY DEFERRED,
    name varchar(400) NOT NULL,
    volume_30_day integer,
    query_usage_30_day integer,
    UNIQUE (team_id, name)
);

-- Exact column set: do not add columns.
CREATE TABLE IF NOT EXISTS posthog_propertydefinition (
    id uuid PRIMARY KEY,
    team_id integer NOT NULL REFERENCES posthog_team (id) DEFERRABLE INITIALLY DEFERRED,
    name varchar(400) NOT NULL,
    is_numerical boolean NOT NULL DEFAULT false,
    volume_30_day integer,
    query_usage_30_day integer,
    UNIQUE (team_id, name)
);

CREATE TABLE IF NOT EXISTS posthog_grouptypemapping (
    id serial PRIMARY KEY,
    team_id integer NOT NULL REFERENCES posthog_team (id) DEFERRABLE INITIALLY DEFERRED,
    group_type varchar(400) NOT NULL,
    group_type_index integer NOT NULL,
    CONSTRAINT unique_group_types UNIQUE (team_id, group_type),
    CONSTRAINT unique_event_column_indexes UNIQUE (team_id, group_type_index),
    CONSTRAINT group_type_index_is_less_than_or_equal_5 CHECK (group_type_index <= 5)
);

-- Actions and hooks --------------------------------------------------------------------------------

CREATE TABLE IF NOT EXISTS posthog_action (
    id serial PRIMARY KEY,
    team_id integer NOT NULL REFERENCES posthog_team (id) DEFERRABLE INITIALLY DEFERRED,
    name varchar(400),
    description text NOT NULL DEFAULT '',
    created_at timestamptz NOT NULL DEFAULT now(),
    created_by_id integer REFERENCES posthog_user (id) DEFERRABLE INITIALLY DEFERRED,
    deleted boolean NOT NULL DEFAULT false,
    post_to_slack boolean NOT NULL DEFAULT false,
    slack_message_format varchar(600) NOT NULL DEFAULT '',
    is_calculating boolean NOT NULL DEFAULT false,
    updated_at timestamptz NOT NULL DEFAULT now(),
    last_calculated_at timestamptz
);

CREATE TABLE IF NOT EXISTS posthog_actionstep (
    id serial PRIMARY KEY,
    action_id integer NOT NULL REFERENCES posthog_action (id) DEFERRABLE INITIALLY DEFERRED,
    tag_name varchar(400),
    text varchar(400),
    href varchar(65535),
    selector varchar(65535),
    url varchar(65535),
    url_matching varchar(400),
    name varchar(400),
    event varchar(400),
    properties jsonb DEFAULT '[]'
);

-- Exact column set for fetchActionMatches: do not add columns.
CREATE TABLE IF NOT EXISTS posthog_action_events (
    id serial PRIMARY KEY,
    action_id integer NOT NULL REFERENCES posthog_action (id) DEFERRABLE INITIALLY DEFERRED,
    event_id integer NOT NULL REFERENCES posthog_event (id) DEFERRABLE INITIALLY DEFERRED,
    UNIQUE (action_id, event_id)
);

CREATE TABLE IF NOT EXISTS ee_hook (
    id varchar(50) PRIMARY KEY,
    team_id integer NOT NULL REFERENCES posthog_team (id) DEFERRABLE INITIALLY DEFERRED,
    user_id integer NOT NULL REFERENCES posthog_user (id) DEFERRABLE INITIALLY DEFERRED,
    event varchar(50) NOT NULL,
    resource_id integer,
    target varchar(255) NOT NULL,
    created timestamptz NOT NULL DEFAULT now(),
    updated timestamptz NOT NULL DEFAULT now()
);

-- Plugins ------------------------------------------------------------------------------------------

CREATE TABLE IF NOT EXISTS posthog_plugin (
    id serial PRIMARY KEY,
    organization_id uuid NOT NULL REFERENCES posthog_organization (id) DEFERRABLE INITIALLY DEFERRED,
    plugin_type varchar(200),
    is_global boolean NOT NULL DEFAULT false,
    is_preinstalled boolean NOT NULL DEFAULT false,
    name varchar(200),
    description text,
    url varchar(800),
    config_schema jsonb NOT NULL DEFAULT '{}',
    tag varchar(200),
    archive bytea,
    source text,
    latest_tag varchar(800),
    latest_tag_checked_at timestamptz,
    capabilities jsonb NOT NULL DEFAULT '{}',
    metrics jsonb DEFAULT '{}',
    error jsonb,
    from_json boolean NOT NULL DEFAULT false,
    from_web boolean NOT NULL DEFAULT false,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    public_jobs jsonb DEFAULT '{}'
);

-- Exact column set: do not add columns.
CREATE TABLE IF NOT EXISTS posthog_pluginconfig (
    id serial PRIMARY KEY,
    team_id integer REFERENCES posthog_team (id) DEFERRABLE INITIALLY DEFERRED,
    plugin_id integer NOT NULL REFERENCES posthog_plugin (id) DEFERRABLE INITIALLY DEFERRED,
    enabled boolean NOT NULL DEFAULT false,
    "order" integer,
    config jsonb NOT NULL DEFAULT '{}',
    error jsonb,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now()
);

-- Exact column set: do not add columns. plugin_config_id is nullable (the MMDB row has none).
CREATE TABLE IF NOT EXISTS posthog_pluginattachment (
    id serial PRIMARY KEY,
    team_id integer REFERENCES posthog_team (id) DEFERRABLE INITIALLY DEFERRED,
    plugin_config_id integer REFERENCES posthog_pluginconfig (id) DEFERRABLE INITIALLY DEFERRED,
    key varchar(200) NOT NULL,
    content_type varchar(200) NOT NULL,
    file_name varchar(200) NOT NULL,
    file_size integer NOT NULL,
    contents bytea NOT NULL
);

CREATE TABLE IF NOT EXISTS posthog_pluginstorage (
    id serial PRIMARY KEY,
    plugin_config_id integer NOT NULL REFERENCES posthog_pluginconfig (id) DEFERRABLE INITIALLY DEFERRED,
    key varchar(200) NOT NULL,
    value text,
    CONSTRAINT posthog_unique_plugin_storage_key UNIQUE (plugin_config_id, key)
);

CREATE TABLE IF NOT EXISTS posthog_pluginlogentry (
    id uuid PRIMARY KEY,
    team_id integer NOT NULL REFERENCES posthog_team (id) DEFERRABLE INITIALLY DEFERRED,
    plugin_id integer NOT NULL REFERENCES posthog_plugin (id) DEFERRABLE INITIALLY DEFERRED,
    plugin_config_id integer NOT NULL REFERENCES posthog_pluginconfig (id) DEFERRABLE INITIALLY DEFERRED,
    timestamp timestamptz NOT NULL,
    source varchar(20) NOT NULL,
    type varchar(20) NOT NULL,
    message text NOT NULL,
    instance_id uuid NOT NULL
);
CREATE INDEX IF NOT EXISTS posthog_pluginlogentry_config_timestamp ON posthog_pluginlogentry (plugin_config_id, timestamp);

-- Tables the reference's test helper truncates; only their existence matters to the server.
CREATE TABLE IF NOT EXISTS posthog_featureflag (id serial PRIMARY KEY, team_id integer);
CREATE TABLE IF NOT EXISTS posthog_annotation (id serial PRIMARY KEY, team_id integer);
CREATE TABLE IF NOT EXISTS posthog_dashboard (id serial PRIMARY KEY, team_id integer);
CREATE TABLE IF NOT EXISTS posthog_dashboarditem (id serial PRIMARY KEY, team_id integer);

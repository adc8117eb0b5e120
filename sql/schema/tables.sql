-- The Tasker data schema (tables, sequences, indexes, constraints), as the Rails engine
-- creates it. Executed by tasker_core.install_schema(target_schema), which substitutes
-- @schema@ with the quoted target schema. Every statement is idempotent: a second run
-- creates nothing and fails on nothing. These tables belong to the application, never
-- to the extension.

CREATE TABLE IF NOT EXISTS @schema@.tasker_task_namespaces (
    task_namespace_id serial NOT NULL,
    name character varying(64) NOT NULL,
    description character varying(255),
    created_at timestamp(6) without time zone NOT NULL,
    updated_at timestamp(6) without time zone NOT NULL,
    CONSTRAINT tasker_task_namespaces_pkey PRIMARY KEY (task_namespace_id)
);
CREATE UNIQUE INDEX IF NOT EXISTS task_namespaces_name_unique ON @schema@.tasker_task_namespaces USING btree (name);

CREATE TABLE IF NOT EXISTS @schema@.tasker_named_tasks (
    named_task_id serial NOT NULL,
    name character varying(64) NOT NULL,
    description character varying(255),
    created_at timestamp(6) without time zone NOT NULL,
    updated_at timestamp(6) without time zone NOT NULL,
    task_namespace_id bigint DEFAULT 1 NOT NULL,
    version character varying(16) DEFAULT '0.1.0'::character varying NOT NULL,
    -- Rails quirk kept on purpose: the default is the JSON string "{}", not an object.
    configuration jsonb DEFAULT '"{}"'::jsonb,
    CONSTRAINT tasker_named_tasks_pkey PRIMARY KEY (named_task_id),
    CONSTRAINT fk_rails_16a0297759 FOREIGN KEY (task_namespace_id)
        REFERENCES @schema@.tasker_task_namespaces (task_namespace_id)
);
CREATE UNIQUE INDEX IF NOT EXISTS named_tasks_namespace_name_version_unique ON @schema@.tasker_named_tasks USING btree (task_namespace_id, name, version);

CREATE TABLE IF NOT EXISTS @schema@.tasker_dependent_systems (
    dependent_system_id serial NOT NULL,
    name character varying(64) NOT NULL,
    description character varying(255),
    created_at timestamp(6) without time zone NOT NULL,
    updated_at timestamp(6) without time zone NOT NULL,
    CONSTRAINT tasker_dependent_systems_pkey PRIMARY KEY (dependent_system_id)
);
CREATE UNIQUE INDEX IF NOT EXISTS dependent_systems_name_unique ON @schema@.tasker_dependent_systems USING btree (name);

CREATE TABLE IF NOT EXISTS @schema@.tasker_dependent_system_object_maps (
    dependent_system_object_map_id bigserial NOT NULL,
    dependent_system_one_id integer NOT NULL,
    dependent_system_two_id integer NOT NULL,
    remote_id_one character varying(128) NOT NULL,
    remote_id_two character varying(128) NOT NULL,
    created_at timestamp(6) without time zone NOT NULL,
    updated_at timestamp(6) without time zone NOT NULL,
    CONSTRAINT tasker_dependent_system_object_maps_pkey PRIMARY KEY (dependent_system_object_map_id),
    CONSTRAINT dependent_system_object_maps_dependent_system_one_id_foreign FOREIGN KEY (dependent_system_one_id)
        REFERENCES @schema@.tasker_dependent_systems (dependent_system_id),
    CONSTRAINT dependent_system_object_maps_dependent_system_two_id_foreign FOREIGN KEY (dependent_system_two_id)
        REFERENCES @schema@.tasker_dependent_systems (dependent_system_id)
);
CREATE UNIQUE INDEX IF NOT EXISTS dependent_system_object_maps_dependent_system_one_id_dependent_ ON @schema@.tasker_dependent_system_object_maps USING btree (dependent_system_one_id, dependent_system_two_id, remote_id_one, remote_id_two);

CREATE TABLE IF NOT EXISTS @schema@.tasker_named_steps (
    named_step_id serial NOT NULL,
    dependent_system_id integer NOT NULL,
    name character varying(128) NOT NULL,
    description character varying(255),
    created_at timestamp(6) without time zone NOT NULL,
    updated_at timestamp(6) without time zone NOT NULL,
    CONSTRAINT tasker_named_steps_pkey PRIMARY KEY (named_step_id),
    CONSTRAINT named_steps_dependent_system_id_foreign FOREIGN KEY (dependent_system_id)
        REFERENCES @schema@.tasker_dependent_systems (dependent_system_id)
);
CREATE UNIQUE INDEX IF NOT EXISTS named_step_by_system_uniq ON @schema@.tasker_named_steps USING btree (dependent_system_id, name);
CREATE INDEX IF NOT EXISTS named_steps_name_index ON @schema@.tasker_named_steps USING btree (name);

CREATE TABLE IF NOT EXISTS @schema@.tasker_named_tasks_named_steps (
    id serial NOT NULL,
    named_task_id integer NOT NULL,
    named_step_id integer NOT NULL,
    skippable boolean DEFAULT false NOT NULL,
    default_retryable boolean DEFAULT true NOT NULL,
    default_retry_limit integer DEFAULT 3 NOT NULL,
    created_at timestamp(6) without time zone NOT NULL,
    updated_at timestamp(6) without time zone NOT NULL,
    CONSTRAINT tasker_named_tasks_named_steps_pkey PRIMARY KEY (id),
    CONSTRAINT named_tasks_named_steps_named_step_id_foreign FOREIGN KEY (named_step_id)
        REFERENCES @schema@.tasker_named_steps (named_step_id),
    CONSTRAINT named_tasks_named_steps_named_task_id_foreign FOREIGN KEY (named_task_id)
        REFERENCES @schema@.tasker_named_tasks (named_task_id)
);
CREATE INDEX IF NOT EXISTS named_tasks_named_steps_named_step_id_index ON @schema@.tasker_named_tasks_named_steps USING btree (named_step_id);
CREATE UNIQUE INDEX IF NOT EXISTS named_tasks_steps_ids_unique ON @schema@.tasker_named_tasks_named_steps USING btree (named_task_id, named_step_id);

CREATE TABLE IF NOT EXISTS @schema@.tasker_tasks (
    task_id bigserial NOT NULL,
    named_task_id integer NOT NULL,
    complete boolean DEFAULT false NOT NULL,
    requested_at timestamp without time zone NOT NULL,
    initiator character varying(128),
    source_system character varying(128),
    reason character varying(128),
    bypass_steps json,
    tags jsonb,
    context jsonb,
    identity_hash character varying(128) NOT NULL,
    created_at timestamp(6) without time zone NOT NULL,
    updated_at timestamp(6) without time zone NOT NULL,
    CONSTRAINT tasker_tasks_pkey PRIMARY KEY (task_id),
    CONSTRAINT tasks_named_task_id_foreign FOREIGN KEY (named_task_id)
        REFERENCES @schema@.tasker_named_tasks (named_task_id)
);
CREATE INDEX IF NOT EXISTS idx_tasks_completion_status_created ON @schema@.tasker_tasks USING btree (complete, created_at, task_id);
CREATE UNIQUE INDEX IF NOT EXISTS index_tasks_on_identity_hash ON @schema@.tasker_tasks USING btree (identity_hash);
CREATE INDEX IF NOT EXISTS tasks_named_task_id_index ON @schema@.tasker_tasks USING btree (named_task_id);

CREATE TABLE IF NOT EXISTS @schema@.tasker_workflow_steps (
    workflow_step_id bigserial NOT NULL,
    task_id bigint NOT NULL,
    named_step_id integer NOT NULL,
    retryable boolean DEFAULT true NOT NULL,
    retry_limit integer DEFAULT 3,
    in_process boolean DEFAULT false NOT NULL,
    processed boolean DEFAULT false NOT NULL,
    processed_at timestamp without time zone,
    attempts integer,
    last_attempted_at timestamp without time zone,
    backoff_request_seconds integer,
    inputs jsonb,
    results jsonb,
    created_at timestamp(6) without time zone NOT NULL,
    updated_at timestamp(6) without time zone NOT NULL,
    skippable boolean DEFAULT false NOT NULL,
    CONSTRAINT tasker_workflow_steps_pkey PRIMARY KEY (workflow_step_id),
    CONSTRAINT workflow_steps_named_step_id_foreign FOREIGN KEY (named_step_id)
        REFERENCES @schema@.tasker_named_steps (named_step_id),
    CONSTRAINT workflow_steps_task_id_foreign FOREIGN KEY (task_id)
        REFERENCES @schema@.tasker_tasks (task_id)
);
CREATE INDEX IF NOT EXISTS index_workflow_steps_task_and_step_optimized ON @schema@.tasker_workflow_steps USING btree (task_id, workflow_step_id);
CREATE INDEX IF NOT EXISTS workflow_steps_named_step_id_index ON @schema@.tasker_workflow_steps USING btree (named_step_id);

CREATE TABLE IF NOT EXISTS @schema@.tasker_workflow_step_edges (
    id bigserial NOT NULL,
    from_step_id bigint NOT NULL,
    to_step_id bigint NOT NULL,
    name character varying NOT NULL,
    created_at timestamp(6) without time zone NOT NULL,
    updated_at timestamp(6) without time zone NOT NULL,
    CONSTRAINT tasker_workflow_step_edges_pkey PRIMARY KEY (id),
    CONSTRAINT fk_rails_7b4652ccf2 FOREIGN KEY (from_step_id)
        REFERENCES @schema@.tasker_workflow_steps (workflow_step_id),
    CONSTRAINT fk_rails_93ec0bf6eb FOREIGN KEY (to_step_id)
        REFERENCES @schema@.tasker_workflow_steps (workflow_step_id)
);
CREATE INDEX IF NOT EXISTS idx_step_edges_from_to ON @schema@.tasker_workflow_step_edges USING btree (from_step_id, to_step_id);
CREATE INDEX IF NOT EXISTS idx_step_edges_to_from ON @schema@.tasker_workflow_step_edges USING btree (to_step_id, from_step_id);

CREATE TABLE IF NOT EXISTS @schema@.tasker_task_transitions (
    id bigserial NOT NULL,
    to_state character varying NOT NULL,
    from_state character varying,
    metadata jsonb DEFAULT '{}'::jsonb,
    sort_key integer NOT NULL,
    most_recent boolean DEFAULT true NOT NULL,
    task_id bigint NOT NULL,
    created_at timestamp(6) without time zone NOT NULL,
    updated_at timestamp(6) without time zone NOT NULL,
    CONSTRAINT tasker_task_transitions_pkey PRIMARY KEY (id),
    CONSTRAINT fk_rails_e8caec803c FOREIGN KEY (task_id)
        REFERENCES @schema@.tasker_tasks (task_id)
);
CREATE UNIQUE INDEX IF NOT EXISTS index_tasker_task_transitions_on_task_id_and_most_recent ON @schema@.tasker_task_transitions USING btree (task_id, most_recent) WHERE (most_recent = true);
CREATE UNIQUE INDEX IF NOT EXISTS index_tasker_task_transitions_on_task_id_and_sort_key ON @schema@.tasker_task_transitions USING btree (task_id, sort_key);

CREATE TABLE IF NOT EXISTS @schema@.tasker_workflow_step_transitions (
    id bigserial NOT NULL,
    to_state character varying NOT NULL,
    from_state character varying,
    metadata jsonb DEFAULT '{}'::jsonb,
    sort_key integer NOT NULL,
    most_recent boolean DEFAULT true NOT NULL,
    workflow_step_id bigint NOT NULL,
    created_at timestamp(6) without time zone NOT NULL,
    updated_at timestamp(6) without time zone NOT NULL,
    CONSTRAINT tasker_workflow_step_transitions_pkey PRIMARY KEY (id),
    CONSTRAINT fk_rails_6e0f6eb833 FOREIGN KEY (workflow_step_id)
        REFERENCES @schema@.tasker_workflow_steps (workflow_step_id)
);
CREATE UNIQUE INDEX IF NOT EXISTS idx_on_workflow_step_id_most_recent_97d5374ad6 ON @schema@.tasker_workflow_step_transitions USING btree (workflow_step_id, most_recent) WHERE (most_recent = true);
CREATE UNIQUE INDEX IF NOT EXISTS idx_on_workflow_step_id_sort_key_4d476d7adb ON @schema@.tasker_workflow_step_transitions USING btree (workflow_step_id, sort_key);

CREATE TABLE IF NOT EXISTS @schema@.tasker_annotation_types (
    annotation_type_id serial NOT NULL,
    name character varying(64) NOT NULL,
    description character varying(255),
    created_at timestamp(6) without time zone NOT NULL,
    updated_at timestamp(6) without time zone NOT NULL,
    CONSTRAINT tasker_annotation_types_pkey PRIMARY KEY (annotation_type_id)
);
CREATE UNIQUE INDEX IF NOT EXISTS annotation_types_name_unique ON @schema@.tasker_annotation_types USING btree (name);

CREATE TABLE IF NOT EXISTS @schema@.tasker_task_annotations (
    task_annotation_id bigserial NOT NULL,
    task_id bigint NOT NULL,
    annotation_type_id integer NOT NULL,
    annotation jsonb,
    created_at timestamp(6) without time zone NOT NULL,
    updated_at timestamp(6) without time zone NOT NULL,
    CONSTRAINT tasker_task_annotations_pkey PRIMARY KEY (task_annotation_id),
    CONSTRAINT task_annotations_annotation_type_id_foreign FOREIGN KEY (annotation_type_id)
        REFERENCES @schema@.tasker_annotation_types (annotation_type_id),
    CONSTRAINT task_annotations_task_id_foreign FOREIGN KEY (task_id)
        REFERENCES @schema@.tasker_tasks (task_id)
);
CREATE INDEX IF NOT EXISTS task_annotations_annotation_type_id_index ON @schema@.tasker_task_annotations USING btree (annotation_type_id);
CREATE INDEX IF NOT EXISTS task_annotations_task_id_index ON @schema@.tasker_task_annotations USING btree (task_id);

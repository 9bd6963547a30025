-- Project secrets: write-only values that tasks receive as environment variables.
CREATE TABLE secrets (
    project    TEXT    NOT NULL,
    name       TEXT    NOT NULL,
    value      TEXT    NOT NULL,
    updated_ms BIGINT  NOT NULL,
    PRIMARY KEY (project, name)
);

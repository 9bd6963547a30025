-- Project secrets: write-only values that tasks receive as environment variables.
CREATE TABLE secrets (
    project    TEXT    NOT NULL,
    name       TEXT    NOT NULL,
    value      TEXT    NOT NULL,
    updated_ms INTEGER NOT NULL,
    PRIMARY KEY (project, name)
) WITHOUT ROWID;

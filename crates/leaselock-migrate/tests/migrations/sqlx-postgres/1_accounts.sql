-- Every migration logs itself in `applications`, which has no unique key: a migration applied
-- twice leaves two rows.
CREATE TABLE applications (migration INT NOT NULL, token BIGINT);
CREATE TABLE accounts (id BIGINT PRIMARY KEY, name TEXT NOT NULL);
INSERT INTO applications (migration) VALUES (1);

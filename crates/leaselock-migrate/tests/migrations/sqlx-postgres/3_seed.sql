-- The fencing token of the lock this run holds, as the migration code sees it.
INSERT INTO applications (migration, token)
VALUES (3, CAST(current_setting('leaselock.fencing_token') AS BIGINT));
INSERT INTO accounts (id, name) VALUES (1, 'first');

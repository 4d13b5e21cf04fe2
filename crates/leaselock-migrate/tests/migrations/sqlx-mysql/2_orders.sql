CREATE TABLE orders (id BIGINT PRIMARY KEY, account_id BIGINT NOT NULL, FOREIGN KEY (account_id) REFERENCES accounts (id));
INSERT INTO applications (migration) VALUES (2);
-- Slow enough that the other processes are still waiting for the lock when it ends.
SELECT SLEEP(0.5);

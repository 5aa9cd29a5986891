-- Run once by the postgres image on an empty data directory (/docker-entrypoint-initdb.d), as
-- the superuser: the two roles of docs/audit.md. The migration role owns the database and its
-- schema and runs `opsapi migrate`; the application role serves, with the grants of
-- deploy/postgres/grants.sql only. Passwords for this local stack only.
CREATE ROLE opsapi_migrator LOGIN PASSWORD 'compose-migrator';
CREATE ROLE opsapi_app LOGIN PASSWORD 'compose-app';
CREATE DATABASE opsapi OWNER opsapi_migrator;
REVOKE ALL ON DATABASE opsapi FROM PUBLIC;
GRANT CONNECT ON DATABASE opsapi TO opsapi_app;

-- The application role's privileges (docs/audit.md, "Making the table append-only"): run by the
-- schema owner (the migration role) after EVERY `opsapi migrate`, since new tables need their
-- grants. Idempotent. The role name is a psql variable, and the whole file is one transaction:
--   psql --single-transaction -v ON_ERROR_STOP=1 -v app_role=opsapi_app -f grants.sql URL
-- Used by deploy/kubernetes/migrate/ (copied into its ConfigMap; a test keeps them equal) and by
-- docker-compose.yml (the `grants` service).
REVOKE CREATE ON SCHEMA public FROM PUBLIC;
GRANT USAGE ON SCHEMA public TO :"app_role";
GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO :"app_role";
GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO :"app_role";
REVOKE ALL ON alembic_version FROM :"app_role";
-- The audit log is append-only for the application: read and insert, no update/delete/truncate,
-- and nextval on its sequence but no setval.
REVOKE ALL ON audit_event FROM :"app_role";
GRANT SELECT, INSERT ON audit_event TO :"app_role";
REVOKE ALL ON SEQUENCE audit_event_id_seq FROM :"app_role";
GRANT USAGE ON SEQUENCE audit_event_id_seq TO :"app_role";

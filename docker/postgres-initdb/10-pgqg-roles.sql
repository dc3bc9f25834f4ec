-- The roles pgqg logs in as, authenticator style (docs/security.md). The postgres image
-- runs this once, when it creates the database, as POSTGRES_USER: the owner, who also
-- loads the demo (pgqg db init), so the default privileges below cover its tables.
CREATE ROLE pgqg_anon NOLOGIN;
CREATE ROLE pgqg_authenticator LOGIN NOINHERIT NOSUPERUSER NOCREATEDB NOCREATEROLE
    NOREPLICATION NOBYPASSRLS PASSWORD 'gateway';
GRANT pgqg_anon TO pgqg_authenticator;
ALTER ROLE pgqg_authenticator SET role = 'pgqg_anon';
GRANT USAGE ON SCHEMA public TO pgqg_anon;
GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO pgqg_anon;
GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA public TO pgqg_anon;
ALTER DEFAULT PRIVILEGES IN SCHEMA public
    GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO pgqg_anon;
ALTER DEFAULT PRIVILEGES IN SCHEMA public
    GRANT USAGE, SELECT ON SEQUENCES TO pgqg_anon;

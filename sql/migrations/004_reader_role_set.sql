-- pgsse migration 004: the migrating role can SET ROLE pgsse_reader on PostgreSQL 16+.
--
-- On PostgreSQL 16+, a non-superuser with CREATEROLE who creates a role becomes a member
-- with ADMIN but, by default, neither INHERIT nor SET (createrole_self_grant). 001's
-- "GRANT pgsse_reader TO current_user" was skipped because pg_has_role(..., 'MEMBER') was
-- already true, so aggregate queries could not SET ROLE pgsse_reader and /readyz stayed 503.
DO $$
BEGIN
    IF current_setting('server_version_num')::int >= 160000
       AND NOT pg_has_role(current_user, 'pgsse_reader', 'SET') THEN
        EXECUTE format('GRANT pgsse_reader TO %I WITH INHERIT FALSE, SET TRUE', current_user);
    END IF;
END
$$;

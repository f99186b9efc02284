-- pbx-bridge 0008: hardening.
--   duty_roster_changes: every replacement of the duty roster (PUT /duty): who (the name of the
--     API token used, never a name from the request), when, the entries replaced and the new ones.
--   pbx_cel_writer: a group role for Asterisk's cel_pgsql: INSERT into cel, nothing else.
--   No role but the schema's owner may create objects in schema public (PostgreSQL 15 makes new
--   databases so; databases created by 14 or upgraded from it still let everyone).
-- Creating the role needs CREATEROLE; without it, a DBA creates it first (NOLOGIN), as for 0007.
--
-- duty_roster.mobile keeps its CHECK (mobile ~ '^[0-9]{5,20}$'): in PostgreSQL's regular
-- expressions `$` matches only at the very end of the text (unlike Python's re, whose `$` also
-- matches before a final newline), so '13800138000' || E'\n' is refused already. A test proves it.

CREATE TABLE duty_roster_changes (
    id          bigserial PRIMARY KEY,
    changed_at  timestamptz NOT NULL DEFAULT now(),
    changed_by  text NOT NULL CHECK (length(changed_by) BETWEEN 1 AND 64),
    old_entries jsonb NOT NULL CHECK (jsonb_typeof(old_entries) = 'array'),
    new_entries jsonb NOT NULL CHECK (jsonb_typeof(new_entries) = 'array')
);
CREATE INDEX duty_roster_changes_at ON duty_roster_changes (changed_at);
COMMENT ON TABLE duty_roster_changes IS '值班表修改记录:谁(API 令牌名)、何时、旧条目与新条目 / every duty roster replacement: who (the API token''s name), when, the entries replaced and the new ones';
COMMENT ON COLUMN duty_roster_changes.changed_by IS '修改人(所用 API 令牌的名称)/ who: the name of the API token used';
COMMENT ON COLUMN duty_roster_changes.old_entries IS '被替换的当前及将来条目 [{holder, mobile, starts_at, ends_at}] / the current and future entries replaced';
COMMENT ON COLUMN duty_roster_changes.new_entries IS '新条目 [{holder, mobile, starts_at, ends_at}] / the new entries';

-- The daemon appends; it never reads, changes or deletes the trail.
GRANT INSERT ON duty_roster_changes TO pbx_bridge;
GRANT USAGE ON SEQUENCE duty_roster_changes_id_seq TO pbx_bridge;

DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'pbx_cel_writer') THEN
        CREATE ROLE pbx_cel_writer NOLOGIN;
    END IF;
END
$$;
COMMENT ON ROLE pbx_cel_writer IS 'Asterisk cel_pgsql:只能写入 cel 表 / Asterisk''s cel_pgsql: INSERT into cel only';
GRANT USAGE ON SCHEMA public TO pbx_cel_writer;
GRANT INSERT ON cel TO pbx_cel_writer;
GRANT USAGE ON SEQUENCE cel_id_seq TO pbx_cel_writer;

REVOKE CREATE ON SCHEMA public FROM PUBLIC;

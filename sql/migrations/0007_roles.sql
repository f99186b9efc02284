-- pbx-bridge 0007: database roles (NOLOGIN groups; a DBA grants them to login users).
--   pbx_supervisor: SELECT on the supervisor views only; no table, no write.
--   pbx_bridge:     what the daemon and `pbx-bridge report` need, and no more.
-- Creating roles needs CREATEROLE; without it, a DBA creates the two roles first (this
-- migration then only grants). See docs/supervisors.md, "Roles".
DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'pbx_supervisor') THEN
        CREATE ROLE pbx_supervisor NOLOGIN;
    END IF;
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'pbx_bridge') THEN
        CREATE ROLE pbx_bridge NOLOGIN;
    END IF;
END
$$;
COMMENT ON ROLE pbx_supervisor IS '主管:只读视图 / supervisors: SELECT on the v_* views only';
COMMENT ON ROLE pbx_bridge IS 'pbx-bridge 守护进程 / the pbx-bridge daemon and its report command';

GRANT USAGE ON SCHEMA public TO pbx_supervisor, pbx_bridge;

GRANT SELECT ON v_call_log, v_daily_kpi, v_agent_daily, v_callbacks_due, v_violations, v_line_health,
    v_unrecorded_calls, v_hourly_load, v_call_sheet TO pbx_supervisor, pbx_bridge;

-- The daemon: call records (upserts), violations and probes (inserts), the call sheet and
-- its history, the duty roster (replaced from now on by PUT /duty), the settings row.
GRANT SELECT, INSERT, UPDATE ON calls, call_legs, call_notes, bridge_settings TO pbx_bridge;
GRANT SELECT, INSERT ON policy_violations, line_probes, call_note_history, report_deliveries TO pbx_bridge;
GRANT SELECT, INSERT, DELETE ON duty_roster TO pbx_bridge;
GRANT SELECT ON schedule_overrides, cel TO pbx_bridge;
GRANT USAGE ON SEQUENCE policy_violations_id_seq, line_probes_id_seq, call_note_history_id_seq,
    duty_roster_id_seq TO pbx_bridge;

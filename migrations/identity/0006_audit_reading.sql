-- Reading the audit log newest first (GET /v1/admin/audit), whole or from a time: one index walk.
CREATE INDEX audit_log_at ON identity.audit_log (at DESC, id DESC);

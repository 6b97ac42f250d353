-- Named queries of the Python API (service/publish.py).

-- name: publish
-- A custom event in the caller's transaction: $1 topic, $2 type, $3 data (JSON text).
-- CAST, not ::, so that SQLAlchemy's text() reads the placeholders (it skips ":name::").
SELECT realtime.publish(CAST($1 AS text), CAST($2 AS text), CAST($3 AS jsonb))

"""pgsse SQL: migrations, named queries, the service's and the demo's aggregates (package data)."""

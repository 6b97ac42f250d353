#!/bin/sh
# Run once by the postgres image when it initialises the primary's data: lets the streaming
# standby of the "replicas" profile (deploy/docker-compose.yml) connect for replication.
echo "host replication postgres all scram-sha-256" >> "$PGDATA/pg_hba.conf"

# PostgreSQL, Redis and nginx from Debian's packages, for the compose end-to-end run on a
# machine that reaches Debian's archive but no container registry (see run_compose_e2e.sh).
# Production uses the official images named in compose.yaml.
ARG BASE_IMAGE=debian:bookworm-slim
FROM ${BASE_IMAGE}
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends postgresql redis-server nginx-light wget \
    && rm -rf /var/lib/apt/lists/* /etc/nginx/sites-enabled/default
COPY postgres-start.sh /usr/local/bin/postgres-start
RUN chmod +x /usr/local/bin/postgres-start

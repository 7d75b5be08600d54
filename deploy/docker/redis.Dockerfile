# Redis from Debian's package, for a machine that cannot pull redis:7.2-alpine (REDIS_IMAGE):
# the same command line, data folder and health check as the official image in compose.
ARG BASE_IMAGE=t2i-base:bookworm
FROM ${BASE_IMAGE}
RUN apt-get update && apt-get install -y --no-install-recommends redis-server \
    && rm -rf /var/lib/apt/lists/* \
    && mkdir -p /data && chown redis:redis /data
WORKDIR /data
USER redis
EXPOSE 6379
CMD ["redis-server"]

# Volna broker and CLI on a slim Debian base, as a non-root user with the
# data directory as a volume.
#
# The binaries are built on the host by scripts/docker-build.sh (which also
# builds the base image from Debian's packages when no registry is at hand)
# and copied from docker/dist. With a registry, BASE=debian:bookworm-slim
# (plus ca-certificates and curl) serves the same.
ARG BASE=volna-base:bookworm
FROM ${BASE}

RUN useradd --system --uid 10001 --user-group --home-dir /var/lib/volna volna \
    && mkdir -p /var/lib/volna \
    && chown volna:volna /var/lib/volna

COPY docker/dist/volna-broker docker/dist/volna docker/dist/etcd /usr/local/bin/

USER volna
WORKDIR /var/lib/volna
VOLUME ["/var/lib/volna"]
EXPOSE 7400/udp 7400/tcp 7401/tcp

# Embedded defaults, adjusted for a container: listen on every interface and
# keep data in the volume. Everything else comes from VOLNA_* variables or a
# mounted volna.toml (--config).
ENV VOLNA_DATA_DIR=/var/lib/volna \
    VOLNA_LISTEN=0.0.0.0:7400 \
    VOLNA_HTTP=0.0.0.0:7401

HEALTHCHECK --interval=2s --timeout=2s --start-period=5s --retries=15 \
    CMD curl -fsS http://127.0.0.1:7401/readyz || exit 1

# SIGTERM (docker stop) drains: pending acks are sent, clients are told
# "going away", the WAL is synced.
STOPSIGNAL SIGTERM
ENTRYPOINT ["volna-broker"]

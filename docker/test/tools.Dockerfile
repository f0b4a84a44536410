# Stands in for natsio/nats-box: natscli is in no package registry this
# test may use, so `nats` here is nats-lite (examples/src/nats_lite.rs),
# which answers the commands the README shows (micro ls/info/stats, sub,
# kv ls/get/watch).
FROM flame-compose-test/base
COPY nats-lite /usr/local/bin/nats
CMD ["sh"]

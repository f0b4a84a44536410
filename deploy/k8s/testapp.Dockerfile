# The test app (tests/src/bin/flame-testapp.rs) as the image of the runner
# Pods of scripts/test-k8s, which runs the backend conformance suite on a
# real cluster. Its entrypoint is the test app, so that a Pod's `args`
# choose its mode (the suite's runners that exit early get `no-state`).
#
#   docker build -f deploy/k8s/testapp.Dockerfile -t <registry>/flame-testapp:<tag> .
#   docker push <registry>/flame-testapp:<tag>
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p flame-tests --bin flame-testapp \
 && cp target/release/flame-testapp /usr/local/bin/flame-testapp

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --home-dir /nonexistent app
COPY --from=build /usr/local/bin/flame-testapp /usr/local/bin/flame-testapp
USER app
ENTRYPOINT ["flame-testapp"]

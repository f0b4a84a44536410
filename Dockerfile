# The web demo (examples/src/web) as an image: built with the Rust image,
# run on Debian slim with ffmpeg. The runners are this same image: containers
# started by flame through the Docker socket (docker-compose.yml sets
# FLAME_BACKEND=docker), else child processes in the parent's container.
#
#   docker build -t flame-demo-app .      (docker compose up --build does this)
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p flame-examples --bin web_thumbnails \
 && cp target/release/web_thumbnails /usr/local/bin/web_thumbnails

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ffmpeg ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --home-dir /nonexistent app
COPY --from=build /usr/local/bin/web_thumbnails /usr/local/bin/web_thumbnails
ENV LISTEN=0.0.0.0:8080
EXPOSE 8080
USER app
CMD ["web_thumbnails"]

# The Dockerfile's runtime stage on the local base (which has ffmpeg), with
# the binary built on the host instead of in the Rust image.
FROM flame-compose-test/base
RUN useradd --system --uid 10001 --home-dir /nonexistent app
COPY web_thumbnails /usr/local/bin/web_thumbnails
ENV LISTEN=0.0.0.0:8080
EXPOSE 8080
USER app
CMD ["web_thumbnails"]

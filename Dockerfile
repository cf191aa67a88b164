# syntax=docker/dockerfile:1
#
# The pullkeeper operator image: one static binary on distroless, running as non-root.
#
#   docker build -t ghcr.io/pullkeeper/pullkeeper:0.1.0 .
#
# linux/amd64 only for now (the binary is built for x86_64-unknown-linux-musl).

# Alpine's Rust toolchain targets musl natively, so the release binary is fully static
# with no cross-compiler setup. TLS is rustls (crypto from ring and aws-lc-rs, both
# compiled from C here and linked in statically); there is no OpenSSL.
FROM rust:1-alpine AS build
# musl-dev, linux-headers and gcc: headers and a C compiler for ring and aws-lc-sys;
# cmake, make and perl: aws-lc-sys's fallback build.
RUN apk add --no-cache musl-dev linux-headers gcc cmake make perl
WORKDIR /src
COPY . .
# The cache mounts keep the crate registry and compiled dependencies between builds;
# target/ lives in the cache, so the binary is copied out of it in the same step.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --target x86_64-unknown-linux-musl \
 && cp target/x86_64-unknown-linux-musl/release/pullkeeper /pullkeeper

FROM gcr.io/distroless/static-debian12:nonroot
LABEL org.opencontainers.image.source="https://github.com/pullkeeper/pullkeeper" \
      org.opencontainers.image.title="pullkeeper" \
      org.opencontainers.image.description="Kubernetes operator that keeps image pull secrets fresh in every namespace that needs them" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /pullkeeper /pullkeeper
USER 65532:65532
# distroless/static has no libc and no shell: this runs only if the binary is static.
RUN ["/pullkeeper", "--version"]
EXPOSE 8080
ENTRYPOINT ["/pullkeeper"]
CMD ["controller"]

# syntax=docker/dockerfile:1
#
# The pullkeeper operator image: one static binary on distroless, running as non-root.
#
#   docker build -t ghcr.io/pullkeeper/pullkeeper:0.1.0 .
#
# linux/amd64. The binary is built by hack/static-build.sh, the same script CI runs to
# build and check the static binary, so what CI tests is what the image ships.

FROM rust:1-bookworm AS build
# cmake and clang: aws-lc-sys (the AWS SDK's TLS crypto) builds C code.
RUN apt-get update && apt-get install -y --no-install-recommends cmake clang && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
# The cache mounts keep the crate registry and compiled dependencies between builds;
# target/ lives in the cache, so the binary is copied out of it in the same step.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cp "$(hack/static-build.sh | tail -n1)" /pullkeeper

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

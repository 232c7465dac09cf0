# syntax=docker/dockerfile:1
# xlbd in a container: a multi-stage build (Go toolchain, then a slim
# runtime with the installed tree). xlb attaches XDP to the host's
# interface, so the container needs the host's network and BPF rights:
#
#   docker build -t xlb .
#   docker run -d --name xlbd --network host --privileged \
#       -v /sys/fs/bpf:/sys/fs/bpf -v /etc/xlb:/etc/xlb:ro -v /run/xlb:/run/xlb xlb
#   docker exec xlbd xlbctl status
#
# docs/operations.md ("Containers") lists the privileges one by one.

# GO_VERSION is the Go toolchain; it matches go.mod's go line.
ARG GO_VERSION=1.26.8
# DEBIAN_RELEASE is the base of both stages.
ARG DEBIAN_RELEASE=bookworm

FROM golang:${GO_VERSION}-${DEBIAN_RELEASE} AS build
WORKDIR /src
# Static binaries: the runtime image needs no C library of a given version.
ENV CGO_ENABLED=0
COPY go.mod go.sum ./
RUN go mod download
COPY . .
RUN make install DESTDIR=/out PREFIX=/usr

FROM debian:${DEBIAN_RELEASE}-slim
# nft(8) for the VIP filter (vip-filter, on by default).
RUN apt-get update && apt-get install -y --no-install-recommends nftables \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /out/ /
# The control socket's directory (the systemd unit's RuntimeDirectory).
RUN mkdir -p /run/xlb
ENTRYPOINT ["/usr/bin/xlbd"]
CMD ["--config", "/etc/xlb/xlb.yaml"]

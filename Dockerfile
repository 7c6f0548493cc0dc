# m2mguard broker image: m2mguard-broker (entrypoint), plus m2mctl and m2m-terminal
# for provisioning and demos. Runs as uid 10001; state in the /data volume.
#
#   docker build -t m2mguard .
#   docker run -p 1883:1883 -p 8083:8083 -v m2mguard-data:/data m2mguard
#
# The admin API listens on 127.0.0.1:8080 inside the container by default: set
# M2MGUARD_ADMIN_LISTEN=0.0.0.0:8080 to reach it from a private network (see
# docker-compose.yml), never on a public interface.

FROM golang:1.26-alpine AS build
WORKDIR /src
COPY go.mod go.sum ./
RUN go mod download
COPY . .
ENV CGO_ENABLED=0
RUN go build -trimpath -ldflags="-s -w" -o /out/m2mguard-broker ./cmd/m2mguard-broker && \
    go build -trimpath -ldflags="-s -w" -o /out/m2mctl ./cmd/m2mctl && \
    go build -trimpath -ldflags="-s -w" -o /out/m2m-terminal ./cmd/m2m-terminal

FROM alpine:3.21
RUN apk add --no-cache ca-certificates && \
    addgroup -S -g 10001 m2mguard && \
    adduser -S -D -H -u 10001 -G m2mguard -h /data m2mguard && \
    mkdir -p /data /var/lib/m2m && \
    chown m2mguard:m2mguard /data /var/lib/m2m && \
    chmod 0700 /data /var/lib/m2m
COPY --from=build /out/ /usr/local/bin/
USER 10001:10001
WORKDIR /data
VOLUME ["/data"]
ENV M2MGUARD_DATA_DIR=/data \
    M2MCTL_TOKEN_FILE=/data/admin.token
# 1883 MQTT/TCP, 8883 MQTT/TLS (with a certificate), 8083 MQTT/WebSocket, 8080 admin API
EXPOSE 1883 8883 8083 8080
HEALTHCHECK --interval=10s --timeout=3s --retries=3 \
    CMD wget -q -O /dev/null http://127.0.0.1:8080/healthz || exit 1
ENTRYPOINT ["m2mguard-broker"]

# syntax=docker/dockerfile:1
# The csi-composefs node plugin image: one static binary and CA certificates,
# nothing else (no shell, no libc: mounts are syscalls). `make image` builds
# the same files into an image without a container engine (hack/image), for
# linux/amd64 and linux/arm64.
#
#   docker buildx build --platform linux/amd64,linux/arm64 --build-arg VERSION=$(git describe --tags --always) -t REPO:TAG .
#
# The DaemonSet runs this container privileged: it mounts erofs and
# overlayfs (CAP_SYS_ADMIN), and those mounts, made under the kubelet's pods
# directory, must reach the host's mount namespace, which needs
# mountPropagation: Bidirectional, which Kubernetes allows only for
# privileged containers.

ARG GO_VERSION=1.26

FROM --platform=$BUILDPLATFORM golang:${GO_VERSION} AS build
ARG TARGETOS
ARG TARGETARCH
ARG VERSION=dev
WORKDIR /src
COPY go.mod go.sum ./
COPY hack/image/go.mod hack/image/go.sum hack/image/
RUN go mod download && cd hack/image && go mod download
COPY . .
# The CA bundle comes from the Go module the image builder pins (Mozilla's
# roots), not from this stage's distribution, so both builds ship the same.
RUN CGO_ENABLED=0 GOOS=${TARGETOS} GOARCH=${TARGETARCH} \
      go build -trimpath -buildvcs=false -ldflags "-s -w -X main.version=${VERSION}" \
      -o /out/usr/bin/csi-composefs ./cmd/csi-composefs \
 && mkdir -p /out/etc/ssl/certs /out/tmp && chmod 1777 /out/tmp \
 && cd hack/image && go run . -ca-bundle /out/etc/ssl/certs/ca-certificates.crt

FROM scratch
COPY --from=build /out/ /
# The DaemonSet passes `serve` and its flags.
ENTRYPOINT ["/usr/bin/csi-composefs"]

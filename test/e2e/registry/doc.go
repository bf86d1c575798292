// Package registry tests csi-composefs against distribution, the registry
// most registries are built on (run in process with TLS, htpasswd and the
// filesystem storage driver): artifacts pushed with the CLI and published
// through the plugin binary over gRPC with real mounts, and the registry's
// garbage collector run between push and pull; plain container images built
// and pushed with crane, converted by the plugin; and what must be refused
// (hostile layers, a missing platform, blobs changed in the storage). It is a module of its own so
// that the product's go.mod never depends on distribution (a cold build of
// its test binary costs minutes).
package registry

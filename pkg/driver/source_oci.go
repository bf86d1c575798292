package driver

import (
	"github.com/csi-composefs/csi-composefs/pkg/fetch"
	"github.com/csi-composefs/csi-composefs/pkg/fetch/oci"
)

// RegistryConfig is the node's registry settings (serve flags).
type RegistryConfig struct {
	// Insecure lists host[:port] patterns reached over plain HTTP
	// (--insecure-registry; tests and local registries).
	Insecure []string
	// Mirrors maps a registry host to mirror URLs tried first for blobs
	// (--registry-mirror), as containerd's hosts.toml mirrors.
	Mirrors map[string][]string
}

// newOCISource makes the source of a registry repository with the
// volume's credentials: username/password or token for the registry, a
// .dockerconfigjson (a pull secret), and ca.crt.
func newOCISource(spec SourceSpec, creds Credentials, rc RegistryConfig) (fetch.Source, error) {
	ref, err := oci.ParseReference(spec.URL)
	if err != nil {
		return nil, invalidArg(AttrImage, "%v", err)
	}
	src, err := oci.NewRepoSource(ref, oci.Options{
		Insecure: rc.Insecure, Mirrors: rc.Mirrors, CA: creds.CA, DockerConfig: creds.DockerConfig,
		Username: creds.Username, Password: creds.Password, Token: creds.Token,
	})
	if err != nil {
		return nil, invalidArg("secrets", "%v", err)
	}
	return src, nil
}

package main

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"github.com/spf13/cobra"

	"github.com/csi-composefs/csi-composefs/cmd/csi-composefs/app"
	"github.com/csi-composefs/csi-composefs/pkg/fetch/oci"
)

// registryFlags are the flags that reach a registry.
type registryFlags struct {
	insecure     []string
	mirrors      []string
	dockerConfig string
}

func (f *registryFlags) add(cmd *cobra.Command, mirrors bool) {
	cmd.Flags().StringArrayVar(&f.insecure, "insecure-registry", nil, "registry HOST[:PORT] (or pattern, as *.local:5000) reached over plain HTTP (repeatable)")
	if mirrors {
		cmd.Flags().StringArrayVar(&f.mirrors, "registry-mirror", nil, "REGISTRY=URL: a mirror tried first for blobs of REGISTRY (repeatable, in order)")
	}
	cmd.Flags().StringVar(&f.dockerConfig, "registry-config", "", "docker config.json with registry credentials (default: $DOCKER_CONFIG/config.json or ~/.docker/config.json when present)")
}

// options builds the registry options; sf's credentials (--username,
// --password-file, --token-file, --ca-file) apply to the reference's
// registry.
func (f *registryFlags) options(sf *sourceFlags) (oci.Options, error) {
	var o oci.Options
	o.Insecure = f.insecure
	m, err := app.ParseMirrors(f.mirrors)
	if err != nil {
		return o, usageErrorf("--registry-mirror: %v", err)
	}
	o.Mirrors = m
	cfg := f.dockerConfig
	if cfg == "" {
		dir := os.Getenv("DOCKER_CONFIG")
		if dir == "" {
			if home, err := os.UserHomeDir(); err == nil {
				dir = filepath.Join(home, ".docker")
			}
		}
		if p := filepath.Join(dir, "config.json"); dir != "" {
			if _, err := os.Stat(p); err == nil {
				cfg = p
			}
		}
	}
	if cfg != "" {
		b, err := os.ReadFile(cfg)
		if err != nil {
			return o, fmt.Errorf("reading registry credentials: %w", err)
		}
		o.DockerConfig = b
	}
	if sf != nil {
		o.Username = sf.username
		if sf.passwordFile != "" {
			b, err := os.ReadFile(sf.passwordFile)
			if err != nil {
				return o, fmt.Errorf("reading the password: %w", err)
			}
			o.Password = strings.TrimRight(string(b), "\r\n")
		}
		if sf.tokenFile != "" {
			b, err := os.ReadFile(sf.tokenFile)
			if err != nil {
				return o, fmt.Errorf("reading the token: %w", err)
			}
			o.Token = strings.TrimSpace(string(b))
		}
		if sf.caFile != "" {
			b, err := os.ReadFile(sf.caFile)
			if err != nil {
				return o, fmt.Errorf("reading the CA bundle: %w", err)
			}
			o.CA = b
		}
	}
	return o, nil
}

// isRegistryRef tells whether an argument is an oci:// or docker:// reference.
func isRegistryRef(s string) bool {
	return strings.HasPrefix(s, oci.SchemeArtifact+"://") || strings.HasPrefix(s, oci.SchemeImage+"://")
}

// addRegistryCredentials adds the credential flags of a registry command
// (the HTTP source's, without --repository).
func (f *sourceFlags) addRegistryCredentials(cmd *cobra.Command) {
	fl := cmd.Flags()
	fl.StringVar(&f.username, "username", "", "registry user")
	fl.StringVar(&f.passwordFile, "password-file", "", "file holding the registry password")
	fl.StringVar(&f.tokenFile, "token-file", "", "file holding a registry access token")
	fl.StringVar(&f.caFile, "ca-file", "", "PEM bundle of extra trusted CAs")
}

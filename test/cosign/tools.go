//go:build tools

// Package cosign tests the node's signature checks against signatures made
// by the real cosign CLI, built from its module by the test.
package cosign

import _ "github.com/sigstore/cosign/v2/cmd/cosign"

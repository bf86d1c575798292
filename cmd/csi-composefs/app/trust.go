package app

import (
	"time"

	"github.com/spf13/pflag"

	"github.com/csi-composefs/csi-composefs/pkg/trust"
)

// TrustConfig is the node's trust policy setting.
type TrustConfig struct {
	// PolicyFile is the trust policy (per source prefix: accepted public
	// keys, signature required); "" = no signature checks.
	PolicyFile string
	// Poll is how often the file is looked at for changes.
	Poll time.Duration
}

type trustFlags struct {
	policy string
	poll   time.Duration
}

func (t *trustFlags) add(f *pflag.FlagSet) {
	f.StringVar(&t.policy, "trust-policy", "", "trust policy file: per source prefix, the public keys that may sign images (cosign) and whether a signature is required; reloaded when it changes (a ConfigMap); empty = no signature checks")
	f.DurationVar(&t.poll, "trust-policy-poll", trust.DefaultPollInterval, "how often the trust policy file is checked for changes")
}

// apply checks the flags. The file itself is read when the plugin starts
// (a policy that does not parse stops it).
func (t *trustFlags) apply(usageErrorf func(string, ...any) error) (TrustConfig, error) {
	if t.poll <= 0 {
		return TrustConfig{}, usageErrorf("--trust-policy-poll must be positive")
	}
	return TrustConfig{PolicyFile: t.policy, Poll: t.poll}, nil
}

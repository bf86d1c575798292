package trust

import (
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"net/url"
	"sort"
	"strings"

	"sigs.k8s.io/yaml"
)

// Limits of a policy file.
const (
	MaxPolicyBytes = 1 << 20
	maxRules       = 1024
	maxKeysPerRule = 64
)

// AnySource is the prefix of a rule for every source no other rule
// matches.
const AnySource = "*"

// Policy is a parsed trust policy: rules per source prefix. The zero
// Policy and a nil *Policy have no rules (nothing required).
type Policy struct {
	rules []*Rule // longest prefix first
	// Digest is the hex SHA-256 of the file it was parsed from.
	Digest string
}

// Rule is what the policy says for the sources under Prefix.
type Rule struct {
	// Prefix is a canonical source URL prefix (scheme://host/path, lower
	// case scheme and host, no trailing slash), or AnySource.
	Prefix string
	// Require: an image without a valid signature by one of Keys is
	// refused. Without it, a published signature is still checked (a bad
	// one is refused) and an unsigned image is accepted.
	Require bool
	// Keys are the accepted public keys.
	Keys []*Key
}

// policyFile is the file's format (YAML or JSON).
type policyFile struct {
	Sources []sourceEntry `json:"sources"`
}

type sourceEntry struct {
	Prefix           string     `json:"prefix"`
	RequireSignature bool       `json:"requireSignature"`
	Keys             []keyEntry `json:"keys"`
}

type keyEntry struct {
	Name      string `json:"name"`
	PublicKey string `json:"publicKey"`
}

// ParsePolicy parses a policy file:
//
//	sources:
//	- prefix: https://repo.example.com/team-a   # or oci://…, docker://…, or "*"
//	  requireSignature: true
//	  keys:
//	  - name: team-a-2026
//	    publicKey: |
//	      -----BEGIN PUBLIC KEY-----
//	      …
//	      -----END PUBLIC KEY-----
//
// Unknown fields, duplicate prefixes, a rule requiring signatures without
// keys and keys that do not parse are errors naming the rule. An empty
// file is an empty policy.
func ParsePolicy(data []byte) (*Policy, error) {
	if len(data) > MaxPolicyBytes {
		return nil, fmt.Errorf("trust policy: %d bytes, more than %d", len(data), MaxPolicyBytes)
	}
	sum := sha256.Sum256(data)
	p := &Policy{Digest: hex.EncodeToString(sum[:])}
	var f policyFile
	if err := yaml.UnmarshalStrict(data, &f); err != nil {
		// sigs.k8s.io/yaml converts to JSON first: its wording says so.
		msg := err.Error()
		for _, p := range []string{"error unmarshaling JSON: ", "while decoding JSON: ", "json: "} {
			msg = strings.TrimPrefix(msg, p)
		}
		return nil, fmt.Errorf("trust policy: %s", msg)
	}
	if len(f.Sources) > maxRules {
		return nil, fmt.Errorf("trust policy: %d sources, more than %d", len(f.Sources), maxRules)
	}
	seen := make(map[string]int, len(f.Sources))
	for i, e := range f.Sources {
		where := fmt.Sprintf("trust policy: sources[%d]", i)
		prefix, err := CanonicalPrefix(e.Prefix)
		if err != nil {
			return nil, fmt.Errorf("%s: prefix: %w", where, err)
		}
		where = fmt.Sprintf("trust policy: sources[%d] (%s)", i, prefix)
		if j, dup := seen[prefix]; dup {
			return nil, fmt.Errorf("%s: the same prefix as sources[%d]", where, j)
		}
		seen[prefix] = i
		if e.RequireSignature && len(e.Keys) == 0 {
			return nil, fmt.Errorf("%s: requireSignature without keys would refuse every image", where)
		}
		if len(e.Keys) > maxKeysPerRule {
			return nil, fmt.Errorf("%s: %d keys, more than %d", where, len(e.Keys), maxKeysPerRule)
		}
		r := &Rule{Prefix: prefix, Require: e.RequireSignature}
		ids := make(map[string]int, len(e.Keys))
		for k, ke := range e.Keys {
			key, err := ParsePublicKey(ke.Name, []byte(ke.PublicKey))
			if err != nil {
				return nil, fmt.Errorf("%s: keys[%d] %q: %w", where, k, ke.Name, err)
			}
			if j, dup := ids[key.ID]; dup {
				return nil, fmt.Errorf("%s: keys[%d] %q: the same key as keys[%d]", where, k, ke.Name, j)
			}
			ids[key.ID] = k
			r.Keys = append(r.Keys, key)
		}
		p.rules = append(p.rules, r)
	}
	sort.SliceStable(p.rules, func(i, j int) bool { return rank(p.rules[i].Prefix) > rank(p.rules[j].Prefix) })
	return p, nil
}

// rank orders prefixes: longer first, AnySource last.
func rank(prefix string) int {
	if prefix == AnySource {
		return -1
	}
	return len(prefix)
}

// CanonicalPrefix checks a source prefix and returns it the way source
// URLs are spelled (lower-case scheme and host, no trailing slash).
func CanonicalPrefix(s string) (string, error) {
	s = strings.TrimSpace(s)
	if s == AnySource {
		return s, nil
	}
	if s == "" {
		return "", fmt.Errorf("required (a source URL prefix such as https://repo.example.com/team, oci://registry.example.com/team, or %q)", AnySource)
	}
	u, err := url.Parse(s)
	if err != nil {
		return "", fmt.Errorf("%q is not a URL", s)
	}
	scheme := strings.ToLower(u.Scheme)
	switch scheme {
	case "http", "https", "oci", "docker":
	default:
		return "", fmt.Errorf("%q: scheme must be http, https, oci or docker", s)
	}
	if u.Host == "" || u.User != nil || u.RawQuery != "" || u.Fragment != "" || u.ForceQuery {
		return "", fmt.Errorf("%q: want scheme://host/path, without credentials, query or fragment", s)
	}
	return scheme + "://" + strings.ToLower(u.Host) + strings.TrimSuffix(u.EscapedPath(), "/"), nil
}

// Rule returns the rule for the source whose canonical URL is sourceURL:
// the longest prefix that matches whole path elements (https://h/team
// matches https://h/team/app, not https://h/teamx), else the AnySource
// rule, else nil.
func (p *Policy) Rule(sourceURL string) *Rule {
	if p == nil {
		return nil
	}
	u := sourceURL + "/"
	for _, r := range p.rules {
		if r.Prefix == AnySource || strings.HasPrefix(u, r.Prefix+"/") {
			return r
		}
	}
	return nil
}

// Rules returns the rules, longest prefix first.
func (p *Policy) Rules() []*Rule {
	if p == nil {
		return nil
	}
	return p.rules
}

// KeyNames lists the rule's keys for messages.
func (r *Rule) KeyNames() string {
	names := make([]string, len(r.Keys))
	for i, k := range r.Keys {
		names[i] = k.String()
	}
	return strings.Join(names, ", ")
}
